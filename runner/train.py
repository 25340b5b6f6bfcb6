"""The one training loop, shared by every recipe that trains.

A recipe supplies a loss function ``loss_fn(model, batch, step) -> LossOutput`` (the mean loss of one
micro-batch and the number of tokens it averaged over; a batch holds ``input_ids``, ``attention_mask``,
``labels`` and ``index``, the rows' positions in the example list); the loop does the rest: accelerate
(single process, or DDP under ``accelerate launch``), AdamW with a warm-up schedule, gradient
accumulation, clipping, periodic atomic checkpoints with optimizer and RNG state, resume, a NaN/inf
guard, a progress bar and log lines from the main process, and optional TensorBoard.

Normalisation: the gradient of one optimizer step is the token-mean over *every* micro-batch of
the step on every process (each micro-batch's loss is weighted by its token count, and gradients
are rescaled once by the global count). So a step sees the same gradient whatever the micro-batch
size, accumulation or number of processes, as long as the global batch is the same.

Data order: micro-step ``i`` of the run takes a fixed slice of a per-epoch permutation seeded by
``train.seed`` and the epoch, split across processes, so a resumed run continues with exactly the
batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from runner import atomic
from runner.data import collate, shift_labels
from runner.errors import ConfigError, TrainingDiverged
from runner.progress import progress_bar

log = logging.getLogger(__name__)

STATE_DIR = "state"  # training states: <run folder>/state/step-N
_STEP_DIR = re.compile(r"^step-(\d+)$")


def run_dir_of(state: str | Path) -> Path:
    """The run folder a training state (``<run folder>/state/step-N``) belongs to."""
    return Path(state).parent.parent


@dataclass
class LossOutput:
    loss: torch.Tensor  # mean over `num_tokens` tokens of this micro-batch (0 when there are none)
    num_tokens: int | torch.Tensor
    logs: dict[str, float] = field(default_factory=dict)  # extra per-micro-batch values to log


# loss_fn(model, batch, step): `step` (0-based optimizer step) lets a loss make per-step choices
# (on-policy sampling) that a resumed run repeats exactly.
LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor], int], LossOutput]


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    tokens: int
    tokens_per_s: float
    wall_s: float
    resumed_from: str | None = None
    trainable_parameters: int = 0  # what the optimizer updated (LoRA: the adapters only)
    history: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "history"}


def causal_lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], step: int = 0) -> LossOutput:
    """Token-mean cross-entropy on the label tokens (fp32 logits)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = out.logits[:, :-1].float()
    targets, mask = shift_labels(batch["labels"])
    per_token = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    n = mask.sum()
    loss = (per_token * mask.flatten()).sum() / n.clamp(min=1)
    return LossOutput(loss, n)


# --------------------------------------------------------------------------------------------
# Schedule and data order


