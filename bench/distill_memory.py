"""Peak memory and step time of one KD step: chunked loss vs the naive full-logits loss, and vs SFT.

Memory scaling: random tiny teacher (llama h64 L2) and student (h32 L2) with vocabularies of 8k to
128k tokens, a batch of 8 x 256 tokens all in the loss, forward KL. Each measurement runs in its
own process and reports the peak resident memory of the step above the process's memory just
before it (CPU: the growth of ru_maxrss; CUDA: max_memory_allocated).

Step time: the toy pair (toy-teacher -> toy-student) on toy chats, one KD step (teacher forward +
student forward/backward) against one plain SFT step of the same student and against the teacher's
forward alone (the floor any KD step pays), same batches.

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

    from recipes.distill.losses import forward_kl
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


def step_times(steps: int) -> dict[str, float]:
    """Median seconds per step of plain SFT, of the teacher's forward alone, and of KD; interleaved."""
    import statistics

    import torch

    from recipes.distill.losses import forward_kl
    from recipes.distill.objective import KDObjective
    from runner.config import DataConfig
    from runner.data import build_dataset, collate
    from runner.models import load_model
    from runner.train import causal_lm_loss

    student, tok = load_model({"path": "toy-student", "dtype": "float32"})
    teacher, _ = load_model({"path": "toy-teacher", "dtype": "float32"})
    teacher.eval().requires_grad_(False)
    rows = build_dataset(DataConfig(source="toy", format="instruct", num_examples=20000, max_length=64, packing=True,
                                    seed=0), tok)
    kd = KDObjective(forward_kl, vocab_size=len(tok))
    def teacher_forward(batch):
        with torch.no_grad():
            teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

    times = {"sft": [], "teacher_forward": [], "kd": []}
    for step in range(steps):
        batch = collate(rows[step * 32:(step + 1) * 32], tok.pad_token_id)
        for name, fn in (("sft", lambda: causal_lm_loss(student, batch).loss.backward()),
                         ("teacher_forward", lambda: teacher_forward(batch)),
                         ("kd", lambda: kd(student, teacher, batch).loss.backward())):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
            student.zero_grad(set_to_none=True)
    return {k: statistics.median(v[2:]) for k, v in times.items()}


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
    t = step_times(args.steps)
    print(f"toy pair, batch 32 x 64 (forward+backward): SFT {t['sft'] * 1000:.1f} ms, teacher forward "
          f"{t['teacher_forward'] * 1000:.1f} ms, KD {t['kd'] * 1000:.1f} ms; KD/SFT {t['kd'] / t['sft']:.2f}, "
          f"floor (SFT + teacher forward)/SFT {(t['sft'] + t['teacher_forward']) / t['sft']:.2f}")


if __name__ == "__main__":
    main()
