"""The runner on a real pretrained model (SmolLM2-135M-Instruct, fp32, on the CPU): one report.

Measures, each recipe in its own `python -m runner` process (as a user runs it), on this machine:

1. SFT and KD training tokens/s (`recipe=sft` and `recipe=distill` with teacher = student = the model,
   lr 1e-5): one warm-up step, then a few measured ones; the steady rate comes from the per-step
   log (train_log.jsonl), the runner's own overall figure (warm-up included) is shown beside it.
2. Whole-model GPTQ time at 3 bits (a modest calibration) and RTN's for comparison.
3. Merge time and peak RSS: `python -m runner recipe=linear_merge` against mergekit's CLI
   (`mergekit-yaml`), linear at equal weights, on the model and its short-SFT copy (4); each tool in
   a fresh process, peak RSS from the kernel's rusage of that process (os.wait4). Then the engines
   alone, in-process, through the worker of bench/merge_vs_mergekit.py (its approach: VmHWM).
4. The toy tasks (eval=toy_quick), zero-shot with the model's chat template, before and after a short SFT.
5. Perplexity (exp of the mean token NLL, computed here, in-process) of the fp32 model and of RTN
   2/3/4/8-bit and GPTQ 3/4-bit checkpoints (GPTQ calibrated on the recipe's default toy chats, and
   at 3 bits also on English text), on two fixed held-out sets: the toy world's plain-text test
   problems (the text of the `toy_ppl` task) and a fixed set of English paragraphs (PROSE, below).

    python bench/real_model.py            # the full run (9.5 minutes on 2 idle cores)
    python bench/real_model.py --quick    # every stage, tiny sizes (a smoke test, 3 minutes; figures meaningless)
    python bench/real_model.py --render docs/real_model/results.json   # only rewrite the report from the numbers

The cores may be shared: before each timed run the script waits (up to --max-wait seconds) for other
processes to leave them idle, and every table says how many cores other processes kept busy meanwhile.

Writes docs/real_model/README.md (the report, also printed) and docs/real_model/results.json (raw
numbers), or --out DIR. Large files (checkpoints, run folders) go to a temp folder that is removed
at the end (--keep keeps it). Needs the `real` extra (the model) and, for the mergekit comparison,
the `bench` extra (mergekit); without mergekit that comparison is skipped and says so.
"""

from __future__ import annotations

import argparse
import glob
import itertools
import json
import math
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
MODEL = "smollm2-135m-instruct"
LR = 1e-5

SETTINGS = {
    "full": {
        "tp_batch": 2, "tp_len": 64, "tp_steps": 7,  # 1 warm-up + 6 measured steps
        "sft_steps": 60, "sft_batch": 4, "sft_len": 64, "eval_limit": 100,
        "rtn_bits": [2, 3, 4, 8], "gptq_bits": [3, 4], "gptq_text_bits": [3],
        "calib_samples": 32, "calib_seqlen": 128, "calib_batch": 8,
        "toy_ppl_tokens": 2400, "prose_paragraphs": None, "ppl_window": 512,
        "merge_repeat": 3, "engine_repeat": 1, "max_wait": 90, "wait_budget": 360,
    },
    "quick": {
        "tp_batch": 2, "tp_len": 64, "tp_steps": 3,
        "sft_steps": 4, "sft_batch": 4, "sft_len": 64, "eval_limit": 8,
        "rtn_bits": [3, 8], "gptq_bits": [3], "gptq_text_bits": [3],
        "calib_samples": 4, "calib_seqlen": 64, "calib_batch": 4,
        "toy_ppl_tokens": 300, "prose_paragraphs": 2, "ppl_window": 512,
        "merge_repeat": 1, "engine_repeat": 1, "max_wait": 0, "wait_budget": 0,
    },
}

# The English held-out set: paragraphs written for this benchmark (so no model has seen them), on
# everyday, encyclopedic topics. Fixed text, so the set is the same on every run and machine.
PROSE = [
    "The town library opens at nine in the morning and closes at six in the evening, except on Sundays, "
    "when it stays shut. Most visitors come for the newspapers and the free internet terminals, but the "
    "reading room on the second floor is usually full of students preparing for exams. Last year the "
    "library added a small collection of board games that can be borrowed for a week, and the librarians "
    "say these are now more popular than the audiobooks.",
    "Bread dough rises because yeast feeds on the sugars in the flour and releases carbon dioxide. The gas "
    "is trapped by a network of gluten proteins, which stretch as the dough is kneaded. A warm kitchen "
    "speeds the process up, while a cold one slows it down, which is why some bakers leave their dough in "
    "the refrigerator overnight. The slower rise gives the yeast more time to produce the flavours that "
    "make a loaf taste rich rather than flat.",
    "When the river flooded in the spring, the water reached the steps of the old mill for the first time "
    "in forty years. Farmers moved their animals to higher fields, and the school was closed for three "
    "days. After the water went down, volunteers cleared mud from the streets and the council repaired "
    "the bridge that had been damaged by floating trees. Engineers later proposed building a low wall "
    "along the bank, but the plan is still being discussed.",
    "A computer stores numbers in binary, using only the digits zero and one. Each digit is called a bit, "
    "and eight bits make a byte. Larger numbers need more bits: with sixteen bits a computer can count "
    "from zero to a little over sixty-five thousand. Fractions are harder to represent exactly, so most "
    "programs use a format called floating point, which keeps a fixed number of significant digits and "
    "an exponent that says where the decimal point belongs.",
    "Honeybees communicate the location of flowers through a movement known as the waggle dance. A bee "
    "that has found a good source of nectar returns to the hive and walks in a figure-eight pattern, "
    "shaking its body during the straight part of the run. The angle of that run shows the direction of "
    "the flowers relative to the sun, and its length tells the other bees roughly how far they will have "
    "to fly.",
    "The first trains ran on wooden rails and were pulled by horses. Iron rails came later, followed by "
    "steam engines that could haul far heavier loads over long distances. Within a few decades, railways "
    "had changed how people lived: fresh food could reach cities from distant farms, newspapers arrived "
    "on the morning they were printed, and ordinary families could travel to the seaside for a day. "
    "Clocks across a whole country were set to the same time so that timetables made sense.",
    "To plant a tree, dig a hole about twice as wide as the root ball but no deeper. Loosen the soil at "
    "the sides so that the roots can spread, set the tree in place and fill the hole with the soil you "
    "removed. Water it well, even if rain is expected, and add a layer of mulch around the base, keeping "
    "it away from the trunk. For the first summer, the tree will need water every week when the weather "
    "is dry.",
    "Sound travels through the air as a wave of pressure. When a guitar string vibrates, it pushes the "
    "air around it back and forth, and those small changes in pressure reach our ears. A string that "
    "vibrates quickly produces a high note, while a slow vibration gives a low one. The body of the "
    "guitar makes the sound louder by moving a larger amount of air, which is why an electric guitar "
    "played without an amplifier is so quiet.",
    "Maria had worked at the small bakery for six years before the owner decided to retire. She had "
    "saved some money, her brother offered to lend her the rest, and after many evenings spent with a "
    "calculator she made an offer. The first months were difficult: an oven broke, two employees left, "
    "and the rent went up. By the end of the year, however, the shop had more customers than ever, "
    "mostly because of her cinnamon rolls.",
    "Glaciers form where more snow falls in winter than melts in summer. Over many years the snow is "
    "pressed into dense ice, which becomes so heavy that it begins to flow slowly downhill under its "
    "own weight. As a glacier moves, it scrapes the rock beneath it and carries stones and gravel along. "
    "Many valleys in mountain regions owe their wide, rounded shape to glaciers that filled them during "
    "the last ice age.",
    "Good passwords are long and hard to guess. A short word from the dictionary can be found by a "
    "computer in seconds, even if a few letters are replaced by numbers. A sentence of four or five "
    "unrelated words is both easier to remember and much harder to crack. It also helps to use a "
    "different password for every account, so that a leak from one website does not give strangers "
    "access to your email or your bank.",
    "The market square fills up early on Saturday mornings. Farmers arrive before dawn to set up their "
    "stalls, and by eight o'clock the air smells of coffee, fresh bread and strawberries. Some traders "
    "have sold vegetables in the same spot for thirty years and know their regular customers by name. "
    "In the afternoon, when the crowds thin out, prices drop and the last boxes of fruit are sold cheaply "
    "before the square is cleaned.",
]

