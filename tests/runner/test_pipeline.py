"""Pipelines (runner/pipeline.py): steps chained by checkpoints, checked up front, completed steps reused."""

import json

import pytest
from omegaconf import OmegaConf

import recipes.noise_eval
import recipes.sft
from runner.errors import ConfigError, RunnerError
from runner.pipeline import run_pipeline, validate_pipeline
from tests.conftest import problems_of, run_cli

# every step: the tiny model, a few training steps, a few eval problems
TINY_STEPS = ["train.steps=2", "train.batch_size=4", "train.save_every=0", "data.num_examples=32", "eval.limit=2",
              "eval.max_gen_toks=4"]


def pipeline_cfg(compose, tiny_llama, tmp_path, *extra):
    """The shipped sft -> memristor_noise example, shrunk to seconds; `extra` are CLI overrides."""
    cfg = compose(["recipe=sft_noise_pipeline", f"output_root={tmp_path / 'outputs'}", *extra])
    cfg.pipeline.overrides = [f"model.path={tiny_llama}", *TINY_STEPS]
    cfg.pipeline.steps[0].overrides = ["eval=none"]
    if not cfg.pipeline.steps[1].overrides:
        cfg.pipeline.steps[1].overrides = ["noise.sweep=[0,0.1]", "noise.seeds=[0]"]
    return cfg


@pytest.fixture
def counted(monkeypatch):
    """How many times each step's recipe actually ran."""
    counts = {"sft": 0, "noise_eval": 0}
    for name, cls in (("sft", recipes.sft.SFT), ("noise_eval", recipes.noise_eval.NoiseEval)):
        def counting(self, cfg, ctx, _real=cls.run, _name=name):
            counts[_name] += 1
            return _real(self, cfg, ctx)
        monkeypatch.setattr(cls, "run", counting)
    return counts


def test_steps_feed_checkpoints_and_completed_steps_are_reused(compose, tiny_llama, tmp_path, counted, monkeypatch):
    cfg = pipeline_cfg(compose, tiny_llama, tmp_path)

    # 1. the second step fails: the first one's results stay, and the pipeline says which step failed
    real_noise = recipes.noise_eval.NoiseEval.run

    def broken(self, cfg, ctx):
        raise RunnerError("noise hardware on fire")

    monkeypatch.setattr(recipes.noise_eval.NoiseEval, "run", broken)
    with pytest.raises(RunnerError, match=r"pipeline.steps\[1\] \(memristor_noise\) failed: noise hardware on fire"):
        run_pipeline(cfg, tmp_path / "p1")
    first = json.loads((tmp_path / "p1" / "results.json").read_text())
    assert first["status"] == "failed" and "noise hardware on fire" in first["error"]
    assert [(s["name"], s["status"], s["reused"]) for s in first["steps"]] == [
        ("0-sft", "completed", False), ("1-memristor_noise", "failed", False)]
    sft_dir = tmp_path / "p1" / "steps" / "0-sft"
    sft_results = sft_dir / "results.json"
    assert json.loads(sft_results.read_text())["status"] == "completed"
    assert (sft_dir / "checkpoint" / "model.safetensors").is_file() and (sft_dir / "runner.log").is_file()
    assert (sft_dir / ".hydra" / "overrides.yaml").is_file()
    monkeypatch.setattr(recipes.noise_eval.NoiseEval, "run", real_noise)
    assert counted == {"sft": 1, "noise_eval": 0}
    stamp = sft_results.stat().st_mtime_ns

    # 2. run again: the completed sft step is reused, the failed step runs on its checkpoint
    second = run_pipeline(cfg, tmp_path / "p2")
    assert counted == {"sft": 1, "noise_eval": 1}
    assert second["status"] == "completed"
    s0, s1 = second["steps"]
    assert s0["reused"] is True and s0["run_dir"] == str(sft_dir.resolve()) and s0["status"] == "completed"
    assert s1["reused"] is False and s1["status"] == "completed" and s1["feed"] == "model"
    assert s0["checkpoint"] == str((sft_dir / "checkpoint").resolve())
    noise_results = tmp_path / "p2" / "steps" / "1-memristor_noise" / "results.json"
    step1 = json.loads(noise_results.read_text())
    assert step1["config"]["model"]["path"] == s0["checkpoint"]  # fed: the sft checkpoint, not toy-base
    assert step1["config"]["model"]["dtype"] == "float32"  # the role's other settings stay the recipe's
    assert step1["config"]["train"]["steps"] == 2 and step1["config"]["noise"]["sweep"] == [0, 0.1]
    assert not (tmp_path / "p2" / "steps" / "0-sft").exists()
    assert sft_results.stat().st_mtime_ns == stamp
    # the pipeline's result is its last step's: noise curves, no checkpoint (noise-eval writes none)
    assert second["metrics"] == step1["metrics"] and "toy_arith/exact_match@sigma=0.1" in second["metrics"]
    assert second["checkpoint"] is None and second["kind"] == "pipeline"

    # 3. once more: nothing runs, nothing is rewritten
    noise_stamp = noise_results.stat().st_mtime_ns
    third = run_pipeline(cfg, tmp_path / "p3")
    assert counted == {"sft": 1, "noise_eval": 1}
    assert [s["reused"] for s in third["steps"]] == [True, True]
    assert third["metrics"] == second["metrics"] and not (tmp_path / "p3" / "steps").exists()
    assert noise_results.stat().st_mtime_ns == noise_stamp and sft_results.stat().st_mtime_ns == stamp

    # 4. a changed step runs again, the steps before it do not; reuse=false runs everything
    changed = pipeline_cfg(compose, tiny_llama, tmp_path)
    changed.pipeline.steps[1].overrides = ["noise.sweep=[0,0.1]", "noise.seeds=[1]"]
    assert [s["reused"] for s in run_pipeline(changed, tmp_path / "p4")["steps"]] == [True, False]
    assert counted == {"sft": 1, "noise_eval": 2}
    fresh = pipeline_cfg(compose, tiny_llama, tmp_path, "pipeline.reuse=false")
    assert [s["reused"] for s in run_pipeline(fresh, tmp_path / "p5")["steps"]] == [False, False]
    assert counted == {"sft": 2, "noise_eval": 3}


