"""Merge methods, registered as ``merge_method``: one output tensor from the inputs' tensors.

Call shape (DESIGN.md): ``merge(tensors, base, **params) -> Tensor``, fp32 in and out, one tensor
name at a time. ``base`` is the common ancestor where a method needs one (task vectors are
``delta_i = tensors[i] - base``). Defaults and conventions follow mergekit (spec sft_merge.md
section 6) except where noted. Each method declares the model roles it takes (`Inputs`); its
``runtime`` arguments come from the engine (a generator seeded per tensor, the tensor's name, the
SVD cache), never from the config.
"""

from __future__ import annotations

import hashlib
import math

import torch

from runner.registry import Inputs, register

PAIR = Inputs(("instruct", "thinking"), donor="thinking")  # as the MI code: the output is Thinking's
LIST = Inputs(("models",))
TASK_VECTORS = Inputs(("models",), base="base", models=(1, None))


def check_weights(params: dict, key: str) -> list[str]:
    weights = params.get("weights")
    if weights is not None and not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights):
        return [f"{key}.weights: {weights!r} is not a list of numbers"]
    return []


def check_task_vectors(params: dict, key: str) -> list[str]:
    if params.get("density") == 0:
        return [f"{key}.density: 0 drops every task-vector entry; use a density in (0, 1]"]
    return check_weights(params, key)


def _weights(weights: list[float] | None, n: int) -> torch.Tensor:
    if weights is None:
        return torch.ones(n)
    if len(weights) != n:
        raise ValueError(f"weights has {len(weights)} entries for {n} models")
    return torch.tensor(weights, dtype=torch.float32)


