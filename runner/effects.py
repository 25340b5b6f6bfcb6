"""The paper-effects scoreboard: each claim of the paper family, tested on the shipped toy world.

``python -m runner.effects`` (``make effects``, ``make effects FAMILY=distill``) runs every arm of
every claim in ``conf/effects/<family>.yaml`` with the same budget and seeds, then writes
``docs/effects.md`` (one row per claim) and one plot per family. Runs land under
``outputs/effects/<date>/<family>/<arm>/seed<s>/``; ``python -m runner.report <that folder>`` renders
them again.

A claim reads "arm A's metric exceeds arm B's by more than x" (x = 0 for "A beats B"; a negative x
for "A comes close to B", "A loses at most |x|"). The verdict rule is fixed here, before anything
runs:

- lead = mean(A) - mean(B) - x, over seeds and test problems;
- SE = sqrt(SE_seeds^2 + SE_problems^2): SE_seeds is the standard error of the per-seed differences
  (seed s of A against seed s of B: same data order); SE_problems is the standard error of the mean
  per-problem difference (each problem's score averaged over seeds), paired over the problems both
  arms answered. The first is the run-to-run noise, the second the finite test split's; an arm with
  no randomness (a merge, RTN) has only the second;
- **reproduced** when lead > 2 SE, **contradicted** when lead < -2 SE, **inconclusive** otherwise.

A "drop" claim ("hard accuracy falls more than easy accuracy under quantization") compares the
relative drops 1 - quantized / full-precision of two metrics; its SE comes from a paired bootstrap
over the test problems (and the seeds' spread where there is one).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import yaml

from runner.errors import ConfigError

log = logging.getLogger(__name__)

Z = 2.0  # the verdict rule's margin, in standard errors
VERDICTS = ("reproduced", "inconclusive", "contradicted")
NOT_RUN = "not run"  # a row whose arms have no completed run
BOOTSTRAP = 2000  # resamples for the SE of a drop claim
REPO = Path(__file__).resolve().parent.parent
CLAIMS_DIR = REPO / "conf" / "effects"
FAMILY_FILE = "family.yaml"  # the claims a family folder was run with, copied beside its runs


def verdict(lead: float, se: float) -> str:
    """The verdict of a claim whose claimed direction leads by `lead`, with standard error `se`."""
    if lead > Z * se:
        return "reproduced"
    if lead < -Z * se:
        return "contradicted"
    return "inconclusive"


# --------------------------------------------------------------------------------------------
# Claims


@dataclass
class Arm:
    name: str
    overrides: list[str]
    seeded: bool = True  # False: no randomness in the run (or it draws its own seeds, as noise-eval): run once


@dataclass
class Claim:
    id: str
    claim: str
    source: str
    metric: str  # a name from the family's `metrics`
    higher: str  # arm; "<arm>@baseline" reads the run's evaluation of its input model
    lower: str
    by: float = 0.0
    kind: str = "compare"  # compare | drop
    drop_more: str | None = None  # drop claims: the metric claimed to fall more (relatively) ...
    drop_less: str | None = None  # ... than this one, from `lower` (full precision) to `higher` (quantized)
    show: list[str] = field(default_factory=list)  # other metrics reported beside the arms
    why: str | None = None  # the measured reason, where the claim does not hold


@dataclass
class Family:
    name: str
    description: str
    seeds: list[int]
    common: list[str]
    metrics: dict[str, list[str]]  # name -> result keys, pooled over their test problems
    arms: dict[str, Arm]
    claims: list[Claim]


def family_names() -> list[str]:
    return sorted(p.stem for p in CLAIMS_DIR.glob("*.yaml"))


def load_family(path: Path) -> Family:
    """A family's claims file, checked: every claim names known arms and metrics."""
    raw = yaml.safe_load(path.read_text())
    arms = {}
    for name, spec in raw["arms"].items():
        spec = {"overrides": spec} if isinstance(spec, list) else spec
        arms[name] = Arm(name, [str(o) for o in spec["overrides"]], bool(spec.get("seeded", True)))
    claims = [Claim(**c) for c in raw["claims"]]
    fam = Family(raw["family"], raw["description"], list(raw["seeds"]), [str(o) for o in raw.get("common", [])],
                 {k: list(v) for k, v in raw["metrics"].items()}, arms, claims)
    problems = []
    for c in claims:
        for role in (c.higher, c.lower):
            if role.split("@")[0] not in arms or role.count("@") > 1 or ("@" in role and not role.endswith("@baseline")):
                problems.append(f"{path.name}: claim {c.id}: unknown arm {role!r}; arms are {', '.join(arms)}")
        for m in [c.metric, c.drop_more, c.drop_less, *c.show]:
            if m is not None and m not in fam.metrics:
                problems.append(f"{path.name}: claim {c.id}: unknown metric {m!r}; metrics are {', '.join(fam.metrics)}")
        if c.kind not in ("compare", "drop") or (c.kind == "drop") != (c.drop_more is not None and c.drop_less is not None):
            problems.append(f"{path.name}: claim {c.id}: kind {c.kind!r} needs drop_more and drop_less exactly when 'drop'")
    if len({c.id for c in claims}) != len(claims):
        problems.append(f"{path.name}: claim ids repeat")
    if problems:
        raise ConfigError(problems)
    return fam


