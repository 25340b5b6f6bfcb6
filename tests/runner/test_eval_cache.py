"""The baseline eval cache: keyed by content and config, reused by a second job, never stale."""

import json
import shutil

import pytest
from omegaconf import OmegaConf

from runner import cache, eval_cache
from runner.config import EvalConfig


def test_folder_fingerprint_follows_content_not_timestamps(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "a.bin").write_bytes(b"weights")
    (folder / "config.json").write_text("{}")
    memo: dict[str, str] = {}
    first = cache.folder_fingerprint(folder, memo)
    assert len(memo) == 2
    (folder / "a.bin").write_bytes(b"weights")  # rewritten, same bytes: a new mtime, the same fingerprint
    assert cache.folder_fingerprint(folder, memo) == first
    (folder / "a.bin").write_bytes(b"weightz")
    assert cache.folder_fingerprint(folder, memo) != first
    (folder / "a.bin").write_bytes(b"weights")
    (folder / "a.bin").rename(folder / "b.bin")  # the same bytes under another name
    assert cache.folder_fingerprint(folder, memo) != first


def test_the_key_follows_the_eval_config_but_not_the_baseline_switch(tiny_llama):
    spec = OmegaConf.create({"path": str(tiny_llama), "dtype": "float32", "revision": None, "trust_remote_code": False})
    ev = OmegaConf.structured(EvalConfig(tasks=["toy_arith"], limit=8))
    key = eval_cache.cache_key(tiny_llama, spec, ev, "cpu")
    assert key == eval_cache.cache_key(tiny_llama, spec, OmegaConf.merge(ev, {"baseline": True}), "cpu")
    assert key != eval_cache.cache_key(tiny_llama, spec, OmegaConf.merge(ev, {"limit": 9}), "cpu")
    assert key != eval_cache.cache_key(tiny_llama, OmegaConf.merge(spec, {"dtype": "bfloat16"}), ev, "cpu")
    assert key != eval_cache.cache_key(tiny_llama, spec, ev, "cuda:0")
    assert eval_cache.cache_key("org/not-a-local-folder", spec, ev, "cpu") is None  # a hub id: not cached


QUICK = ["recipe=rtn_quantize", "eval=toy_quick", "eval.limit=6", "eval.tasks=[toy_arith]", "eval.baseline=true",
         "save_checkpoint=false"]


@pytest.mark.e2e
def test_a_second_job_reuses_the_baseline_and_a_changed_model_does_not(compose, tmp_path, tiny_llama, monkeypatch):
    import runner.evaluate
    from runner.run import run

    monkeypatch.setenv("RUNNER_CACHE_DIR", str(tmp_path / "cache"))
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    first = run(compose([*QUICK, f"model.path={model}"]), tmp_path / "first")
    assert first["baseline_cached"] is False and first["baseline_metrics"]

    calls = []
    real = runner.evaluate.evaluate
    monkeypatch.setattr(runner.evaluate, "evaluate", lambda *a, **k: calls.append(k.get("label")) or real(*a, **k))
    second = run(compose([*QUICK, f"model.path={model}", "quant.bits=3"]), tmp_path / "second")
    assert second["baseline_cached"] is True and second["baseline_metrics"] == first["baseline_metrics"]
    assert second["baseline_eval_command"] == first["baseline_eval_command"]
    assert calls == ["result"]  # only the quantized model was evaluated
    samples = (tmp_path / "second" / "eval" / "baseline" / "samples_toy_arith.jsonl").read_text().splitlines()
    assert len(samples) == 6 and json.loads(samples[0])["doc_id"] == 0

    calls.clear()
    opted_out = run(compose([*QUICK, f"model.path={model}", "eval.cache=false"]), tmp_path / "opted_out")
    assert opted_out["baseline_cached"] is False and calls == ["model (baseline)", "result"]

    calls.clear()
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))  # another model, same path
    changed = run(compose([*QUICK, f"model.path={model}"]), tmp_path / "changed")
    assert changed["baseline_cached"] is False and calls == ["model (baseline)", "result"]
