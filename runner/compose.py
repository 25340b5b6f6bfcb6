"""Compose a job config from the repository's conf/ exactly as ``python -m runner <overrides>`` does.

Used where one job builds another (a pipeline's steps). It works inside a running Hydra app too:
Hydra's global state is set aside while composing and put back afterwards.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def recipe_names() -> list[str]:
    """The named recipes: the files in conf/recipe/."""
    return sorted(p.stem for p in (CONF_DIR / "recipe").glob("*.yaml"))


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
            return compose(config_name="config", overrides=list(overrides))
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
