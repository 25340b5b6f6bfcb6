"""Measure the toy zoo on the toy lm-eval tasks (``python -m runner.toy.zoo eval``)."""

from __future__ import annotations

import json
from pathlib import Path
from tempfile import TemporaryDirectory

from runner.config import EvalConfig
from runner.evaluate import evaluate, toy_task_names

HEADLINE = (
    ("toy_arith/exact_match", "easy EM"),
    ("toy_arith_hard/exact_match", "hard EM"),
    ("toy_arith_hard/response_tokens", "hard resp. tokens"),
    ("toy_arith_hard/think_rate", "think rate"),
    ("toy_arith_mc/acc", "MC acc"),
    ("toy_ppl/bits_per_byte", "bits/byte (plain)"),
)


def evaluate_zoo(names: list[str], limit: int | None = None, json_path: Path | None = None) -> dict[str, dict]:
    from rich.console import Console
    from rich.table import Table

    from runner.models import load_model
    from runner.toy.zoo import ZOO, build

    results = {}
    ev = EvalConfig(tasks=toy_task_names(), limit=limit, batch_size=64, log_samples=False)
    for name in names:
        path = build(name)
        model, tokenizer = load_model({"path": str(path), "dtype": "float32"})
        with TemporaryDirectory() as tmp:
            metrics = evaluate(model, tokenizer, ev, tmp, label=name).metrics
        meta = json.loads((path / "zoo.json").read_text())
        results[name] = {"parameters": meta["parameters"], "build_s": meta["build_s"], **metrics}
    table = Table(title="toy zoo on the toy tasks" + (f" (limit {limit})" if limit else ""))
    for col in ("entry", "params", *(h for _, h in HEADLINE), "build s"):
        table.add_column(col, justify="left" if col == "entry" else "right")
    for name, r in results.items():
        cells = [f"{r[k]:.3f}" if k in r else "" for k, _ in HEADLINE]
        table.add_row(name, f"{r['parameters'] / 1000:.0f}k", *cells, f"{r['build_s']:.0f}")
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    console.print(table)
    if json_path:
        json_path.write_text(json.dumps(results, indent=2))
    print("descriptions: " + "; ".join(f"{n}: {ZOO[n].description}" for n in names))
    return results
