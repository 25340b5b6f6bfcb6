"""The runner's engines at real model sizes (Qwen3-0.6B, Llama-3.2-1B) on random weights, on the CPU.

The architectures are written out here (no download; the values are the hub configs' own, see
ARCHS), built with random weights and saved as HF checkpoints (fp32, inputs of up to --input-shard
per file, so each model is one file as on the hub) in a temp folder: a base and two "fine-tunes"
(base + noise of std --noise). Then each workload runs in a fresh process; its wall time and peak
RSS come from the kernel's rusage of that process (os.wait4: ru_maxrss, imports included), and each
worker also reports the seconds of the engine call itself and its RSS after imports:

- merge: `recipes.merge.engine.merge_models` (linear and TIES, as bench/merge_vs_mergekit.py calls
  it) beside mergekit's `run_merge` on the same inputs, both writing --out-shard output shards
  (the runner's merge default); ratios ours / mergekit;
- graft: the Shadow-FT graft (`recipes.shadow_ft.GraftWithNorms` through `merge_models` with the
  recipe's Selection and graft.max_shard_size, as `recipe=graft`); peak RSS / one fp32 copy;
- rtn, gptq: `python -m runner recipe=rtn_quantize|gptq_quantize` on the whole model (4 bits, group
  128; GPTQ calibrated on a few rows of the toy chats), no checkpoint written; wall time, and peak RSS
  / one fp32 copy;
- distill: --steps steps of `runner.train.train` with `KDObjective(forward_kl, chunk_size=...)` over
  the full vocabulary, the model as teacher and a --student-layers copy of its width as student,
  random token ids; peak RSS / (teacher weights + student weights, gradients and AdamW states);
- noise: the noise-eval recipe's loop (`recipes.noise_eval.apply_noise` / `restore` with the default
  noise model and sweep) with one forward pass of a fixed batch per level instead of lm-eval;
  seconds per level, and peak RSS / one fp32 copy.

The targets (issue "Real-size benchmarks on random weights") are printed beside the figures; the
script does not tune anything to meet them.

    python bench/real_size.py                                   # the tiny smoke run (a few minutes)
    python bench/real_size.py --model qwen3-0.6b --json out.json
    python bench/real_size.py --model llama-3.2-1b --only merge,graft
    python bench/real_size.py --model qwen3-0.6b --only gptq --workdir /tmp/rs   # keeps the checkpoints

This process imports no torch, so a child's ru_maxrss is its own (a child's starts from what its
parent held). Inputs are in the page cache when read (just written), for either tool. Other
processes may share the cores: each run reports how many cores others kept busy meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

# The architectures, from the hub's config.json of Qwen/Qwen3-0.6B and meta-llama/Llama-3.2-1B (checked
# against transformers' Qwen3Config / LlamaConfig: 596,049,920 and 1,235,814,400 parameters, the published
# 0.6B (0.44B without embeddings) and 1.24B). `tiny` has the Qwen3 layout at toy sizes (the smoke run).
ARCHS = {
    "qwen3-0.6b": ("qwen3", dict(vocab_size=151936, hidden_size=1024, num_hidden_layers=28, intermediate_size=3072,
                                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                                 max_position_embeddings=40960, rms_norm_eps=1e-6,
                                 rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "llama-3.2-1b": ("llama", dict(vocab_size=128256, hidden_size=2048, num_hidden_layers=16, intermediate_size=8192,
                                   num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                                   max_position_embeddings=131072, rms_norm_eps=1e-5,
                                   rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 8192})),
    "tiny": ("qwen3", dict(vocab_size=8192, hidden_size=128, num_hidden_layers=4, intermediate_size=384,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True,
                           max_position_embeddings=2048, rms_norm_eps=1e-6,
                           rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
}
# per model: distillation, GPTQ calibration and noise-eval batch sizes
SETTINGS = {
    "qwen3-0.6b": {"student_layers": 4, "distill_batch": 2, "distill_seq": 256, "chunk": 256,
                   "calib_samples": 16, "calib_seqlen": 256, "calib_batch": 8, "noise_batch": 2, "noise_seq": 128},
    "llama-3.2-1b": {"student_layers": 4, "distill_batch": 2, "distill_seq": 256, "chunk": 256,
                     "calib_samples": 16, "calib_seqlen": 256, "calib_batch": 8, "noise_batch": 2, "noise_seq": 128},
    "tiny": {"student_layers": 2, "distill_batch": 2, "distill_seq": 64, "chunk": 32,
             "calib_samples": 8, "calib_seqlen": 64, "calib_batch": 4, "noise_batch": 2, "noise_seq": 32},
}
WORKLOADS = ("merge", "graft", "rtn", "gptq", "distill", "noise")
TARGETS = {  # (figure, at most)
    "merge_time": 1.0, "merge_rss": 0.8, "graft_rss": 1.2, "gptq_wall_s": 900.0, "distill_rss": 1.3,
}


# --------------------------------------------------------------------------------------------------
# workers: each runs in a fresh process and writes its figures as JSON to a file


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def _rss_now_mb() -> float:
    return _status_mb("VmRSS")


def _fp32_bytes(model) -> int:
    return sum(p.numel() for p in model.parameters()) * 4  # parameters() yields a tied tensor once


def w_build(arch: str, root: str, noise: float, shard: str) -> dict:
    """base, a and b (base + independent noise) with the toy tokenizer, each an fp32 HF folder."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

    from runner.toy.zoo import build_tokenizer

    kind, values = ARCHS[arch]
    tok = build_tokenizer()
    config = (Qwen3Config if kind == "qwen3" else LlamaConfig)(**values, bos_token_id=tok.bos_token_id,
                                                               eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    params = list(model.parameters())

    def noise_of(seed: int, i: int, p):
        return torch.randn(p.shape, generator=torch.Generator().manual_seed(seed * 100_003 + i)) * noise

    paths = {}
    with torch.no_grad():
        for name, seed in (("base", None), ("a", 1), ("b", 2)):
            if seed is not None:
                for i, p in enumerate(params):
                    p.add_(noise_of(seed, i, p))
            paths[name] = str(Path(root) / name)
            model.save_pretrained(paths[name], max_shard_size=shard)
            tok.save_pretrained(paths[name])
            if seed is not None:
                for i, p in enumerate(params):
                    p.sub_(noise_of(seed, i, p))
    files = sorted(Path(paths["a"]).glob("*.safetensors"))
    return {"paths": paths, "params": sum(p.numel() for p in params), "fp32_bytes": _fp32_bytes(model),
            "embedding_params": model.get_input_embeddings().weight.numel(),
            "file_bytes": sum(f.stat().st_size for f in files), "files": len(files),
            "build_s": time.perf_counter() - t0, "config": {"model_type": kind, **values}}


def w_merge(tool: str, method: str, paths: dict, out: str, out_shard: str) -> dict:
    """bench/merge_vs_mergekit.py's merge, with the output shard size given."""
    from merge_vs_mergekit import merger

    merge = merger(tool)
    imports = _rss_now_mb()
    start = time.perf_counter()
    merge(method, paths, out, out_shard)
    return {"seconds": time.perf_counter() - start, "imports_mb": imports, "hwm_mb": _status_mb("VmHWM")}


def w_compare(a: str, b: str) -> dict:
    from merge_vs_mergekit import compare

    largest, differing, total = compare(Path(a), Path(b))
    return {"max_abs_diff": largest, "differing": differing, "entries": total}


def w_graft(paths: dict, out: str) -> dict:
    """recipe=graft (graft.tune=none): instruct = a, tuned_base = b, base = base, the recipe's defaults."""
    from recipes.merge.engine import Selection, merge_models
    from recipes.shadow_ft import GraftConfig, GraftWithNorms

    imports = _rss_now_mb()
    g = GraftConfig()
    method = GraftWithNorms()
    start = time.perf_counter()
    stats = merge_models([Path(paths["a"]), Path(paths["b"])], Path(paths["base"]), method, {"scale": g.scale},
                         Path(out), selection=Selection(contains=tuple(g.patterns)), outside=Path(paths["a"]),
                         donor=Path(paths["a"]), dtype=g.dtype, max_shard_size=g.max_shard_size, seed=0)
    return {"seconds": time.perf_counter() - start, "imports_mb": imports, "hwm_mb": _status_mb("VmHWM"),
            "out_shard": g.max_shard_size, **stats, "relative_delta": method.relative()}


def w_distill(folder: str, student_layers: int, batch: int, seq: int, chunk: int, steps: int) -> dict:
    """`steps` optimizer steps of the runner's loop on KDObjective(forward_kl, chunk_size=chunk)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import recipes.distill  # noqa: F401  (registers the kd_loss entries)
    from recipes.distill.objective import KDObjective
    from runner import registry
    from runner.config import TrainConfig
    from runner.models import load_model
    from runner.train import make_accelerator, train

    imports = _rss_now_mb()
    teacher, tok = load_model({"path": folder, "dtype": "float32"})
    teacher.eval().requires_grad_(False)
    config = AutoConfig.from_pretrained(folder)
    d = config.to_dict()
    d.update(num_hidden_layers=student_layers)
    d.pop("layer_types", None)  # recomputed for the student's depth
    torch.manual_seed(1)
    student = AutoModelForCausalLM.from_config(type(config).from_dict(d), dtype=torch.float32)
    vocab = teacher.get_output_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (batch * steps, seq), generator=torch.Generator().manual_seed(0))
    examples = [{"input_ids": row, "labels": row} for row in ids.tolist()]
    # as the recipe builds it for loss.name=fkl; vocab_size None: every one of the V logits is compared
    objective = KDObjective(registry.get("kd_loss", "fkl"), chunk_size=chunk)
    cfg = TrainConfig(steps=steps, batch_size=batch, lr=1e-5, lr_scheduler="constant", warmup_ratio=0.0,
                      log_every=1, loggers=[])
    accelerator = make_accelerator(cfg)
    loaded = _rss_now_mb()
    stamps = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        result = train(student, examples, lambda model, b, step: objective(model, teacher, b), cfg,
                       accelerator=accelerator, run_dir=run_dir, pad_id=tok.pad_token_id, loggers=[],
                       on_step=lambda step, logs: stamps.append(time.perf_counter()), desc="distill")
    seconds = time.perf_counter() - start
    p_student = sum(p.numel() for p in student.parameters())
    p_teacher = sum(p.numel() for p in teacher.parameters())
    step_s = [b - a for a, b in zip([start] + stamps[:-1], stamps)]
    return {"seconds": seconds, "imports_mb": imports, "loaded_mb": loaded, "hwm_mb": _status_mb("VmHWM"),
            "student_params": p_student, "teacher_params": p_teacher, "vocab": vocab, "tokens": result.tokens,
            # fp32: student weights + gradients + AdamW's two moments, and the frozen teacher's weights
            "held_bytes": 16 * p_student + 4 * p_teacher, "first_step_s": step_s[0],
            "median_step_s": statistics.median(step_s[1:] or step_s), "final_loss": result.final_loss}


def w_noise(folder: str, batch: int, seq: int, seeds: int) -> dict:
    """The noise-eval loop with the default noise model and sweep; a forward of a fixed batch per trial."""
    import torch

    from recipes.noise_eval import NoiseConfig, apply_noise, restore
    from runner import registry
    from runner.models import decoder_linears, load_model

    imports = _rss_now_mb()
    n = NoiseConfig()
    perturb = registry.get("noise_model", n.model)
    model, _ = load_model({"path": folder, "dtype": "float32"})
    model.eval()
    targets = decoder_linears(model)
    clean = {name: module.weight.detach().to("cpu", torch.float32).clone() for name, module, _ in targets}
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))

    def forward() -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False)
        return time.perf_counter() - t

    clean_forward = forward()
    trials = []
    for value in n.sweep:
        for seed in list(n.seeds)[:seeds]:
            t = time.perf_counter()
            hooks = apply_noise(targets, clean, perturb, {n.param: value}, seed, set(), n.redundancy_r, n.read_sigma)
            perturb_s = time.perf_counter() - t
            try:
                fwd = forward()
            finally:
                for h in hooks:
                    h.remove()
                t = time.perf_counter()
                restore(targets, clean)
                restore_s = time.perf_counter() - t
            trials.append({"value": value, "seed": seed, "perturb_s": perturb_s, "forward_s": fwd, "restore_s": restore_s})
    return {"imports_mb": imports, "hwm_mb": _status_mb("VmHWM"), "model": n.model, "param": n.param,
            "clean_forward_s": clean_forward, "trials": trials,
            "clean_copy_bytes": sum(w.numel() * 4 for w in clean.values())}


WORKERS = {"build": w_build, "merge": w_merge, "compare": w_compare, "graft": w_graft, "distill": w_distill,
           "noise": w_noise}


# --------------------------------------------------------------------------------------------------
# the driver (no torch here)


def child(name: str, args: list, work: Path, label: str) -> dict:
    """Run worker `name` in a fresh process: its figures plus wall seconds, peak RSS (ru_maxrss) and
    the cores other processes kept busy meanwhile."""
    from real_model import measure

    result = work / f"{label}.json"
    result.unlink(missing_ok=True)
    os.sync()  # earlier runs' dirty pages are not charged to this one
    m = measure([sys.executable, __file__, "--worker", name, json.dumps(args), str(result)], work / f"{label}.log")
    if m["rc"] != 0 or not result.is_file():
        sys.exit(f"{label} failed (exit {m['rc']}):\n{(work / f'{label}.log').read_text()[-3000:]}")
    return {"wall_s": m["seconds"], "peak_mb": m["peak_mb"], "others_cores": m["others_cores"],
            **json.loads(result.read_text())}


def quantize(method: str, folder: str, s: dict, work: Path) -> dict:
    """`python -m runner recipe=<method>_quantize` on the model, in its own process (real_model's runner_job)."""
    from real_model import log_times, runner_job, when

    overrides = [f"recipe={method}_quantize", f"model.path={folder}", "model.dtype=float32", "quant.bits=4",
                 "quant.group_size=128", "eval=none", "save_checkpoint=false"]
    if method == "gptq":
        overrides += [f"quant.calib_samples={s['calib_samples']}", f"quant.calib_seqlen={s['calib_seqlen']}",
                      f"quant.calib_batch_size={s['calib_batch']}"]
    os.sync()
    job = runner_job(method, overrides, work)
    if "error" in job:
        sys.exit(f"{method} failed: {job['error'][-3000:]}")
    rows = log_times(job["run_dir"])
    done = when(rows, "quantized ")
    start = when(rows, "gptq: ") if method == "gptq" else None
    quant = job["record"].get("extra", {}).get("quant") or job["record"].get("quant") or {}
    return {"wall_s": job["seconds"], "peak_mb": job["peak_mb"], "others_cores": job["others_cores"],
            "recipe_s": job["record"]["timings"].get("recipe_s"), "command": job["command"],
            "calibrated_s": (done - start) if done is not None and start is not None else None,
            "weight_error": job["record"].get("metrics", {}).get("quant/weight_error", quant.get("weight_error"))}


def ratio(a, b) -> float:
    return a / b if b else float("nan")


def verdict(value: float, limit: float) -> str:
    return "met" if value <= limit else "MISSED"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", choices=list(ARCHS))
    parser.add_argument("--only", default=",".join(WORKLOADS), help=f"comma-separated subset of {','.join(WORKLOADS)}")
    parser.add_argument("--steps", type=int, default=20, help="distillation optimizer steps")
    parser.add_argument("--repeat", type=int, default=1, help="alternating runs per merge figure (medians)")
    parser.add_argument("--noise-seeds", type=int, default=1, help="seeds per noise level (the recipe's default: 3)")
    parser.add_argument("--noise", type=float, default=0.001, help="std of the fine-tunes' noise (init std 0.02)")
    parser.add_argument("--input-shard", default="5GB", help="largest input checkpoint file (save_pretrained)")
    parser.add_argument("--out-shard", default="2GB", help="output shard size of both merges (the runner's default)")
    parser.add_argument("--workdir", default=None, help="keep the checkpoints here (reused when present)")
    parser.add_argument("--json", default=None, help="write the figures here")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        name, worker_args, out = args.worker
        Path(out).write_text(json.dumps(WORKERS[name](*json.loads(worker_args))))
        return

    sys.stdout.reconfigure(line_buffering=True)  # progress shows in a log file as it comes
    only = [w.strip() for w in args.only.split(",") if w.strip()]
    unknown = sorted(set(only) - set(WORKLOADS))
    if unknown:
        parser.error(f"--only: unknown {unknown}; choose from {','.join(WORKLOADS)}")
    s = SETTINGS[args.model]
    t_start = time.perf_counter()
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="real_size-"))
    work.mkdir(parents=True, exist_ok=True)
    res = {"model": args.model, "date": datetime.now().isoformat(timespec="seconds"), "only": only,
           "settings": {**s, "steps": args.steps, "out_shard": args.out_shard, "input_shard": args.input_shard,
                        "noise": args.noise, "repeat": args.repeat},
           "machine": {"nproc": os.cpu_count(), "python": platform.python_version(),
                       "load_at_start": os.getloadavg()[0]}}
    try:
        meta_path = work / f"{args.model}.meta.json"
        if meta_path.is_file() and all(Path(p).is_dir() for p in json.loads(meta_path.read_text())["paths"].values()):
            meta = json.loads(meta_path.read_text())
            print(f"reusing the checkpoints in {work}")
        else:
            meta = child("build", [args.model, str(work / args.model), args.noise, args.input_shard], work, "build")
            meta_path.write_text(json.dumps(meta))
        res["checkpoints"] = meta
        paths, model_mb = meta["paths"], meta["fp32_bytes"] / 2**20
        print(f"{args.model}: {meta['params'] / 1e6:.1f}M parameters ({meta['embedding_params'] / 1e6:.1f}M in the tied "
              f"embedding), one fp32 copy {model_mb:.0f} MiB; 3 checkpoints of {meta['files']} file(s), "
              f"{meta['file_bytes'] / 2**20:.0f} MiB each, built in {meta.get('wall_s', 0):.0f} s; work dir {work}")
        print("(MB below are MiB; peak = the process's ru_maxrss, imports included; +imp = peak - RSS after imports)")
        summary = []

        if "merge" in only:
            print(f"\n== merge: ours vs mergekit, fp32 in and out, {args.out_shard} output shards")
            print(f"{'method':<7} {'ours s':>7} {'mk s':>7} {'time':>6} {'ours wall':>9} {'mk wall':>8} {'wall':>6} "
                  f"{'ours MB':>8} {'mk MB':>8} {'RSS':>6} {'ours +imp':>9} {'mk +imp':>8} {'max|diff|':>9} {'others':>6}")
            res["merge"] = {}
            for method in ("linear", "ties"):
                runs = {"ours": [], "mergekit": []}
                for i in range(args.repeat):
                    for tool in runs:
                        out = work / f"out-{tool}-{method}"
                        shutil.rmtree(out, ignore_errors=True)
                        runs[tool].append(child("merge", [tool, method, paths, str(out), args.out_shard], work,
                                                f"merge-{tool}-{method}-{i}"))
                diff = child("compare", [str(work / f"out-ours-{method}"), str(work / f"out-mergekit-{method}")], work,
                             f"compare-{method}")
                for tool in runs:
                    shutil.rmtree(work / f"out-{tool}-{method}", ignore_errors=True)
                med = {tool: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for tool, rs in runs.items()}
                o, m = med["ours"], med["mergekit"]
                row = {"ours": o, "mergekit": m, "runs": runs, "compare": diff,
                       "time_ratio": ratio(o["seconds"], m["seconds"]), "wall_ratio": ratio(o["wall_s"], m["wall_s"]),
                       "rss_ratio": ratio(o["peak_mb"], m["peak_mb"]),
                       "rss_above_imports_ratio": ratio(o["peak_mb"] - o["imports_mb"], m["peak_mb"] - m["imports_mb"])}
                res["merge"][method] = row
                print(f"{method:<7} {o['seconds']:>7.1f} {m['seconds']:>7.1f} {row['time_ratio']:>6.2f} {o['wall_s']:>9.1f} "
                      f"{m['wall_s']:>8.1f} {row['wall_ratio']:>6.2f} {o['peak_mb']:>8.0f} {m['peak_mb']:>8.0f} "
                      f"{row['rss_ratio']:>6.2f} {o['peak_mb'] - o['imports_mb']:>9.0f} {m['peak_mb'] - m['imports_mb']:>8.0f} "
                      f"{diff['max_abs_diff']:>9.1e} {max(o['others_cores'], m['others_cores']):>6.2f}")
                summary += [(f"merge {method}: time / mergekit", row["time_ratio"], TARGETS["merge_time"]),
                            (f"merge {method}: peak RSS / mergekit", row["rss_ratio"], TARGETS["merge_rss"])]
            print("(s: the merge call; wall: the whole process, imports included; others: cores other processes kept busy)")

        if "graft" in only:
            print("\n== graft (Shadow-FT, recipe=graft defaults): instruct + (tuned_base - base), streamed")
            out = work / "out-graft"
            shutil.rmtree(out, ignore_errors=True)
            g = child("graft", [paths, str(out)], work, "graft")
            shutil.rmtree(out, ignore_errors=True)
            g["rss_ratio"] = ratio(g["peak_mb"], model_mb)
            res["graft"] = g
            print(f"{g['merged_tensors']} tensors grafted, {g['copied_tensors']} copied; {g['seconds']:.1f} s "
                  f"(process {g['wall_s']:.1f} s); peak {g['peak_mb']:.0f} MB (+imp {g['peak_mb'] - g['imports_mb']:.0f}) "
                  f"= {g['rss_ratio']:.2f}x one fp32 copy ({model_mb:.0f} MB); output shards {g['out_shard']}; "
                  f"others {g['others_cores']:.2f}")
            summary.append(("graft: peak RSS / one fp32 copy", g["rss_ratio"], TARGETS["graft_rss"]))

        for method in ("rtn", "gptq"):
            if method not in only:
                continue
            print(f"\n== {method.upper()} of the whole model (4 bits, group 128; python -m runner, no checkpoint written)")
            q = quantize(method, paths["base"], s, work)
            q["rss_ratio"] = ratio(q["peak_mb"], model_mb)
            res[method] = q
            print(f"wall {q['wall_s']:.0f} s (recipe incl. load {q['recipe_s']:.0f} s"
                  + (f", calibration + GPTQ {q['calibrated_s']:.0f} s" if q["calibrated_s"] is not None else "")
                  + f"); peak {q['peak_mb']:.0f} MB = {q['rss_ratio']:.2f}x one fp32 copy; weight error "
                  f"{q['weight_error']}; others {q['others_cores']:.2f}"
                  + (f"; {s['calib_samples']} calibration rows x {s['calib_seqlen']} tokens" if method == "gptq" else ""))
            if method == "gptq":
                summary.append(("gptq: whole-model wall time, s", q["wall_s"], TARGETS["gptq_wall_s"]))

        if "distill" in only:
            print(f"\n== distill: {args.steps} steps, forward KL, loss.chunk_size={s['chunk']}, batch "
                  f"{s['distill_batch']} x {s['distill_seq']} tokens, teacher = the model, student = "
                  f"{s['student_layers']} layers of its width")
            d = child("distill", [paths["base"], s["student_layers"], s["distill_batch"], s["distill_seq"], s["chunk"],
                                  args.steps], work, "distill")
            held_mb = d["held_bytes"] / 2**20
            d["rss_ratio"] = ratio(d["peak_mb"], held_mb)
            res["distill"] = d
            print(f"vocab {d['vocab']}; student {d['student_params'] / 1e6:.1f}M, teacher {d['teacher_params'] / 1e6:.1f}M "
                  f"parameters; must hold {held_mb:.0f} MB (student weights+grads+AdamW {16 * d['student_params'] / 2**20:.0f}, "
                  f"teacher {4 * d['teacher_params'] / 2**20:.0f})")
            print(f"peak {d['peak_mb']:.0f} MB = {d['rss_ratio']:.2f}x that (imports {d['imports_mb']:.0f} MB, after "
                  f"loading both models {d['loaded_mb']:.0f} MB); {d['seconds']:.0f} s, first step {d['first_step_s']:.1f} s, "
                  f"median step {d['median_step_s']:.1f} s; final loss {d['final_loss']:.3f}; others {d['others_cores']:.2f}")
            summary.append(("distill: peak RSS / what it must hold", d["rss_ratio"], TARGETS["distill_rss"]))

        if "noise" in only:
            print(f"\n== noise eval: default noise model and sweep, one forward of {s['noise_batch']} x {s['noise_seq']} "
                  f"tokens per trial")
            n = child("noise", [paths["base"], s["noise_batch"], s["noise_seq"], args.noise_seeds], work, "noise")
            n["rss_ratio"] = ratio(n["peak_mb"], model_mb)
            res["noise"] = n
            for t in n["trials"]:
                print(f"  {n['model']} {n['param']}={t['value']} seed {t['seed']}: perturb {t['perturb_s']:.1f} s, "
                      f"forward {t['forward_s']:.1f} s, restore {t['restore_s']:.1f} s")
            per = [t["perturb_s"] + t["forward_s"] + t["restore_s"] for t in n["trials"]]
            n["trial_s"] = sum(per) / len(per)
            print(f"clean forward {n['clean_forward_s']:.1f} s; a trial {n['trial_s']:.1f} s = "
                  f"{ratio(n['trial_s'], n['clean_forward_s']):.1f}x a clean forward; process {n['wall_s']:.0f} s; peak "
                  f"{n['peak_mb']:.0f} MB = {n['rss_ratio']:.2f}x one fp32 copy (the recipe keeps a clean fp32 copy of "
                  f"the decoder linears, {n['clean_copy_bytes'] / 2**20:.0f} MB); others {n['others_cores']:.2f}")

        res["total_s"] = time.perf_counter() - t_start
        res["summary"] = [{"figure": f, "value": v, "at_most": lim, "met": v <= lim} for f, v, lim in summary]
        if summary:
            print(f"\n== targets ({args.model}, {os.cpu_count()} cores)")
            print(f"{'figure':<40} {'measured':>9} {'target':>8}  verdict")
            for f, v, lim in summary:
                print(f"{f:<40} {v:>9.2f} {'<= ' + format(lim, 'g'):>8}  {verdict(v, lim)}")
        print(f"\ntotal {res['total_s'] / 60:.1f} min")
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=2))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
