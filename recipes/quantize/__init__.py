"""Weight-only post-training quantization of the decoder's linear layers (fake quant).

Every ``nn.Linear`` inside a decoder layer (q/k/v/o/gate/up/down) is replaced, one module at a
time, by its dequantized weight: computed in fp32 from the ``quant.method`` quantizer, cast back
to the model dtype. Embeddings, norms and lm_head stay in full precision (so a tied lm_head is
never touched). With ``quant.allocator`` (lieq, nsds, uniform) each decoder layer gets its own
bits from ``quant.bit_choices`` under the parameter-weighted budget ``quant.avg_bits``. GPTQ runs
layer by layer on calibration rows drawn from the ``data`` config. With ``quant.transform`` (awq,
d2quant) a calibration-driven transform rewrites each decoder layer around the quantizer
(`recipes.quantize.transforms`).

Writes the fake-quant model as a normal HF checkpoint with ``quant_meta.json`` (per module:
method, bits, group size, sym, code bits, effective bits; per layer: bits and allocator score),
and with ``quant.export=compressed_tensors`` a real packed checkpoint in ``packed/``.

    python -m runner recipe=rtn_quantize
    python -m runner recipe=lieq_quantize quant.avg_bits=2.5
    python -m runner -m recipe=gptq_quantize quant.bits=2,3,4,8
    python -m runner recipe=awq_quantize
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
from omegaconf import DictConfig

# importing these modules registers the quantizers and the bit allocators
from recipes.quantize import allocators, awq, d2quant, quantizers  # noqa: F401
from recipes.quantize.calibration import SELECTIONS, calibration_rows, quantize_sequentially
from recipes.quantize.transforms import LayerStep, transform_layers
from runner import registry
from runner.config import bounds
from runner.errors import ConfigError
from runner.models import decoder_linears
from runner.progress import progress
from runner.recipe import Blocks, Component, Recipe, RecipeResult, RunContext
from runner.registry import register


@dataclass
class QuantConfig:
    """The recipe's own `quant` keys; other keys in the block go to the quantizer (mse_clip, damp, ...)."""

    method: str = "rtn"  # registered quantizer: rtn | hqq | gptq | ptqtp
    bits: int = field(default=4, metadata=bounds(1, 8))  # code bits (every layer, unless an allocator sets them)
    group_size: int = 128  # columns per scale along the input dim; -1: one group per row (per-channel)
    sym: bool = False  # symmetric integer grid (compressed-tensors presets); asymmetric is better at 2-3 bits
    targets: List[str] = field(default_factory=list)  # regexes of module names to quantize; empty: all decoder linears
    ignore: List[str] = field(default_factory=list)  # regexes of module names kept in full precision
    allocator: Optional[str] = None  # bit allocator: uniform | lieq | nsds; null: every layer at `bits`
    avg_bits: Optional[float] = None  # the allocator's budget: parameter-weighted mean code bits
    bit_choices: List[int] = field(default_factory=lambda: [2, 3, 4])
    allocator_params: Dict[str, Any] = field(default_factory=dict)  # e.g. {metric: energy} for lieq
    calib_samples: int = field(default=128, metadata=bounds(1))  # GPTQ calibration rows ...
    calib_seqlen: int = field(default=512, metadata=bounds(8))  # ... of this many tokens, from `data`
    calib_batch_size: int = field(default=16, metadata=bounds(1))
    # how the rows are chosen: random, or cola (one row per k-means cluster of activations, from a pool of
    # calib_pool x calib_samples random rows; calibration.py)
    calib_select: str = field(default="random", metadata=bounds(choices=SELECTIONS))
    calib_pool: int = field(default=8, metadata=bounds(1))
    export: str = field(default="none", metadata=bounds(choices=("none", "compressed_tensors")))
    transform: Optional[str] = None  # calibration-driven model transform around the quantizer: awq | d2quant
    transform_params: Dict[str, Any] = field(default_factory=dict)  # e.g. {iters: 10} for d2quant


def _bad_regex(patterns: list[str], key: str) -> list[str]:
    problems = []
    for p in patterns:
        try:
            re.compile(p)
        except re.error as exc:
            problems.append(f"{key}: {p!r} is not a valid regular expression ({exc})")
    return problems


def select_targets(model, q) -> list[tuple[str, torch.nn.Linear, int]]:
    """The decoder linears named by `quant.targets` (all when empty) and not by `quant.ignore`,
    never one that shares its weight with a module left out (a tied embedding)."""
    found = decoder_linears(model)
    chosen = [t for t in found
              if (not q.targets or any(re.search(p, t[0]) for p in q.targets))
              and not any(re.search(p, t[0]) for p in q.ignore)]
    chosen_ptrs = {m.weight.data_ptr() for _, m, _ in chosen}
    others = {p.data_ptr() for n, p in model.named_parameters(remove_duplicate=False)
              if p.data_ptr() in chosen_ptrs and not any(n == f"{name}.weight" for name, _, _ in chosen)}
    return [t for t in chosen if t[1].weight.data_ptr() not in others]


