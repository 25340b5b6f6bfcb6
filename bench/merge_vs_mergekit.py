"""The merge engine against mergekit: the same linear and TIES merges, side by side.

A family of random Llama checkpoints (a base and two "fine-tunes" = base + noise, fp32, inputs saved
in 100 MB shards as hub checkpoints are) is merged by `recipes.merge.engine.merge_models` and by
mergekit's `run_merge`, each in a fresh process. Printed per method: the largest absolute difference
between the two outputs over all tensors, the merge's wall time, the process's peak RSS (imports
included) and the peak above the RSS after imports, with the ratios ours / mergekit; each figure is
the median of `--repeat` alternating runs, each in a fresh process after a sync. Both write
100 MB output shards. Then a scaling run: the same linear merge on 2x, 4x and 8x the layers, to show
that the peak RSS does not grow with the model. Needs mergekit (the bench extra).

    python bench/merge_vs_mergekit.py [--hidden 1024] [--layers 4] [--scale 1,2,4,8] [--repeat 3]

Note: safetensors inputs are memory-mapped, so pages of the shard being read count in RSS; peak RSS
is the imports plus about one open shard per input plus one output shard, for either tool.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
SHARD = "100MB"
DENSITY, WEIGHTS = 0.3, (0.6, 0.4)


def make_family(root: Path, hidden: int, layers: int) -> dict[str, Path]:
    """base, a and b (same architecture; a and b are base plus independent noise), with a tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from runner.toy.zoo import build_tokenizer

    tok = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=int(2.75 * hidden),
                         num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8,
                         tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    paths = {}
    for name, noise in (("base", 0.0), ("a", 0.02), ("b", 0.02)):
        model = LlamaForCausalLM(config)
        with torch.no_grad():
            for p, q in zip(model.parameters(), base.parameters()):
                p.copy_(q + noise * torch.randn_like(q))
        paths[name] = root / f"{name}-L{layers}"
        model.save_pretrained(paths[name], max_shard_size=SHARD)
        tok.save_pretrained(paths[name])
    return paths


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM; unlike ru_maxrss it is not inherited from the parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def merger(tool: str):
    """Import `tool` ("ours" or "mergekit") and return merge(method, paths, out, shard): a linear or TIES merge
    of paths["a"] and paths["b"] (TIES over paths["base"]) written to `out` in shards of `shard` (e.g. "100MB").
    Imports happen here, so a caller can read its RSS after them and before the merge."""
    from runner.tensorio import parse_size

    if tool == "ours":
        from recipes.merge.engine import Selection, merge_models
        from runner import registry

        def merge(method: str, paths: dict, out, shard: str) -> None:
            models = [Path(paths["a"]), Path(paths["b"])]
            params = {"weights": list(WEIGHTS)} if method == "linear" else {"weights": list(WEIGHTS), "density": DENSITY}
            merge_models(models, Path(paths["base"]) if method == "ties" else None, registry.get("merge_method", method),
                         params, Path(out), selection=Selection(), outside=models[0], donor=models[0], dtype="float32",
                         max_shard_size=shard, seed=0)
        return merge

    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    def merge(method: str, paths: dict, out, shard: str) -> None:
        models = [Path(paths["a"]), Path(paths["b"])]
        spec = {"merge_method": method, "dtype": "float32", "out_dtype": "float32",
                "models": [{"model": str(m), "parameters": {"weight": w, **({"density": DENSITY} if method == "ties" else {})}}
                           for m, w in zip(models, WEIGHTS)]}
        if method == "ties":
            spec["base_model"] = str(paths["base"])
        run_merge(MergeConfiguration.model_validate(yaml.safe_load(json.dumps(spec))), str(out),
                  options=MergeOptions(out_shard_size=parse_size(shard), quiet=True, write_model_card=False))
    return merge


def worker(tool: str, method: str, paths: dict, out: str) -> dict:
    """Runs in a fresh process: import, merge, report seconds and RSS."""
    merge = merger(tool)
    rss_after_imports = peak_rss_mb()
    start = time.perf_counter()
    merge(method, paths, out, SHARD)
    seconds = time.perf_counter() - start
    peak = peak_rss_mb()
    return {"seconds": seconds, "peak_mb": peak, "above_imports_mb": peak - rss_after_imports}


