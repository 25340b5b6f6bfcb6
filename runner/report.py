"""``python -m runner.report <run-or-sweep-dir> [...]``: one table over the runs under some folders.

Every ``results.json`` below the given folders becomes a row: the run's folder, its command-line
overrides (from ``.hydra/overrides.yaml``), its status and its metrics, with the change against the
run's own baseline (the input model) where one was evaluated. Failed runs are listed as failed, never
dropped. The table is printed and written as ``report.csv`` and ``report.md`` beside the runs.
With ``--x KEY`` (a numeric config key such as ``merge.lam``, or a metric such as
``quant/effective_bits``) each metric is also plotted against it, one line per setting of the other
overrides (or per value of the config key ``--by``), into ``report.png``.

    python -m runner.report outputs/multirun/2026-11-22/12-30-00-000000
    python -m runner.report outputs/multirun/... --metrics 'toy_arith*/exact_match,*/bits_per_byte'
    python -m runner.report outputs/mi_sweep/... --x merge.lam --metrics '*/exact_match,*/think_rate'
    python -m runner.report outputs/quant_sweep/... --x quant/effective_bits --by quant.method
    python -m runner.report outputs/effects/2026-12-02          # the claims table of `make effects`
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import json
import sys
from pathlib import Path

from runner import effects

DEFAULT_METRICS = "*/exact_match,*/acc,*/response_tokens,*/think_rate,*/bits_per_byte"


def collect(paths: list[Path]) -> list[dict]:
    """The runs under `paths` (each a run folder or any folder above some), in folder order."""
    runs = []
    for root in paths:
        for results in sorted(root.rglob("results.json"), key=lambda p: _natural(p.parent)):
            data = json.loads(results.read_text())
            overrides = results.parent / ".hydra" / "overrides.yaml"
            data["_dir"] = results.parent
            data["_overrides"] = _read_overrides(overrides) if overrides.is_file() else []
            runs.append(data)
    return runs


def _natural(path: Path) -> list:
    # "10-x" after "9-x": numeric prefixes of multirun job folders sort as numbers
    head = path.name.split("-", 1)[0]
    return [str(path.parent), int(head) if head.isdigit() else float("inf"), path.name]


def _read_overrides(path: Path) -> list[str]:
    import yaml

    unshown = ("hydra.", "output_root=", "verbose=")  # where and how a run logs, not what it computes
    return [str(o) for o in (yaml.safe_load(path.read_text()) or []) if not str(o).startswith(unshown)]


def select_metrics(runs: list[dict], patterns: str) -> list[str]:
    names = sorted({k for r in runs for k in (r.get("metrics") or {})})
    chosen = []
    for pattern in patterns.split(","):
        chosen += [n for n in names if fnmatch.fnmatch(n, pattern.strip()) and n not in chosen]
    return chosen


def common_overrides(runs: list[dict]) -> list[str]:
    """Overrides every run shares (shown once above the table, not on every row); none for a single run."""
    if len(runs) < 2:
        return []
    return [o for o in runs[0]["_overrides"] if all(o in r["_overrides"] for r in runs[1:])]


def rows(runs: list[dict], metrics: list[str]) -> tuple[list[str], list[list[str]]]:
    header = ["run", "overrides", "status", *metrics, *[f"Δ {m}" for m in metrics]]
    shared = common_overrides(runs)
    out = []
    for r in runs:
        values, base = r.get("metrics") or {}, r.get("baseline_metrics") or {}
        cells = [r["_dir"].name, " ".join(o for o in r["_overrides"] if o not in shared), str(r.get("status"))]
        cells += [_fmt(values.get(m)) for m in metrics]
        cells += [_fmt(values[m] - base[m], signed=True) if m in values and m in base else "" for m in metrics]
        out.append(cells)
    keep = [i for i, h in enumerate(header) if not h.startswith("Δ") or any(row[i] for row in out)]
    return [header[i] for i in keep], [[row[i] for i in keep] for row in out]


def _fmt(x: float | None, signed: bool = False) -> str:
    if x is None:
        return ""
    return f"{x:+.3f}" if signed else f"{x:.3f}"


def markdown(header: list[str], table: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in table]) + "\n"


def write(header: list[str], table: list[list[str]], out_dir: Path) -> tuple[Path, Path]:
    csv_path, md_path = out_dir / "report.csv", out_dir / "report.md"
    with csv_path.open("w", newline="") as f:
        csv.writer(f).writerows([header, *table])
    md_path.write_text(markdown(header, table))
    return csv_path, md_path


def config_value(run: dict, key: str):
    """The run's value of the dotted config key `key`, or None."""
    node = run.get("config") or {}
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def x_value(run: dict, key: str) -> float | None:
    """The run's value of `key` as a number: a dotted config key, else a metric (quant/effective_bits)."""
    node = config_value(run, key)
    if node is None:
        node = (run.get("metrics") or {}).get(key)
    if isinstance(node, bool):
        return None
    try:
        return float(node)
    except (TypeError, ValueError):
        return None


