"""Decoding-time realignment (DeRa, Liu et al., arXiv 2402.02992): evaluate an aligned model's
realignment without training it.

Aligning with KL strength beta/lam is approximated per token by the geometric mixture
softmax(lam * z_aligned + (1 - lam) * z_reference) of the aligned model and the reference it was
aligned from. The recipe loads both (``aligned``, ``reference``; one tokenizer), wraps them as one
model (`recipes.realign.dera.DeRa`) and hands it to the eval stage, which runs lm-eval on it in
memory: generation decodes from the fused logits (each model with its own KV cache, left padding
handled), log-likelihood tasks score with the fused log-softmax. lam = 0 is the reference, 1 the
aligned model, lam > 1 extrapolates past it. Nothing is written but the evaluation: the fused model
is two checkpoints and a number, not one checkpoint.

    python -m runner recipe=dera_eval realign.lam=0.5
    python -m runner -m recipe=dera_eval realign.lam=0,0.25,0.5,0.75,1,1.5
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from omegaconf import DictConfig

from recipes.realign.dera import DeRa
from runner.errors import ConfigError
from runner.models import check_same_vocab, load_tokenizer, resolve_model_path
from runner.recipe import Blocks, Recipe, RecipeResult, RunContext
from runner.registry import register


@dataclass
class RealignConfig:
    """The `realign` block: DeRa's weight on the aligned model's logits (no default: name the model you evaluate)."""

    lam: Optional[float] = None  # 0 = the reference, 1 = the aligned model, > 1 extrapolates, < 0 goes past the reference


@register("recipe", "dera")
class DeRaEval(Recipe):
    roles = ("aligned", "reference")
    blocks = {"realign": RealignConfig}
    baseline_role = "aligned"

    def check(self, cfg: DictConfig, blocks: Blocks) -> list[str]:
        problems = []
        if blocks["realign"].lam is None:
            problems.append("realign.lam: missing; give DeRa's weight on the aligned model, e.g. realign.lam=0.5 "
                            "(0 = the reference model, 1 = the aligned model, > 1 extrapolates past it)")
        if not cfg.eval.tasks:
            problems.append("eval.tasks: empty; DeRa only evaluates the fused model (it writes no checkpoint), so it "
                            "needs tasks (e.g. eval=toy_quick)")
        return problems

    def writes_checkpoint(self, cfg: DictConfig) -> bool:
        return False  # the fused model exists only at decoding time

    def run(self, cfg: DictConfig, ctx: RunContext) -> RecipeResult:
        lam = ctx.blocks["realign"].lam
        # the logits are added token id by token id: one vocabulary, compared before any weights are loaded
        tokenizers = {role: load_tokenizer(resolve_model_path(cfg[role]), trust_remote_code=cfg[role].trust_remote_code,
                                           revision=cfg[role].revision) for role in self.roles}
        check_same_vocab(tokenizers["aligned"], tokenizers["reference"], "aligned", "reference")
        if tokenizers["aligned"].chat_template != tokenizers["reference"].chat_template:
            ctx.log.warning("note: the reference's chat template differs from the aligned model's; both models read "
                            "the prompts as the aligned model's tokenizer formats them")
        aligned, tokenizer = ctx.load_model("aligned")
        reference, _ = ctx.load_model("reference")
        try:
            model = DeRa(aligned.eval(), reference.eval(), lam)
        except ValueError as exc:
            raise ConfigError(f"reference: {exc}") from None
        ctx.log.info("DeRa at lam=%s: %s * %s + %s * %s (two forwards per token)", lam, lam, cfg.aligned.path,
                     1 - lam, cfg.reference.path)
        return RecipeResult(model=model, tokenizer=tokenizer, extra={"realign": {
            "method": "dera", "lam": lam, "aligned": cfg.aligned.path, "reference": cfg.reference.path}})
