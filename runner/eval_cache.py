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
from runner.cache import cache_dir, file_sha256

ENTRY = "entry.json"
RUNNER_DIR = Path(__file__).resolve().parent


def _memo_path() -> Path:
    return cache_dir() / "eval" / "file_hashes.json"


def folder_fingerprint(folder: Path, memo: dict[str, str] | None = None, pattern: str = "*") -> str:
    """sha256 over the relative path and content hash of every file under `folder` matching `pattern`."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob(pattern) if p.is_file()):
        stat = path.stat()
        stamp = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        if memo is not None and stamp in memo:
            content = memo[stamp]
        else:
            content = file_sha256(path)
            if memo is not None:
                memo[stamp] = content
        digest.update(f"{path.relative_to(folder).as_posix()}\0{content}\n".encode())
    return digest.hexdigest()


def _checkpoint_fingerprint(folder: Path) -> str:
    memo_file = _memo_path()
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    size = len(memo)
    fingerprint = folder_fingerprint(folder, memo)
    if len(memo) != size:
        atomic.write_json(memo_file, memo)
    return fingerprint


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
        "checkpoint": _checkpoint_fingerprint(folder),
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
