"""Logging through Python `logging` with a rich handler on stderr."""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import Any

import rich.markup
import rich.progress
from rich.console import Console
from rich.logging import RichHandler

console = Console(stderr=True)
"""The console that logs and progress bars share, so bars and log lines do not interleave."""

output = Console()
"""The console for a command's own output on stdout, such as a dry run's plan, so `> file` keeps it."""


def setup_logging(debug: bool = False) -> None:
    """Route fae's log records to stderr; DEBUG level with `--debug`.

    A terminal gets rich's handler. A file or pipe gets one plain line per record, neither
    wrapped nor padded to a console width, so paths stay whole for grep.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "fae_handler", False):
            root.removeHandler(handler)
    handler: logging.Handler
    if console.is_terminal:
        handler = RichHandler(console=console, show_path=debug, rich_tracebacks=debug, markup=False)
        handler.setFormatter(logging.Formatter("%(message)s", datefmt="[%X]"))
    else:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[%(asctime)s] %(levelname)s %(message)s", datefmt="%H:%M:%S"))
    handler.fae_handler = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("fae_cli").setLevel(logging.DEBUG if debug else logging.INFO)


class _StderrHandler(logging.StreamHandler):
    """A stream handler that writes to the current `sys.stderr`, not the one at creation.

    Tests and tools that swap stderr (pytest's capture, an in-process CLI call) would otherwise
    leave the handler writing to a closed stream.
    """

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


class Progress(rich.progress.Progress):
    """A rich progress bar that, when output is not a terminal, logs a line instead.

    A log file or batch job gets no live bar, so without these lines a long stage (Inception
    on thousands of images, an extraction of hours) would print nothing until it ends. Lines
    come at most every `LINE_INTERVAL_S` seconds per task, and once when a task completes.
    """

    LINE_INTERVAL_S = 30.0

    def __init__(self, *columns: Any, **kwargs: Any) -> None:
        target_console = kwargs.get("console") or console
        # Off a terminal the live bar is switched off (it would only leave blank lines) and the
        # log lines below replace it.
        self._lines = not kwargs.get("disable", False) and not target_console.is_terminal
        if self._lines:
            kwargs["disable"] = True
        super().__init__(*columns, **kwargs)
        self._last_line: dict[int, float] = {}

    def add_task(self, description: str, *args: Any, **kwargs: Any) -> rich.progress.TaskID:
        task_id = super().add_task(description, *args, **kwargs)
        self._last_line[task_id] = time.monotonic()  # the first line comes one interval after this
        return task_id

    def advance(self, task_id: rich.progress.TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._log_line(task_id)

    def update(self, task_id: rich.progress.TaskID, **kwargs: Any) -> None:
        super().update(task_id, **kwargs)
        if "completed" in kwargs or "advance" in kwargs:
            self._log_line(task_id)

    def _log_line(self, task_id: rich.progress.TaskID) -> None:
        if not self._lines:
            return
        task = self._tasks[task_id]
        now = time.monotonic()
        done = task.total is not None and task.completed >= task.total
        last = self._last_line.setdefault(task_id, now)
        if last == math.inf:
            return  # the completion line is already written
        if not done and now - last < self.LINE_INTERVAL_S:
            return
        self._last_line[task_id] = math.inf if done else now
        total = f"/{task.total:.0f}" if task.total is not None else ""
        logging.getLogger("fae_cli.progress").info(
            "%s: %.0f%s (%.0f s)", rich.markup.render(str(task.description)).plain, task.completed, total, task.elapsed or 0.0
        )
