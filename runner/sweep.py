"""Hydra callback: after a sweep, list every job's status and fail the command if any job failed.

Jobs run one after another in the same process (basic launcher) or in a pool (joblib); a failed
job records ``status: failed`` in its results.json and the sweep goes on, so no job's results are
lost to another's failure.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback


class SweepSummary(Callback):
    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = []
        for results in sorted(sweep_dir.glob("*/results.json"), key=lambda p: p.parent.name):
            data = json.loads(results.read_text())
            rows.append((results.parent.name, data.get("status"), data.get("error") or ""))
        failed = [r for r in rows if r[1] != "completed"]
        print(f"sweep {sweep_dir}: {len(rows) - len(failed)}/{len(rows)} jobs completed")
        for name, status, error in failed:
            print(f"  {name}: {status}: {error.splitlines()[0] if error else ''}", file=sys.stderr)
        if failed:
            sys.exit(1)
