"""Peak memory and step time of one KD step: chunked loss vs the naive full-logits loss, and vs SFT.

Memory scaling: random tiny teacher (llama h64 L2) and student (h32 L2) with vocabularies of 8k to
128k tokens, a batch of 8 x 256 tokens all in the loss, forward KL. Each measurement runs in its
own process and reports the peak resident memory of the step above the process's memory just
before it (CPU: the growth of ru_maxrss; CUDA: max_memory_allocated).

Step time: the toy pair (toy-teacher -> toy-student) on toy chats, one KD step (teacher forward +
student forward/backward) against one plain SFT step of the same student and against the teacher's
forward alone (the floor any KD step pays), same batches; and one KD step on a teacher cache
(`loss.teacher_cache`, top-64: the teacher is not run), with the cache's one-off build time. Then
the cache's approximation: each divergence's loss on the top-k buckets against the full-vocabulary
loss, at the student's start, over the same batches (k = 8, 16, 64).

    python bench/distill_memory.py [--vocabs 8192,32768,65536,131072] [--chunk 256]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def measure(vocab: int, chunk: int, batch: int, seq: int) -> dict:
    """One KD forward+backward on random tiny models; runs in a child process (see main)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from recipes.distill.losses import fkl as forward_kl  # the registered kd_loss (token-mean)
    from recipes.distill.objective import KDObjective

    torch.manual_seed(0)

    def model(hidden):
        return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                            max_position_embeddings=seq))

    teacher, student = model(64).eval(), model(32)
    ids = torch.randint(0, vocab, (batch, seq))
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    objective = KDObjective(forward_kl, chunk_size=chunk)
    cuda = torch.cuda.is_available()
    if cuda:
        teacher.cuda(), student.cuda()
        data = {k: v.cuda() for k, v in data.items()}
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_kb() * 1024
    t0 = time.perf_counter()
    objective(student, teacher, data).loss.backward()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"vocab": vocab, "chunk": chunk, "peak_mib": (peak - base) / 2**20, "seconds": seconds}