def arm_overrides(fam: Family, arm: Arm, seeds: list[int]) -> list[str]:
    seed_values = ",".join(str(s) for s in (seeds if arm.seeded else seeds[:1]))
    return [*fam.common, *arm.overrides, f"seed={seed_values}"]


# --------------------------------------------------------------------------------------------
# Running


def run_dirs(arm_dir: Path) -> list[Path]:
    """The arm's completed runs, by seed."""
    found = [p for p in arm_dir.glob("seed*") if (p / "results.json").is_file()
             and json.loads((p / "results.json").read_text())["status"] == "completed"]
    return sorted(found, key=lambda p: int(p.name[4:]))


def _complete(arm_dir: Path, n: int) -> bool:
    return len(run_dirs(arm_dir)) >= n


def run_family(fam: Family, out: Path, seeds: list[int], extra: list[str]) -> None:
    """Run every arm not yet complete under `out/<family>/` (one process per arm, its seeds in sequence)."""
    fam_dir = out / fam.name
    fam_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(CLAIMS_DIR / f"{fam.name}.yaml", fam_dir / FAMILY_FILE)
    for i, arm in enumerate(fam.arms.values(), 1):
        arm_dir = fam_dir / arm.name
        n = len(seeds) if arm.seeded else 1
        if _complete(arm_dir, n):
            log.info("%s %d/%d %s: complete, reused", fam.name, i, len(fam.arms), arm.name)
            continue
        args = [sys.executable, "-m", "runner", "-m", *arm_overrides(fam, arm, seeds), *extra,
                f"hydra.sweep.dir={arm_dir}", "hydra.sweep.subdir=seed${seed}"]
        log.info("%s %d/%d %s: %s", fam.name, i, len(fam.arms), arm.name, " ".join(args[3:]))
        t0 = time.perf_counter()
        proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
        (arm_dir / "effects_run.log").parent.mkdir(parents=True, exist_ok=True)
        (arm_dir / "effects_run.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            log.error("%s %s failed (exit %d, %.0f s); see %s", fam.name, arm.name, proc.returncode,
                      time.perf_counter() - t0, arm_dir / "effects_run.log")
        else:
            log.info("%s %s done in %.0f s", fam.name, arm.name, time.perf_counter() - t0)


# --------------------------------------------------------------------------------------------
# Collecting: per seed, a value and the per-problem scores behind it


@dataclass
class Sample:
    value: float
    items: dict[str, float] | None  # "<task>:<doc_id>" -> score; None where no per-problem record exists


_tokenizers: dict[str, object] = {}


def _run_tokenizer(run_dir: Path):
    """The tokenizer of the model a run evaluated: its checkpoint's, else its first model role's (a run
    without a checkpoint, e.g. decoding-time realignment, evaluates models that share one tokenizer)."""
    from runner.config import ROLES
    from runner.models import load_tokenizer, resolve_model_path

    record = json.loads((run_dir / "results.json").read_text())
    config = record["config"]
    path = record.get("checkpoint") or resolve_model_path(next(config[r] for r in ROLES if config.get(r)))
    if path not in _tokenizers:
        _tokenizers[path] = load_tokenizer(path)
    return _tokenizers[path]


