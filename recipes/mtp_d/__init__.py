"""MTP-D: multi-token-prediction heads trained by self-distillation from the model's own main head.

K cascaded DeepSeek-V3 style MTP modules (`recipes.mtp_d.heads`) are put on a causal LM and
trained through the runner's loop with (`recipes.mtp_d.objective`, a reconstruction [R]: the paper
has no public code)

    L = L_main + (w / K) sum_k CE_k + beta sum_k mean_i KL_N(sg(q_{i+k}) || p_{k,i})

with the trunk frozen by default, so the main model is unchanged. ``loss.beta=0`` is plain MTP
training (the baseline, recipe ``mtp_heads``). Afterwards the heads draft for greedy speculative
decoding of held-out toy test problems, and the run records the per-head acceptance alpha_k, vLLM's
draft acceptance rate and the tokens per main forward (`recipes.mtp_d.speculative`).

The main model is saved as a plain checkpoint (``checkpoint/``), the heads beside it in
``mtp_heads/`` (``mtp_heads.safetensors`` and ``mtp_heads.json``; `load_heads` reads them back).
``loss.init_heads=<an mtp_heads folder>`` starts from saved heads; asking for more heads than it
holds is the looped extension [R]: head k > K starts as a copy of head ((k-1) mod K) + 1.
``loss.accept.drafts`` above the number of heads drafts with the modules reused cyclically.

    python -m runner recipe=mtpd
    python -m runner -m recipe=mtp_heads,mtpd loss.heads=1,2,4
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional

from omegaconf import DictConfig

from recipes.mtp_d.heads import (
    MTPModel,
    extend_heads,
    load_heads,
    new_heads,
    read_heads_config,
    save_heads,
)
from recipes.mtp_d.objective import MTPDObjective
from recipes.mtp_d.speculative import acceptance, greedy, speculative_decode
from runner.config import bounds
from runner.data import build_dataset
from runner.errors import ConfigError
from runner.recipe import Blocks, Recipe, RecipeResult, RunContext
from runner.registry import register
from runner.toy.tasks import TaskSpec

HEADS_DIR = "mtp_heads"


@dataclass
class AcceptConfig:
    """The speculative-decoding check after training, on held-out toy test problems as chats."""

    prompts: int = field(default=100, metadata=bounds(0))  # half easy, half hard; 0 skips the check
    drafts: Optional[int] = field(default=None, metadata=bounds(1))  # per main forward; null: one per head
    max_new_tokens: int = field(default=32, metadata=bounds(1))
    check_greedy: bool = True  # also decode plainly and record how many outputs are identical (must be all)


@dataclass
class MTPLossConfig:
    heads: int = field(default=1, metadata=bounds(1))  # K
    beta: float = field(default=1.0, metadata=bounds(0))  # [R] weight of the self-distillation KL
    ce_weight: float = field(default=0.3, metadata=bounds(0))  # [R] w: the heads' CE terms weigh w / K each
    top_n: int = field(default=20, metadata=bounds(1))  # [R] the teacher's top-N ids the KL is restricted to
    freeze_trunk: bool = True  # false: the trunk and main head train too (on L_main and the heads' CE, not the KL)
    init_heads: Optional[str] = None  # an mtp_heads folder to start from (more heads than it holds: looped [R])
    accept: AcceptConfig = field(default_factory=AcceptConfig)


@register("recipe", "mtp_d")
class MTPD(Recipe):
    roles = ("model",)
    blocks = {"loss": MTPLossConfig}
    data_role = "model"
    baseline_role = "model"

    def check(self, cfg: DictConfig, blocks: Blocks) -> list[str]:
        loss = blocks["loss"]
        problems = []
        if loss.beta == 0 and loss.ce_weight == 0 and loss.freeze_trunk:
            problems.append("loss.ce_weight: with loss.beta=0 and a frozen trunk nothing trains the heads; "
                            "set loss.ce_weight > 0 or loss.beta > 0")
        if loss.init_heads is not None:
            try:
                saved = read_heads_config(loss.init_heads)
            except ConfigError as exc:
                problems += exc.problems
            else:
                if loss.heads < saved["num_heads"]:
                    problems.append(f"loss.heads: {loss.heads} is fewer than the {saved['num_heads']} heads in "
                                    f"loss.init_heads; give at least {saved['num_heads']}")
        available = 2 * TaskSpec().test_size
        if loss.accept.prompts > available:
            problems.append(f"loss.accept.prompts: {loss.accept.prompts} asked; the toy test splits hold {available}")
        if loss.accept.prompts and cfg.data.source != "toy":
            problems.append("loss.accept.prompts: the acceptance check decodes the toy world's held-out test "
                            "problems; with other data set loss.accept.prompts=0")
        return problems

    def run(self, cfg: DictConfig, ctx: RunContext) -> RecipeResult:
        loss_cfg = ctx.blocks["loss"]
        lm, tokenizer = ctx.load_model("model")
        if loss_cfg.init_heads is not None:
            heads = load_heads(loss_cfg.init_heads, lm)
            start = len(heads)
            heads = extend_heads(heads, loss_cfg.heads)
            ctx.log.info("MTP heads from %s: %d loaded, %d in all (extra ones copied cyclically)",
                         loss_cfg.init_heads, start, len(heads))
        else:
            heads = new_heads(lm, loss_cfg.heads)
        if loss_cfg.freeze_trunk:
            lm.requires_grad_(False)
        mtp = MTPModel(lm, heads)
        objective = MTPDObjective(beta=loss_cfg.beta, ce_weight=loss_cfg.ce_weight, top_n=loss_cfg.top_n,
                                  frozen_trunk=loss_cfg.freeze_trunk)
        examples = build_dataset(cfg.data, tokenizer)
        ctx.log.info("MTP-D: %d heads, beta %g, w %g, top-%d, trunk %s, %d examples", len(heads), loss_cfg.beta,
                     loss_cfg.ce_weight, loss_cfg.top_n, "frozen" if loss_cfg.freeze_trunk else "trained",
                     len(examples))
        result = ctx.train(mtp, examples, objective, pad_id=tokenizer.pad_token_id,
                           desc=f"mtp_d[K={len(heads)},beta={loss_cfg.beta:g}]")
        mtp = ctx.accelerator.unwrap_model(mtp).eval()
        lm = mtp.lm
        checkpoint = ctx.save(lm, tokenizer) if cfg.save_checkpoint else None
        extra = {"heads": len(heads), "beta": loss_cfg.beta, "ce_weight": loss_cfg.ce_weight,
                 "top_n": loss_cfg.top_n, "freeze_trunk": loss_cfg.freeze_trunk, "init_heads": loss_cfg.init_heads}
        stats = {}
        if ctx.is_main_process:
            # the model the heads belong to: the checkpoint, else (frozen trunk) the input model; else none saved
            model = str(checkpoint.resolve()) if checkpoint else str(cfg.model.path) if loss_cfg.freeze_trunk else None
            settings = {k: v for k, v in extra.items() if k != "heads"}
            extra["heads_path"] = str(save_heads(mtp.heads, lm, ctx.run_dir / HEADS_DIR, steps=result.steps,
                                                 model=model, **settings).resolve())
            if loss_cfg.accept.prompts:
                report = accept_check(mtp, tokenizer, loss_cfg.accept, ctx.run_dir / "mtp_accept.jsonl")
                extra["acceptance"] = report
                stats = report["stats"]
                ctx.log.info("speculative decoding, %d drafts: tokens per forward %.3f, alpha %s, draft acceptance "
                             "%.3f, identical to greedy %s", report["drafts"], stats["mtp/tokens_per_forward"],
                             [None if a is None else round(a, 3) for a in report["alpha"]],
                             stats["mtp/draft_acceptance_rate"],
                             report.get("greedy_identical", "not checked"))
        ctx.accelerator.wait_for_everyone()
        return RecipeResult(checkpoint=checkpoint, model=lm, tokenizer=tokenizer, train=result, stats=stats,
                            extra={"mtp_d": extra})


# --------------------------------------------------------------------------------------------
# The acceptance check


def held_out_prompts(n: int) -> list[tuple[str, int]]:
    """(question, answer) of `n` held-out toy test problems, half easy and half hard, in a fixed order."""
    from runner.toy.tasks import test_problems

    spec = TaskSpec()
    easy, hard = test_problems(spec, "easy"), test_problems(spec, "hard")
    picked = list(easy[: (n + 1) // 2]) + list(hard[: n // 2])
    if len(picked) < n:
        raise ConfigError(f"loss.accept.prompts: {n} asked, the toy test splits hold {len(easy) + len(hard)}")
    return [(p.question(), p.answer) for p in picked]


def accept_check(mtp: MTPModel, tokenizer, accept: AcceptConfig, out_file=None) -> dict:
    """Speculative decoding of held-out toy problems with the heads: the acceptance figures, the exact
    match of the (greedy) answers, and whether every output equals plain greedy decoding."""
    from runner.toy.tasks import final_answer

    drafts = accept.drafts or len(mtp.heads)
    eos = tokenizer.eos_token_id
    accepted, forwards, emitted, correct, identical, lines = [], 0, 0, 0, 0, []
    for i, (question, answer) in enumerate(held_out_prompts(accept.prompts)):
        text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)
        prompt = tokenizer(text, add_special_tokens=False).input_ids
        dec = speculative_decode(mtp, prompt, accept.max_new_tokens, eos, drafts)
        accepted += dec.accepted
        forwards += dec.forwards
        emitted += len(dec.tokens)
        response = tokenizer.decode(dec.tokens, skip_special_tokens=True)
        ok = final_answer(response) == answer
        correct += ok
        line = {"doc_id": i, "question": question, "response": response, "exact_match": float(ok),
                "accepted": dec.accepted, "forwards": dec.forwards,
                "tokens_per_forward": 1 + sum(dec.accepted) / len(dec.accepted) if dec.accepted else None}
        if accept.check_greedy:
            same = greedy(mtp.lm, prompt, accept.max_new_tokens, eos) == dec.tokens
            identical += same
            line["greedy_identical"] = same
        lines.append(line)
    acc = acceptance(accepted, drafts)
    n = accept.prompts
    stats = {**acc.stats(), "mtp/exact_match": correct / n, "mtp/tokens_per_main_forward_all": emitted / forwards}
    report = {"drafts": drafts, "prompts": n, "alpha": acc.alpha, "verify_steps": acc.verify_steps,
              "main_forwards": forwards, "emitted_tokens": emitted, "stats": stats}
    if accept.check_greedy:
        report["greedy_identical"] = f"{identical}/{n}"
        stats["mtp/greedy_identical"] = identical / n
    if out_file is not None:
        from runner import atomic

        atomic.write_text(out_file, "".join(json.dumps(line) + "\n" for line in lines))
    return report