@pytest.mark.parametrize("change, expected", [
    (lambda p: p["steps"][0].update(recipe="sfft"), "pipeline.steps[0].recipe: unknown recipe 'sfft'. Did you mean 'sft'?"),
    (lambda p: p["steps"][0].update(recipe=["sft"]), "pipeline.steps[0].recipe: unknown recipe ['sft']"),
    (lambda p: p["steps"][1].update(feed="student"),
     "pipeline.steps[1].feed: 'student' is not a model role of recipe 'memristor_noise' (kind noise_eval). It takes: model"),
    (lambda p: p["steps"][1].update(feed=None), "pipeline.steps[1].feed: missing"),
    (lambda p: p["steps"][0].update(feed="model"), "pipeline.steps[0].feed: the first step has no earlier checkpoint"),
    (lambda p: p["steps"][1].update(fed="model"), "pipeline.steps[1].fed: unknown key. Did you mean 'feed'?"),
    (lambda p: p["steps"][0].update(overrides=["train.lrr=1"]), "pipeline.steps[0].overrides: Could not override 'train.lrr'"),
    (lambda p: p["steps"][0].update(overrides=["train.lr=-1"]), "pipeline.steps[0] (sft): train.lr: -1.0 is out of range"),
    (lambda p: p.update(overrides=["train.steps=x"]), "pipeline.overrides: Error merging override train.steps=x"),
    (lambda p: p["steps"][0].update(overrides=["save_checkpoint=false"]),
     "pipeline.steps[0]: recipe 'sft' (kind sft) writes no checkpoint here"),
    (lambda p: p.update(steps=[{"recipe": "memristor_noise"}, {"recipe": "sft", "feed": "model"}]),
     "pipeline.steps[0]: recipe 'memristor_noise' (kind noise_eval) writes no checkpoint here"),
    (lambda p: p["steps"][1].update(recipe="sft_noise_pipeline"), "pipeline.steps[1].recipe: 'sft_noise_pipeline' is itself a pipeline"),
    (lambda p: p.update(steps=[]), "pipeline.steps: empty"),
])
def test_every_step_is_checked_before_any_work(compose, tiny_llama, tmp_path, change, expected):
    cfg = pipeline_cfg(compose, tiny_llama, tmp_path)
    block = OmegaConf.to_container(cfg.pipeline)
    change(block)
    cfg.pipeline = block
    assert any(p.startswith(expected) for p in problems_of(cfg)), problems_of(cfg)
    with pytest.raises(ConfigError):
        run_pipeline(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "steps").exists()  # no step started
    assert json.loads((tmp_path / "run" / "results.json").read_text())["status"] == "failed"


def test_a_pipeline_evaluates_nothing_itself(compose, tiny_llama, tmp_path):
    cfg = pipeline_cfg(compose, tiny_llama, tmp_path, "eval=toy_quick")
    assert any(p.startswith("eval.tasks: a pipeline evaluates nothing itself") for p in problems_of(cfg))


@pytest.mark.e2e
def test_pipeline_from_the_command_line(tmp_path, tiny_llama):
    """Inside a running Hydra app the steps are composed from conf/ too; CLI overrides reach every step."""
    shared = ",".join(f'"{o}"' for o in [f"model.path={tiny_llama}", *TINY_STEPS])
    proc = run_cli(["recipe=sft_noise_pipeline", f"output_root={tmp_path}", f"pipeline.overrides=[{shared}]",
                    'pipeline.steps.0.overrides=["eval=none"]',
                    'pipeline.steps.1.overrides=["noise.sweep=[0]","noise.seeds=[0]"]'], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = next((tmp_path / "runs").glob("*/*-sft_noise_pipeline"))
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "completed" and [s["name"] for s in results["steps"]] == ["0-sft", "1-memristor_noise"]
    assert (run_dir / ".hydra" / "config.yaml").is_file() and (run_dir / "runner.log").is_file()
    assert "pipeline step 2/2 (1-memristor_noise): running in" in (run_dir / "runner.log").read_text()
    for step in results["steps"]:
        assert json.loads((run_dir / "steps" / step["name"] / "results.json").read_text())["status"] == "completed"
    assert "toy_arith/exact_match@sigma=0.0" in results["metrics"]


@pytest.mark.parametrize("recipe", ["sft_noise_pipeline", "quant_noise_pipeline", "distill_quant_pipeline"])
def test_example_pipelines_are_valid(compose, recipe):
    steps = validate_pipeline(compose([f"recipe={recipe}"]))
    assert len(steps) == 2 and steps[1].feed

