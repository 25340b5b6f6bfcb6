"""`python -m runner.check`: the same composition and validation as a run, with nothing run."""

import subprocess
import sys

import pytest

from runner import check


@pytest.fixture
def no_weights(monkeypatch, tmp_path):
    """Fail the test if anything loads a model, builds a zoo entry or writes in the working folder."""
    import transformers

    from runner.toy import zoo

    def refuse(*args, **kwargs):
        raise AssertionError("runner.check loaded weights")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(zoo, "ensure", refuse)
    monkeypatch.chdir(tmp_path)
    yield
    assert list(tmp_path.iterdir()) == []


def test_a_valid_config_prints_its_resolved_values_and_the_checks(capsys, no_weights):
    assert check.main(["recipe=akl_distill", "loss.mu=0.3"]) == 0
    out = capsys.readouterr().out
    assert "name: akl_distill" in out and "  mu: 0.3\n" in out
    # defaults no YAML writes: the block's (kd_ratio) and the component's signature (akl's eps)
    assert "  kd_ratio: 1.0\n" in out and "  eps: 1.0e-08\n" in out
    assert "checks passed:" in out and "model roles it takes: student, teacher" in out
    assert "loss: its keys and kd_loss 'akl' with its parameters" in out


def test_an_allocator_shows_its_parameters_in_their_own_key(capsys, no_weights):
    assert check.main(["recipe=lieq_quantize"]) == 0
    out = capsys.readouterr().out
    assert "  allocator_params:\n    metric: compactness\n    top: 0.01\n" in out


@pytest.mark.parametrize("args,message", [
    (["recipe=akl_distill", "loss.mu=2"], "loss.mu: 2 is out of range"),
    (["model@teacher=toy-teacherr"], "Did you mean 'toy-teacher'?"),
    (["train.lrr=1"], "lrr"),
    (["recipe=sft", "teacher.path=toy-teacher"], "teacher: set, but recipe kind 'sft' does not use it"),
])
def test_a_bad_config_exits_2_with_every_problem(capsys, no_weights, args, message):
    assert check.main(args) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""


def test_a_pipeline_is_checked_step_by_step(capsys, no_weights):
    assert check.main(["recipe=distill_quant_pipeline"]) == 0
    out = capsys.readouterr().out
    assert "step 0" in out and "step 1" in out and "fed by step 0" in out


@pytest.mark.e2e
def test_the_command_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "runner.check", "recipe=sft", "train.lr=1e-4"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "lr: 0.0001" in proc.stdout and "checks passed:" in proc.stdout and not list(tmp_path.iterdir())
