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

G_MAX = 25.0  # microsiemens, aihwkit's PCM default; g_min = 0, so an inactive device targets 0 uS
T0 = 20.0  # seconds: drift reference time; t_inference counts from it (t = t_inference + T0)
T_READ = 250e-9  # seconds: 1/f read-noise cut-off
ZERO_CLIP = 1e-7  # aihwkit's floor for max|W| and for g/g_max in the drift exponent
READOUT_FLOOR = 1e-4  # aihwkit's floor for a drift-compensation readout (weights unscaled: its default mapping)
TILE_MAX = 512  # aihwkit's default mapping: a tile has at most 512 inputs and 512 outputs


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
    """aihwkit's SinglePairConductanceConverter (g_min = 0): max|W| maps to G_MAX, positive weights
    go to g+, negative ones to g-, and the other device of the pair targets 0. Back: (g+ - g-) / scale."""
    scale = G_MAX / weight.abs().max().clamp(min=ZERO_CLIP)
    scaled = weight * scale
    return scaled.clamp(0, G_MAX), (-scaled).clamp(0, G_MAX), scale


def _sigma_prog(g: torch.Tensor) -> torch.Tensor:
    """Programming-noise std (uS) at target conductance g: aihwkit's fit, given for g_max = 25 uS."""
    g_hat = g / G_MAX
    return (0.26348 + 1.9650 * g_hat - 1.1731 * g_hat ** 2) * G_MAX / 25.0


def _nu_moments(g_target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the drift exponent nu at target conductance g (aihwkit's PCM fit)."""
    log_g = torch.log((g_target / G_MAX).abs().clamp(min=ZERO_CLIP))
    return (-0.0155 * log_g + 0.0244).clamp(0.049, 0.1), (-0.0125 * log_g - 0.0059).clamp(0.008, 0.045)


def _drift_exponent(g_target: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Drift exponent nu = |mu + sigma eps| of each device, drawn once at programming from its target."""
    mu_nu, sigma_nu = _nu_moments(g_target)
    return (mu_nu + sigma_nu * _normal(g_target.shape, generator)).abs()


def _pcm_device(g_target: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Program one polarity of devices, an inactive one (target 0) included: the noisy conductance,
    clamped >= 0, and the device's drift exponent (aihwkit apply_programming_noise)."""
    programmed = (g_target + _sigma_prog(g_target) * _normal(g_target.shape, generator)).clamp(min=0)
    return programmed, _drift_exponent(g_target, generator)


def _read_at(g_prog: torch.Tensor, nu: torch.Tensor, t_inference: float, generator: torch.Generator) -> torch.Tensor:
    """Conductance t_inference seconds after programming: drift from T0 on, then the 1/f noise
    accumulated since programming (t = t_inference + T0 > 0 always, so t_inference = 0 gets it too)."""
    t = t_inference + T0
    drifted = g_prog * (t / T0) ** (-nu) if t > T0 else g_prog
    q_s = (0.0088 / (g_prog.abs() / G_MAX).pow(0.65).clamp(min=1e-3)).clamp(max=0.2)
    sigma_rel = q_s * math.sqrt(math.log((t + T_READ) / (2 * T_READ)))
    return (drifted + drifted.abs() * sigma_rel * _normal(g_prog.shape, generator)).clamp(min=0)


def _program(weight: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """W_prog and the (g+, g-) drift exponents of one tile (aihwkit program_analog_weights)."""
    g_pos, g_neg, scale = _to_conductances(weight)
    (prog_pos, nu_pos), (prog_neg, nu_neg) = _pcm_device(g_pos, generator), _pcm_device(g_neg, generator)
    return (prog_pos - prog_neg) / scale, (nu_pos, nu_neg)


def _read(w_prog: torch.Tensor, nus: tuple[torch.Tensor, torch.Tensor], t_inference: float,
          generator: torch.Generator) -> torch.Tensor:
    """W_prog read at t_inference (aihwkit drift_analog_weights): re-split into a fresh pair, each
    device drifted with the nu of its slot."""
    g_pos, g_neg, scale = _to_conductances(w_prog)
    return (_read_at(g_pos, nus[0], t_inference, generator) - _read_at(g_neg, nus[1], t_inference, generator)) / scale


def _tile_sizes(size: int) -> list[int]:
    """aihwkit's split of a layer dimension over tiles of at most TILE_MAX: as even as possible."""
    n = -(-size // TILE_MAX)
    base, extra = divmod(size, n)
    return [base + (i < extra) for i in range(n)]


def _pcm_tile(weight: torch.Tensor, generator: torch.Generator, t_inference: float, drift_compensation: bool) -> torch.Tensor:
    w_prog, nus = _program(weight, generator)
    w_t = _read(w_prog, nus, t_inference, generator)
    if drift_compensation:  # GlobalDriftCompensation: the eye readout of a tile is its weight matrix
        w_t = w_t * w_prog.abs().mean().clamp(min=READOUT_FLOOR) / w_t.abs().mean().clamp(min=READOUT_FLOOR)
    return w_t


@register("noise_model", "pcm", ranges={"t_inference": (0.0, None)})
def pcm(weight: torch.Tensor, generator: torch.Generator, *, t_inference: float = 3600.0,
        drift_compensation: bool = True) -> torch.Tensor:
    """PCM weights read `t_inference` seconds after programming, as aihwkit's inference tiles give
    them (program_analog_weights, then drift_analog_weights(t_inference)). A layer bigger than
    TILE_MAX x TILE_MAX spans several tiles (aihwkit's default mapping), each with its own scale.

    Programming puts noise on both devices of every pair (the inactive one at 0 uS too, mean 0.105
    uS after the clamp) and stores W_prog, with each device's nu drawn from its target. The read
    re-splits W_prog into a fresh pair (new scale from max|W_prog|, split by sign), so only the now
    active device drifts and gets 1/f noise; nu stays with the device slot, even where programming
    noise flipped a weight's sign.

    drift_compensation is aihwkit's GlobalDriftCompensation moved onto the weight: the eye readout
    of a tile is its weight matrix, so alpha = mean|W_prog| / mean|W_t| (each floored at 1e-4), one
    scalar per tile. aihwkit reads out through the noisy periphery (out_noise 0.06, output
    quantization); this readout is exact (a reconstruction).
    """
    rows = [torch.cat([_pcm_tile(tile, generator, t_inference, drift_compensation)
                       for tile in row.split(_tile_sizes(weight.shape[1]), dim=1)], dim=1)
            for row in weight.split(_tile_sizes(weight.shape[0]), dim=0)]
    return torch.cat(rows, dim=0)


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
