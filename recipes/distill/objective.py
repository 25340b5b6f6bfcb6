"""The distillation training objective: KD divergence mixed with CE, optionally chunked over tokens.

Only the response tokens (labels != -100 after the causal shift) enter the loss. Two paths give
the same value and gradient:

- ``chunk_size=0`` (naive): both models produce full ``[B, T, V]`` logits, as most KD code does;
- ``chunk_size=N``: both models return hidden states (`runner.lm_head`), and the LM-head
  projection, softmaxes, divergence and CE run over N tokens at a time inside activation
  checkpointing. Peak memory holds one chunk's ``[N, V]`` tensors instead of ``[B*T, V]`` ones,
  whatever the batch, sequence or vocabulary size.

Realignment (TrRa): given a frozen ``reference`` model, the teacher's logits
are replaced by the fused ``lam * z_teacher + (1 - lam) * z_reference`` (`recipes.distill.realign`),
the teacher being the aligned model; everything downstream (temperature, divergence, chunking) is
unchanged, so the target is the per-position softmax over the vocabulary of the fused logits.

Teacher cache (``cache``, `recipes.distill.teacher_cache`): on dataset batches the teacher is not
run; its top-k, label and rest-of-vocabulary log-probs are read for the batch's rows, and the
divergence compares both distributions coarsened to those k + 2 buckets (CE keeps the full logits).

Optional: LoCa teacher calibration (needs labels, so only on dataset batches) and a top-k teacher
(both distributions restricted to the teacher's k most likely tokens and renormalised there: the
subset KL of NeMo-RL, exact for that subset and biased against the full-vocabulary divergence).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from recipes.distill.losses import loca_calibrate, log_probs
from recipes.distill.realign import fuse_logits
from recipes.distill.teacher_cache import TeacherCache, bucket_logprobs, label_bucket
from runner.data import shift_labels
from runner.lm_head import last_hidden_states, output_head, project
from runner.train import LossOutput


@dataclass
class KDObjective:
    loss: Callable[..., torch.Tensor]  # a registered kd_loss: (student_logits, teacher_logits, mask, labels, **params)
    params: dict[str, Any] = field(default_factory=dict)
    temperature: float = 1.0
    kd_ratio: float = 1.0  # weight of the KD term; CE gets 1 - kd_ratio
    loca_alpha: float | None = None  # LoCa calibration of the teacher, off when None
    topk: int = 0  # 0: the full vocabulary
    chunk_size: int = 0  # 0: full logits; N: N tokens at a time from hidden states
    vocab_size: int | None = None  # compare only the first V logits (the tokenizer's length)
    reference: Any = None  # TrRa: a frozen reference model; the target fuses its logits with the teacher's
    realign_lam: float = 1.0  # TrRa's lam: target logits lam * z_teacher + (1 - lam) * z_reference
    cache: TeacherCache | None = None  # the teacher's cached top-k on dataset rows (batch["index"])

    def __call__(self, student, teacher, batch: dict[str, torch.Tensor], *, generated: bool = False) -> LossOutput:
        """Loss of one micro-batch. `generated` marks student-written responses: no LoCa, no CE."""
        targets, mask = shift_labels(batch["labels"])
        n = int(mask.sum())
        cached = self._cached(batch, n) if self.cache is not None and not generated else None
        if self.chunk_size:
            s_hidden = last_hidden_states(student, batch)[:, :-1][mask]
            t_hidden = r_hidden = None
            with torch.no_grad():
                if cached is None:
                    t_hidden = last_hidden_states(teacher, batch)[:, :-1][mask]
                if self.reference is not None:
                    r_hidden = last_hidden_states(self.reference, batch)[:, :-1][mask]
            s_head, kept = output_head(student), targets[mask]
            t_head = output_head(teacher) if cached is None else None
            r_head = output_head(self.reference) if self.reference is not None else None
            kd_sum = ce_sum = s_hidden.new_zeros(())
            for i in range(0, n, self.chunk_size):
                sl = slice(i, i + self.chunk_size)
                kd, ce = checkpoint(self._chunk, s_hidden[sl], s_head, None if t_hidden is None else t_hidden[sl],
                                    t_head, kept[sl], generated, None if r_hidden is None else r_hidden[sl], r_head,
                                    None if cached is None else (cached[0][sl], cached[1][sl]), use_reentrant=False)
                kd_sum, ce_sum = kd_sum + kd, ce_sum + ce
        else:
            s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            t_logits = None
            if cached is None:
                with torch.no_grad():
                    t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                    if self.reference is not None:
                        r_logits = self.reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                        t_logits = self._fuse(t_logits, r_logits)
                t_logits = t_logits[:, :-1][mask]
            kd_sum, ce_sum = self._sums(s_logits[:, :-1][mask], t_logits, targets[mask], generated, cached)
        denom = max(n, 1)
        kd, ce = kd_sum / denom, ce_sum / denom
        ce_weight = 0.0 if generated else 1.0 - self.kd_ratio
        kd_weight = 1.0 if generated else self.kd_ratio
        loss = kd_weight * kd + ce_weight * ce
        return LossOutput(loss, n, {"kd": float(kd.detach()), "ce": float(ce.detach())})

    def _cached(self, batch, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        top_ids, t_logp = self.cache.rows(batch["index"], batch["labels"].device)
        if top_ids.shape[0] != n:
            raise RuntimeError(f"teacher cache {self.cache.folder}: {top_ids.shape[0]} cached tokens for a batch "
                               f"with {n} response tokens; the entry does not belong to this data")
        return top_ids, t_logp

    def _chunk(self, s_hidden, s_head, t_hidden, t_head, targets, generated, r_hidden=None, r_head=None, cached=None):
        s_logits = project(s_hidden, s_head)
        t_logits = None
        if cached is None:
            with torch.no_grad():
                t_logits = project(t_hidden, t_head)
                if r_hidden is not None:
                    t_logits = self._fuse(t_logits, project(r_hidden, r_head))
        return self._sums(s_logits, t_logits, targets, generated, cached)

    def _fuse(self, t_logits, r_logits):
        """The realignment target's logits, over the compared vocabulary (padded rows may differ)."""
        v = self.vocab_size
        return fuse_logits(t_logits[..., :v], r_logits[..., :v], self.realign_lam)

    def _sums(self, s_logits, t_logits, targets, generated, cached=None):
        """(sum of per-token divergence, sum of per-token CE) over a flat [N, V] selection.

        `cached`: the teacher as (top-k ids, k + 2 bucket log-probs) instead of `t_logits`; both sides
        are then compared over those buckets, and `labels` index them."""
        if self.vocab_size is not None:
            s_logits = s_logits[..., : self.vocab_size]
            t_logits = None if t_logits is None else t_logits[..., : self.vocab_size]
        ce = F.cross_entropy(s_logits.float(), targets, reduction="sum")
        s = log_probs(s_logits, self.temperature)
        single = None  # how many leading entries of the last axis are single tokens (all of them when live)
        if cached is None:
            t, labels = log_probs(t_logits, self.temperature), targets
        else:
            top_ids, t = cached
            single = top_ids.shape[-1] + 1  # top-k and the label; the last bucket holds the rest
            s, t, labels = bucket_logprobs(s, top_ids, targets), t.log_softmax(-1), label_bucket(top_ids, targets)
        if self.loca_alpha is not None and not generated:
            t = loca_calibrate(t, labels, self.loca_alpha, tokens=single)
        if self.topk:
            keep = t[..., :single].topk(self.topk, dim=-1).indices
            s = torch.log_softmax(s.gather(-1, keep), dim=-1)
            t = torch.log_softmax(t.gather(-1, keep), dim=-1)
        # log-probs are logits too; the loss is a token-mean over the selection, so n times it is the sum
        every = torch.ones(s.shape[:-1], dtype=torch.bool, device=s.device)
        return self.loss(s, t, every, labels, **self.params) * s.shape[0], ce
