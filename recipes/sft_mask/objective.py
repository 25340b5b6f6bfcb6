"""The masked-SFT objective: per-token CE (or the PSFT clipped ratio), gated by a token selector.

One forward pass gives the last hidden states; the response tokens' log-probs are computed from
them chunk by chunk without gradient (never a full-vocabulary softmax for the whole batch), the
selector turns them into keep weights, and the weighted loss is computed chunk by chunk again under
activation checkpointing.

Normalisation (spec sft_merge.md section 1): ``all_tokens`` divides by every response token,
kept or not (ProFit's reference path with ``num_items_in_batch``); ``kept_tokens`` by the number of
tokens the selector weights (a nonzero weight: for a soft selector such as DFT, the count, not the sum
of its weights). Both are global over the step: the loss reports its denominator as its token count.

PSFT (Proximal SFT): the per-token loss is ``-min(r, clip(r, 1 - eps_low, 1 + eps_high))`` with
``r = pi_theta / pi_old`` and a constant advantage of 1, against a snapshot of the policy taken
every ``update_every`` optimizer steps (verl's old log-probs per global batch, several optimizer
steps per batch). The gradient is the SFT gradient scaled by r, and 0 once a token's probability
has risen more than eps_high above the snapshot's. With ``update_every=1`` the snapshot is the
current policy, r = 1 and PSFT is exactly SFT.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from runner.data import shift_labels
from runner.lm_head import (
    last_hidden_states,
    output_head,
    project,
    token_logprobs,
    unwrap,
)
from runner.train import LossOutput

NORMS = ("all_tokens", "kept_tokens")


@dataclass
class Proximal:
    eps_low: float = 0.2
    eps_high: float = 0.28
    update_every: int = 8
    snapshot: Any = None
    taken_at: int | None = None

    def refresh(self, model, step: int) -> None:
        """Copy the policy into the snapshot at the first call and every `update_every` steps."""
        if self.taken_at == step or (self.snapshot is not None and step % self.update_every):
            return
        source = unwrap(model)
        if self.snapshot is None:
            self.snapshot = copy.deepcopy(source).eval().requires_grad_(False)
        else:
            self.snapshot.load_state_dict(source.state_dict())
        self.taken_at = step


def psft_token_loss(logp: torch.Tensor, logp_old: torch.Tensor, eps_low: float, eps_high: float) -> torch.Tensor:
    ratio = torch.exp((logp - logp_old).clamp(-20.0, 20.0))
    return -torch.minimum(ratio, ratio.clamp(1.0 - eps_low, 1.0 + eps_high))


@dataclass
class MaskedSFT:
    selector: Callable | None = None  # None: every response token counts (plain SFT)
    selector_params: dict[str, Any] = field(default_factory=dict)
    norm: str = "all_tokens"
    chunk_size: int = 1024
    reference: Any = None  # a frozen model, for selectors that compare against one (rho1)
    needs_entropy: bool = False
    proximal: Proximal | None = None
    seed: int = 0

    def __call__(self, model, batch: dict[str, torch.Tensor], step: int) -> LossOutput:
        targets, mask = shift_labels(batch["labels"])
        hidden = last_hidden_states(model, batch)[:, :-1][mask]
        kept_targets, head = targets[mask], output_head(model)
        n = hidden.shape[0]
        with torch.no_grad():
            logp = token_logprobs(hidden, head, kept_targets, self.chunk_size)
        weights = self._weights(logp, mask, batch, step, hidden, head)
        old = None
        if self.proximal is not None:
            self.proximal.refresh(model, step)
            with torch.no_grad():
                snap = self.proximal.snapshot
                old = token_logprobs(last_hidden_states(snap, batch)[:, :-1][mask], output_head(snap), kept_targets,
                                     self.chunk_size)
        total = hidden.new_zeros(())
        for i in range(0, n, self.chunk_size):
            sl = slice(i, i + self.chunk_size)
            total = total + checkpoint(self._chunk_loss, hidden[sl], head, kept_targets[sl], weights[sl],
                                       None if old is None else old[sl], use_reentrant=False)
        denom = float(n) if self.norm == "all_tokens" else float((weights > 0).sum())
        loss = total / denom if denom > 0 else total * 0.0
        logs = {"kept_fraction": float((weights > 0).float().mean()) if n else 0.0}
        return LossOutput(loss, denom, logs)

    def _weights(self, logp, mask, batch, step, hidden, head) -> torch.Tensor:
        if self.selector is None:
            return torch.ones_like(logp)
        extra = {}
        if self.reference is not None:
            with torch.no_grad():
                ref_hidden = last_hidden_states(self.reference, batch)[:, :-1][mask]
                extra["reference_logprobs"] = _scatter(
                    token_logprobs(ref_hidden, output_head(self.reference), shift_labels(batch["labels"])[0][mask],
                                   self.chunk_size), mask)
        if self.needs_entropy:
            extra["entropy"] = _scatter(_entropy(hidden, head, self.chunk_size), mask)
        if self.selector_params.get("direction") == "random":
            extra["generator"] = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        keep = self.selector(_scatter(logp, mask), mask, **self.selector_params, **extra)
        return keep[mask].to(logp.dtype)

    def _chunk_loss(self, hidden, head, targets, weights, old):
        logp = -F.cross_entropy(project(hidden, head).float(), targets, reduction="none")
        per_token = -logp if old is None else psft_token_loss(logp, old, self.proximal.eps_low, self.proximal.eps_high)
        return (weights * per_token).sum()


def _scatter(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Flat per-token values back into the ``[B, T-1]`` layout of `mask` (0 elsewhere)."""
    out = torch.zeros(mask.shape, dtype=values.dtype, device=values.device)
    out[mask] = values
    return out


@torch.no_grad()
def _entropy(hidden: torch.Tensor, head, chunk_size: int) -> torch.Tensor:
    out = []
    for i in range(0, hidden.shape[0], chunk_size):
        logp = F.log_softmax(project(hidden[i: i + chunk_size], head).float(), dim=-1)
        out.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(out) if out else hidden.new_zeros(0)
