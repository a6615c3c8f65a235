"""Run every notebook top to bottom and save its outputs.

This is the one way committed outputs are made, so what `pytest --nbval`
compares against is always a clean, in-order run:

    python notebooks/regenerate.py          # every notebook
    python notebooks/regenerate.py 03 05    # those whose names start so
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent


def regenerate(path: Path) -> float:
    notebook = nbformat.read(path, as_version=4)
    started = time.monotonic()
    NotebookClient(
        notebook,
        timeout=120,
        kernel_name="python3",
        resources={"metadata": {"path": str(HERE)}},
    ).execute()
    for cell in notebook.cells:
        # Timestamps would make every run a diff; nbval does not need them.
        cell.metadata.pop("execution", None)
    nbformat.write(notebook, path)
    return time.monotonic() - started


def main(prefixes: list[str]) -> None:
    paths = sorted(HERE.glob("*.ipynb"))
    if prefixes:
        paths = [p for p in paths if p.name.startswith(tuple(prefixes))]
    total = 0.0
    for path in paths:
        seconds = regenerate(path)
        total += seconds
        print(f"{path.name:45} {seconds:6.1f} s")
    print(f"{'total':45} {total:6.1f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
