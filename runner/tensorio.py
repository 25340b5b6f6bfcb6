"""Streaming safetensors I/O: read a model folder one tensor at a time, write sharded output.

Used by every recipe that combines checkpoints tensor by tensor (merges, grafts): peak memory stays
near a few tensors plus one output shard, whatever the number of layers.

- `TensorSource` reads ``model.safetensors.index.json`` or a single ``model.safetensors`` and keeps
  one shard open (memory-mapped) at a time.
- `ShardedWriter` buffers tensors up to ``max_shard_bytes`` and flushes them as shards, then names
  them ``model-0000i-of-0000N.safetensors`` with an index regenerated from what was written (or a
  single ``model.safetensors``), in a temp folder renamed into place at the end.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from runner.errors import ConfigError
from runner.models import atomic_dir, commit_dir

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Files a model folder carries besides its weights (copied from the donor model).
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
              "chat_template.json", "generation_config.json", "tokenizer.model", "vocab.json", "merges.txt",
              "added_tokens.json")


def parse_size(size: str | int) -> int:
    """'2GB', '500MB', '1.5GiB' or a number of bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?)B?\s*", str(size), re.I)
    if not m:
        raise ConfigError(f"size {size!r} is not a size like 2GB, 500MB or 1073741824")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2).upper() or " "))


class TensorSource:
    """Lazy, read-only access to the tensors of an HF model folder."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if (self.folder / INDEX).is_file():
            self.weight_map: dict[str, str] = json.loads((self.folder / INDEX).read_text())["weight_map"]
        elif (self.folder / SINGLE).is_file():
            with safe_open(str(self.folder / SINGLE), framework="pt") as f:
                self.weight_map = {k: SINGLE for k in f.keys()}
        else:
            raise ConfigError(f"{self.folder} holds neither {INDEX} nor {SINGLE}")
        self._open_name: str | None = None
        self._handle = None

    def keys(self) -> list[str]:
        """Keys in shard order (reading them in this order opens each shard once)."""
        return sorted(self.weight_map, key=lambda k: (self.weight_map[k], k))

    def _file(self, key: str):
        name = self.weight_map[key]
        if name != self._open_name:
            self._handle = safe_open(str(self.folder / name), framework="pt")
            self._open_name = name
        return self._handle

    def get(self, key: str) -> torch.Tensor:
        return self._file(key).get_tensor(key)

    def shape(self, key: str) -> list[int]:
        return list(self._file(key).get_slice(key).get_shape())

    def config(self) -> dict:
        path = self.folder / "config.json"
        return json.loads(path.read_text()) if path.is_file() else {}


class ShardedWriter:
    """Write tensors as safetensors shards of at most `max_shard_bytes` (a tensor never splits)."""

    def __init__(self, out_dir: str | Path, max_shard_bytes: int):
        self.out_dir = Path(out_dir)
        self.tmp = atomic_dir(self.out_dir)
        self.max_bytes = max_shard_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffer_bytes = 0
        self.shards: list[tuple[str, list[str]]] = []
        self.total = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.buffer and self.buffer_bytes + size > self.max_bytes:
            self._flush()
        self.buffer[key] = tensor.contiguous()
        self.buffer_bytes += size
        self.total += size

    def _flush(self) -> None:
        name = f"part-{len(self.shards):05d}.safetensors"
        save_file(self.buffer, str(self.tmp / name), metadata={"format": "pt"})
        self.shards.append((name, list(self.buffer)))
        self.buffer, self.buffer_bytes = {}, 0

    def finish(self, side_files_from: str | Path | None = None, config: dict | None = None) -> Path:
        """Name the shards, write the index, config and side files, and move the folder into place."""
        try:
            if self.buffer or not self.shards:
                self._flush()
            n = len(self.shards)
            weight_map = {}
            for i, (name, keys) in enumerate(self.shards):
                final = SINGLE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                (self.tmp / name).rename(self.tmp / final)
                weight_map.update({k: final for k in keys})
            if n > 1:
                index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
                (self.tmp / INDEX).write_text(json.dumps(index, indent=2))
            if side_files_from is not None:
                for name in SIDE_FILES:
                    src = Path(side_files_from) / name
                    if src.is_file():
                        shutil.copy2(src, self.tmp / name)
            if config is not None:
                (self.tmp / "config.json").write_text(json.dumps(config, indent=2))
            for f in self.tmp.iterdir():
                f.chmod(0o644)
            commit_dir(self.tmp, self.out_dir)
        except BaseException:
            self.abort()
            raise
        return self.out_dir

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
