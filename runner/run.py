"""One job: validate -> seed -> resolve resume -> baseline eval -> recipe -> eval stage -> results.json.

`run(cfg, run_dir)` is the whole job and is what tests call; `runner.cli` calls it (or, for a
pipeline config, `runner.pipeline.run_pipeline`, which calls it once per step). Every problem a user
can cause is found by `validate` before any model is loaded; whatever happens afterwards,
results.json is written (atomically) with the status.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from runner import registry, results
from runner.config import (
    ROLES,
    RunConfig,
    check_fields,
    check_roles,
    check_top_level,
    check_unused_blocks,
    raise_if,
)
from runner.errors import RunnerError
from runner.recipe import Blocks, Recipe, RecipeResult, RunContext
from runner.resume import check_resume, find_resume, record_in_index

log = logging.getLogger("runner")


# --------------------------------------------------------------------------------------------
# Validation


def validate(cfg: DictConfig, *, pending: tuple[str, ...] = ()) -> Recipe:
    """The recipe to run, after checking the whole config; raises one ConfigError listing every problem.

    `pending` names model roles (``model``, ``models[1]``) whose checkpoint an earlier pipeline step
    has yet to write: their paths are not checked.
    """
    return checked(cfg, pending=pending)[0]


def checked(cfg: DictConfig, *, pending: tuple[str, ...] = ()) -> tuple[Recipe, Blocks]:
    """`validate`, also returning the recipe's method blocks as it checked them (what `run` uses)."""
    from runner.data import check_data_spec
    from runner.evaluate import check_eval_spec
    from runner.loggers import check_loggers
    from runner.models import check_model_spec

    registry.import_plugins(list(cfg.plugins))
    problems = check_top_level(cfg) + check_fields(cfg, RunConfig, "")
    unknown = registry.check_name("recipe", cfg.kind, key="kind")
    if unknown:
        raise_if(problems + unknown)
    recipe: Recipe = registry.get("recipe", cfg.kind)()
    problems += check_roles(cfg, recipe.roles, recipe.optional_roles, cfg.kind)
    problems += check_unused_blocks(cfg, tuple(recipe.blocks), cfg.kind)
    for role in ROLES:
        if cfg.get(role) is not None and role in recipe.roles + recipe.optional_roles and role not in pending:
            problems += check_model_spec(cfg[role], role)
    for i, spec in enumerate(cfg.models or []):
        if f"models[{i}]" not in pending:
            problems += check_model_spec(spec, f"models[{i}]")
    if recipe.data_role:
        problems += check_data_spec(cfg.data)
    problems += check_eval_spec(cfg.eval)
    problems += check_resume(cfg)
    problems += check_loggers(list(cfg.train.loggers))
    blocks, block_problems = recipe.validate(cfg)
    raise_if(problems + block_problems)
    if recipe.data_role and cfg.data.source == "jsonl" and recipe.data_role not in pending:
        raise_if(_check_trainable(cfg, recipe.data_role))
    return recipe, blocks


def _check_trainable(cfg: DictConfig, role: str) -> list[str]:
    """A JSONL file has an example with a trainable token, tokenized as the recipe will (its tokenizer
    only, no weights); the toy source always does, and a hub dataset is not downloaded to check."""
    from runner.data import check_trainable
    from runner.models import load_tokenizer, resolve_model_path

    spec = cfg[role]
    return check_trainable(cfg.data, load_tokenizer(resolve_model_path(spec), trust_remote_code=spec.trust_remote_code,
                                                    revision=spec.revision))


# --------------------------------------------------------------------------------------------
# The job


