"""Calibration-driven model transforms around the per-weight quantizer (registry kind ``quant_transform``).

A quantizer sees one weight at a time; AWQ and D²Quant also rewrite the model around it (scale input
channels into the previous op, clip ranges, add a bias), using the activations that calibration
rows produce in each decoder layer. The recipe runs the decoder one layer at a time
(`transform_layers`) and hands the transform a `LayerStep` per layer: the layer, the inputs it
receives for each calibration batch, its targeted linears, and the recipe's quantizer bound to each
module's bits and group size. The transform returns the next layer's inputs (full-precision ones
for AWQ, quantized ones for D²Quant); whatever target it left unquantized, the recipe then
quantizes with ``quant.method``.

A transform is a dataclass registered as ``register("quant_transform", name)``: its fields are its
parameters (``quant.transform_params``), and it has ``__call__(step) -> next inputs``,
``problems(model) -> [str]`` (what the model lacks for it, checked before any work) and the class
attribute ``exportable`` (whether the packed export can store its result exactly).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from recipes.quantize.calibration import (
    HessianAccumulator,
    _with_hidden,
    decoder_layers,
    first_layer_inputs,
    layer_output,
)
from runner.progress import progress

Inputs = list  # [(args, kwargs)] a decoder layer receives, one entry per calibration batch

# The linears of a Llama/Qwen-style decoder layer, named as inside the layer.
Q, K, V, O = "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"
GATE, UP, DOWN = "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"
LINEARS = (Q, K, V, O, GATE, UP, DOWN)
NORMS = ("input_layernorm", "post_attention_layernorm")


def missing_modules(model, names=LINEARS + NORMS) -> list[str]:
    """The submodules of `names` that the model's first decoder layer lacks."""
    layer = decoder_layers(model)[0]
    have = {n for n, _ in layer.named_modules()}
    return [n for n in names if n not in have]


@dataclass
class LayerStep:
    """One decoder layer's turn: what a transform reads and the recipe's quantizer it may call."""

    index: int
    layer: torch.nn.Module
    inputs: Inputs
    targets: dict[str, torch.nn.Linear]  # the targeted linears, named as inside the layer (self_attn.q_proj)
    config: Any  # the model's config (a transform that adds biases turns on mlp_bias)
    needs_hessian: bool  # the quantizer takes the layer's input Hessian
    grid_of: Callable[[str], tuple[int, int, bool]]  # name -> (bits, group size, sym) of that module
    quantize_weight: Callable[..., tuple[torch.Tensor, dict | None]]  # (name, weight, hessian) -> (dequantized, grid)
    record: Callable[..., None]  # (name, quantized, reference, grid, rows, cols): write the weight, note its error
    references: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> the full-precision weight it stands for
    # name -> (row factors, column factors) that take the stored weight back to the original model's basis
    # (diag(rows) W diag(cols)), where the weight error is measured; None: unchanged
    to_original: dict[str, tuple] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)  # what the transform reports for this layer
    done: set = field(default_factory=set)
    _grids: dict = field(default_factory=dict)

    def forward(self) -> list[torch.Tensor]:
        """The layer's output for every calibration batch (hooks the caller set see the run)."""
        return [layer_output(self.layer, args, kwargs) for args, kwargs in self.inputs]

    def outputs(self) -> Inputs:
        """The next layer's inputs, from the layer as it is now."""
        return [_with_hidden(args, kwargs, out) for (args, kwargs), out in zip(self.inputs, self.forward())]

    def hessians(self, names) -> dict[str, torch.Tensor]:
        """H = (2/N) sum x x^T of each named linear's inputs, from one run of the layer as it is now."""
        accumulators = {n: HessianAccumulator(self.targets[n].in_features) for n in names}
        handles = [self.targets[n].register_forward_hook(acc) for n, acc in accumulators.items()]
        try:
            self.forward()
        finally:
            for h in handles:
                h.remove()
        return {n: acc.h for n, acc in accumulators.items()}

    def fake_quant(self, name: str, weight: torch.Tensor, hessian: torch.Tensor | None = None) -> torch.Tensor:
        """`weight` (fp32) through the recipe's quantizer at this module's bits and group size."""
        w, self._grids[name] = self.quantize_weight(name, weight.float().cpu(), hessian)
        return w

    def commit(self, name: str, quantized: torch.Tensor, reference: torch.Tensor, rows=None, cols=None) -> None:
        """Write `quantized` into the module; its error is measured against `reference`, both taken back
        to the original basis by diag(rows) . diag(cols) (or `to_original[name]`)."""
        if rows is None and cols is None:
            rows, cols = self.to_original.get(name, (None, None))
        self.record(name, quantized, reference, self._grids.get(name), rows, cols)
        self.done.add(name)

    def quantize(self, names=None) -> None:
        """Quantize the named targets (default: every one not yet done) with the recipe's quantizer,
        on Hessians of the layer as it is now when the quantizer takes them."""
        names = [n for n in (self.targets if names is None else names) if n in self.targets and n not in self.done]
        hessians = self.hessians(names) if self.needs_hessian and names else {}
        for n in names:
            weight = self.targets[n].weight.detach().float().cpu().clone()
            self.commit(n, self.fake_quant(n, weight, hessians.get(n)), self.references.get(n, weight))


class ChannelMean:
    """Forward hook: the per-channel mean of a module's output over every calibration token."""

    def __init__(self):
        self.sum, self.count = None, 0

    def __call__(self, module, inputs, output):
        x = output.detach().float().reshape(-1, output.shape[-1]).cpu()
        self.sum = x.sum(0) if self.sum is None else self.sum + x.sum(0)
        self.count += x.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.count


@torch.no_grad()
def transform_layers(model, rows: torch.Tensor, batch_size: int, visit, desc: str = "transform") -> None:
    """Run the calibration rows through the decoder one layer at a time: ``visit(i, layer, inputs)``
    transforms and quantizes layer i and returns the inputs of layer i + 1. A progress bar `desc`
    counts the layers."""
    inputs = first_layer_inputs(model, rows, batch_size)
    layers = decoder_layers(model)
    with progress(desc, total=len(layers)) as bar:
        for i, layer in enumerate(layers):
            inputs = visit(i, layer, inputs)
            bar.advance(info=f"layer {i}")
