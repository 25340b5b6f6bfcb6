"""Two-process DDP on CPU (gloo) through `accelerate launch` matches one process at equal global batch."""

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.e2e  # every test here runs the command line

COMMON = ["recipe=sft", "train.steps=4", "data.num_examples=128", "eval=none", "train.lr=3e-3"]


def test_ddp_two_cpu_processes_match_a_single_process(tmp_path, tiny_llama):
    config = REPO / "conf" / "accelerate" / "cpu_ddp.yaml"  # the file the README points at
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "-m", "runner"]
    args = [*COMMON, f"model.path={tiny_llama}", f"output_root={tmp_path / 'ddp'}"]
    proc = subprocess.run([*launch, *args, "train.batch_size=4"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = list((tmp_path / "ddp" / "runs").glob("*/*-sft"))
    assert len(runs) == 1, runs  # both processes agreed on one run folder
    ddp_dir = runs[0]
    assert (ddp_dir / "runner.log").is_file() and (ddp_dir / "runner.rank1.log").is_file()

    single = run_cli([*COMMON, f"model.path={tiny_llama}", f"output_root={tmp_path / 'single'}", "train.batch_size=8"],
                     cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    single_dir = next((tmp_path / "single" / "runs").glob("*/*-sft"))

    a = load_file(ddp_dir / "checkpoint" / "model.safetensors")
    b = load_file(single_dir / "checkpoint" / "model.safetensors")
    init = load_file(tiny_llama / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        moved = (b[k] - init[k]).abs().max()
        diff = (a[k] - b[k]).abs().max()
        assert moved > 1e-3, k  # training changed every tensor ...
        # ... and the runs agree up to fp32 reduction-order noise (Adam magnifies it where a gradient is ~0)
        assert diff < 1e-2 * moved, k


def test_noise_eval_under_ddp_matches_a_single_process(tmp_path, tiny_llama):
    # lm-eval splits the requests over the processes and gathers the results on rank 0; the other
    # ranks get nothing back and must still take part in every evaluation
    config = REPO / "conf" / "accelerate" / "cpu_ddp.yaml"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "-m", "runner"]
    args = ["recipe=memristor_noise", f"model.path={tiny_llama}", "noise.sweep=[0.0,0.5]", "noise.seeds=[0,1]",
            "eval.limit=8", "eval.max_gen_toks=6"]
    proc = subprocess.run([*launch, *args, f"output_root={tmp_path / 'ddp'}"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    single = run_cli([*args, f"output_root={tmp_path / 'single'}"], cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    results = [json.loads(next((tmp_path / where / "runs").glob("*/*-memristor_noise/results.json")).read_text())
               for where in ("ddp", "single")]
    assert results[0]["metrics"] and results[0]["metrics"] == results[1]["metrics"]
