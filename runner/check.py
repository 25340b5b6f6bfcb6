"""``python -m runner.check recipe=<name> [key=value ...]``: check a config without running it.

Composes and validates exactly as ``python -m runner`` would (the same option check, composition
and `validate`), then prints the resolved config, with every method block's defaults filled in
from its dataclass and its component's signature, and the checks it passed. Exits 0 when the
config would run, 2 with every problem when it would not. No weights are loaded and nothing is
written (a toy zoo name is not built).

    python -m runner.check recipe=akl_distill loss.mu=0.3
    python -m runner.check recipe=distill_quant_pipeline
"""

from __future__ import annotations

import sys
from typing import Any

from omegaconf import DictConfig, OmegaConf

from runner.errors import ConfigError

def resolved_blocks(recipe, blocks) -> dict[str, dict]:
    """Each method block as the recipe will use it: its own keys (typed, defaults filled in), the
    component parameters it sets, and the defaults of those it leaves out."""
    from runner import registry
    from runner.config import to_container

    out = {}
    for name, typed in blocks.typed.items():
        block = to_container(typed)
        for c in recipe.components.get(name, ()):
            component = block.get(c.name_key)
            if component is None or component == c.none:
                continue
            params = {p.name: p.default for p in registry.contract(c.kind, component).params.values() if not p.required}
            if c.params_key is None:
                block = {**block, **{k: v for k, v in params.items() if k not in block}, **blocks.params[name]}
            else:
                block[c.params_key] = {**params, **(block.get(c.params_key) or {})}
        out[name] = block
    return out


def passed(cfg: DictConfig, recipe, blocks) -> list[str]:
    """One line per check `validate` made, naming what it checked."""
    from runner.config import ROLES

    roles = [f"{r}={cfg[r].path}" for r in ROLES if cfg.get(r) is not None]
    roles += [f"models[{i}]={m.path}" for i, m in enumerate(cfg.get("models") or [])]
    lines = ["keys and types (the Hydra schema), values in range and in their choice lists",
             f"recipe {cfg.name} (kind {cfg.kind}); model roles it takes: "
             f"{', '.join(sorted(recipe.uses(cfg))) or 'none'}",
             f"models found (a folder's config.json, a zoo name or a cached hub id): {', '.join(roles) or 'none'}"]
    if recipe.data_role:
        where = cfg.data.path or cfg.data.name or f"{cfg.data.format} {cfg.data.difficulty}"
        lines.append(f"data: source {cfg.data.source} ({where})")
    for name in blocks.typed:
        named = [f"{c.kind} {blocks[name][c.name_key]!r}" for c in recipe.components.get(name, ())
                 if blocks[name][c.name_key] not in (None, c.none)]
        lines.append(f"{name}: its keys{' and ' + ', '.join(named) + ' with its parameters' if named else ''}")
    tasks = ", ".join(cfg.eval.tasks) or "none (no evaluation)"
    lines.append(f"eval tasks known: {tasks}")
    lines.append(f"resume: {cfg.train.resume}")
    return lines


def check(overrides: list[str]) -> tuple[str, list[str]]:
    """(the resolved config as YAML, the checks passed); raises ConfigError with every problem."""
    from runner.cli import quiet_libraries
    from runner.compose import check_options, composition_error, compose_job

    problems = check_options(overrides)
    if problems:
        raise ConfigError(problems)
    try:
        cfg = compose_job(overrides)
    except Exception as exc:  # Hydra's and OmegaConf's composition errors
        raise ConfigError(composition_error(exc)) from None
    quiet_libraries(verbose=bool(cfg.get("verbose", False)))
    if cfg.get("kind") == "pipeline":
        from runner.pipeline import validate_pipeline

        steps = validate_pipeline(cfg)
        lines = [f"step {s.index} {s.label}: recipe {s.recipe} composed and validated"
                 + (f", its {s.feed} fed by step {s.index - 1}" if s.feed else "") for s in steps]
        return OmegaConf.to_yaml(cfg), ["keys and types (the Hydra schema), the pipeline block", *lines]
    from runner.run import checked

    recipe, blocks = checked(cfg)
    shown: Any = OmegaConf.to_container(cfg, resolve=True)
    shown.update(resolved_blocks(recipe, blocks))
    return OmegaConf.to_yaml(shown), passed(cfg, recipe, blocks)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    try:
        text, lines = check(argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(text.rstrip())
    print("\nchecks passed:\n" + "\n".join(f"  - {line}" for line in lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
