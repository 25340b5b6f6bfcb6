"""One job: validate -> seed -> resolve resume -> baseline eval -> recipe -> eval stage -> results.json.

`run(cfg, run_dir)` is the whole job and is what tests call; `runner.__main__` is a thin Hydra
wrapper around it. Every problem a user can cause is found by `validate` before any model is
loaded; whatever happens afterwards, `results.json` is written (atomically) with the status.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import platform
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from runner import registry
from runner.config import (
    ROLES,
    RunConfig,
    check_fields,
    check_roles,
    check_top_level,
    check_unused_blocks,
    raise_if,
    to_container,
)
from runner.errors import ConfigError, RunnerError
from runner.lock import lock_status
from runner.recipe import Recipe, RecipeResult, RunContext

log = logging.getLogger("runner")

RESULTS = "results.json"
# Keys that do not change what a run computes, left out of the resume fingerprint.
_NOT_FINGERPRINTED = ("eval", "output_root")


# --------------------------------------------------------------------------------------------
# Validation


def import_components(plugins: list[str]) -> None:
    """Import the `recipes` package (which registers every recipe and component) and user plugins."""
    importlib.import_module("recipes")
    for name in plugins:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(f"plugins: cannot import {name!r} ({exc})") from None


def validate(cfg: DictConfig, *, pending: tuple[str, ...] = ()) -> Recipe:
    """The recipe to run, after checking the whole config; raises one ConfigError listing every problem.

    `pending` names model roles (``model``, ``models[1]``) whose checkpoint an earlier pipeline step
    has yet to write: their paths are not checked.
    """
    from runner.data import check_data_spec
    from runner.evaluate import check_eval_spec
    from runner.models import check_model_spec

    import_components(list(cfg.plugins))
    problems = check_top_level(cfg) + check_fields(cfg, RunConfig, "")
    unknown = registry.check_name("recipe", cfg.kind, key="kind")
    if unknown:
        raise_if(problems + unknown)
    recipe: Recipe = registry.get("recipe", cfg.kind)()
    problems += check_roles(cfg, recipe.roles, recipe.optional_roles, cfg.kind)
    problems += check_unused_blocks(cfg, recipe.blocks, cfg.kind)
    for role in ROLES:
        if cfg.get(role) is not None and role in recipe.roles + recipe.optional_roles and role not in pending:
            problems += check_model_spec(cfg[role], role)
    for i, spec in enumerate(cfg.models or []):
        if f"models[{i}]" not in pending:
            problems += check_model_spec(spec, f"models[{i}]")
    if recipe.uses_data:
        problems += check_data_spec(cfg.data)
    problems += check_eval_spec(cfg.eval)
    problems += _check_resume(cfg)
    problems += recipe.validate(cfg)
    raise_if(problems)
    return recipe


def _check_resume(cfg: DictConfig) -> list[str]:
    value = cfg.train.resume
    if value in ("auto", "never"):
        return []
    if _state_from_path(Path(value).expanduser()) is None:
        return [f"train.resume: {value!r} is not a checkpoint folder (with trainer_state.json) or a run folder "
                "holding one; use auto, never or such a folder"]
    return []


# --------------------------------------------------------------------------------------------
# Resume


def fingerprint(cfg: DictConfig) -> str:
    """A hash of everything that shapes a run's computation (eval and output location excluded)."""
    data = {k: v for k, v in to_container(cfg).items() if k not in _NOT_FINGERPRINTED}
    data.get("train", {}).pop("resume", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _index_file(cfg: DictConfig) -> Path:
    return Path(cfg.output_root).expanduser() / ".index" / f"{fingerprint(cfg)}.json"


def _state_from_path(path: Path) -> Path | None:
    from runner.train import STATE_DIR, find_last_state

    if (path / "trainer_state.json").is_file():
        return path
    return find_last_state(path / STATE_DIR)


def find_resume(cfg: DictConfig, run_dir: Path) -> Path | None:
    """The checkpoint to resume from: the last one of an unfinished earlier run of the same config."""
    value = cfg.train.resume
    if value == "never":
        return None
    if value != "auto":
        return _state_from_path(Path(value).expanduser())
    index = _index_file(cfg)
    if not index.is_file():
        return None
    previous = Path(json.loads(index.read_text())["run_dir"])
    if previous.resolve() == run_dir.resolve():
        return None
    status = _read_status(previous)
    if status == "completed":
        return None
    return _state_from_path(previous)


def _read_status(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / RESULTS).read_text()).get("status")
    except (OSError, json.JSONDecodeError):
        return None


