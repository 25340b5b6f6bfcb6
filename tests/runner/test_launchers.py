"""Hydra launchers: joblib (parallel local sweeps) and submitit (SLURM; optional extra)."""

import importlib.util
import json

import pytest

from tests.conftest import CONF_DIR, run_cli

pytestmark = pytest.mark.e2e  # every test here runs the command line

TINY = ["train.steps=4", "train.batch_size=8", "data.num_examples=64", "eval=none"]
needs_submitit = pytest.mark.skipif(importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None,
                                    reason="hydra-submitit-launcher is not installed (pip install -e '.[slurm]')")


def sweep_jobs(root):
    jobs = sorted((root / "multirun").glob("*/*/*-sft"))
    return jobs, [json.loads((j / "results.json").read_text()) for j in jobs]


def check_one_failed_one_completed(proc, root):
    assert proc.returncode == 1, proc.stderr[-3000:]  # the sweep reports its failed job ...
    jobs, results = sweep_jobs(root)
    assert [j.name for j in jobs] == ["0-sft", "1-sft"] and len({j.parent for j in jobs}) == 1  # one sweep folder
    assert [r["status"] for r in results] == ["failed", "completed"]  # ... and keeps the other's results
    assert "train.lr: -1.0 is out of range" in results[0]["error"]
    assert results[1]["config"]["train"]["lr"] == 1e-4 and (jobs[1] / "checkpoint" / "model.safetensors").is_file()
    assert "1/2 jobs completed" in proc.stdout and "0-sft: failed" in proc.stderr


def test_joblib_sweep_runs_jobs_in_worker_processes_and_keeps_every_result(tmp_path, tiny_llama):
    proc = run_cli(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "recipe=sft", f"model.path={tiny_llama}",
                    "train.lr=-1,1e-4", *TINY, f"output_root={tmp_path}"], cwd=tmp_path)
    assert "Joblib.Parallel(n_jobs=2,backend=loky" in proc.stdout + proc.stderr
    check_one_failed_one_completed(proc, tmp_path)


@needs_submitit
def test_slurm_launcher_config_composes_with_its_defaults():
    from hydra import compose, initialize_config_dir

    from runner.config import register_configs
    from runner.resolvers import register_resolvers

    register_configs()
    register_resolvers()
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        cfg = compose("config", overrides=["hydra/launcher=slurm", "recipe=sft", "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.timeout_min, launcher.tasks_per_node, launcher.gpus_per_node, launcher.partition) == (240, 1, 1, "gpu")
    assert str(launcher.submitit_folder).endswith("/.submitit/%j")


@needs_submitit
def test_submitit_runs_sweep_jobs_as_separate_jobs(tmp_path, tiny_llama):
    """The local flavour of the SLURM launcher: the same submitit path (pickled job, own process per job)."""
    proc = run_cli(["-m", "hydra/launcher=submitit_local", "recipe=sft", f"model.path={tiny_llama}",
                    "train.lr=-1,1e-4", *TINY, f"output_root={tmp_path}"], cwd=tmp_path)
    check_one_failed_one_completed(proc, tmp_path)
    assert list((tmp_path / "multirun").glob("*/*/.submitit/*"))  # submitit's job folders
