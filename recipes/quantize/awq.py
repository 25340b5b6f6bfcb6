"""AWQ, activation-aware weight quantization (spec new_methods.md section 7; llm-awq's auto_scale and
auto_clip, read for facts).

Per decoder layer, on the full-precision calibration activations:
1. scale search, per group of linears that share an input: s = x̄^α normalised so max(s)·min(s) = 1,
   x̄ the per-channel mean |x| of that input; for α in {0, 1/n, ..., (n-1)/n} quantize W·diag(s)
   on the RTN grid, divide by s again, run the inspected module and keep the α with the least mean
   squared output change. The groups (Llama/Qwen): input_layernorm -> q, k, v (inspect self_attn);
   v -> o (only when v and o have the same shape, i.e. no GQA); post_attention_layernorm -> gate,
   up (inspect mlp); up -> down.
2. apply: the previous op (norm weight, or the rows of the previous linear) ÷ s, the group's
   columns × s: the layer computes the same function.
3. clip search, every linear except q and k: per output row and group, the range max|w|·(1 - i/20)
   for i < 20·max_shrink with the least error of the group's partial dot products on a strided
   sample of calibration tokens; the weights are clamped to it.
The recipe then quantizes the layer with ``quant.method`` (RTN in awq_quantize). The next layer's
inputs are the full-precision outputs, taken before scaling and clipping, as in the reference.

The search grid is the project's RTN grid: on a group that holds both signs it is AWQ's
``pseudo_quantize_tensor`` (scale (max - min)/(2^b - 1), zero -round(min/scale)); RTN also puts 0
in the range, which AWQ does not, so the two differ only on one-signed groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from recipes.quantize.quantizers import groups_of, rtn
from recipes.quantize.transforms import GATE, K, NORMS, O, Q, UP, DOWN, V, LayerStep, missing_modules
from runner.registry import register

CLIP_GRID = 20  # the clip search shrinks the range in steps of 1/20, as the reference does


def awq_scales(x_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = clamp(x̄^α, 1e-4), divided by sqrt(max s · min s) so that max · min = 1."""
    s = x_mean.float().pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


@torch.no_grad()
def scale_into(prev: torch.nn.Module, linears: list[torch.nn.Linear], s: torch.Tensor) -> None:
    """Divide the previous op's output channels by s and multiply the linears' input columns by s: the
    composition is unchanged. `prev` is a norm (weight ÷ s) or a linear (rows ÷ s, bias too)."""
    if isinstance(prev, torch.nn.Linear):
        prev.weight.div_(s.to(prev.weight).unsqueeze(1))
    else:
        prev.weight.div_(s.to(prev.weight))
    if getattr(prev, "bias", None) is not None:
        prev.bias.div_(s.to(prev.bias))
    for fc in linears:
        fc.weight.mul_(s.to(fc.weight).unsqueeze(0))


