"""Pipelines: one config chains named recipes, each step's checkpoint feeding the next.

    python -m runner recipe=sft_noise_pipeline

``pipeline.steps`` is a list of ``{recipe: <named recipe in conf/recipe>, overrides: [...], feed: <role>,
name: <folder label>}``. A step's config is composed from conf/ as ``python -m runner recipe=<recipe>
<pipeline.overrides> <overrides>`` would (with the pipeline's seed, plugins, output_root and verbose), and the
previous step's checkpoint goes into its `feed` role (``model``, ``student``, ``base``, ``models[1]``...).
Every step is composed and validated before the first one starts. Steps run through `runner.run.run`
in ``<run_dir>/steps/<i>-<name>/``, each with its own results.json; the pipeline's results.json lists
them under ``steps`` and takes the last step's checkpoint and metrics as its own. A pipeline is job
orchestration, not a recipe: `runner.cli` runs it with `run_pipeline` (``kind: pipeline``).

A step whose exact config (eval included; output_root, verbose and train.resume aside) has already completed
under the same output_root, in an earlier pipeline or as a plain run, is reused instead of run again
(``reused: true``); an interrupted step resumes from its last checkpoint like any run.
``pipeline.reuse=false`` runs every step afresh.
"""

from __future__ import annotations

import logging
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List

from omegaconf import DictConfig, OmegaConf

from runner import registry, results
from runner.compose import compose_job, composition_error, recipe_names
from runner.config import (
    ROLES,
    RunConfig,
    check_fields,
    check_roles,
    check_top_level,
    check_unused_blocks,
    check_block,
    method_block,
    raise_if,
    to_container,
)
from runner.errors import ConfigError, RunnerError
from runner.recipe import Recipe
from runner.registry import did_you_mean
from runner.resume import find_completed
from runner.run import run, validate

log = logging.getLogger("runner")

STEP_KEYS = ("recipe", "overrides", "feed", "name")
_LIST_ROLE = re.compile(r"models\[(\d+)\]")
_LABEL = re.compile(r"[A-Za-z0-9_.-]+")


@dataclass
class PipelineConfig:
    steps: List[Any] = field(default_factory=list)  # {recipe, overrides, feed, name} per step
    overrides: List[str] = field(default_factory=list)  # applied to every step, before the step's own
    reuse: bool = True  # skip a step whose exact config already completed


@dataclass
class Step:
    index: int
    recipe: str  # the named recipe (conf/recipe/<recipe>.yaml)
    overrides: list[str]  # everything composed after recipe=<recipe>
    feed: str | None  # the role that takes the previous step's checkpoint
    label: str  # its folder under steps/
    cfg: DictConfig
    kind: Recipe


class PipelineStepFailed(RunnerError):
    """A step failed; the steps before it completed (and are reused when the same config runs again)."""

    def __init__(self, message: str, step_dir: Path):
        super().__init__(message)
        self.step_dir = step_dir


# --------------------------------------------------------------------------------------------
# Planning: compose and check every step before any runs


def plan(cfg: DictConfig) -> tuple[list[Step], list[str]]:
    """The steps of a pipeline config, composed and validated, and every problem found."""
    registry.import_plugins(list(cfg.plugins))
    problems = check_top_level(cfg) + check_fields(cfg, RunConfig, "")
    problems += check_roles(cfg, (), (), "pipeline") + check_unused_blocks(cfg, ("pipeline",), "pipeline")
    p, _, block_problems = check_block(cfg, "pipeline", PipelineConfig)
    problems += block_problems
    if p is None:
        return [], problems
    raw_steps = (to_container(cfg.pipeline) or {}).get("steps") or []
    if not raw_steps:
        problems.append("pipeline.steps: empty; give the steps, each {recipe: <named recipe>, overrides: [...], "
                        "feed: <model role>} (feed from the second step on)")
    if len(cfg.eval.tasks or []) > 0:
        problems.append("eval.tasks: a pipeline evaluates nothing itself, its steps do; give their eval in "
                        """'pipeline.overrides=["eval=toy_quick"]' or a step's overrides, and keep eval=none""")
    # what every step inherits from the pipeline: its seed and plugins (overridable per step)
    inherited = [f"seed={cfg.seed}"] + ([f"plugins=[{','.join(cfg.plugins)}]"] if cfg.plugins else [])
    shared = inherited + list(p.overrides)
    steps: list[Step] = []
    shared_failed = False
    for i, raw in enumerate(raw_steps):
        step, step_problems, shared_bad = _plan_step(i, raw, shared, cfg)
        if shared_bad:
            if not shared_failed:
                problems.append(f"pipeline.overrides: {shared_bad}")
            shared_failed = True
        problems += step_problems
        if step is not None:
            steps.append(step)
    if not problems:
        problems += _check_chain(steps)
    return steps, problems