def group_size_for(group_size: int, in_features: int) -> int:
    """The configured group size, or -1 (per-channel) when it does not divide the input dim."""
    return group_size if group_size != -1 and in_features % group_size == 0 else -1


@register("recipe", "quantize")
class Quantize(Recipe):
    roles = ("model",)
    blocks = {"quant": QuantConfig}
    components = {"quant": (Component("quantizer", "method"),
                            Component("bit_allocator", "allocator", "allocator_params"),
                            Component("quant_transform", "transform", "transform_params"))}
    data_role = "model"  # GPTQ calibration rows
    baseline_role = "model"

    def check(self, cfg: DictConfig, blocks: Blocks) -> list[str]:
        q = blocks["quant"]
        quantizer, storage = registry.contract("quantizer", q.method), quantizers.storage_of(q.method)
        problems = []
        if q.group_size == 0 or q.group_size < -1:
            problems.append(f"quant.group_size: {q.group_size} is not allowed; give a positive number of columns "
                            "(e.g. 128) or -1 for per-channel")
        if q.sym and "sym" not in quantizer.runtime:
            problems.append(f"quant.sym: quantizer {q.method!r} has no symmetric grid; set quant.sym=false")
        problems += _bad_regex(list(q.targets), "quant.targets") + _bad_regex(list(q.ignore), "quant.ignore")
        if q.calib_select != "random" and q.transform is None and "hessian" not in quantizer.runtime:
            problems.append(f"quant.calib_select: {q.calib_select!r} chooses calibration rows, but {q.method!r} "
                            "uses none; choose quant.method=gptq or a quant.transform, or leave calib_select=random")
        if q.allocator is not None:
            problems += self._check_allocator(q, storage)
        elif q.avg_bits is not None:
            problems.append("quant.avg_bits: set, but no quant.allocator distributes it; "
                            "set quant.allocator=lieq|nsds|uniform or remove avg_bits")
        if q.export == "compressed_tensors":
            from recipes.quantize.export import available

            packable = sorted(n for n in registry.names("quantizer") if quantizers.storage_of(n).packable)
            if not storage.packable:
                problems.append(f"quant.export: compressed_tensors stores integer grids ({', '.join(packable)}); "
                                f"{q.method!r} cannot be packed exactly; use quant.export=none")
            elif not available():
                problems.append("quant.export: compressed_tensors needs the compressed-tensors package; "
                                "pip install -e '.[quant]'")
            transform = registry.get("quant_transform", q.transform) if q.transform is not None else None
            if transform is not None and not getattr(transform, "exportable", False):
                problems.append(f"quant.export: transform {q.transform!r} changes more than the integer grids "
                                "(scales, biases); use quant.export=none")
        return problems

    @staticmethod
    def _check_allocator(q, storage) -> list[str]:
        problems = []
        if storage.code_bits is not None:
            problems.append(f"quant.allocator: quantizer {q.method!r} has a fixed code size; it cannot take per-layer bits")
        choices = list(q.bit_choices)
        bad = [b for b in choices if not 1 <= b <= 8]
        if not choices or bad:
            problems.append(f"quant.bit_choices: {choices} must be a non-empty list of bits in 1..8")
        elif q.avg_bits is None:
            problems.append(f"quant.avg_bits: the allocator needs a budget in [{min(choices)}, {max(choices)}] "
                            "(mean code bits per weight)")
        elif not min(choices) <= q.avg_bits <= max(choices):
            problems.append(f"quant.avg_bits: {q.avg_bits} is outside the bit choices' range "
                            f"[{min(choices)}, {max(choices)}]")
        return problems

    def run(self, cfg: DictConfig, ctx: RunContext) -> RecipeResult:
        q, params = ctx.blocks["quant"], ctx.blocks.params["quant"]
        quantize = registry.get("quantizer", q.method)
        quantizer = registry.contract("quantizer", q.method)
        storage = quantizers.storage_of(q.method)
        model, tokenizer = ctx.load_model("model")
        model.eval()
        targets = select_targets(model, q)
        if not targets:
            raise ConfigError("quant.targets/quant.ignore: no decoder linear layer of the model is left to quantize")
        layer_bits, scores = self._allocate(q, targets, ctx)
        meta, grids = {}, {}

        def quantize_weight(module: torch.nn.Linear, layer: int, weight: torch.Tensor, hessian=None):
            """(dequantized weight, its grid or None) of `weight` at the module's bits and group size."""
            kwargs = dict(params)
            if "sym" in quantizer.runtime:
                kwargs["sym"] = q.sym
            if hessian is not None:
                kwargs["hessian"] = hessian
            grid = {} if q.export != "none" else None
            if grid is not None:
                kwargs["grid"] = grid
            g = group_size_for(q.group_size, module.in_features)
            w = quantize(weight, layer_bits.get(layer, q.bits), g, **kwargs)
            return w, grid

        def record(name: str, module: torch.nn.Linear, layer: int, w, reference, grid, rows=None, cols=None) -> None:
            """Write the quantized weight; its error is against `reference` (the original weight, or after a
            transform's exact rescaling, which diag(rows) . diag(cols) undoes to measure in the original basis)."""
            bits, g = layer_bits.get(layer, q.bits), group_size_for(q.group_size, module.in_features)
            module.weight.data.copy_(w.to(module.weight.dtype))
            error = w - reference
            if rows is not None:
                error, reference = error * rows.unsqueeze(1), reference * rows.unsqueeze(1)
            if cols is not None:
                error, reference = error * cols, reference * cols
            if grid is not None:  # the export needs the scales and zeros only; it re-derives the codes
                grids[name] = {"scale": grid["scale"], "zero": grid["zero"]}
            meta[name] = {"layer": layer, "method": q.method,
                          "bits": None if storage.code_bits is not None else bits, "group_size": g, "sym": q.sym,
                          "params": module.weight.numel(),
                          "error_sq": float(error.pow(2).sum()), "norm_sq": float(reference.pow(2).sum()),
                          **storage.accounting(bits, g, module.in_features, q.sym)}

        def quantize_module(name: str, module: torch.nn.Linear, layer: int, hessian=None) -> None:
            original = module.weight.detach().float().cpu().clone()  # the copy_ below would overwrite a view
            w, grid = quantize_weight(module, layer, original, hessian)
            record(name, module, layer, w, original, grid)

        transform = None
        if q.transform is not None:  # its needs of the model are checked before any work
            transform = registry.get("quant_transform", q.transform)(**dict(q.transform_params))
            problems = transform.problems(model) if hasattr(transform, "problems") else []
            if problems:
                raise ConfigError(problems)
        if transform is not None or "hessian" in quantizer.runtime:  # it works on the inputs each layer sees
            rows = calibration_rows(cfg.data, tokenizer, q.calib_samples, q.calib_seqlen, cfg.seed,
                                    select=q.calib_select, pool=q.calib_pool, model=model,
                                    batch_size=q.calib_batch_size)
            ctx.log.info("%s: %d calibration rows of %d tokens from data.source=%s (%s)", q.transform or q.method,
                         len(rows), rows.shape[1], cfg.data.source, q.calib_select)
        transform_stats = {}
        if transform is not None:
            transform_stats = self._transform(model, transform, rows, q, targets, "hessian" in quantizer.runtime,
                                              lambda i: layer_bits.get(i, q.bits), quantize_weight, record)
        elif "hessian" in quantizer.runtime:
            by_layer: dict[int, list] = {}
            for name, module, layer in targets:
                by_layer.setdefault(layer, []).append((name, module))
            modules = {name: (module, layer) for name, module, layer in targets}

            def quantize_layer(i: int, hessians: dict) -> None:
                for name, h in hessians.items():
                    quantize_module(name, modules[name][0], i, hessian=h)

            quantize_sequentially(model, rows, q.calib_batch_size, by_layer, quantize_layer,
                                  desc=f"quantize {q.method}")
        else:
            by_layer = {}
            for name, module, layer in targets:
                by_layer.setdefault(layer, []).append((name, module))
            with progress(f"quantize {q.method}", total=len(by_layer)) as bar:
                for layer, modules in by_layer.items():
                    for name, module in modules:
                        quantize_module(name, module, layer)
                    bar.advance(info=f"layer {layer}")

        summary = summarize(meta, layer_bits, scores)
        if transform is not None:
            settings = dataclasses.asdict(transform) if dataclasses.is_dataclass(transform) else dict(q.transform_params)
            summary["transform"] = {"name": q.transform, "params": settings, "layers": transform_stats}
        per_channel = [n for n, m in meta.items() if m["group_size"] == -1]
        if q.group_size != -1 and per_channel:
            ctx.log.warning("quant.group_size=%d does not divide the input width of %d modules; they use one group "
                            "per row (per-channel), e.g. %s", q.group_size, len(per_channel), per_channel[0])
        ctx.log.info("quantized %d modules with %s: %.3f code bits, %.3f effective bits per weight",
                     len(meta), q.method, summary["code_bits"], summary["effective_bits"])
        result = RecipeResult(model=model, tokenizer=tokenizer, extra={"quant": summary},
            stats={"quant/code_bits": summary["code_bits"], "quant/effective_bits": summary["effective_bits"],
                   "quant/weight_error": summary["weight_error"]})
        if cfg.save_checkpoint:
            result.checkpoint = ctx.save(model, tokenizer, dtype=cfg.model.dtype,
                                         files={"quant_meta.json": json.dumps(summary, indent=2)})
        if q.export == "compressed_tensors" and ctx.is_main_process:
            from recipes.quantize.export import export_packed

            path = export_packed(model, tokenizer, grids, meta, ctx.run_dir / "packed")
            result.extra["quant"]["packed"] = str(path)
            ctx.log.info("packed compressed-tensors checkpoint in %s", path)
        return result

    @staticmethod
    def _transform(model, transform, rows, q, targets, needs_hessian, bits_of, quantize_weight,
                   record) -> dict[str, dict]:
        """Each decoder layer through the transform on its calibration inputs; the targets it leaves
        are quantized after it. Returns what it reported per layer."""
        by_layer: dict[int, dict] = {}
        for name, module, layer in targets:
            by_layer.setdefault(layer, {})[re.sub(r"^.*?layers\.\d+\.", "", name)] = (name, module)
        stats = {}

        def visit(i: int, layer, inputs):
            mods = by_layer.get(i, {})
            step = LayerStep(
                index=i, layer=layer, inputs=inputs, targets={n: m for n, (_, m) in mods.items()}, config=model.config,
                needs_hessian=needs_hessian,
                grid_of=lambda n: (bits_of(i), group_size_for(q.group_size, mods[n][1].in_features), q.sym),
                quantize_weight=lambda n, w, h: quantize_weight(mods[n][1], i, w, h),
                record=lambda n, *args: record(mods[n][0], mods[n][1], i, *args))
            next_inputs = transform(step)
            step.quantize()
            stats[str(i)] = step.stats
            return next_inputs

        transform_layers(model, rows, q.calib_batch_size, visit, desc=f"quantize {q.transform} + {q.method}")
        return stats

    @staticmethod
    def _allocate(q, targets, ctx) -> tuple[dict[int, int], dict[int, float]]:
        if q.allocator is None:
            return {}, {}
        layers: dict[int, dict[str, torch.Tensor]] = {}
        for name, module, layer in targets:
            short = re.sub(r"^.*?layers\.\d+\.", "", name)
            layers.setdefault(layer, {})[short] = module.weight.detach().float().cpu()
        allocate = registry.get("bit_allocator", q.allocator)
        try:
            allocation = allocate(layers, q.avg_bits, list(q.bit_choices), **dict(q.allocator_params))
        except ValueError as exc:  # e.g. manual bits for layers the model does not have
            raise ConfigError(f"quant.allocator_params: {exc}") from exc
        scores = dict(getattr(allocation, "scores", {}))  # a plain {layer: bits} (a plugin's) has none
        ctx.log.info("%s allocation under %.3f bits: %s", q.allocator, q.avg_bits,
                     ", ".join(f"L{i}={b} (score {scores.get(i, 0):.4g})" for i, b in sorted(allocation.items())))
        return dict(allocation), scores


