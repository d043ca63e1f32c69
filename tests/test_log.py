"""The progress bar's log lines when output is not a terminal."""

from __future__ import annotations

import io

from rich.console import Console

from fae_cli.log import Progress


def _progress_messages(caplog, interval: float, steps: int) -> list[str]:
    caplog.set_level("INFO", logger="fae_cli")
    console = Console(file=io.StringIO(), force_terminal=False)
    progress = Progress(console=console)
    progress.LINE_INTERVAL_S = interval
    with progress:
        task = progress.add_task("Inception on samples", total=steps * 10)
        for _ in range(steps):
            progress.advance(task, 10)
        progress.update(task, completed=steps * 10)  # a late update after completion adds no line
    return [record.getMessage() for record in caplog.records if record.name == "fae_cli.progress"]


def test_lines_every_interval_and_at_completion(caplog):
    messages = _progress_messages(caplog, interval=0.0, steps=3)
    counts = [message.split(" (")[0] for message in messages]
    assert counts == ["Inception on samples: 10/30", "Inception on samples: 20/30", "Inception on samples: 30/30"]


def test_long_interval_logs_completion_only(caplog):
    messages = _progress_messages(caplog, interval=3600.0, steps=3)
    assert [message.split(" (")[0] for message in messages] == ["Inception on samples: 30/30"]


def test_terminal_output_logs_no_lines(caplog):
    caplog.set_level("INFO", logger="fae_cli")
    progress = Progress(console=Console(file=io.StringIO(), force_terminal=True))
    with progress:
        task = progress.add_task("sample", total=2)
        progress.advance(task, 2)
    assert not [record for record in caplog.records if record.name == "fae_cli.progress"]


def test_plain_handler_follows_current_stderr(monkeypatch):
    import logging
    import sys

    from fae_cli import log as fae_log

    monkeypatch.setattr(fae_log.console, "_force_terminal", False)
    fae_log.setup_logging()
    assert any(isinstance(handler, fae_log._StderrHandler) for handler in logging.getLogger().handlers)
    replaced = io.StringIO()
    monkeypatch.setattr(sys, "stderr", replaced)
    logging.getLogger("fae_cli.test").info("to the replaced stream")
    replaced.close()  # a later record must not hit the closed stream
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    logging.getLogger("fae_cli.test").info("to the next stream")
    assert "INFO to the next stream" in sys.stderr.getvalue()
