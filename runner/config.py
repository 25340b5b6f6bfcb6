"""The config schema (Hydra structured configs) and the checks that run before any work.

Hydra validates key names and types while composing (a misspelled key or a value of the wrong
type fails there, with the key named). `validate` then checks what types cannot express: value
ranges and choices (declared on the fields below), unknown top-level keys added with ``+``,
model roles the recipe needs or does not use, model paths, data files and eval tasks. It
collects every problem and raises one `ConfigError`.
"""

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from runner.errors import ConfigError

ROLES = ("model", "teacher", "student", "base", "instruct", "thinking", "tuned_base", "reference", "aligned")
METHOD_BLOCKS = ("loss", "selector", "graft", "merge", "quant", "noise", "onpolicy", "lora", "realign", "pipeline")


def bounds(lo=None, hi=None, *, lo_open=False, choices=None) -> dict:
    """Field metadata checked by `check_fields`: a range (lo open or closed, hi closed) or choices."""
    return {"lo": lo, "hi": hi, "lo_open": lo_open, "choices": choices}


@dataclass
class ModelSpec:
    path: str = MISSING  # toy zoo name, local folder or hub id
    dtype: str = "auto"  # checked with the rest of the spec by runner.models.check_model_spec
    trust_remote_code: bool = False
    revision: Optional[str] = None


@dataclass
class DataFields:
    """Column names in JSONL/hub records."""

    messages: str = "messages"
    prompt: str = "prompt"
    response: str = "response"
    text: str = "text"


@dataclass
class DataConfig:
    source: str = "toy"  # a registered data source (toy), jsonl or hub; checked by runner.data
    # toy world (checked by its data source, runner/toy)
    format: str = "instruct"  # plain, instruct or thinking
    difficulty: str = "mixed"  # easy, hard or mixed
    variation: float = field(default=0.0, metadata=bounds(0, 1))  # probability of a varied phrasing around the answer
    question_style: str = "symbols"  # 7*9+17=? (symbols) or in words
    # files and hub
    path: Optional[str] = None  # JSONL file (source=jsonl)
    name: Optional[str] = None  # hub dataset id (source=hub)
    subset: Optional[str] = None
    split: str = "train"
    fields: DataFields = field(default_factory=DataFields)
    system_prompt: Optional[str] = None
    # all sources
    num_examples: Optional[int] = field(default=None, metadata=bounds(1))  # toy: how many to generate (default 20000); files: a cap
    chat_template: Optional[bool] = None  # null: use the tokenizer's chat template if it has one
    max_length: int = field(default=256, metadata=bounds(8))
    packing: bool = False
    seed: int = 0


@dataclass
class TrainConfig:
    steps: Optional[int] = field(default=200, metadata=bounds(1))  # optimizer steps; null: from epochs
    epochs: float = field(default=1.0, metadata=bounds(0, lo_open=True))
    batch_size: int = field(default=16, metadata=bounds(1))  # per process, per micro-step
    grad_accum: int = field(default=1, metadata=bounds(1))
    lr: float = field(default=3e-4, metadata=bounds(0, lo_open=True))
    lr_scheduler: str = field(
        default="cosine",
        metadata=bounds(choices=("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_min_lr")),
    )
    warmup_ratio: float = field(default=0.1, metadata=bounds(0, 1))
    warmup_steps: Optional[int] = field(default=None, metadata=bounds(0))  # overrides warmup_ratio
    min_lr_ratio: float = field(default=0.0, metadata=bounds(0, 1))
    weight_decay: float = field(default=0.0, metadata=bounds(0))
    adam_betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = field(default=1e-8, metadata=bounds(0, lo_open=True))
    max_grad_norm: float = field(default=1.0, metadata=bounds(0))  # 0 disables clipping
    save_every: int = field(default=0, metadata=bounds(0))  # checkpoint every N steps; 0: never mid-run
    keep_last: int = field(default=1, metadata=bounds(1))
    resume: str = "auto"  # auto | never | <checkpoint folder>
    log_every: int = field(default=10, metadata=bounds(1))
    gradient_checkpointing: bool = False
    mixed_precision: str = field(default="no", metadata=bounds(choices=("no", "bf16", "fp16")))
    cpu: Optional[bool] = None  # null: CPU when no GPU is present
    loggers: List[str] = field(default_factory=lambda: ["jsonl"])  # registered loggers: jsonl, tensorboard, wandb
    seed: int = 0


@dataclass
class SamplingConfig:
    """Settings for the tasks that sample (metadata ``sampled: true``, e.g. toy_arith_hard_passk); null keeps
    the task's own (16 samples at temperature 1 for the toy pass@k tasks)."""

    n: Optional[int] = field(default=None, metadata=bounds(1, 1024))  # samples per problem (pass@k for k <= n)
    temperature: Optional[float] = field(default=None, metadata=bounds(0, lo_open=True))
    top_p: Optional[float] = field(default=None, metadata=bounds(0, 1, lo_open=True))


