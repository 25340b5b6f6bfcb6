"""The benchmark stage: lm-eval in process, on the model object a recipe produced.

Task folders plugged in through the ``task_dir`` hook (the toy world's `runner/toy/lm_tasks`) resolve
from any working directory. Any other task name is looked up in the folders of ``eval.include_path``
and then in lm-eval's own registry (indexing that registry takes about ten seconds, so it is only
built when needed).

Metrics are flattened to ``{"<task>/<metric>": float}`` (a filter other than ``none`` is appended
as ``<metric>@<filter>``). For generation tasks the stage also reports, from the logged samples,
``response_tokens`` (mean length of the responses in tokens, think block included) and
``think_rate`` (share of responses that open a think block).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"  # a reasoning block, as Qwen3's template and the toy world write it
_TASK_LINE = re.compile(r"^(?:task|group):\s*([\w\-.]+)\s*$", re.M)


@dataclass
class EvalResult:
    metrics: dict[str, float]
    raw_path: Path | None  # None on processes other than the main one
    wall_s: float
    command: dict[str, Any] | None = None  # the lm_eval CLI command that scores the model's folder the same way


def _task_names_in(folder: Path) -> set[str]:
    found = set()
    for f in folder.rglob("*.yaml"):
        found.update(_TASK_LINE.findall(f.read_text(errors="ignore")))
    return found


def _task_dirs() -> list[Path]:
    from runner import registry

    return list(registry.entries("task_dir").values())


def shipped_task_names() -> list[str]:
    """The tasks in the folders plugged in through the task_dir hook (the toy world's)."""
    return sorted(set().union(*(_task_names_in(d) for d in _task_dirs())))


def include_paths(ev: Any) -> list[str]:
    return [str(d) for d in _task_dirs()] + [str(Path(p).expanduser().resolve()) for p in ev.include_path]


def check_eval_spec(ev: Any, key: str = "eval") -> list[str]:
    """Problems with the eval block: include paths that do not exist, task names nobody knows."""
    from runner.registry import did_you_mean

    problems = [f"{key}.include_path: folder {p!r} not found" for p in ev.include_path if not Path(p).expanduser().is_dir()]
    if problems or not ev.tasks:
        return problems
    local = set(shipped_task_names())
    for p in ev.include_path:
        local |= _task_names_in(Path(p).expanduser())
    unknown = [t for t in ev.tasks if t not in local]
    if unknown:
        known = local | set(_builtin_task_manager(ev).all_tasks)
        for t in unknown:
            if t not in known:
                problems.append(f"{key}.tasks: unknown task {t!r}.{did_you_mean(t, known)} Shipped tasks: {', '.join(sorted(local))}")
    return problems


_BUILTIN = {}


def _builtin_task_manager(ev: Any):
    from lm_eval.tasks import TaskManager

    key = tuple(include_paths(ev))
    if key not in _BUILTIN:
        log.info("indexing lm-eval's built-in tasks (about 10 s)")
        _BUILTIN[key] = TaskManager(include_path=list(key), include_defaults=True)
    return _BUILTIN[key]


def _task_manager(ev: Any):
    from lm_eval.tasks import TaskManager

    local = set(shipped_task_names())
    for p in ev.include_path:
        local |= _task_names_in(Path(p).expanduser())
    if all(t in local for t in ev.tasks):
        return TaskManager(include_path=include_paths(ev), include_defaults=False)
    return _builtin_task_manager(ev)


def flatten_metrics(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """lm-eval's ``{task: {"metric,filter": value}}`` as ``{"task/metric": float}`` (numbers only)."""
    flat = {}
    for task, values in results.items():
        for name, value in values.items():
            if name == "alias" or "," not in name or isinstance(value, (str, bool)) or value is None:
                continue
            metric, filt = name.split(",", 1)
            if metric.endswith("_stderr") and (not isinstance(value, (int, float)) or math.isnan(value)):
                continue
            key = f"{task}/{metric}" if filt == "none" else f"{task}/{metric}@{filt}"
            flat[key] = float(value)
    return flat


def _responses(sample: dict) -> list[str]:
    """Every response of one logged sample: one for greedy tasks, all n for the sampled ones."""
    found, stack = [], [sample.get("filtered_resps") or sample.get("resps") or []]
    while stack:
        item = stack.pop()
        if isinstance(item, (list, tuple)):
            stack.extend(reversed(item))
        else:
            found.append(str(item))
    return found


def response_stats(samples: list[dict], tokenizer) -> dict[str, float]:
    """Mean response length in tokens and the share of responses with a think block, over all responses."""
    responses = [r for s in samples for r in _responses(s)]
    if not responses:
        return {}
    lengths = [len(ids) for ids in tokenizer(responses, add_special_tokens=False).input_ids]
    return {
        "response_tokens": sum(lengths) / len(lengths),
        "think_rate": sum(THINK_OPEN in r for r in responses) / len(responses),
    }


def sampled_tasks(ev: Any, task_manager) -> list:
    """The tasks to run: names, except that with `eval.sampling` set the tasks that sample (metadata
    ``sampled: true``) come as loaded Task objects with n, temperature and top_p overridden."""
    s = ev.sampling
    gen = {k: v for k, v in (("temperature", s.temperature), ("top_p", s.top_p)) if v is not None}
    if s.n is None and not gen:
        return list(ev.tasks)
    from lm_eval.api.task import Task

    tasks = []
    for name, task in task_manager.load_task_or_group(list(ev.tasks)).items():
        if not isinstance(task, Task):  # a group: its tasks run as configured
            tasks.append(getattr(name, "group_name", str(name)))
            continue
        if (task.config.metadata or {}).get("sampled"):
            if s.n is not None:
                task.set_config("repeats", int(s.n))
            task.set_config("generation_kwargs", gen, update=True)
        tasks.append(task)
    return tasks


def lm_eval_command(ev: Any, folder: str | Path, *, chat: bool, dtype: str, device: str,
                    trust_remote_code: bool = False) -> dict[str, Any]:
    """The ``lm_eval`` command line that scores the HF folder `folder` as this stage scores the model
    in memory: the same tasks and task folder, chat template, limit, shots, generation length,
    thinking switch, batch size and seeds.

    Returns ``{"command": str, "exact": bool, "note": str | None}``; `exact` is false where the CLI
    has no equivalent (``eval.sampling`` overrides of the sampled tasks, tasks from several folders).
    """
    import shlex

    model_args = {"pretrained": str(Path(folder).resolve()), "dtype": dtype}
    if ev.enable_thinking is not None:
        model_args["enable_thinking"] = bool(ev.enable_thinking)
    if trust_remote_code:
        model_args["trust_remote_code"] = True
    args = ["lm_eval", "--model", "hf", "--model_args", ",".join(f"{k}={v}" for k, v in model_args.items()),
            "--tasks", ",".join(ev.tasks), "--batch_size", str(ev.batch_size), "--device", device,
            "--seed", ",".join([str(ev.seed)] * 4)]
    notes = []
    folders = [d for d in include_paths(ev) if set(ev.tasks) & _task_names_in(Path(d))]
    if len(folders) == 1:
        args += ["--include_path", folders[0]]
    elif folders:
        notes.append(f"the tasks come from {len(folders)} folders and lm_eval takes one --include_path")
    if chat:
        args.append("--apply_chat_template")
    if ev.limit is not None:
        args += ["--limit", str(ev.limit)]
    if ev.num_fewshot is not None:
        args += ["--num_fewshot", str(ev.num_fewshot)]
    if ev.max_gen_toks:
        args += ["--gen_kwargs", f"max_gen_toks={ev.max_gen_toks}"]
    s = ev.sampling
    if any(v is not None for v in (s.n, s.temperature, s.top_p)):
        notes.append("eval.sampling changes the sampled tasks' repeats and generation settings, which the CLI "
                     "sets per task only in the task YAML")
    return {"command": shlex.join(args), "exact": not notes, "note": "; ".join(notes) or None}


REQUEST_KINDS = ("generate_until", "loglikelihood", "loglikelihood_rolling")  # what lm-eval asks a model


class _Answered:
    """lm-eval's cache hook, which sees every request a model answers: also advances the bar by one
    per answer of the request kind being served (loglikelihood_rolling answers its windows under no
    cache key, so a rolling request counts once, when its document is done)."""

    def __init__(self, inner, bar, kind: str):
        self.inner, self.bar, self.kind = inner, bar, kind

    def add_partial(self, attr, req, res) -> None:
        if attr == self.kind:
            self.bar.advance()
        self.inner.add_partial(attr, req, res)


@contextmanager
def _requests_counted(lm, bar):
    """One progress line for the whole evaluation instead of lm-eval's tqdm bars.

    Each request method of `lm` (HFLM) runs with its tqdm off, adds its requests to the bar's total
    (known one request kind at a time) and advances it per answer. The per-document bar of building
    the requests (``lm_eval.api.task``'s tqdm, which has no switch) is off while the block runs.
    """

    def counted(kind: str, method):
        def call(requests, disable_tqdm: bool = False, **kwargs):
            bar.add_total(len(requests))
            bar.update(info=kind)
            hook = lm.cache_hook
            lm.cache_hook = _Answered(hook, bar, kind)
            try:
                return method(requests, disable_tqdm=True, **kwargs)
            finally:
                lm.cache_hook = hook
        return call

    def quiet(method):  # loglikelihood_rolling calls it with disable_tqdm=False, batch by batch
        def call(requests, disable_tqdm: bool = False, **kwargs):
            return method(requests, disable_tqdm=True, **kwargs)
        return call

    for kind in REQUEST_KINDS:
        setattr(lm, kind, counted(kind, getattr(lm, kind)))
    if hasattr(lm, "_loglikelihood_tokens"):
        lm._loglikelihood_tokens = quiet(lm._loglikelihood_tokens)
    import lm_eval.api.task as task_module

    task_tqdm = getattr(task_module, "tqdm", None)
    if task_tqdm is not None:
        task_module.tqdm = functools.partial(task_tqdm, disable=True)
    try:
        yield
    finally:
        if task_tqdm is not None:
            task_module.tqdm = task_tqdm
        for kind in (*REQUEST_KINDS, "_loglikelihood_tokens"):
            lm.__dict__.pop(kind, None)


def evaluate(model, tokenizer, ev: Any, out_dir: str | Path, *, label: str = "model",
             folder: str | Path | None = None, trust_remote_code: bool = False) -> EvalResult:
    """Run the configured tasks on `model`; write raw results and samples under `out_dir`. With the
    HF `folder` the model was loaded from (or saved to), the result carries the equivalent lm_eval
    command."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from runner.progress import progress

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    chat = ev.chat_template if ev.chat_template is not None else getattr(tokenizer, "chat_template", None) is not None
    chat_args = {} if ev.enable_thinking is None else {"enable_thinking": bool(ev.enable_thinking)}
    was_training = model.training
    # HFLM's own generation length is 256 tokens; eval.max_gen_toks changes it through gen_kwargs
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=ev.batch_size, chat_template_args=chat_args or None)
    gen_kwargs = {"max_gen_toks": ev.max_gen_toks} if ev.max_gen_toks else None
    task_manager = _task_manager(ev)
    try:
        with progress(f"evaluate {label}") as bar, _requests_counted(lm, bar):
            res = lm_eval.simple_evaluate(
                model=lm,
                tasks=sampled_tasks(ev, task_manager),
                num_fewshot=ev.num_fewshot,
                limit=ev.limit,
                task_manager=task_manager,
                log_samples=True,
                apply_chat_template=chat,
                gen_kwargs=gen_kwargs,
                bootstrap_iters=ev.bootstrap_iters,
                random_seed=ev.seed,
                numpy_random_seed=ev.seed,
                torch_random_seed=ev.seed,
                fewshot_random_seed=ev.seed,
            )
    finally:
        model.train(was_training)
    if res is None:  # a non-main process of a multi-process evaluation: lm-eval gathers the results on rank 0
        return EvalResult(metrics={}, raw_path=None, wall_s=time.perf_counter() - t0)
    metrics = flatten_metrics(res["results"])
    samples = res.pop("samples", {}) or {}
    for task, task_samples in samples.items():
        if res.get("configs", {}).get(task, {}).get("output_type") == "generate_until":
            for k, v in response_stats(task_samples, tokenizer).items():
                metrics[f"{task}/{k}"] = v
    raw_path = out_dir / "lm_eval_results.json"
    raw_path.write_text(json.dumps(res, indent=2, default=str))
    if ev.log_samples:
        for task, task_samples in samples.items():
            with (out_dir / f"samples_{task}.jsonl").open("w") as f:
                for s in task_samples:
                    f.write(json.dumps(s, default=str) + "\n")
    wall = time.perf_counter() - t0
    log.info("evaluated %s on %s in %.1f s", label, ", ".join(ev.tasks), wall)
    command = None
    if folder is not None:
        command = lm_eval_command(ev, folder, chat=chat, dtype=str(model.dtype).removeprefix("torch."),
                                  device=str(model.device), trust_remote_code=trust_remote_code)
    return EvalResult(metrics=metrics, raw_path=raw_path, wall_s=wall, command=command)


def metrics_table(metrics: dict[str, float], baseline: dict[str, float] | None = None, title: str = "results"):
    """A rich table of metrics, with baseline and delta columns when a baseline is given."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("task/metric")
    if baseline:
        table.add_column("baseline", justify="right")
    table.add_column("value", justify="right")
    if baseline:
        table.add_column("delta", justify="right")
    for key in sorted(metrics):
        row = [key]
        if baseline:
            row.append(_num(baseline.get(key)))
        row.append(_num(metrics[key]))
        if baseline:
            b = baseline.get(key)
            row.append(f"{metrics[key] - b:+.4f}" if b is not None else "")
        table.add_row(*row)
    return table


def _num(x: float | None) -> str:
    return "" if x is None else f"{x:.4f}"