def _once(tool: str, method: str, paths: dict, out: Path) -> dict:
    subprocess.run(["rm", "-rf", str(out)], check=True)
    os.sync()  # the previous run's dirty pages are not charged to this one
    args = [sys.executable, __file__, "--worker", tool, method, json.dumps({k: str(v) for k, v in paths.items()}), str(out)]
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"{tool} {method} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def side_by_side(method: str, paths: dict, ours_out: Path, theirs_out: Path, repeat: int) -> tuple[dict, dict]:
    """Medians over `repeat` alternating pairs of fresh processes (the last outputs are kept)."""
    pairs = [(_once("ours", method, paths, ours_out), _once("mergekit", method, paths, theirs_out)) for _ in range(repeat)]
    return tuple({k: statistics.median(p[i][k] for p in pairs) for k in pairs[0][i]} for i in (0, 1))


def compare(a: Path, b: Path) -> tuple[float, int, int]:
    """(largest |difference|, entries differing by more than 1e-6, entries in all) between two outputs."""
    from runner.tensorio import TensorSource

    ours, theirs = TensorSource(a), TensorSource(b)
    if set(ours.weight_map) != set(theirs.weight_map):
        sys.exit(f"the outputs hold different tensors: {sorted(set(ours.weight_map) ^ set(theirs.weight_map))[:5]}")
    largest, differing, total = 0.0, 0, 0
    for key in ours.keys():
        diff = (ours.get(key) - theirs.get(key)).abs()
        largest, differing, total = max(largest, float(diff.max())), differing + int((diff > 1e-6).sum()), total + diff.numel()
    return largest, differing, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--scale", default="1,2,4,8", help="layer multiples for the scaling run")
    parser.add_argument("--repeat", type=int, default=3, help="fresh processes per figure (medians are shown)")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        tool, method, paths, out = args.worker
        print(json.dumps(worker(tool, method, json.loads(paths), out)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = make_family(root, args.hidden, args.layers)
        print(f"inputs: llama hidden {args.hidden}, {args.layers} layers, fp32, "
              f"{sum(f.stat().st_size for f in paths['a'].glob('*.safetensors')) / 1e6:.0f} MB each")
        print(f"{'method':<8} {'max |diff|':>10} {'differing':>9} {'ours s':>7} {'mk s':>7} {'time ratio':>10} "
              f"{'ours MB':>8} {'mk MB':>8} {'RSS ratio':>9} {'ours +MB':>9} {'mk +MB':>8}")
        for method in ("linear", "ties"):
            ours, theirs = side_by_side(method, paths, root / f"ours-{method}", root / f"mk-{method}", args.repeat)
            diff, differing, total = compare(root / f"ours-{method}", root / f"mk-{method}")
            print(f"{method:<8} {diff:>10.2e} {differing:>9} {ours['seconds']:>7.2f} {theirs['seconds']:>7.2f} "
                  f"{ours['seconds'] / theirs['seconds']:>10.2f} {ours['peak_mb']:>8.0f} {theirs['peak_mb']:>8.0f} "
                  f"{ours['peak_mb'] / theirs['peak_mb']:>9.2f} {ours['above_imports_mb']:>9.0f} "
                  f"{theirs['above_imports_mb']:>8.0f}")

        print(f"(entries differing by > 1e-6, of {total}; TIES can differ where two |delta| tie at the trim threshold)")
        print("\nscaling (linear merge; peak RSS should stay flat as the layers grow)")
        print(f"{'layers':>6} {'MB/input':>8} {'ours s':>7} {'ours MB':>8} {'ours +MB':>9} {'mk s':>7} {'mk MB':>8} {'mk +MB':>8}")
        for factor in [int(x) for x in args.scale.split(",")]:
            layers = args.layers * factor
            family = paths if factor == 1 else make_family(root, args.hidden, layers)
            size = sum(f.stat().st_size for f in family["a"].glob("*.safetensors")) / 1e6
            ours, theirs = side_by_side("linear", family, root / f"ours-scale-{layers}", root / f"mk-scale-{layers}",
                                        args.repeat)
            print(f"{layers:>6} {size:>8.0f} {ours['seconds']:>7.2f} {ours['peak_mb']:>8.0f} {ours['above_imports_mb']:>9.0f} "
                  f"{theirs['seconds']:>7.2f} {theirs['peak_mb']:>8.0f} {theirs['above_imports_mb']:>8.0f}")
            if factor != 1:
                for p in family.values():
                    subprocess.run(["rm", "-rf", str(p)], check=True)
            subprocess.run(["rm", "-rf", str(root / f"ours-scale-{layers}"), str(root / f"mk-scale-{layers}")], check=True)


if __name__ == "__main__":
    main()
