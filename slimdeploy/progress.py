"""Rich progress bars, shown on rank 0 only."""

from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True, soft_wrap=True)  # a log line stays one line in files and pipes


def make_progress(enabled: bool = True) -> Progress:
    """A progress display; disabled off rank 0 or with SLIMDEPLOY_QUIET=1."""
    quiet = os.environ.get("SLIMDEPLOY_QUIET") == "1"
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
        console=console, disable=not enabled or quiet, transient=not sys.stderr.isatty(),
    )


def log(msg: str, enabled: bool = True) -> None:
    """One line of status on stderr (rank 0)."""
    if enabled and os.environ.get("SLIMDEPLOY_QUIET") != "1":
        console.print(msg, highlight=False)