def summarize(meta: dict[str, dict], layer_bits: dict[int, int], scores: dict[int, float]) -> dict:
    """quant_meta.json: per module settings and bits, per layer bits and scores, parameter-weighted means."""
    total = sum(m["params"] for m in meta.values())
    layers = sorted({m["layer"] for m in meta.values()})
    per_layer = {}
    for i in layers:
        mods = [m for m in meta.values() if m["layer"] == i]
        n = sum(m["params"] for m in mods)
        per_layer[str(i)] = {"bits": layer_bits.get(i, mods[0]["bits"]), "score": scores.get(i),
                             "effective_bits": sum(m["effective_bits"] * m["params"] for m in mods) / n}
    return {
        "code_bits": sum(m["code_bits"] * m["params"] for m in meta.values()) / total,
        "effective_bits": sum(m["effective_bits"] * m["params"] for m in meta.values()) / total,
        # ‖W_q - W‖ / ‖W‖ over every quantized weight together (each module's squares are in "modules")
        "weight_error": math.sqrt(sum(m["error_sq"] for m in meta.values()) / sum(m["norm_sq"] for m in meta.values())),
        "quantized_params": total,
        "layers": per_layer,
        "modules": meta,
        "note": "code bits: b per weight (PTQTP: log2 9); effective bits add the scale/zero storage per group; "
                "weight_error is the relative Frobenius error of the quantized weights (error_sq / norm_sq per module)",
    }

