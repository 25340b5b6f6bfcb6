"""Compose a job config from the repository's conf/ exactly as ``python -m runner <overrides>`` does.

Used where one job builds another (a pipeline's steps). It works inside a running Hydra app too:
Hydra's global state is set aside while composing and put back afterwards.
"""

from __future__ import annotations

import re
from pathlib import Path

from omegaconf import DictConfig

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
ROLE_NODE = "_role"  # conf/model/_role.yaml: an empty option that makes a role's node exist
GROUPS = ("recipe", "data", "eval", "model")  # the runner's config groups (hydra/... are Hydra's own)
_GROUP_OVERRIDE = re.compile(rf"^(?P<group>{'|'.join(GROUPS)})(@(?P<role>[\w.]+))?=(?P<value>.*)$")
_ROLE_KEY = re.compile(r"^\+{0,2}(?P<role>\w+)\.")


def options(group: str) -> list[str]:
    """The options of a config group: the files in conf/<group>/ (internal ones, starting with _, left out)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml") if not p.stem.startswith("_"))


def recipe_names() -> list[str]:
    """The named recipes: the files in conf/recipe/."""
    return options("recipe")


def check_options(overrides: list[str]) -> list[str]:
    """Every group option the overrides name that does not exist, and every ``model@X`` whose X is no
    role, each with a did-you-mean. A plain value or a comma list (a sweep) is checked; Hydra's sweep
    functions (range(...), choice(...)) are left to Hydra."""
    from runner.config import ROLES
    from runner.registry import did_you_mean

    problems = []
    for override in overrides:
        match = _GROUP_OVERRIDE.match(override.lstrip("+~"))
        if not match:
            continue
        group, role, value = match["group"], match["role"], match["value"]
        key = f"{group}@{role}" if role else group
        if group == "model" and (role or "model") not in ROLES:
            problems.append(f"{key}: {role!r} is not a model role.{did_you_mean(role, ROLES)} "
                            f"Roles: {', '.join(ROLES)}")
            continue
        if "(" in value or "[" in value:
            continue
        valid = options(group)
        for name in value.split(","):
            if name and name != "null" and name not in valid:
                problems.append(f"{key}: no {group} option {name!r} (conf/{group}/).{did_you_mean(name, valid)} "
                                f"Options: {', '.join(valid)}")
    return problems


def with_role_nodes(overrides: list[str]) -> list[str]:
    """The overrides, plus ``model@<role>=_role`` for each role that a ``<role>.<key>=...`` override
    sets without a model option: the empty option makes the role's node exist even where the recipe
    leaves it empty, so ``teacher.path=X`` works for any recipe (OmegaConf cannot set a key inside
    an empty typed node). Where the recipe sets the role, the empty option changes nothing."""
    from runner.config import ROLES

    chosen = {m["role"] or "model" for o in overrides if (m := _GROUP_OVERRIDE.match(o.lstrip("+~")))
              and m["group"] == "model"}
    roles = dict.fromkeys(m["role"] for o in overrides if (m := _ROLE_KEY.match(o)) and m["role"] in ROLES)
    group = {"model": "model"}  # the defaults list names the model role's entry plainly, the others model@<role>
    return [*overrides, *(f"{group.get(r, f'model@{r}')}={ROLE_NODE}" for r in roles if r not in chosen)]


def compose_job(overrides: list[str]) -> DictConfig:
    """The job config for `overrides` (the ``hydra`` node left out).

    Raises Hydra's and OmegaConf's own exceptions for a bad override; callers turn them into
    messages (see `composition_error`).
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    from runner.config import register_configs
    from runner.resolvers import register_resolvers

    register_configs()
    register_resolvers()
    outer = get_gh_backup()  # the running app's Hydra, if any: initialize_config_dir refuses to nest
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
            return compose(config_name="config", overrides=with_role_nodes(list(overrides)))
    finally:
        restore_gh_from_backup(outer)


def composition_error(exc: BaseException) -> str:
    """One line for a failed composition: Hydra's message and the OmegaConf cause it wraps."""
    parts = [str(exc).strip()]
    if exc.__cause__ is not None:
        parts.append(str(exc.__cause__).strip())
    lines = [line.strip() for part in parts for line in part.splitlines()]
    # drop OmegaConf's object-type trailers; keep what names the key and the reason
    keep = [line.rstrip(".") for line in lines
            if line and not line.startswith(("reference_type=", "object_type=", "See https://"))]
    return "; ".join(keep)
