"""The toy zoo: a Base/Instruct/Thinking family and a teacher/student pair, shipped with the package.

Each entry is built from the premises the paper family's methods assume (measured by
``python -m runner.toy eval``; see `runner.toy.premises`):

- ``toy-base``: pretrained on plain arithmetic text with some chat-formatted text mixed in (direct
  answers in varied phrasings, and a few worked answers in think blocks), as real base LMs have seen;
- ``toy-instruct``, ``toy-thinking``: light post-trainings of toy-base (a few hundred steps at a small
  learning rate) on direct-answer and think-block chats, so both stay near toy-base and each other;
- ``toy-teacher``: toy-base grown to twice the depth (LLaMA-Pro) and chat-tuned: the strong side;
- ``toy-student``: a smaller model pretrained on the same mixture and briefly chat-tuned: competent
  but clearly weaker, as after the SFT stage that distillation papers start from.

All share one tokenizer, so any two can be distilled, merged or grafted.

**Shipped.** The built entries live in the package (`runner/toy/shipped/`, one Hugging Face folder
each, a manifest with how each was built and every file's sha256), so every machine runs the same
weights: training is deterministic on one machine, but CPU numerics differ between machines and grow
through training. A zoo name resolves to its shipped folder when the manifest's fingerprint is the one
the code below describes (checked, with the sha256s, on first use), and is otherwise built into the
cache. ``python -m runner.toy build`` (``make zoo``) rebuilds from scratch into the cache,
``eval --compare`` measures how far that rebuild lands from the shipped entries, and ``ship`` copies
the cache builds into the package.

Set ``RUNNER_TOY_PROFILE=smoke`` to build with a hundredth of the steps (tests of the build path) and
``RUNNER_CACHE_DIR`` to move the cache (default ``~/.cache/runner``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from runner.cache import cache_dir, file_sha256
from runner.errors import RunnerError

log = logging.getLogger(__name__)

ZOO_VERSION = 4  # bump when a change to the code below should rebuild every entry
PROFILES = ("full", "smoke")
SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"
MANIFEST = "manifest.json"
DISTRIBUTED_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                   "ACCELERATE_USE_CPU", "TORCHELASTIC_RUN_ID", "GROUP_RANK", "ROLE_RANK")


@dataclass(frozen=True)
class Arch:
    model_type: str = "llama"  # llama or qwen3 (not qwen2: transformers swaps its tokenizer class on load)
    hidden: int = 64
    layers: int = 2
    heads: int = 2  # head_dim 32: copying a number token through a head needs the rank
    intermediate: int = 256
    max_positions: int = 512


@dataclass(frozen=True)
class Part:
    """One share of a training mixture: examples of one toy format."""

    format: str  # plain | instruct | thinking
    share: float
    variation: float = 0.0  # share of chat answers in a phrasing other than the default


@dataclass(frozen=True)
class Stage:
    mix: tuple[Part, ...]
    steps: int
    lr: float
    difficulty: str = "mixed"
    batch_size: int = 32
    max_length: int = 64
    num_examples: int = 100_000
    warmup_ratio: float = 0.05

    @property
    def label(self) -> str:
        return "+".join(p.format for p in self.mix)


def stage_examples(stage: Stage, tokenizer, seed: int) -> list[dict]:
    """The tokenized, shuffled and packed training rows of one stage."""
    import random

    from runner.config import DataConfig
    from runner.data import build_dataset, pack

    examples = []
    for i, part in enumerate(stage.mix):
        data = DataConfig(source="toy", format=part.format, difficulty=stage.difficulty, max_length=stage.max_length,
                          num_examples=max(1, int(stage.num_examples * part.share)), seed=seed * 10 + i,
                          variation=part.variation)
        examples += build_dataset(data, tokenizer)
    random.Random(seed).shuffle(examples)
    return pack(examples, stage.max_length)


@dataclass(frozen=True)
class Entry:
    name: str
    description: str
    stages: tuple[Stage, ...]
    arch: Arch | None = None  # trained from scratch with this architecture ...
    init: str | None = None  # ... or fine-tuned from another entry
    grow_depth: int = 1  # deepen `init` this many times over with identity blocks before training


# Pretraining: mostly plain text, with chat text as a real base LM sees it: direct answers in varied
# phrasings, and a few worked answers in think blocks. With 10-15% chat text, whether a 2-layer model
# learns to copy the question into a direct answer (and so answers directly rather than in a think
# block) depended on the seed; at 25% it did for each of three seeds (measured). 3000 steps rather than
# 2000 took one seed's easy exact match from 0.72 to 0.95.
PRETRAIN = (Part("plain", 0.72), Part("instruct", 0.25, variation=0.5), Part("thinking", 0.03))
INSTRUCT = (Part("instruct", 1.0),)
THINKING = (Part("thinking", 1.0),)
# Post-training of the Base/Instruct/Thinking family: light, so that both stay within 5% of toy-base
# (real pairs differ by under 2%) and linearly connected to each other. At lr 2e-4 Thinking landed at
# 0.046-0.056 over three seeds; 1.5e-4 leaves a margin.
LIGHT = {"steps": 300, "lr": 1.5e-4, "num_examples": 20_000}

ZOO: dict[str, Entry] = {
    e.name: e
    for e in (
        Entry("toy-base", "llama h64 L2, pretrained on arithmetic text with some chat text",
              arch=Arch(), stages=(Stage(PRETRAIN, steps=3000, lr=6e-3),)),
        Entry("toy-instruct", "toy-base lightly post-trained to answer directly",
              init="toy-base", stages=(Stage(INSTRUCT, **LIGHT),)),
        Entry("toy-thinking", "toy-base lightly post-trained to work the problem in a think block first",
              init="toy-base", stages=(Stage(THINKING, **LIGHT),)),
        # A deeper model of the same family (LLaMA-Pro block expansion of toy-base), fully chat-tuned.
        # A 4-layer model pretrained from scratch for 2000 steps generalised addition worse than the
        # 2-layer base (measured: easy EM 0.65, against 0.97 for a 2-layer model of the same budget).
        Entry("toy-teacher", "toy-base grown to L4 (LLaMA-Pro style) and chat-tuned (the strong side)",
              init="toy-base", grow_depth=2, stages=(Stage(INSTRUCT, steps=600, lr=1e-3, num_examples=40_000),)),
        Entry("toy-student", "qwen3 h32 L2, pretrained on the same mixture and briefly chat-tuned (the distillation start)",
              arch=Arch("qwen3", hidden=32, layers=2, heads=2, intermediate=128),
              stages=(Stage(PRETRAIN, steps=2000, lr=6e-3), Stage(INSTRUCT, steps=300, lr=3e-4, num_examples=20_000))),
    )
}

TOKENIZER_CORPUS = 30000
TOKENIZER_VOCAB = 700


def names() -> list[str]:
    return list(ZOO)


def is_zoo_name(name: str) -> bool:
    return name in ZOO


def did_you_mean(name: str) -> str:
    from runner.registry import did_you_mean as _dym

    return _dym(name, ZOO) if name.startswith("toy") else ""


def profile() -> str:
    value = os.environ.get("RUNNER_TOY_PROFILE", "full")
    if value not in PROFILES:
        raise RunnerError(f"RUNNER_TOY_PROFILE={value!r} is not allowed; choose one of {', '.join(PROFILES)}")
    return value


def _stages(entry: Entry) -> tuple[Stage, ...]:
    if profile() == "smoke":
        return tuple(dataclasses.replace(s, steps=max(4, s.steps // 100), num_examples=2000) for s in entry.stages)
    return entry.stages


def recipe(name: str) -> dict:
    """Everything that shapes an entry: what the fingerprint hashes and the manifest records."""
    from runner.toy.tasks import TaskSpec

    entry = ZOO[name]
    return {
        "version": ZOO_VERSION,
        "task": dataclasses.asdict(TaskSpec()),
        "tokenizer": [TOKENIZER_CORPUS, TOKENIZER_VOCAB],
        "arch": dataclasses.asdict(entry.arch) if entry.arch else None,
        "init": fingerprint(entry.init) if entry.init else None,
        "grow_depth": entry.grow_depth,
        "stages": [dataclasses.asdict(s) for s in _stages(entry)],
    }


def fingerprint(name: str) -> str:
    return hashlib.sha256(json.dumps(recipe(name), sort_keys=True).encode()).hexdigest()[:12]


def entry_dir(name: str) -> Path:
    """Where a build of `name` lives in the cache."""
    return cache_dir() / "zoo" / f"{name}-{fingerprint(name)}"


# --------------------------------------------------------------------------------------------
# The shipped entries


def read_manifest() -> dict:
    path = SHIPPED_DIR / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else {"entries": {}}


def shipped(name: str) -> Path | None:
    """The shipped folder of `name` if it is the entry the code describes (every file's sha256 checked on
    first use); None, with a warning, when the code has moved on since the entries were shipped."""
    record = read_manifest()["entries"].get(name)
    if record is None:
        return None
    if record["fingerprint"] != fingerprint(name):
        if profile() == "full" and name not in _warned:
            _warned.add(name)
            log.warning("the shipped %s was built from another zoo recipe (fingerprint %s, the code's is %s); "
                        "building it instead. `python -m runner.toy ship` refreshes the shipped copy",
                        name, record["fingerprint"], fingerprint(name))
        return None
    return _verified(name, record["fingerprint"])


_warned: set[str] = set()


@lru_cache(maxsize=None)
def _verified(name: str, fingerprint_: str) -> Path:
    folder = SHIPPED_DIR / name
    files = read_manifest()["entries"][name]["files"]
    bad = [f for f, digest in files.items() if not (folder / f).is_file() or file_sha256(folder / f) != digest]
    if bad:
        raise RunnerError(f"the shipped toy zoo entry {name} is damaged: {', '.join(bad)} missing or not as shipped "
                          f"(sha256 in {SHIPPED_DIR / MANIFEST}); restore it from git (`git checkout -- {folder}`)")
    return folder


def ship(names_: list[str]) -> None:
    """Copy cache builds into the package and record them in the manifest (built first if needed)."""
    if profile() != "full":
        raise RunnerError("only full-profile builds are shipped; unset RUNNER_TOY_PROFILE")
    manifest = read_manifest()
    manifest.update({"zoo_version": ZOO_VERSION, "note": "written by `python -m runner.toy ship`; "
                     "the sha256 of every file is checked when an entry is first used"})
    for name in names_:
        src = build(name)
        dest = SHIPPED_DIR / name
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(src, dest)
        meta = json.loads((dest / "zoo.json").read_text())
        manifest["entries"][name] = {
            "fingerprint": fingerprint(name),
            "description": ZOO[name].description,
            "recipe": recipe(name),
            "parameters": meta["parameters"],
            "build_s": meta["build_s"],
            "built_on": meta["built_on"],
            "files": {f.name: file_sha256(f) for f in sorted(dest.iterdir()) if f.is_file()},
        }
        log.info("shipped %s -> %s", name, dest)
    manifest["entries"] = dict(sorted(manifest["entries"].items(), key=lambda kv: names().index(kv[0])))
    (SHIPPED_DIR / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    _verified.cache_clear()


# --------------------------------------------------------------------------------------------
# Building


def ensure(name: str) -> Path:
    """The folder of a zoo entry: the shipped one, or a cache build (made first, in a subprocess under a
    lock, if needed)."""
    found = shipped(name)
    if found is not None:
        return found
    return ensure_built(name)


def ensure_built(name: str) -> Path:
    """The cache build of `name`, built first if needed (never the shipped copy)."""
    from filelock import FileLock

    path = entry_dir(name)
    if path.is_dir():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.parent / f".{name}.lock")):
        if path.is_dir():  # another process built it while we waited
            return path
        log.info("building toy zoo entry %s (cached at %s)", name, path)
        # A fresh process: no accelerate or torch.distributed state leaks either way.
        env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV}
        proc = subprocess.run([sys.executable, "-m", "runner.toy", "build", name], env=env)
        if proc.returncode != 0 or not path.is_dir():
            raise RunnerError(f"building toy zoo entry {name!r} failed (exit code {proc.returncode}); see the output above")
    return path


def build_tokenizer():
    """The shared toy tokenizer, trained on a fixed sample of every format."""
    from runner.toy.tasks import TaskSpec, make_examples
    from runner.toy.tokenizer import train_tokenizer

    spec = TaskSpec()
    lines = [e["text"] for e in make_examples(spec, "plain", "mixed", TOKENIZER_CORPUS, seed=7)]
    for fmt in ("instruct", "thinking"):
        for e in make_examples(spec, fmt, "mixed", TOKENIZER_CORPUS // 4, seed=7, variation=0.5):
            lines += [m["content"] for m in e["messages"]]
    return train_tokenizer(lines, vocab_size=TOKENIZER_VOCAB)


def new_model(arch: Arch, tokenizer, seed: int):
    """A randomly initialised causal LM of `arch` for `tokenizer` (tied embeddings, fp32)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        arch.model_type,
        vocab_size=len(tokenizer),
        hidden_size=arch.hidden,
        intermediate_size=arch.intermediate,
        num_hidden_layers=arch.layers,
        num_attention_heads=arch.heads,
        num_key_value_heads=arch.heads,
        head_dim=arch.hidden // arch.heads,
        max_position_embeddings=arch.max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def grow_depth(model, factor: int):
    """Insert factor-1 copies after every decoder layer, with their output projections zeroed.

    A zeroed ``o_proj`` and ``down_proj`` make a block add nothing to the residual stream, so the
    deeper model computes exactly what the original did until training moves the new blocks
    (block expansion as in LLaMA Pro).
    """
    import copy

    import torch

    grown = []
    for layer in model.model.layers:
        grown.append(layer)
        for _ in range(factor - 1):
            block = copy.deepcopy(layer)
            with torch.no_grad():
                block.self_attn.o_proj.weight.zero_()
                block.mlp.down_proj.weight.zero_()
            grown.append(block)
    for i, layer in enumerate(grown):
        layer.self_attn.layer_idx = i
    model.model.layers = torch.nn.ModuleList(grown)
    model.config.num_hidden_layers = len(grown)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [t for t in model.config.layer_types for _ in range(factor)]
    return model


