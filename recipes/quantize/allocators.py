"""Layer-wise bit allocation under an average-bit budget (spec quant_noise.md sections 3 and 5).

An allocator gets ``layers``: {layer index: {module name: weight [out, in]}} (the decoder layer's
linears, named as inside the layer, e.g. ``self_attn.q_proj``), the budget ``avg_bits`` and the
allowed ``choices``, and returns an `Allocation`: {layer: bits} whose parameter-weighted mean is at
most the budget, with the per-layer scores it ranked by in ``.scores``.

LieQ and NSDS have no released code; both scores here are reconstructions [R] of the papers' text.
"""

from __future__ import annotations

import math

import torch

from runner.registry import register


class Allocation(dict):
    """{layer: bits}, plus the score each layer was ranked by."""

    def __init__(self, bits: dict[int, int], scores: dict[int, float] | None = None):
        super().__init__(bits)
        self.scores = scores or {}


def layer_sizes(layers: dict[int, dict[str, torch.Tensor]]) -> dict[int, int]:
    return {layer: sum(w.numel() for w in modules.values()) for layer, modules in layers.items()}


def mean_bits(bits: dict[int, int], sizes: dict[int, int]) -> float:
    """Parameter-weighted mean bits."""
    return sum(sizes[layer] * b for layer, b in bits.items()) / sum(sizes.values())


def check_budget(avg_bits: float, choices) -> None:
    choices = sorted(choices)
    if not choices:
        raise ValueError("bit_choices is empty")
    if not choices[0] <= avg_bits <= choices[-1]:
        raise ValueError(f"avg_bits {avg_bits} is outside the bit choices' range [{choices[0]}, {choices[-1]}]")


def greedy(scores: dict[int, float], sizes: dict[int, int], avg_bits: float, choices) -> dict[int, int]:
    """Every layer starts at the lowest choice; the highest-scoring layer whose next choice still fits
    the budget is promoted, again and again (ties go to the shallower layer)."""
    check_budget(avg_bits, choices)
    choices = sorted(choices)
    level = {layer: 0 for layer in scores}
    budget = avg_bits * sum(sizes.values()) + 1e-9  # bits in total, with room for float rounding
    used = sum(sizes[layer] * choices[0] for layer in scores)
    order = sorted(scores, key=lambda layer: (-scores[layer], layer))
    promoted = True
    while promoted:
        promoted = False
        for layer in order:
            if level[layer] + 1 < len(choices):
                extra = sizes[layer] * (choices[level[layer] + 1] - choices[level[layer]])
                if used + extra <= budget:
                    level[layer] += 1
                    used += extra
                    promoted = True
                    break
    return {layer: choices[level[layer]] for layer in scores}


@register("bit_allocator", "uniform")
def uniform(layers, avg_bits: float, choices) -> Allocation:
    """Every layer at the largest choice within the budget."""
    check_budget(avg_bits, choices)
    bits = max(c for c in choices if c <= avg_bits)
    return Allocation({layer: bits for layer in layers}, {layer: 0.0 for layer in layers})


@register("bit_allocator", "manual")
def manual(layers, avg_bits: float, choices, *, bits: dict) -> Allocation:
    """Bits given per layer (``bits: {layer: b}``, the rest at the lowest choice): for ablations,
    e.g. which single layer is worth a third bit. Still held to the budget and the choices."""
    check_budget(avg_bits, choices)
    given = {int(k): int(v) for k, v in bits.items()}
    unknown = sorted(set(given) - set(layers))
    if unknown or any(b not in choices for b in given.values()):
        raise ValueError(f"manual bits {given}: layers must be among {sorted(layers)} and bits among {sorted(choices)}")
    chosen = {layer: given.get(layer, min(choices)) for layer in layers}
    if mean_bits(chosen, layer_sizes(layers)) > avg_bits + 1e-9:
        raise ValueError(f"manual bits {given} average {mean_bits(chosen, layer_sizes(layers)):.3f}, over avg_bits {avg_bits}")
    return Allocation(chosen, {layer: float(b) for layer, b in chosen.items()})


# --- LieQ: geometry-driven layer sensitivity [R] -------------------------------------------------


