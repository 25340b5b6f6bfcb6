"""Merging checkpoints: model interpolation (MI), Timber, and the classic merges.

Inputs by method (model roles):

- ``interpolate`` (MI): ``instruct`` and ``thinking``; ``lam`` is the Thinking weight;
- ``timber``: ``base`` and ``instruct``;
- ``linear``, ``slerp``: ``models`` (slerp: exactly two; t=0 is the first);
- ``task_arithmetic``, ``ties``, ``dare_linear``, ``dare_ties``: ``models`` and their ``base``.

The ``merge`` block holds the method's parameters beside the recipe's own keys: ``method``,
``layers`` / ``modules`` filters (tensors outside them come from ``outside``), ``donor`` (whose
config, tokenizer and chat template the output takes), ``dtype``, ``max_shard_size``, ``seed``.

With ``merge.acm.enabled`` a task-vector merge (TA, TIES, DARE) takes per-layer coefficients from ACM
(`recipes.merge.acm`): the NMI between the base's and each fine-tuned model's decoder-layer outputs on
calibration rows drawn from the ``data`` config.

    python -m runner recipe=mi_merge merge.lam=0.6
    python -m runner -m recipe=mi_merge merge.lam=0,0.2,0.4,0.5,0.6,0.8,1     # the MI lambda sweep
    python -m runner recipe=acm_ties_merge merge.acm.map=raw
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from omegaconf import DictConfig

from recipes.merge import acm, methods  # noqa: F401  (methods registers the merge methods)
from recipes.merge.engine import (
    MODULE_KINDS,
    Selection,
    SVDCache,
    merge_models,
    parse_layers,
)
from recipes.quantize.calibration import calibration_rows
from runner import registry
from runner.cache import cache_dir
from runner.config import bounds
from runner.errors import ConfigError
from runner.models import check_same_vocab, load_model, load_tokenizer, resolve_model_path
from runner.recipe import Blocks, Component, Recipe, RecipeResult, RunContext
from runner.registry import register
from runner.tensorio import parse_size


@dataclass
class AcmConfig:
    """ACM's per-layer coefficients (arXiv 2505.14009; no public code: estimator and map are [R])."""

    enabled: bool = False
    # lambda_l = lambda (1 - NMI_l) / mean_l(1 - NMI_l), the layers' mean kept at lambda | lambda (1 - NMI_l)
    map: str = field(default="mean", metadata=bounds(choices=acm.MAPS))
    bins: int = field(default=64, metadata=bounds(2))  # equal-width histogram bins per axis
    samples: int = field(default=128, metadata=bounds(1))  # calibration rows from `data` ...
    seqlen: int = field(default=512, metadata=bounds(8))  # ... of this many tokens, no padding
    batch_size: int = field(default=8, metadata=bounds(1))


@dataclass
class MergeConfig:
    """The recipe's own `merge` keys; the method's parameters (lam, density, ...) sit beside them."""

    method: str = "interpolate"
    layers: Optional[str] = None  # e.g. "12-35" or "0-3,8"; tensors outside the decoder layers are then not merged
    modules: Optional[List[str]] = None  # any of attention, mlp, embeddings, norms, lm_head, other
    outside: Optional[str] = None  # role giving the tensors the filters leave out (default: the first input)
    donor: Optional[str] = None  # role giving config/tokenizer/chat template (default: per method)
    dtype: Optional[str] = field(default=None, metadata=bounds(choices=("float32", "bfloat16", "float16")))
    max_shard_size: str = "2GB"
    seed: int = 0
    acm: AcmConfig = field(default_factory=AcmConfig)  # per-layer task-vector coefficients (TA, TIES, DARE)


def acm_methods() -> list[str]:
    """The merge methods ACM can scale: task vectors from a base, with a global coefficient `lam`."""
    return [n for n in registry.names("merge_method")
            if (c := registry.contract("merge_method", n)).inputs is not None and c.inputs.base is not None
            and c.inputs.roles == ("models",) and "lam" in c.params]


