"""D²Quant (spec new_methods.md section 5; arXiv 2602.02546, whose repository has a README only):
a per-input-channel scale for down_proj (DSQ) and a mean-shift correction of the MLP input (DAC).

DSQ [P]: down_proj is stored as (S ⊙ Q)·diag(s^c), S the usual group scales, s^c one scale per
input channel, and s^c is merged into up_proj (h = act(gate) ⊙ up is linear in up, so row j of
up_proj, and its group scales, take s^c_j): no bits are added. RECONSTRUCTION [R]: s^c = 1, then
``iters`` rounds of (a) Q = quant(W·diag(1/s^c)) with the recipe's quantizer (RTN or GPTQ, whose
Hessian becomes diag(s) H diag(s)) and (b) the least-squares s^c for that Q, in the weight
(s_j = <W_:j, Q_:j> / |Q_:j|², ``objective: weight``) or on the calibration inputs
(min |(W - Q diag(s)) X|², ``objective: output``); the best pair seen is kept. up_proj is quantized
first and its rows scaled after.

DAC [P]: feed the layer's calibration inputs through full-precision and quantized attention; the mean
over tokens of the difference of the post-attention norm outputs, μ, is added back to the MLP input.
RECONSTRUCTION [R]: RMSNorm has no bias, so μ is folded into gate/up biases Ŵ·μ (down gets a zero
bias), which a plain Llama checkpoint holds with ``mlp_bias: true``; the MLP is quantized on the
corrected inputs, layer by layer, each layer seeing the quantized and corrected layers before it.
A model whose MLP takes no bias (Qwen3) runs DSQ alone (``dac: false``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from recipes.quantize.calibration import HessianAccumulator
from recipes.quantize.transforms import DOWN, GATE, K, NORMS, O, Q, UP, V, ChannelMean, LayerStep, missing_modules
from runner.registry import register


def dsq_error(w: torch.Tensor, q: torch.Tensor, s: torch.Tensor, hessian: torch.Tensor | None = None) -> float:
    """|W - Q diag(s)|²_F, or tr((W - Q diag(s)) H (W - Q diag(s))^T) on the inputs' H."""
    e = w - q * s
    return float(e.pow(2).sum()) if hessian is None else float(((e @ hessian) * e).sum())


def dsq_scale_step(w: torch.Tensor, q: torch.Tensor, s: torch.Tensor, hessian: torch.Tensor | None = None,
                   ridge: float = 1e-6) -> torch.Tensor:
    """The least-squares s for a fixed Q: min over s of the `dsq_error`.

    Weight objective: separable, s_j = <W_:j, Q_:j> / |Q_:j|² (a zero column keeps its s_j). On the
    inputs: ((Q^T Q) ⊙ H) s = diag(Q^T W H), with a ridge toward the current s (ridge · mean of the
    diagonal), so the step still never raises the error.
    """
    if hessian is None:
        norm = q.pow(2).sum(0)
        return torch.where(norm > 0, (w * q).sum(0) / norm.clamp_min(1e-30), s)
    a = (q.T @ q) * hessian
    lam = ridge * a.diagonal().mean().clamp_min(1e-30)
    b = ((w @ hessian) * q).sum(0)
    return torch.linalg.solve(a + lam * torch.eye(len(s)), b + lam * s)


def dsq(w: torch.Tensor, quantize: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor], iters: int,
        hessian: torch.Tensor | None = None, objective: str = "weight"):
    """DSQ on one weight [out, in]: (Q, s, errors) with W ≈ Q·diag(s), Q a quantizer output.

    ``quantize(weight, hessian)`` is the base quantizer; it sees W·diag(1/s), whose inputs are
    diag(s)·x (Hessian diag(s) H diag(s)). ``iters`` = 0 is the base quantizer alone (s = 1). The
    error (per `objective`, on `hessian` for "output") is recorded after every quantization and
    every least-squares step; the best (Q, s) is returned.
    """
    w = w.float()
    target = hessian if objective == "output" else None
    s = torch.ones(w.shape[1])

    def quant(s):
        return quantize(w / s, None if hessian is None else hessian * s.unsqueeze(0) * s.unsqueeze(1))

    q = quant(s)
    errors = [dsq_error(w, q, s, target)]
    best = (errors[0], q, s)
    for _ in range(iters):
        s = dsq_scale_step(w, q, s, target)
        errors.append(dsq_error(w, q, s, target))
        if errors[-1] < best[0]:
            best = (errors[-1], q, s)
        q = quant(s)
        errors.append(dsq_error(w, q, s, target))
        if errors[-1] < best[0]:
            best = (errors[-1], q, s)
    return best[1], best[2], errors


@torch.no_grad()
def add_mlp_bias(mlp: torch.nn.Module, mu: torch.Tensor) -> None:
    """Fold y = x + μ at the MLP input into biases: gate and up get Ŵ·μ, down a zero bias (mlp_bias
    gives all three one)."""
    for name in ("gate_proj", "up_proj", "down_proj"):
        fc = getattr(mlp, name)
        if fc.bias is None:
            fc.bias = torch.nn.Parameter(torch.zeros(fc.out_features, dtype=fc.weight.dtype, device=fc.weight.device))
        if name != "down_proj":
            fc.bias.add_((fc.weight.float() @ mu.to(fc.weight.device)).to(fc.bias.dtype))