def build(name: str) -> Path:
    """Train and save one entry into the cache (and the entries it starts from) in this process."""
    from runner.config import TrainConfig
    from runner.models import load_model, save_checkpoint
    from runner.train import causal_lm_loss, make_accelerator, train

    entry, out = ZOO[name], entry_dir(name)
    if out.is_dir():
        return out
    t0 = time.perf_counter()
    seed = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) % 10_000
    if entry.init:
        model, tokenizer = load_model({"path": str(build(entry.init)), "dtype": "float32"})
        if entry.grow_depth > 1:
            model = grow_depth(model, entry.grow_depth)
    else:
        tokenizer = build_tokenizer()
        model = new_model(entry.arch, tokenizer, seed)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    stages_log = []
    work = cache_dir() / "zoo" / f".work-{name}-{os.getpid()}"
    for i, stage in enumerate(_stages(entry)):
        examples = stage_examples(stage, tokenizer, seed + i)
        cfg = TrainConfig(steps=stage.steps, batch_size=stage.batch_size, lr=stage.lr, lr_scheduler="cosine",
                          warmup_ratio=stage.warmup_ratio, weight_decay=0.01, max_grad_norm=1.0,
                          log_every=max(1, stage.steps // 10), cpu=True, seed=seed + i)
        accelerator = make_accelerator(cfg)
        result = train(model, examples, causal_lm_loss, cfg, accelerator=accelerator, run_dir=work,
                       pad_id=tokenizer.pad_token_id, desc=f"{name} [{stage.label}]")
        model = accelerator.unwrap_model(model)
        stages_log.append({"stage": dataclasses.asdict(stage), **result.summary()})
    meta = {"name": name, "description": entry.description, "profile": profile(), "fingerprint": fingerprint(name),
            "init": entry.init, "grow_depth": entry.grow_depth, "arch": dataclasses.asdict(entry.arch) if entry.arch else None,
            "parameters": sum(p.numel() for p in model.parameters()), "stages": stages_log,
            "build_s": round(time.perf_counter() - t0, 1), "built_on": _machine()}
    save_checkpoint(model, tokenizer, out, files={"zoo.json": json.dumps(meta, indent=2) + "\n"})
    shutil.rmtree(work, ignore_errors=True)
    log.info("built %s in %.0f s -> %s", name, meta["build_s"], out)
    return out


def _machine() -> dict:
    from runner.results import versions

    v = versions()
    return {"machine": platform.machine(), "processor": platform.processor() or None,
            "torch": v.get("torch"), "transformers": v.get("transformers"), "python": v.get("python")}


if __name__ == "__main__":  # `python -m runner.toy.zoo ...`, as DESIGN.md spells it, is `python -m runner.toy ...`
    from runner.toy.__main__ import main

    sys.exit(main())
