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

    def __call__(self, student, teacher, batch: dict[str, torch.Tensor], *, generated: bool = False) -> LossOutput:
        """Loss of one micro-batch. `generated` marks student-written responses: no LoCa, no CE."""
        targets, mask = shift_labels(batch["labels"])
        n = int(mask.sum())
        if self.chunk_size:
            s_hidden = last_hidden_states(student, batch)[:, :-1][mask]
            with torch.no_grad():
                t_hidden = last_hidden_states(teacher, batch)[:, :-1][mask]
                r_hidden = last_hidden_states(self.reference, batch)[:, :-1][mask] if self.reference is not None else None
            s_head, t_head, kept = output_head(student), output_head(teacher), targets[mask]
            r_head = output_head(self.reference) if self.reference is not None else None
            kd_sum = ce_sum = s_hidden.new_zeros(())
            for i in range(0, n, self.chunk_size):
                sl = slice(i, i + self.chunk_size)
                kd, ce = checkpoint(self._chunk, s_hidden[sl], s_head, t_hidden[sl], t_head, kept[sl], generated,
                                    None if r_hidden is None else r_hidden[sl], r_head, use_reentrant=False)
                kd_sum, ce_sum = kd_sum + kd, ce_sum + ce
        else:
            s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            with torch.no_grad():
                t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                if self.reference is not None:
                    r_logits = self.reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                    t_logits = self._fuse(t_logits, r_logits)
            kd_sum, ce_sum = self._sums(s_logits[:, :-1][mask], t_logits[:, :-1][mask], targets[mask], generated)
        denom = max(n, 1)
        kd, ce = kd_sum / denom, ce_sum / denom
        ce_weight = 0.0 if generated else 1.0 - self.kd_ratio
        kd_weight = 1.0 if generated else self.kd_ratio
        loss = kd_weight * kd + ce_weight * ce
        return LossOutput(loss, n, {"kd": float(kd.detach()), "ce": float(ce.detach())})

    def _chunk(self, s_hidden, s_head, t_hidden, t_head, targets, generated, r_hidden=None, r_head=None):
        s_logits = project(s_hidden, s_head)
        with torch.no_grad():
            t_logits = project(t_hidden, t_head)
            if r_hidden is not None:
                t_logits = self._fuse(t_logits, project(r_hidden, r_head))
        return self._sums(s_logits, t_logits, targets, generated)

    def _fuse(self, t_logits, r_logits):
        """The realignment target's logits, over the compared vocabulary (padded rows may differ)."""
        v = self.vocab_size
        return fuse_logits(t_logits[..., :v], r_logits[..., :v], self.realign_lam)

    def _sums(self, s_logits, t_logits, targets, generated):
        """(sum of per-token divergence, sum of per-token CE) over a flat [N, V] selection."""
        if self.vocab_size is not None:
            s_logits, t_logits = s_logits[..., : self.vocab_size], t_logits[..., : self.vocab_size]
        ce = F.cross_entropy(s_logits.float(), targets, reduction="sum")
        s = log_probs(s_logits, self.temperature)
        t = log_probs(t_logits, self.temperature)
        if self.loca_alpha is not None and not generated:
            t = loca_calibrate(t, targets, self.loca_alpha)
        if self.topk:
            keep = t.topk(self.topk, dim=-1).indices
            s = torch.log_softmax(s.gather(-1, keep), dim=-1)
            t = torch.log_softmax(t.gather(-1, keep), dim=-1)
        # log-probs are logits too; the loss is a token-mean over the selection, so n times it is the sum
        every = torch.ones(s.shape[:-1], dtype=torch.bool, device=s.device)
        return self.loss(s, t, every, targets, **self.params) * s.shape[0], ce
