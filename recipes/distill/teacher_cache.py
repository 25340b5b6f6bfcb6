"""The teacher's distribution on every response token, computed once and read memory-mapped.

A sweep over divergences distils one student from one teacher on one dataset, so every run would
recompute the same teacher forward passes. With ``loss.teacher_cache`` the teacher runs once per
(teacher content, data, k, temperature, compared vocabulary, dtype, device type, mixed precision);
later runs read its top-k from disk and never call the teacher on dataset batches.

What is kept per response token (the tokens the loss sees: labels != -100 after the causal shift):

- the ids of the teacher's k most likely tokens, in the fewest bits the vocabulary needs, bit-packed
  (151,936 tokens: 18 bits, 144 bytes at k = 64);
- k + 2 half-precision log-probs at the loss temperature: the top-k (descending), the label token
  when it is not among them (else -inf), and the rest of the vocabulary as one bucket.

At k = 64 that is 276 bytes per token at a 151,936 vocabulary (DistillKit's top-128 setting stores
about 300). The divergence then compares the two distributions *coarsened to those k + 2 buckets*
(the student's rest bucket is the logsumexp of its other log-probs, exactly). By the data-processing
inequality every f-divergence (KL either way, JS, TVD) of the coarsened pair is at most the
full-vocabulary value, and equal when the teacher's tail is empty. CE on the labels always uses the
student's full logits. LoCa calibrates the bucketed teacher exactly: it scales every non-label token,
so the rest bucket scales with them.

Layout of an entry, ``<root>/<key>/`` (written to a temp folder and renamed, so never half-read):
``meta.json``, ``offsets.npy`` (int64 ``[rows + 1]``: row r's tokens are ``offsets[r]:offsets[r+1]``,
in the order ``labels[:, 1:] != -100`` selects them), ``ids.npy`` (uint8 ``[tokens, ceil(k*bits/8)]``)
and ``logp.npy`` (float16 ``[tokens, k + 2]``).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from runner import atomic
from runner.data import IGNORE, collate, shift_labels
from runner.lm_head import last_hidden_states, output_head, project
from runner.progress import progress

FORMAT = 1  # bump when the layout or what is stored changes


# --------------------------------------------------------------------------------------------
# Bit-packed ids


def id_bits(vocab_size: int) -> int:
    """Bits per token id: the fewest that hold ids 0 .. vocab_size - 1."""
    return max(1, math.ceil(math.log2(vocab_size)))


def pack_ids(ids: np.ndarray, bits: int) -> np.ndarray:
    """``[N, k]`` non-negative ints -> ``[N, ceil(k * bits / 8)]`` uint8, each id big-endian in `bits` bits."""
    shifts = np.arange(bits - 1, -1, -1, dtype=np.int64)
    as_bits = ((ids.astype(np.int64)[..., None] >> shifts) & 1).astype(np.uint8)
    return np.packbits(as_bits.reshape(ids.shape[0], -1), axis=1)


def unpack_ids(packed: np.ndarray, k: int, bits: int) -> np.ndarray:
    """The inverse of `pack_ids`: ``[N, k]`` int64."""
    as_bits = np.unpackbits(packed, axis=1, count=k * bits).reshape(packed.shape[0], k, bits)
    weights = np.left_shift(np.int64(1), np.arange(bits - 1, -1, -1, dtype=np.int64))
    return as_bits.astype(np.int64) @ weights


# --------------------------------------------------------------------------------------------
# Buckets


def bucket_logprobs(logp: torch.Tensor, top_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[N, V]`` log-probs -> ``[N, k + 2]``: the `top_ids` tokens, the label (-inf when it is among
    them, its mass being there already) and the rest of the vocabulary as one bucket (logsumexp)."""
    label_in_top = (top_ids == labels[:, None]).any(-1)
    label = logp.gather(-1, labels[:, None]).squeeze(-1).masked_fill(label_in_top, float("-inf"))
    taken = torch.zeros_like(logp, dtype=torch.bool)
    taken.scatter_(-1, top_ids, True)
    taken.scatter_(-1, labels[:, None], True)
    rest = logp.masked_fill(taken, float("-inf")).logsumexp(-1)
    return torch.cat([logp.gather(-1, top_ids), label[:, None], rest[:, None]], dim=-1)


