"""Finding earlier runs of the same config: to resume an unfinished one, or to reuse a completed one.

Each job records itself under ``<output_root>/.index/<fingerprint>.json``; the fingerprint hashes
everything that shapes what a run computes (eval settings and the output location aside).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from runner import atomic, results
from runner.config import to_container

NOT_FINGERPRINTED = ("eval", "output_root", "verbose")  # keys that do not change what a run computes


def fingerprint(cfg: DictConfig) -> str:
    """A hash of everything that shapes a run's computation (eval and output location excluded)."""
    data = {k: v for k, v in to_container(cfg).items() if k not in NOT_FINGERPRINTED}
    data.get("train", {}).pop("resume", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _index_file(cfg: DictConfig) -> Path:
    return Path(cfg.output_root).expanduser() / ".index" / f"{fingerprint(cfg)}.json"


def state_from_path(path: Path) -> Path | None:
    """A training-state folder: `path` itself, or the newest complete one in a run folder."""
    from runner.train import STATE_DIR, find_last_state

    if (path / "trainer_state.json").is_file():
        return path
    return find_last_state(path / STATE_DIR)


def check_resume(cfg: DictConfig) -> list[str]:
    value = cfg.train.resume
    if value in ("auto", "never") or state_from_path(Path(value).expanduser()) is not None:
        return []
    return [f"train.resume: {value!r} is not a checkpoint folder (with trainer_state.json) or a run folder "
            "holding one; use auto, never or such a folder"]


def find_resume(cfg: DictConfig, run_dir: Path) -> Path | None:
    """The checkpoint to resume from: the last one of an unfinished earlier run of the same config."""
    value = cfg.train.resume
    if value == "never":
        return None
    if value != "auto":
        return state_from_path(Path(value).expanduser())
    index = _index_file(cfg)
    if not index.is_file():
        return None
    previous = Path(json.loads(index.read_text())["run_dir"])
    if previous.resolve() == run_dir.resolve():
        return None
    if (results.read(previous) or {}).get("status") == "completed":
        return None
    return state_from_path(previous)


def _comparable(config: Any) -> Any:
    """A config as JSON would store it, without the keys that do not change a run's outputs."""
    data = json.loads(json.dumps(config, default=str))
    data.pop("output_root", None)
    data.pop("verbose", None)
    data.get("train", {}).pop("resume", None)
    return data


def find_completed(cfg: DictConfig) -> dict[str, Any] | None:
    """The record of the last run of exactly this config (eval included) if it completed and its
    checkpoint is still there; None otherwise. Pipelines reuse such a run instead of repeating it."""
    try:
        previous = Path(json.loads(_index_file(cfg).read_text())["run_dir"])
    except (OSError, KeyError, json.JSONDecodeError):
        return None
    record = results.read(previous)
    if record is None or record.get("status") != "completed":
        return None
    if _comparable(record.get("config")) != _comparable(to_container(cfg)):
        return None
    if record.get("checkpoint") and not Path(record["checkpoint"]).is_dir():
        return None
    return record


def record_in_index(cfg: DictConfig, run_dir: Path) -> None:
    atomic.write_json(_index_file(cfg), {"run_dir": str(run_dir.resolve()), "name": cfg.name})