def run(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Run one job in `run_dir`; returns its record (also written to run_dir/results.json).

    Raises RunnerError subclasses for user errors and failed training, after recording them.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    record = results.new_record(cfg, run_dir)
    timings = record["timings"]
    t_start = time.perf_counter()
    main_process = True
    try:
        t = time.perf_counter()
        recipe, blocks = checked(cfg)
        timings["validate_s"] = round(time.perf_counter() - t, 3)

        from accelerate.utils import set_seed

        from runner.train import reset_accelerator_state

        reset_accelerator_state()  # an earlier job of this process (multirun, pipeline) may have configured it
        set_seed(cfg.seed)
        ctx = RunContext(cfg=cfg, run_dir=run_dir, blocks=blocks, resume_from=find_resume(cfg, run_dir))
        main_process = ctx.is_main_process
        if not main_process:
            logging.getLogger().setLevel(logging.WARNING)
        if main_process:
            record_in_index(cfg, run_dir)
        if ctx.resume_from:
            log.info("resuming from %s", ctx.resume_from)

        baseline_role = recipe.baseline_for(cfg)
        if cfg.eval.tasks and cfg.eval.baseline and baseline_role and main_process:
            t = time.perf_counter()
            record["baseline_metrics"], record["baseline_eval_command"], record["baseline_cached"] = \
                _evaluate_role(ctx, baseline_role)
            timings["baseline_eval_s"] = round(time.perf_counter() - t, 3)

        t = time.perf_counter()
        out: RecipeResult = recipe.run(cfg, ctx)
        timings["recipe_s"] = round(time.perf_counter() - t, 3)
        record["checkpoint"] = str(out.checkpoint.resolve()) if out.checkpoint else None
        record["train"] = out.train.summary() if out.train else None
        record.update(out.extra)

        if out.metrics is not None:
            record["metrics"] = out.metrics
        elif cfg.eval.tasks and main_process and (out.model is not None or out.checkpoint is not None):
            t = time.perf_counter()
            record["metrics"], record["eval_command"] = _evaluate_output(ctx, out)
            timings["eval_s"] = round(time.perf_counter() - t, 3)
        if out.stats:
            record["metrics"] = {**out.stats, **(record.get("metrics") or {})}
        record["status"] = "completed"
        if main_process:
            results.print_summary(cfg, record)
        return record
    except KeyboardInterrupt:
        record["status"] = "interrupted"
        record["error"] = "interrupted (KeyboardInterrupt)"
        raise
    except RunnerError as exc:
        record["status"] = "failed"
        record["error"] = str(exc)
        raise
    except BaseException as exc:
        record["status"] = "failed"
        record["error"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        timings["total_s"] = round(time.perf_counter() - t_start, 3)
        record["finished_at"] = results.now()
        if main_process:
            results.write(run_dir, record)


def _evaluate_role(ctx: RunContext, role: str) -> tuple[dict[str, float], dict | None, bool]:
    """(metrics, the lm_eval command, whether it came from the cache) of the input model `role`."""
    from runner import eval_cache
    from runner.evaluate import evaluate
    from runner.models import resolve_model_path

    spec, out_dir = ctx.cfg[role], ctx.run_dir / "eval" / "baseline"
    folder = resolve_model_path(spec)
    key = eval_cache.cache_key(folder, spec, ctx.cfg.eval, str(ctx.accelerator.device)) if ctx.cfg.eval.cache else None
    if key is not None:
        hit = eval_cache.load(key, out_dir)
        if hit is not None:
            log.info("baseline of %s from the eval cache (%s; eval.cache=false evaluates again)", role, key)
            return (*hit, True)
    model, tokenizer = ctx.load_model(role)
    result = evaluate(model, tokenizer, ctx.cfg.eval, out_dir, label=f"{role} (baseline)",
                      folder=folder, trust_remote_code=spec.trust_remote_code)
    del model
    if key is not None:
        eval_cache.store(key, result.metrics, result.command, out_dir)
    return result.metrics, result.command, False


def _evaluate_output(ctx: RunContext, out: RecipeResult) -> tuple[dict[str, float], dict | None]:
    """(metrics, the lm_eval command on its checkpoint) of what the recipe produced."""
    from accelerate.utils import DistributedType

    from runner.evaluate import evaluate
    from runner.models import load_model

    # an FSDP-sharded model cannot run on the main process alone: evaluate its gathered checkpoint
    sharded = ctx.accelerator.distributed_type == DistributedType.FSDP
    if sharded and out.checkpoint is None:
        log.warning("not evaluated: under FSDP the result is evaluated from its checkpoint; save_checkpoint=false wrote none")
        return {}, None
    if out.model is not None and not sharded:
        model, tokenizer = ctx.accelerator.unwrap_model(out.model), out.tokenizer
    else:
        model, tokenizer = load_model({"path": str(out.checkpoint)}, device=ctx.accelerator.device)
    result = evaluate(model, tokenizer, ctx.cfg.eval, ctx.run_dir / "eval" / "final", label="result",
                      folder=out.checkpoint)
    return result.metrics, result.command
