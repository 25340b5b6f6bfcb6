"""`python -m runner` end to end, in subprocesses, on the toy world with tiny step counts."""

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import run_cli

pytestmark = pytest.mark.e2e  # every test here runs the command line

TINY = ["train.steps=6", "train.batch_size=8", "train.save_every=3", "data.num_examples=200"]


def test_cfg_job_prints_the_config_without_running(tmp_path):
    proc = run_cli(["recipe=sft", "train.lr=1e-4", "--cfg", "job"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "name: sft" in proc.stdout and "lr: 0.0001" in proc.stdout
    assert not (tmp_path / "outputs").exists()


def test_user_errors_are_one_message_without_traceback(tmp_path):
    proc = run_cli(["recipe=sft", "train.lr=-1", "model.path=./missing", f"output_root={tmp_path}"], cwd=tmp_path,
                   timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "error: invalid config (2 problems):" in proc.stderr
    assert "train.lr: -1.0 is out of range" in proc.stderr and "model.path: './missing'" in proc.stderr
    run_dir = next((tmp_path / "runs").glob("*/*-sft"))
    assert json.loads((run_dir / "results.json").read_text())["status"] == "failed"
    assert not (run_dir / "checkpoint").exists() and not (run_dir / "eval").exists()


def test_composition_errors_have_no_traceback(tmp_path):
    for args in (["train.lrr=1"], ["recipe=nope"], ["train.steps=many"]):
        proc = run_cli(args + [f"output_root={tmp_path}"], cwd=tmp_path, timeout=120)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
        assert args[0].split("=")[0].split(".")[-1] in proc.stderr or "recipe/nope" in proc.stderr


def test_a_misspelled_model_option_is_an_error_not_the_default_model(tmp_path):
    proc = run_cli(["recipe=distill", "model@teacher=toy-teacherr", f"output_root={tmp_path}"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "model@teacher: no model option 'toy-teacherr' (conf/model/). Did you mean 'toy-teacher'?" in proc.stderr
    assert not (tmp_path / "runs").exists()  # refused before Hydra made a run folder


def test_a_role_the_recipe_never_uses_is_an_error_naming_the_roles_it_takes(tmp_path):
    proc = run_cli(["recipe=sft", "teacher.path=toy-teacher", f"output_root={tmp_path}"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "teacher: set, but recipe kind 'sft' does not use it (it uses: model)" in proc.stderr


def test_a_sweep_across_recipes_runs_each_job_with_the_roles_it_takes(tmp_path):
    # instruct_ft tunes Instruct itself: it takes no base, which the sweep sets for shadow_ft
    proc = run_cli(["-m", "recipe=shadow_ft,instruct_ft", "base.path=toy-base", "instruct.path=toy-instruct", *TINY,
                    "eval=none", f"output_root={tmp_path}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2/2 jobs completed" in proc.stdout and "Traceback" not in proc.stderr
    shadow, instruct_ft = (json.loads((j / "results.json").read_text())["config"]
                           for j in sorted((tmp_path / "multirun").glob("*/*/[01]-*")))
    assert shadow["base"]["path"] == "toy-base" and shadow["instruct"]["path"] == "toy-instruct"
    assert instruct_ft["base"] is None and instruct_ft["instruct"]["path"] == "toy-instruct"
    assert "note: recipe instruct_ft does not take base; this job runs without it" in proc.stderr + proc.stdout


def test_sft_on_the_toy_world_end_to_end(tmp_path):
    proc = run_cli(["recipe=sft", *TINY, "eval=toy_quick", "eval.limit=8", f"output_root={tmp_path}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = next((tmp_path / "runs").glob("*/*-sft"))
    results = json.loads((run_dir / "results.json").read_text())
    assert results["recipe"] == "sft" and results["kind"] == "sft" and results["status"] == "completed"
    assert results["seed"] == 0 and results["config"]["train"]["steps"] == 6
    assert set(results["metrics"]) >= {"toy_arith/exact_match", "toy_arith_hard/exact_match", "toy_arith/response_tokens"}
    assert set(results["baseline_metrics"]) == set(results["metrics"])  # the recipe's toy default evaluates the input too
    assert results["train"]["steps"] == 6 and results["train"]["tokens_per_s"] > 0
    # the console and runner.log: the runner's lines and one progress line per evaluation, no library chatter
    log = (run_dir / "runner.log").read_text()
    assert "evaluated result on toy_arith, toy_arith_hard" in log and "lm_eval" not in log, log
    assert "evaluate result" in proc.stderr and "16/16" in proc.stderr  # (the baseline's may come from the eval cache)
    assert "it/s" not in proc.stderr and "%|" not in proc.stderr, proc.stderr  # lm-eval's tqdm bars
    assert results["versions"]["torch"].startswith("2.") and "lm_eval" in results["versions"]
    from runner.lock import LOCK_FILE, lock_status

    assert results["environment"]["lock_sha256"] == lock_status()["lock_sha256"] and str(LOCK_FILE) == results["environment"]["lock"]
    assert {"validate_s", "recipe_s", "eval_s", "baseline_eval_s", "total_s"} <= set(results["timings"])
    assert results["hostname"] and results["run_dir"] == str(run_dir.resolve())
    assert (run_dir / ".hydra" / "config.yaml").is_file() and (run_dir / "runner.log").is_file()
    assert (run_dir / "eval" / "final" / "lm_eval_results.json").is_file()
    assert (run_dir / "eval" / "baseline" / "samples_toy_arith.jsonl").is_file()
    # the checkpoint is a plain Hugging Face folder
    ckpt = results["checkpoint"]
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt)
    ids = tok.apply_chat_template([{"role": "user", "content": "1+2=?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] > ids.shape[1]
    assert "sft: results" in proc.stdout and "checkpoint:" in proc.stdout


def test_multirun_produces_one_run_per_value(tmp_path):
    proc = run_cli(["-m", "recipe=sft", "train.lr=1e-4,3e-4", *TINY, "eval=none", f"output_root={tmp_path}"],
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted((tmp_path / "multirun").glob("*/*/*-sft"))
    assert [j.name for j in jobs] == ["0-sft", "1-sft"]
    lrs = [json.loads((j / "results.json").read_text())["config"]["train"]["lr"] for j in jobs]
    assert lrs == [1e-4, 3e-4]
    assert all(json.loads((j / "results.json").read_text())["status"] == "completed" for j in jobs)
    assert "2/2 jobs completed" in proc.stdout


def test_a_failed_job_does_not_stop_the_sweep(tmp_path):
    proc = run_cli(["-m", "recipe=sft", "train.lr=-1,1e-4", *TINY, "eval=none", f"output_root={tmp_path}"], cwd=tmp_path)
    assert proc.returncode == 1
    jobs = sorted((tmp_path / "multirun").glob("*/*/*-sft"))
    statuses = [json.loads((j / "results.json").read_text())["status"] for j in jobs]
    assert statuses == ["failed", "completed"]
    assert "1/2 jobs completed" in proc.stdout and "0-sft: failed" in proc.stderr