@register("quant_transform", "d2quant", ranges={"iters": (0, None)}, choices={"objective": ("weight", "output")})
@dataclass
class D2Quant:
    iters: int = 10  # DSQ rounds of (quantize, least-squares s^c) [R]; 0: no DSQ
    objective: str = "weight"  # DSQ's least squares: weight (|W - Ŵ|) or output (|(W - Ŵ) X| on calibration) [R]
    dac: bool = True  # the mean-shift correction after the post-attention norm, as gate/up biases [R]

    exportable: ClassVar[bool] = False  # up_proj's scales take s^c and the MLP gains biases

    def problems(self, model) -> list[str]:
        problems = []
        missing = missing_modules(model, (GATE, UP, DOWN, NORMS[1]))
        if missing:
            problems.append(f"quant.transform: d2quant needs a gated MLP after a post-attention norm; this model's "
                            f"layers lack {', '.join(missing)}")
        if self.dac and not hasattr(model.config, "mlp_bias"):
            problems.append(f"quant.transform_params.dac: DAC folds its correction into gate/up biases, and a "
                            f"{model.config.model_type} MLP has none in a plain checkpoint (Llama's config has "
                            "mlp_bias); "
                            "set quant.transform_params.dac=false")
        return problems

    @torch.no_grad()
    def __call__(self, step: LayerStep) -> list:
        layer, targets = step.layer, step.targets
        norm = layer.get_submodule(NORMS[1])
        attention = [n for n in (Q, K, V, O) if n in targets]
        # full precision: the post-attention norm's mean output, and the attention's Hessians
        fp_mean = ChannelMean()
        accumulators = {n: HessianAccumulator(targets[n].in_features) for n in attention} if step.needs_hessian else {}
        handles = [norm.register_forward_hook(fp_mean)]
        handles += [targets[n].register_forward_hook(a) for n, a in accumulators.items()]
        try:
            step.forward()
        finally:
            for h in handles:
                h.remove()
        for n in attention:
            weight = targets[n].weight.detach().float().cpu().clone()
            step.commit(n, step.fake_quant(n, weight, accumulators[n].h if accumulators else None), weight)

        mu = torch.zeros_like(fp_mean.mean)
        if self.dac:  # the shift the quantized attention leaves in the MLP input
            q_mean = ChannelMean()
            handle = norm.register_forward_hook(q_mean)
            try:
                step.forward()
            finally:
                handle.remove()
            mu = fp_mean.mean - q_mean.mean
        correct = norm.register_forward_hook(lambda m, i, out: out + mu.to(out))  # until folded into biases
        try:
            self._mlp(step)
        finally:
            correct.remove()
        if self.dac:
            add_mlp_bias(layer.mlp, mu)
            step.config.mlp_bias = True
        step.stats["dac_shift"] = float(mu.norm() / fp_mean.mean.norm().clamp_min(1e-12))
        return step.outputs()

    def _mlp(self, step: LayerStep) -> None:
        """gate and up quantized, down by DSQ, s^c merged into up's rows (on the corrected inputs)."""
        targets = step.targets
        mods = {n: step.layer.get_submodule(n) for n in (GATE, UP, DOWN)}
        want = [n for n in (GATE, UP, DOWN)
                if n in targets and (step.needs_hessian or (n == DOWN and self.objective == "output"))]
        hessians = step.hessians(want) if want else {}
        if GATE in targets:
            self._plain(step, GATE, hessians.get(GATE))
        w_up = mods[UP].weight.detach().float().cpu().clone()
        up_q = step.fake_quant(UP, w_up, hessians.get(UP)) if UP in targets else w_up
        s = torch.ones(mods[DOWN].in_features)
        if DOWN in targets:
            w = mods[DOWN].weight.detach().float().cpu().clone()
            h = hessians.get(DOWN)
            q, s, errors = dsq(w, lambda x, hs: step.fake_quant(DOWN, x, hs if step.needs_hessian else None),
                               self.iters, h, self.objective)
            step.commit(DOWN, q, w / s, cols=s)  # the original basis: Q diag(s) against W
            step.stats["dsq_error"] = {"start": errors[0], "best": min(errors)}
            step.stats["dsq_scale_range"] = [float(s.min()), float(s.max())]
        if UP in targets:
            step.commit(UP, up_q * s.unsqueeze(1), w_up * s.unsqueeze(1), rows=1 / s)
        else:
            mods[UP].weight.data.copy_((w_up * s.unsqueeze(1)).to(mods[UP].weight))

    @staticmethod
    def _plain(step: LayerStep, name: str, hessian) -> None:
        weight = step.targets[name].weight.detach().float().cpu().clone()
        step.commit(name, step.fake_quant(name, weight, hessian), weight)
