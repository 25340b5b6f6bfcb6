"""Shadow-FT: tune the Base model, graft its weight delta onto the Instruct model; and the baselines.

``graft.tune`` picks what is trained:

- ``base`` (Shadow-FT, arXiv 2505.12716): fine-tune ``base`` on the data with Instruct's tokenizer and
  chat template, fully or through LoRA (``lora.enabled=true``), save it as ``tuned_base/``, then write
  ``instruct + scale * (tuned_base - base)`` for every tensor whose lowercased name contains one of
  ``graft.patterns`` (the attention and MLP projections, biases and fused ``qkv_proj`` /
  ``gate_up_proj`` included, as the reference's substring rule has it); embeddings, lm_head and
  norms stay Instruct's, and a ``*_proj`` tensor left at Instruct's value is named in a warning. The
  graft streams tensor by tensor (`recipes.merge.engine`), so at most one model is ever held in
  memory (the one being trained). results.json reports ``relative_delta``:
  ||W_instruct - W_base|| / ||W_base|| (and the same for the tuned Base) over the grafted tensors;
- ``instruct``: fine-tune ``instruct`` directly, fully or through LoRA: the conventional baseline;
- ``none``: graft an existing ``tuned_base`` checkpoint onto ``instruct`` without training.

    python -m runner -m recipe=shadow_ft,instruct_ft,shadow_ft_lora,instruct_ft_lora
    python -m runner recipe=graft base.path=B tuned_base.path=B2 instruct.path=I
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional

from omegaconf import DictConfig

from recipes.merge.engine import Selection, merge_models
from runner.config import bounds
from runner.data import build_dataset
from runner.errors import ConfigError
from runner.lora import LoraConfig, with_lora
from runner.models import DTYPES, check_same_vocab, load_tokenizer, resolve_model_path
from runner.recipe import Blocks, Recipe, RecipeResult, RunContext
from runner.registry import register
from runner.tensorio import TensorSource, parse_size
from runner.train import causal_lm_loss

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@register("merge_method", "graft")
def graft(tensors, base, *, scale: float = 1.0):
    """instruct + scale * (tuned_base - base); tensors = [instruct, tuned_base]."""
    instruct, tuned = tensors
    return instruct + scale * (tuned - base)


class GraftWithNorms:
    """`graft`, also summing squared norms over the grafted tensors, to report how far Instruct and the
    tuned Base sit from Base: Shadow-FT assumes the first is small (the paper's premise)."""

    def __init__(self):
        self.base = self.instruct_delta = self.tuned_delta = 0.0

    def __call__(self, tensors, base, *, scale: float = 1.0):
        instruct, tuned = tensors
        self.base += float(base.square().sum())
        self.instruct_delta += float((instruct - base).square().sum())
        self.tuned_delta += float((tuned - base).square().sum())
        return graft(tensors, base, scale=scale)

    def relative(self) -> dict:
        """||W_instruct - W_base|| / ||W_base|| and the same for the tuned Base, over the grafted tensors."""
        if self.base == 0:
            return {}
        return {"instruct": math.sqrt(self.instruct_delta / self.base), "tuned_base": math.sqrt(self.tuned_delta / self.base)}


@dataclass
class GraftConfig:
    tune: str = field(default="base", metadata=bounds(choices=("base", "instruct", "none")))
    patterns: List[str] = field(default_factory=lambda: list(PROJECTIONS))  # substrings of the names that are grafted
    scale: float = field(default=1.0, metadata=bounds(0))
    dtype: Optional[str] = field(default=None, metadata=bounds(choices=tuple(DTYPES)))  # default: Instruct's
    max_shard_size: str = "2GB"


# graft.tune -> the roles it needs; every other optional role must be unset
NEEDS = {"base": ("base",), "instruct": (), "none": ("base", "tuned_base")}


@register("recipe", "shadow_ft")
class ShadowFT(Recipe):
    roles = ("instruct",)
    optional_roles = ("base", "tuned_base")
    blocks = {"graft": GraftConfig, "lora": LoraConfig}
    data_role = "instruct"
    baseline_role = "instruct"

    def uses(self, cfg: DictConfig) -> set[str]:
        return {*self.roles, *NEEDS.get(cfg.graft.get("tune", GraftConfig.tune), self.optional_roles)}

    def check(self, cfg: DictConfig, blocks: Blocks) -> list[str]:
        g, lora = blocks["graft"], blocks["lora"]
        problems = []
        needs = NEEDS[g.tune]
        for role in self.optional_roles:
            if role in needs and cfg.get(role) is None:
                problems.append(f"{role}: graft.tune={g.tune} needs a {role!r} model ({role}.path=...)")
            elif role not in needs and cfg.get(role) is not None:
                problems.append(f"{role}: set, but graft.tune={g.tune} does not use it; remove it")
        if g.tune == "none" and lora.enabled:
            problems.append("lora.enabled: graft.tune=none trains nothing; LoRA applies to graft.tune=base or instruct")
        if g.tune != "instruct":
            if not g.patterns or not all(isinstance(p, str) and p for p in g.patterns):
                problems.append(f"graft.patterns: {list(g.patterns)!r} must list module names such as q_proj")
            try:
                parse_size(g.max_shard_size)
            except ConfigError:
                problems.append(f"graft.max_shard_size: {g.max_shard_size!r} is not a size like 2GB or 500MB")
        return problems

    def run(self, cfg: DictConfig, ctx: RunContext) -> RecipeResult:
        g, lora = ctx.blocks["graft"], ctx.blocks["lora"]
        if g.tune == "instruct":
            model, tokenizer = ctx.load_model("instruct")
            model, result = self._tune(model, tokenizer, lora, cfg, ctx, "instruct_ft")
            checkpoint = ctx.save(model, tokenizer) if cfg.save_checkpoint else None
            return RecipeResult(checkpoint=checkpoint, model=model, tokenizer=tokenizer, train=result,
                                extra={"shadow_ft": {"tune": "instruct", "lora": lora.enabled}})

        instruct = resolve_model_path(cfg.instruct)
        base = resolve_model_path(cfg.base)
        result = None
        if g.tune == "base":
            # Base is trained on Instruct's chat format: the tokenizers must agree token for token.
            tokenizer = load_tokenizer(instruct, trust_remote_code=cfg.instruct.trust_remote_code)
            check_same_vocab(load_tokenizer(base, trust_remote_code=cfg.base.trust_remote_code), tokenizer,
                             "base", "instruct")
            model, _ = ctx.load_model("base")
            model, result = self._tune(model, tokenizer, lora, cfg, ctx, "shadow_ft")
            tuned = ctx.save(model, tokenizer, name="tuned_base")
            del model
        else:
            tuned = resolve_model_path(cfg.tuned_base)
        out = ctx.run_dir / "checkpoint"
        stats, method = {}, GraftWithNorms()
        selection = Selection(contains=tuple(g.patterns))
        left = [k for k in TensorSource(instruct).keys() if "_proj" in k.lower() and not selection(k)]
        if left:
            ctx.log.warning("%d projection tensors match no graft.patterns and stay Instruct's: %s", len(left),
                            ", ".join(left[:8]) + (", ..." if len(left) > 8 else ""))
        if ctx.is_main_process:
            stats = merge_models([instruct, tuned], base, method, {"scale": g.scale}, out,
                                 selection=selection, outside=instruct, donor=instruct,
                                 dtype=g.dtype, max_shard_size=g.max_shard_size, seed=cfg.seed, desc="graft")
        ctx.accelerator.wait_for_everyone()
        return RecipeResult(checkpoint=out, train=result,
                            extra={"shadow_ft": {"tune": g.tune, "lora": lora.enabled, "scale": g.scale,
                                                 "grafted_tensors": stats.get("merged_tensors"),
                                                 "instruct_tensors": stats.get("copied_tensors"),
                                                 "relative_delta": method.relative()}})

    @staticmethod
    def _tune(model, tokenizer, lora, cfg: DictConfig, ctx: RunContext, desc: str):
        """Fine-tune `model` on the data (through LoRA if enabled); returns the plain model and the train record."""
        if lora.enabled:
            model = with_lora(model, lora)
        examples = build_dataset(cfg.data, tokenizer)
        ctx.log.info("%s: training on %d examples%s", desc, len(examples), " (LoRA)" if lora.enabled else "")
        result = ctx.train(model, examples, causal_lm_loss, pad_id=tokenizer.pad_token_id, desc=desc)
        model = ctx.accelerator.unwrap_model(model)
        if lora.enabled:
            model = model.merge_and_unload()  # W + (alpha / r) * B @ A
        return model, result
