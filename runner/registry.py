"""Named registries for recipes and method components.

A method is one function or class with a decorator::

    from runner.registry import register

    @register("kd_loss", "fkl")
    def forward_kl(student_logits, teacher_logits, mask, labels=None): ...

and is looked up by the name a config gives::

    loss = get("kd_loss", cfg.loss.name)

Unknown names raise a `ConfigError` that lists the valid names and the closest match.

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
noise_model        ``perturb(weight, generator, **params) -> Tensor``
model_source       object with ``names()``, ``resolve(name) -> folder``, ``label``
data_source        object with ``check(data, key) -> problems``, ``load(data) -> records``
task_dir           a folder of lm-eval task YAMLs, searched by the eval stage
checkpoint_metric  ``metric(model, tokenizer) -> [score per item]``, for the effects scoreboard
=================  ===================================================================

The built-in components (the `recipes` package, which also plugs in the toy world) are imported on
the first lookup, so every name is known wherever the registry is asked.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from runner.errors import ConfigError

KINDS = (
    "recipe",
    "kd_loss",
    "token_selector",
    "merge_method",
    "quantizer",
    "bit_allocator",
    "noise_model",
    "model_source",
    "data_source",
    "task_dir",
    "checkpoint_metric",
)
BUILTINS = "recipes"  # importing it registers every built-in recipe, component and source

_REGISTRY: dict[str, dict[str, Any]] = {kind: {} for kind in KINDS}
_builtins_loaded = False


def load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        importlib.import_module(BUILTINS)


def _check_kind(kind: str) -> dict[str, Any]:
    if kind not in _REGISTRY:
        raise ValueError(f"unknown registry kind {kind!r}; kinds are: {', '.join(KINDS)}")
    return _REGISTRY[kind]


def _table(kind: str) -> dict[str, Any]:
    """The entries of a kind, built-ins included."""
    load_builtins()
    return _check_kind(kind)


def register(kind: str, name: str | None = None, *, aliases: Iterable[str] = ()) -> Callable:
    """Decorator: register the decorated object under `name` (default: its ``__name__``)."""
    table = _check_kind(kind)

    def decorator(obj: Any) -> Any:
        for key in (name or obj.__name__, *aliases):
            existing = table.get(key)
            if existing is not None and existing is not obj:
                raise ValueError(f"{kind} {key!r} is already registered by {_describe(existing)}")
            table[key] = obj
        return obj

    return decorator


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


def check_params(
    fn: Callable,
    params: Mapping[str, Any],
    *,
    key: str,
    skip: int = 0,
    runtime: Iterable[str] = (),
) -> list[str]:
    """Problems binding `params` as keyword arguments of `fn`, each naming `key`.

    `skip` leading positional parameters are supplied by the caller (tensors, masks, ...), and so
    are the keyword arguments named in `runtime` (a generator, a reference model's outputs, ...):
    neither is offered to nor accepted from the config. Unknown names get a did-you-mean; required
    parameters that are missing are reported too. Functions taking ``**kwargs`` accept anything.
    """
    runtime = set(runtime)
    sig = inspect.signature(fn)
    settable = [p for p in list(sig.parameters.values())[skip:] if p.name not in runtime]
    problems = [f"{key}.{name}: supplied at run time, not by the config" for name in params if name in runtime]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in settable):
        return problems
    allowed = {p.name for p in settable if p.kind is not inspect.Parameter.VAR_POSITIONAL}
    for name in params:
        if name not in allowed and name not in runtime:
            problems.append(
                f"{key}.{name}: unknown parameter.{did_you_mean(name, allowed)} "
                f"Allowed: {', '.join(sorted(allowed)) or '(none)'}"
            )
    for p in settable:
        if p.default is inspect.Parameter.empty and p.kind in (
            inspect.Parameter.KEYWORD_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
        ) and p.name not in params:
            problems.append(f"{key}.{p.name}: required parameter is missing")
    return problems