@register("recipe", "merge")
class Merge(Recipe):
    optional_roles = ("base", "instruct", "thinking", "models")
    blocks = {"merge": MergeConfig}
    components = {"merge": (Component("merge_method", "method"),)}

    def uses(self, cfg: DictConfig) -> set[str]:
        method = cfg.merge.get("method", MergeConfig.method)
        inputs = registry.contract("merge_method", method).inputs if method in registry.names("merge_method") else None
        if inputs is None:
            return super().uses(cfg)
        return {*inputs.roles, *([inputs.base] if inputs.base else [])}

    def check(self, cfg: DictConfig, blocks: Blocks) -> list[str]:
        m = blocks["merge"]
        inputs = registry.contract("merge_method", m.method).inputs
        if inputs is None:
            return [f"merge.method: {m.method!r} declares no model inputs, so it is not a merge of its own"]
        problems = []
        roles, base = inputs.roles, inputs.base
        needed = [r for r in roles if r != "models"] + ([base] if base else [])
        problems += [f"{r}: merge.method={m.method} needs a {r!r} model ({r}.path=...)" for r in needed if cfg.get(r) is None]
        n_models = len(cfg.get("models") or [])
        if "models" in roles:
            least, most = inputs.models
            if n_models < least or (most is not None and n_models > most):
                need = f"exactly {least}" if least == most else f"at least {least}"
                problems.append(f"models: merge.method={m.method} needs {need} models, got {n_models}")
            weights = blocks.params["merge"].get("weights")
            if isinstance(weights, list) and len(weights) != n_models:
                problems.append(f"merge.weights: {len(weights)} weights for {n_models} models")
        elif n_models:
            problems.append(f"models: merge.method={m.method} takes its inputs from {', '.join(roles)}, not a list")
        used = set(needed) | ({"models"} if "models" in roles else set())
        for role in ("base", "instruct", "thinking"):
            if cfg.get(role) is not None and role not in used:
                problems.append(f"{role}: set, but merge.method={m.method} does not use it")
        for key in ("outside", "donor"):
            value = m.get(key)
            index = re.fullmatch(r"models\[(\d+)\]", value or "")
            if value is None or value in used or (index and "models" in used and int(index.group(1)) < n_models):
                continue
            choices = sorted(used - {"models"}) + ([f"models[0..{n_models - 1}]"] if "models" in used else [])
            problems.append(f"merge.{key}: {value!r} is not one of this merge's inputs ({', '.join(choices)})")
        try:
            parse_size(m.max_shard_size)
        except ConfigError:
            problems.append(f"merge.max_shard_size: {m.max_shard_size!r} is not a size like 2GB, 500MB or 1073741824")
        try:
            parse_layers(m.layers)
        except ConfigError as exc:
            problems += exc.problems
        bad = [x for x in (m.modules or []) if x not in MODULE_KINDS]
        if bad:
            problems.append(f"merge.modules: {bad} not allowed; choose from {', '.join(MODULE_KINDS)}")
        if m.acm.enabled:
            problems += self._check_acm(cfg, m)
        return problems

    @staticmethod
    def _check_acm(cfg: DictConfig, m) -> list[str]:
        from runner.data import check_data_spec

        scalable = acm_methods()
        if m.method not in scalable:
            return [f"merge.acm.enabled: ACM sets per-layer coefficients of task vectors; merge.method={m.method} "
                    f"merges none. Use one of {', '.join(scalable)}"]
        return check_data_spec(cfg.data)  # the calibration rows come from the data config

    def writes_checkpoint(self, cfg: DictConfig) -> bool:
        return True  # the merged model is the whole output, written whatever save_checkpoint says

    def baseline_for(self, cfg: DictConfig) -> str | None:
        # MI and Timber are judged against Instruct, their backbone; list merges have no single baseline
        return "instruct" if cfg.merge.method in ("interpolate", "timber") else None

    def run(self, cfg: DictConfig, ctx: RunContext) -> RecipeResult:
        m = ctx.blocks["merge"]
        inputs = registry.contract("merge_method", m.method).inputs
        roles, base_role = inputs.roles, inputs.base
        paths = self._paths(cfg)
        tensors_from = paths["models"] if roles == ("models",) else [paths[r] for r in roles]
        base = paths[base_role] if base_role else None
        first_role = "models[0]" if roles == ("models",) else roles[0]
        outside = self._role_path(m.outside or first_role, paths)
        donor = self._role_path(m.donor or inputs.donor or first_role, paths)
        selection = Selection(parse_layers(m.layers), tuple(m.modules) if m.modules else None)
        svd_cache = None
        runtime = registry.contract("merge_method", m.method).runtime
        if "svd_cache" in runtime:
            svd_cache = SVDCache(cache_dir() / "svd")
        out = ctx.run_dir / "checkpoint"
        if ctx.is_main_process:
            scales, acm_stats = self._acm(cfg, ctx) if m.acm.enabled else (None, None)
            stats = merge_models(tensors_from, base, registry.get("merge_method", m.method), ctx.blocks.params["merge"], out,
                                 selection=selection, outside=outside, donor=donor, dtype=m.dtype,
                                 max_shard_size=m.max_shard_size, seed=m.seed, svd_cache=svd_cache, runtime=runtime,
                                 task_vector_scales=scales)
            if acm_stats:
                stats["acm"] = acm_stats
        else:
            stats = {}
        ctx.accelerator.wait_for_everyone()
        return RecipeResult(checkpoint=out, extra={"merge": {"method": m.method, **stats}})

    @staticmethod
    def _acm(cfg: DictConfig, ctx: RunContext) -> tuple[dict[int, list[float]], dict]:
        """ACM's per-layer factors lambda_l / lambda of each model's task vector, and what to record of them."""
        m, params = ctx.blocks["merge"], ctx.blocks.params["merge"]
        a = m.acm

        def tokenizer_of(spec):
            return load_tokenizer(resolve_model_path(spec), trust_remote_code=spec.trust_remote_code,
                                  revision=spec.revision)

        tokenizer = tokenizer_of(cfg.base)
        for i, spec in enumerate(cfg.models):  # each pair must see the same tokens
            check_same_vocab(tokenizer, tokenizer_of(spec), "base", f"models[{i}]")
        rows = calibration_rows(cfg.data, tokenizer, a.samples, a.seqlen, cfg.seed)
        ctx.log.info("acm: %d calibration rows of %d tokens from data.source=%s", len(rows), rows.shape[1],
                     cfg.data.source)
        base_model, _ = ctx.load_model("base")
        base_model.eval()
        nmi = []
        for spec in cfg.models:  # one fine-tuned model in memory at a time, beside the base
            tuned, _ = load_model(spec, device=ctx.accelerator.device)
            nmi.append(acm.layer_nmi(base_model, tuned.eval(), rows, a.batch_size, a.bins))
            del tuned
        del base_model
        factors = [acm.ratios(n, a.map) for n in nmi]
        lam = params.get("lam", registry.contract("merge_method", m.method).params["lam"].default)
        names = [f"models[{i}]" for i in range(len(nmi))]
        record = {"map": a.map, "bins": a.bins, "rows": len(rows), "seqlen": int(rows.shape[1]),
                  "nmi": dict(zip(names, nmi)), "lam": {n: [lam * f for f in fs] for n, fs in zip(names, factors)}}
        for name, n, fs in zip(names, nmi, factors):
            ctx.log.info("acm %s: NMI per layer %s -> lambda_l %s", name, [round(v, 4) for v in n],
                         [round(lam * f, 4) for f in fs])
        return {layer: [fs[layer] for fs in factors] for layer in range(len(nmi[0]))}, record

    @staticmethod
    def _paths(cfg: DictConfig) -> dict:
        paths = {r: Path(resolve_model_path(cfg[r])) for r in ("base", "instruct", "thinking") if cfg.get(r) is not None}
        paths["models"] = [Path(resolve_model_path(spec)) for spec in cfg.get("models") or []]
        return paths

    @staticmethod
    def _role_path(role: str, paths: dict) -> Path:
        if role.startswith("models["):
            return paths["models"][int(role[len("models["):-1])]
        return paths[role]
