"""Streaming safetensors I/O: read a model folder one tensor at a time, write sharded output.

Used by every recipe that combines checkpoints tensor by tensor (merges, grafts): peak memory stays
near the few tensors in use, whatever the number of layers and the shard size.

- `TensorSource` reads ``model.safetensors.index.json`` or a single ``model.safetensors`` and reads
  each tensor on demand as a private memory map of its own bytes (no shard kept mapped).
- `ShardedWriter` writes each tensor to disk as it is added, starting a new shard when the next
  tensor would take the current one past ``max_shard_bytes``, then names the shards
  ``model-0000i-of-0000N.safetensors`` with an index regenerated from what was written (or a single
  ``model.safetensors``), in a temp folder renamed into place at the end.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import shutil
from pathlib import Path

import torch

from runner import atomic
from runner.errors import ConfigError

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


# safetensors dtype names (the header's "dtype") -> torch dtypes
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


def read_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's header (name -> dtype, shape, data_offsets) and where its data starts."""
    with path.open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


class TensorSource:
    """Lazy, read-only access to the tensors of an HF model folder.

    Each tensor is its own private (copy-on-write) memory map of just its bytes, unmapped when the
    tensor is freed: no copy out of the page cache, and resident memory holds only the tensors in
    use. A map of the whole shard would instead stay resident for as long as the shard is open, up
    to a shard per input.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if (self.folder / INDEX).is_file():
            self.weight_map: dict[str, str] = json.loads((self.folder / INDEX).read_text())["weight_map"]
        elif (self.folder / SINGLE).is_file():
            self.weight_map = {k: SINGLE for k in read_header(self.folder / SINGLE)[0]}
        else:
            raise ConfigError(f"{self.folder} holds neither {INDEX} nor {SINGLE}")
        self._headers: dict[str, tuple[dict, int]] = {}

    def keys(self) -> list[str]:
        """Keys in shard order, then by their place in the shard (sequential reads)."""
        return sorted(self.weight_map, key=lambda k: (self.weight_map[k], self._entry(k)[0]["data_offsets"][0]))

    def _entry(self, key: str) -> tuple[dict, int]:
        name = self.weight_map[key]
        if name not in self._headers:
            path = self.folder / name
            if not path.is_file():
                raise ConfigError(f"{self.folder}: shard {name} (listed for {key}) is missing")
            self._headers[name] = read_header(path)
        header, data_start = self._headers[name]
        if key not in header:
            raise ConfigError(f"{self.folder}: {key} is listed in {INDEX} but not stored in {name}")
        return header[key], data_start

    def get(self, key: str) -> torch.Tensor:
        info, data_start = self._entry(key)
        dtype, shape = _DTYPES[info["dtype"]], info["shape"]
        start, end = info["data_offsets"]
        if end == start:
            return torch.empty(shape, dtype=dtype)
        path = self.folder / self.weight_map[key]
        offset = data_start + start
        page = offset - offset % mmap.ALLOCATIONGRANULARITY  # a map starts on a page boundary
        with path.open("rb") as f:
            if os.fstat(f.fileno()).st_size < data_start + end:
                raise ConfigError(f"{path}: truncated while reading {key}")
            # ACCESS_COPY: writable, and a write makes a private page, never touches the file
            mapped = mmap.mmap(f.fileno(), offset - page + end - start, offset=page, access=mmap.ACCESS_COPY)
        # the tensor keeps the map alive; the map closes when the last tensor on it is freed
        data = torch.frombuffer(mapped, dtype=torch.uint8, count=end - start, offset=offset - page)
        return data.view(dtype).view(shape)

    def shape(self, key: str) -> list[int]:
        return list(self._entry(key)[0]["shape"])

    def config(self) -> dict:
        path = self.folder / "config.json"
        return json.loads(path.read_text()) if path.is_file() else {}


class ShardedWriter:
    """Write tensors as safetensors shards of at most `max_shard_bytes` (a tensor never splits).

    No shard is held in memory: each tensor's bytes go to its shard file when it is added, behind
    room left for the header, which is written into that room when the shard is full. The room is
    a thousandth of the shard size, between 4 KiB and 1 MiB (about 40 to 10,000 tensor entries); a
    shard also ends when the next entry would not fit in it, and the header's unused room is spaces,
    the format's own padding.
    """

    def __init__(self, out_dir: str | Path, max_shard_bytes: int):
        self.out_dir = Path(out_dir)
        self.tmp = atomic.new_folder(self.out_dir)
        self.max_bytes = max_shard_bytes
        self.room = min(1 << 20, max(4096, max_shard_bytes // 1000 // 8 * 8))  # a multiple of 8: aligned data
        self.entries: dict[str, dict] = {}  # the open shard's header entries
        self.header_bytes = 0  # their JSON length, metadata and braces included
        self.file = None  # the open shard
        self.shard_bytes = 0
        self.shards: list[tuple[str, list[str]]] = []
        self.total = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        if tensor.dtype not in _NAMES:
            raise ValueError(f"{key}: safetensors cannot store dtype {tensor.dtype}")
        tensor = tensor.detach().cpu().contiguous()
        size = tensor.numel() * tensor.element_size()
        if self.entries and self.shard_bytes + size > self.max_bytes:
            self._flush()
        fields, entry = self._entry(key, tensor, size)
        if self.entries and self.header_bytes + len(entry) > self.room:
            self._flush()
            fields, entry = self._entry(key, tensor, size)  # its offsets start again at 0
        if self.file is None:
            self._open()
        if self.header_bytes + len(entry) > self.room:
            raise ValueError(f"{key}: the tensor's header entry does not fit in a shard header of {self.room} bytes")
        self.file.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
        self.entries[key] = fields
        self.header_bytes += len(entry)
        self.shard_bytes += size
        self.total += size

    def _entry(self, key: str, tensor: torch.Tensor, size: int) -> tuple[dict, bytes]:
        """The tensor's header fields in the open shard, and their JSON with the separating comma."""
        fields = {"dtype": _NAMES[tensor.dtype], "shape": list(tensor.shape),
                  "data_offsets": [self.shard_bytes, self.shard_bytes + size]}
        return fields, b"," + _json({key: fields})[1:-1]

    def _open(self) -> None:
        self.file = (self.tmp / f"part-{len(self.shards):05d}.safetensors").open("wb")
        self.file.seek(8 + self.room)  # tensor data starts behind the header's room
        self.header_bytes = len(_json({"__metadata__": METADATA}))

    def _flush(self) -> None:
        if self.file is None:  # a model with no tensors still gets one (empty) file
            self._open()
        header = _json({"__metadata__": METADATA, **self.entries})
        self.file.seek(0)
        self.file.write(self.room.to_bytes(8, "little") + header + b" " * (self.room - len(header)))
        self.file.close()
        self.shards.append((Path(self.file.name).name, list(self.entries)))
        self.entries, self.file, self.shard_bytes = {}, None, 0

    def finish(self, side_files_from: str | Path | None = None, config: dict | None = None) -> Path:
        """Name the shards, write the index, config and side files, and move the folder into place."""
        try:
            if self.file is not None or not self.shards:
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
            atomic.commit(self.tmp, self.out_dir)
        except BaseException:
            self.abort()
            raise
        return self.out_dir

    def abort(self) -> None:
        if self.file is not None:
            self.file.close()
        atomic.discard(self.tmp)


METADATA = {"format": "pt"}


def _json(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()
