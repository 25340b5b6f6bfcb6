"""Calibration for GPTQ (and any quantizer that needs inputs): token rows from a dataset config,
drawn at random or curated by COLA, and per-layer Hessians gathered layer by layer, each decoder
layer seeing the outputs of the layers already quantized before it.

Memory holds the model, one layer's Hessians, and the calibration activations (rows x seqlen x
hidden), never every layer's inputs at once.
"""

from __future__ import annotations

import logging
import math
import random

import torch

from runner.data import build_dataset, pack
from runner.progress import progress

log = logging.getLogger(__name__)

SELECTIONS = ("random", "cola")


def calibration_rows(data, tokenizer, n: int, seqlen: int, seed: int, *, select: str = "random", pool: int = 8,
                     model=None, batch_size: int = 16) -> torch.Tensor:
    """[n, seqlen] token ids: the dataset's examples concatenated into rows of seqlen, then n of them chosen.

    ``select="random"``: the first n rows of a seeded shuffle. ``select="cola"``: the first ``pool * n``
    rows of that same shuffle are candidates and COLA keeps one per activation cluster
    (`cola_select`; needs the full-precision ``model``). Fewer rows than asked (a small dataset, or
    empty clusters) are used as they are; the caller logs the count.
    """
    if select not in SELECTIONS:
        raise ValueError(f"calibration row selection {select!r}: choose one of {', '.join(SELECTIONS)}")
    examples = build_dataset(data, tokenizer)
    rows = pack(examples, seqlen)
    random.Random(seed).shuffle(rows)
    if select == "random":
        return torch.tensor([r["input_ids"] for r in rows[:n]], dtype=torch.long)
    if model is None:
        raise ValueError("COLA calibration selection needs the model whose activations it clusters")
    candidates = torch.tensor([r["input_ids"] for r in rows[: n * pool]], dtype=torch.long)
    if len(candidates) < n * pool:
        log.warning("cola: the data gives %d candidate rows of %d tokens, fewer than %d x %d", len(candidates),
                    seqlen, pool, n)
    return candidates[cola_select(model, candidates, n, batch_size, seed)]


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
def quantize_sequentially(model, rows: torch.Tensor, batch_size: int, targets_by_layer, quantize_layer,
                          desc: str = "quantize") -> None:
    """Run the calibration rows through the decoder one layer at a time.

    For each layer: gather the Hessians of its targeted linears (``targets_by_layer[i]``: a list of
    (name, module)) on the current inputs, call ``quantize_layer(i, {name: hessian})``, then run
    the now quantized layer again to produce the next layer's inputs. A progress bar `desc` counts
    the layers.
    """
    inputs = first_layer_inputs(model, rows, batch_size)
    layers = decoder_layers(model)
    with progress(desc, total=len(layers)) as bar:
        for i, layer in enumerate(layers):
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
            bar.advance(info=f"layer {i}")


# --- COLA (arXiv 2510.10618), stage 3: representative and diverse rows in activation space ---------