def _plan_step(i: int, raw: Any, shared: list[str], cfg: DictConfig) -> tuple[Step | None, list[str], str | None]:
    """(the step, its problems, the message when pipeline.overrides itself fails to compose)."""
    key = f"pipeline.steps[{i}]"
    if not isinstance(raw, dict):
        return None, [f"{key}: {raw!r} is not a step; write {{recipe: <named recipe>, overrides: [...], feed: <role>}}"], None
    problems = [f"{key}.{k}: unknown key.{did_you_mean(k, STEP_KEYS)} Allowed: {', '.join(STEP_KEYS)}"
                for k in raw if k not in STEP_KEYS]
    recipe, overrides, feed = raw.get("recipe"), raw.get("overrides") or [], raw.get("feed")
    names = recipe_names()
    if not recipe:
        problems.append(f"{key}.recipe: missing; name a recipe in conf/recipe ({', '.join(names)})")
    elif not isinstance(recipe, str) or recipe not in names:
        problems.append(f"{key}.recipe: unknown recipe {recipe!r}.{did_you_mean(str(recipe), names)} "
                        f"Named recipes (conf/recipe): {', '.join(names)}")
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        problems.append(f"{key}.overrides: {overrides!r} is not a list of override strings like ['train.steps=100']")
    if i == 0 and feed is not None:
        problems.append(f"{key}.feed: the first step has no earlier checkpoint to take; remove it")
    if i > 0 and not feed:
        problems.append(f"{key}.feed: missing; name the model role of this step that takes the checkpoint of "
                        f"pipeline.steps[{i - 1}] (model, student, base, ... or models[<i>])")
    label = str(raw.get("name") or recipe)
    if raw.get("name") is not None and not _LABEL.fullmatch(label):
        problems.append(f"{key}.name: {label!r} is not a folder name; use letters, digits, '.', '_' and '-'")
    if problems:
        return None, problems, None

    nested = [f"{key}.recipe: {recipe!r} is itself a pipeline; a step is a single recipe"]
    try:
        step_cfg = compose_job([f"recipe={recipe}", *shared, *overrides])
    except Exception as exc:  # Hydra and OmegaConf raise several types; the message names the key
        # which part failed: the recipe (a pipeline takes no model overrides), the shared overrides, or the step's
        if compose_job([f"recipe={recipe}"]).get("kind") == "pipeline":
            return None, nested, None
        try:
            compose_job([f"recipe={recipe}", *shared])
        except Exception as shared_exc:
            return None, [], composition_error(shared_exc)
        return None, [f"{key}.overrides: {composition_error(exc)}"], None
    with _open(step_cfg):
        step_cfg.output_root = cfg.output_root  # one output root: steps share the pipeline's resume index
        step_cfg.verbose = cfg.verbose  # the job's logging, as the pipeline set it
    kind_name = step_cfg.get("kind")
    if kind_name == "pipeline":
        return None, nested, None
    if kind_name not in registry.names("recipe"):
        return None, [f"{key} ({recipe}): " + registry.unknown_name_message("recipe", kind_name, registry.names("recipe"),
                                                                              key="kind")], None
    kind = registry.get("recipe", kind_name)()
    if feed is not None:
        problem = _check_feed(feed, kind, step_cfg, key, recipe)
        if problem:
            return None, [problem], None
        set_feed(step_cfg, feed, f"<checkpoint of pipeline.steps[{i - 1}]>")
    try:
        validate(step_cfg, pending=(feed,) if feed else ())
    except ConfigError as exc:
        return None, [f"{key} ({recipe}): {p}" for p in exc.problems], None
    return Step(i, recipe, [*shared, *overrides], feed, f"{i}-{label}", step_cfg, kind), [], None


def _check_feed(feed: str, kind: Recipe, step_cfg: DictConfig, key: str, recipe: str) -> str | None:
    takes = [*kind.roles, *kind.optional_roles]
    n_models = len(step_cfg.get("models") or [])
    shown = [r for r in takes if r != "models"] + ([f"models[0..{n_models - 1}]"] if "models" in takes and n_models else [])
    where = f"recipe {recipe!r} (kind {step_cfg.kind})"
    m = _LIST_ROLE.fullmatch(str(feed))
    if m:
        if "models" in takes and int(m.group(1)) < n_models:
            return None
    elif feed in ROLES and feed in takes:
        return None
    return (f"{key}.feed: {feed!r} is not a model role of {where}.{did_you_mean(str(feed), shown)} "
            f"It takes: {', '.join(shown) or 'no model'}")


def _check_chain(steps: list[Step]) -> list[str]:
    """Every step that feeds another must leave a checkpoint."""
    return [
        f"pipeline.steps[{a.index}]: recipe {a.recipe!r} (kind {a.cfg.kind}) writes no checkpoint here "
        f"(a measuring recipe, or save_checkpoint=false), so pipeline.steps[{b.index}].feed has nothing to take; "
        "make it the last step or let it save its checkpoint"
        for a, b in zip(steps, steps[1:])
        if not a.kind.writes_checkpoint(a.cfg)
    ]


def set_feed(cfg: DictConfig, feed: str, path: str) -> None:
    """Point role `feed` of a step's config at `path`, keeping the role's other settings (dtype, ...)."""
    m = _LIST_ROLE.fullmatch(feed)
    with _open(cfg):
        if m:
            cfg.models[int(m.group(1))].path = path
        elif cfg.get(feed) is None:
            cfg[feed] = {"path": path}
        else:
            cfg[feed].path = path


