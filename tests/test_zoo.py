import json
import os
import subprocess
import sys

import pytest
import torch

from runner.toy import zoo


def test_entries_build_once_and_share_one_tokenizer():
    paths = {name: zoo.ensure(name) for name in zoo.names()}
    stamp = {n: (p / "zoo.json").stat().st_mtime for n, p in paths.items()}
    assert {n: zoo.ensure(n) for n in zoo.names()} == paths  # cached: nothing rebuilt
    assert stamp == {n: (p / "zoo.json").stat().st_mtime for n, p in paths.items()}
    vocabs = {n: (p / "tokenizer.json").read_text() for n, p in paths.items()}
    assert len(set(vocabs.values())) == 1
    meta = {n: json.loads((p / "zoo.json").read_text()) for n, p in paths.items()}
    assert meta["toy-student"]["parameters"] < meta["toy-base"]["parameters"] < meta["toy-teacher"]["parameters"]
    assert json.loads((paths["toy-teacher"] / "config.json").read_text())["num_hidden_layers"] == 4
    assert meta["toy-instruct"]["init"] == "toy-base" and meta["toy-base"]["profile"] == "smoke"


def test_fingerprint_follows_profile_and_parent(monkeypatch):
    smoke = zoo.entry_dir("toy-instruct")
    monkeypatch.setenv("RUNNER_TOY_PROFILE", "full")
    assert zoo.entry_dir("toy-instruct") != smoke
    monkeypatch.setenv("RUNNER_TOY_PROFILE", "tiny")
    with pytest.raises(Exception, match="RUNNER_TOY_PROFILE"):
        zoo.entry_dir("toy-base")


def test_grow_depth_preserves_the_function(tiny_llama):
    from runner.models import load_model

    model, _ = load_model({"path": str(tiny_llama), "dtype": "float32"})
    ids = torch.tensor([[1, 5, 9, 30, 31, 7]])
    with torch.no_grad():
        before = model(ids).logits
        grown = zoo.grow_depth(model, 2)
        after = grown(ids).logits
    assert len(grown.model.layers) == 4 and grown.config.num_hidden_layers == 4
    assert torch.allclose(before, after, atol=1e-6)


def test_zoo_cli_rejects_unknown_entries():
    proc = subprocess.run([sys.executable, "-m", "runner.toy.zoo", "build", "toy-giant"], capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown zoo entries ['toy-giant']" in proc.stderr


@pytest.mark.slow
def test_full_zoo_is_genuinely_trained(tmp_path):
    """The DESIGN's promises about the zoo, measured on the toy eval (the README quotes these figures)."""
    env = {**os.environ, "RUNNER_TOY_PROFILE": "full"}
    env["RUNNER_CACHE_DIR"] = os.environ.get("RUNNER_ZOO_CACHE_DIR", env["RUNNER_CACHE_DIR"])
    out = tmp_path / "zoo.json"
    proc = subprocess.run([sys.executable, "-m", "runner.toy.zoo", "eval", "--json", str(out)], env=env,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads(out.read_text())
    em = {n: m[n]["toy_arith/exact_match"] for n in m}
    hard = {n: m[n]["toy_arith_hard/exact_match"] for n in m}
    print(json.dumps(m, indent=1))
    assert em["toy-instruct"] >= 0.8 and em["toy-teacher"] >= 0.8
    assert hard["toy-thinking"] >= hard["toy-instruct"] + 0.1
    assert m["toy-thinking"]["toy_arith_hard/response_tokens"] > 2 * m["toy-instruct"]["toy_arith_hard/response_tokens"]
    assert m["toy-thinking"]["toy_arith_hard/think_rate"] > 0.95 and m["toy-instruct"]["toy_arith_hard/think_rate"] == 0
    assert em["toy-student"] <= em["toy-teacher"] - 0.3
    assert em["toy-base"] <= 0.5  # a base model does not follow the chat format yet