def series(runs: list[dict], key: str, by: str | None = None) -> dict[str, list[tuple[float, dict]]]:
    """Completed runs with a numeric `key`, sorted by it, one group per value of the config key `by`
    (default: per setting of the other overrides)."""
    groups: dict[str, list[tuple[float, dict]]] = {}
    for r in runs:
        x = x_value(r, key)
        if r.get("status") != "completed" or x is None:
            continue
        if by:
            label = f"{by}={config_value(r, by)}"
        else:
            label = " ".join(o for o in r["_overrides"] if o.split("=", 1)[0].lstrip("+~") != key) or "runs"
        groups.setdefault(label, []).append((x, r.get("metrics") or {}))
    return {label: sorted(points, key=lambda p: p[0]) for label, points in groups.items()}


def plot_panels(metrics: list[str], xlabel: str, lines, path: Path) -> Path:
    """One panel per metric; `lines(metric)` gives (label, xs, ys, yerr or None) for each line in it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = min(3, len(metrics))
    nrows = -(-len(metrics) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 3.2 * nrows), squeeze=False)
    for ax in axes.flat[len(metrics):]:
        ax.set_visible(False)
    labels = set()
    for ax, metric in zip(axes.flat, metrics):
        for label, xs, ys, yerr in lines(metric):
            ax.errorbar(xs, ys, yerr=yerr, marker="o", capsize=3 if yerr else 0, label=label)
            labels.add(label)
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    if len(labels) > 1:
        axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot(groups: dict[str, list[tuple[float, dict]]], metrics: list[str], key: str, path: Path) -> Path:
    """Each metric against the config key `key`, one line per group of runs."""
    def lines(metric):
        for label, points in groups.items():
            kept = [(x, values[metric]) for x, values in points if metric in values]
            yield label, [x for x, _ in kept], [y for _, y in kept], None

    return plot_panels(metrics, key, lines, path)


def curve_rows(curves: dict[str, dict], metrics: list[str]) -> tuple[list[str], list[list[str]]]:
    """A table of noise-eval curves (`results.json` "noise" blocks by label): one row per label and value."""
    header = ["run", "param", "value", "seeds", *metrics]
    table = []
    for label, noise in curves.items():
        for point in noise["curve"]:
            cells = [f"{point['mean'][m]:.3f} ± {point['std'][m]:.3f}" if m in point["mean"] else "" for m in metrics]
            table.append([label, noise["param"], f"{point['value']:g}", str(point["seeds"]), *cells])
    return header, table


def curve_plot(curves: dict[str, dict], metrics: list[str], path: Path) -> Path:
    """Each metric's mean against the swept value with std error bars, one line per curve."""
    def lines(metric):
        for label, noise in curves.items():
            points = [p for p in noise["curve"] if metric in p["mean"]]
            yield (label, [p["value"] for p in points], [p["mean"][metric] for p in points],
                   [p["std"][metric] for p in points])

    xlabel = " / ".join(dict.fromkeys(noise["param"] for noise in curves.values()))
    return plot_panels(metrics, xlabel, lines, path)


