"""Training loggers, registered as ``logger`` components and chosen with ``train.loggers``.

Call shape: ``Logger(run_dir, config, resumed_from=None)`` with ``log(step, metrics)`` and
``close()``; a logger that needs a package may declare ``check() -> problems``, run in validation.
`config` is the run's resolved config; `resumed_from` is the run folder a resumed run continues.
The training loop logs on the main process every ``train.log_every`` steps.

- ``jsonl`` (default): one JSON line per logged step in ``train_log.jsonl``.
- ``tensorboard``: event files under ``tensorboard/`` (the ``tensorboard`` extra).
- ``wandb``: Weights & Biases (the ``wandb`` extra). The project comes from ``WANDB_PROJECT``
  (default ``runner``), the entity from ``WANDB_ENTITY``, the mode from ``WANDB_MODE`` (``offline``
  needs no network; ``wandb sync`` uploads later). The run is named after the run folder, grouped by
  recipe, and its id is kept in ``wandb_run_id`` in the run folder, so a resumed run continues the
  same W&B run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from runner.registry import register

TRAIN_LOG = "train_log.jsonl"
WANDB_ID_FILE = "wandb_run_id"


@register("logger", "jsonl")
class JsonlLogger:
    def __init__(self, run_dir: Path, config: dict | None = None, resumed_from: Path | None = None):
        self.path = Path(run_dir) / TRAIN_LOG

    def log(self, step: int, metrics: dict[str, float]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")

    def close(self) -> None:
        pass


@register("logger", "tensorboard")
class TensorBoardLogger:
    @staticmethod
    def check() -> list[str]:
        return _needs("tensorboard", "tensorboard")

    def __init__(self, run_dir: Path, config: dict | None = None, resumed_from: Path | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(f"train/{key}", value, global_step=step)

    def close(self) -> None:
        self.writer.close()


@register("logger", "wandb")
class WandbLogger:
    @staticmethod
    def check() -> list[str]:
        return _needs("wandb", "wandb")

    def __init__(self, run_dir: Path, config: dict | None = None, resumed_from: Path | None = None):
        import wandb

        run_dir = Path(run_dir)
        run_id = _read_id(resumed_from) or _read_id(run_dir)  # None: W&B picks a new id
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "runner"), entity=os.environ.get("WANDB_ENTITY"),
                              id=run_id, resume="allow", name=run_dir.name, group=(config or {}).get("name"),
                              config=config, dir=str(run_dir), reinit="create_new")
        (run_dir / WANDB_ID_FILE).write_text(self.run.id + "\n")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log({f"train/{k}": v for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


def _read_id(run_dir: Path | None) -> str | None:
    path = Path(run_dir) / WANDB_ID_FILE if run_dir is not None else None
    return path.read_text().strip() if path is not None and path.is_file() else None


def _needs(module: str, extra: str) -> list[str]:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        return [f"train.loggers: {module} needs the {extra!r} extra: pip install -e '.[{extra}]'"]
    return []


def check_loggers(names: list[str]) -> list[str]:
    """Unknown logger names (with a did-you-mean) and loggers whose package is not installed."""
    from runner import registry

    problems = []
    for name in names:
        unknown = registry.check_name("logger", name, key="train.loggers")
        if unknown:
            problems += unknown
            continue
        check = getattr(registry.get("logger", name), "check", None)
        problems += check() if check is not None else []
    if len(set(names)) != len(names):
        problems.append(f"train.loggers: {list(names)} names a logger twice")
    return problems


def open_loggers(names: list[str], run_dir: Path, config: dict | None = None,
                 resumed_from: Path | None = None) -> list[Any]:
    from runner import registry

    return [registry.get("logger", name)(Path(run_dir), config, resumed_from) for name in names]
