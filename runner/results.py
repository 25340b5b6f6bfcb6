"""The run record, results.json: what a job did, with which code and libraries, on which machine.

Written atomically at the end of every job, also when it fails (`status`: completed, failed,
interrupted). A pipeline writes one for itself and one per step.
"""

from __future__ import annotations

import platform
import socket
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from runner import atomic
from runner.config import to_container
from runner.lock import lock_status

RESULTS = "results.json"
LIBRARIES = ("runner", "torch", "transformers", "accelerate", "lm_eval", "datasets", "peft", "hydra-core",
             "omegaconf", "safetensors", "tokenizers")


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for pkg in LIBRARIES:
        try:
            found[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return found


def git_info() -> dict[str, Any] | None:
    """Commit and dirty flag of the runner checkout (None outside a git checkout)."""
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


def new_record(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """A job's record as it starts: status running, no metrics yet."""
    return {
        "recipe": cfg.get("name"),
        "kind": cfg.get("kind"),
        "status": "running",
        "error": None,
        "checkpoint": None,
        "metrics": {},
        "baseline_metrics": {},
        "eval_command": None,  # the lm_eval CLI command that scores the checkpoint as the eval stage did
        "baseline_eval_command": None,  # the same for the input model
        "baseline_cached": None,  # whether the baseline came from this machine's eval cache (eval.cache)
        "train": None,
        "timings": {},
        "seed": cfg.get("seed"),
        "versions": versions(),
        "environment": lock_status(),
        "git": git_info(),
        "hostname": socket.gethostname(),
        "run_dir": str(run_dir.resolve()),
        "started_at": now(),
        "finished_at": None,
        "config": to_container(cfg),
    }


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write(run_dir: Path, record: dict[str, Any]) -> None:
    atomic.write_json(run_dir / RESULTS, record)


def read(run_dir: Path) -> dict[str, Any] | None:
    """A run folder's record, or None when it has none (or an unreadable one)."""
    import json

    try:
        return json.loads((Path(run_dir) / RESULTS).read_text())
    except (OSError, ValueError):
        return None


def print_summary(cfg: DictConfig, record: dict[str, Any]) -> None:
    """The metrics table (with the baseline beside it), the training line and where things are."""
    from rich.console import Console

    from runner.evaluate import metrics_table

    console = Console() if Console().is_terminal else Console(width=120)
    if record["metrics"]:
        console.print(metrics_table(record["metrics"], record["baseline_metrics"] or None, title=f"{cfg.name}: results"))
    train = record.get("train")
    if train:
        console.print(f"trained {train['steps']} steps, final loss {train['final_loss']:.4f}, "
                      f"{train['tokens_per_s'] / 1000:.1f}k tokens/s")
    console.print(f"results: {Path(record['run_dir']) / RESULTS}"
                  + (f"\ncheckpoint: {record['checkpoint']}" if record["checkpoint"] else ""))
    if record.get("eval_command"):
        console.print(f"lm_eval on the checkpoint: {record['eval_command']['command']}", soft_wrap=True)
