"""OmegaConf resolvers used by conf/config.yaml for run folders and per-process log files.

``${runner_now:FMT}`` is the time a run started. Under a distributed launcher (torchrun,
``accelerate launch``) every worker composes its own config, so "now" would differ between them
and each would create its own run folder; there the start time of the launcher (the workers'
common parent process) is used instead, so all workers on a node agree on one folder.
"""

from __future__ import annotations

import os
from datetime import datetime

from omegaconf import OmegaConf


def _launcher_start_time() -> datetime | None:
    """Start time of the parent process (Linux /proc), or None where it cannot be read."""
    try:
        with open(f"/proc/{os.getppid()}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22 of stat; fields[0] here is field 3
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return datetime.fromtimestamp(boot + start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _distributed() -> bool:
    return "LOCAL_RANK" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ


_STARTED: datetime | None = None


def run_start_time() -> datetime:
    """One start time per process, so every folder name formatted from it agrees."""
    global _STARTED
    if _STARTED is None:
        _STARTED = (_launcher_start_time() if _distributed() else None) or datetime.now()
    return _STARTED


def _now(fmt: str) -> str:
    return run_start_time().strftime(fmt)


def _rank_suffix() -> str:
    rank = os.environ.get("RANK", "0")
    return "" if rank == "0" else f".rank{rank}"


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("runner_now"):
        OmegaConf.register_new_resolver("runner_now", _now, use_cache=True)
    if not OmegaConf.has_resolver("runner_rank_suffix"):
        OmegaConf.register_new_resolver("runner_rank_suffix", _rank_suffix)
