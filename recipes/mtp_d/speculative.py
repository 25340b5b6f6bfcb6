"""Greedy speculative decoding with MTP heads, and the acceptance figures it yields.

One main forward over the verified tokens V plus the pending drafts D gives the main head's argmax
at every position. The longest prefix of D that equals it is accepted, and the main head's next
argmax is emitted as a bonus token; the heads then draft the next D from that same forward's hidden
states (module j reads the embeddings of the tokens up to draft j-1 and module j-1's output). So every
main forward after the first emits accepted + 1 tokens, and the output is exactly greedy decoding of
the main head. More drafts than heads reuse the modules cyclically (draft j from module
((j-1) mod K) + 1), as vLLM does.

Figures: per-head conditional acceptance alpha_k = P(d_k accepted | d_1..d_{k-1} accepted) [R];
vLLM's draft_acceptance_rate = accepted / drafted tokens and system_efficiency = emitted /
(verify steps * (drafts + 1)); tokens per main forward = E[accepted] + 1 over the verifying forwards
(the speed-up measure; no wall clock). Without a KV cache, each forward recomputes the whole
sequence: fine for the toy, and what is counted is forwards, not time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Decoded:
    tokens: list[int]  # the response (eos included when it came)
    accepted: list[int] = field(default_factory=list)  # per verifying forward: drafts accepted
    forwards: int = 0  # main forwards, the first (prompt only) included


@torch.no_grad()
def greedy(lm, prompt: list[int], max_new_tokens: int, eos: int | None) -> list[int]:
    """Plain greedy decoding, one full forward per token (the reference the speculative output must equal)."""
    ids = list(prompt)
    out = []
    for _ in range(max_new_tokens):
        logits = lm(input_ids=torch.tensor([ids], device=lm.device)).logits
        nxt = int(logits[0, -1].argmax())
        out.append(nxt)
        ids.append(nxt)
        if nxt == eos:
            break
    return out


@torch.no_grad()
def draft(mtp, tokens: list[int], h0: torch.Tensor, n: int) -> list[int]:
    """`n` drafts after `tokens` (the verified sequence, its last token the main head's newest) from the
    trunk's hidden states h0 [1, L, d] of tokens[:-1] (L = len(tokens) - 1)."""
    seq = torch.tensor([tokens], device=h0.device)
    h, out = h0, []
    for j in range(1, n + 1):
        module = mtp.heads[(j - 1) % len(mtp.heads)]
        h = mtp.run_module(j, module, seq, h)
        d = int(mtp.logits(h[:, -1]).argmax(-1))
        out.append(d)
        seq = torch.cat([seq, seq.new_tensor([[d]])], dim=1)
    return out


def verify(drafts: list[int], main_argmax: list[int]) -> list[int]:
    """The tokens one verifying forward emits: the longest prefix of `drafts` that equals the main head's
    argmax at the same positions, then the main head's next argmax (the bonus token). main_argmax[j] is
    the main head's choice after the verified tokens and drafts[:j]."""
    a = 0
    while a < len(drafts) and drafts[a] == main_argmax[a]:
        a += 1
    return drafts[:a] + [main_argmax[a]]


@torch.no_grad()
def speculative_decode(mtp, prompt: list[int], max_new_tokens: int, eos: int | None, drafts: int) -> Decoded:
    """Greedy decoding of `mtp.lm` with `drafts` MTP drafts verified per main forward."""
    ids, pending = list(prompt), []
    result = Decoded(tokens=[])
    device = next(mtp.parameters()).device
    while True:
        h0, logits = mtp.trunk(torch.tensor([ids + pending], device=device))
        result.forwards += 1
        new = verify(pending, logits[0, len(ids) - 1:].argmax(-1).tolist())
        if pending:
            result.accepted.append(len(new) - 1)
        if eos in new:
            new = new[: new.index(eos) + 1]
        new = new[: max_new_tokens - len(result.tokens)]
        result.tokens += new
        ids += new
        if not new or new[-1] == eos or len(result.tokens) >= max_new_tokens:
            return result
        pending = draft(mtp, ids, h0[:, : len(ids) - 1], drafts)


@dataclass
class Acceptance:
    drafts: int
    alpha: list[float | None]  # alpha_1..alpha_drafts; None where no step got as far as draft k
    draft_acceptance_rate: float
    system_efficiency: float
    tokens_per_forward: float  # E[accepted] + 1 over the verifying forwards
    verify_steps: int

    def stats(self, prefix: str = "mtp") -> dict[str, float]:
        # an alpha_k no step ever reached (None) is left out rather than recorded as NaN
        out = {f"{prefix}/alpha_{k}": a for k, a in enumerate(self.alpha, 1) if a is not None}
        out.update({f"{prefix}/draft_acceptance_rate": self.draft_acceptance_rate,
                    f"{prefix}/system_efficiency": self.system_efficiency,
                    f"{prefix}/tokens_per_forward": self.tokens_per_forward})
        return out


def acceptance(accepted: list[int], drafts: int) -> Acceptance:
    """The figures from the accepted-draft counts of every verifying forward."""
    steps = len(accepted)
    alpha = []
    for k in range(1, drafts + 1):
        tried = sum(a >= k - 1 for a in accepted)  # d_1..d_{k-1} were accepted, so d_k was checked
        alpha.append(sum(a >= k for a in accepted) / tried if tried else None)
    total = sum(accepted)
    return Acceptance(
        drafts=drafts, alpha=alpha,
        draft_acceptance_rate=total / (steps * drafts) if steps else float("nan"),
        system_efficiency=(total + steps) / (steps * (drafts + 1)) if steps else float("nan"),
        tokens_per_forward=1 + total / steps if steps else float("nan"),
        verify_steps=steps,
    )
