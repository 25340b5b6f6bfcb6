"""On-policy distillation: the student writes the responses it is trained on.

- **GKD** (Agarwal et al.; TRL ``GKDTrainer``): at each optimizer step, with probability
  ``student_fraction`` (TRL's lambda) the batch's prompts are answered by the student and the KD
  divergence is taken on those responses (LoCa and CE off: there is no ground truth); otherwise the
  dataset batch is used as is.
- **G-OPD / ExOPD** (spec distill.md section 5, new_methods.md section 1): every batch is a student
  rollout; each sampled token gets the advantage ``A_t = lam * (log p_T - log p_ref) - (log p_old -
  log p_ref)`` from the teacher, the reference and the student that sampled, and the student takes a
  PPO-clip step on it. ``lam = reward_scale``: 1 is plain OPD (``A_t = log p_T - log p_old``: the
  reference drops out and is neither loaded nor run), 1.25 (the released scripts) extrapolates past
  the teacher. The reference is the student's initial weights unless a ``reference`` model is given
  (reward correction: the teacher's pre-RL base). With one update per rollout, as in the reference
  scripts (n=1, one PPO epoch), the sampling policy is the current one, so the ratio is 1 and the
  clip never binds; it is kept for the same objective under larger rollout batches. ``agg``: the
  token losses are averaged over all response tokens (``token_mean``) or within each sequence and
  then over sequences (``seq_mean_token_mean``, what verl's token-mean at micro-batch 1 amounts to).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from recipes.distill.objective import KDObjective
from runner.data import IGNORE, collate, shift_labels
from runner.errors import ConfigError
from runner.train import LossOutput


@dataclass
class Sampling:
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0


def prompts_of(batch: dict[str, torch.Tensor]) -> list[list[int]]:
    """Each row's tokens before its first trained token (its prompt, chat template included)."""
    prompts = []
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        trained = (labels != IGNORE).nonzero()
        if len(trained) == 0:
            raise ConfigError("onpolicy: a batch row has no response to replace; on-policy modes need "
                              "prompt/response or chat data (data.packing=false)")
        prompts.append(ids[: int(trained[0])].tolist())
    return prompts


@torch.no_grad()
def rollout(model, batch: dict[str, torch.Tensor], sampling: Sampling, pad_id: int, eos_id: int) -> dict[str, torch.Tensor]:
    """A new batch: the same prompts, answered by `model` (sampled), trained on the answers only."""
    prompts = prompts_of(batch)
    width = max(len(p) for p in prompts)
    device = batch["input_ids"].device
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    attention = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding for generation
        ids[i, width - len(p):] = torch.tensor(p, device=device)
        attention[i, width - len(p):] = 1
    was_training = model.training
    model.eval()
    out = model.generate(input_ids=ids, attention_mask=attention, do_sample=True, temperature=sampling.temperature,
                         top_p=sampling.top_p, top_k=sampling.top_k, max_new_tokens=sampling.max_new_tokens,
                         pad_token_id=pad_id, eos_token_id=eos_id)
    model.train(was_training)
    rows = []
    for p, gen in zip(prompts, out[:, width:].tolist()):
        if eos_id in gen:
            gen = gen[: gen.index(eos_id) + 1]
        gen = gen or [eos_id]
        rows.append({"input_ids": p + gen, "labels": [IGNORE] * len(p) + gen})
    return {k: v.to(device) for k, v in collate(rows, pad_id).items()}


class GKD:
    """Mix dataset batches and student rollouts; one KD objective for both."""

    def __init__(self, objective: KDObjective, teacher, unwrap: Callable, student_fraction: float,
                 sampling: Sampling, pad_id: int, eos_id: int, seed: int):
        self.objective, self.teacher, self.unwrap = objective, teacher, unwrap
        self.fraction, self.sampling, self.pad_id, self.eos_id, self.seed = student_fraction, sampling, pad_id, eos_id, seed

    def uses_student(self, step: int) -> bool:
        # a pure function of (seed, step): a resumed run draws the same sources as an uninterrupted one
        return random.Random(self.seed * 1_000_003 + step).random() < self.fraction

    def __call__(self, model, batch, step: int) -> LossOutput:
        generated = self.uses_student(step)
        if generated:
            batch = rollout(self.unwrap(model), batch, self.sampling, self.pad_id, self.eos_id)
        out = self.objective(model, self.teacher, batch, generated=generated)
        out.logs["on_policy"] = float(generated)
        return out


