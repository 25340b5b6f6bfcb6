"""The toy zoo: a real Base/Instruct/Thinking family and a teacher/student pair, trained on demand.

Every entry is trained by the runner's own loop (`runner.train`) on the toy tasks, saved as a
normal Hugging Face folder and cached under a hash of everything that shapes it (architecture,
stages, task knobs, tokenizer, code version). Entries:

- ``toy-base``: pretrained on plain arithmetic text (facts and worked chains);
- ``toy-instruct``: toy-base fine-tuned on chats that answer directly;
- ``toy-thinking``: toy-base fine-tuned on chats that reason in a think block first;
- ``toy-teacher``: toy-instruct grown to twice the depth and trained further (larger, stronger);
- ``toy-student``: a smaller model, briefly pretrained and fine-tuned (the distillation start).

All share one tokenizer, so any two can be distilled, merged or grafted. Build with
``python -m runner.toy.zoo build all`` (``make zoo``); ``python -m runner.toy.zoo eval`` measures them.

Set ``RUNNER_TOY_PROFILE=smoke`` to build the same entries with a hundredth of the steps (tests),
and ``RUNNER_CACHE_DIR`` to move the cache (default ``~/.cache/runner``).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from runner.errors import RunnerError

log = logging.getLogger(__name__)

ZOO_VERSION = 3  # bump when a change to the code below should rebuild every entry
PROFILES = ("full", "smoke")
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
class Stage:
    mix: tuple[tuple[str, float], ...]  # (format, share of examples): plain | instruct | thinking
    steps: int
    lr: float
    difficulty: str = "mixed"
    batch_size: int = 32
    max_length: int = 64
    num_examples: int = 100_000
    warmup_ratio: float = 0.05

    @property
    def label(self) -> str:
        return "+".join(f for f, _ in self.mix)


def stage_examples(stage: Stage, tokenizer, seed: int) -> list[dict]:
    """The tokenized, shuffled and packed training rows of one stage."""
    import random

    from runner.config import DataConfig
    from runner.data import build_dataset, pack

    examples = []
    for i, (fmt, share) in enumerate(stage.mix):
        data = DataConfig(source="toy", format=fmt, difficulty=stage.difficulty, max_length=stage.max_length,
                          num_examples=max(1, int(stage.num_examples * share)), seed=seed * 10 + i)
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


PLAIN = (("plain", 1.0),)
INSTRUCT = (("instruct", 1.0),)
THINKING = (("thinking", 1.0),)

ZOO: dict[str, Entry] = {
    e.name: e
    for e in (
        Entry("toy-base", "llama h64 L2, pretrained on plain arithmetic text",
              arch=Arch(), stages=(Stage(PLAIN, steps=2000, lr=6e-3),)),
        # Both chat formats restate the question before the facts the base knows apply; learning to
        # copy it across the chat template takes the fine-tunes most of their steps.
        Entry("toy-instruct", "toy-base fine-tuned to answer directly",
              init="toy-base", stages=(Stage(INSTRUCT, steps=1500, lr=5e-3, num_examples=60_000),)),
        Entry("toy-thinking", "toy-base fine-tuned to work the problem in a think block first",
              init="toy-base", stages=(Stage(THINKING, steps=1500, lr=5e-3, num_examples=60_000),)),
        Entry("toy-teacher", "toy-instruct grown to L4 with identity blocks (LLaMA-Pro style), trained further",
              init="toy-instruct", grow_depth=2, stages=(Stage(INSTRUCT, steps=600, lr=1e-3, num_examples=40_000),)),
        Entry("toy-student", "qwen3 h32 L2, briefly pretrained and fine-tuned (the distillation start)",
              arch=Arch("qwen3", hidden=32, layers=2, heads=2, intermediate=128),
              stages=(Stage(PLAIN, steps=400, lr=6e-3, num_examples=40_000),
                      Stage(INSTRUCT, steps=300, lr=2e-3, num_examples=20_000))),
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


def cache_dir() -> Path:
    return Path(os.environ.get("RUNNER_CACHE_DIR", Path.home() / ".cache" / "runner")).expanduser()


def _stages(entry: Entry) -> tuple[Stage, ...]:
    if profile() == "smoke":
        return tuple(dataclasses.replace(s, steps=max(4, s.steps // 100), num_examples=2000) for s in entry.stages)
    return entry.stages


def _fingerprint(name: str) -> str:
    from runner.toy.tasks import TaskSpec

    entry = ZOO[name]
    parts = {
        "version": ZOO_VERSION,
        "task": dataclasses.asdict(TaskSpec()),
        "tokenizer": [TOKENIZER_CORPUS, TOKENIZER_VOCAB],
        "arch": dataclasses.asdict(entry.arch) if entry.arch else None,
        "init": _fingerprint(entry.init) if entry.init else None,
        "grow_depth": entry.grow_depth,
        "stages": [dataclasses.asdict(s) for s in _stages(entry)],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def entry_dir(name: str) -> Path:
    return cache_dir() / "zoo" / f"{name}-{_fingerprint(name)}"


# --------------------------------------------------------------------------------------------
# Building


def ensure(name: str) -> Path:
    """The folder of a built zoo entry; builds it first (in a subprocess, under a lock) if needed."""
    from filelock import FileLock

    path = entry_dir(name)
    if path.is_dir():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.parent / f".{name}.lock")):
        if path.is_dir():  # another process built it while we waited
            return path
        log.info("building toy zoo entry %s (first use; cached at %s)", name, path)
        # A fresh process: no accelerate or torch.distributed state leaks either way.
        env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV}
        proc = subprocess.run([sys.executable, "-m", "runner.toy.zoo", "build", name], env=env)
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


def _new_model(arch: Arch, tokenizer, seed: int):
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

    layers = model.model.layers
    grown = []
    for layer in layers:
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
    """Train and save one entry (and the entries it starts from) in this process."""
    from runner.config import TrainConfig
    from runner.models import load_model, save_checkpoint
    from runner.train import causal_lm_loss, make_accelerator, train

    entry, out = ZOO[name], entry_dir(name)
    if out.is_dir():
        return out
    t0 = time.perf_counter()
    seed = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) % 10_000
    if entry.init:
        parent = build(entry.init)
        model, tokenizer = load_model({"path": str(parent), "dtype": "float32"})
        if entry.grow_depth > 1:
            model = grow_depth(model, entry.grow_depth)
    else:
        tokenizer = build_tokenizer()
        model = _new_model(entry.arch, tokenizer, seed)
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
    save_checkpoint(model, tokenizer, out)
    meta = {"name": name, "description": entry.description, "profile": profile(), "fingerprint": _fingerprint(name),
            "init": entry.init, "grow_depth": entry.grow_depth,
            "arch": dataclasses.asdict(entry.arch) if entry.arch else None,
            "parameters": sum(p.numel() for p in model.parameters()), "stages": stages_log,
            "build_s": round(time.perf_counter() - t0, 1)}
    (out / "zoo.json").write_text(json.dumps(meta, indent=2))
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    log.info("built %s in %.0f s -> %s", name, meta["build_s"], out)
    return out


# --------------------------------------------------------------------------------------------
# Command line


def _cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runner.toy.zoo", description="Build and measure the toy zoo.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="train entries that are not cached yet")
    b.add_argument("names", nargs="*", default=["all"])
    e = sub.add_parser("eval", help="evaluate entries on the toy lm-eval tasks and print a table")
    e.add_argument("names", nargs="*", default=["all"])
    e.add_argument("--limit", type=int, default=None)
    e.add_argument("--json", type=Path, default=None, help="also write the metrics here")
    sub.add_parser("list", help="entries, their cache folders and whether they are built")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    selected = names() if "all" in getattr(args, "names", []) else getattr(args, "names", [])
    unknown = [n for n in selected if n not in ZOO]
    if unknown:
        print(f"error: unknown zoo entries {unknown}; entries are {', '.join(names())}", file=sys.stderr)
        return 2
    if args.cmd == "list":
        for n in names():
            print(f"{n:14s} {'built ' if entry_dir(n).is_dir() else 'absent'} {entry_dir(n)}  ({ZOO[n].description})")
        return 0
    if args.cmd == "build":
        t0 = time.perf_counter()
        for n in selected:
            build(n)
        log.info("zoo ready in %.0f s", time.perf_counter() - t0)
        return 0
    from runner.toy.report import evaluate_zoo

    evaluate_zoo(selected, limit=args.limit, json_path=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(_cli())
