"""Streaming safetensors I/O: the writer's files load with safetensors itself, shards split where they
should, nothing is left behind on failure; the reader returns each tensor as stored."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from runner import tensorio
from runner.tensorio import ShardedWriter, TensorSource

TENSORS = {
    "w.fp32": torch.arange(12, dtype=torch.float32).view(3, 4) / 7,
    "w.bf16": torch.linspace(-2, 2, 10).to(torch.bfloat16),
    "w.fp16": torch.tensor([[1.5, -0.25]], dtype=torch.float16),
    "mask": torch.tensor([True, False, True]),
    "ids": torch.tensor([3, -1, 2**40]),
    "scalar": torch.tensor(2.5),
    "empty": torch.zeros(0, 5),
    "strided": torch.arange(20.0).view(4, 5).t(),  # not contiguous: written in its logical order
}


def written(folder):
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def assert_same(got: dict, expected: dict):
    assert sorted(got) == sorted(expected)
    for key, tensor in expected.items():
        assert got[key].dtype == tensor.dtype and got[key].shape == tensor.shape, key
        assert torch.equal(got[key], tensor), key


@pytest.mark.parametrize("max_bytes", [1 << 30, 40])
def test_written_shards_load_with_safetensors_and_round_trip_through_the_reader(tmp_path, max_bytes):
    writer = ShardedWriter(tmp_path / "out", max_bytes)
    for key, tensor in TENSORS.items():
        writer.add(key, tensor)
    out = writer.finish(config={"model_type": "toy"})
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert (shards == ["model.safetensors"]) == (max_bytes == 1 << 30)
    assert not list(out.glob("*.data"))  # the data files are gone once their shard is written
    assert_same(written(out), TENSORS)
    source = TensorSource(out)
    assert_same({k: source.get(k) for k in source.keys()}, TENSORS)
    if max_bytes == 40:  # a shard stays under the limit unless one tensor alone is larger
        for shard in out.glob("*.safetensors"):
            sizes = [t.numel() * t.element_size() for t in load_file(shard).values()]
            assert sum(sizes) <= 40 or len(sizes) == 1


def test_the_header_is_padded_so_data_starts_aligned(tmp_path):
    writer = ShardedWriter(tmp_path / "out", 1 << 30)
    writer.add("a", torch.ones(3))
    out = writer.finish()
    raw = (out / "model.safetensors").read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert header_len % 8 == 0 and len(raw) == 8 + header_len + 12


def test_a_shard_ends_when_its_header_room_is_full(tmp_path):
    many = {f"model.layers.{i}.a_rather_long_name_for_a_tiny_norm.weight": torch.full((1,), float(i)) for i in range(200)}
    writer = ShardedWriter(tmp_path / "out", 40_000)  # room: the 4 KiB floor, about 40 of these entries
    for key, tensor in many.items():
        writer.add(key, tensor)
    out = writer.finish()
    shards = list(out.glob("*.safetensors"))
    assert len(shards) >= 4  # 800 bytes of data would fit one shard; the headers would not
    assert_same(written(out), many)
    for shard in shards:
        raw = shard.read_bytes()
        assert int.from_bytes(raw[:8], "little") == writer.room == 4096
        json.loads(raw[8:8 + 4096])  # the header and its space padding parse as JSON


def test_a_failed_write_leaves_no_output_and_no_temp_folder(tmp_path):
    writer = ShardedWriter(tmp_path / "out", 16)
    writer.add("a", torch.ones(8))
    writer.add("b", torch.ones(8))  # the first shard is flushed, the second is open
    with pytest.raises(ValueError, match="cannot store dtype"):
        writer.add("c", torch.ones(2, dtype=torch.complex64))
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_a_truncated_shard_is_a_clear_error(tmp_path):
    writer = ShardedWriter(tmp_path / "out", 1 << 30)
    writer.add("a", torch.ones(100))
    out = writer.finish()
    path = out / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(tensorio.ConfigError, match="truncated while reading a"):
        TensorSource(out).get("a")
