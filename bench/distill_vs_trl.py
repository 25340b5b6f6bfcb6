"""The distill recipe's training against TRL's GKDTrainer: same models, batches and divergence.

Both train toy-student from toy-teacher on the same toy chats with generalized JSD (beta 0.5),
offline batches only (TRL lmbda=0, our onpolicy.mode=off), batch 16, AdamW at 5e-4, for the same
number of steps; each in its own process. Printed: seconds per step (training loop only) and peak
resident memory of the process, and the ratios ours / TRL. Needs `pip install trl` (the bench extra).

    python bench/distill_vs_trl.py [--steps 60]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
BATCH, LR, MAX_LEN = 16, 5e-4, 64


def _chats(n: int):
    from runner.toy.tasks import TaskSpec, make_examples

    return make_examples(TaskSpec(), "instruct", "mixed", n, seed=0)


def run_ours(steps: int) -> float:
    from omegaconf import OmegaConf

    from recipes.distill.losses import generalized_jsd
    from recipes.distill.objective import KDObjective
    from runner.config import DataConfig, TrainConfig
    from runner.data import build_dataset
    from runner.models import load_model
    from runner.train import make_accelerator, train

    student, tok = load_model({"path": "toy-student", "dtype": "float32"})
    teacher, _ = load_model({"path": "toy-teacher", "dtype": "float32"})
    teacher.eval().requires_grad_(False)
    examples = build_dataset(OmegaConf.structured(DataConfig(source="toy", format="instruct", num_examples=BATCH * steps,
                                                             max_length=MAX_LEN, seed=0)), tok)
    objective = KDObjective(generalized_jsd, {"beta": 0.5}, vocab_size=len(tok))
    cfg = OmegaConf.structured(TrainConfig(steps=steps, batch_size=BATCH, lr=LR, lr_scheduler="linear", warmup_ratio=0.0,
                                           max_grad_norm=1.0, log_every=steps, cpu=True, seed=0))
    with tempfile.TemporaryDirectory() as tmp:
        result = train(student, examples, lambda m, b, s: objective(m, teacher, b), cfg,
                       accelerator=make_accelerator(cfg), run_dir=tmp, pad_id=tok.pad_token_id)
    return result.wall_s / steps


def run_trl(steps: int) -> float:
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from runner.models import load_model

    student, tok = load_model({"path": "toy-student", "dtype": "float32"})
    teacher, _ = load_model({"path": "toy-teacher", "dtype": "float32"})
    data = Dataset.from_list(_chats(BATCH * steps))
    with tempfile.TemporaryDirectory() as tmp:
        args = GKDConfig(output_dir=tmp, per_device_train_batch_size=BATCH, max_steps=steps, learning_rate=LR,
                         lr_scheduler_type="linear", warmup_steps=0, max_grad_norm=1.0, lmbda=0.0, beta=0.5,
                         max_length=MAX_LEN, use_cpu=True, report_to=[], save_strategy="no", logging_steps=steps,
                         seed=0, dataloader_num_workers=0)
        trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data, processing_class=tok)
        metrics = trainer.train().metrics
    return metrics["train_runtime"] / steps


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--child", choices=("ours", "trl"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        seconds = (run_ours if args.child == "ours" else run_trl)(args.steps)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({"seconds_per_step": seconds, "peak_mib": peak}))
        return
    res = {}
    for who in ("trl", "ours"):
        out = subprocess.run([sys.executable, __file__, "--child", who, "--steps", str(args.steps)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"{who} failed:\n{out.stderr[-3000:]}")
        res[who] = json.loads(out.stdout.strip().splitlines()[-1])
    for who, r in res.items():
        print(f"{who:5s}: {r['seconds_per_step'] * 1000:7.1f} ms/step, peak RSS {r['peak_mib']:7.0f} MiB")
    print(f"ratio ours/TRL: step time {res['ours']['seconds_per_step'] / res['trl']['seconds_per_step']:.2f}, "
          f"peak memory {res['ours']['peak_mib'] / res['trl']['peak_mib']:.2f}")


if __name__ == "__main__":
    main()
