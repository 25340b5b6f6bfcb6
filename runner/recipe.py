"""What a recipe is: a registered class with ``run(cfg, ctx) -> RecipeResult``.

A recipe declares the model roles it needs, the method blocks it reads (each with the dataclass of
its own keys, and the registered component a key of it names), and which input model is its
baseline. `Recipe.validate` checks every block against its schema and its component's contract,
plus the recipe's own rules (`check`), and returns the typed blocks; `runner.run` then builds the
`RunContext` (holding those blocks), runs the recipe and evaluates what it returns.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

from omegaconf import DictConfig

from runner.train import TrainResult


@dataclass(frozen=True)
class Component:
    """The registered component a method block names: ``Component("kd_loss", "name")`` is ``loss.name``.

    Its parameters sit beside the block's own keys (``loss.mu``), or in the block's dict key
    `params_key` (``quant.allocator_params``). `none` is the name that means no component.
    """

    kind: str
    name_key: str
    params_key: str | None = None
    none: str | None = None


@dataclass
class Blocks:
    """A recipe's method blocks as validated: each typed by its schema (defaults filled in), and each
    block's component parameters (its keys the schema does not own)."""

    typed: dict[str, DictConfig] = field(default_factory=dict)
    params: dict[str, dict] = field(default_factory=dict)

    def __getitem__(self, block: str) -> DictConfig:
        return self.typed[block]


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
    """Base class of recipes. Subclass, set the class attributes, implement `run` (and `check` for
    rules of its own)."""

    roles: ClassVar[tuple[str, ...]] = ()  # model roles that must be set
    optional_roles: ClassVar[tuple[str, ...]] = ()  # roles that may be set
    blocks: ClassVar[dict[str, type]] = {}  # method blocks it reads -> the dataclass of their own keys
    components: ClassVar[dict[str, tuple[Component, ...]]] = {}  # block -> the components its keys name
    data_role: ClassVar[str | None] = None  # the role whose tokenizer reads the `data` block (None: no data)
    baseline_role: ClassVar[str | None] = None  # the input model that `eval.baseline=true` evaluates

    def validate(self, cfg: DictConfig) -> tuple[Blocks, list[str]]:
        """The typed blocks and every problem with them; called before any work."""
        from runner.config import check_block

        blocks, problems = Blocks(), []
        for name, schema in self.blocks.items():
            typed, params, block_problems = check_block(cfg, name, schema, self.components.get(name, ()),
                                                        self.supplied)
            problems += block_problems
            if typed is not None:
                blocks.typed[name], blocks.params[name] = typed, params
        if problems:
            return blocks, problems
        return blocks, self.check(cfg, blocks)

    def check(self, cfg: DictConfig, blocks: Blocks) -> list[str]:
        """The recipe's own rules across blocks and roles (the blocks are typed and valid by now)."""
        return []

    def supplied(self, block: str, typed: DictConfig) -> dict[str, str]:
        """Parameters of a block's component that the recipe supplies at run time (noise-eval's swept
        one), each with the config key that names it."""
        return {}

    def uses(self, cfg: DictConfig) -> set[str]:
        """The model roles this config of the recipe reads (override when its method decides); a sweep
        across recipes leaves the others out of this recipe's jobs."""
        return set(self.roles + self.optional_roles)

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
    blocks: Blocks = field(default_factory=Blocks)
    resume_from: Path | None = None
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("runner"))

    @cached_property
    def accelerator(self):
        from runner.train import make_accelerator

        return make_accelerator(self.cfg.train)

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

    def train(self, model, examples: list[dict], loss_fn, *, pad_id: int, desc: str, on_step=None) -> TrainResult:
        """`runner.train.train` for this run: its accelerator, folder, resume point and the loggers
        of ``train.loggers`` (opened on the main process with the run's config)."""
        from runner.config import to_container
        from runner.loggers import open_loggers
        from runner.train import run_dir_of, train

        loggers = None
        if self.is_main_process:
            resumed = run_dir_of(self.resume_from) if self.resume_from else None
            loggers = open_loggers(list(self.cfg.train.loggers), self.run_dir, to_container(self.cfg), resumed)
        return train(model, examples, loss_fn, self.cfg.train, accelerator=self.accelerator, run_dir=self.run_dir,
                     pad_id=pad_id, resume_from=self.resume_from, on_step=on_step, desc=desc, loggers=loggers)

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