def spectrum(w: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(w.float())


def compactness(sv: torch.Tensor) -> float:
    """1 - erank / min(m, n), with erank the exponential of the entropy of sigma / sum(sigma)."""
    p = sv / sv.sum().clamp_min(1e-12)
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum()
    return 1.0 - math.exp(entropy.item()) / sv.numel()


def energy_concentration(sv: torch.Tensor, top: float = 0.01) -> float:
    """Share of sum(sigma^2) in the top ceil(top * min(m, n)) singular values."""
    k = max(1, math.ceil(top * sv.numel()))
    energy = sv.pow(2)
    return (energy[:k].sum() / energy.sum().clamp_min(1e-30)).item()


def zscores(values: dict[int, float]) -> dict[int, float]:
    x = torch.tensor(list(values.values()), dtype=torch.float64)
    std = x.std(unbiased=False).item() if len(x) > 1 else 0.0
    mean = x.mean().item()
    return {k: (v - mean) / std if std > 0 else 0.0 for k, v in values.items()}


def lieq_scores(layers, metric: str = "compactness", top: float = 0.01) -> dict[int, float]:
    """Per layer: the parameter-weighted mean over its linears of the metric, z-scored per module
    across layers (so a module type that is compact everywhere does not dominate)."""
    measure = {"compactness": compactness, "energy": lambda sv: energy_concentration(sv, top)}[metric]
    names = sorted({name for modules in layers.values() for name in modules})
    z = {}
    for name in names:
        z[name] = zscores({layer: measure(spectrum(m[name])) for layer, m in layers.items() if name in m})
    scores = {}
    for layer, modules in layers.items():
        total = sum(w.numel() for w in modules.values())
        scores[layer] = sum(z[name][layer] * w.numel() for name, w in modules.items()) / total
    return scores


@register("bit_allocator", "lieq", ranges={"top": (0, 1, "open")}, choices={"metric": ("compactness", "energy")})
def lieq(layers, avg_bits: float, choices, *, metric: str = "compactness", top: float = 0.01) -> Allocation:
    """LieQ-style [R]: layers whose spectra are more concentrated (training-induced energy
    concentration, i.e. compact) are treated as more sensitive and get the extra bits first.
    ``metric``: ``compactness`` (1 - erank / rank) or ``energy`` (top-``top`` energy share)."""
    if metric not in ("compactness", "energy"):
        raise ValueError(f"lieq metric {metric!r}: choose compactness or energy")
    scores = lieq_scores(layers, metric, top)
    return Allocation(greedy(scores, layer_sizes(layers), avg_bits, choices), scores)


# --- NSDS: numerical and structural sensitivity per role [R] ------------------------------------

ROLES = {"q_proj": "attn_qk", "k_proj": "attn_qk", "v_proj": "attn_vo", "o_proj": "attn_vo",
         "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "mlp_out"}


def role_of(name: str) -> str:
    return ROLES.get(name.rsplit(".", 1)[-1], "other")


def excess_kurtosis(w: torch.Tensor) -> float:
    x = w.double().flatten()
    x = x - x.mean()
    var = x.pow(2).mean()
    return (x.pow(4).mean() / var.pow(2).clamp_min(1e-300) - 3).item()


def stable_rank_deficit(w: torch.Tensor) -> float:
    """1 - stable_rank / rank, stable_rank = ||W||_F^2 / sigma_1^2 (near 1: a few directions dominate)."""
    sv = spectrum(w)
    return 1.0 - (sv.pow(2).sum() / sv[0].pow(2).clamp_min(1e-30)).item() / sv.numel()


def mad_sigmoid(values: dict[int, float], tau: float = 1.0) -> dict[int, float]:
    """sigmoid((x - median) / (1.4826 MAD) / tau): robust, bounded in (0, 1)."""
    x = torch.tensor(list(values.values()), dtype=torch.float64)
    med = x.median().item()
    mad = (x - med).abs().median().item()
    return {k: 1 / (1 + math.exp(-((v - med) / (1.4826 * mad + 1e-8)) / tau)) for k, v in values.items()}


def nsds_scores(layers, tau: float = 1.0) -> dict[int, float]:
    """Soft-OR over role x {numerical (kurtosis), structural (stable-rank deficit)} of MAD-sigmoid
    scores: S = 1 - prod(1 - s). A role's metric is the parameter-weighted mean over its modules."""
    per_key: dict[tuple[str, str], dict[int, float]] = {}
    for layer, modules in layers.items():
        by_role: dict[str, list[torch.Tensor]] = {}
        for name, w in modules.items():
            by_role.setdefault(role_of(name), []).append(w)
        for role, ws in by_role.items():
            n = sum(w.numel() for w in ws)
            for metric, fn in (("numerical", excess_kurtosis), ("structural", stable_rank_deficit)):
                per_key.setdefault((role, metric), {})[layer] = sum(fn(w) * w.numel() for w in ws) / n
    scores = {layer: 1.0 for layer in layers}  # running prod(1 - s)
    for values in per_key.values():
        for layer, s in mad_sigmoid(values, tau).items():
            scores[layer] *= 1 - s
    return {layer: 1 - rest for layer, rest in scores.items()}


@register("bit_allocator", "nsds")
def nsds(layers, avg_bits: float, choices, *, tau: float = 1.0) -> Allocation:
    """NSDS-style [R]: role-wise numerical (outlier) and structural (spectral) scores, MAD-sigmoid
    normalised across layers and combined by Soft-OR; the greedy allocation of LieQ."""
    scores = nsds_scores(layers, tau)
    return Allocation(greedy(scores, layer_sizes(layers), avg_bits, choices), scores)