def step_times(steps: int, cache_dir: str) -> tuple[dict[str, float], dict]:
    """Median seconds per step of plain SFT, of the teacher's forward alone, of KD and of KD on a teacher
    cache, interleaved; and the cache's build time, size and approximation gap."""
    import statistics
    from pathlib import Path

    import torch

    from recipes.distill import teacher_cache
    from recipes.distill.losses import fkl as forward_kl  # the registered kd_loss (token-mean)
    from recipes.distill.objective import KDObjective
    from runner import registry
    from runner.config import DataConfig
    from runner.data import build_dataset, collate
    from runner.models import load_model
    from runner.train import causal_lm_loss

    student, tok = load_model({"path": "toy-student", "dtype": "float32"})
    teacher, _ = load_model({"path": "toy-teacher", "dtype": "float32"})
    teacher.eval().requires_grad_(False)
    rows = build_dataset(DataConfig(source="toy", format="instruct", num_examples=20000, max_length=64, packing=True,
                                    seed=0), tok)
    rows = rows[: steps * 32]
    caches, info = {}, {}
    for k in (8, 16, 64):
        t0 = time.perf_counter()
        teacher_cache.build(Path(cache_dir) / f"k{k}", teacher, rows, teacher_cache.CacheSpec(k, 1.0, len(tok)),
                            tok.pad_token_id, batch_size=32)
        caches[k] = teacher_cache.TeacherCache(Path(cache_dir) / f"k{k}")
        info[k] = {"build_s": time.perf_counter() - t0, "bytes_per_token": caches[k].meta["bytes_per_token"],
                   "tokens": caches[k].meta["tokens"]}
    kd = KDObjective(forward_kl, vocab_size=len(tok))
    kd_cached = KDObjective(forward_kl, vocab_size=len(tok), cache=caches[64])

    def teacher_forward(batch):
        with torch.no_grad():
            teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

    def batch_at(step):
        batch = collate(rows[step * 32:(step + 1) * 32], tok.pad_token_id)
        batch["index"] = torch.arange(step * 32, (step + 1) * 32)
        return batch

    # the approximation at the student's start: bucketed loss / full-vocabulary loss, summed over batches
    gaps = {}
    with torch.no_grad():
        for name in ("fkl", "rkl", "jsd", "tvd", "akl"):
            loss = registry.get("kd_loss", name)
            full = sum(float(KDObjective(loss, vocab_size=len(tok))(student, teacher, batch_at(s)).loss) for s in range(steps))
            gaps[name] = {k: sum(float(KDObjective(loss, vocab_size=len(tok), cache=caches[k])(student, None, batch_at(s)).loss)
                                 for s in range(steps)) / full for k in caches}
    info["gap"] = gaps

    times = {"sft": [], "teacher_forward": [], "kd": [], "kd_cached": []}
    for step in range(steps):
        batch = batch_at(step)
        for name, fn in (("sft", lambda: causal_lm_loss(student, batch).loss.backward()),
                         ("teacher_forward", lambda: teacher_forward(batch)),
                         ("kd", lambda: kd(student, teacher, batch).loss.backward()),
                         ("kd_cached", lambda: kd_cached(student, None, batch).loss.backward())):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
            student.zero_grad(set_to_none=True)
    return {k: statistics.median(v[2:]) for k, v in times.items()}, info


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--vocabs", default="8192,32768,65536,131072")
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        vocab, chunk = map(int, args.child.split(","))
        print(json.dumps(measure(vocab, chunk, args.batch, args.seq)))
        return

    print(f"KD step, batch {args.batch} x {args.seq} tokens, forward KL; peak memory above the pre-step baseline")
    print(f"{'vocab':>8} {'naive MiB':>10} {'chunked MiB':>12} {'ratio':>7} {'naive s':>8} {'chunked s':>10}")
    for vocab in map(int, args.vocabs.split(",")):
        res = {}
        for chunk in (0, args.chunk):
            out = subprocess.run([sys.executable, __file__, "--child", f"{vocab},{chunk}", "--batch", str(args.batch),
                                  "--seq", str(args.seq)], capture_output=True, text=True, check=True)
            res[chunk] = json.loads(out.stdout.strip().splitlines()[-1])
        naive, chunked = res[0], res[args.chunk]
        print(f"{vocab:>8} {naive['peak_mib']:>10.0f} {chunked['peak_mib']:>12.0f} "
              f"{chunked['peak_mib'] / naive['peak_mib']:>7.2f} {naive['seconds']:>8.2f} {chunked['seconds']:>10.2f}")
    import tempfile

    with tempfile.TemporaryDirectory() as cache_dir:
        t, info = step_times(args.steps, cache_dir)
    print(f"toy pair, batch 32 x 64 (forward+backward): SFT {t['sft'] * 1000:.1f} ms, teacher forward "
          f"{t['teacher_forward'] * 1000:.1f} ms, KD {t['kd'] * 1000:.1f} ms, KD on the teacher cache (top-64) "
          f"{t['kd_cached'] * 1000:.1f} ms; KD/SFT {t['kd'] / t['sft']:.2f}, cached KD/SFT "
          f"{t['kd_cached'] / t['sft']:.2f}, floor (SFT + teacher forward)/SFT {(t['sft'] + t['teacher_forward']) / t['sft']:.2f}")
    for k in (8, 16, 64):
        print(f"teacher cache top-{k}: {info[k]['tokens']} response tokens in {info[k]['build_s']:.1f} s, "
              f"{info[k]['bytes_per_token']} bytes per token")
    print("cached loss / full-vocabulary loss at the student's start (the buckets' approximation):")
    print(f"{'loss':>6} " + " ".join(f"{'k=' + str(k):>7}" for k in (8, 16, 64)))
    for name, by_k in info["gap"].items():
        print(f"{name:>6} " + " ".join(f"{by_k[k]:>7.4f}" for k in (8, 16, 64)))


if __name__ == "__main__":
    main()
