"""Plain supervised fine-tuning: token-mean cross-entropy on response tokens.

The baseline of the sft-mask and shadow-ft recipes, and the runner's end-to-end demo::

    python -m runner recipe=sft
"""

from omegaconf import DictConfig

from runner.data import build_dataset
from runner.recipe import Recipe, RecipeResult, RunContext
from runner.registry import register
from runner.train import causal_lm_loss


@register("recipe", "sft")
class SFT(Recipe):
    roles = ("model",)
    data_role = "model"
    baseline_role = "model"

    def run(self, cfg: DictConfig, ctx: RunContext) -> RecipeResult:
        model, tokenizer = ctx.load_model("model")
        examples = build_dataset(cfg.data, tokenizer)
        ctx.log.info("training on %d examples", len(examples))
        result = ctx.train(model, examples, causal_lm_loss, pad_id=tokenizer.pad_token_id, desc="sft")
        model = ctx.accelerator.unwrap_model(model)
        checkpoint = ctx.save(model, tokenizer) if cfg.save_checkpoint else None
        return RecipeResult(checkpoint=checkpoint, model=model, tokenizer=tokenizer, train=result)
