"""Loggers are components (`train.loggers`): jsonl by default, TensorBoard, and W&B in offline mode."""

import json

import pytest
from omegaconf import OmegaConf

from runner.config import DataConfig, TrainConfig
from runner.data import build_dataset
from runner.loggers import WANDB_ID_FILE, WandbLogger, check_loggers, open_loggers
from runner.models import load_model
from runner.train import causal_lm_loss, make_accelerator, train


@pytest.fixture(scope="module")
def examples(toy_tokenizer):
    return build_dataset(DataConfig(source="toy", format="instruct", num_examples=64, max_length=32, seed=0), toy_tokenizer)


def train_for(tiny_llama, examples, run_dir, loggers, steps=4):
    cfg = OmegaConf.structured(TrainConfig(steps=steps, batch_size=8, lr=1e-3, log_every=2, cpu=True))
    model = load_model({"path": str(tiny_llama), "dtype": "float32"})[0]
    return train(model, examples, causal_lm_loss, cfg, accelerator=make_accelerator(cfg), run_dir=run_dir, pad_id=0,
                 loggers=loggers)


def test_every_logged_step_reaches_every_logger_and_they_are_closed(tiny_llama, examples, tmp_path):
    calls = []

    class Spy:
        def log(self, step, metrics):
            calls.append((step, sorted(metrics)))

        def close(self):
            calls.append("closed")

    result = train_for(tiny_llama, examples, tmp_path, [Spy()])
    assert [c[0] for c in calls[:-1]] == [2, 4] and calls[-1] == "closed"
    assert {"loss", "lr", "tokens_per_s", "grad_norm"} <= set(calls[0][1])
    assert [h["step"] for h in result.history] == [2, 4]
    assert not (tmp_path / "train_log.jsonl").exists()  # the loggers given replace the default


def test_jsonl_is_the_default(tiny_llama, examples, tmp_path):
    result = train_for(tiny_llama, examples, tmp_path, None)
    lines = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert lines == result.history and [x["step"] for x in lines] == [2, 4]


def test_tensorboard_writes_the_scalars(tiny_llama, examples, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = train_for(tiny_llama, examples, tmp_path, open_loggers(["tensorboard"], tmp_path))
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [2, 4]
    assert [e.value for e in loss] == pytest.approx([h["loss"] for h in result.history], rel=1e-6)


def test_unknown_or_missing_loggers_are_config_errors(monkeypatch):
    assert check_loggers(["jsonl", "tensorbord"])[0].startswith(
        "train.loggers: unknown logger 'tensorbord'. Did you mean 'tensorboard'?")
    assert check_loggers(["jsonl", "jsonl"]) == ["train.loggers: ['jsonl', 'jsonl'] names a logger twice"]
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert check_loggers(["wandb"]) == ["train.loggers: wandb needs the 'wandb' extra: pip install -e '.[wandb]'"]


@pytest.fixture
def wandb_offline(monkeypatch, tmp_path):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def offline_runs(run_dir):
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def _settled_bytes(path, wait_s: float = 60.0) -> bytes:
    """The file once W&B's writer (its own process) has stopped growing it; on a loaded machine the
    records can land shortly after `finish()` returns."""
    import time

    deadline, size = time.monotonic() + wait_s, -1
    while time.monotonic() < deadline:
        data = path.read_bytes()
        if len(data) == size and b"train/loss" in data:
            return data
        size = len(data)
        time.sleep(1.0)
    return path.read_bytes()


def test_wandb_logs_offline_and_a_resumed_run_continues_the_same_run(wandb_offline, tiny_llama, examples, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    train_for(tiny_llama, examples, first, [WandbLogger(first, {"name": "sft", "train": {"lr": 1e-3}})])
    run_id = (first / WANDB_ID_FILE).read_text().strip()
    [run] = offline_runs(first)
    assert run.name.endswith(run_id)
    data = _settled_bytes(run / f"run-{run_id}.wandb")
    assert b"train/loss" in data and b"train/grad_norm" in data  # the logged history is in the run file
    # a run that resumes the first one (its state lives in first/) logs to the same W&B run
    train_for(tiny_llama, examples, second, [WandbLogger(second, {"name": "sft"}, resumed_from=first)])
    assert (second / WANDB_ID_FILE).read_text().strip() == run_id
    assert offline_runs(second)[0].name.endswith(run_id)


@pytest.mark.e2e
def test_wandb_through_the_command_line(tmp_path):
    pytest.importorskip("wandb")
    from tests.conftest import run_cli

    proc = run_cli(["recipe=sft", "train.steps=4", "train.batch_size=8", "data.num_examples=64", "eval=none",
                    "train.loggers=[jsonl,wandb]", f"output_root={tmp_path}"], cwd=tmp_path,
                   env={"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_API_KEY": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = next((tmp_path / "runs").glob("*/*-sft"))
    run_id = (run_dir / WANDB_ID_FILE).read_text().strip()
    assert offline_runs(run_dir)[0].name.endswith(run_id) and (run_dir / "train_log.jsonl").is_file()
