"""Loading and saving Hugging Face causal LMs.

A model spec (``{path, dtype, trust_remote_code, revision}``) names a model a source provides (the
toy zoo's entries, through the ``model_source`` hook), a local folder or a hub id. `check_model_spec`
finds every problem with a spec without loading weights, so a run can refuse bad input before any
work; `load_model` then loads it; `save_checkpoint` writes an HF folder (safetensors, tokenizer,
generation config) atomically.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

from runner import atomic
from runner.errors import ConfigError

log = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DTYPE_CHOICES = ("auto", *DTYPES)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _spec_get(spec: Any, name: str, default: Any = None) -> Any:
    return spec.get(name, default) if hasattr(spec, "get") else getattr(spec, name, default)


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or path.count("/") > 1 or "\\" in path


def _sources() -> dict:
    from runner import registry

    return registry.entries("model_source")


def _source_of(path: str):
    """The model source that provides `path` as one of its names, or None."""
    return next((src for src in _sources().values() if path in src.names()), None)


def _what_a_path_is() -> str:
    sources = _sources()
    named = [f"{sources[key].label} ({', '.join(sources[key].names())})" for key in sorted(sources)]  # import order aside
    return ", ".join(["a folder", *named]) + " or a hub id"


def check_model_spec(spec: Any, key: str) -> list[str]:
    """Problems with a model spec, each naming `key`; empty when it can be loaded.

    Cheap: reads config.json and safetensors headers, never weights. Names a model source provides
    (the toy zoo's) always pass: the source builds or converts them on first use.
    """
    from runner.registry import did_you_mean, not_allowed

    problems = []
    path = _spec_get(spec, "path")
    dtype = _spec_get(spec, "dtype", "auto")
    if dtype not in DTYPE_CHOICES:
        problems.append(not_allowed(f"{key}.dtype", dtype, DTYPE_CHOICES))
    if not path:
        return problems + [f"{key}.path: missing; give {_what_a_path_is()}"]
    path = str(path)
    source = _source_of(path)
    if source is not None:  # a source's name: it builds or converts the model on first use
        return problems + (source.check(path, key) if hasattr(source, "check") else [])
    local = Path(path).expanduser()
    if local.exists():
        return problems + check_model_folder(local, key)
    # a near miss of a source's name is a typo, not a hub id (hub ids of that shape have a slash)
    hint = "" if "/" in path else did_you_mean(path, [n for src in _sources().values() for n in src.names()])
    if _looks_local(path) or not _HUB_ID.match(path) or hint:
        return problems + [f"{key}.path: {path!r} is not {_what_a_path_is()}.{hint}"]
    if hub_offline() and not _hub_cached(path, _spec_get(spec, "revision")):
        problems.append(
            f"{key}.path: {path!r} looks like a hub id, but the hub is offline (HF_HUB_OFFLINE=1) and no cached "
            "copy was found; download it on a machine with a network or give a local folder"
        )
    return problems


def _hub_cached(repo_id: str, revision: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    return isinstance(found, str)


def check_model_folder(folder: Path, key: str) -> list[str]:
    """Problems with a local HF model folder: config, weight format, shard headers and index."""
    from safetensors import safe_open

    if not folder.is_dir():
        return [f"{key}.path: {str(folder)!r} is a file; give the model folder that holds config.json"]
    if not (folder / "config.json").is_file():
        return [f"{key}.path: {str(folder)!r} has no config.json; it is not a Hugging Face model folder"]
    try:
        json.loads((folder / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return [f"{key}.path: {folder / 'config.json'} is not valid JSON ({exc})"]
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
            return [f"{key}.path: {str(folder)!r} holds only pickle weights (*.bin/*.pt); the runner loads "
                    "safetensors only (convert with save_pretrained(safe_serialization=True))"]
        return [f"{key}.path: {str(folder)!r} has no *.safetensors weights"]
    problems = []
    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt") as f:
                f.keys()
        except Exception as exc:  # safetensors raises several types for a bad header
            problems.append(f"{key}.path: weight file {shard.name} is corrupt or truncated ({exc})")
    index = folder / "model.safetensors.index.json"
    if index.is_file() and not problems:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            return [f"{key}.path: {index.name} is not a valid safetensors index ({exc})"]
        missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
        if missing:
            problems.append(f"{key}.path: {index.name} names shards that are missing: {', '.join(missing)}")
    return problems


def resolve_model_path(spec: Any) -> str:
    """A loadable path: the folder a model source gives for its name, a local folder, or the hub id."""
    path = str(_spec_get(spec, "path"))
    source = _source_of(path)
    if source is not None:
        return str(source.resolve(path))
    local = Path(path).expanduser()
    return str(local.resolve()) if local.exists() else path


def torch_dtype(name: str | None):
    return "auto" if name in (None, "auto") else DTYPES[name]


def load_tokenizer(path: str, *, trust_remote_code: bool = False, revision: str | None = None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
    if tok.pad_token is None:
        # Causal LMs often ship without a pad token; padding positions are masked anyway.
        tok.pad_token = tok.eos_token
    return tok


def load_model(spec: Any, *, device: str | torch.device | None = None):
    """(model, tokenizer) for a model spec. Safetensors only; remote code only when the spec allows it."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(spec)
    trust = bool(_spec_get(spec, "trust_remote_code", False))
    revision = _spec_get(spec, "revision")
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=torch_dtype(_spec_get(spec, "dtype", "auto")),
        trust_remote_code=trust,
        revision=revision,
        use_safetensors=True,
    )
    if device is not None:
        model.to(device)
    tokenizer = load_tokenizer(path, trust_remote_code=trust, revision=revision)
    return model, tokenizer


def check_same_vocab(tokenizer_a, tokenizer_b, key_a: str, key_b: str) -> None:
    """Raise if two tokenizers disagree on any token id."""
    vocab_a, vocab_b = tokenizer_a.get_vocab(), tokenizer_b.get_vocab()
    if vocab_a != vocab_b:
        only_a = len(set(vocab_a.items()) - set(vocab_b.items()))
        raise ConfigError(
            f"{key_a} and {key_b} use different vocabularies ({len(vocab_a)} vs {len(vocab_b)} tokens, "
            f"{only_a} token/id pairs differ); this recipe needs the same tokenizer for both"
        )


def decoder_linears(model) -> list[tuple[str, torch.nn.Linear, int]]:
    """(name, module, layer index) of every nn.Linear inside a decoder layer; lm_head is not one."""
    found = []
    for name, module in model.named_modules():
        m = _LAYER.search(name + ".")
        if isinstance(module, torch.nn.Linear) and m:
            found.append((name, module, int(m.group(1))))
    return found


def save_checkpoint(model, tokenizer, out_dir: str | Path, *, max_shard_size: str = "2GB", dtype: str | None = None,
                    state_dict: dict | None = None, files: dict[str, str] | None = None) -> Path:
    """Write an HF model folder (config, safetensors, tokenizer, generation config) atomically.

    `dtype` casts the saved weights once at the end (e.g. back to bfloat16 after fp32 work).
    `state_dict` replaces the model's own weights (the full weights gathered from a sharded model).
    `files` ({name: text}) are written into the folder too, before it appears.
    """
    out_dir = Path(out_dir)
    with atomic.folder(out_dir) as tmp:
        if dtype not in (None, "auto"):
            model = model.to(DTYPES[dtype])
            if state_dict is not None:
                state_dict = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in state_dict.items()}
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
        for f in tmp.iterdir():
            f.chmod(0o644)  # save_pretrained writes 0600 weights; checkpoints are meant to be shared
    return out_dir
