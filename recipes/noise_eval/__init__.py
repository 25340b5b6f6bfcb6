"""Accuracy under memristor non-idealities: perturb the decoder's linear weights, evaluate, repeat.

For every value of the swept noise parameter (``noise.param`` of ``noise.model``) and every seed in
``noise.seeds``, the clean weights (an fp32 CPU copy taken once) are perturbed afresh, the model is
evaluated through the same lm-eval stage as every other recipe, and the weights are restored exactly.
Noise is seeded per module from (seed, module name, copy), so results do not depend on module
order. Embeddings, norms and lm_head stay digital. Strategies:

- module redundancy: the `noise.redundancy` layer range (``shallow``, ``middle`` or ``deep``, k =
  ``redundancy_k`` layers, default ceil(L / 4)) is programmed as r = ``redundancy_r`` independent
  noisy copies whose outputs are averaged, i.e. the mean noisy weight, with read noise / sqrt(r);
  the three ranges cost the same extra area;
- thinking on/off and few-shot on/off go through the eval stage (``eval.enable_thinking``,
  ``eval.num_fewshot``).

No checkpoint is written (``noise.save_trials=true`` writes every noisy model); results.json holds the curve (mean and std per value, every trial) and
``metrics`` flattens it as ``<task>/<metric>@<param>=<value>`` (mean) and ``...:std``.

    python -m runner recipe=memristor_noise
    python -m runner -m recipe=noise_redundancy noise.redundancy=none,shallow,middle,deep
"""

from __future__ import annotations

import hashlib
import math
import statistics
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from omegaconf import DictConfig

# importing the noise module registers the noise models
from recipes.noise_eval.noise import ReadNoise
from runner import registry
from runner.config import bounds, limits, range_problem
from runner.models import decoder_linears
from runner.progress import progress
from runner.recipe import Blocks, Component, Recipe, RecipeResult, RunContext
from runner.registry import register


@dataclass
class NoiseConfig:
    """The recipe's own `noise` keys; the model's fixed parameters (per_row, sa1_share, ...) sit beside them."""

    model: str = "prog_max"
    param: str = "sigma"  # the model parameter that `sweep` runs over
    sweep: List[float] = field(default_factory=lambda: [0.0, 0.01, 0.02, 0.05])  # the values of `param`
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2])
    read_sigma: float = field(default=0.0, metadata=bounds(0))  # output-referred read noise, every forward
    redundancy: str = field(default="none", metadata=bounds(choices=("none", "shallow", "middle", "deep")))
    redundancy_k: Optional[int] = field(default=None, metadata=bounds(1))  # layers in the range; default ceil(L/4)
    redundancy_r: int = field(default=2, metadata=bounds(1))  # noisy copies averaged
    save_trials: bool = False  # also write each noisy model as a checkpoint (trials/<param>=<value>/seed<s>)


