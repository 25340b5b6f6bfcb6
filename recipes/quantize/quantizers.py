"""Weight quantizers (fake quant): each returns the dequantized weight, fp32 in and out.

Layout (spec quant_noise.md section 1): ``weight`` is an ``nn.Linear`` weight [out, in]; groups run
along the input dimension, ``group_size`` columns each, one scale (and zero) per row and group;
``group_size=-1`` is one group per row (per-channel). The caller guarantees ``in % group_size == 0``.

Quantizers with an integer grid (rtn, gptq) fill an optional ``grid`` dict with ``codes``
(uint, [out, in]), ``scale`` and ``zero`` ([out, n_groups]) so that the packed export can store
exactly what was evaluated: ``dequantized = scale * (codes - zero)`` per group.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from runner.registry import register

log = logging.getLogger("runner")


def groups_of(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, in] -> [out, n_groups, g] (a view when possible)."""
    out, cols = w.shape
    g = cols if group_size == -1 else group_size
    return w.reshape(out, cols // g, g)


def grid_params(wg: torch.Tensor, bits: int, sym: bool, shrink: float | torch.Tensor = 1.0):
    """Scale and zero of the b-bit grid per group of ``wg`` [..., g] (GPTQ's find_params).

    Asymmetric: [min(w, 0), max(w, 0)] onto 0 .. 2^b - 1 with a rounded zero. Symmetric: the same
    grid with zero 2^(b-1) and range +-absmax, i.e. levels {-2^(b-1) .. 2^(b-1) - 1} * scale, as
    compressed-tensors stores it. ``shrink`` (MSE clipping) narrows the range first.
    """
    maxq = 2**bits - 1
    xmin = wg.amin(-1).clamp(max=0) * shrink
    xmax = wg.amax(-1).clamp(min=0) * shrink
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
    xmax = torch.where(empty, torch.ones_like(xmax), xmax)
    scale = (xmax - xmin) / maxq
    zero = torch.full_like(scale, 2 ** (bits - 1)) if sym else torch.round(-xmin / scale)
    return scale, zero


def codes_of(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.clamp(torch.round(wg / scale.unsqueeze(-1)) + zero.unsqueeze(-1), 0, 2**bits - 1)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale.unsqueeze(-1) * (codes - zero.unsqueeze(-1))


def mse_grid_params(wg: torch.Tensor, bits: int, sym: bool, *, norm: float = 2.4, grid: int = 100,
                    max_shrink: float = 0.8):
    """Grid params with the range shrunk per group to minimise sum |w_hat - w|^norm (GPTQ's mse option)."""
    best_scale, best_zero = grid_params(wg, bits, sym)
    best_err = torch.full(best_scale.shape, float("inf"))
    for i in range(int(max_shrink * grid)):
        p = 1 - i / grid
        scale, zero = grid_params(wg, bits, sym, shrink=p)
        err = (dequantize(codes_of(wg, scale, zero, bits), scale, zero) - wg).abs().pow(norm).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def _fill(grid: dict | None, **tensors) -> None:
    if grid is not None:
        grid.update(tensors)


# --- bit accounting ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Storage:
    """What one quantized weight costs, declared with each quantizer (its contract's ``storage``).

    The code takes the configured bits unless the method fixes it (`code_bits`, stored as
    `stored_bits`); each group adds its scale and zero: fp16 scale and a b-bit zero for an integer
    grid (16 with a symmetric one), fp16 scale and fp16 zero for HQQ's float zero.
    """

    code_bits: float | None = None  # fixed by the method (PTQTP's two trits: log2 9); None: the bits
    stored_bits: float | None = None  # how a fixed code is stored (five trits a byte: 2 x 1.6)
    float_zero: bool = False  # the zero is an fp16 number, not a code
    scales: int = 1  # fp16 scales per group (PTQTP: one per trit plane)
    packable: bool = False  # the compressed-tensors export stores it exactly (an integer grid and zero)

    def accounting(self, bits: int, group_size: int, in_features: int, sym: bool) -> dict:
        """Code bits and effective bits per weight (code + scale and zero storage) of one module."""
        g = in_features if group_size == -1 else group_size
        if self.code_bits is not None:
            return {"code_bits": self.code_bits, "effective_bits": self.stored_bits + 16 * self.scales / g}
        zero = 16 if self.float_zero else 0 if sym else bits
        return {"code_bits": bits, "effective_bits": bits + (16 * self.scales + zero) / g}


INTEGER_GRID = Storage(packable=True)


def storage_of(name: str) -> Storage:
    """What a registered quantizer's weights cost; one that declares nothing (a plugin) is taken as an
    integer grid of the configured bits, fp16 scale and b-bit zero, that the packed export does not store."""
    from runner import registry

    return registry.contract("quantizer", name).storage or Storage()


@register("quantizer", "rtn", runtime=("sym", "grid"), storage=INTEGER_GRID)
def rtn(weight: torch.Tensor, bits: int, group_size: int, *, sym: bool = False, mse_clip: bool = False,
        grid: dict | None = None) -> torch.Tensor:
    """Round to nearest on the per-group grid; ``mse_clip`` searches a shrunk range per group."""
    w = weight.float()
    wg = groups_of(w, group_size)
    scale, zero = (mse_grid_params if mse_clip else grid_params)(wg, bits, sym)
    codes = codes_of(wg, scale, zero, bits)
    _fill(grid, codes=codes.reshape(w.shape), scale=scale, zero=zero)
    return dequantize(codes, scale, zero).reshape(w.shape)


def _shrink_lp(x: torch.Tensor, p: float, beta: float) -> torch.Tensor:
    """Generalised soft-thresholding for the l_p norm (p < 1), HQQ's proximal step."""
    return torch.sign(x) * torch.relu(x.abs() - x.abs().clamp_min(1e-12).pow(p - 1) / beta)


@register("quantizer", "hqq", ranges={"p": (0.0, 1.0, "open"), "beta": (0.0, None, "open"),
                                      "kappa": (1.0, None), "iters": (1, None)}, storage=Storage(float_zero=True))
def hqq(weight: torch.Tensor, bits: int, group_size: int, *, p: float = 0.7, beta: float = 10.0,
        kappa: float = 1.01, iters: int = 20) -> torch.Tensor:
    """Half-quadratic quantization (calibration-free): asymmetric, the zero point optimised in float.

    Alternates a sparse (l_p, p < 1) estimate of the quantization error with the closed-form zero
    that best explains the rest, raising beta each round, and keeps the zero with the lowest mean
    absolute error (stops at the first round that makes it worse, as the reference does).
    """
    w = weight.float()
    wg = groups_of(w, group_size)
    maxq = 2**bits - 1
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    inv_scale = maxq / (hi - lo).clamp_min(1e-8)
    zero = -lo * inv_scale
    best_zero, best_err = zero, float("inf")
    for _ in range(iters):
        wq = torch.clamp(torch.round(wg * inv_scale + zero), 0, maxq)
        wr = (wq - zero) / inv_scale
        err = (wg - wr).abs().mean().item()
        if err >= best_err:
            break
        best_zero, best_err = zero, err
        we = _shrink_lp(wg - wr, p, beta)
        zero = torch.mean(wq - (wg - we) * inv_scale, -1, keepdim=True)
        beta *= kappa
    wq = torch.clamp(torch.round(wg * inv_scale + best_zero), 0, maxq)
    return ((wq - best_zero) / inv_scale).reshape(w.shape)


@register("quantizer", "gptq", runtime=("hessian", "sym", "grid"), storage=INTEGER_GRID,
          ranges={"damp": (0.0, None), "block_size": (1, None)})
def gptq(weight: torch.Tensor, bits: int, group_size: int, *, hessian: torch.Tensor, sym: bool = False,
         damp: float = 0.01, block_size: int = 128, act_order: bool = False, mse_clip: bool = False,
         grid: dict | None = None) -> torch.Tensor:
    """GPTQ: quantize column by column, spreading each column's error over the columns not yet done.

    ``hessian`` is (2/N) sum x x^T over the layer's calibration inputs [in, in]. Dead inputs
    (H_jj = 0) get H_jj = 1 and a zero weight column; H is damped by ``damp`` * mean(diag H).
    Without act-order a group's grid is found when the loop reaches its first column (on the
    updated weights, as the reference does); with ``act_order`` columns go by descending diag(H)
    and the grids are fixed beforehand from the original weights ("static groups"), so groups stay
    contiguous for the packed export. If H is not positive definite even after damping, the layer
    falls back to RTN (logged).
    """
    w = weight.float().clone()
    out, cols = w.shape
    g = cols if group_size == -1 else group_size
    find = mse_grid_params if mse_clip else grid_params
    h = hessian.float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    scale = torch.zeros(out, cols // g)
    zero = torch.zeros(out, cols // g)
    perm = torch.arange(cols)
    if act_order:
        scale, zero = find(groups_of(w, group_size), bits, sym)
        perm = torch.argsort(torch.diag(h), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(cols)
    try:
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except torch.linalg.LinAlgError:
        log.warning("gptq: Hessian not positive definite after damping; this layer falls back to RTN")
        return rtn(weight, bits, group_size, sym=sym, mse_clip=mse_clip, grid=grid)
    codes = torch.zeros_like(w)
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        block = w[:, start:end].clone()
        errors = torch.zeros_like(block)
        hblock = hinv[start:end, start:end]
        for i in range(end - start):
            col = int(perm[start + i])
            k = col // g
            if not act_order and col % g == 0:  # the group starts here: its grid from the current weights
                rest = g - (end - start - i)  # the group's columns past this block, if any
                current = block[:, i:i + g] if rest <= 0 else torch.cat([block[:, i:], w[:, end:end + rest]], 1)
                s, z = find(current.unsqueeze(1), bits, sym)
                scale[:, k], zero[:, k] = s[:, 0], z[:, 0]
            q = torch.clamp(torch.round(block[:, i] / scale[:, k]) + zero[:, k], 0, 2**bits - 1)
            codes[:, start + i] = q
            err = (block[:, i] - scale[:, k] * (q - zero[:, k])) / hblock[i, i]
            block[:, i:] -= err.unsqueeze(1) * hblock[i, i:].unsqueeze(0)
            errors[:, i] = err
        w[:, end:] -= errors @ hinv[start:end, end:]
    codes = codes[:, torch.argsort(perm)]
    _fill(grid, codes=codes, scale=scale, zero=zero)
    return dequantize(groups_of(codes, group_size), scale, zero).reshape(out, cols)


# --- PTQTP: two ternary planes -------------------------------------------------------------------

PAIRS = torch.tensor([(a, b) for a in (-1.0, 0.0, 1.0) for b in (-1.0, 0.0, 1.0)])  # the 9 trit pairs


def _ternary_init(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """T = sign(x) where |x| > 0.7 mean|x|, and alpha = mean |x| over those entries, per group."""
    mag = x.abs()
    t = torch.sign(x) * (mag > 0.7 * mag.mean(-1, keepdim=True))
    alpha = (mag * t.abs()).sum(-1) / t.abs().sum(-1).clamp_min(1)
    return t, alpha


def ptqtp_planes(weight: torch.Tensor, group_size: int, *, iters: int = 50, tol: float = 1e-4,
                 ridge: float = 1e-6):
    """The two trit planes and their scales, W ~ a1*T1 + a2*T2 per row and group [R].

    Returns (t1, t2, a1, a2, errors): planes [out, n_groups, g] in {-1, 0, 1}, scales
    [out, n_groups], and the relative Frobenius error after the init and after every iteration.
    Each iteration solves the 2x2 ridge system for the scales (lambda = ``ridge`` * tr(S^T S)),
    then picks, per weight, the best of the 9 trit pairs for those scales; it stops when the
    relative error changes by less than ``tol``.
    """
    wg = groups_of(weight.float(), group_size)
    norm = wg.norm().clamp_min(1e-12)
    t1, a1 = _ternary_init(wg)
    t2, a2 = _ternary_init(wg - a1.unsqueeze(-1) * t1)

    def error():
        return ((wg - a1.unsqueeze(-1) * t1 - a2.unsqueeze(-1) * t2).norm() / norm).item()

    errors = [error()]
    for _ in range(iters):
        # (a) scales: min ||w - a1 t1 - a2 t2||^2 + lam ||a||^2 per row and group, in closed form
        s11, s22, s12 = (t1 * t1).sum(-1), (t2 * t2).sum(-1), (t1 * t2).sum(-1)
        b1, b2 = (t1 * wg).sum(-1), (t2 * wg).sum(-1)
        lam = ridge * (s11 + s22) + 1e-12
        det = (s11 + lam) * (s22 + lam) - s12 * s12
        a1 = ((s22 + lam) * b1 - s12 * b2) / det
        a2 = ((s11 + lam) * b2 - s12 * b1) / det
        # (b) trits: the nearest of the 9 representable values a1*t1 + a2*t2, per weight
        values = a1.unsqueeze(-1) * PAIRS[:, 0] + a2.unsqueeze(-1) * PAIRS[:, 1]  # [out, groups, 9]
        best = (wg.unsqueeze(-1) - values.unsqueeze(-2)).abs().argmin(-1)  # [out, groups, g]
        t1, t2 = PAIRS[best, 0], PAIRS[best, 1]
        errors.append(error())
        if abs(errors[-2] - errors[-1]) < tol:
            break
    return t1, t2, a1, a2, errors


@register("quantizer", "ptqtp", ranges={"iters": (1, None), "tol": (0.0, None), "ridge": (0.0, None)},
          storage=Storage(code_bits=math.log2(9), stored_bits=3.2, scales=2))
def ptqtp(weight: torch.Tensor, bits: int, group_size: int, *, iters: int = 50, tol: float = 1e-4,
          ridge: float = 1e-6) -> torch.Tensor:
    """PTQTP: W ~ diag(a1) T1 + diag(a2) T2 with ternary T, per row and group [R]; ``bits`` is unused
    (two trit planes: log2(9) = 3.17 bits of code per weight)."""
    t1, t2, a1, a2, _ = ptqtp_planes(weight, group_size, iters=iters, tol=tol, ridge=ridge)
    return (a1.unsqueeze(-1) * t1 + a2.unsqueeze(-1) * t2).reshape(weight.shape)
