"""Where the runner keeps what it can rebuild: zoo builds, converted models, SVD factors.

``RUNNER_CACHE_DIR`` moves it (default ``~/.cache/runner``); deleting it only costs recomputation.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("RUNNER_CACHE_DIR", Path.home() / ".cache" / "runner")).expanduser()