def redundant_layers(where: str, n_layers: int, k: int | None) -> set[int]:
    """The layer range that gets redundant copies: the first, middle or last k of n_layers."""
    if where == "none":
        return set()
    k = min(n_layers, k or math.ceil(n_layers / 4))
    start = {"shallow": 0, "middle": (n_layers - k) // 2, "deep": n_layers - k}[where]
    return set(range(start, start + k))


def generator_for(seed: int, *parts) -> torch.Generator:
    digest = hashlib.sha256(":".join(map(str, (seed, *parts))).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def apply_noise(targets, clean: dict, perturb, params: dict, seed: int, redundant: set[int], copies: int,
                read_sigma: float) -> list:
    """Write noisy weights into `targets` (from the clean copies); returns the read-noise hook handles."""
    hooks = []
    for name, module, layer in targets:
        r = copies if layer in redundant else 1
        w = clean[name]
        noisy = sum(perturb(w, generator_for(seed, name, c), **params) for c in range(r)) / r
        module.weight.data.copy_(noisy.to(module.weight.dtype))
        if read_sigma > 0:  # averaging r reads divides independent read noise by sqrt(r)
            hooks.append(module.register_forward_hook(ReadNoise(read_sigma / math.sqrt(r),
                                                                generator_for(seed, name, "read"))))
    return hooks


def restore(targets, clean: dict) -> None:
    for name, module, _ in targets:
        module.weight.data.copy_(clean[name].to(module.weight.dtype))


@register("recipe", "noise_eval")
class NoiseEval(Recipe):
    roles = ("model",)
    blocks = {"noise": NoiseConfig}
    components = {"noise": (Component("noise_model", "model"),)}
    baseline_role = "model"

    def writes_checkpoint(self, cfg: DictConfig) -> bool:
        return False  # it measures; noise.save_trials writes many noisy models, none of them "the" output

    def supplied(self, block: str, typed: DictConfig) -> dict[str, str]:
        return {typed.param: "noise.param"} if block == "noise" else {}  # the swept one: its values are noise.sweep

    def check(self, cfg: DictConfig, blocks: Blocks) -> list[str]:
        n, params = blocks["noise"], blocks.params["noise"]
        problems = []
        if not n.sweep:
            problems.append("noise.sweep: empty; give the levels to sweep, e.g. [0, 0.01, 0.02]")
        if not n.seeds:
            problems.append("noise.seeds: empty; give at least one seed (3 or more for error bars)")
        swept = registry.contract("noise_model", n.model).params[n.param]
        if n.param in params:
            problems.append(f"noise.{n.param}: set, but it is the swept parameter (noise.param); give its values in noise.sweep")
        else:
            bad = [v for v in n.sweep if range_problem("", v, swept.lo, swept.hi, swept.lo_open)]  # floats: levels are checked below
            if bad:
                problems.append(f"noise.sweep: {bad} out of range for {n.param}; it must be "
                                f"{limits(swept.lo, swept.hi, swept.lo_open)}")
            if n.param == "levels" and any(float(v) != int(v) for v in n.sweep):
                problems.append(f"noise.sweep: {[v for v in n.sweep if float(v) != int(v)]} are not whole numbers of levels")
        if not cfg.eval.tasks:
            problems.append("eval.tasks: empty; noise-eval measures accuracy, so it needs tasks (e.g. eval=toy_quick)")
        return problems

    def run(self, cfg: DictConfig, ctx: RunContext) -> RecipeResult:
        from runner.evaluate import evaluate

        n, params = ctx.blocks["noise"], ctx.blocks.params["noise"]
        perturb = registry.get("noise_model", n.model)
        model, tokenizer = ctx.load_model("model")
        model.eval()
        targets = decoder_linears(model)
        clean = {name: module.weight.detach().to("cpu", torch.float32).clone() for name, module, _ in targets}
        n_layers = 1 + max(layer for _, _, layer in targets)
        redundant = redundant_layers(n.redundancy, n_layers, n.redundancy_k)
        if n.redundancy == "middle" and redundant == redundant_layers("shallow", n_layers, n.redundancy_k):
            ctx.log.warning("note: with %d decoder layers the middle range is the shallow one", n_layers)
        ctx.log.info("noise %s over %s=%s, seeds %s, on %d linear layers (%d decoder layers; redundant: %s)",
                     n.model, n.param, list(n.sweep), list(n.seeds), len(targets), n_layers, sorted(redundant) or "none")
        trials = []
        with progress(f"noise {n.model}", total=len(n.sweep) * len(n.seeds)) as bar:
            for value in n.sweep:
                for seed in n.seeds:
                    bar.update(info=f"{n.param}={value} seed {seed}")
                    hooks = apply_noise(targets, clean, perturb, {**params, n.param: value}, seed, redundant,
                                        n.redundancy_r, n.read_sigma)
                    try:
                        if n.save_trials:
                            ctx.save(model, tokenizer, name=f"trials/{n.param}={value}/seed{seed}")
                        metrics = evaluate(model, tokenizer, cfg.eval,
                                           ctx.run_dir / "eval" / f"{n.param}={value}" / f"seed{seed}",
                                           label=f"{n.param}={value} seed {seed}").metrics
                    finally:
                        for h in hooks:
                            h.remove()
                        restore(targets, clean)
                    trials.append({"value": value, "seed": seed, "metrics": metrics})
                    bar.advance()
        curve = aggregate(trials)
        if ctx.is_main_process:
            self._write_curve(n, curve, ctx)
        flat = {}
        for point in curve:
            for metric, mean in point["mean"].items():
                flat[f"{metric}@{n.param}={point['value']}"] = mean
                flat[f"{metric}@{n.param}={point['value']}:std"] = point["std"][metric]
        return RecipeResult(metrics=flat, extra={"noise": {
            "model": n.model, "param": n.param, "params": params, "read_sigma": n.read_sigma,
            "redundancy": {"layers": n.redundancy, "range": sorted(redundant), "copies": n.redundancy_r},
            "curve": curve, "trials": trials}})


    @staticmethod
    def _write_curve(n, curve: list[dict], ctx: RunContext) -> None:
        """noise_curve.md and noise_curve.png (exact-match metrics, mean ± std) in the run folder."""
        from runner.report import curve_metrics, curve_plot, curve_rows, markdown

        curves = {n.model: {"param": n.param, "curve": curve}}
        metrics = curve_metrics(curves, "*/exact_match,*/acc")
        table = markdown(*curve_rows(curves, metrics))
        (ctx.run_dir / "noise_curve.md").write_text(table)
        curve_plot(curves, metrics, ctx.run_dir / "noise_curve.png")
        ctx.log.info("accuracy vs %s (mean ± std over %d seeds):\n%s", n.param, len(n.seeds), table)


def aggregate(trials: list[dict]) -> list[dict]:
    """Mean and sample std (0 for one seed) of every metric per value, in the order the values came."""
    curve = []
    for value in dict.fromkeys(t["value"] for t in trials):
        runs = [t["metrics"] for t in trials if t["value"] == value]
        names = sorted(set().union(*runs))
        mean = {m: statistics.fmean(r[m] for r in runs if m in r) for m in names}
        std = {m: statistics.stdev([r[m] for r in runs if m in r]) if sum(m in r for r in runs) > 1 else 0.0
               for m in names}
        curve.append({"value": value, "mean": mean, "std": std, "seeds": len(runs)})
    return curve
