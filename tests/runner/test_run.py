"""The job function `runner.run.run`: resume across invocations, failure records."""

import json

import pytest
import torch
from safetensors.torch import load_file

import runner.train
from runner.errors import ConfigError
from runner.resume import fingerprint
from runner.run import run

TINY = ["train.steps=6", "train.save_every=3", "train.batch_size=8", "train.log_every=1", "data.num_examples=200",
        "eval=none"]


def overrides(tiny_llama, tmp_path, *extra):
    return [f"model.path={tiny_llama}", f"output_root={tmp_path / 'outputs'}", *TINY, *extra]


def test_restart_with_the_same_config_resumes_from_the_last_checkpoint(compose, tiny_llama, tmp_path, monkeypatch):
    cfg = compose(overrides(tiny_llama, tmp_path))
    real_train = runner.train.train

    def interrupted_train(*args, **kwargs):
        def stop(step, logs):
            if step == 4:
                raise KeyboardInterrupt
        return real_train(*args, **{**kwargs, "on_step": stop})

    monkeypatch.setattr(runner.train, "train", interrupted_train)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, tmp_path / "run1")
    first = json.loads((tmp_path / "run1" / "results.json").read_text())
    assert first["status"] == "interrupted" and first["checkpoint"] is None
    monkeypatch.setattr(runner.train, "train", real_train)

    second = run(cfg, tmp_path / "run2")
    assert second["status"] == "completed"
    assert second["train"]["resumed_from"].endswith("run1/state/step-0000003")

    fresh = run(compose(overrides(tiny_llama, tmp_path, "train.resume=never")), tmp_path / "run3")
    assert fresh["train"]["resumed_from"] is None
    a = load_file(tmp_path / "run2" / "checkpoint" / "model.safetensors")
    b = load_file(tmp_path / "run3" / "checkpoint" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)

    # a completed run is not resumed again: the next run of the same config starts fresh
    again = run(cfg, tmp_path / "run4")
    assert again["train"]["resumed_from"] is None


def test_fingerprint_ignores_eval_and_resume_but_not_training(compose, tiny_llama, tmp_path):
    base = fingerprint(compose(overrides(tiny_llama, tmp_path)))
    assert fingerprint(compose(overrides(tiny_llama, tmp_path, "eval=toy", "train.resume=never"))) == base
    assert fingerprint(compose(overrides(tiny_llama, tmp_path, "train.lr=1e-4"))) != base


def test_config_error_is_recorded_in_results(compose, tmp_path):
    with pytest.raises(ConfigError):
        run(compose(["train.lr=-1", f"output_root={tmp_path}"]), tmp_path / "bad")
    results = json.loads((tmp_path / "bad" / "results.json").read_text())
    assert results["status"] == "failed" and "train.lr" in results["error"]
    assert results["checkpoint"] is None and results["config"]["train"]["lr"] == -1.0