def label_bucket(top_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each label's index among the k + 2 buckets: its place in the top-k, else k."""
    hit = top_ids == labels[:, None]
    return torch.where(hit.any(-1), hit.int().argmax(-1), torch.full_like(labels, top_ids.shape[-1]))


# --------------------------------------------------------------------------------------------
# Keys


@dataclass(frozen=True)
class CacheSpec:
    k: int
    temperature: float
    vocab_size: int  # the compared vocabulary (the tokenizer's length)

    @property
    def bits(self) -> int:
        return id_bits(self.vocab_size)

    def bytes_per_token(self) -> int:
        return math.ceil(self.k * self.bits / 8) + 2 * (self.k + 2)


def data_fingerprint(examples: list[dict]) -> str:
    """sha256 over every row's input ids and labels, in order (packing and truncation included)."""
    digest = hashlib.sha256()
    for ex in examples:
        ids, labels = np.asarray(ex["input_ids"], dtype=np.int64), np.asarray(ex["labels"], dtype=np.int64)
        digest.update(np.int64(len(ids)).tobytes() + ids.tobytes() + labels.tobytes())
    return digest.hexdigest()


def cache_key(spec: CacheSpec, teacher: str, data: str, run: dict) -> str:
    """`teacher`: the teacher's content fingerprint; `data`: `data_fingerprint`; `run`: how the teacher
    is run (dtype, device type, mixed precision)."""
    parts = {"format": FORMAT, "k": spec.k, "temperature": spec.temperature, "vocab": spec.vocab_size,
             "teacher": teacher, "data": data, "run": run}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


# --------------------------------------------------------------------------------------------
# Building and reading


def response_counts(examples: list[dict]) -> np.ndarray:
    """Per row, the tokens the loss sees (labels[1:] != -100)."""
    return np.array([sum(1 for x in ex["labels"][1:] if x != IGNORE) for ex in examples], dtype=np.int64)


@torch.no_grad()
def build(folder: Path, teacher, examples: list[dict], spec: CacheSpec, pad_id: int, *, batch_size: int = 16,
          chunk_size: int = 1024, device=None) -> None:
    """Run `teacher` once over `examples` and write the entry to `folder` (atomically).

    The teacher's logits are projected `chunk_size` response tokens at a time, so memory holds one
    ``[chunk, V]`` block whatever the vocabulary.
    """
    offsets = np.concatenate([[0], np.cumsum(response_counts(examples))])
    n_tokens, k = int(offsets[-1]), spec.k
    head = output_head(teacher)
    with atomic.folder(Path(folder)) as tmp, progress(f"teacher top-{k}", total=len(examples)) as bar:
        ids_out = np.lib.format.open_memmap(tmp / "ids.npy", mode="w+", dtype=np.uint8,
                                            shape=(n_tokens, math.ceil(k * spec.bits / 8)))
        logp_out = np.lib.format.open_memmap(tmp / "logp.npy", mode="w+", dtype=np.float16, shape=(n_tokens, k + 2))
        for start in range(0, len(examples), batch_size):
            rows = examples[start: start + batch_size]
            batch = {key: v.to(device) if device is not None else v for key, v in collate(rows, pad_id).items()}
            targets, mask = shift_labels(batch["labels"])
            hidden, targets = last_hidden_states(teacher, batch)[:, :-1][mask], targets[mask]
            at = int(offsets[start])
            for i in range(0, hidden.shape[0], chunk_size):
                logits = project(hidden[i: i + chunk_size], head)[..., : spec.vocab_size]
                logp = torch.log_softmax(logits.float() / spec.temperature, dim=-1)
                top = logp.topk(k, dim=-1).indices
                buckets = bucket_logprobs(logp, top, targets[i: i + chunk_size])
                n = top.shape[0]
                ids_out[at + i: at + i + n] = pack_ids(top.cpu().numpy(), spec.bits)
                logp_out[at + i: at + i + n] = buckets.cpu().numpy().astype(np.float16)
            bar.advance(len(rows))
        ids_out.flush()
        logp_out.flush()
        del ids_out, logp_out
        np.save(tmp / "offsets.npy", offsets)
        meta = {"format": FORMAT, "k": k, "bits": spec.bits, "temperature": spec.temperature,
                "vocab_size": spec.vocab_size, "rows": len(examples), "tokens": n_tokens,
                "bytes_per_token": spec.bytes_per_token()}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))


class TeacherCache:
    """A built entry, memory-mapped; `rows(index)` gives the cached teacher for a batch's rows."""

    def __init__(self, folder: Path, built_s: float | None = None):
        self.folder = Path(folder)
        self.built_s = built_s  # seconds this run spent building it (None: it was there)
        self.meta = json.loads((self.folder / "meta.json").read_text())
        self.k, self.bits = self.meta["k"], self.meta["bits"]
        self.offsets = np.load(self.folder / "offsets.npy")
        self.ids = np.load(self.folder / "ids.npy", mmap_mode="r")
        self.logp = np.load(self.folder / "logp.npy", mmap_mode="r")

    @staticmethod
    def exists(folder: Path) -> bool:
        return (Path(folder) / "meta.json").is_file()

    def rows(self, index: torch.Tensor, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(top-k ids ``[N, k]`` int64, bucket log-probs ``[N, k + 2]`` fp32) of the rows `index`, their
        response tokens concatenated in row order (as ``[mask]`` selects them from a batch)."""
        spans = [slice(int(self.offsets[r]), int(self.offsets[r + 1])) for r in index.tolist()]
        ids = unpack_ids(np.concatenate([self.ids[s] for s in spans]), self.k, self.bits)
        logp = np.concatenate([self.logp[s] for s in spans]).astype(np.float32)
        return torch.from_numpy(ids).to(device), torch.from_numpy(logp).to(device)
