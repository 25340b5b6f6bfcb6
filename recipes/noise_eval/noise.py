"""Memristor non-idealities as weight perturbations, registered as ``noise_model``.

Call shape (DESIGN.md): ``perturb(weight, generator, **params) -> Tensor``, fp32 in and out, one
weight matrix of a decoder linear layer at a time (embeddings, norms and lm_head stay digital).
The formulas follow IBM aihwkit's documented models (spec quant_noise.md section 8); the memristor
paper's own settings are not public, so the defaults here are ours.

Read noise is not a perturbation of the stored weight: `ReadNoise` is a forward hook that adds
``sigma * std(y) * eps`` to a layer's output, resampled at every forward (aihwkit's output-referred
form).
"""

from __future__ import annotations

import math

import torch

from runner.registry import register

G_MAX = 25.0  # microsiemens, aihwkit's PCM default
T0 = 20.0  # seconds: drift reference time
T_READ = 250e-9  # seconds: 1/f read-noise cut-off


def _normal(shape, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator)


@register("noise_model", "prog_max", ranges={"sigma": (0.0, None)})
def prog_max(weight: torch.Tensor, generator: torch.Generator, *, sigma: float, per_row: bool = False) -> torch.Tensor:
    """Programming noise relative to the largest weight: w + sigma * max|W| * eps (aihwkit ADD_NORMAL,
    rel_to_actual_wmax); the max is per tensor, or per output row with per_row."""
    if sigma == 0:
        return weight.clone()
    scale = weight.abs().amax(dim=1, keepdim=True) if per_row else weight.abs().max()
    return weight + sigma * scale * _normal(weight.shape, generator)


@register("noise_model", "prog_rel", ranges={"sigma": (0.0, None)})
def prog_rel(weight: torch.Tensor, generator: torch.Generator, *, sigma: float) -> torch.Tensor:
    """Programming noise relative to each weight: w * (1 + sigma * eps) (aihwkit MULT_NORMAL)."""
    if sigma == 0:
        return weight.clone()
    return weight * (1 + sigma * _normal(weight.shape, generator))


def _to_conductances(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Differential pair g+ = clamp(w, 0), g- = clamp(-w, 0) scaled so max|W| maps to G_MAX."""
    w_max = weight.abs().max().clamp(min=1e-12)
    return weight.clamp(min=0) * G_MAX / w_max, (-weight).clamp(min=0) * G_MAX / w_max, w_max


def _pcm_device(g: torch.Tensor, t: float, generator: torch.Generator) -> torch.Tensor:
    """One polarity of PCM devices: programming noise, drift to time t, 1/f read noise (aihwkit PCMLikeNoiseModel)."""
    g_hat = g / G_MAX
    sigma_prog = (0.26348 + 1.9650 * g_hat - 1.1731 * g_hat ** 2) * G_MAX / 25.0
    programmed = (g + sigma_prog * _normal(g.shape, generator)).clamp(min=0)
    programmed = torch.where(g > 0, programmed, torch.zeros_like(g))  # an unprogrammed device stays off
    if t <= T0:
        return programmed
    log_g = torch.log(g_hat.clamp(min=1e-12))
    mu_nu = (-0.0155 * log_g + 0.0244).clamp(0.049, 0.1)
    sigma_nu = (-0.0125 * log_g - 0.0059).clamp(0.008, 0.045)
    nu = (mu_nu + sigma_nu * _normal(g.shape, generator)).abs()
    drifted = programmed * (t / T0) ** (-nu)
    q_s = (0.0088 / (programmed / G_MAX).pow(0.65).clamp(min=1e-3)).clamp(max=0.2)
    sigma_read = drifted.abs() * q_s * math.sqrt(math.log((t + T_READ) / (2 * T_READ)))
    return (drifted + sigma_read * _normal(g.shape, generator)).clamp(min=0)


@register("noise_model", "pcm", ranges={"t_inference": (0.0, None)})
def pcm(weight: torch.Tensor, generator: torch.Generator, *, t_inference: float = 3600.0,
        drift_compensation: bool = True) -> torch.Tensor:
    """PCM conductances read at `t_inference` seconds after programming (t <= 20 s: programming noise only).

    drift_compensation rescales the tensor by sum|W_target| / sum|W_read|, one scalar per tensor: a
    weight-level stand-in for aihwkit's GlobalDriftCompensation, which rescales outputs from a
    reference read (a reconstruction, labelled as such in the config).
    """
    g_pos, g_neg, w_max = _to_conductances(weight)
    at_t = _pcm_device(g_pos, t_inference, generator) - _pcm_device(g_neg, t_inference, generator)
    if drift_compensation and t_inference > T0:
        at_t = at_t * (weight.abs().sum() * G_MAX / w_max) / at_t.abs().sum().clamp(min=1e-12)
    return at_t * w_max / G_MAX


@register("noise_model", "stuck_at", ranges={"p_fault": (0.0, 1.0), "sa1_share": (0.0, 1.0)})
def stuck_at(weight: torch.Tensor, generator: torch.Generator, *, p_fault: float, sa1_share: float = 0.5) -> torch.Tensor:
    """A fraction p_fault of devices (each weight is a g+/g- pair) is stuck: SA0 (g = 0) drops that
    polarity's contribution, SA1 (g = g_max) sets it to max|W|; sa1_share of the faults are SA1."""
    if p_fault == 0:
        return weight.clone()
    g_pos, g_neg, w_max = weight.clamp(min=0), (-weight).clamp(min=0), weight.abs().max()
    out = []
    for g in (g_pos, g_neg):
        fault = torch.rand(g.shape, generator=generator) < p_fault
        sa1 = torch.rand(g.shape, generator=generator) < sa1_share
        out.append(torch.where(fault, torch.where(sa1, w_max, torch.zeros_like(g)), g))
    return out[0] - out[1]


@register("noise_model", "levels", ranges={"levels": (3, None)})
def levels(weight: torch.Tensor, generator: torch.Generator, *, levels: int) -> torch.Tensor:
    """Limited conductance levels: the symmetric grid of 2 * floor((levels - 1) / 2) + 1 values in
    [-max|W|, max|W|], zero included, one scale per tensor (per-tensor round-to-nearest)."""
    n = (int(levels) - 1) // 2
    scale = weight.abs().max().clamp(min=1e-12) / n
    return torch.round(weight / scale).clamp(-n, n) * scale


class ReadNoise:
    """Forward hook: y + sigma * std(y) * eps, resampled at every forward from its own generator."""

    def __init__(self, sigma: float, generator: torch.Generator):
        self.sigma, self.generator = sigma, generator

    def __call__(self, module, inputs, output):
        noise = torch.randn(output.shape, generator=self.generator).to(output.device, output.dtype)
        return output + self.sigma * output.detach().std() * noise
