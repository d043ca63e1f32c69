"""Logging through Python `logging` with a rich handler on stderr."""

from __future__ import annotations

import logging

from rich.console import Console
from rich.logging import RichHandler

console = Console(stderr=True)
"""The console that logs and progress bars share, so bars and log lines do not interleave."""


def setup_logging(debug: bool = False) -> None:
    """Route fae's log records to a rich handler; DEBUG level with `--debug`."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, RichHandler):
            root.removeHandler(handler)
    handler = RichHandler(console=console, show_path=debug, rich_tracebacks=debug, markup=False)
    handler.setFormatter(logging.Formatter("%(message)s", datefmt="[%X]"))
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("fae_cli").setLevel(logging.DEBUG if debug else logging.INFO)