def _item_scores(samples_file: Path, metric: str, run_dir: Path) -> dict[str, float] | None:
    """Per-problem scores of one task from lm-eval's logged samples (the runner's response_tokens and
    think_rate recomputed from the logged responses, as the eval stage computes them)."""
    from runner.evaluate import THINK_OPEN, _responses

    if not samples_file.is_file():
        return None
    task = samples_file.stem[len("samples_"):]
    scores = {}
    for line in samples_file.read_text().splitlines():
        s = json.loads(line)
        if metric in s:
            value = float(s[metric])
        elif metric in ("response_tokens", "think_rate"):
            responses = _responses(s)
            if metric == "think_rate":
                value = sum(THINK_OPEN in r for r in responses) / len(responses)
            else:
                ids = _run_tokenizer(run_dir)(responses, add_special_tokens=False).input_ids
                value = sum(len(i) for i in ids) / len(responses)
        else:
            return None
        scores[f"{task}:{s['doc_id']}"] = value
    return scores


def _checkpoint_metric(run_dir: Path, key: str) -> Sample:
    """A metric computed from the run's checkpoint by a registered ``checkpoint_metric`` (per item)."""
    from runner import registry
    from runner.models import load_model

    record = json.loads((run_dir / "results.json").read_text())
    model, tokenizer = load_model({"path": record["checkpoint"], "dtype": "float32"})
    per_item = registry.get("checkpoint_metric", key)(model, tokenizer)
    return Sample(sum(per_item) / len(per_item), {f"{key}:{i}": v for i, v in enumerate(per_item)})


def samples(run_dirs_: list[Path], key: str, baseline: bool = False) -> list[Sample]:
    """One Sample per seed for a result key: ``task/metric``, ``task/metric@param=value`` (a noise-eval
    curve), ``train/<field>``, or a registered ``checkpoint_metric`` (computed from the checkpoint)."""
    from runner import registry

    if key in registry.names("checkpoint_metric"):
        return [_checkpoint_metric(d, key) for d in run_dirs_]
    if key.startswith("train/"):  # the training record, e.g. train/trainable_parameters
        return [Sample(float(json.loads((d / "results.json").read_text())["train"][key[6:]]), None) for d in run_dirs_]
    task, metric = key.split("/", 1)
    head, _, tail = metric.rpartition("@")
    point = tail if head and "=" in tail else None  # "exact_match@sigma=0.02"; "pass@16" is a plain metric
    if point is not None:
        metric = head
    out = []
    for d in run_dirs_:
        results = json.loads((d / "results.json").read_text())
        if point is not None:  # noise-eval: its own seeds, one trial each
            value = point.split("=", 1)[1]
            trials = [t for t in results["noise"]["trials"] if math.isclose(t["value"], float(value))]
            for t in trials:
                items = _item_scores(d / "eval" / point / f"seed{t['seed']}" / f"samples_{task}.jsonl", metric, d)
                out.append(Sample(t["metrics"][f"{task}/{metric}"], items))
            continue
        metrics = results["baseline_metrics" if baseline else "metrics"]
        if key not in metrics:
            raise ConfigError(f"{d}: no metric {key!r} in results.json")
        items = _item_scores(d / "eval" / ("baseline" if baseline else "final") / f"samples_{task}.jsonl", metric, d)
        out.append(Sample(metrics[key], items))
    return out


def pooled(per_key: list[list[Sample]]) -> list[Sample]:
    """Several keys' samples as one metric: per seed, the mean over all their problems together."""
    joined = []
    for per_seed in zip(*per_key):
        if all(s.items is not None for s in per_seed):
            items = {k: v for s in per_seed for k, v in s.items.items()}
            joined.append(Sample(sum(items.values()) / len(items), items))
        else:
            joined.append(Sample(sum(s.value for s in per_seed) / len(per_seed), None))
    return joined


# --------------------------------------------------------------------------------------------
# Comparing


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def _sd(xs) -> float:
    xs = list(xs)
    if len(xs) < 2:
        return 0.0
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _item_means(ss: list[Sample]) -> dict[str, float] | None:
    if any(s.items is None for s in ss):
        return None
    keys = set.intersection(*(set(s.items) for s in ss))
    return {k: _mean(s.items[k] for s in ss) for k in keys}


def _paired(a: list[Sample], b: list[Sample]) -> list[tuple[Sample, Sample]]:
    """Seed s of A with seed s of B; an arm run once (no randomness) pairs with every seed of the other."""
    if len(a) == len(b):
        return list(zip(a, b))
    if len(a) == 1:
        return [(a[0], y) for y in b]
    if len(b) == 1:
        return [(x, b[0]) for x in a]
    raise ConfigError(f"arms ran {len(a)} and {len(b)} seeds; a comparison needs the same seeds")