NOTE_Q41 = ("The model's weights come from a 4-bit Q4_1 GGUF (blocks of 32 weights, 16 levels each, a float "
            "scale and minimum per block), dequantized to fp32.")


# --------------------------------------------------------------------------------------------------
# running things and measuring them


def cpu_ticks() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, all cores together (/proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(fields) - fields[3] - fields[4]) / hz, sum(fields) / hz


def our_cpu_s() -> float:
    """CPU seconds used by this process and its waited-for children."""
    import resource

    return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                   resource.getrusage(resource.RUSAGE_CHILDREN)))


def busy_cores(seconds: float = 3.0) -> float:
    """CPU cores busy over `seconds`, all processes together (call it while this process idles)."""
    b0, t0 = cpu_ticks()
    time.sleep(seconds)
    b1, t1 = cpu_ticks()
    return (os.cpu_count() or 1) * (b1 - b0) / max(1e-9, t1 - t0)


WAIT = {"per_call": 0.0, "left": 0.0, "total": 0.0}  # seconds to wait for idle cores before a timed run; the run's budget for it


def wait_idle() -> dict:
    """Before a timed run: wait (up to WAIT's limits) until other processes keep under 0.3 cores busy."""
    if WAIT["per_call"] <= 0 or WAIT["left"] <= 0:
        return {"waited_s": 0.0}
    start, limit = time.perf_counter(), min(WAIT["per_call"], WAIT["left"])
    while (busy := busy_cores()) > 0.3 and time.perf_counter() - start < limit:
        print(f"   other processes keep {busy:.1f} cores busy; waiting", flush=True)
        time.sleep(7)
    waited = time.perf_counter() - start
    WAIT["left"] -= waited
    WAIT["total"] += waited
    return {"waited_s": round(waited, 1), "busy_cores_before": round(busy, 2)}


class Others:
    """How many cores other processes kept busy on average during a block: the machine's busy CPU
    time (/proc/stat) less this process's and its children's, over the wall time; 0 = ours alone."""

    def __enter__(self):
        self.t, self.ticks, self.ours = time.perf_counter(), cpu_ticks()[0], our_cpu_s()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t
        self.cores = max(0.0, (cpu_ticks()[0] - self.ticks) - (our_cpu_s() - self.ours)) / max(1e-9, self.wall)
        return False


class Stage(Others):
    """A block of the benchmark: its wall time and the other processes' cores meanwhile, into `log`."""

    def __init__(self, name: str, log: dict):
        self.name, self.log = name, log

    def __enter__(self):
        print(f"\n== {self.name} ({time.strftime('%H:%M:%S')}, load {os.getloadavg()[0]:.2f})", flush=True)
        self.waited = WAIT["total"]
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self.log[self.name] = {"wall_s": round(self.wall, 1), "others_cores": round(self.cores, 2),
                               "waited_s": round(WAIT["total"] - self.waited, 1)}
        print(f"   {self.name}: {self.wall:.0f} s; other processes kept {self.cores:.2f} cores busy meanwhile", flush=True)
        return False


def measure(cmd: list[str], log_path: Path, cwd: Path = ROOT, timed: bool = False) -> dict:
    """Run `cmd` in its own process; its wall time, its peak RSS (the kernel's rusage of that process,
    via wait4: the largest resident set it reached, imports included), exit code and the cores other
    processes kept busy meanwhile. `timed`: wait for idle cores first (wait_idle)."""
    waited = wait_idle() if timed else {}
    with open(log_path, "w") as log, Others() as others:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"seconds": seconds, "peak_mb": usage.ru_maxrss / 1024, "rc": proc.returncode,
            "others_cores": round(others.cores, 2), **waited}


def tail(path: Path, n: int = 25) -> str:
    lines = path.read_text(errors="replace").splitlines()
    return "\n".join(line[:300] for line in lines[-n:])


def shown(cmd: list[str], work: Path) -> str:
    """The command as a user would type it (the venv's python as `python`, the temp folder as $TMP)."""
    text = shlex.join(["python", *cmd[1:]]) if cmd[0] == sys.executable else shlex.join(cmd)
    return text.replace(str(work), "$TMP")


