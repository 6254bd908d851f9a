"""Progress on stderr, rank 0 only: a live bar on a terminal, a line a minute in a log file or a pipe."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True, soft_wrap=True)  # a log line stays one line in files and pipes

# A live bar draws nothing into a file: an 8-minute training epoch of the shifted set, run under nohup, showed no
# line until the epoch ended. A line a minute is enough to see it move, and few enough to read.
LINE_EVERY_S = 60.0


def make_progress(enabled: bool = True):
    """A progress display: rich's bar on a terminal (or a notebook), else LineProgress; nothing off rank 0 or with
    SLIMDEPLOY_QUIET=1."""
    quiet = os.environ.get("SLIMDEPLOY_QUIET") == "1"
    if enabled and not quiet and not (console.is_terminal or console.is_jupyter):
        return LineProgress()
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
        console=console, disable=not enabled or quiet, transient=not sys.stderr.isatty(),
    )


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class _Task:
    def __init__(self, description: str, total: float | None, completed: float, info: str, now: float):
        self.description, self.total, self.completed, self.info = description, total, completed, info
        self.start, self.start_completed, self.printed_at, self.printed_completed = now, completed, now, completed


class LineProgress:
    """The part of rich's Progress the stages use (add_task, update), written as plain lines: one per task every
    `every_s` seconds while it moves, and one at the end with its elapsed time. The rate, and so the eta, counts
    only the work done in this process (a resumed task does not look fast)."""

    def __init__(self, every_s: float = LINE_EVERY_S, clock: Callable[[], float] = time.monotonic):
        self.every_s, self.clock, self.tasks = every_s, clock, []

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc) -> None:
        for t in self.tasks:
            if t.completed != t.printed_completed:
                self._print(t, self.clock(), final=True)

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **fields) -> int:
        self.tasks.append(_Task(description, total, completed, str(fields.get("info", "")), self.clock()))
        return len(self.tasks) - 1

    def update(self, task: int, *, total: float | None = None, completed: float | None = None,
               advance: float | None = None, **fields) -> None:
        t = self.tasks[task]
        if total is not None:
            t.total = total
        if completed is not None:
            t.completed = completed
        if advance is not None:
            t.completed += advance
        if "info" in fields:
            t.info = str(fields["info"])
        now = self.clock()
        if now - t.printed_at >= self.every_s and t.completed != t.printed_completed:
            self._print(t, now)

    def _print(self, t: _Task, now: float, final: bool = False) -> None:
        elapsed = now - t.start
        done = f"{t.completed:.0f}" + (f"/{t.total:.0f} ({100 * t.completed / t.total:.0f}%)" if t.total else "")
        line = f"{t.description}: {done} {_duration(elapsed)}"
        rate = (t.completed - t.start_completed) / elapsed if elapsed > 0 else 0.0
        if not final and t.total and rate > 0 and t.completed < t.total:
            line += f", eta {_duration((t.total - t.completed) / rate)}"
        console.print(line + (f"  {t.info}" if t.info else ""), highlight=False, markup=False)
        t.printed_at, t.printed_completed = now, t.completed


def log(msg: str, enabled: bool = True) -> None:
    """One line of status on stderr (rank 0)."""
    if enabled and os.environ.get("SLIMDEPLOY_QUIET") != "1":
        console.print(msg, highlight=False)