def compare(a: list[Sample], b: list[Sample]) -> dict:
    """Mean difference A - B and its standard error (see the module docstring)."""
    pairs = _paired(a, b)
    diffs = [x.value - y.value for x, y in pairs]
    se_seeds = _sd(diffs) / math.sqrt(len(diffs))
    ia, ib = _item_means(a), _item_means(b)
    se_items = None
    if ia is not None and ib is not None:
        common = sorted(set(ia) & set(ib))
        if len(common) >= 2:
            se_items = _sd(ia[k] - ib[k] for k in common) / math.sqrt(len(common))
    se = math.sqrt(se_seeds ** 2 + (se_items or 0.0) ** 2)
    return {"diff": _mean(diffs), "se": se, "se_seeds": se_seeds, "se_items": se_items}


def compare_drop(quant: dict[str, list[Sample]], full: dict[str, list[Sample]], more: str, less: str) -> dict:
    """Relative drop of `more` minus relative drop of `less` (each 1 - quantized / full), with a paired
    bootstrap SE over the test problems combined with the seeds' spread."""
    def drop(q: list[Sample], f: list[Sample]) -> float:
        fm = _mean(s.value for s in f)
        return 1 - _mean(s.value for s in q) / fm if fm else 0.0

    diffs = [drop([q1], [f1]) - drop([q2], [f2]) for (q1, f1), (q2, f2) in
             zip(_paired(quant[more], full[more]), _paired(quant[less], full[less]))]
    rng = random.Random(0)
    boots = []
    means = {(m, side): _item_means(src[m]) for m in (more, less) for side, src in (("q", quant), ("f", full))}
    if all(v is not None for v in means.values()):
        keys = {m: sorted(set(means[(m, "q")]) & set(means[(m, "f")])) for m in (more, less)}
        for _ in range(BOOTSTRAP):
            d = []
            for m in (more, less):
                pick = [rng.choice(keys[m]) for _ in keys[m]]
                fm = _mean(means[(m, "f")][k] for k in pick)
                d.append(1 - _mean(means[(m, "q")][k] for k in pick) / fm if fm else 0.0)
            boots.append(d[0] - d[1])
    se_items = _sd(boots) if boots else None
    se_seeds = _sd(diffs) / math.sqrt(len(diffs))
    return {"diff": _mean(diffs), "se": math.sqrt(se_seeds ** 2 + (se_items or 0.0) ** 2),
            "se_seeds": se_seeds, "se_items": se_items}


def evaluate_family(fam: Family, fam_dir: Path) -> list[dict]:
    """One row per claim, from the runs under `fam_dir`."""
    loaded: dict[tuple[str, str], list[Sample]] = {}

    def arm_metric(role: str, metric: str) -> list[Sample]:
        if (role, metric) not in loaded:
            arm, _, which = role.partition("@")
            dirs = run_dirs(fam_dir / arm)
            loaded[(role, metric)] = pooled([samples(dirs, key, baseline=which == "baseline")
                                             for key in fam.metrics[metric]])
        return loaded[(role, metric)]

    def wall(role: str) -> float:
        return sum(json.loads((d / "results.json").read_text())["timings"].get("total_s", 0.0)
                   for d in run_dirs(fam_dir / role.split("@")[0]))

    rows = []
    for c in fam.claims:
        missing = [r.split("@")[0] for r in (c.higher, c.lower) if not run_dirs(fam_dir / r.split("@")[0])]
        if missing:  # an arm failed or never ran: the row says so instead of a verdict
            rows.append({"id": c.id, "claim": c.claim, "source": c.source, "kind": c.kind, "metric": c.metric,
                         "higher": c.higher, "lower": c.lower, "by": c.by, "verdict": NOT_RUN, "why":
                         f"no completed run of {', '.join(missing)} (see its effects_run.log)", "wall_s": 0.0})
            continue
        if c.kind == "drop":
            q = {m: arm_metric(c.higher, m) for m in (c.drop_more, c.drop_less)}
            f = {m: arm_metric(c.lower, m) for m in (c.drop_more, c.drop_less)}
            stats = compare_drop(q, f, c.drop_more, c.drop_less)
            arms = {c.higher: {m: _summary(q[m]) for m in q}, c.lower: {m: _summary(f[m]) for m in f}}
        else:
            a, b = arm_metric(c.higher, c.metric), arm_metric(c.lower, c.metric)
            stats = compare(a, b)
            arms = {c.higher: {c.metric: _summary(a)}, c.lower: {c.metric: _summary(b)}}
            for m in c.show:
                arms[c.higher][m] = _summary(arm_metric(c.higher, m))
                arms[c.lower][m] = _summary(arm_metric(c.lower, m))
        lead = stats["diff"] - c.by
        wall_s = wall(c.higher) + (wall(c.lower) if c.lower.split("@")[0] != c.higher.split("@")[0] else 0.0)
        rows.append({"id": c.id, "claim": c.claim, "source": c.source, "kind": c.kind, "metric": c.metric,
                     "higher": c.higher, "lower": c.lower, "by": c.by, "arms": arms, **stats, "lead": lead,
                     "verdict": verdict(lead, stats["se"]), "wall_s": wall_s, "why": c.why,
                     "drop": [c.drop_more, c.drop_less] if c.kind == "drop" else None})
    return rows


