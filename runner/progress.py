"""Progress bars for long work: one rich display on stderr, from the main process only.

Every long stage opens a bar with a description and a total (training steps, decoder layers,
tensors, noise trials, evaluation requests) and advances it as the work goes::

    from runner.progress import progress

    with progress("gptq", total=len(layers)) as bar:
        for layer in layers:
            ...
            bar.advance()

A bar opened while another is shown (an evaluation inside noise-eval's sweep, anything inside
training) joins that display as an extra line and leaves it when it ends; the outermost bar's
line stays. On a console that is not a terminal (a log file, CI) rich prints each outermost bar
once, as it ends. Processes other than the main one under ``accelerate launch`` show nothing.

`recorded()` collects every bar that ends inside it, as (description, total, completed): what the
tests check a stage reported.
"""

from __future__ import annotations

import io
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from rich.markup import escape
from rich.progress import Progress

_shown: list[Progress] = []  # the displays now live, innermost last; a new bar joins the last
_recorders: list[list["Record"]] = []


def is_main_process() -> bool:
    """Whether this process shows progress: the only one, or rank 0 of a distributed launch."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0) == 0


class _Display(Progress):
    """A rich Progress that, while started, is the display the bars opened inside it join, and
    through which the log's console lines pass (above the bars, not through them)."""

    _rerouted: list = []

    def start(self) -> None:
        super().start()
        _shown.append(self)
        self._rerouted = _reroute_log_streams(self.console)

    def stop(self) -> None:
        if self in _shown:
            _shown.remove(self)
        for handler, stream in self._rerouted:
            handler.setStream(stream)
        self._rerouted = []
        super().stop()


def _reroute_log_streams(console) -> list:
    """Point every logging handler that writes to the terminal's stdout or stderr at `console`, which
    prints each line above the live display; returns (handler, old stream) to undo it.

    On a terminal, rich's live display swaps sys.stdout and sys.stderr for proxies that do this, but a
    handler keeps the stream it was given (Hydra's console handler, sys.stdout when logging was
    configured): its lines would be written into the bars and break them up. Off a terminal rich
    swaps nothing and neither does this.
    """
    import logging
    import sys

    from rich.file_proxy import FileProxy

    originals = {id(p.rich_proxied_file) for p in (sys.stdout, sys.stderr) if isinstance(p, FileProxy)}
    if not originals:
        return []
    loggers = [logging.getLogger(),
               *(lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger))]
    rerouted = []
    for handler in {h for lg in loggers for h in lg.handlers}:
        if isinstance(handler, logging.StreamHandler) and id(handler.stream) in originals:
            rerouted.append((handler, handler.setStream(_LinesAbove(console))))
    return rerouted


class _LinesAbove(io.TextIOBase):
    """A stream whose complete lines the console prints above its live display, unwrapped (the
    terminal wraps them, as it would without the display)."""

    def __init__(self, console):
        self._console, self._partial = console, ""

    def write(self, text: str) -> int:
        from rich.text import Text

        *lines, self._partial = (self._partial + text).split("\n")
        for line in lines:
            self._console.print(Text(line), soft_wrap=True)
        return len(text)

    def flush(self) -> None:
        pass  # a partial line waits for its newline


def progress_bar(enabled: bool = True) -> Progress:
    """The house display: description, bar, n/total, a free ``info`` field (give ``info=""`` to
    every task), elapsed time and ETA, on stderr. Use it as a context manager; tasks added to it
    need the ``info`` field."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return _Display(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
        transient=False,
    )


@dataclass(frozen=True)
class Record:
    """What a bar reported when it ended."""

    description: str
    total: float | None
    completed: float


class Bar:
    """One line of the display: `advance` it as units of work finish."""

    def __init__(self, display: Progress, task, description: str, total: float | None):
        self._display, self._task = display, task
        self.description, self.total, self.completed = description, total, 0.0

    def advance(self, n: float = 1, info: str | None = None) -> None:
        self.completed += n
        self._display.update(self._task, completed=self.completed, **({} if info is None else {"info": escape(info)}))

    def update(self, *, completed: float | None = None, total: float | None = None, info: str | None = None,
               description: str | None = None) -> None:
        """Set what changed: the units done, the total (when it becomes known), the info text, the description."""
        if completed is not None:
            self.completed = completed
        if total is not None:
            self.total = total
        if description is not None:
            self.description = description
        fields = {k: v if k == "total" else escape(v)
                  for k, v in (("total", total), ("info", info), ("description", description)) if v is not None}
        self._display.update(self._task, completed=self.completed, **fields)

    def add_total(self, n: float) -> None:
        """Grow the total by n (work whose size is known one part at a time)."""
        self.update(total=(self.total or 0) + n)


@contextmanager
def progress(description: str, total: float | None = None, *, enabled: bool | None = None,
             info: str = "") -> Iterator[Bar]:
    """A bar of `total` units (None: not known yet, see `Bar.update`/`Bar.add_total`) shown while the
    block runs. `enabled` defaults to `is_main_process()`."""
    own = not _shown
    display = progress_bar(is_main_process() if enabled is None else enabled) if own else _shown[-1]
    task = display.add_task(escape(description), total=total, info=escape(info))
    bar = Bar(display, task, description, total)
    if own:
        display.start()
    try:
        yield bar
    finally:
        if own:
            display.stop()
        else:
            display.remove_task(task)
        for found in _recorders:
            found.append(Record(bar.description, bar.total, bar.completed))


@contextmanager
def recorded() -> Iterator[list[Record]]:
    """Every bar that ends inside the block, in the order they end."""
    found: list[Record] = []
    _recorders.append(found)
    try:
        yield found
    finally:
        _recorders.remove(found)