def runner_job(label: str, overrides: list[str], work: Path, timed: bool = False) -> dict:
    """`python -m runner <overrides>` in its own output_root; its record, wall time, peak RSS and command."""
    out = work / "runs" / label
    cmd = [sys.executable, "-m", "runner", *overrides, f"output_root={out}"]
    print(f"   $ {shown(cmd, work)}", flush=True)
    m = measure(cmd, work / f"{label}.log", timed=timed)
    found = sorted(glob.glob(str(out / "runs" / "*" / "*" / "results.json")))
    record = json.loads(Path(found[-1]).read_text()) if found else None
    job = {"label": label, "command": shown(cmd, work), **m, "record": record,
           "run_dir": str(Path(found[-1]).parent) if found else None}
    if m["rc"] != 0 or record is None or record.get("status") != "completed":
        job["error"] = (record or {}).get("error") or tail(work / f"{label}.log")
        print(f"   FAILED (exit {m['rc']}): {job['error'][-1500:]}", flush=True)
    else:
        print(f"   done in {m['seconds']:.0f} s, peak RSS {m['peak_mb']:.0f} MB, other processes' cores "
              f"{m['others_cores']:.2f}", flush=True)
    return job


def log_times(run_dir: str) -> list[tuple[float, str]]:
    """(seconds since the first line, message) of each line of a run's runner.log."""
    rows = []
    for line in (Path(run_dir) / "runner.log").read_text(errors="replace").splitlines():
        m = re.match(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]\[[^\]]*\]\[\w+\] - (.*)", line)
        if m:
            rows.append((datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").timestamp(), m[2]))
    return [(t - rows[0][0], msg) for t, msg in rows] if rows else []


def when(rows: list[tuple[float, str]], prefix: str) -> float | None:
    return next((t for t, msg in rows if msg.startswith(prefix)), None)


# --------------------------------------------------------------------------------------------------
# 1. training throughput


def throughput(kind: str, s: dict, work: Path) -> dict:
    common = [f"train.steps={s['tp_steps']}", f"train.batch_size={s['tp_batch']}", f"data.max_length={s['tp_len']}",
              "data.num_examples=500", f"train.lr={LR}", "train.lr_scheduler=constant", "train.warmup_ratio=0",
              "train.save_every=0", "train.log_every=1", "save_checkpoint=false", "eval=none"]
    if kind == "sft":
        overrides = ["recipe=sft", f"model={MODEL}", *common]
    else:
        overrides = ["recipe=distill", f"model@teacher={MODEL}", f"model@student={MODEL}", *common]
    job = runner_job(f"throughput-{kind}", overrides, work, timed=True)
    if "error" in job:
        return job
    train = job["record"]["train"]
    steps, tokens = train["steps"], train["tokens"]
    per_step = tokens / steps
    job["tokens_per_step"] = per_step
    job["constant_tokens_per_step"] = tokens == steps * s["tp_batch"] * s["tp_len"]
    log = [json.loads(line) for line in (Path(job["run_dir"]) / "train_log.jsonl").read_text().splitlines()]
    # the loop logs the cumulative rate; with packed rows every step has the same token count, so the
    # time at step k is k * tokens_per_step / rate_k
    elapsed = [r["step"] * per_step / r["tokens_per_s"] for r in log]
    step_s = [b - a for a, b in itertools.pairwise(elapsed)]
    job.update(warmup_step_s=elapsed[0], step_s=step_s,
               steady_tokens_per_s=per_step * len(step_s) / (elapsed[-1] - elapsed[0]),
               median_step_s=statistics.median(step_s), fastest_step_s=min(step_s),
               overall_tokens_per_s=train["tokens_per_s"],
               final_loss=train["final_loss"], logged=log[-1])
    print(f"   {kind}: warm-up step {elapsed[0]:.2f} s, then {job['steady_tokens_per_s']:.1f} tokens/s "
          f"(median step {job['median_step_s']:.2f} s)", flush=True)
    return job


# --------------------------------------------------------------------------------------------------
# 5. perplexity


def toy_ppl_docs(target_tokens: int, tokenizer) -> tuple[list[str], str]:
    """The text of the toy_ppl task (easy then hard test problems, worked), 25 problems per document
    joined by newlines (one problem alone gives a real model no context), as many documents as reach
    `target_tokens`."""
    from runner.toy.tasks import TaskSpec, render, test_problems

    spec = TaskSpec()
    lines = [render(p, "plain")["text"] for p in test_problems(spec, "easy") + test_problems(spec, "hard")]
    # alternate easy and hard documents so that a prefix of the set holds both kinds
    easy = [lines[i:i + 25] for i in range(0, len(lines) // 2, 25)]
    hard = [lines[i:i + 25] for i in range(len(lines) // 2, len(lines), 25)]
    docs, tokens = [], 0
    for chunk in [c for pair in zip(easy, hard) for c in pair]:
        if tokens >= target_tokens:
            break
        docs.append("\n".join(chunk))
        tokens += len(tokenizer(docs[-1]).input_ids)
    return docs, f"{len(docs)} documents of 25 problems each, e.g. {lines[0]!r}, {lines[len(lines) // 2]!r}"


CALIB_MODULES = ("argparse", "subprocess", "logging", "json", "collections", "textwrap", "unittest", "doctest", "pickle",
                 "tarfile", "zipfile", "decimal", "statistics", "random", "functools", "itertools", "pathlib", "shutil",
                 "tempfile", "threading", "socket", "csv", "sqlite3", "datetime", "heapq", "string", "inspect",
                 "asyncio", "typing", "dataclasses", "enum", "contextlib", "warnings", "codecs", "io")


def calibration_text(path: Path, tokenizer, target_tokens: int) -> dict:
    """A JSONL calibration set of English text (for `data=jsonl`), disjoint from the held-out sets:
    the prose paragraphs (200+ characters, no doctest, nearly all letters) of the docstrings of some
    standard-library modules and their public classes and functions, in a fixed order, until
    `target_tokens`. Fixed for a given Python version."""
    import importlib
    import inspect

    def paragraphs():
        for name in CALIB_MODULES:
            mod = importlib.import_module(name)
            objs = [mod] + [o for n, o in sorted(vars(mod).items()) if not n.startswith("_")
                            and (inspect.isclass(o) or inspect.isfunction(o)) and getattr(o, "__module__", None) == name]
            for obj in objs:
                for para in (inspect.getdoc(obj) or "").split("\n\n"):
                    text = " ".join(para.split())
                    if len(text) >= 200 and ">>>" not in para and \
                            sum(c.isalpha() or c.isspace() for c in text) >= 0.9 * len(text):
                        yield text

    records, tokens = [], 0
    for text in paragraphs():
        records.append({"text": text})
        tokens += len(tokenizer(text).input_ids)
        if tokens >= target_tokens:
            break
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"records": len(records), "tokens": tokens, "first": records[0]["text"][:90] if records else ""}


def perplexity(folder: str, docs: list[str], window: int) -> dict:
    """exp(mean NLL) over every token of every document, each document preceded by <|endoftext|>
    (the pretraining document separator) so that its first token is scored too; documents longer
    than `window` go in consecutive windows (no overlap)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    start_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    if start_id is None:
        start_id = tokenizer.eos_token_id
    nll, count = 0.0, 0
    with torch.inference_mode():
        for doc in docs:
            ids = [start_id] + tokenizer(doc, add_special_tokens=False).input_ids
            for i in range(0, len(ids) - 1, window):
                chunk = torch.tensor([ids[i:i + window + 1]])
                logits = model(chunk[:, :-1]).logits.float()
                loss = torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum")
                nll, count = nll + float(loss), count + chunk.shape[1] - 1
    del model
    return {"ppl": math.exp(nll / count), "nll": nll / count, "tokens": count}


# --------------------------------------------------------------------------------------------------
# 3. merge


def merge_cli(a: str, b: str, s: dict, work: Path) -> dict:
    """linear, equal weights: the runner's CLI and mergekit-yaml, alternating, `merge_repeat` times each."""
    def ours_cmd(out):
        return [sys.executable, "-m", "runner", "recipe=linear_merge", f"models=[{{path: {a}}},{{path: {b}}}]",
                "merge.weights=[0.5,0.5]", "eval=none", f"output_root={out}"]

    spec = work / "mergekit.yml"
    spec.write_text(json.dumps({"merge_method": "linear", "dtype": "float32", "out_dtype": "float32",
                                "models": [{"model": a, "parameters": {"weight": 0.5}},
                                           {"model": b, "parameters": {"weight": 0.5}}]}, indent=2))
    mk = shutil.which("mergekit-yaml") or str(Path(sys.executable).parent / "mergekit-yaml")

    def theirs_cmd(out):
        return [mk, "--quiet", str(spec), str(out)]

    runs = {"ours": [], "mergekit": []}
    result = {"ours_command": shown(ours_cmd(work / "merge-ours"), work),
              "mergekit_command": shown(theirs_cmd(work / "merge-mk"), work).replace(mk, "mergekit-yaml"),
              "mergekit_config": json.loads(spec.read_text())}
    for i in range(s["merge_repeat"]):
        for tool, make in (("ours", ours_cmd), ("mergekit", theirs_cmd)):
            out = work / f"merge-{tool}"
            shutil.rmtree(out, ignore_errors=True)
            os.sync()  # the previous run's dirty pages are not charged to this one
            m = measure(make(out), work / f"merge-{tool}-{i}.log", timed=True)
            if m["rc"] != 0:
                result["error"] = f"{tool} failed (exit {m['rc']}):\n{tail(work / f'merge-{tool}-{i}.log')}"
                print(f"   {result['error']}", flush=True)
                return result
            if tool == "ours":
                found = sorted(glob.glob(str(out / "runs" / "*" / "*" / "results.json")))
                rec = json.loads(Path(found[-1]).read_text())
                m["recipe_s"] = rec["timings"].get("recipe_s")
                m["output"] = rec["checkpoint"]
            else:
                m["output"] = str(out)
            runs[tool].append(m)
            print(f"   {tool} #{i + 1}: {m['seconds']:.1f} s, peak RSS {m['peak_mb']:.0f} MB", flush=True)
    for tool in runs:
        result[tool] = {k: statistics.median(r[k] for r in runs[tool]) for k in ("seconds", "peak_mb")}
        result[tool]["runs"] = runs[tool]
    result["ours"]["recipe_s"] = statistics.median(r["recipe_s"] for r in runs["ours"])
    result["ours_shards"] = len(list(Path(runs["ours"][-1]["output"]).glob("*.safetensors")))
    result["mergekit_shards"] = len(list(Path(runs["mergekit"][-1]["output"]).glob("*.safetensors")))
    from merge_vs_mergekit import compare

    try:
        largest, differing, total = compare(Path(runs["ours"][-1]["output"]), Path(runs["mergekit"][-1]["output"]))
        result["max_abs_diff"], result["differing"], result["entries"] = largest, differing, total
    except SystemExit as exc:  # compare() exits when the outputs hold different tensors
        result["compare_error"] = str(exc)
    for tool in runs:
        shutil.rmtree(work / f"merge-{tool}", ignore_errors=True)
    return result


def merge_engines(a: str, b: str, s: dict, work: Path) -> dict:
    """The engines alone, in-process, through bench/merge_vs_mergekit.py's worker (`_once`: a fresh
    process per figure, seconds of the merge call, VmHWM peak and the peak above the imports)."""
    import merge_vs_mergekit as mvm

    paths = {"base": a, "a": a, "b": b}
    out = {"weights": list(mvm.WEIGHTS), "shard": mvm.SHARD}
    for tool in ("ours", "mergekit"):
        runs = []
        for _ in range(s["engine_repeat"]):
            try:
                runs.append(mvm._once(tool, "linear", paths, work / f"engine-{tool}"))
            except SystemExit as exc:
                out["error"] = str(exc)[-2000:]
                return out
        out[tool] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        shutil.rmtree(work / f"engine-{tool}", ignore_errors=True)
    return out


# --------------------------------------------------------------------------------------------------
# the report


def fmt(x, spec=".3f", missing="—"):
    return missing if x is None else format(x, spec)


def metric(metrics: dict | None, task: str, name: str):
    if not metrics:
        return None
    for k, v in metrics.items():
        if k.split("/")[0] == task and k.split("/")[1].split(",")[0] == name:
            return v
    return None


def report(res: dict) -> str:
    s, env = res["settings"], res["environment"]
    out = [f"# The runner on a real model: {MODEL} on the CPU", "",
           f"Produced by `{res['command']}` on {res['finished'][:10]} in {res['total_s'] / 60:.1f} minutes "
           f"({'--quick: tiny sizes, figures meaningless' if res['quick'] else 'the full run'}).", "",
           f"**Machine**: {env['nproc']} CPU cores ({env['cpu']}), {env['mem_gb']:.0f} GB RAM, torch {env['torch']}, "
           f"transformers {env['transformers']}, Python {env['python']}, {torch_threads(env)}. "
           f"**Model**: {env['model']['about']} ({env['model']['params'] / 1e6:.1f}M parameters, {env['model']['layers']} layers, "
           f"hidden {env['model']['hidden']}, vocabulary {env['model']['vocab']}, tied embeddings), from `{env['model']['folder_name']}`. "
           f"{NOTE_Q41}", "",
           f"**Contention**: the machine's {env['nproc']} cores are shared with other work. Before each timed run "
           f"(throughput, quantization, merge) the script waits up to {s['max_wait']:.0f} s ({s['wait_budget']:.0f} s in all) "
           "for other processes to leave the cores idle (under 0.3 cores busy). \"Other processes' cores\" is how many "
           "cores other processes kept busy on average during a run or stage (the machine's busy time from /proc/stat "
           "less this benchmark's own; 0 = the cores were ours; the stage figures include the waits). Per stage:", "",
           "| stage | wall s | other processes' cores | waited s |", "|---|---|---|---|"]
    out += [f"| {k} | {v['wall_s']:.0f} | {v['others_cores']:.2f} | {v['waited_s']:.0f} |" for k, v in res["stages"].items()]
    out += [""]

    # 1. throughput
    out += ["## 1. Training throughput (SFT and KD)", "",
            f"Batch {s['tp_batch']} x {s['tp_len']} tokens (packed rows of toy instruct chats in the model's chat template), "
            f"lr {LR} constant, AdamW, fp32, {s['tp_steps']} steps: 1 warm-up, {s['tp_steps'] - 1} measured. "
            "KD: `recipe=distill` (forward KL on the full 49,152-token vocabulary), teacher = student = the model. "
            f"Each step holds {s['tp_batch'] * s['tp_len']} tokens. Steady tokens/s: tokens of the measured steps / their time "
            "(from the per-step log); "
            "overall: the run's `results.json` figure, warm-up step included.", "",
            "| recipe | warm-up step s | median step s | fastest step s | steady tokens/s | overall tokens/s | process peak RSS MB | final loss | other processes' cores |",
            "|---|---|---|---|---|---|---|---|---|"]
    for kind in ("sft", "kd"):
        j = res["throughput"].get(kind, {})
        if "error" in j or not j:
            out.append(f"| {kind} | failed: {j.get('error', 'not run')[:200]!s} | | | | | | | |")
            continue
        out.append(f"| {kind} | {j['warmup_step_s']:.2f} | {j['median_step_s']:.2f} | {j['fastest_step_s']:.2f} | "
                   f"{j['steady_tokens_per_s']:.1f} | "
                   f"{j['overall_tokens_per_s']:.1f} | {j['peak_mb']:.0f} | {j['final_loss']:.4f} | {j['others_cores']:.2f} |")
    sft, kd = res["throughput"].get("sft", {}), res["throughput"].get("kd", {})
    if "steady_tokens_per_s" in sft and "steady_tokens_per_s" in kd:
        out += ["", f"KD / SFT step time: {kd['median_step_s'] / sft['median_step_s']:.2f} (median steps). "
                f"Per-step seconds, SFT: {', '.join(f'{x:.2f}' for x in sft['step_s'])}; "
                f"KD: {', '.join(f'{x:.2f}' for x in kd['step_s'])}."]
    out += ["", "Commands:", "", "```"] + [res["throughput"][k]["command"] for k in ("sft", "kd") if k in res["throughput"]] + ["```", ""]

    # 4. eval before / after sft
    e = res.get("sft_eval", {})
    out += ["## 2. Toy tasks zero-shot, before and after a short SFT", ""]
    if "error" in e:
        out += [f"Failed: `{e['command']}`", "", "```", e["error"][-2000:], "```", ""]
    elif e:
        rec, tr = e["record"], e["record"]["train"]
        out += [f"`eval=toy_quick eval.limit={s['eval_limit']}`: toy_arith (easy) and toy_arith_hard, {s['eval_limit']} test "
                "problems each, greedy generation, exact match on the final integer, prompts in the model's chat "
                "template (ChatML, its default system prompt), no few-shot examples. "
                f"SFT: {tr['steps']} steps, batch {s['sft_batch']} x {s['sft_len']} tokens packed, lr {LR} "
                f"({rec['config']['train']['lr_scheduler']} schedule, warm-up ratio {rec['config']['train']['warmup_ratio']}, "
                f"the sft recipe's), {tr['tokens']} training tokens in {tr['wall_s']:.0f} s "
                f"({tr['tokens_per_s']:.0f} tokens/s), final loss {tr['final_loss']:.3f}.", "",
                "| model | easy exact match | hard exact match | easy mean response tokens | hard mean response tokens |",
                "|---|---|---|---|---|"]
        for label, m in (("the model (zero-shot)", rec.get("baseline_metrics")), (f"after {tr['steps']} SFT steps", rec.get("metrics"))):
            out.append(f"| {label} | {fmt(metric(m, 'toy_arith', 'exact_match'))} | {fmt(metric(m, 'toy_arith_hard', 'exact_match'))} | "
                       f"{fmt(metric(m, 'toy_arith', 'response_tokens'), '.1f')} | {fmt(metric(m, 'toy_arith_hard', 'response_tokens'), '.1f')} |")
        t = rec["timings"]
        out += ["", f"Times: baseline eval {fmt(t.get('baseline_eval_s'), '.0f')} s, training {tr['wall_s']:.0f} s, "
                f"final eval {fmt(t.get('eval_s'), '.0f')} s; process {e['seconds']:.0f} s, peak RSS {e['peak_mb']:.0f} MB, "
                f"other processes' cores {e['others_cores']:.2f}.", ""]
        if e.get("samples"):
            out += ["Sample answers (first easy problem): " + "; ".join(f"{k}: `{v}`" for k, v in e["samples"].items()), ""]
        out += ["```", e["command"], "```", ""]

    # 2. + 5. quantization
    q = res.get("quant", {})
    out += ["## 3. Quantization: time and held-out perplexity against bits", "",
            f"Weight-only fake quantization of the 210 decoder linears (q/k/v/o/gate/up/down of 30 layers; embeddings, "
            f"hence the tied lm_head, stay fp32), asymmetric integer grid, group size 32 (the quantize recipe's default; "
            f"576 is not a multiple of 128). GPTQ: {s['calib_samples']} calibration rows of {s['calib_seqlen']} tokens "
            f"(`quant.calib_samples={s['calib_samples']} quant.calib_seqlen={s['calib_seqlen']} quant.calib_batch_size={s['calib_batch']}`) "
            "packed from the recipe's default data (toy instruct chats; ChatML with the default system prompt), or, in the "
            "row marked English-text calibration, from a JSONL of English text (`data=jsonl data.path=$TMP/calib_text.jsonl`: "
            f"{res.get('calib_text', {}).get('records')} prose paragraphs of Python standard-library docstrings, "
            f"{res.get('calib_text', {}).get('tokens')} tokens, built by `calibration_text()`, disjoint from both held-out sets); "
            "damp 0.01, block 128, no act-order. "
            "Perplexity = exp(mean token NLL), computed in-process on each run's `checkpoint/`, every token scored, "
            "each document preceded by `<|endoftext|>`.", "",
            "Held-out sets:", "",
            f"- **toy**: the plain-text test problems of the toy world, i.e. the text of the `toy_ppl` task "
            f"({res['ppl_sets']['toy']['about']}; {res['ppl_sets']['toy']['tokens']} tokens).",
            f"- **prose**: {res['ppl_sets']['prose']['about']} ({res['ppl_sets']['prose']['tokens']} tokens).", "",
            "| checkpoint | code bits | effective bits | rel. weight error | toy ppl | prose ppl | quantize s | process s | peak RSS MB | other processes' cores |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    ref = res.get("ppl_fp32", {})
    out.append(f"| fp32 (reference) | 32 | 32 | 0 | {fmt(ref.get('toy', {}).get('ppl'), '.3f')} | "
               f"{fmt(ref.get('prose', {}).get('ppl'), '.3f')} | | | | |")
    for label, j in q.items():
        if "error" in j:
            out.append(f"| {label} | failed | | | | | | | | |")
            continue
        st = j["record"]["metrics"]
        out.append(f"| {label} | {st['quant/code_bits']:.0f} | {st['quant/effective_bits']:.3f} | {st['quant/weight_error']:.4f} | "
                   f"{fmt(j['ppl'].get('toy', {}).get('ppl'), '.3f')} | {fmt(j['ppl'].get('prose', {}).get('ppl'), '.3f')} | "
                   f"{fmt(j.get('quantize_s'), '.1f')} | {j['seconds']:.0f} | {j['peak_mb']:.0f} | {j['others_cores']:.2f} |")
    out += ["", "quantize s: from the log line `loading model` to the line `quantized 210 modules` (model load included, "
            "about " + fmt(res.get("load_s"), ".1f") + " s of it; for GPTQ this is loading, calibration forward passes and the "
            "column-wise solve); process s: the whole `python -m runner` process (imports, load, quantize, checkpoint write)."]
    gp = [j for j in q.values() if "calib_gptq_s" in j]
    if gp:
        out += ["GPTQ alone (from the log line `gptq: N calibration rows` to `quantized`): "
                + ", ".join(f"{k} {j['calib_gptq_s']:.1f} s" for k, j in q.items() if j in gp) + "."]
    seen, cmds = set(), []
    for j in q.values():  # one command per kind of run (the bits as in the table)
        kind = re.sub(r"quant\.bits=\d+", "", j["command"])
        if kind not in seen:
            seen.add(kind)
            cmds.append(j["command"])
    out += ["", "Commands (other bits: `quant.bits` as in the table):", "", "```", *cmds, "```", ""]
    failed = [(k, j) for k, j in q.items() if "error" in j]
    for k, j in failed:
        out += [f"{k} failed: `{j['command']}`", "", "```", j["error"][-1500:], "```", ""]

    # 3. merge
    mg = res.get("merge", {})
    out += ["## 4. Merge: the runner against mergekit", ""]
    if mg.get("skipped"):
        out += [f"Skipped: {mg['skipped']}", ""]
    elif mg:
        cli = mg.get("cli", {})
        out += [f"Linear merge at equal weights (0.5, 0.5) of the model and its short-SFT copy (section 2), fp32 in and out, "
                f"each {mg['input_mb']:.0f} MB of safetensors. Each tool is run as a user runs it, in a fresh process, "
                f"{s['merge_repeat']} alternating runs each (medians shown), the page cache synced before each; "
                "peak RSS is the process's own (kernel rusage via wait4), imports included. Both read the inputs "
                "memory-mapped, so pages of the inputs they touch count in RSS.", ""]
        if "error" in cli:
            out += ["```", cli["error"], "```", ""]
        elif cli:
            out += ["| tool | wall s (process) | peak RSS MB | output shards |", "|---|---|---|---|",
                    f"| runner `recipe=linear_merge` | {cli['ours']['seconds']:.1f} (merge recipe alone: {cli['ours']['recipe_s']:.1f}) | "
                    f"{cli['ours']['peak_mb']:.0f} | {cli['ours_shards']} |",
                    f"| `mergekit-yaml` | {cli['mergekit']['seconds']:.1f} | {cli['mergekit']['peak_mb']:.0f} | {cli['mergekit_shards']} |",
                    "", f"Ratios runner / mergekit: time {cli['ours']['seconds'] / cli['mergekit']['seconds']:.2f}, "
                    f"peak RSS {cli['ours']['peak_mb'] / cli['mergekit']['peak_mb']:.2f}. "
                    + (f"Largest |difference| between the two outputs: {cli['max_abs_diff']:.2e} "
                       f"({cli['differing']} of {cli['entries']} entries differ by more than 1e-6)."
                       if "max_abs_diff" in cli else f"Outputs not comparable: {cli.get('compare_error')}"),
                    "", "Per run (s / MB / other processes' cores): runner "
                    + ", ".join(f"{r['seconds']:.1f}/{r['peak_mb']:.0f}/{r['others_cores']:.2f}" for r in cli["ours"]["runs"])
                    + "; mergekit " + ", ".join(f"{r['seconds']:.1f}/{r['peak_mb']:.0f}/{r['others_cores']:.2f}"
                                                for r in cli["mergekit"]["runs"]) + ".",
                    "", "```", cli["ours_command"], cli["mergekit_command"], "```", "",
                    "mergekit config (`$TMP/mergekit.yml`):", "", "```json", json.dumps(cli["mergekit_config"], indent=2).replace(res["work"], "$TMP"), "```", ""]
        en = mg.get("engines", {})
        if "error" in en:
            out += ["Engines alone: failed:", "", "```", en["error"], "```", ""]
        elif en:
            o, t = en["ours"], en["mergekit"]
            out += [f"The engines alone (`bench/merge_vs_mergekit.py`'s worker: `recipes.merge.engine.merge_models` against "
                    f"mergekit's `run_merge` in-process, each in a fresh process; its fixed weights {tuple(en['weights'])} and "
                    f"{en['shard']} output shards; seconds of the merge call alone, VmHWM peak, and the peak above the RSS after imports; "
                    f"{s['engine_repeat']} run(s) each):", "",
                    "| engine | merge s | peak RSS MB | above imports MB |", "|---|---|---|---|",
                    f"| runner | {o['seconds']:.2f} | {o['peak_mb']:.0f} | {o['above_imports_mb']:.0f} |",
                    f"| mergekit | {t['seconds']:.2f} | {t['peak_mb']:.0f} | {t['above_imports_mb']:.0f} |", ""]

    out += ["## Notes", ""] + [f"- {n}" for n in res["notes"]] + [""]
    return "\n".join(out)


def torch_threads(env: dict) -> str:
    return f"{env['torch_threads']} torch threads"


# --------------------------------------------------------------------------------------------------


def environment(folder: str) -> dict:
    import torch
    import transformers

    cfg = json.loads((Path(folder) / "config.json").read_text())
    from safetensors import safe_open

    params = 0
    for f in Path(folder).glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                params += math.prod(h.get_slice(k).get_shape())
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown CPU")
    mem = next((int(line.split()[1]) / 2**20 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), 0.0)
    from runner.packaged_models import MODELS

    return {"nproc": os.cpu_count(), "cpu": cpu, "mem_gb": mem, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "torch_threads": torch.get_num_threads(),
            "model": {"name": MODEL, "about": MODELS[MODEL].about, "folder_name": Path(folder).name, "params": params,
                      "layers": cfg["num_hidden_layers"], "hidden": cfg["hidden_size"], "vocab": cfg["vocab_size"]}}


def mergekit_available() -> str | None:
    """None when mergekit-yaml is there, else why not."""
    try:
        import mergekit  # noqa: F401
    except ImportError:
        return ("mergekit is not installed (the `bench` extra): `pip install -c requirements.lock mergekit`, "
                "then check that torch is unchanged")
    if not (shutil.which("mergekit-yaml") or (Path(sys.executable).parent / "mergekit-yaml").exists()):
        return "mergekit is importable but its mergekit-yaml CLI is not on PATH"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="every stage at tiny sizes (a smoke test)")
    parser.add_argument("--out", default=None, help="report folder (default docs/real_model; --quick: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder with the runs and checkpoints")
    parser.add_argument("--max-wait", type=float, default=None,
                        help="seconds to wait for idle cores before each timed run, 4x that in all (default 90, 360 in all; --quick: 0)")
    parser.add_argument("--render", metavar="RESULTS_JSON", help="only write the report again from a results.json")
    args = parser.parse_args()
    if args.render:
        res = json.loads(Path(args.render).read_text())
        text = report(res)
        (Path(args.out) if args.out else Path(args.render).parent).joinpath("README.md").write_text(text)
        print(text)
        return
    s = dict(SETTINGS["quick" if args.quick else "full"])
    if args.max_wait is not None:
        s["max_wait"], s["wait_budget"] = args.max_wait, 4 * args.max_wait
    WAIT.update(per_call=s["max_wait"], left=s["wait_budget"])
    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="real_model_"))
    out_dir = Path(args.out) if args.out else (work.parent / f"{work.name}-report" if args.quick else ROOT / "docs" / "real_model")
    print(f"work folder {work}; report to {out_dir}", flush=True)
    from runner.models import resolve_model_path

    folder = resolve_model_path({"path": MODEL})
    res: dict = {"command": "python bench/real_model.py" + (" --quick" if args.quick else ""), "quick": args.quick,
                 "settings": s, "started": datetime.now(UTC).isoformat(), "work": str(work),
                 "environment": environment(folder), "stages": {}, "notes": []}
    stages = res["stages"]
    try:
        # 1. throughput
        res["throughput"] = {}
        with Stage("throughput", stages):
            for kind in ("sft", "kd"):
                res["throughput"][kind] = throughput(kind, s, work)

        # 4. short sft with eval before and after; its checkpoint is the merge's second input
        with Stage("sft+eval", stages):
            e = runner_job("sft-eval", ["recipe=sft", f"model={MODEL}", "eval=toy_quick", f"eval.limit={s['eval_limit']}",
                                        "eval.baseline=true", f"train.steps={s['sft_steps']}", f"train.batch_size={s['sft_batch']}",
                                        f"data.max_length={s['sft_len']}", "data.num_examples=2000", f"train.lr={LR}",
                                        "train.save_every=0"], work)
            if "error" not in e:
                e["samples"] = first_answers(Path(e["run_dir"]))
            res["sft_eval"] = e

        # 5. + 2. quantization and perplexity
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
        toy_docs, toy_about = toy_ppl_docs(s["toy_ppl_tokens"], tokenizer)
        prose = PROSE[: s["prose_paragraphs"]] if s["prose_paragraphs"] else PROSE
        sets = {"toy": toy_docs, "prose": prose}
        res["ppl_sets"] = {"toy": {"about": toy_about},
                           "prose": {"about": f"{len(prose)} English paragraphs written for this benchmark and fixed in "
                                              "bench/real_model.py (PROSE): everyday, encyclopedic topics, about 80 words each, "
                                              "each a document"}}
        with Stage("perplexity fp32", stages):
            import torch

            t = time.perf_counter()
            from transformers import AutoModelForCausalLM

            AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
            res["load_s"] = time.perf_counter() - t
            res["ppl_fp32"] = {k: perplexity(folder, d, s["ppl_window"]) for k, d in sets.items()}
            for k in sets:
                res["ppl_sets"][k]["tokens"] = res["ppl_fp32"][k]["tokens"]
            print(f"   fp32: {json.dumps(res['ppl_fp32'])}", flush=True)
        res["quant"] = {}
        calib = work / "calib_text.jsonl"
        res["calib_text"] = calibration_text(calib, tokenizer, int(1.5 * s["calib_samples"] * s["calib_seqlen"]))
        plan = ([("rtn", b, "") for b in s["rtn_bits"]] + [("gptq", b, "") for b in s["gptq_bits"]]
                + [("gptq", b, "text") for b in s["gptq_text_bits"]])
        with Stage("quantize+perplexity", stages):
            for method, bits, calib_on in plan:
                label = f"{method.upper()} {bits}-bit" + (", English-text calibration" if calib_on else "")
                overrides = [f"recipe={method}_quantize", f"model={MODEL}", f"quant.bits={bits}", "eval=none"]
                if method == "gptq":
                    overrides += [f"quant.calib_samples={s['calib_samples']}", f"quant.calib_seqlen={s['calib_seqlen']}",
                                  f"quant.calib_batch_size={s['calib_batch']}"]
                if calib_on:
                    overrides += ["data=jsonl", f"data.path={calib}", "data.max_length=1024"]
                j = runner_job(f"quant-{method}{bits}{calib_on}", overrides, work, timed=True)
                if "error" not in j:
                    rows = log_times(j["run_dir"])
                    t_load, t_done = when(rows, "loading model"), when(rows, "quantized ")
                    t_calib = when(rows, "gptq: ")
                    j["quantize_s"] = None if t_load is None or t_done is None else t_done - t_load
                    if t_calib is not None and t_done is not None:
                        j["calib_gptq_s"] = t_done - t_calib
                    ckpt = j["record"]["checkpoint"]
                    j["ppl"] = {k: perplexity(ckpt, d, s["ppl_window"]) for k, d in sets.items()}
                    print(f"   {label}: quantize {fmt(j['quantize_s'], '.1f')} s, ppl toy {j['ppl']['toy']['ppl']:.3f}, "
                          f"prose {j['ppl']['prose']['ppl']:.3f}", flush=True)
                    shutil.rmtree(ckpt, ignore_errors=True)  # 540 MB each
                res["quant"][label] = j

        # 3. merge
        res["merge"] = {}
        why = mergekit_available()
        sft_ckpt = (res["sft_eval"].get("record") or {}).get("checkpoint") if "error" not in res["sft_eval"] else None
        if why:
            res["merge"]["skipped"] = why
        elif not sft_ckpt:
            res["merge"]["skipped"] = "the short SFT failed, so there is no second checkpoint to merge"
        else:
            with Stage("merge", stages):
                res["merge"]["input_mb"] = sum(f.stat().st_size for f in Path(folder).glob("*.safetensors")) / 1e6
                res["merge"]["cli"] = merge_cli(folder, sft_ckpt, s, work)
                res["merge"]["engines"] = merge_engines(folder, sft_ckpt, s, work)
    finally:
        res["total_s"] = time.perf_counter() - t_start
        res["finished"] = datetime.now(UTC).isoformat()
        res["notes"] += notes(res)
        out_dir.mkdir(parents=True, exist_ok=True)
        slim(res)
        (out_dir / "results.json").write_text(json.dumps(res, indent=1, default=str))  # first: the report may fail
        text = report(res)
        print("\n" + text, flush=True)
        (out_dir / "README.md").write_text(text)
        print(f"\nwrote {out_dir / 'README.md'} and {out_dir / 'results.json'} ({res['total_s'] / 60:.1f} minutes)")
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def slim(res: dict) -> dict:
    """Drops the per-module and per-layer quantization tables from the saved records (hundreds of KB;
    each run's quant_meta.json has them)."""
    for j in res.get("quant", {}).values():
        for key in ("modules", "layers"):
            ((j.get("record") or {}).get("quant") or {}).pop(key, None)
    return res


def first_answers(run_dir: Path) -> dict:
    """The model's answer to the first easy problem, before and after (from lm-eval's per-sample files)."""
    found = {}
    for stage in ("baseline", "final"):
        files = sorted(glob.glob(str(run_dir / "eval" / stage / "**" / "samples_toy_arith.jsonl"), recursive=True))
        if files:
            with open(files[0]) as f:
                doc = json.loads(f.readline())
            resp = doc.get("filtered_resps") or doc.get("resps")
            while isinstance(resp, list) and resp:
                resp = resp[0]
            q = doc.get("doc", {}).get("question")
            found[stage] = f"{q} -> {str(resp)[:120]!s}".replace("\n", "\\n").replace("`", "'")
    return found


def notes(res: dict) -> list[str]:
    n = []
    for kind, j in res.get("throughput", {}).items():
        if j.get("constant_tokens_per_step") is False:
            n.append(f"{kind}: the steps did not all hold {res['settings']['tp_batch']} x {res['settings']['tp_len']} tokens; "
                     "the per-step times assume they did.")
    if res.get("quick"):
        n.append("--quick: tiny sizes to exercise every stage; do not read the figures.")
    q, ref = res.get("quant", {}), res.get("ppl_fp32", {})
    for bits in (3, 4):
        rtn, gptq = q.get(f"RTN {bits}-bit", {}).get("ppl"), q.get(f"GPTQ {bits}-bit", {}).get("ppl")
        text = q.get(f"GPTQ {bits}-bit, English-text calibration", {}).get("ppl")
        if rtn and gptq and ref:
            line = (f"{bits} bits, perplexity over fp32 (toy / prose): RTN {rtn['toy']['ppl'] / ref['toy']['ppl']:.2f}x / "
                    f"{rtn['prose']['ppl'] / ref['prose']['ppl']:.2f}x, GPTQ calibrated on toy chats "
                    f"{gptq['toy']['ppl'] / ref['toy']['ppl']:.2f}x / {gptq['prose']['ppl'] / ref['prose']['ppl']:.2f}x")
            if text:
                line += (f", GPTQ calibrated on English text {text['toy']['ppl'] / ref['toy']['ppl']:.2f}x / "
                         f"{text['prose']['ppl'] / ref['prose']['ppl']:.2f}x")
            n.append(line + ".")
    n += ["RTN at 4 bits, group 32, does not give back the Q4_1 weights although they sit on a 4-bit grid of "
          "32-weight blocks: the runner's asymmetric grid (GPTQ's find_params) spans [min(w, 0), max(w, 0)] with a "
          "rounded integer zero, Q4_1's spans [min, max] with a float minimum, so the levels differ.",
          "KD with teacher = student: the KL starts at 0 (the logged loss is ~0), so the KD row measures the cost of a "
          "KD step (teacher forward, full-vocabulary softmaxes and KL), not learning.",
          "Peak RSS of a training process (about 3 GB for SFT) is mostly fp32 weights, gradients and AdamW's two "
          "moments (4 x 538 MB) plus the 49,152-wide logits."]
    return n


if __name__ == "__main__":
    main()
