"""Measure the toy zoo (``python -m runner.toy eval``): the zoo table, the premise table and, with
``--compare``, how far a rebuild on this machine lands from the shipped entries."""

from __future__ import annotations

import json
from pathlib import Path
from tempfile import TemporaryDirectory

from runner.config import EvalConfig

TASKS = ("toy_arith", "toy_arith_hard", "toy_arith_hard_passk", "toy_arith_mc", "toy_ppl")
HEADLINE = (
    ("toy_arith/exact_match", "easy EM"),
    ("toy_arith_hard/exact_match", "hard EM"),
    ("toy_arith_hard_passk/pass@1", "hard pass@1"),
    ("toy_arith_hard_passk/pass@16", "hard pass@16"),
    ("toy_arith_hard/response_tokens", "hard resp. tokens"),
    ("toy_arith_hard/think_rate", "think rate"),
    ("toy_arith_mc/acc", "MC acc"),
    ("toy_ppl/bits_per_byte", "bits/byte (plain)"),
)


def _metrics(model, tokenizer, limit: int | None, label: str) -> dict[str, float]:
    from runner.evaluate import evaluate

    ev = EvalConfig(tasks=list(TASKS), limit=limit, batch_size=64, log_samples=False)
    with TemporaryDirectory() as tmp:
        return evaluate(model, tokenizer, ev, tmp, label=label).metrics


def _weight_gap(a, b) -> dict[str, float | bool]:
    """How far model `a` is from model `b`: bit-identical, largest entry difference, relative distance."""
    sa, sb = a.state_dict(), b.state_dict()
    num = sum(float((sa[k].float() - sb[k].float()).pow(2).sum()) for k in sb)
    den = sum(float(sb[k].float().pow(2).sum()) for k in sb)
    return {"identical": all(bool((sa[k] == sb[k]).all()) for k in sb),
            "max_abs_diff": max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sb),
            "relative_distance": (num / den) ** 0.5}


def _table(title: str, header: list[str], rows: list[list[str]], markdown: bool) -> None:
    if markdown:
        from runner.report import markdown as as_markdown

        print(f"\n**{title}**\n\n{as_markdown(header, rows)}")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for i, col in enumerate(header):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    (Console() if Console().is_terminal else Console(width=200)).print(table)


def evaluate_zoo(names: list[str], limit: int | None = None, json_path: Path | None = None, compare: bool = False,
                 markdown: bool = False) -> dict:
    from runner.models import load_model
    from runner.toy import premises
    from runner.toy.zoo import ZOO, ensure, ensure_built

    models, metrics, tokenizer = {}, {}, None
    for name in names:
        models[name], tokenizer = load_model({"path": str(ensure(name)), "dtype": "float32"})
        metrics[name] = _metrics(models[name], tokenizer, limit, name)
    out: dict = {"limit": limit, "metrics": metrics}
    params = {n: sum(p.numel() for p in m.parameters()) for n, m in models.items()}
    rows = [[n, f"{params[n] / 1000:.0f}k", *(f"{metrics[n][k]:.3f}" if k in metrics[n] else "" for k, _ in HEADLINE)]
            for n in names]
    _table("toy zoo on the toy tasks" + (f" (limit {limit})" if limit else " (300 problems per split)"),
           ["entry", "params", *(h for _, h in HEADLINE)], rows, markdown)

    if set(ZOO) <= set(names):
        out["premises"] = measured = premises.measure(models, tokenizer, metrics)
        table = premises.premises(measured)
        _table("premises of the paper family, measured", ["premise", "measured", "target", "holds"],
               [[p.name, p.measured, p.target, "yes" if p.holds else "NO"] for p in table], markdown)

    if compare:
        out["compare"] = {}
        for name in names:
            rebuilt, _ = load_model({"path": str(ensure_built(name)), "dtype": "float32"})
            gap = _weight_gap(rebuilt, models[name])
            again = _metrics(rebuilt, tokenizer, limit, f"{name} (rebuilt)")
            gap["metric_deltas"] = {k: again[k] - metrics[name][k] for k, _ in HEADLINE if k in again and k in metrics[name]}
            out["compare"][name] = gap
        _table("a rebuild on this machine against the shipped entries",
               ["entry", "bit-identical", "largest weight difference", "‖W_rebuilt - W_shipped‖ / ‖W_shipped‖",
                *(f"d {h}" for _, h in HEADLINE[:2])],
               [[n, "yes" if g["identical"] else "no", f"{g['max_abs_diff']:.2e}", f"{g['relative_distance']:.4f}",
                 *(f"{g['metric_deltas'].get(k, 0):+.3f}" for k, _ in HEADLINE[:2])] for n, g in out["compare"].items()],
               markdown)
    if json_path:
        json_path.write_text(json.dumps(out, indent=2))
    print("descriptions: " + "; ".join(f"{n}: {ZOO[n].description}" for n in names))
    return out
