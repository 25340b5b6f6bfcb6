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


@pytest.mark.e2e
@pytest.mark.parametrize("version", [2, 1])
def test_fsdp_on_cpu_stops_with_one_clear_error(tmp_path, tiny_llama, version):
    # without the runner's check, accelerate runs fsdp_version 2 on CPU as plain DDP (MULTI_CPU) and
    # fails on fsdp_version 1 with "There are currently no available devices found"
    config = tmp_path / "fsdp.yaml"
    text = (REPO / "conf" / "accelerate" / "fsdp.yaml").read_text()
    config.write_text(text.replace("fsdp_version: 2", f"fsdp_version: {version}"))
    proc = launch(config, tmp_path, tiny_llama)
    assert proc.returncode != 0
    assert "error: invalid config: accelerate config: FSDP was asked for, but this run is on the CPU" in proc.stderr
    assert "no available devices found" not in proc.stderr  # accelerate's own FSDP1 failure never comes
    run_dir = next((tmp_path / "runs").glob("*/*-sft"))
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "failed" and "conf/accelerate/cpu_ddp.yaml" in results["error"]
    assert not (run_dir / "checkpoint").exists() and not (run_dir / "train_log.jsonl").exists()