def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[batch, seq, dim] -> [batch, dim] in fp32: the mean over the positions where mask is 1 (padding
    would otherwise pull every short row towards the pad token's activation)."""
    m = mask.to(torch.float32).unsqueeze(-1)
    return (hidden.float() * m).sum(1) / m.sum(1).clamp(min=1)


@torch.no_grad()
def activation_sketch(model, rows: torch.Tensor, batch_size: int, seed: int, dim: int = 64,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[rows, dim] fp32: every decoder layer's output, mean-pooled over the row's tokens (masked),
    L2-normalised per layer so that no layer's scale dominates, concatenated across layers and
    projected by a seeded Gaussian matrix with N(0, 1/dim) entries (Johnson-Lindenstrauss: distances
    are kept approximately, and k-means runs in dim dimensions)."""
    layers = decoder_layers(model)
    mask = torch.ones_like(rows) if attention_mask is None else attention_mask
    width = model.config.hidden_size
    projection = torch.randn(len(layers) * width, dim, generator=torch.Generator().manual_seed(seed)) / math.sqrt(dim)
    device = next(model.parameters()).device
    pooled: list[torch.Tensor] = []
    current = {}  # the batch's attention mask, for the hooks

    def grab(module, args, output):
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        pooled.append(torch.nn.functional.normalize(masked_mean(hidden, current["mask"]).cpu(), dim=-1))
        if module is layers[-1]:
            raise _Stop  # the final norm and lm_head are not needed

    handles = [layer.register_forward_hook(grab) for layer in layers]
    sketches = []
    try:
        with progress("calibration (cola)", total=len(rows), info="activations") as bar:
            for start in range(0, len(rows), batch_size):
                pooled.clear()
                current["mask"] = mask[start:start + batch_size].to(device)
                try:
                    model(input_ids=rows[start:start + batch_size].to(device), attention_mask=current["mask"],
                          use_cache=False)
                except _Stop:
                    pass
                sketches.append(torch.cat(pooled, dim=1) @ projection)
                bar.advance(len(sketches[-1]))
    finally:
        for h in handles:
            h.remove()
    return torch.cat(sketches)


def _sq_dist(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    # exact differences (not the |x|^2 - 2xc + |c|^2 shortcut), so a point's distance to itself is 0
    return torch.cdist(x, c, compute_mode="donot_use_mm_for_euclid_dist").pow(2)


def _kmeans_pp(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each next centre drawn with probability proportional to D^2."""
    picks = [int(torch.randint(len(x), (1,), generator=gen))]
    d2 = _sq_dist(x, x[picks[-1]:picks[-1] + 1]).squeeze(1)
    for _ in range(1, k):
        total = d2.sum()
        if total > 0:
            picks.append(int(torch.multinomial(d2 / total, 1, generator=gen)))
        else:  # every point sits on a centre (duplicates): the extra centre's cluster stays empty
            picks.append(int(torch.randint(len(x), (1,), generator=gen)))
        d2 = torch.minimum(d2, _sq_dist(x, x[picks[-1]:picks[-1] + 1]).squeeze(1))
    return x[picks].clone()


def kmeans(x: torch.Tensor, k: int, seed: int, n_init: int = 10, max_iter: int = 300,
           tol: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """(centres [k, d], labels [n]): Lloyd's algorithm from k-means++ seeds, the lowest inertia of n_init
    seeded restarts. Each run stops when no label changes or the centres move (summed squares) by at most
    tol x the data's mean variance (scikit-learn's rule). A centre that loses all its points stays where
    it was (its cluster is empty)."""
    gen = torch.Generator().manual_seed(seed)
    min_shift = tol * float(x.var(0, unbiased=False).mean()) if len(x) > 1 else 0.0
    best = None
    for _ in range(n_init):
        centres, labels = _kmeans_pp(x, k, gen), None
        for _ in range(max_iter):
            new = _sq_dist(x, centres).argmin(1)
            if labels is not None and torch.equal(new, labels):
                break
            labels = new
            counts = torch.bincount(labels, minlength=k)
            sums = torch.zeros_like(centres).index_add_(0, labels, x)
            filled = counts > 0
            moved = centres.clone()
            centres[filled] = sums[filled] / counts[filled, None].to(x.dtype)
            if float((centres - moved).pow(2).sum()) <= min_shift:
                break
        d2 = _sq_dist(x, centres)
        labels = d2.argmin(1)
        inertia = d2.gather(1, labels[:, None]).sum()
        if best is None or inertia < best[0]:
            best = (inertia, centres, labels)
    return best[1], best[2]


def nearest_to_centres(x: torch.Tensor, centres: torch.Tensor, labels: torch.Tensor) -> list[int]:
    """Per non-empty cluster, the index of its member nearest its centre (sorted; unique, since the
    clusters are disjoint)."""
    d2 = _sq_dist(x, centres).gather(1, labels[:, None]).squeeze(1)
    picks = []
    for j in labels.unique().tolist():
        members = (labels == j).nonzero().squeeze(1)
        picks.append(int(members[d2[members].argmin()]))
    return sorted(picks)


def cola_select(model, candidates: torch.Tensor, n: int, batch_size: int, seed: int, dim: int = 64,
                attention_mask: torch.Tensor | None = None) -> list[int]:
    """Indices of at most n candidate rows: k-means (k = n) on their activation sketches, the row
    nearest each centre. Empty clusters give no row."""
    k = min(n, len(candidates))
    sketch = activation_sketch(model, candidates, batch_size, seed, dim, attention_mask).double()
    picks = nearest_to_centres(sketch, *kmeans(sketch, k, seed))
    log.info("cola: kept %d of %d candidate rows, the one nearest each k-means centre (k=%d, %d empty clusters)",
             len(picks), len(candidates), k, k - len(picks))
    return picks