def _summary(ss: list[Sample]) -> dict:
    return {"mean": _mean(s.value for s in ss), "std": _sd(s.value for s in ss), "seeds": len(ss)}


# --------------------------------------------------------------------------------------------
# Rendering


def _fmt_arm(arm: dict, metric: str) -> str:
    m = arm[metric]
    if abs(m["mean"]) >= 1000:  # counts, such as trainable parameters
        return f"{m['mean']:,.0f}"
    return f"{m['mean']:.3f} ± {m['std']:.3f}" if m["seeds"] > 1 else f"{m['mean']:.3f}"


def _row_cells(fam: Family, r: dict) -> list[str]:
    if r["verdict"] == NOT_RUN:
        return [r["claim"], r["source"], f"{r['higher']} vs {r['lower']}", r["metric"], "", "**not run**", "0", r["why"]]
    if r["kind"] == "drop":
        more, less = r["drop"]
        arms = (f"{r['higher']} vs {r['lower']}: {more} {_fmt_arm(r['arms'][r['lower']], more)} -> "
                f"{_fmt_arm(r['arms'][r['higher']], more)}; {less} {_fmt_arm(r['arms'][r['lower']], less)} -> "
                f"{_fmt_arm(r['arms'][r['higher']], less)}")
        metric = f"relative drop of {more} minus that of {less}"
    else:
        extra = lambda arm: "".join(f"; {m} {_fmt_arm(r['arms'][arm], m)}" for m in r["arms"][arm] if m != r["metric"])
        arms = "; ".join(f"{a} {_fmt_arm(r['arms'][a], r['metric'])}{extra(a)}" for a in (r["higher"], r["lower"]))
        metric = r["metric"]
    claimed = f"> {r['by']:+g}" if r["by"] else "> 0"
    se_note = "" if r["se_items"] is not None else " (no per-problem record)"
    return [r["claim"], r["source"], arms, metric, f"{r['diff']:+.3f} ± {r['se']:.3f}{se_note} (claimed {claimed})",
            f"**{r['verdict']}**", f"{r['wall_s']:.0f}", r["why"] or ""]


