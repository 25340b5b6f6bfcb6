"""The MTP-D training objective [R] (the paper has no public code; the spec's reconstruction):

    L = L_main + (w / K) sum_k CE_k + beta sum_k mean_i KL_N(sg(q_{i+k}) || p_{k,i})

- L_main: the main head's token-mean CE on the response tokens (no gradient when the trunk is frozen);
- CE_k: head k's CE against t_{i+k+1}, a mean over its valid positions;
- q_{i+k}: the main head's distribution at position i+k, which predicts the same token t_{i+k+1},
  gradient-detached; p_{k,i}: head k's distribution at position i;
- KL_N: the teacher's top-N ids, the teacher renormalised over them, against the student's
  log-softmax over the whole vocabulary gathered at those ids. With N = |V| it is the full KL; with
  N < |V| and p = q it is -log(sum of q's top N), not 0: the student is pulled to the renormalised
  teacher. The main head and trunk get no gradient from it (its student side reads them detached).

A position i of head k counts when t_{i+k+1} exists (i + k + 1 < length) and is a label token (not
prompt or padding). beta = 0 is plain MTP training (CE only), the baseline.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from runner.data import IGNORE, shift_labels
from runner.train import LossOutput


def topn_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, top_n: int) -> torch.Tensor:
    """KL_N(q~ || p) per row: q~ the teacher's softmax renormalised over its top `top_n` ids, p the
    student's softmax over the full vocabulary, read at those ids. fp32."""
    n = min(top_n, teacher_logits.shape[-1])
    top, ids = teacher_logits.float().topk(n, dim=-1)
    log_q = torch.log_softmax(top, dim=-1)  # renormalised over the top N
    log_p = torch.log_softmax(student_logits.float(), dim=-1).gather(-1, ids)
    return (log_q.exp() * (log_q - log_p)).sum(-1)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # a sum over the mask keeps the graph even when nothing is kept (an all-masked batch gives 0)
    return (values * mask).sum() / mask.sum().clamp(min=1)


@dataclass
class MTPDObjective:
    beta: float = 1.0  # weight of the self-distillation term
    ce_weight: float = 0.3  # w: the heads' CE terms together weigh w (each w / K)
    top_n: int = 20
    frozen_trunk: bool = True
    main_weight: float = 1.0  # weight of L_main (the tests take single terms apart with it)

    def __call__(self, model, batch: dict[str, torch.Tensor], step: int = 0) -> LossOutput:
        out = model(batch["input_ids"], batch["attention_mask"], frozen_trunk=self.frozen_trunk,
                    kl_copy=self.beta > 0 and not self.frozen_trunk)
        return self.combine(out, batch["labels"])

    def combine(self, out: dict, labels: torch.Tensor) -> LossOutput:
        """The loss from `MTPModel.forward`'s logits and the batch's (unshifted) labels."""
        main = out["main"]
        t = labels.shape[1]
        targets, mask = shift_labels(labels)
        n = mask.sum()
        ce_main = _masked_mean(F.cross_entropy(main[:, :-1].flatten(0, 1).float(), targets.flatten(),
                                               reduction="none").view_as(mask), mask)
        heads = out["heads"]
        kl_side = out["heads_kl"] or heads  # frozen trunk: the shared parts carry no gradient anyway
        loss, logs = self.main_weight * ce_main, {"ce_main": float(ce_main.detach())}
        for k, (logits, student) in enumerate(zip(heads, kl_side), 1):
            if t - k - 1 < 1:
                break
            # position i (0 <= i < t-k-1) of head k predicts t_{i+k+1}; the main head predicts it at i+k
            target = labels[:, k + 1:]
            keep = target != IGNORE
            ce = _masked_mean(F.cross_entropy(logits[:, : t - k - 1].flatten(0, 1).float(),
                                              target.masked_fill(~keep, 0).flatten(), reduction="none").view_as(keep),
                              keep)
            loss = loss + self.ce_weight / len(heads) * ce
            logs[f"ce_{k}"] = float(ce.detach())
            if self.beta > 0:
                teacher = main[:, k: t - 1].detach()
                kl = _masked_mean(topn_kl(student[:, : t - k - 1], teacher, self.top_n), keep)
                loss = loss + self.beta * kl
                logs[f"kl_{k}"] = float(kl.detach())
            with torch.no_grad():  # how often head k already says what the main head says: acceptance's proxy
                agree = (logits[:, : t - k - 1].argmax(-1) == main[:, k: t - 1].argmax(-1)).float()
                logs[f"agree_{k}"] = float(_masked_mean(agree, keep))
        return LossOutput(loss, n, logs)
