"""``python -m runner.toy``: build, ship and measure the toy zoo.

    python -m runner.toy build [names]          # train from scratch into the cache (make zoo)
    python -m runner.toy ship [names]           # build, then copy into the package with the manifest
    python -m runner.toy eval [--compare] [--markdown] [--json F] [--limit N]
    python -m runner.toy list
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from runner.errors import RunnerError
from runner.toy.zoo import ZOO, build, entry_dir, names, ship, shipped

log = logging.getLogger("runner.toy.zoo")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runner.toy", description="Build, ship and measure the toy zoo.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="train entries from scratch into the cache (skips those already built)")
    b.add_argument("names", nargs="*", default=["all"])
    s = sub.add_parser("ship", help="build entries into the cache, then copy them into the package with the manifest")
    s.add_argument("names", nargs="*", default=["all"])
    e = sub.add_parser("eval", help="measure the entries on the toy tasks and print the zoo and premise tables")
    e.add_argument("names", nargs="*", default=["all"])
    e.add_argument("--limit", type=int, default=None, help="problems per task (default: all 300)")
    e.add_argument("--json", type=Path, default=None, help="also write the measurements here")
    e.add_argument("--compare", action="store_true",
                   help="also rebuild the entries on this machine and report how far they land from the shipped ones")
    e.add_argument("--markdown", action="store_true", help="print the tables as markdown (as in the README)")
    sub.add_parser("list", help="entries, where each resolves to, and whether a cache build exists")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    selected = names() if "all" in getattr(args, "names", []) else getattr(args, "names", [])
    unknown = [n for n in selected if n not in ZOO]
    if unknown:
        print(f"error: unknown zoo entries {unknown}; entries are {', '.join(names())}", file=sys.stderr)
        return 2
    try:
        if args.cmd == "list":
            for n in names():
                where = shipped(n) or "not shipped for this recipe"
                built = "built" if entry_dir(n).is_dir() else "absent"
                print(f"{n:13s} shipped: {where}; cache build: {built} ({entry_dir(n)})  ({ZOO[n].description})")
            return 0
        if args.cmd == "build":
            t0 = time.perf_counter()
            for n in selected:
                build(n)
            log.info("zoo built in %.0f s", time.perf_counter() - t0)
            return 0
        if args.cmd == "ship":
            ship(selected)
            return 0
        from runner.toy.report import evaluate_zoo

        evaluate_zoo(selected, limit=args.limit, json_path=args.json, compare=args.compare, markdown=args.markdown)
        return 0
    except RunnerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
