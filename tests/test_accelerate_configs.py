"""The accelerate configs in conf/accelerate: valid files, and launches the runner refuses up front."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

CONFIGS = sorted((REPO / "conf" / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_accelerate_config_loads(path):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(path))  # unknown keys raise here
    assert cfg.distributed_type.value in ("MULTI_GPU", "FSDP")
    if cfg.distributed_type.value == "FSDP":
        assert cfg.fsdp_config["fsdp_version"] == 2


def launch(config, tmp_path, tiny_llama, *extra):
    args = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "2",
            "-m", "runner", "recipe=sft", f"model.path={tiny_llama}", "train.steps=2", "train.batch_size=4",
            "data.num_examples=128", "eval=none", f"output_root={tmp_path}", *extra]
    return subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_fsdp_on_cpu_stops_instead_of_silently_running_ddp(tmp_path, tiny_llama):
    # accelerate would run the FSDP config on CPU as plain DDP (MULTI_CPU); the runner says so and stops
    proc = launch(REPO / "conf" / "accelerate" / "fsdp.yaml", tmp_path, tiny_llama)
    assert proc.returncode != 0
    assert "FSDP was asked for, but accelerate runs MULTI_CPU here" in proc.stderr
    run_dir = next((tmp_path / "runs").glob("*/*-sft"))
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "failed" and "conf/accelerate/cpu_ddp.yaml" in results["error"]
    assert not (run_dir / "checkpoint").exists() and not (run_dir / "train_log.jsonl").exists()
