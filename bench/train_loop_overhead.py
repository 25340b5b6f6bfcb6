"""The runner's training loop against a bare PyTorch loop on the same model, data and batches.

Both train a toy-sized llama (h64, L2) for the same number of AdamW steps on the same packed toy
rows, in one process, alternating runs so machine noise hits both alike. Prints tokens/s of each
and the ratio (runner / bare); the loop's bookkeeping (global token normalisation, NaN guard,
progress, logging) should cost only a few percent.

    python bench/train_loop_overhead.py [--steps 300] [--repeats 3]
"""

import argparse
import os
import statistics
import tempfile
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def bare_loop(model, rows, steps, batch_size, lr, pad_id):
    from runner.data import collate
    from runner.train import causal_lm_loss

    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    tokens, t0 = 0, time.perf_counter()
    for step in range(steps):
        batch = collate(rows[(step * batch_size) % (len(rows) - batch_size):][:batch_size], pad_id)
        loss = causal_lm_loss(model, batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum())
    return tokens / (time.perf_counter() - t0)


def runner_loop(model, rows, steps, batch_size, lr, pad_id):
    from omegaconf import OmegaConf

    from runner.config import TrainConfig
    from runner.train import (
        causal_lm_loss,
        make_accelerator,
        reset_accelerator_state,
        train,
    )

    reset_accelerator_state()
    cfg = OmegaConf.structured(TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_ratio=0.0,
                                           lr_scheduler="constant", log_every=50, cpu=True, seed=0))
    with tempfile.TemporaryDirectory() as tmp:
        result = train(model, rows, causal_lm_loss, cfg, accelerator=make_accelerator(cfg), run_dir=tmp, pad_id=pad_id)
    return result.tokens_per_s


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from runner.config import DataConfig
    from runner.data import build_dataset
    from runner.toy.zoo import Arch, new_model, build_tokenizer

    tok = build_tokenizer()
    rows = build_dataset(DataConfig(source="toy", format="plain", num_examples=40000, max_length=64, packing=True,
                                    seed=0), tok)
    results = {"bare": [], "runner": []}
    for _ in range(args.repeats):
        for name, fn in (("bare", bare_loop), ("runner", runner_loop)):
            model = new_model(Arch(), tok, seed=0)
            results[name].append(fn(model, rows, args.steps, 32, 3e-3, tok.pad_token_id))
    bare, ours = statistics.median(results["bare"]), statistics.median(results["runner"])
    print(f"bare PyTorch loop : {bare / 1000:7.1f}k tokens/s (median of {args.repeats})")
    print(f"runner.train      : {ours / 1000:7.1f}k tokens/s (median of {args.repeats})")
    print(f"ratio runner/bare : {ours / bare:.3f}")


if __name__ == "__main__":
    main()
