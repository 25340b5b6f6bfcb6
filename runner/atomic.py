"""Atomic writes: a reader sees the old file or folder, or the new one, never half of one.

Everything the runner writes for others to read goes through here: results.json and the resume
index (`write_json`), checkpoints, exports and training states (`folder`, or `new_folder` + `commit`
when the folder is filled over several calls), cached files written by a library (`file`).
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _temp_beside(final: Path, what: str) -> Path:
    return final.parent / f".{final.name}.{what}-{uuid.uuid4().hex[:8]}"


@contextmanager
def file(final: Path) -> Iterator[Path]:
    """``with file(path) as tmp:`` write `tmp` (any writer); on success it replaces `path`."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(final, "tmp")
    try:
        yield tmp
        tmp.replace(final)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    with file(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, default=str))


def new_folder(final: Path) -> Path:
    """A fresh temp folder beside `final`; fill it, then `commit(tmp, final)` (or `discard(tmp)`)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(final, "tmp")
    tmp.mkdir()
    return tmp


def commit(tmp: Path, final: Path) -> None:
    """Replace `final` by the filled `tmp` folder."""
    old = None
    if final.exists():
        old = _temp_beside(final, "old")
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def discard(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def folder(final: Path) -> Iterator[Path]:
    """``with folder(out) as tmp:`` fill `tmp`; on success it becomes `out`, on error it is removed."""
    tmp = new_folder(final)
    try:
        yield tmp
        commit(tmp, Path(final))
    except BaseException:
        discard(tmp)
        raise
