"""What a recipe is: a registered class with ``run(cfg, ctx) -> RecipeResult``.

A recipe declares the model roles it needs, the method blocks it reads, and which input model is
its baseline; `runner.run` checks all of that before any work, builds the `RunContext`, runs it,
and evaluates what it returns.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

from omegaconf import DictConfig

from runner.train import TrainResult


@dataclass
class RecipeResult:
    checkpoint: Path | None = None  # the HF folder the recipe wrote, if any
    model: Any = None  # the final model in memory (saves a reload for evaluation)
    tokenizer: Any = None
    metrics: dict[str, float] | None = None  # set when the recipe evaluated by itself (noise-eval)
    stats: dict[str, float] = field(default_factory=dict)  # numbers about the result (bits), shown with the metrics
    train: TrainResult | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # recipe-specific results for results.json


class Recipe:
    """Base class of recipes. Subclass, set the class attributes, implement `run`."""

    roles: ClassVar[tuple[str, ...]] = ()  # model roles that must be set
    optional_roles: ClassVar[tuple[str, ...]] = ()  # roles that may be set
    blocks: ClassVar[tuple[str, ...]] = ()  # method blocks it reads (loss, selector, merge, ...)
    uses_data: ClassVar[bool] = False  # reads the `data` block
    baseline_role: ClassVar[str | None] = None  # the input model that `eval.baseline=true` evaluates

    def validate(self, cfg: DictConfig) -> list[str]:
        """Problems with the method blocks; called before any work. Override to add checks."""
        return []

    def baseline_for(self, cfg: DictConfig) -> str | None:
        """The role `eval.baseline=true` evaluates for this config (override when it depends on it)."""
        return self.baseline_role

    def writes_checkpoint(self, cfg: DictConfig) -> bool:
        """Whether this config leaves a checkpoint a later pipeline step can take (override when not)."""
        return bool(cfg.save_checkpoint)

    def run(self, cfg: DictConfig, ctx: RunContext) -> RecipeResult:
        raise NotImplementedError


@dataclass
class RunContext:
    cfg: DictConfig
    run_dir: Path
    resume_from: Path | None = None
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("runner"))

    @cached_property
    def accelerator(self):
        from runner.train import make_accelerator

        return make_accelerator(self.cfg.train, self.run_dir)

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    def load_model(self, role: str, *, dtype: str | None = None):
        """(model, tokenizer) of a role, on this process's device."""
        from runner.models import load_model

        spec = dict(self.cfg[role])
        if dtype is not None:
            spec["dtype"] = dtype
        self.log.info("loading %s: %s", role, spec["path"])
        return load_model(spec, device=self.accelerator.device)

    def save(self, model, tokenizer, name: str = "checkpoint", **kwargs) -> Path:
        """Write an HF checkpoint under the run folder from the main process; all processes wait."""
        from runner.models import save_checkpoint

        path = self.run_dir / name
        # every process takes part: under FSDP, gathering the full weights onto the main process is a collective
        state_dict = self.accelerator.get_state_dict(model)
        if self.is_main_process:
            save_checkpoint(self.accelerator.unwrap_model(model), tokenizer, path, state_dict=state_dict, **kwargs)
            self.log.info("saved checkpoint to %s", path)
        self.accelerator.wait_for_everyone()
        return path
