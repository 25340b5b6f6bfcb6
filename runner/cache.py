"""Where the runner keeps what it can rebuild: zoo builds, converted models, SVD factors, baseline
evaluations, teachers' top-k log-probs; and the content hashes its entries are keyed and checked by.

``RUNNER_CACHE_DIR`` moves it (default ``~/.cache/runner``); deleting it only costs recomputation.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from runner import atomic


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read in 4 MiB blocks (a model file need not fit in memory twice)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_dir() -> Path:
    return Path(os.environ.get("RUNNER_CACHE_DIR", Path.home() / ".cache" / "runner")).expanduser()


def folder_fingerprint(folder: Path, memo: dict[str, str] | None = None, pattern: str = "*") -> str:
    """sha256 over the relative path and content hash of every file under `folder` matching `pattern`."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob(pattern) if p.is_file()):
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


def checkpoint_fingerprint(folder: Path) -> str:
    """A model folder's content fingerprint; file hashes are memoised per machine by path, size and
    modification time, so a large checkpoint is read once."""
    memo_file = cache_dir() / "file_hashes.json"
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    size = len(memo)
    fingerprint = folder_fingerprint(folder, memo)
    if len(memo) != size:
        atomic.write_json(memo_file, memo)
    return fingerprint