@contextmanager
def _open(cfg: DictConfig):
    # composed configs are read-only-ish (struct, sometimes flagged readonly); steps are ours to edit
    readonly = OmegaConf.is_readonly(cfg)
    OmegaConf.set_readonly(cfg, False)
    try:
        yield
    finally:
        OmegaConf.set_readonly(cfg, readonly)


# --------------------------------------------------------------------------------------------
# Running


def validate_pipeline(cfg: DictConfig) -> list[Step]:
    """The planned steps; one ConfigError listing every problem of the pipeline and its steps."""
    steps, problems = plan(cfg)
    raise_if(problems)
    return steps


def run_pipeline(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Plan every step, then run them in order; returns the pipeline's record (also its results.json)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    record = results.new_record(cfg, run_dir)
    record["steps"] = []
    t_start = time.perf_counter()
    main = True
    try:
        steps = validate_pipeline(cfg)
        reuse = method_block(cfg, "pipeline", PipelineConfig).reuse
        main = _is_main_process()
        checkpoint = None
        for step in steps:
            if step.feed:
                set_feed(step.cfg, step.feed, checkpoint)
            try:
                step_record, reused = _run_step(step, len(steps), run_dir, reuse, main)
            except PipelineStepFailed as exc:
                failed = results.read(exc.step_dir) or {"status": "failed", "error": str(exc.__cause__)}
                record["steps"].append(_record(step, failed, reused=False))
                raise
            record["steps"].append(_record(step, step_record, reused))
            checkpoint = step_record.get("checkpoint")
        last = record["steps"][-1]
        record.update(status="completed", checkpoint=last["checkpoint"], metrics=dict(last["metrics"]))
        if main:
            results.print_summary(cfg, record)
        return record
    except KeyboardInterrupt:
        record.update(status="interrupted", error="interrupted (KeyboardInterrupt)")
        raise
    except RunnerError as exc:
        record.update(status="failed", error=str(exc))
        raise
    except BaseException as exc:
        record.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        record["timings"]["total_s"] = round(time.perf_counter() - t_start, 3)
        record["finished_at"] = results.now()
        if main:
            results.write(run_dir, record)


def _run_step(step: Step, n: int, run_dir: Path, reuse: bool, main: bool) -> tuple[dict, bool]:
    """(the step's record, whether it was reused); raises PipelineStepFailed naming the step."""
    found = find_completed(step.cfg) if reuse else None
    _barrier()  # every process decides before any starts the step (the step writes what decided it)
    where = f"pipeline step {step.index + 1}/{n} ({step.label})"
    if found is not None:
        log.info("%s: reusing the completed run %s", where, found["run_dir"])
        return found, True
    step_dir = run_dir / "steps" / step.label
    log.info("%s: running in %s", where, step_dir)
    if main:
        _write_hydra_files(step, step_dir)
    try:
        with _step_log(step_dir):
            return run(step.cfg, step_dir), False
    except RunnerError as exc:
        raise PipelineStepFailed(
            f"pipeline.steps[{step.index}] ({step.recipe}) failed: {exc}\n(run folder {step_dir}; "
            "the steps before it completed and are reused when this config runs again)", step_dir) from exc


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _record(step: Step, record: dict, reused: bool) -> dict:
    """What the pipeline's results.json says about one step."""
    return {
        "step": step.index,
        "name": step.label,
        "recipe": step.recipe,
        "kind": step.cfg.kind,
        "feed": step.feed,
        "overrides": step.overrides,
        "status": record.get("status"),
        "reused": reused,
        "error": record.get("error"),
        "run_dir": record.get("run_dir"),
        "checkpoint": record.get("checkpoint"),
        "metrics": record.get("metrics") or {},
        "baseline_metrics": record.get("baseline_metrics") or {},
        "train": record.get("train"),
    }


def _write_hydra_files(step: Step, step_dir: Path) -> None:
    """.hydra/config.yaml and overrides.yaml, as a plain run leaves them (reports read the overrides)."""
    hydra_dir = step_dir / ".hydra"
    hydra_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(step.cfg, hydra_dir / "config.yaml")
    overrides = [f"recipe={step.recipe}", *step.overrides]
    if step.feed:
        overrides.append(f"{step.feed}.path={_feed_path(step)}")
    OmegaConf.save(OmegaConf.create(overrides), hydra_dir / "overrides.yaml")


def _feed_path(step: Step) -> str:
    m = _LIST_ROLE.fullmatch(step.feed or "")
    return step.cfg.models[int(m.group(1))].path if m else step.cfg[step.feed].path


@contextmanager
def _step_log(step_dir: Path):
    """The step's own log file (runner.log, runner.rank1.log, ...) beside the pipeline's."""
    rank = os.environ.get("RANK", "0")
    step_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(step_dir / ("runner.log" if rank == "0" else f"runner.rank{rank}.log"))
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
