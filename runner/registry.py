"""Named registries for recipes and method components.

A method is one function or class with a decorator::

    from runner.registry import register

    @register("kd_loss", "fkl")
    def forward_kl(student_logits, teacher_logits, mask, labels=None): ...

and is looked up by the name a config gives::

    loss = get("kd_loss", cfg.loss.name)

Unknown names raise a `ConfigError` that lists the valid names and the closest match.

A component declares its contract at registration: its parameters are the keyword arguments after
the call shape's own (types and defaults from the signature; ranges and choices given here), the
arguments the caller supplies at run time, and what else its recipe needs to know (a merge method's
model inputs, a quantizer's storage cost). `check_component` validates a config block against it,
so no recipe keeps a table about its components::

    @register("kd_loss", "akl", ranges={"mu": (0, 1, "open")})
    def akl(student_logits, teacher_logits, mask, labels=None, *, mu: float = 0.5): ...

Kinds and call shapes (the contract in DESIGN.md):

=================  ===================================================================
kind               call shape
=================  ===================================================================
recipe             class with ``run(cfg, ctx) -> RecipeResult`` (see `runner.recipe`)
kd_loss            ``loss(student_logits, teacher_logits, mask, labels=None, **params)``
token_selector     ``select(token_logprobs, mask, **params) -> keep_mask``
merge_method       ``merge(tensors, base, **params) -> Tensor`` (fp32 in and out)
quantizer          ``quantize(weight, bits, group_size, **params) -> Tensor``
bit_allocator      ``allocate(layers, avg_bits, choices, **params) -> {layer: bits}``
quant_transform    dataclass (fields: params) with ``__call__(step) -> next layer's inputs``, ``problems(model)``
noise_model        ``perturb(weight, generator, **params) -> Tensor``
model_source       object with ``names()``, ``resolve(name) -> folder``, ``label``
data_source        object with ``check(data, key) -> problems``, ``load(data) -> records``
task_dir           a folder of lm-eval task YAMLs, searched by the eval stage
checkpoint_metric  ``metric(model, tokenizer) -> [score per item]``, for the effects scoreboard
logger             class ``Logger(run_dir, config, resumed_from)`` with ``log(step, metrics)``, ``close()``
=================  ===================================================================

The built-in components (the `recipes` package, which also plugs in the toy world) are imported on
the first lookup, so every name is known wherever the registry is asked.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from runner.errors import ConfigError

KINDS = (
    "recipe",
    "kd_loss",
    "token_selector",
    "merge_method",
    "quantizer",
    "bit_allocator",
    "quant_transform",
    "noise_model",
    "model_source",
    "data_source",
    "task_dir",
    "checkpoint_metric",
    "logger",
)
BUILTINS = ("runner.loggers", "recipes", "runner.packaged_models")  # importing these registers every built-in component and source

# How many leading arguments each kind's call shape supplies (they are not config parameters).
CALL_ARGS = {"kd_loss": 4, "token_selector": 2, "merge_method": 2, "quantizer": 3, "bit_allocator": 3,
             "quant_transform": 0, "noise_model": 2}

_REGISTRY: dict[str, dict[str, Any]] = {kind: {} for kind in KINDS}
_CONTRACTS: dict[str, dict[str, "Contract"]] = {kind: {} for kind in KINDS}
_builtins_loaded = False
_EMPTY = inspect.Parameter.empty


@dataclass(frozen=True)
class Inputs:
    """The model roles a merge method takes: named roles in order, or ``("models",)`` for a list."""

    roles: tuple[str, ...]
    base: str | None = None  # the role of the base the task vectors are taken from
    models: tuple[int, int | None] = (2, None)  # with ("models",): how many (at least, at most)
    donor: str | None = None  # whose config and tokenizer the output takes (default: the first input)


@dataclass(frozen=True)
class Param:
    name: str
    default: Any = _EMPTY
    type: type | None = None
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    choices: tuple | None = None

    @property
    def required(self) -> bool:
        return self.default is _EMPTY

    def problems(self, key: str, value: Any) -> list[str]:
        """Why `value` is not allowed for this parameter ([] when it is)."""
        from runner.config import range_problem

        if value is None and (self.default is None or self.type is None):
            return []
        if self.type is not None and not _is_a(value, self.type):
            return [f"{key}: {value!r} is not {_TYPE_WORDS.get(self.type, self.type.__name__)}"]
        if self.choices is not None and value not in self.choices:
            return [not_allowed(key, value, self.choices)]
        if self.lo is not None or self.hi is not None:
            problem = range_problem(key, value, self.lo, self.hi, self.lo_open)
            return [problem] if problem else []
        return []


_TYPE_WORDS = {float: "a number", int: "a whole number", bool: "true or false", str: "a string",
               list: "a list", dict: "a mapping"}


def _is_a(value: Any, kind: type) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False  # true/false is not a number
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)


@dataclass(frozen=True)
class Contract:
    """What a component takes from a config, and what its recipe must know about it."""

    params: dict[str, Param] = field(default_factory=dict)
    runtime: tuple[str, ...] = ()  # keyword arguments the caller supplies, never the config
    open: bool = False  # takes **kwargs: any parameter is accepted
    inputs: Inputs | None = None  # merge methods
    storage: Any = None  # quantizers: what a weight costs (recipes.quantize.quantizers.Storage)
    check: Callable | None = None  # (params, key) -> problems: rules joining several parameters


def _contract(kind: str, obj: Any, ranges: Mapping, choices: Mapping, runtime: tuple, **extra) -> Contract:
    """The contract of a function registered under a kind with a call shape."""
    if kind not in CALL_ARGS or not callable(obj):
        return Contract(**extra)
    try:
        hints = typing.get_type_hints(obj)
    except Exception:  # an annotation that cannot be resolved: types then come from defaults
        hints = {}
    sig = inspect.signature(obj)
    params, is_open = {}, False
    for p in list(sig.parameters.values())[CALL_ARGS[kind]:]:
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            is_open = True
            continue
        if p.kind is inspect.Parameter.VAR_POSITIONAL or p.name in runtime:
            continue
        lo = hi = None
        lo_open = False
        if p.name in ranges:
            lo, hi, *rest = ranges[p.name]
            lo_open = bool(rest) and rest[0] == "open"
        params[p.name] = Param(p.name, p.default, _simple_type(hints.get(p.name), p.default), lo, hi, lo_open,
                               tuple(choices[p.name]) if p.name in choices else None)
    unknown = (set(ranges) | set(choices)) - set(params)
    if unknown:
        raise ValueError(f"{kind} {getattr(obj, '__name__', obj)!r}: ranges or choices for {sorted(unknown)}, "
                         "which are not among its parameters")
    return Contract(params=params, runtime=tuple(runtime), open=is_open, **extra)


def _simple_type(hint: Any, default: Any) -> type | None:
    """float, int, bool, str, list or dict when the annotation (or the default) says so, else None."""
    for t in (hint, *typing.get_args(hint)):
        if t in (float, int, bool, str, list, dict):
            return t
        if typing.get_origin(t) in (list, dict):
            return typing.get_origin(t)
    if default is not _EMPTY and default is not None and type(default) in (float, int, bool, str, list, dict):
        return type(default)
    return None


def load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for module in BUILTINS:
            importlib.import_module(module)


def import_plugins(plugins: Iterable[str]) -> None:
    """Register the built-ins, then import the user's plugin modules (``plugins=[my_pkg.methods]``),
    whose decorators register their components."""
    load_builtins()
    for name in plugins:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(f"plugins: cannot import {name!r} ({exc})") from None


def _check_kind(kind: str) -> dict[str, Any]:
    if kind not in _REGISTRY:
        raise ValueError(f"unknown registry kind {kind!r}; kinds are: {', '.join(KINDS)}")
    return _REGISTRY[kind]


def _table(kind: str) -> dict[str, Any]:
    """The entries of a kind, built-ins included."""
    load_builtins()
    return _check_kind(kind)


def register(kind: str, name: str | None = None, *, aliases: Iterable[str] = (), ranges: Mapping | None = None,
             choices: Mapping | None = None, runtime: Iterable[str] = (), inputs: Inputs | None = None,
             storage: Any = None, check: Callable | None = None) -> Callable:
    """Decorator: register the decorated object under `name` (default: its ``__name__``) with its contract.

    `ranges` ({param: (lo, hi) or (lo, hi, "open")}, None for no bound) and `choices` ({param: values})
    bound its parameters; `runtime` names keyword arguments its caller supplies; `check(params, key)`
    returns the problems of rules that join parameters; `inputs` (merge methods) and `storage`
    (quantizers) are what their recipes need to know.
    """
    table = _check_kind(kind)

    def decorator(obj: Any) -> Any:
        contract = _contract(kind, obj, ranges or {}, choices or {}, tuple(runtime), inputs=inputs, storage=storage,
                             check=check)
        for key in (name or obj.__name__, *aliases):
            existing = table.get(key)
            if existing is not None and existing is not obj:
                raise ValueError(f"{kind} {key!r} is already registered by {_describe(existing)}")
            table[key] = obj
            _CONTRACTS[kind][key] = contract
        return obj

    return decorator


def contract(kind: str, name: str) -> Contract:
    """The contract `name` was registered with (`get` it first to report an unknown name)."""
    get(kind, name)
    return _CONTRACTS[kind][name]


def _describe(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def names(kind: str) -> list[str]:
    """Registered names of a kind, sorted."""
    return sorted(_table(kind))


def entries(kind: str) -> dict[str, Any]:
    """Every registered object of a kind, by name, in registration order."""
    return dict(_table(kind))


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """' Did you mean 'x'?' for the closest candidate, or '' when nothing is close."""
    close = difflib.get_close_matches(str(name), list(candidates), n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


def not_allowed(key: str, value: Any, allowed: Iterable) -> str:
    """The one message for a value outside a choice list, with a did-you-mean."""
    allowed = [str(a) for a in allowed]
    return f"{key}: {value!r} is not allowed.{did_you_mean(str(value), allowed)} Choose one of {', '.join(allowed)}"


def unknown_name_message(kind: str, name: str, valid: Iterable[str], key: str | None = None) -> str:
    valid = sorted(valid)
    where = f"{key}: " if key else ""
    return (
        f"{where}unknown {kind} {name!r}.{did_you_mean(name, valid)} "
        f"Valid names: {', '.join(valid) if valid else '(none registered)'}"
    )


def check_name(kind: str, name: str, *, key: str) -> list[str]:
    """[] when `name` is registered as `kind`, else the one problem naming `key` (with a did-you-mean)."""
    table = _table(kind)
    return [] if name in table else [unknown_name_message(kind, name, table, key)]


def get(kind: str, name: str, *, key: str | None = None) -> Any:
    """The object registered as `name`; a `ConfigError` naming `key` if there is none."""
    table = _table(kind)
    if name not in table:
        raise ConfigError(unknown_name_message(kind, name, table, key))
    return table[name]


def check_component(kind: str, name: str, params: Mapping[str, Any], *, key: str,
                    supplied: Mapping[str, str] | None = None) -> list[str]:
    """Problems binding a config block's `params` to component `name`'s contract, each naming `key`.

    Unknown names get a did-you-mean; wrongly typed or out-of-range values, arguments the caller
    supplies at run time, and required parameters that are missing are reported too. `supplied` maps
    the parameters the recipe fills in itself (noise-eval's swept one) to the config key that names
    them; one that is not a parameter is reported there.
    """
    c = contract(kind, name)
    supplied = dict(supplied or {})
    problems = [f"{where}: {p!r} is not a parameter of {kind.replace('_', ' ')} {name!r}; choose one of "
                f"{', '.join(c.params) or '(none)'}" for p, where in supplied.items() if p not in c.params]
    for k, v in params.items():
        if k in c.runtime:
            problems.append(f"{key}.{k}: supplied at run time, not by the config")
        elif k in c.params:
            problems += c.params[k].problems(f"{key}.{k}", v)
        elif not c.open:
            problems.append(f"{key}.{k}: unknown parameter.{did_you_mean(k, c.params)} "
                            f"Allowed: {', '.join(sorted(c.params)) or '(none)'}")
    if all(p in c.params for p in supplied):  # else the misnamed one is the missing one
        problems += [f"{key}.{p.name}: required parameter is missing" for p in c.params.values()
                     if p.required and p.name not in params and p.name not in supplied]
    if not problems and c.check is not None:
        problems += c.check(dict(params), key)
    return problems
