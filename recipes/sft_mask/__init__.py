"""Masked SFT: supervised fine-tuning that trains only on the tokens a selector keeps, and Proximal SFT.

``selector.name`` picks a registered ``token_selector`` (ProFit and its variants, DFT, Rho-1,
quantile) or ``none``; ``loss.name`` is ``ce`` (cross-entropy) or ``psft`` (the clipped-ratio
objective against a lagged policy snapshot). Rho-1 needs a ``reference`` model.

    python -m runner -m recipe=sft,profit_sft,dft_sft,rho1_sft,psft
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

from omegaconf import DictConfig

from recipes.sft_mask import selectors
from recipes.sft_mask.objective import NORMS, MaskedSFT, Proximal
from runner import registry
from runner.config import (
    bounds,
    checked_blocks,
    component_params,
    method_block,
    unknown_keys,
)
from runner.data import build_dataset
from runner.lm_head import check_plain_head
from runner.recipe import Recipe, RecipeResult, RunContext
from runner.registry import register
from runner.train import train


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
    blocks = ("selector", "loss")
    uses_data = True
    baseline_role = "model"

    def validate(self, cfg: DictConfig) -> list[str]:
        blocks, problems = checked_blocks(cfg, ("selector", SelectorConfig), ("loss", MaskLossConfig))
        if not blocks:
            return problems
        sel, loss = blocks
        problems += unknown_keys(cfg, "loss", set(MaskLossConfig.__dataclass_fields__))
        if sel.name != "none" and sel.name not in registry.names("token_selector"):
            valid = ["none", *registry.names("token_selector")]
            return problems + [registry.unknown_name_message("token_selector", sel.name, valid, key="selector.name")]
        params = component_params(cfg, "selector", SelectorConfig)
        if sel.name != "none":
            fn = registry.get("token_selector", sel.name)
            problems += registry.check_params(fn, params, key="selector", skip=2, runtime=selectors.RUNTIME_ARGS)
            problems += self._check_selector_values(sel.name, params)
        elif params:
            problems.append(f"selector: {', '.join(sorted(params))} set, but selector.name is none")
        if (sel.name == "rho1") != (cfg.get("reference") is not None):
            problems.append("reference: selector rho1 needs a reference model (reference.path=...), and only rho1 uses one")
        return problems

    @staticmethod
    def _check_selector_values(name: str, params: dict) -> list[str]:
        problems = []
        if name == "profit":
            direction, tau = params.get("direction", "higher"), params.get("tau", 0.1)
            if direction not in selectors.DIRECTIONS:
                problems.append(f"selector.direction: {direction!r} is not allowed; choose one of "
                                f"{', '.join(selectors.DIRECTIONS)}")
            if not 0.0 <= tau <= 1.0:
                problems.append(f"selector.tau: {tau} is out of range; it is a probability in [0, 1]")
            if direction == "middle" and not (params.get("tau_high") is not None and tau <= params["tau_high"] <= 1):
                problems.append("selector.tau_high: direction=middle needs tau <= tau_high <= 1")
        for key in ("keep_ratio", "rho"):
            if key in params and not 0.0 < params[key] <= 1.0:
                problems.append(f"selector.{key}: {params[key]} is out of range; it must be > 0 and <= 1")
        if params.get("by", "prob") not in ("prob", "entropy"):
            problems.append(f"selector.by: {params['by']!r} is not allowed; choose prob or entropy")
        return problems

    def run(self, cfg: DictConfig, ctx: RunContext) -> RecipeResult:
        sel, loss_cfg = method_block(cfg, "selector", SelectorConfig), method_block(cfg, "loss", MaskLossConfig)
        model, tokenizer = ctx.load_model("model")
        check_plain_head(model, "model", key="loss.chunk_size")
        reference = None
        if cfg.get("reference") is not None:
            reference, _ = ctx.load_model("reference")
            reference.eval().requires_grad_(False)
        selector = registry.get("token_selector", sel.name) if sel.name != "none" else None
        params = component_params(cfg, "selector", SelectorConfig)
        objective = MaskedSFT(
            selector=selector, selector_params=params, norm=sel.norm, chunk_size=loss_cfg.chunk_size,
            reference=reference,
            needs_entropy=selector is not None and "entropy" in inspect.signature(selector).parameters
            and params.get("by") == "entropy",
            proximal=Proximal(loss_cfg.eps_low, loss_cfg.eps_high, loss_cfg.update_every) if loss_cfg.name == "psft" else None,
            seed=cfg.train.seed,
        )
        examples = build_dataset(cfg.data, tokenizer)
        ctx.log.info("masked SFT: selector %s, loss %s, %d examples", sel.name, loss_cfg.name, len(examples))
        result = train(model, examples, objective, cfg.train, accelerator=ctx.accelerator, run_dir=ctx.run_dir,
                       pad_id=tokenizer.pad_token_id, resume_from=ctx.resume_from, desc=f"sft_mask[{sel.name},{loss_cfg.name}]")
        model = ctx.accelerator.unwrap_model(model)
        checkpoint = ctx.save(model, tokenizer) if cfg.save_checkpoint else None
        kept = [h["kept_fraction"] for h in result.history if "kept_fraction" in h]
        return RecipeResult(checkpoint=checkpoint, model=model, tokenizer=tokenizer, train=result,
                            extra={"sft_mask": {"selector": sel.name, "loss": loss_cfg.name, "norm": sel.norm,
                                                "mean_kept_fraction": sum(kept) / len(kept) if kept else None}})