@torch.no_grad()
def clip_ranges(w: torch.Tensor, x: torch.Tensor, bits: int, group_size: int, sym: bool = False, *,
                max_shrink: float = 0.5, chunk_elems: int = 2**24) -> torch.Tensor:
    """The clipping range per output row and group [out, n_groups] that minimises the mean over the
    tokens `x` [n, in] of (sum over the group of x·(Q(clamp(w)) - w))², shrinking max|w| by i/20
    for i < 20·max_shrink (i = 0, the plain range, always tried)."""
    w, x = w.float(), x.float()
    out, cols = w.shape
    g = cols if group_size == -1 else group_size
    xg = x.reshape(1, x.shape[0], cols // g, g)
    best_all = []
    rows = max(1, chunk_elems // (x.shape[0] * cols))
    for start in range(0, out, rows):
        wg = w[start:start + rows].reshape(-1, 1, cols // g, g)
        full = (xg * wg).sum(-1)  # [rows, n, groups]
        top = wg.abs().amax(-1, keepdim=True)  # [rows, 1, groups, 1]
        best, best_err = top.clone(), torch.full_like(top, float("inf"))
        for i in range(max(1, int(max_shrink * CLIP_GRID))):
            cap = top * (1 - i / CLIP_GRID)
            clipped = torch.clamp(wg, -cap, cap)
            qw = rtn(clipped.reshape(-1, cols), bits, group_size, sym=sym).reshape(wg.shape)
            err = ((xg * qw).sum(-1) - full).pow(2).mean(1).reshape(top.shape)
            better = err < best_err
            best_err, best = torch.where(better, err, best_err), torch.where(better, cap, best)
        best_all.append(best.reshape(-1, cols // g))
    return torch.cat(best_all)


@torch.no_grad()
def apply_clip(module: torch.nn.Linear, cap: torch.Tensor, group_size: int) -> None:
    w = module.weight.detach().float().cpu()
    wg = groups_of(w, group_size)
    c = cap.unsqueeze(-1)
    module.weight.data.copy_(torch.clamp(wg, -c, c).reshape(w.shape).to(module.weight))


class _Capture:
    """Forward pre-hook: the (args, kwargs) a module is called with, per calibration batch."""

    def __init__(self):
        self.calls = []

    def __call__(self, module, args, kwargs):
        self.calls.append((args, kwargs))


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@register("quant_transform", "awq", ranges={"n_grid": (1, None), "max_shrink": (0.0, 1.0, "open"),
                                            "clip_tokens": (1, None)})
@dataclass
class AWQ:
    n_grid: int = 20  # α in {0, 1/n_grid, ..., (n_grid - 1)/n_grid} (α = 1 excluded)
    clip: bool = True  # the clip search after scaling (llm-awq's mse_range)
    max_shrink: float = 0.5  # clip: shrink the range by up to this (in steps of 1/20, the last excluded)
    clip_tokens: int = 512  # clip: strided sample of this many calibration tokens

    exportable: ClassVar[bool] = True  # the layer's weights are quantized as they are stored

    def problems(self, model) -> list[str]:
        missing = missing_modules(model)
        return [f"quant.transform: awq scales into the norms and linears of a Llama/Qwen-style decoder layer; "
                f"this model's layers lack {', '.join(missing)}"] if missing else []

    @torch.no_grad()
    def __call__(self, step: LayerStep) -> list:
        layer = step.layer
        sub = dict(layer.named_modules())
        # one full-precision run: the next layer's inputs, each group's input and inspected calls
        captures = {n: _Capture() for n in ("self_attn", "mlp", Q, O, GATE, DOWN)}
        handles = [sub[n].register_forward_pre_hook(c, with_kwargs=True) for n, c in captures.items()]
        try:
            next_inputs = step.outputs()
        finally:
            for h in handles:
                h.remove()
        feats = {n: [_first(a) if a else kw["hidden_states"] for a, kw in captures[n].calls]
                 for n in (Q, O, GATE, DOWN)}

        groups = [(NORMS[0], [Q, K, V], "self_attn", Q)]
        if sub[V].weight.shape == sub[O].weight.shape:  # no GQA: v's output channels are o's inputs
            groups.append((V, [O], O, O))
        groups += [(NORMS[1], [GATE, UP], "mlp", GATE), (UP, [DOWN], DOWN, DOWN)]

        alphas, found = {}, []
        for prev, linears, inspect, feat in groups:
            quantized = [n for n in linears if n in step.targets]
            if not quantized:
                continue
            x_mean = torch.cat([x.detach().float().abs().reshape(-1, x.shape[-1]).cpu() for x in feats[feat]]).mean(0)
            calls = captures[inspect].calls if inspect in captures else [((x,), {}) for x in feats[feat]]
            alpha, s = self._search(step, sub[inspect], calls, quantized, x_mean)
            alphas[f"{prev}->{','.join(n.split('.')[-1] for n in linears)}"] = alpha
            found.append((prev, linears, feat, s))
        rows, cols = {}, {}
        for prev, linears, feat, s in found:  # all searched on the unscaled layer, then applied
            scale_into(sub[prev], [sub[n] for n in linears], s)
            feats[feat] = [x / s.to(x) for x in feats[feat]]
            rows[prev] = s  # the original is diag(s) . stored rows of a previous linear, stored columns / s
            cols.update({n: 1 / s for n in linears})
        step.to_original.update({n: (rows.get(n), cols.get(n)) for n in step.targets})
        for n in step.targets:  # the function-preserving weights: what the quantized ones are measured against
            step.references[n] = step.targets[n].weight.detach().float().cpu().clone()

        shrunk = {}
        if self.clip:
            share = {Q: Q, K: Q, V: Q, O: O, GATE: GATE, UP: GATE, DOWN: DOWN}
            for n in [n for n in step.targets if n not in (Q, K)]:  # q·k products: not clipped (reference)
                x = torch.cat([f.detach().float().reshape(-1, f.shape[-1]).cpu() for f in feats[share[n]]])
                x = x[:: max(1, len(x) // self.clip_tokens)]
                bits, g, sym = step.grid_of(n)
                cap = clip_ranges(step.targets[n].weight.detach().cpu(), x, bits, g, sym, max_shrink=self.max_shrink)
                top = groups_of(step.targets[n].weight.detach().float().cpu(), g).abs().amax(-1)
                shrunk[n.split(".")[-1]] = float((1 - cap / top.clamp_min(1e-12)).mean())
                apply_clip(step.targets[n], cap, g)
        step.stats.update({"alpha": alphas, "clip_shrink": shrunk})
        return next_inputs

    def _search(self, step: LayerStep, module, calls, names, x_mean) -> tuple[float, torch.Tensor]:
        """The α (and its s) whose quantized group changes the inspected module's output least."""
        reference = [_first(module(*args, **kwargs)) for args, kwargs in calls]
        saved = {n: step.targets[n].weight.detach().clone() for n in names}
        best = (float("inf"), 0.0, torch.ones_like(x_mean))
        try:
            for k in range(self.n_grid):
                alpha = k / self.n_grid
                s = awq_scales(x_mean, alpha)
                for n in names:
                    bits, g, sym = step.grid_of(n)
                    w = saved[n].float().cpu() * s
                    step.targets[n].weight.data.copy_((rtn(w, bits, g, sym=sym) / s).to(saved[n]))
                err = sum(float((_first(module(*a, **kw)).float() - r.float()).pow(2).sum())
                          for (a, kw), r in zip(calls, reference))
                if err < best[0]:
                    best = (err, alpha, s)
        finally:
            for n in names:
                step.targets[n].weight.data.copy_(saved[n])
        return best[1], best[2]
