"""Small helpers the course notebooks share (the framework itself is ``nestpy_mini``).

The notebooks run with this folder as their working directory, so
``import course`` finds this file.
"""

from __future__ import annotations

import logging
import sys


class _OneLine(logging.Formatter):
    """Log records as one short line: no timestamps, no tracebacks.

    A traceback shows file paths, which differ from machine to machine, and a
    learner only needs the message; the framework keeps the details.
    """

    def format(self, record: logging.LogRecord) -> str:
        return f"[{record.levelname.lower()}] {record.getMessage()}"


def show_logs(level: int = logging.WARNING) -> None:
    """Print nestpy_mini's log lines in the cell that caused them."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_OneLine())
    logger = logging.getLogger("nestpy_mini")
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