@dataclass
class EvalConfig:
    tasks: List[str] = field(default_factory=list)  # empty: no evaluation
    limit: Optional[int] = field(default=None, metadata=bounds(1))
    batch_size: int = field(default=32, metadata=bounds(1))
    num_fewshot: Optional[int] = field(default=None, metadata=bounds(0))
    baseline: bool = False  # also evaluate the recipe's input model
    cache: bool = True  # reuse this machine's earlier baseline of the same model and eval config (runner/eval_cache.py)
    chat_template: Optional[bool] = None  # null: use the tokenizer's chat template if it has one
    enable_thinking: Optional[bool] = None  # passed to the chat template when set
    max_gen_toks: Optional[int] = field(default=None, metadata=bounds(1))
    include_path: List[str] = field(default_factory=list)  # extra folders of task YAMLs
    log_samples: bool = True
    bootstrap_iters: int = field(default=0, metadata=bounds(0))
    seed: int = 1234
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


@dataclass
class RunConfig:
    name: str = MISSING  # the named recipe (conf/recipe/<name>.yaml)
    kind: str = MISSING  # the registered recipe it runs
    seed: int = 0
    output_root: str = "outputs"
    plugins: List[str] = field(default_factory=list)  # extra modules to import (they register components)
    save_checkpoint: bool = True
    verbose: bool = False  # libraries' log lines (lm-eval, transformers, ...) on the console and in runner.log
    # model roles
    model: Optional[ModelSpec] = None
    teacher: Optional[ModelSpec] = None
    student: Optional[ModelSpec] = None
    base: Optional[ModelSpec] = None
    instruct: Optional[ModelSpec] = None
    thinking: Optional[ModelSpec] = None
    tuned_base: Optional[ModelSpec] = None
    reference: Optional[ModelSpec] = None
    aligned: Optional[ModelSpec] = None
    models: List[ModelSpec] = field(default_factory=list)
    # stages
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # method parameters, validated by the recipe against its components
    loss: Dict[str, Any] = field(default_factory=dict)
    selector: Dict[str, Any] = field(default_factory=dict)
    graft: Dict[str, Any] = field(default_factory=dict)
    merge: Dict[str, Any] = field(default_factory=dict)
    quant: Dict[str, Any] = field(default_factory=dict)
    noise: Dict[str, Any] = field(default_factory=dict)
    onpolicy: Dict[str, Any] = field(default_factory=dict)
    lora: Dict[str, Any] = field(default_factory=dict)
    realign: Dict[str, Any] = field(default_factory=dict)
    pipeline: Dict[str, Any] = field(default_factory=dict)  # steps of kind=pipeline (runner/pipeline.py)


def register_configs() -> None:
    """Store the schema for Hydra. Method blocks stay open, so ``loss.mu=0.3`` sets a component's
    parameter that no YAML names (its default lives in the component's signature, not in a config
    file); the recipe's validation checks every key in them, with a did-you-mean."""
    from hydra.core.config_store import ConfigStore

    schema = OmegaConf.structured(RunConfig)
    for block in METHOD_BLOCKS:
        OmegaConf.set_struct(schema[block], False)
    ConfigStore.instance().store(name="runner_schema", node=schema)


# --------------------------------------------------------------------------------------------
# Checks


def check_fields(node: Any, schema: type, key: str) -> list[str]:
    """Range and choice problems of `node` against the field metadata of dataclass `schema`."""
    from runner.registry import not_allowed

    problems = []
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        value = node.get(f.name) if isinstance(node, (dict, DictConfig)) else getattr(node, f.name, None)
        full = f"{key}.{f.name}" if key else f.name
        nested = _dataclass_in(hints[f.name])
        if nested is not None:
            if value is not None:
                problems += check_fields(value, nested, full)
            continue
        meta = f.metadata
        if not meta or value is None:
            continue
        if meta["choices"] is not None:
            if value not in meta["choices"]:
                problems.append(not_allowed(full, value, meta["choices"]))
            continue
        problem = range_problem(full, value, meta["lo"], meta["hi"], meta["lo_open"])
        if problem:
            problems.append(problem)
    return problems


def range_problem(key: str, value: float, lo=None, hi=None, lo_open: bool = False) -> str | None:
    """The message for a value outside [lo, hi] (or (lo, hi]), or None when it is inside."""
    below = lo is not None and (value <= lo if lo_open else value < lo)
    if not below and not (hi is not None and value > hi):
        return None
    return f"{key}: {value} is out of range; it must be {limits(lo, hi, lo_open)}"


