"""Each default lives in one place, and no named recipe cancels what a parent set.

A method block's defaults are its recipe's block dataclass (`Recipe.blocks`) and the signature of
the component a key of it names (`registry.contract(kind, name)`). A recipe YAML in conf/recipe sets
what makes it that recipe: it names its component (``loss.name``, ``merge.method``, ...) and sets the
values that differ from the defaults; it never restates a default, unless that overrides a different
value of a parent YAML. Nor does it set a model role to null: a recipe that does not take a role
inherits from a parent that does not set it (_merge_common.yaml, _shadow_ft_common.yaml; a name starting
with _ marks a parent, which `runner.compose.options` does not offer as a recipe).
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from runner import registry
from runner.config import ModelSpec, RunConfig

RECIPES = Path(__file__).resolve().parents[2] / "conf" / "recipe"
NAMES = sorted(p.stem for p in RECIPES.glob("*.yaml"))
NO_DEFAULT = object()


def load(name: str) -> dict:
    return yaml.safe_load((RECIPES / f"{name}.yaml").read_text()) or {}


def chain(name: str) -> list[tuple[str, dict]]:
    """The recipe's YAML and its parents (the plain names in `defaults:`), farthest parent first."""
    own = load(name)
    parents = [d for d in own.get("defaults", []) if isinstance(d, str) and d != "_self_"]
    return [layer for parent in parents for layer in chain(parent)] + [(name, own)]


def merged(layers: list[tuple[str, dict]], block: str) -> dict:
    """The block as these layers compose it, later ones winning (dicts merged key by key)."""
    def merge(a: dict, b: dict) -> dict:
        out = dict(a)
        for k, v in b.items():
            out[k] = merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else v
        return out

    result: dict = {}
    for _, cfg in layers:
        result = merge(result, cfg.get(block) or {})
    return result


def lookup(block: dict, path: tuple) -> object:
    for key in path:
        if not isinstance(block, dict) or key not in block:
            return NO_DEFAULT
        block = block[key]
    return block


def leaves(block: dict, path: tuple = ()):
    """(path, value) of every value in a block; a non-empty mapping is descended into."""
    for key, value in block.items():
        if isinstance(value, dict) and value:
            yield from leaves(value, path + (key,))
        else:
            yield path + (key,), value


def field_default(f: dataclasses.Field) -> object:
    if f.default is not dataclasses.MISSING:
        return f.default
    value = f.default_factory()
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def default_of(recipe, block: str, path: tuple, composed: dict) -> object:
    """The default of block.<path>: from the block's dataclass (nested ones included), else from the
    contract of the component it names in `composed`; NO_DEFAULT when there is none."""
    fields = {f.name: f for f in dataclasses.fields(recipe.blocks[block])}
    head, rest = path[0], path[1:]
    for c in recipe.components.get(block, ()):
        beside = c.params_key is None and head not in fields and not rest
        inside = c.params_key == head and len(rest) == 1
        if beside or inside:
            name = composed.get(c.name_key, field_default(fields[c.name_key]))
            if name in (None, c.none) or name not in registry.names(c.kind):
                return NO_DEFAULT
            param = registry.contract(c.kind, name).params.get(path[-1])
            return NO_DEFAULT if param is None or param.required else param.default
    if head not in fields:
        return NO_DEFAULT
    return lookup({head: field_default(fields[head])}, path)


def restated_defaults(layers: list[tuple[str, dict]]) -> list[str]:
    """The keys the last layer sets to their default while its parents do not set a different value."""
    own = layers[-1][1]
    kind = next((cfg["kind"] for _, cfg in reversed(layers) if "kind" in cfg), None)
    if kind not in registry.names("recipe"):  # kind: pipeline, whose steps are named recipes
        return []
    recipe = registry.get("recipe", kind)
    found = []
    for block in recipe.blocks:
        name_keys = {c.name_key for c in recipe.components.get(block, ())}
        parent, composed = merged(layers[:-1], block), merged(layers, block)
        for path, value in leaves(own.get(block) or {}):
            if path[0] in name_keys or (isinstance(value, str) and value.startswith("${")):
                continue  # naming the method makes the recipe; an interpolation is no default
            default = default_of(recipe, block, path, composed)
            if default is not NO_DEFAULT and value == default and lookup(parent, path) in (NO_DEFAULT, default):
                found.append(f"{block}.{'.'.join(map(str, path))}: {value!r} is the default")
    return found


def model_roles() -> set[str]:
    """The config keys that hold models (RunConfig fields typed ModelSpec, or a list of them)."""
    hints = typing.get_type_hints(RunConfig)
    return {key for key, hint in hints.items() if ModelSpec in (hint, *typing.get_args(hint))}


@pytest.mark.parametrize("name", NAMES)
def test_recipe_restates_no_default(name):
    found = restated_defaults(chain(name))
    assert not found, (f"conf/recipe/{name}.yaml restates defaults (they live in the block dataclass or the "
                       f"component's signature; `python -m runner.check recipe={name}` prints them): {found}")


@pytest.mark.parametrize("name", NAMES)
def test_recipe_sets_no_model_role_to_null(name):
    own = load(name)
    cancelled = sorted(role for role in model_roles() if role in own and own[role] is None)
    assert not cancelled, (f"conf/recipe/{name}.yaml cancels {cancelled} of a parent: inherit from a parent "
                           "that does not set them instead")


def test_the_check_finds_a_restated_default_but_not_an_override():
    parent = ("distill", {"kind": "distill", "loss": {"name": "fkl", "kd_ratio": 0.5}})
    child = ("child", {"loss": {"name": "akl", "mu": 0.5, "kd_ratio": 1.0, "temperature": 1.0,
                                "loca": {"enabled": True, "alpha": 0.9}}, "lora": {"rank": 64}})
    assert restated_defaults([parent, child]) == [
        "loss.mu: 0.5 is the default",  # the component's contract (akl's mu)
        "loss.temperature: 1.0 is the default",  # the block dataclass (LossConfig); kd_ratio overrides 0.5
        "loss.loca.alpha: 0.9 is the default",  # a nested dataclass (LocaConfig)
        "lora.rank: 64 is the default",
    ]
    quant = ("q", {"kind": "quantize", "quant": {"method": "rtn", "allocator": "lieq",
                                                 "allocator_params": {"metric": "compactness"}, "seed": "${seed}"}})
    assert restated_defaults([quant]) == ["quant.allocator_params.metric: 'compactness' is the default"]
    assert "instruct" in model_roles() and "models" in model_roles()
