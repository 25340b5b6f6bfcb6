"""ACM, Activation-Guided Consensus Merging (Yao et al., arXiv 2505.14009): per-layer task-vector
coefficients from the mutual information between the base model's and a fine-tuned model's
activations on calibration data. High NMI (the layer's output barely changed) gives a small
coefficient, low NMI a large one; no gradients.

The paper's code is not public, so the estimator and the mapping are a reconstruction [R]
(spec new_methods.md section 4):

- activations: each decoder layer's output hidden states, in fp32, of both models on the same
  calibration token rows (no padding);
- estimator: a histogram over the flattened (token, hidden) pairs (H_base[t, j], H_ft[t, j]) with
  `bins` equal-width bins per axis on one grid for both (the pair jointly standardised; with bins
  spanning the pair's joint range, that standardisation moves no value across a bin edge, so it is
  not computed), plug-in MI, NMI = I / sqrt(H_x H_y) in [0, 1];
- mapping: lambda_l = lambda (1 - NMI_l) / mean_l(1 - NMI_l) (``mean``: the layers' mean is lambda)
  or lambda (1 - NMI_l) (``raw``). Tensors outside the decoder layers keep lambda.

With several fine-tuned models each gets its own per-layer coefficients, from the NMI between the base
and that model: the engine scales each model's task vector of layer l by its ratio lambda_l / lambda
before the method (TA, TIES, DARE) merges them. With one model, or equal ratios, that is
theta_l = theta_base,l + lambda_l merge(tau_l), the spec's form.
"""

from __future__ import annotations

import math

import torch

from recipes.quantize.calibration import decoder_layers

MAPS = ("mean", "raw")


def joint_counts(x: torch.Tensor, y: torch.Tensor, lo: float, hi: float, bins: int) -> torch.Tensor:
    """[bins, bins] counts of the pairs (x[i], y[i]) on `bins` equal-width bins over [lo, hi] (hi > lo)."""
    scale = bins / (hi - lo)

    def index(v: torch.Tensor) -> torch.Tensor:
        return ((v.flatten().double() - lo) * scale).floor().clamp_(0, bins - 1).long()

    return torch.bincount(index(x) * bins + index(y), minlength=bins * bins).view(bins, bins).cpu()


def nmi_from_counts(counts: torch.Tensor) -> float:
    """Plug-in I / sqrt(H_x H_y) (nats) of a joint histogram; 0 when one side falls in a single bin."""
    p = counts.double() / counts.sum()
    px, py = p.sum(1), p.sum(0)
    hx = -float((px[px > 0] * px[px > 0].log()).sum())
    hy = -float((py[py > 0] * py[py > 0].log()).sum())
    if hx * hy <= 0:  # a constant side carries no information about the other
        return 0.0
    nz = p > 0
    outer = px[:, None] * py[None, :]
    mi = float((p[nz] * (p[nz] / outer[nz]).log()).sum())
    return min(1.0, max(0.0, mi / math.sqrt(hx * hy)))


def histogram_nmi(x: torch.Tensor, y: torch.Tensor, bins: int = 64) -> float:
    """NMI of two same-shaped tensors taken as paired samples (the estimator above, in one go)."""
    if x.shape != y.shape:
        raise ValueError(f"paired samples need one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    lo, hi = float(torch.minimum(x.min(), y.min())), float(torch.maximum(x.max(), y.max()))
    if hi <= lo:  # every value is the same number on both sides: identical
        return 1.0
    return nmi_from_counts(joint_counts(x, y, lo, hi, bins))


def ratios(nmi: list[float], mapping: str = "mean") -> list[float]:
    """lambda_l / lambda per layer from the layers' NMI: (1 - NMI_l), divided by its mean under ``mean``."""
    if mapping not in MAPS:
        raise ValueError(f"mapping {mapping!r} is not one of {', '.join(MAPS)}")
    c = [1.0 - min(1.0, max(0.0, float(n))) for n in nmi]
    if mapping == "raw":
        return c
    if max(c) == min(c):  # equal NMI is plain TA/TIES, exactly (a float mean of equal numbers can be an ulp off)
        return [1.0] * len(c)
    mean = sum(c) / len(c)
    return [ci / mean for ci in c]


@torch.no_grad()
def _layer_outputs(model, batch: torch.Tensor) -> list[torch.Tensor]:
    """Each decoder layer's output hidden states for one batch of token rows, fp32, flattened."""
    layers = decoder_layers(model)
    out: list[torch.Tensor | None] = [None] * len(layers)

    def keep(i):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            out[i] = hidden.detach().float().flatten()
        return hook

    handles = [layer.register_forward_hook(keep(i)) for i, layer in enumerate(layers)]
    try:
        model(input_ids=batch.to(next(model.parameters()).device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return out


def layer_nmi(base, tuned, rows: torch.Tensor, batch_size: int, bins: int = 64) -> list[float]:
    """NMI between `base`'s and `tuned`'s output hidden states of each decoder layer on `rows`.

    Two passes over the rows, so memory holds one batch's activations: the first finds each layer's
    joint range (the bin grid), the second fills the histograms.
    """
    n_layers = len(decoder_layers(base))
    if len(decoder_layers(tuned)) != n_layers:
        raise ValueError(f"the models have {n_layers} and {len(decoder_layers(tuned))} decoder layers")
    batches = [rows[s:s + batch_size] for s in range(0, len(rows), batch_size)]
    lo, hi = [math.inf] * n_layers, [-math.inf] * n_layers
    for batch in batches:
        for i, (x, y) in enumerate(zip(_layer_outputs(base, batch), _layer_outputs(tuned, batch))):
            lo[i] = min(lo[i], float(x.min()), float(y.min()))
            hi[i] = max(hi[i], float(x.max()), float(y.max()))
    counts = [torch.zeros(bins, bins, dtype=torch.long) for _ in range(n_layers)]
    for batch in batches:
        for i, (x, y) in enumerate(zip(_layer_outputs(base, batch), _layer_outputs(tuned, batch))):
            if hi[i] > lo[i]:
                counts[i] += joint_counts(x, y, lo[i], hi[i], bins)
    return [nmi_from_counts(c) if hi[i] > lo[i] else 1.0 for i, c in enumerate(counts)]