def limits(lo=None, hi=None, lo_open: bool = False) -> str:
    """'>= lo and <= hi' (or '> lo ...'), the bounds a range message states."""
    parts = [f"{'>' if lo_open else '>='} {lo}"] if lo is not None else []
    return " and ".join(parts + ([f"<= {hi}"] if hi is not None else []))


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass a field holds (directly or as Optional[...]), else None."""
    for t in (hint, *typing.get_args(hint)):
        if isinstance(t, type) and dataclasses.is_dataclass(t):
            return t
    return None


def check_top_level(cfg: DictConfig) -> list[str]:
    """Keys added with ``+key=value`` that the schema does not know."""
    from runner.registry import did_you_mean

    known = {f.name for f in dataclasses.fields(RunConfig)}
    return [
        f"{k}: unknown top-level key.{did_you_mean(k, known)} Known keys: {', '.join(sorted(known))}"
        for k in cfg if k not in known
    ]


def check_roles(cfg: DictConfig, required: tuple[str, ...], optional: tuple[str, ...], kind: str) -> list[str]:
    problems = []
    for role in required:
        if cfg.get(role) is None:
            problems.append(f"{role}: recipe kind {kind!r} needs a {role!r} model; set {role}.path=<toy zoo name, folder or hub id>")
    allowed = set(required) | set(optional)
    for role in ROLES:
        if role not in allowed and cfg.get(role) is not None:
            uses = ", ".join(sorted(allowed & set(ROLES))) or "none"
            problems.append(f"{role}: set, but recipe kind {kind!r} does not use it (it uses: {uses}); remove it")
    if "models" not in allowed and len(cfg.get("models") or []) > 0:
        problems.append(f"models: set, but recipe kind {kind!r} does not take a list of models")
    return problems


def check_unused_blocks(cfg: DictConfig, used: tuple[str, ...], kind: str) -> list[str]:
    return [
        f"{block}: set, but recipe kind {kind!r} does not read a {block!r} block (it reads: {', '.join(used) or 'none'})"
        for block in METHOD_BLOCKS
        if block not in used and len(cfg.get(block) or {}) > 0
    ]


def method_block(cfg: DictConfig, key: str, schema: type) -> DictConfig:
    """A method block's own keys (the fields of `schema`) merged over the schema's defaults.

    Method blocks also hold a component's parameters beside the recipe's keys (``loss.mu`` next to
    ``loss.name``), so keys the schema does not know are left out here and checked by the recipe.
    """
    known = set(schema.__dataclass_fields__)
    present = {k: v for k, v in (to_container(cfg.get(key)) or {}).items() if k in known}
    return OmegaConf.merge(OmegaConf.structured(schema), present)


def component_params(cfg: DictConfig, key: str, schema: type) -> dict:
    """The keys of a method block that its schema does not own: the component's own parameters
    (``loss.mu`` beside ``loss.name``), as plain values."""
    known = set(schema.__dataclass_fields__)
    return {k: v for k, v in (to_container(cfg.get(key)) or {}).items() if k not in known}


def check_block(cfg: DictConfig, name: str, schema: type, components: tuple = (),
                supplied=lambda block, typed: {}) -> tuple[DictConfig | None, dict, list[str]]:
    """One method block against its schema and the contracts of the components it names.

    Returns the block typed by `schema` (None when OmegaConf refuses a value's type, ``loss.kd_ratio=abc``),
    the keys the schema does not own (the parameters of a component that takes them beside the
    block's keys), and every problem. `components` are `runner.recipe.Component`s; `supplied(block,
    typed)` names the parameters the recipe gives a component at run time.
    """
    from runner import registry

    try:
        typed = method_block(cfg, name, schema)
    except Exception as exc:  # OmegaConf's validation errors carry the field in full_key
        field_name = getattr(exc, "full_key", None)
        return None, {}, [f"{name}.{field_name}: {str(exc).splitlines()[0]}" if field_name else str(exc).splitlines()[0]]
    problems = check_fields(typed, schema, name)
    beside = component_params(cfg, name, schema)
    if beside and not any(c.params_key is None for c in components):
        own = set(schema.__dataclass_fields__)
        problems += [f"{name}.{k}: unknown key.{registry.did_you_mean(k, own)} Allowed: {', '.join(sorted(own))}"
                     for k in beside]
    for c in components:
        component = typed.get(c.name_key)
        params = beside if c.params_key is None else dict(to_container(typed.get(c.params_key)) or {})
        where = name if c.params_key is None else f"{name}.{c.params_key}"
        if component is None or component == c.none:
            if params:
                problems.append(f"{where}: {', '.join(sorted(params))} set, but {name}.{c.name_key} is {component}")
            continue
        valid = [c.none, *registry.names(c.kind)] if c.none else registry.names(c.kind)
        if component not in valid:
            problems.append(registry.unknown_name_message(c.kind, component, valid, key=f"{name}.{c.name_key}"))
            continue
        problems += registry.check_component(c.kind, component, params, key=where, supplied=supplied(name, typed))
    return typed, beside, problems


def to_container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node


def raise_if(problems: list[str]) -> None:
    if problems:
        raise ConfigError(problems)
