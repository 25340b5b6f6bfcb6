"""The streaming merge engine: checks, filters, and one pass over the tensors of the inputs.

Inputs are read lazily (`runner.tensorio.TensorSource`, one tensor at a time, no shard kept mapped), each output
tensor is computed in fp32 from the inputs' tensors of the same name, cast once to the output dtype
and handed to a `ShardedWriter`, which puts it on disk at once. Peak memory is a few tensors,
independent of the number of layers and of the shard size.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from runner import atomic, registry
from runner.errors import ConfigError
from runner.models import DTYPES
from runner.progress import progress
from runner.tensorio import ShardedWriter, TensorSource, parse_size

log = logging.getLogger(__name__)

MODULE_KINDS = ("attention", "mlp", "embeddings", "norms", "lm_head", "other")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


_ATTENTION = {"self_attn", "attn", "attention", "self_attention"}
_MLP = {"mlp", "feed_forward", "ffn"}


def classify(key: str) -> tuple[int | None, str]:
    """(decoder layer index or None, module kind) of a tensor name, from its dotted module path."""
    m = _LAYER.search(key)
    layer = int(m.group(1)) if m else None
    parts = key.split(".")
    if any(p in ("embed_tokens", "wte", "word_embeddings") for p in parts):
        kind = "embeddings"
    elif parts[0] == "lm_head":
        kind = "lm_head"
    elif _ATTENTION & set(parts):  # Qwen3's self_attn.q_norm/k_norm count as attention
        kind = "attention"
    elif _MLP & set(parts):
        kind = "mlp"
    elif any("norm" in p for p in parts):
        kind = "norms"
    else:
        kind = "other"
    return layer, kind


def parse_layers(spec: str | None) -> set[int] | None:
    """'12-35' or '0-3,8,10-11' -> a set of layer indices; None means every layer."""
    if spec is None:
        return None
    layers: set[int] = set()
    for part in str(spec).split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise ConfigError(f"merge.layers: {spec!r} is not a layer list like '12-35' or '0-3,8'")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise ConfigError(f"merge.layers: range {part.strip()!r} runs backwards")
        layers |= set(range(lo, hi + 1))
    return layers


@dataclass
class Selection:
    """Which tensors the method merges; the rest are copied from `outside`."""

    layers: set[int] | None = None  # None: all; tensors outside any layer are selected only when no layer filter is set
    modules: tuple[str, ...] | None = None  # None: all kinds
    # None: all; else the lowercased name must contain one of these (the Shadow-FT reference's rule, so
    # fused qkv_proj and gate_up_proj are selected through v_proj and up_proj)
    contains: tuple[str, ...] | None = None

    def __call__(self, key: str) -> bool:
        layer, kind = classify(key)
        if self.modules is not None and kind not in self.modules:
            return False
        if self.contains is not None and not any(part.lower() in key.lower() for part in self.contains):
            return False
        if self.layers is not None:
            return layer is not None and layer in self.layers
        return True


def check_compatible(sources: dict[str, TensorSource]) -> None:
    """Same architecture, the same tensor names and shapes; tied embeddings treated explicitly."""
    names = list(sources)
    first = sources[names[0]]
    problems = []
    types = {n: s.config().get("model_type") for n, s in sources.items()}
    if len(set(types.values())) > 1:
        problems.append(f"architectures differ: {types}")
    ties = {n: bool(s.config().get("tie_word_embeddings", False)) for n, s in sources.items()}
    has_head = {n: "lm_head.weight" in s.weight_map for n, s in sources.items()}
    if len(set(has_head.values())) > 1:
        problems.append(f"only some inputs store lm_head.weight ({has_head}; tie_word_embeddings {ties}): "
                        "tied and untied models cannot be merged tensor by tensor")
    for n in names[1:]:
        other = sources[n]
        only_first = sorted(set(first.weight_map) - set(other.weight_map))
        only_other = sorted(set(other.weight_map) - set(first.weight_map))
        if only_first or only_other:
            problems.append(f"tensor names differ between {names[0]} and {n}: only in {names[0]}: {only_first[:5]}"
                            f"{'...' if len(only_first) > 5 else ''}; only in {n}: {only_other[:5]}"
                            f"{'...' if len(only_other) > 5 else ''}")
            continue
        for key in first.keys():
            a, b = first.shape(key), other.shape(key)
            if a != b:
                rows_only = a[0] != b[0] and a[1:] == b[1:]
                hint = (" (vocabulary rows differ: pad or truncate the embeddings to one tokenizer first)"
                        if rows_only and classify(key)[1] in ("embeddings", "lm_head") else "")
                problems.append(f"{key}: shape {a} in {names[0]} but {b} in {n}{hint}")
    if problems:
        raise ConfigError(["merge inputs do not match: " + p for p in problems])


class SVDCache:
    """SVD factors on disk, one file per tensor delta, so a Timber sweep computes each SVD once.

    Entries are named by the caller from the tensor's name and a hash of the delta's bytes, so a
    checkpoint rewritten in place never meets the factors of its predecessor.
    """

    def __init__(self, root: Path):
        self.dir = Path(root)
        self.dir.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.dir / f"{key}.safetensors"

    def get(self, key: str):
        path = self._path(key)
        if not path.is_file():
            return None
        f = load_file(str(path))
        return f["u"], f["s"], f["vh"]

    def put(self, key: str, factors) -> None:
        u, s, vh = factors
        with atomic.file(self._path(key)) as tmp:
            save_file({"u": u.contiguous(), "s": s.contiguous(), "vh": vh.contiguous()}, str(tmp))


def _dtype_name(config: dict) -> str:
    return str(config.get("dtype") or config.get("torch_dtype") or "float32")


def merge_models(
    inputs: list[Path],
    base: Path | None,
    method,
    params: dict,
    out_dir: Path,
    *,
    selection: Selection,
    outside: Path,
    donor: Path,
    dtype: str | None,
    max_shard_size: str,
    seed: int,
    svd_cache: SVDCache | None = None,
    runtime: tuple[str, ...] = (),
    task_vector_scales: dict[int, list[float]] | None = None,
    desc: str = "merge",
) -> dict:
    """Merge `inputs` (and `base`) into an HF folder at `out_dir`; returns counts of what was done.
    A progress bar `desc` counts the tensors written.

    `runtime` names the arguments `method` takes from the engine (its contract's runtime arguments):
    ``generator`` (seeded per tensor from `seed` and the tensor's name), ``key`` (the tensor's name),
    ``svd_cache``. `task_vector_scales` ({decoder layer: one factor per input}, ACM's coefficients)
    scales each input's task vector of that layer, x <- base + s (x - base), before the method merges;
    tensors of other layers and outside the layers are left as they are.
    """
    sources = {str(p): TensorSource(p) for p in inputs}
    if base is not None:
        sources.setdefault(str(base), TensorSource(base))
    sources.setdefault(str(outside), TensorSource(outside))
    check_compatible(sources)
    donor_config = TensorSource(donor).config()
    out_dtype = dtype or _dtype_name(donor_config)
    if out_dtype not in DTYPES:
        raise ConfigError(registry.not_allowed("merge.dtype", out_dtype, DTYPES))
    writer = ShardedWriter(out_dir, parse_size(max_shard_size))
    merged = copied = 0
    try:
        order = sources[str(inputs[0])].keys()
        with progress(desc, total=len(order)) as bar:
            for key in order:
                if selection(key):
                    tensors = [sources[str(p)].get(key).float() for p in inputs]
                    base_tensor = sources[str(base)].get(key).float() if base is not None else None
                    scales = (task_vector_scales or {}).get(classify(key)[0])
                    if scales is not None:  # lerp is exact at 0 and 1: a factor of 1 leaves the input as it is
                        tensors = [torch.lerp(base_tensor, x, s) for x, s in zip(tensors, scales, strict=True)]
                    supplied = {}
                    if "generator" in runtime:
                        digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
                        supplied["generator"] = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
                    if "key" in runtime:
                        supplied["key"] = key
                    if "svd_cache" in runtime:
                        supplied["svd_cache"] = svd_cache
                    out = method(tensors, base_tensor, **params, **supplied)
                    merged += 1
                else:
                    out = sources[str(outside)].get(key).float()
                    copied += 1
                writer.add(key, out.to(DTYPES[out_dtype]))
                bar.advance()
        config = dict(donor_config, dtype=out_dtype)
        config.pop("torch_dtype", None)
        writer.finish(side_files_from=donor, config=config)
    except BaseException:
        writer.abort()
        raise
    log.info("merged %d tensors, copied %d from %s, wrote %s (%s)", merged, copied, outside, out_dir, out_dtype)
    return {"merged_tensors": merged, "copied_tensors": copied, "dtype": out_dtype}