def _token_logps(model, batch, temperature: float = 1.0) -> torch.Tensor:
    """log p(y_t | y_<t) of every next token at `temperature` (logits / T), shape [B, T-1] (fp32)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    if temperature != 1.0:
        logits = logits / temperature
    targets, _ = shift_labels(batch["labels"])
    return -F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")


AGGREGATIONS = ("token_mean", "seq_mean_token_mean")


class GOPD:
    """G-OPD / ExOPD: PPO-clip on per-token advantages from teacher, reference and student."""

    def __init__(self, teacher, reference, unwrap: Callable, reward_scale: float, clip_eps: float,
                 sampling: Sampling, pad_id: int, eos_id: int, agg: str = "seq_mean_token_mean"):
        if reward_scale != 1.0 and reference is None:
            raise ConfigError(f"onpolicy.reward_scale: {reward_scale} needs a reference model (the advantage is "
                              "lam * (log p_T - log p_ref) - (log p_S - log p_ref)); give one, or use reward_scale=1")
        if agg not in AGGREGATIONS:
            raise ConfigError(f"onpolicy.agg: {agg!r} is not one of {', '.join(AGGREGATIONS)}")
        self.teacher, self.unwrap, self.agg = teacher, unwrap, agg
        self.reference = reference if reward_scale != 1.0 else None  # at lam = 1 it drops out: no forward
        self.scale, self.clip_eps, self.sampling, self.pad_id, self.eos_id = reward_scale, clip_eps, sampling, pad_id, eos_id

    def __call__(self, model, batch, step: int) -> LossOutput:
        batch = rollout(self.unwrap(model), batch, self.sampling, self.pad_id, self.eos_id)
        _, mask = shift_labels(batch["labels"])
        # every model is scored at the rollout temperature, as verl does (logits / T): the student's
        # log-probs are then those of the policy that sampled the responses
        t = self.sampling.temperature
        logp = _token_logps(model, batch, t)
        with torch.no_grad():
            logp_teacher = _token_logps(self.teacher, batch, t)
            logp_ref = _token_logps(self.reference, batch, t) if self.reference is not None else None
        advantage, loss = opd_advantage_and_loss(logp, logp.detach(), logp_teacher, logp_ref, self.scale, self.clip_eps)
        n = mask.sum()
        mean = lambda x: (x * mask).sum() / n.clamp(min=1)  # noqa: E731
        logs = {"advantage": float(mean(advantage)), "reverse_kl": float(mean(logp.detach() - logp_teacher))}
        value, count = aggregate(loss, mask, self.agg)
        return LossOutput(value, count, logs)


def opd_advantage(logp_old, logp_teacher, logp_ref, reward_scale: float) -> torch.Tensor:
    """G-OPD's per-token advantage lam * (l_T - l_ref) - (l_S - l_ref), without gradient.

    At lam = 1 it is l_T - l_S whatever the reference (`logp_ref` may then be None); otherwise a
    reference is required.
    """
    if reward_scale == 1.0:
        return (logp_teacher - logp_old).detach()
    if logp_ref is None:
        raise ConfigError(f"onpolicy.reward_scale: {reward_scale} needs the reference model's log-probs")
    return (reward_scale * (logp_teacher - logp_ref) - (logp_old - logp_ref)).detach()


def opd_advantage_and_loss(logp, logp_old, logp_teacher, logp_ref, reward_scale: float, clip_eps: float):
    """Per-token advantage (no gradient) and PPO-clip loss, both shaped like `logp`."""
    advantage = opd_advantage(logp_old, logp_teacher, logp_ref, reward_scale)
    ratio = torch.exp((logp - logp_old).clamp(-20.0, 20.0))
    loss = -torch.minimum(ratio * advantage, ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * advantage)
    return advantage, loss


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, agg: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, count) of a [B, T] per-token loss under `mask`, for `LossOutput`.

    The training loop weights each micro-batch's mean by its count and divides by the step's total,
    so ``token_mean`` (count = tokens) is a mean over every response token of the step and
    ``seq_mean_token_mean`` (count = sequences with a response token) a mean over the step's
    sequences of each one's token mean, however the step is split into micro-batches.
    """
    mask = mask.to(per_token.dtype)
    if agg == "token_mean":
        n = mask.sum()
        return (per_token * mask).sum() / n.clamp(min=1), n
    tokens = mask.sum(-1)
    rows = tokens > 0
    per_seq = (per_token * mask).sum(-1) / tokens.clamp(min=1)
    count = rows.sum()
    return (per_seq * rows).sum() / count.clamp(min=1), count
