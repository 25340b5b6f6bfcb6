"""Token selectors for masked SFT, registered as ``token_selector``.

Call shape (DESIGN.md): ``select(token_logprobs, mask, **params) -> keep_mask``. ``token_logprobs``
holds the current policy's log-probability of each target token (detached), ``mask`` the response
tokens; the result is a boolean keep mask, or float weights in [0, 1] for soft selectors (DFT).
Keyword arguments registered as ``runtime`` are supplied by the recipe (a reference model's log-probs,
the policy's entropy, a seeded generator), never by the config.
"""

from __future__ import annotations

import math

import torch

from runner.registry import register

DIRECTIONS = ("higher", "lower", "middle", "random")


def _check_middle(params: dict, key: str) -> list[str]:
    """direction=middle keeps tau <= p <= tau_high, so it needs tau_high in [tau, 1]."""
    tau, tau_high = params.get("tau", 0.1), params.get("tau_high")
    if params.get("direction") == "middle" and not (tau_high is not None and tau <= tau_high <= 1):
        return [f"{key}.tau_high: direction=middle needs tau <= tau_high <= 1"]
    return []


@register("token_selector", "profit", ranges={"tau": (0, 1), "tau_high": (0, 1)}, choices={"direction": DIRECTIONS},
          runtime=("generator",), check=_check_middle)
def profit(token_logprobs: torch.Tensor, mask: torch.Tensor, *, tau: float = 0.1, direction: str = "higher",
           tau_high: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """ProFit: gate each token by the policy's own probability p of it (stop-gradient).

    ``higher`` (default, tau 0.1) keeps p >= tau; ``lower`` keeps p <= tau; ``middle`` keeps
    tau <= p <= tau_high; ``random`` drops each token with probability tau (as the reference code
    does; its README says "keep"). p = tau is kept.
    """
    def log_of(x: float) -> torch.Tensor:  # compared in log space, in the log-probs' own precision
        return torch.tensor(x, dtype=token_logprobs.dtype, device=token_logprobs.device).log()

    if direction == "higher":
        keep = token_logprobs >= log_of(tau)
    elif direction == "lower":
        keep = token_logprobs <= log_of(tau)
    elif direction == "middle":
        keep = (token_logprobs >= log_of(tau)) & (token_logprobs <= log_of(tau_high))
    elif direction == "random":
        keep = torch.rand(token_logprobs.shape, generator=generator).to(token_logprobs.device) >= tau
    else:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    return keep & mask


@register("token_selector", "dft")
def dft(token_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """DFT: weight each token's CE by the policy's (stop-gradient) probability of it."""
    return token_logprobs.exp() * mask


def _top_fraction(score: torch.Tensor, mask: torch.Tensor, fraction: float) -> torch.Tensor:
    """Keep the ceil(fraction * n) highest-scoring masked tokens of the batch."""
    n = int(mask.sum())
    k = min(n, math.ceil(fraction * n))
    keep = torch.zeros_like(mask)
    if k == 0:
        return keep
    flat = score.masked_fill(~mask, float("-inf")).flatten()
    keep.view(-1)[flat.topk(k).indices] = True
    return keep


@register("token_selector", "rho1", ranges={"keep_ratio": (0, 1, "open")}, runtime=("reference_logprobs",))
def rho1(token_logprobs: torch.Tensor, mask: torch.Tensor, *, keep_ratio: float = 0.6,
         reference_logprobs: torch.Tensor | None = None) -> torch.Tensor:
    """Rho-1 selective language modelling: keep the top `keep_ratio` of the batch's tokens by excess
    loss, CE_policy - CE_reference (tokens the policy has not learnt but a reference model finds
    easy). Keeps *hard* tokens, the opposite of ProFit."""
    if reference_logprobs is None:
        raise ValueError("rho1 needs the reference model's log-probs (the recipe supplies them)")
    return _top_fraction(reference_logprobs - token_logprobs, mask, keep_ratio)


@register("token_selector", "quantile", ranges={"rho": (0, 1, "open")}, choices={"by": ("prob", "entropy")},
          runtime=("entropy",))
def quantile(token_logprobs: torch.Tensor, mask: torch.Tensor, *, rho: float = 0.5, by: str = "prob",
             entropy: torch.Tensor | None = None) -> torch.Tensor:
    """Keep the top `rho` fraction of the batch's tokens by the policy's probability of the target
    (``by=prob``) or by the entropy of its distribution (``by=entropy``)."""
    if by == "prob":
        return _top_fraction(token_logprobs, mask, rho)
    if by == "entropy":
        if entropy is None:
            raise ValueError("quantile by entropy needs the policy's entropy (the recipe supplies it)")
        return _top_fraction(entropy, mask, rho)
    raise ValueError(f"by must be 'prob' or 'entropy', got {by!r}")
