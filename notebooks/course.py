"""Small helpers the course notebooks share (the framework itself is ``nestpy_mini``).

The notebooks run with this folder as their working directory, so
``import course`` finds this file.
"""

from __future__ import annotations

import contextvars
import logging
import sys
from typing import Any, TextIO


class _OneLine(logging.Formatter):
    """Log records as one short line: no timestamps, no tracebacks.

    A traceback shows file paths, which differ from machine to machine, and a
    learner only needs the message; the framework keeps the details.
    """

    def format(self, record: logging.LogRecord) -> str:
        return f"[{record.levelname.lower()}] {record.getMessage()}"


class _RunningCell:
    """Writes to ``stream`` as the cell that is running now.

    ipykernel 7 sends a print to the cell whose code *started* the task that
    prints (it keeps the cell in a contextvar).  A service started in one cell
    runs its handlers, and logs, in tasks born from that cell, so their output
    would land under that earlier cell.  In an empty context ipykernel falls
    back to the cell that is executing, which is where a learner looks.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        return contextvars.Context().run(self._stream.write, text)

    def flush(self) -> None:
        contextvars.Context().run(self._stream.flush)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def print_in_running_cell() -> None:
    """Route prints from background tasks to the cell that is running."""
    if not isinstance(sys.stdout, _RunningCell):
        sys.stdout = _RunningCell(sys.stdout)  # type: ignore[assignment]
    if not isinstance(sys.stderr, _RunningCell):
        sys.stderr = _RunningCell(sys.stderr)  # type: ignore[assignment]


def show_logs(level: int = logging.WARNING) -> None:
    """Print nestpy_mini's log lines in the cell that caused them."""
    print_in_running_cell()
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_OneLine())
    logger = logging.getLogger("nestpy_mini")
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
