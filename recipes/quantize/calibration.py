"""Calibration for GPTQ: token rows from a dataset config, and per-layer Hessians gathered layer by
layer, each decoder layer seeing the outputs of the layers already quantized before it.

Memory holds the model, one layer's Hessians, and the calibration activations (rows x seqlen x
hidden), never every layer's inputs at once.
"""

from __future__ import annotations

import random

import torch

from runner.data import build_dataset, pack


def calibration_rows(data, tokenizer, n: int, seqlen: int, seed: int) -> torch.Tensor:
    """[n, seqlen] token ids: the dataset's examples concatenated into rows of seqlen, n drawn at random.

    Fewer rows than asked (a small dataset) are used as they are; the caller logs the count.
    """
    examples = build_dataset(data, tokenizer)
    rows = pack(examples, seqlen)
    random.Random(seed).shuffle(rows)
    return torch.tensor([r["input_ids"] for r in rows[:n]], dtype=torch.long)


def decoder_layers(model) -> torch.nn.ModuleList:
    """The ModuleList of decoder layers (``model.model.layers`` for Llama/Qwen-style models)."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.split(".")[-1] == "layers":
            return module
    raise ValueError("no decoder layer list ('...layers') found in the model")


class _Stop(Exception):
    pass


def first_layer_inputs(model, rows: torch.Tensor, batch_size: int) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) the first decoder layer receives for each batch of calibration rows."""
    layer0 = decoder_layers(model)[0]
    captured = []

    def grab(module, args, kwargs):
        captured.append((args, kwargs))
        raise _Stop

    handle = layer0.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        device = next(model.parameters()).device
        for start in range(0, len(rows), batch_size):
            try:
                model(input_ids=rows[start:start + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def layer_output(layer, args: tuple, kwargs: dict) -> torch.Tensor:
    out = layer(*args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


class HessianAccumulator:
    """Forward hook on a linear layer: H = (2 / N) sum over its N input rows of x x^T, in fp32."""

    def __init__(self, in_features: int):
        self.h = torch.zeros(in_features, in_features)
        self.rows = 0

    def __call__(self, module, inputs, output):
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float().cpu()
        total = self.rows + x.shape[0]
        self.h *= self.rows / total
        self.h += (2 / total) * x.T @ x
        self.rows = total


@torch.no_grad()
def quantize_sequentially(model, rows: torch.Tensor, batch_size: int, targets_by_layer, quantize_layer) -> None:
    """Run the calibration rows through the decoder one layer at a time.

    For each layer: gather the Hessians of its targeted linears (``targets_by_layer[i]``: a list of
    (name, module)) on the current inputs, call ``quantize_layer(i, {name: hessian})``, then run
    the now quantized layer again to produce the next layer's inputs.
    """
    inputs = first_layer_inputs(model, rows, batch_size)
    for i, layer in enumerate(decoder_layers(model)):
        targets = targets_by_layer.get(i, [])
        accumulators = {name: HessianAccumulator(module.in_features) for name, module in targets}
        handles = [module.register_forward_hook(accumulators[name]) for name, module in targets]
        try:
            for args, kwargs in inputs:
                layer_output(layer, args, kwargs)
        finally:
            for h in handles:
                h.remove()
        quantize_layer(i, {name: acc.h for name, acc in accumulators.items()})
        inputs = [_with_hidden(args, kwargs, layer_output(layer, args, kwargs)) for args, kwargs in inputs]
