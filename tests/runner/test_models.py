import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from runner.models import (
    check_model_folder,
    check_model_spec,
    load_model,
    save_checkpoint,
)
from tests.conftest import make_tiny_model


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_save_load_round_trip_gives_identical_logits(tmp_path, toy_tokenizer, model_type):
    src = make_tiny_model(tmp_path / "src", toy_tokenizer, model_type, seed=3)
    model, tok = load_model({"path": str(src), "dtype": "float32"})
    out = save_checkpoint(model, tok, tmp_path / "ckpt")
    # the written folder loads with plain transformers, no project code
    plain = AutoModelForCausalLM.from_pretrained(out)
    plain_tok = AutoTokenizer.from_pretrained(out)
    ids = plain_tok.apply_chat_template([{"role": "user", "content": "12+30=?"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    assert plain_tok.get_vocab() == tok.get_vocab()
    assert plain.config.model_type == model_type
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain(ids).logits)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp folder left behind


def test_save_casts_once_at_the_end(tmp_path, tiny_llama):
    model, tok = load_model({"path": str(tiny_llama), "dtype": "float32"})
    out = save_checkpoint(model, tok, tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded, _ = load_model({"path": str(out)})
    assert next(reloaded.parameters()).dtype == torch.bfloat16


def test_save_replaces_an_existing_checkpoint_atomically(tmp_path, tiny_llama):
    model, tok = load_model({"path": str(tiny_llama), "dtype": "float32"})
    out = tmp_path / "ckpt"
    save_checkpoint(model, tok, out)
    (out / "stale.txt").write_text("from an earlier save")
    save_checkpoint(model, tok, out)
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_failed_save_leaves_nothing(tmp_path, tiny_llama):
    model, tok = load_model({"path": str(tiny_llama), "dtype": "float32"})

    class Broken:
        def save_pretrained(self, *a, **k):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(model, Broken(), tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_load_dtype(tiny_qwen3):
    model, _ = load_model({"path": str(tiny_qwen3), "dtype": "bfloat16"})
    assert next(model.parameters()).dtype == torch.bfloat16


def test_model_folder_checks(tmp_path, tiny_llama):
    import shutil

    assert check_model_folder(tiny_llama, "model") == []
    bad = tmp_path / "corrupt"
    shutil.copytree(tiny_llama, bad)
    (bad / "model.safetensors").write_bytes(b"\x00\x01garbage")
    assert "weight file model.safetensors is corrupt" in check_model_folder(bad, "model")[0]

    bins = tmp_path / "bins"
    bins.mkdir()
    (bins / "config.json").write_text("{}")
    (bins / "pytorch_model.bin").write_bytes(b"x")
    assert "safetensors only" in check_model_folder(bins, "teacher")[0]
    assert check_model_folder(tmp_path, "model")[0].endswith("has no config.json; it is not a Hugging Face model folder")


def test_sharded_index_must_name_existing_shards(tmp_path, tiny_llama):
    import shutil

    folder = tmp_path / "sharded"
    shutil.copytree(tiny_llama, folder)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    assert "missing: model-00002-of-00002.safetensors" in check_model_folder(folder, "model")[0]


def test_model_spec_checks(tiny_llama, tmp_path):
    assert check_model_spec({"path": "toy-base"}, "model") == []
    assert check_model_spec({"path": str(tiny_llama)}, "model") == []
    problems = check_model_spec({"path": "toy-bsae"}, "student")
    assert problems and "Did you mean 'toy-base'?" in problems[0] and problems[0].startswith("student.path:")
    assert "is not a folder" in check_model_spec({"path": str(tmp_path / "nope")}, "model")[0]
    offline = check_model_spec({"path": "Qwen/Qwen3-0.6B"}, "teacher")[0]
    assert "hub is offline" in offline and offline.startswith("teacher.path:")
    assert "dtype" in check_model_spec({"path": "toy-base", "dtype": "fp8"}, "model")[0]
