"""Where the runner keeps what it can rebuild: zoo builds, converted models, SVD factors, baseline
evaluations; and the content hash its entries are keyed and checked by.

``RUNNER_CACHE_DIR`` moves it (default ``~/.cache/runner``); deleting it only costs recomputation.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read in 4 MiB blocks (a model file need not fit in memory twice)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_dir() -> Path:
    return Path(os.environ.get("RUNNER_CACHE_DIR", Path.home() / ".cache" / "runner")).expanduser()
