"""Baseline evaluations kept per machine: one input model under one eval config is evaluated once.

A sweep's jobs (and a pipeline's steps) evaluate the same input model as their baseline; the second
and later ones copy the first one's result. The key joins everything the numbers depend on:

- the checkpoint's content: the sha256 of every file in its folder (memoised by path, size and
  modification time, so a large model is hashed once);
- how it is loaded and run: dtype, revision, trust_remote_code, the device type;
- the eval config (every key but ``baseline``), the task definitions it reads (every file of the task
  folders) and the runner's own code (the scoring, the toy world's problems);
- the lm-eval, transformers and torch versions.

An entry is a folder under ``<cache>/eval/<key>/``: ``entry.json`` (metrics and the lm_eval command)
and the files the evaluation wrote (raw results, samples). It is written atomically, so a job that
runs beside another sees a whole entry or none. ``eval.cache=false`` neither reads nor writes it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from runner import atomic
from runner.cache import cache_dir, checkpoint_fingerprint, folder_fingerprint

ENTRY = "entry.json"
RUNNER_DIR = Path(__file__).resolve().parent


def cache_key(folder: str | Path, spec: Any, ev: Any, device: str) -> str | None:
    """The entry's key, or None when the model is not a local folder (nothing to fingerprint)."""
    import lm_eval
    import torch
    import transformers

    from runner.evaluate import include_paths

    folder = Path(folder)
    if not folder.is_dir():
        return None
    eval_cfg = OmegaConf.to_container(ev, resolve=True) if OmegaConf.is_config(ev) else dict(ev)
    eval_cfg.pop("baseline", None)
    parts = {
        "checkpoint": checkpoint_fingerprint(folder),
        "load": {k: str(spec.get(k)) for k in ("dtype", "revision", "trust_remote_code")},
        "device": device.split(":")[0],
        "eval": eval_cfg,
        "tasks": {p: folder_fingerprint(Path(p)) for p in include_paths(ev)},
        "runner": folder_fingerprint(RUNNER_DIR, pattern="*.py"),  # the scoring and the toy problems live there
        "versions": {"lm_eval": getattr(lm_eval, "__version__", "?"), "transformers": transformers.__version__,
                     "torch": torch.__version__},
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _entry_dir(key: str) -> Path:
    return cache_dir() / "eval" / key


def load(key: str, out_dir: Path) -> tuple[dict[str, float], dict | None] | None:
    """(metrics, command) of a cached evaluation, its files copied into `out_dir`; None on a miss."""
    entry = _entry_dir(key)
    try:
        data = json.loads((entry / ENTRY).read_text())
    except (OSError, ValueError):
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in entry.iterdir():
        if path.name != ENTRY:
            shutil.copy2(path, out_dir / path.name)
    return data["metrics"], data.get("command")


def store(key: str, metrics: dict[str, float], command: dict | None, out_dir: Path) -> None:
    """Keep an evaluation (its metrics, command and the files in `out_dir`) under `key`."""
    final = _entry_dir(key)
    if (final / ENTRY).exists():  # a job beside this one stored it first
        return
    with atomic.folder(final) as tmp:
        for path in out_dir.iterdir():
            if path.is_file():
                shutil.copy2(path, tmp / path.name)
        (tmp / ENTRY).write_text(json.dumps({"metrics": metrics, "command": command}, indent=2, default=str))