def _comparable(config: Any) -> Any:
    """A config as JSON would store it, without the keys that do not change a run's outputs."""
    data = json.loads(json.dumps(config, default=str))
    data.pop("output_root", None)
    data.get("train", {}).pop("resume", None)
    return data


def find_completed(cfg: DictConfig) -> dict[str, Any] | None:
    """The results of the last run of exactly this config (eval included) if it completed and its
    checkpoint is still there; None otherwise. Pipelines reuse such a run instead of repeating it."""
    index = _index_file(cfg)
    try:
        previous = Path(json.loads(index.read_text())["run_dir"])
        results = json.loads((previous / RESULTS).read_text())
    except (OSError, KeyError, json.JSONDecodeError):
        return None
    if results.get("status") != "completed" or _comparable(results.get("config")) != _comparable(to_container(cfg)):
        return None
    if results.get("checkpoint") and not Path(results["checkpoint"]).is_dir():
        return None
    return results


def _record_in_index(cfg: DictConfig, run_dir: Path) -> None:
    index = _index_file(cfg)
    index.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(index, {"run_dir": str(run_dir.resolve()), "name": cfg.name})


# --------------------------------------------------------------------------------------------
# results.json


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for pkg in ("runner", "torch", "transformers", "accelerate", "lm_eval", "datasets", "peft", "hydra-core",
                "omegaconf", "safetensors", "tokenizers"):
        try:
            found[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return found


def git_info() -> dict[str, Any] | None:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


def _new_results(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    return {
        "recipe": cfg.get("name"),
        "kind": cfg.get("kind"),
        "status": "running",
        "error": None,
        "checkpoint": None,
        "metrics": {},
        "baseline_metrics": {},
        "train": None,
        "timings": {},
        "seed": cfg.get("seed"),
        "versions": versions(),
        "environment": lock_status(),
        "git": git_info(),
        "hostname": socket.gethostname(),
        "run_dir": str(run_dir.resolve()),
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "finished_at": None,
        "config": to_container(cfg),
    }


# --------------------------------------------------------------------------------------------
# The job


def run(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Run one job in `run_dir`; returns the results (also written to run_dir/results.json).

    Raises RunnerError subclasses for user errors and failed training, after recording them.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    results = _new_results(cfg, run_dir)
    timings = results["timings"]
    t_start = time.perf_counter()
    main_process = True
    try:
        t = time.perf_counter()
        recipe = validate(cfg)
        timings["validate_s"] = round(time.perf_counter() - t, 3)

        from accelerate.utils import set_seed

        from runner.train import reset_accelerator_state

        reset_accelerator_state()  # an earlier job of this process (multirun) may have configured it
        set_seed(cfg.seed)
        ctx = RunContext(cfg=cfg, run_dir=run_dir, resume_from=find_resume(cfg, run_dir))
        main_process = ctx.is_main_process
        if not main_process:
            logging.getLogger().setLevel(logging.WARNING)
        if main_process:
            _record_in_index(cfg, run_dir)
        if ctx.resume_from:
            log.info("resuming from %s", ctx.resume_from)

        baseline_role = recipe.baseline_for(cfg)
        if cfg.eval.tasks and cfg.eval.baseline and baseline_role and main_process:
            t = time.perf_counter()
            results["baseline_metrics"] = _evaluate_role(ctx, baseline_role)
            timings["baseline_eval_s"] = round(time.perf_counter() - t, 3)

        t = time.perf_counter()
        out: RecipeResult = recipe.run(cfg, ctx)
        timings["recipe_s"] = round(time.perf_counter() - t, 3)
        results["checkpoint"] = str(out.checkpoint.resolve()) if out.checkpoint else None
        results["train"] = out.train.summary() if out.train else None
        results.update(out.extra)

        if out.metrics is not None:
            results["metrics"] = out.metrics
        elif cfg.eval.tasks and main_process and (out.model is not None or out.checkpoint is not None):
            t = time.perf_counter()
            results["metrics"] = _evaluate_output(ctx, out)
            timings["eval_s"] = round(time.perf_counter() - t, 3)
        if out.stats:
            results["metrics"] = {**out.stats, **(results.get("metrics") or {})}
        results["status"] = "completed"
        if main_process:
            _print_summary(cfg, results)
        return results
    except KeyboardInterrupt:
        results["status"] = "interrupted"
        results["error"] = "interrupted (KeyboardInterrupt)"
        raise
    except RunnerError as exc:
        results["status"] = "failed"
        results["error"] = str(exc)
        results.update(exc.extra or {})  # what a failed recipe still has to report (a pipeline's finished steps)
        raise
    except BaseException as exc:
        results["status"] = "failed"
        results["error"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        timings["total_s"] = round(time.perf_counter() - t_start, 3)
        results["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        if main_process:
            write_json_atomic(run_dir / RESULTS, results)


def _evaluate_role(ctx: RunContext, role: str) -> dict[str, float]:
    from runner.evaluate import evaluate

    model, tokenizer = ctx.load_model(role)
    metrics = evaluate(model, tokenizer, ctx.cfg.eval, ctx.run_dir / "eval" / "baseline", label=f"{role} (baseline)").metrics
    del model
    return metrics


def _evaluate_output(ctx: RunContext, out: RecipeResult) -> dict[str, float]:
    from accelerate.utils import DistributedType

    from runner.evaluate import evaluate
    from runner.models import load_model

    # an FSDP-sharded model cannot run on the main process alone: evaluate its gathered checkpoint
    sharded = ctx.accelerator.distributed_type == DistributedType.FSDP
    if sharded and out.checkpoint is None:
        log.warning("not evaluated: under FSDP the result is evaluated from its checkpoint; save_checkpoint=false wrote none")
        return {}
    if out.model is not None and not sharded:
        model, tokenizer = ctx.accelerator.unwrap_model(out.model), out.tokenizer
    else:
        model, tokenizer = load_model({"path": str(out.checkpoint)}, device=ctx.accelerator.device)
    return evaluate(model, tokenizer, ctx.cfg.eval, ctx.run_dir / "eval" / "final", label="result").metrics


def _print_summary(cfg: DictConfig, results: dict[str, Any]) -> None:
    from rich.console import Console

    from runner.evaluate import metrics_table

    console = Console() if Console().is_terminal else Console(width=120)
    if results["metrics"]:
        console.print(metrics_table(results["metrics"], results["baseline_metrics"] or None, title=f"{cfg.name}: results"))
    train = results.get("train")
    if train:
        console.print(f"trained {train['steps']} steps, final loss {train['final_loss']:.4f}, "
                      f"{train['tokens_per_s'] / 1000:.1f}k tokens/s")
    console.print(f"results: {Path(results['run_dir']) / RESULTS}"
                  + (f"\ncheckpoint: {results['checkpoint']}" if results["checkpoint"] else ""))


def main_job(cfg: DictConfig) -> dict[str, Any] | None:
    """The Hydra task function's body: run in Hydra's output folder, report errors without a traceback."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    quiet_libraries()
    try:
        return run(cfg, hydra_cfg.runtime.output_dir)
    except RunnerError as exc:
        log.error("%s", exc)
        print(f"error: {exc}", file=sys.stderr)
        if multirun:
            return None  # the sweep goes on; its summary reports this job as failed
        sys.exit(2 if isinstance(exc, ConfigError) else 1)


def _not_custom_kwargs_note(record: logging.LogRecord) -> bool:
    # lm-eval warns on every task with a custom dataset loader, which every toy task has
    return "Custom kwargs" not in record.getMessage()


def quiet_libraries() -> None:
    """Keep the console to the runner's own lines: library progress bars and INFO chatter off."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_warning()
    for name in ("lm_eval", "lm-eval", "datasets", "accelerate", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.WARNING)
    task_log = logging.getLogger("lm_eval.api.task")
    if _not_custom_kwargs_note not in task_log.filters:
        task_log.addFilter(_not_custom_kwargs_note)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    try:
        import datasets

        datasets.disable_progress_bars()
    except Exception:
        pass