def curve_metrics(curves: dict[str, dict], patterns: str) -> list[str]:
    names = sorted({m for noise in curves.values() for p in noise["curve"] for m in p["mean"]})
    chosen = []
    for pattern in patterns.split(","):
        chosen += [n for n in names if fnmatch.fnmatch(n, pattern.strip()) and n not in chosen]
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runner.report", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help="run folders, sweep folders, or folders above them")
    parser.add_argument("--metrics", default=DEFAULT_METRICS, help=f"comma-separated glob patterns ({DEFAULT_METRICS})")
    parser.add_argument("--x", default=None, metavar="KEY",
                        help="plot the metrics against this numeric config key or metric (e.g. quant/effective_bits)")
    parser.add_argument("--by", default=None, metavar="KEY",
                        help="with --x: one line per value of this config key (default: per setting of the other overrides)")
    parser.add_argument("--curves", action="store_true",
                        help="noise-eval runs: tabulate and plot each run's curve (mean ± std per value)")
    parser.add_argument("--out", type=Path, default=None, help="where report.csv/report.md go (default: first path)")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.paths if not p.is_dir()]
    if missing:
        print(f"error: not a folder: {', '.join(missing)}", file=sys.stderr)
        return 2
    if len(args.paths) == 1 and any(args.paths[0].glob(f"*/{effects.FAMILY_FILE}")):
        effects.render(args.paths[0], args.out or args.paths[0])  # a `make effects` folder: the claims table
        return 0
    runs = collect(args.paths)
    if not runs:
        print(f"error: no results.json under {', '.join(map(str, args.paths))}", file=sys.stderr)
        return 2
    if args.curves:
        return _report_curves(runs, args)
    metrics = select_metrics(runs, args.metrics)
    groups = series(runs, args.x, args.by) if args.x else {}
    if args.x and not groups:
        print(f"error: --x {args.x}: no completed run has a numeric value for this config key or metric", file=sys.stderr)
        return 2
    header, table = rows(runs, metrics)

    from rich.console import Console
    from rich.table import Table

    shared = common_overrides(runs)
    shown = Table(title=f"{len(runs)} run(s)" + (f"; all with {' '.join(shared)}" if shared else ""))
    for h in header:
        shown.add_column(h, justify="left" if h in ("run", "overrides", "status") else "right")
    for row in table:
        shown.add_row(*row, style=None if row[2] == "completed" else "red")
    console = Console() if Console().is_terminal else Console(width=200)
    console.print(shown)
    csv_path, md_path = write(header, table, args.out or args.paths[0])
    console.print(f"wrote {csv_path} and {md_path}")
    plotted = [m for m in metrics if m != args.x]  # a metric on the x axis is not also a panel
    if groups and plotted:
        console.print(f"wrote {plot(groups, plotted, args.x, (args.out or args.paths[0]) / 'report.png')}")
    return 0


def _report_curves(runs: list[dict], args) -> int:
    shared = common_overrides(runs)
    curves = {(" ".join(o for o in r["_overrides"] if o not in shared) or r["_dir"].name): r["noise"]
              for r in runs if r.get("status") == "completed" and "noise" in r}
    failed = [r["_dir"].name for r in runs if r.get("status") != "completed"]
    if not curves:
        print("error: --curves: no completed noise-eval run (results.json with a 'noise' curve)", file=sys.stderr)
        return 2
    metrics = curve_metrics(curves, args.metrics)
    header, table = curve_rows(curves, metrics)
    out = args.out or args.paths[0]
    write(header, table, out)
    from rich.console import Console
    from rich.table import Table

    shown = Table(title=f"{len(curves)} curve(s)" + (f"; all with {' '.join(shared)}" if shared else ""))
    for h in header:
        shown.add_column(h, justify="left" if h in ("run", "param") else "right")
    for row in table:
        shown.add_row(*row)
    console = Console() if Console().is_terminal else Console(width=200)
    console.print(shown)
    if failed:
        console.print(f"[red]failed: {', '.join(failed)}[/red]")
    console.print(f"wrote {out / 'report.csv'}, {out / 'report.md'} and {curve_plot(curves, metrics, out / 'report.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
