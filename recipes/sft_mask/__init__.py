"""Masked SFT: supervised fine-tuning that trains only on the tokens a selector keeps, and Proximal SFT.

``selector.name`` picks a registered ``token_selector`` (ProFit and its variants, DFT, Rho-1,
quantile) or ``none``; ``loss.name`` is ``ce`` (cross-entropy) or ``psft`` (the clipped-ratio
objective against a lagged policy snapshot). Rho-1 needs a ``reference`` model.

    python -m runner -m recipe=sft,profit_sft,dft_sft,rho1_sft,psft
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import DictConfig

from recipes.sft_mask import selectors  # noqa: F401  (registers the token selectors)
from recipes.sft_mask.objective import NORMS, MaskedSFT, Proximal
from runner import registry
from runner.config import bounds
from runner.data import build_dataset
from runner.lm_head import check_plain_head
from runner.recipe import Blocks, Component, Recipe, RecipeResult, RunContext
from runner.registry import register


@dataclass
class SelectorConfig:
    """The recipe's own `selector` keys; the selector's parameters (tau, ...) sit beside them."""

    name: str = "none"
    norm: str = field(default="all_tokens", metadata=bounds(choices=NORMS))


@dataclass
class MaskLossConfig:
    name: str = field(default="ce", metadata=bounds(choices=("ce", "psft")))
    eps_low: float = field(default=0.2, metadata=bounds(0, 1))
    eps_high: float = field(default=0.28, metadata=bounds(0))
    update_every: int = field(default=8, metadata=bounds(1))  # PSFT: optimizer steps per policy snapshot
    chunk_size: int = field(default=1024, metadata=bounds(1))  # tokens per LM-head chunk


@register("recipe", "sft_mask")
class SFTMask(Recipe):
    roles = ("model",)
    optional_roles = ("reference",)
    blocks = {"selector": SelectorConfig, "loss": MaskLossConfig}
    components = {"selector": (Component("token_selector", "name", none="none"),)}
    data_role = "model"
    baseline_role = "model"

    def check(self, cfg: DictConfig, blocks: Blocks) -> list[str]:
        name = blocks["selector"].name
        if (name != "none" and _takes(name, "reference_logprobs")) != (cfg.get("reference") is not None):
            return [f"reference: selector {name} needs a reference model (reference.path=...), and only a "
                    "selector that compares against one (rho1) uses it"]
        return []

    def run(self, cfg: DictConfig, ctx: RunContext) -> RecipeResult:
        sel, loss_cfg, params = ctx.blocks["selector"], ctx.blocks["loss"], ctx.blocks.params["selector"]
        model, tokenizer = ctx.load_model("model")
        check_plain_head(model, "model", key="loss.chunk_size")
        reference = None
        if cfg.get("reference") is not None:
            reference, _ = ctx.load_model("reference")
            reference.eval().requires_grad_(False)
        selector = registry.get("token_selector", sel.name) if sel.name != "none" else None
        objective = MaskedSFT(
            selector=selector, selector_params=params, norm=sel.norm, chunk_size=loss_cfg.chunk_size,
            reference=reference,
            needs_entropy=selector is not None and _takes(sel.name, "entropy") and params.get("by") == "entropy",
            proximal=Proximal(loss_cfg.eps_low, loss_cfg.eps_high, loss_cfg.update_every) if loss_cfg.name == "psft" else None,
            seed=cfg.train.seed,
        )
        examples = build_dataset(cfg.data, tokenizer)
        ctx.log.info("masked SFT: selector %s, loss %s, %d examples", sel.name, loss_cfg.name, len(examples))
        result = ctx.train(model, examples, objective, pad_id=tokenizer.pad_token_id,
                           desc=f"sft_mask[{sel.name},{loss_cfg.name}]")
        model = ctx.accelerator.unwrap_model(model)
        checkpoint = ctx.save(model, tokenizer) if cfg.save_checkpoint else None
        kept = [h["kept_fraction"] for h in result.history if "kept_fraction" in h]
        return RecipeResult(checkpoint=checkpoint, model=model, tokenizer=tokenizer, train=result,
                            extra={"sft_mask": {"selector": sel.name, "loss": loss_cfg.name, "norm": sel.norm,
                                                "mean_kept_fraction": sum(kept) / len(kept) if kept else None}})


def _takes(selector: str, runtime_arg: str) -> bool:
    """Whether a selector takes `runtime_arg` (a reference model's log-probs, the policy's entropy)."""
    return runtime_arg in registry.contract("token_selector", selector).runtime
