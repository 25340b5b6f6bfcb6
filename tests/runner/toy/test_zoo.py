import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from runner.errors import RunnerError
from runner.cache import file_sha256
from runner.toy import zoo
from tests.conftest import REPO

MB = 1024 * 1024


def test_every_entry_is_shipped_as_the_code_describes_it():
    manifest = zoo.read_manifest()
    assert list(manifest["entries"]) == zoo.names() and manifest["zoo_version"] == zoo.ZOO_VERSION
    for name, record in manifest["entries"].items():
        folder = zoo.SHIPPED_DIR / name
        assert record["fingerprint"] == zoo.fingerprint(name), f"{name}: rebuild and `python -m runner.toy ship`"
        assert record["recipe"] == json.loads(json.dumps(zoo.recipe(name)))
        assert {f.name for f in folder.iterdir()} == set(record["files"])
        for f, digest in record["files"].items():
            assert file_sha256(folder / f) == digest
            assert (folder / f).stat().st_size < 2 * MB
        assert zoo.ensure(name) == folder  # nothing is built
        meta = json.loads((folder / "zoo.json").read_text())
        assert meta["profile"] == "full" and meta["fingerprint"] == record["fingerprint"]


def test_entries_share_the_tokenizer_the_tests_build(toy_tokenizer):
    vocabs = {(zoo.SHIPPED_DIR / n / "tokenizer.json").read_text() for n in zoo.names()}
    assert len(vocabs) == 1
    from runner.models import load_tokenizer

    assert load_tokenizer(str(zoo.SHIPPED_DIR / "toy-base")).get_vocab() == toy_tokenizer.get_vocab()


def test_the_family_has_the_shapes_it_promises():
    config = {n: json.loads((zoo.SHIPPED_DIR / n / "config.json").read_text()) for n in zoo.names()}
    params = {n: r["parameters"] for n, r in zoo.read_manifest()["entries"].items()}
    assert config["toy-teacher"]["num_hidden_layers"] == 2 * config["toy-base"]["num_hidden_layers"]
    assert params["toy-student"] < params["toy-base"] == params["toy-instruct"] == params["toy-thinking"] < params["toy-teacher"]
    assert config["toy-student"]["model_type"] == "qwen3"


def test_a_damaged_shipped_entry_is_an_error(tmp_path, monkeypatch):
    copy = tmp_path / "shipped"
    shutil.copytree(zoo.SHIPPED_DIR, copy)
    monkeypatch.setattr(zoo, "SHIPPED_DIR", copy)
    zoo._verified.cache_clear()
    try:
        weights = copy / "toy-student" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
        with pytest.raises(RunnerError, match="toy-student is damaged: model.safetensors"):
            zoo.ensure("toy-student")
        assert zoo.ensure("toy-base") == copy / "toy-base"
    finally:
        zoo._verified.cache_clear()


def test_a_stale_shipped_entry_is_not_used(tmp_path, monkeypatch):
    copy = tmp_path / "shipped"
    shutil.copytree(zoo.SHIPPED_DIR, copy)
    manifest = json.loads((copy / zoo.MANIFEST).read_text())
    manifest["entries"]["toy-base"]["fingerprint"] = "0" * 12
    (copy / zoo.MANIFEST).write_text(json.dumps(manifest))
    monkeypatch.setattr(zoo, "SHIPPED_DIR", copy)
    assert zoo.shipped("toy-base") is None and zoo.shipped("toy-instruct") == copy / "toy-instruct"


def test_fingerprint_follows_profile_and_parent(monkeypatch):
    full = zoo.fingerprint("toy-instruct")
    monkeypatch.setenv("RUNNER_TOY_PROFILE", "smoke")
    assert zoo.fingerprint("toy-instruct") != full and zoo.shipped("toy-instruct") is None
    monkeypatch.setenv("RUNNER_TOY_PROFILE", "tiny")
    with pytest.raises(RunnerError, match="RUNNER_TOY_PROFILE"):
        zoo.entry_dir("toy-base")


@pytest.mark.e2e
def test_build_path_in_the_smoke_profile(tmp_path):
    """`build` trains from scratch into the cache (here with a hundredth of the steps); `ship` refuses it."""
    env = {**os.environ, "RUNNER_TOY_PROFILE": "smoke", "RUNNER_CACHE_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "runner.toy", "build", "toy-teacher"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    built = {p.name.rsplit("-", 1)[0]: p for p in (tmp_path / "zoo").iterdir() if not p.name.startswith(".")}
    assert set(built) == {"toy-base", "toy-teacher"}  # the teacher starts from toy-base
    meta = json.loads((built["toy-teacher"] / "zoo.json").read_text())
    assert meta["profile"] == "smoke" and meta["init"] == "toy-base" and meta["grow_depth"] == 2
    assert [s["stage"]["steps"] for s in meta["stages"]] == [6]
    assert (built["toy-teacher"] / "tokenizer.json").read_text() == (zoo.SHIPPED_DIR / "toy-base" / "tokenizer.json").read_text()
    proc = subprocess.run([sys.executable, "-m", "runner.toy", "ship", "toy-base"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "only full-profile builds are shipped" in proc.stderr


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
    proc = subprocess.run([sys.executable, "-m", "runner.toy", "build", "toy-giant"], capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown zoo entries ['toy-giant']" in proc.stderr


@pytest.mark.slow
@pytest.mark.e2e
def test_zoo_eval_prints_the_tables_in_the_readme():
    """The shipped weights are the same everywhere, so their measurement is too: every row that
    `python -m runner.toy eval --markdown` prints is in the README, word for word."""
    proc = subprocess.run([sys.executable, "-m", "runner.toy", "eval", "--markdown"], capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert len(rows) == 2 + len(zoo.names()) + 6  # two tables: their headers, the entries, the premises
    readme = (REPO / "README.md").read_text()
    assert [r for r in rows if r not in readme] == []
    assert "| NO |" not in proc.stdout  # every premise holds
