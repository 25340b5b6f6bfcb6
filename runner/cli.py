"""The body of ``python -m runner``: one job in Hydra's output folder, errors without a traceback.

A config of ``kind: pipeline`` runs through `runner.pipeline`, any other through `runner.run`.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from runner.errors import ConfigError, RunnerError

log = logging.getLogger("runner")


def validate_job(cfg: DictConfig) -> Any:
    """Every check a job makes before any work (the recipe, or a pipeline's planned steps); raises
    one ConfigError listing every problem."""
    if cfg.get("kind") == "pipeline":
        from runner.pipeline import validate_pipeline

        return validate_pipeline(cfg)
    from runner.run import validate

    return validate(cfg)


def run_job(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """A recipe run or a pipeline, by the config's kind; returns the job's record."""
    if cfg.get("kind") == "pipeline":
        from runner.pipeline import run_pipeline

        return run_pipeline(cfg, run_dir)
    from runner.run import run

    return run(cfg, run_dir)


def main_job(cfg: DictConfig) -> dict[str, Any] | None:
    """The Hydra task function's body."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    quiet_libraries(verbose=bool(cfg.get("verbose", False)))
    try:
        if multirun:
            left_out = leave_out_unused_roles(cfg)
            if left_out:
                log.warning("note: recipe %s does not take %s; this job runs without %s", cfg.name,
                            ", ".join(left_out), "it" if len(left_out) == 1 else "them")
        return run_job(cfg, hydra_cfg.runtime.output_dir)
    except RunnerError as exc:
        log.error("%s", exc)
        print(f"error: {exc}", file=sys.stderr)
        if multirun:
            return None  # the sweep goes on; its summary reports this job as failed
        sys.exit(2 if isinstance(exc, ConfigError) else 1)


def leave_out_unused_roles(cfg: DictConfig) -> list[str]:
    """Unset the model roles this job's recipe does not take; returns them.

    A sweep across recipes (``-m recipe=shadow_ft,instruct_ft base.path=X``) sets every role for
    every job; each job keeps the ones its recipe reads. A single run keeps them all, so that a role
    set by mistake is an error that names the roles the recipe does take.
    """
    from runner import registry
    from runner.config import ROLES

    registry.import_plugins(list(cfg.plugins))
    if cfg.get("kind") == "pipeline" or cfg.get("kind") not in registry.names("recipe"):
        return []  # a pipeline's steps, and an unknown kind, are reported by validation
    uses = registry.get("recipe", cfg.kind)().uses(cfg)
    left_out = [r for r in (*ROLES, "models") if r not in uses and cfg.get(r)]
    for role in left_out:
        cfg[role] = [] if role == "models" else None
    return left_out


LM_EVAL = ("lm_eval", "lm-eval")  # its logger's name, now and in releases before 0.4.3
LIBRARIES = ("datasets", "accelerate", "huggingface_hub")  # other loggers that reach the run's handlers


def quiet_libraries(verbose: bool = False) -> None:
    """Keep the console and runner.log to the runner's own lines (``verbose=false``, the default).

    Library progress bars are always off (the runner shows its own, `runner.progress`). lm-eval's
    log lines below ERROR are dropped: it warns on every evaluation that the model came as an object
    and that custom task loaders take kwargs. datasets, accelerate and huggingface_hub keep their
    warnings, and transformers its warnings on stderr through its own handler. With `verbose` every
    one of them logs at INFO into the run's handlers (the console and runner.log), transformers too.
    Called once per job; a later job of the same process (a sweep) sets it afresh.
    """
    import transformers

    tf_logging = transformers.utils.logging
    tf_logging.disable_progress_bar()
    if verbose:
        tf_logging.set_verbosity_info()
        tf_logging.disable_default_handler()
        tf_logging.enable_propagation()
    else:
        tf_logging.set_verbosity_warning()
        tf_logging.enable_default_handler()
        tf_logging.disable_propagation()
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    for name in LM_EVAL:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    try:
        import datasets

        datasets.disable_progress_bars()
    except Exception:
        pass