def lr_factor(name: str, step: int, total: int, warmup: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based)."""
    if step < warmup:
        return (step + 1) / warmup
    if name in ("constant", "constant_with_warmup"):
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if name == "linear":
        return max(0.0, 1.0 - progress)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    if name == "cosine":
        return cosine
    if name == "cosine_with_min_lr":
        return min_ratio + (1.0 - min_ratio) * cosine
    raise ValueError(f"unknown schedule {name!r}")


class BatchPlan:
    """Which examples each process takes at each micro-step; a pure function of the micro-step."""

    def __init__(self, n_examples: int, micro_batch: int, world_size: int, rank: int, seed: int):
        self.global_batch = micro_batch * world_size
        if n_examples < self.global_batch:
            raise ConfigError(
                f"train.batch_size: {micro_batch} x {world_size} process(es) needs at least {self.global_batch} "
                f"examples, the data has {n_examples}"
            )
        self.n, self.micro_batch, self.rank, self.seed = n_examples, micro_batch, rank, seed
        self.per_epoch = n_examples // self.global_batch  # the incomplete tail of each epoch is skipped
        self._epoch, self._perm = -1, None

    def indices(self, micro_step: int) -> list[int]:
        epoch, k = divmod(micro_step, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        start = k * self.global_batch + self.rank * self.micro_batch
        return self._perm[start: start + self.micro_batch].tolist()


# --------------------------------------------------------------------------------------------
# Accelerator and checkpoints


def make_accelerator(train_cfg: Any):
    """An Accelerator for this run: CPU unless a GPU is present (or `train.cpu` says otherwise)."""
    from accelerate import Accelerator

    cpu = train_cfg.cpu if train_cfg.cpu is not None else not torch.cuda.is_available()
    if cpu and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        # accelerate applies FSDP on GPUs (and other accelerators) only: on CPU, fsdp_version 2 quietly
        # runs DDP instead and fsdp_version 1 fails inside accelerate with "no available devices found"
        raise ConfigError("accelerate config: FSDP was asked for, but this run is on the CPU, where accelerate "
                          "does not apply FSDP (it would run DDP instead, or fail to start). On a CPU machine use "
                          "conf/accelerate/cpu_ddp.yaml")
    accelerator = Accelerator(cpu=cpu, mixed_precision=train_cfg.mixed_precision)
    check_launch(accelerator)
    return accelerator


def check_launch(accelerator) -> None:
    """Stop launches that accelerate would run, but not as asked, before any work."""
    from accelerate.utils import DistributedType

    launched = int(os.environ.get("WORLD_SIZE", "1"))
    kind = accelerator.distributed_type
    if launched > 1 and accelerator.num_processes == 1:
        # accelerate with cpu=False and no GPU: every process would train alone on the same data
        raise ConfigError(f"train.cpu: accelerate launch started {launched} processes, but this one joined no process "
                          "group (train.cpu=false without a GPU?); leave train.cpu unset or true on a CPU machine")
    if kind == DistributedType.DEEPSPEED:
        # DeepSpeed steps the optimizer inside backward(), before the loop's global token-count rescaling,
        # clipping and NaN guard, so its updates would differ from every other launch mode
        raise ConfigError("accelerate config: DeepSpeed is not supported by the runner's training loop; for sharded "
                          "training use FSDP (conf/accelerate/fsdp.yaml)")


def reset_accelerator_state() -> None:
    """Forget accelerate's process-wide state so the next job in this process may configure it anew.

    Only outside distributed runs: there the state holds the process group.
    """
    from accelerate.state import AcceleratorState, PartialState

    if PartialState._shared_state and PartialState().num_processes > 1:
        return
    AcceleratorState._reset_state(reset_partial_state=True)


def find_last_state(state_root: Path) -> Path | None:
    """The newest complete checkpoint folder under `state_root` (complete = has trainer_state.json)."""
    if not state_root.is_dir():
        return None
    done = [(int(m.group(1)), p) for p in state_root.iterdir()
            if (m := _STEP_DIR.match(p.name)) and (p / "trainer_state.json").is_file()]
    return max(done)[1] if done else None


def _save_state(accelerator, state_root: Path, step: int, trainer_state: dict, keep_last: int) -> Path:
    final = state_root / f"step-{step:07d}"
    tmp = state_root / f".step-{step:07d}.tmp"  # one name every process agrees on
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # trainer_state.json is written last: a folder without it is incomplete and never resumed from.
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state))
        atomic.commit(tmp, final)
        old = sorted(p for p in state_root.iterdir() if _STEP_DIR.match(p.name))
        for p in old[: max(0, len(old) - keep_last)]:
            shutil.rmtree(p, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


# --------------------------------------------------------------------------------------------
# The loop


def _optimizer(model: torch.nn.Module, cfg: Any) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)  # no decay on biases and norm weights
    if not decay and not no_decay:
        raise ConfigError("train: the model has no trainable parameters")
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel per parameter and no temporaries (transformers' Trainer default for torch >= 2.8,
    # `adamw_torch_fused`); torch's own default builds a full-size denominator tensor per parameter (CPU)
    # or for all of them at once (for-each on GPUs)
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps, fused=True
    )


def total_steps(cfg: Any, n_examples: int, world_size: int) -> int:
    if cfg.steps is not None:
        return int(cfg.steps)
    per_epoch = n_examples // (cfg.batch_size * world_size * cfg.grad_accum)
    return max(1, math.ceil(cfg.epochs * per_epoch))


def train(
    model: torch.nn.Module,
    examples: list[dict],
    loss_fn: LossFn,
    cfg: Any,
    *,
    accelerator,
    run_dir: str | Path,
    pad_id: int,
    resume_from: str | Path | None = None,
    on_step: Callable[[int, dict], None] | None = None,
    desc: str = "train",
    loggers: Sequence[Any] | None = None,
) -> TrainResult:
    """Train `model` in place on tokenized `examples`; returns what happened.

    `cfg` is the `train` config block. `resume_from` is a checkpoint folder written by this loop.
    `on_step(step, logs)` is called on every process after each optimizer step. `loggers` (opened
    `runner.loggers` components, used on the main process and closed at the end) get every logged
    step; by default the jsonl one writes train_log.jsonl in `run_dir`.
    """
    run_dir = Path(run_dir)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
    state_root = run_dir / STATE_DIR
    world, rank = accelerator.num_processes, accelerator.process_index
    steps = total_steps(cfg, len(examples), world)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(round(cfg.warmup_ratio * steps))
    plan = BatchPlan(len(examples), cfg.batch_size, world, rank, cfg.seed)

    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    model.train()
    optimizer = _optimizer(model, cfg)
    model, optimizer = accelerator.prepare(model, optimizer)
    if not accelerator.is_main_process:
        loggers = []
    elif loggers is None:
        from runner.loggers import JsonlLogger

        loggers = [JsonlLogger(run_dir)]

    start_step, tokens_done, history = 0, 0, []
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        state = json.loads((Path(resume_from) / "trainer_state.json").read_text())
        if state["total_steps"] != steps:
            raise ConfigError(f"train.resume: {resume_from} was written by a run of {state['total_steps']} steps, "
                              f"this run has {steps}; resume needs the same config")
        start_step, tokens_done, history = state["step"], state["tokens"], state["history"]
        log.info("resumed from %s at step %d/%d", resume_from, start_step, steps)

    accum = cfg.grad_accum
    recent: list[float] = [h["loss"] for h in history[-10:]]
    t0, tokens_at_t0 = time.perf_counter(), tokens_done
    progress = progress_bar(accelerator.is_main_process)
    task = progress.add_task(desc, total=steps, completed=start_step, info="")
    with progress, _closing(loggers):
        for step in range(start_step, steps):
            lr = cfg.lr * lr_factor(cfg.lr_scheduler, step, steps, warmup, cfg.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=accelerator.device)
            counts = torch.zeros(3, device=accelerator.device)  # label tokens, input tokens, non-finite losses
            extra: dict[str, float] = {}
            for micro in range(accum):
                idx = plan.indices(step * accum + micro)
                batch = collate([examples[i] for i in idx], pad_id)
                batch["index"] = torch.tensor(idx)  # the rows' positions in `examples` (per-example caches)
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                sync = micro == accum - 1
                with accelerator.no_sync(model) if not sync and world > 1 else nullcontext():
                    with accelerator.autocast():
                        out = loss_fn(model, batch, step)
                    n = torch.as_tensor(out.num_tokens, device=accelerator.device, dtype=torch.float32)
                    finite = bool(torch.isfinite(out.loss))
                    # Backward of the token *sum*; the step rescales by the global token count.
                    accelerator.backward(out.loss * n if finite else _zero_graph(model))
                loss_sum += out.loss.detach().float().nan_to_num() * n
                bad_micro = torch.tensor(0.0 if finite else 1.0, device=accelerator.device)
                counts += torch.stack([n, batch["attention_mask"].sum().float(), bad_micro])
                for k, v in out.logs.items():
                    extra[k] = extra.get(k, 0.0) + float(v) / accum
            totals = accelerator.reduce(torch.cat([counts, loss_sum.view(1)]), reduction="sum")
            n_global, tokens, bad, loss_global = totals.tolist()
            if bad:
                _diverged(step, "loss", state_root)
            if n_global > 0:
                scale = world / n_global  # DDP averaged over processes; make it a global token-mean
                for p in model.parameters():
                    if p.grad is not None:
                        p.grad.mul_(scale)
            grad_norm = None
            if cfg.max_grad_norm and cfg.max_grad_norm > 0:
                grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm))
                if not math.isfinite(grad_norm):
                    _diverged(step, "gradient norm", state_root)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            loss_value = loss_global / n_global if n_global > 0 else 0.0
            tokens_done += int(tokens)
            recent = (recent + [loss_value])[-10:]
            done = step + 1
            elapsed = time.perf_counter() - t0
            tps = (tokens_done - tokens_at_t0) / elapsed if elapsed > 0 else 0.0
            logs = {"loss": loss_value, "lr": lr, "tokens_per_s": tps, **extra}
            if grad_norm is not None:
                logs["grad_norm"] = grad_norm
            if done % cfg.log_every == 0 or done == steps:
                record = {"step": done, **logs}
                history.append(record)
                if accelerator.is_main_process:
                    log.info("%s step %d/%d | %s", desc, done, steps, _fmt(logs))
                for logger in loggers:
                    logger.log(done, logs)
            progress.update(task, completed=done, info=f"loss {loss_value:.4f} lr {lr:.2e} {tps / 1000:.1f}k tok/s")
            if on_step is not None:
                on_step(done, logs)
            if cfg.save_every and done % cfg.save_every == 0 and done < steps:
                trainer_state = {"step": done, "total_steps": steps, "tokens": tokens_done, "history": history}
                _save_state(accelerator, state_root, done, trainer_state, cfg.keep_last)
    wall = time.perf_counter() - t0
    accelerator.wait_for_everyone()
    return TrainResult(
        steps=steps,
        final_loss=sum(recent) / len(recent) if recent else float("nan"),
        tokens=tokens_done,
        tokens_per_s=(tokens_done - tokens_at_t0) / wall if wall > 0 else 0.0,
        wall_s=wall,
        resumed_from=str(resume_from) if resume_from else None,
        trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
        history=history,
    )


@contextmanager
def _closing(loggers: Sequence[Any]):
    """Close every logger when training ends, also when it fails (a W&B run is then marked finished)."""
    try:
        yield
    finally:
        for logger in loggers:
            logger.close()


def _zero_graph(model: torch.nn.Module) -> torch.Tensor:
    # A zero that touches every trainable parameter, so DDP's backward hooks fire on every process
    # even for a skipped (non-finite) micro-batch; the run stops right after the step anyway.
    return sum((p.sum() * 0.0 for p in model.parameters() if p.requires_grad), torch.zeros(()))


def _diverged(step: int, what: str, state_root: Path) -> None:
    last = find_last_state(state_root)
    keep = f"the last good checkpoint is {last}" if last else "no checkpoint was written before it (see train.save_every)"
    raise TrainingDiverged(
        f"training stopped: the {what} became NaN or infinite at step {step + 1}; {keep}. "
        "Lower train.lr, raise train.warmup_ratio or set train.max_grad_norm, then run again."
    )


def _fmt(logs: dict[str, float]) -> str:
    parts = []
    for k, v in logs.items():
        if k == "lr":
            parts.append(f"lr {v:.2e}")
        elif k == "tokens_per_s":
            parts.append(f"{v / 1000:.1f}k tok/s")
        else:
            parts.append(f"{k} {v:.4f}")
    return " | ".join(parts)