def plot_family(fam: Family, rows: list[dict], path: Path) -> Path:
    """Each claim's lead in standard errors (clipped at ±12), coloured by verdict: right of +2 is
    reproduced, left of -2 contradicted. Claims in different units share one axis this way."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"reproduced": "tab:green", "inconclusive": "tab:gray", "contradicted": "tab:red"}
    rows = [r for r in rows if r["verdict"] in VERDICTS]
    fig, ax = plt.subplots(figsize=(10, 0.5 * len(rows) + 1.4))
    for y, r in enumerate(reversed(rows)):
        z = r["lead"] / r["se"] if r["se"] > 0 else math.copysign(12.0, r["lead"]) if r["lead"] else 0.0
        ax.plot(max(-12.0, min(12.0, z)), y, "o", color=colours[r["verdict"]], markersize=8)
    for x in (-Z, Z):
        ax.axvline(x, color="black", lw=0.8, ls="--")
    ax.axvline(0, color="black", lw=0.5)
    ax.set_xlim(-12.5, 12.5)
    ax.set_yticks(range(len(rows)), ["\n".join(textwrap.wrap(r["claim"], 60)) for r in reversed(rows)], fontsize=8)
    ax.set_xlabel("lead of the claimed direction in standard errors (clipped at ±12); dashed: ±2")
    ax.set_title(f"{fam.name}: green reproduced, grey inconclusive, red contradicted", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def render(out: Path, docs: Path) -> dict[str, list[dict]]:
    """Evaluate every family folder under `out` and write `docs/effects.md` and `docs/effects_<family>.png`."""
    from runner.report import markdown

    results = {}
    for fam_dir in sorted(p for p in out.iterdir() if (p / FAMILY_FILE).is_file()):
        fam = _claims_for(load_family(fam_dir / FAMILY_FILE))
        results[fam.name] = (fam, evaluate_family(fam, fam_dir))
    if not results:
        raise ConfigError(f"{out}: no family folders (with {FAMILY_FILE}) to render")
    summary = [[name, str(len(rows)), *(str(sum(r["verdict"] == v for r in rows)) for v in (*VERDICTS, NOT_RUN)),
                f"{_family_wall(fam, out / name) / 60:.1f} min"]
               for name, (fam, rows) in results.items()]
    lines = ["# The paper family's claims on the toy world", "",
             f"Generated by `python -m runner.effects` from `{out}` on {date.today().isoformat()}; do not edit by "
             "hand. Every arm of a family has the same budget on the shipped toy zoo; the claims, arms, metrics and "
             "budgets are in `conf/effects/<family>.yaml`, the rule below in `runner/effects.py`.", "",
             "**Verdict rule** (declared before anything ran). A claim reads \"A exceeds B by more than x\" (x = 0 "
             "unless the row says otherwise). lead = mean(A) - mean(B) - x, over seeds and test problems; "
             "SE = sqrt(SE_seeds² + SE_problems²), the standard error of the per-seed differences and that of the "
             "mean per-problem difference. **reproduced**: lead > 2 SE; **contradicted**: lead < -2 SE; "
             "**inconclusive** otherwise. Arms show mean ± std over seeds (a single value where the arm has no "
             "randomness).", "", "## Summary", "",
             markdown(["family", "claims", *VERDICTS, NOT_RUN, "wall time (all arms)"], summary)]
    header = ["claim", "source", "arms", "metric", "difference ± SE", "verdict", "wall s", "measured reason"]
    for name, (fam, rows) in results.items():
        figure = plot_family(fam, rows, docs / f"effects_{name}.png")
        lines += ["", f"## {name}", "", fam.description.strip(), "",
                  markdown(header, [_row_cells(fam, r) for r in rows]),
                  f"![{name} claims]({figure.name})"]
        (out / name / "effects.json").write_text(json.dumps(rows, indent=2, default=str))
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "effects.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[lines.index("## Summary"):lines.index("## Summary") + 3]))
    return {name: rows for name, (_, rows) in results.items()}


def _claims_for(ran: Family) -> Family:
    """The claims to read off a family's runs: today's conf/effects file when its arms, seeds and common
    overrides are the ones that ran (its claim texts and reasons may have been edited since), else the
    copy made when they ran."""
    current = CLAIMS_DIR / f"{ran.name}.yaml"
    if current.is_file():
        fam = load_family(current)
        shared = set(fam.arms) & set(ran.arms)  # an arm only in today's file shows as "not run"
        if (fam.seeds, fam.common) == (ran.seeds, ran.common) and all(fam.arms[a] == ran.arms[a] for a in shared):
            return fam
        log.warning("%s: conf/effects/%s.yaml has other arms than the runs; using the claims they ran with",
                    ran.name, ran.name)
    return ran


def _family_wall(fam: Family, fam_dir: Path) -> float:
    """Seconds the family's arms took, summed over their runs."""
    return sum(json.loads((d / "results.json").read_text())["timings"].get("total_s", 0.0)
               for arm in fam.arms for d in run_dirs(fam_dir / arm))


# --------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runner.effects", description=__doc__.splitlines()[0])
    parser.add_argument("--family", action="append", default=None, help=f"one of {', '.join(family_names())} (repeatable)")
    parser.add_argument("--out", type=Path, default=Path("outputs") / "effects" / date.today().isoformat())
    parser.add_argument("--docs", type=Path, default=REPO / "docs", help="where effects.md and the plots go")
    parser.add_argument("--render-only", action="store_true", help="run nothing; render what is under --out")
    parser.add_argument("extra", nargs="*", help="Hydra overrides added to every arm (e.g. hydra/launcher=joblib)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][effects] %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    names = args.family or family_names()
    unknown = [n for n in names if n not in family_names()]
    try:
        if unknown:
            raise ConfigError(f"--family: unknown {', '.join(unknown)}; families are {', '.join(family_names())}")
        families = [load_family(CLAIMS_DIR / f"{n}.yaml") for n in names]
        if not args.render_only:
            for fam in families:
                t0 = time.perf_counter()
                run_family(fam, args.out, fam.seeds, args.extra)
                log.info("family %s: %.1f min", fam.name, (time.perf_counter() - t0) / 60)
        render(args.out, args.docs)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