def _expand(w: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return w.view(-1, *([1] * like.dim()))


@register("merge_method", "interpolate", inputs=PAIR)
def interpolate(tensors: list[torch.Tensor], base: torch.Tensor | None = None, *, lam: float = 0.5) -> torch.Tensor:
    """Model interpolation (MI): (1 - lam) * first + lam * second; exactly the inputs at lam 0 and 1.

    For Instruct/Thinking pairs the first is Instruct and the second Thinking (the MI paper's
    lam * Thinking + (1 - lam) * Instruct). Applied to every tensor, embeddings and norms included.
    """
    first, second = tensors
    return torch.lerp(first, second, lam)


@register("merge_method", "linear", inputs=LIST, check=check_weights)
def linear(tensors: list[torch.Tensor], base: torch.Tensor | None = None, *, weights: list[float] | None = None,
           normalize: bool = True) -> torch.Tensor:
    """Weighted average sum(w_i * x_i) / sum(w_i) (normalize=false: the plain weighted sum)."""
    w = _weights(weights, len(tensors)).tolist()
    out = tensors[0] * w[0]  # a running sum: no stacked copy of the inputs
    for x, wi in zip(tensors[1:], w[1:]):
        out.add_(x, alpha=wi)
    return out.div_(sum(w)) if normalize else out


@register("merge_method", "slerp", inputs=Inputs(("models",), models=(2, 2)), ranges={"t": (0.0, 1.0)})
def slerp(tensors: list[torch.Tensor], base: torch.Tensor | None = None, *, t: float = 0.5,
          eps: float = 1e-8, dot_threshold: float = 0.9995) -> torch.Tensor:
    """Spherical interpolation from the first tensor (t=0) to the second (t=1), on the flattened tensors.

    The angle comes from the normalised tensors and the weights apply to the raw ones; nearly
    parallel tensors (|cos| > dot_threshold) fall back to linear interpolation, as mergekit does.
    """
    v0, v1 = tensors
    if t == 0.0:
        return v0.clone()
    if t == 1.0:
        return v1.clone()
    a, b = v0.flatten().double(), v1.flatten().double()
    dot = float((a / (a.norm() + eps)) @ (b / (b.norm() + eps)))
    if abs(dot) > dot_threshold:
        return torch.lerp(v0, v1, t)
    omega = math.acos(max(-1.0, min(1.0, dot)))
    s0, s1 = math.sin((1 - t) * omega) / math.sin(omega), math.sin(t * omega) / math.sin(omega)
    return (s0 * a + s1 * b).view(v0.shape).float()


@register("merge_method", "task_arithmetic", inputs=TASK_VECTORS, check=check_weights)
def task_arithmetic(tensors: list[torch.Tensor], base: torch.Tensor, *, weights: list[float] | None = None,
                    lam: float = 1.0) -> torch.Tensor:
    """base + lam * sum(w_i * delta_i)."""
    w = _weights(weights, len(tensors))
    deltas = torch.stack([x - base for x in tensors])
    return base + lam * (deltas * _expand(w, base)).sum(0)


BLOCK = 1 << 22  # entries per block of the elementwise TIES steps: temporaries stay ~16 MB per tensor


def _cut(x: torch.Tensor, base: torch.Tensor, density: float) -> tuple[float, int]:
    """TIES's trim rule for one task vector delta = x - base: keep the k = max(1, floor(density * n))
    largest |delta| (mergekit's count). Returns the k-th largest magnitude and how many entries equal
    to it are kept: all those above it, then ties in row-major order until k (the topk/argsort that
    mergekit calls leaves ties in an unspecified order). One n-sized temporary, selected in place."""
    if x.numel() == 0:
        return 0.0, 0
    mag = torch.empty(x.numel(), dtype=base.dtype)  # the dtype `_trim` compares in
    for s in range(0, x.numel(), BLOCK):
        torch.sub(x.view(-1)[s:s + BLOCK], base.view(-1)[s:s + BLOCK], out=mag[s:s + BLOCK]).abs_()
    n = mag.numel()
    k = max(1, int(density * n))
    cut = mag.numpy()
    cut.partition(n - k)  # introselect in place: O(n), no copy
    threshold = float(cut[n - k])
    above = int((cut[n - k + 1:] > threshold).sum())  # the partition put every larger entry after it
    return threshold, k - above


def _trim(delta: torch.Tensor, threshold: float, ties: int) -> tuple[torch.Tensor, int]:
    """One block of a task vector, trimmed by `_cut`'s rule; returns it and the ties still to keep."""
    mag = delta.abs()
    keep = mag > threshold
    at = mag == threshold
    if ties > 0 and bool(at.any()):
        kept = at & (at.view(-1).cumsum(0) <= ties).view(at.shape)
        keep |= kept
        ties -= int(kept.sum())
    return delta * keep, ties


def _elect_and_merge(deltas: torch.Tensor, w: torch.Tensor, normalize: bool) -> torch.Tensor:
    """TIES sign election (sign of the weighted sum, ties to +) and the disjoint (weighted) mean.

    Signs are compared on the *weighted* deltas, as mergekit's ``get_mask(weighted_deltas)`` does, so a
    negative weight (task negation) flips its task vector before the vote; the mean divides by the
    agreeing weights' sum, left undivided where that sum is within 1e-8 of zero (mergekit's rule).
    """
    weighted = deltas * _expand(w, deltas[0])
    sign = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
    agree = torch.sign(weighted) == sign  # a zero (trimmed) entry has sign 0 and never agrees
    total = (weighted * agree).sum(0)
    if not normalize:
        return total
    divisor = (_expand(w, deltas[0]) * agree).sum(0)
    return total / torch.where(divisor.abs() < 1e-8, torch.ones_like(divisor), divisor)


@register("merge_method", "ties", inputs=TASK_VECTORS, ranges={"density": (0.0, 1.0)}, check=check_task_vectors)
def ties(tensors: list[torch.Tensor], base: torch.Tensor, *, density: float, weights: list[float] | None = None,
         lam: float = 1.0, normalize: bool = True) -> torch.Tensor:
    """TIES: trim each task vector to its top-`density` magnitudes, elect a sign per entry, average the
    agreeing entries. `density` has no default on purpose (mergekit's 1.0 means no trimming);
    Long-to-Short's k is the share *dropped*, so their k=0.8 is density 0.2."""
    w = _weights(weights, len(tensors))
    tensors, base = [x.contiguous() for x in tensors], base.contiguous()
    cuts = [list(_cut(x, base, density)) if density < 1.0 else None for x in tensors]
    out = torch.empty_like(base)
    flat = out.view(-1)
    for s in range(0, base.numel(), BLOCK):  # every step past the cut is elementwise: block by block
        b = base.view(-1)[s:s + BLOCK]
        deltas = []
        for x, cut in zip(tensors, cuts):
            delta = x.view(-1)[s:s + BLOCK] - b
            if cut is not None:
                delta, cut[1] = _trim(delta, *cut)
            deltas.append(delta)
        torch.add(b, _elect_and_merge(torch.stack(deltas), w, normalize), alpha=lam, out=flat[s:s + BLOCK])
    return out


def _dare(delta: torch.Tensor, density: float, rescale: str, generator: torch.Generator | None) -> torch.Tensor:
    keep = torch.rand(delta.shape, generator=generator) < density
    dropped = delta * keep
    if rescale == "l1":  # mergekit: restore the L1 norm of the task vector
        norm = dropped.abs().sum()
        return dropped * (delta.abs().sum() / norm) if norm > 0 else dropped
    if rescale == "density":  # the DARE paper: divide by the keep probability
        return dropped / density
    return dropped


@register("merge_method", "dare_linear", inputs=TASK_VECTORS, ranges={"density": (0.0, 1.0)},
          choices={"rescale": ("l1", "density", "none")}, runtime=("generator",), check=check_task_vectors)
def dare_linear(tensors: list[torch.Tensor], base: torch.Tensor, *, density: float = 0.7,
                weights: list[float] | None = None, lam: float = 1.0, rescale: str = "l1",
                generator: torch.Generator | None = None) -> torch.Tensor:
    """DARE: drop each task-vector entry with probability 1 - density, rescale, add (no sign election)."""
    w = _weights(weights, len(tensors))
    deltas = torch.stack([_dare(x - base, density, rescale, generator) for x in tensors])
    return base + lam * (deltas * _expand(w, base)).sum(0)


@register("merge_method", "dare_ties", inputs=TASK_VECTORS, ranges={"density": (0.0, 1.0)},
          choices={"rescale": ("l1", "density", "none")}, runtime=("generator",), check=check_task_vectors)
def dare_ties(tensors: list[torch.Tensor], base: torch.Tensor, *, density: float = 0.7,
              weights: list[float] | None = None, lam: float = 1.0, rescale: str = "l1",
              generator: torch.Generator | None = None) -> torch.Tensor:
    """DARE's random drop and rescale, then TIES sign election and disjoint merge (unnormalised, as mergekit)."""
    w = _weights(weights, len(tensors))
    deltas = torch.stack([_dare(x - base, density, rescale, generator) for x in tensors])
    return base + lam * _elect_and_merge(deltas, w, normalize=False)


def effective_rank(singular_values: torch.Tensor) -> float:
    """eRank = exp(entropy of sigma_i / sum sigma) (Roy & Vetterli; gamma = 1, not squared)."""
    s = singular_values.double()
    p = s / s.sum()
    return math.exp(-float((p * torch.log(p + 1e-9)).sum()))


@register("merge_method", "timber", inputs=Inputs(("instruct",), base="base", donor="instruct"),
          ranges={"tail_scale": (0.0, 1.0)}, runtime=("key", "svd_cache"))
def timber(tensors: list[torch.Tensor], base: torch.Tensor, *, tail_scale: float = 0.2, key: str | None = None,
           svd_cache=None) -> torch.Tensor:
    """Timber: keep the top ceil(eRank) directions of the Instruct-Base delta, scale the rest by tail_scale.

    tensors = [instruct]. 1-D tensors (norms, biases) are Instruct's. tail_scale 1 is Instruct
    exactly; 0 is the rank-k truncation. The SVD (fp64) is cached per tensor delta (named by its hash) so sweeps reuse it.
    """
    (instruct,) = tensors
    if instruct.dim() < 2 or tail_scale == 1.0:
        return instruct.clone()
    delta = (instruct - base).reshape(instruct.shape[0], -1).contiguous()
    name = f"{key}-{hashlib.blake2b(delta.numpy(), digest_size=12).hexdigest()}" if svd_cache is not None else None
    factors = svd_cache.get(name) if name else None
    if factors is None:
        factors = torch.linalg.svd(delta.double(), full_matrices=False)
        if name:
            svd_cache.put(name, factors)
    u, s, vh = factors
    k = min(len(s), math.ceil(effective_rank(s))) if float(s.sum()) > 0 else len(s)
    scaled = torch.cat([s[:k], tail_scale * s[k:]])
    return (base.double() + ((u * scaled) @ vh).view(instruct.shape)).float()
