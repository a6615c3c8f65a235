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
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
KERNEL = "python3"


def kernelspec() -> dict[str, str]:
    """The installed kernel's spec, as JupyterLab writes it into a notebook it opens.

    JupyterLab replaces a kernelspec that differs from the running kernel's, and
    that marks the notebook changed the moment it opens: committed notebooks
    must carry this machine's spec ("Python 3 (ipykernel)" today), not a typed one.
    """
    spec = KernelSpecManager().get_kernel_spec(KERNEL)
    return {"display_name": spec.display_name, "language": spec.language, "name": KERNEL}


def regenerate(path: Path) -> float:
    notebook = nbformat.read(path, as_version=4)
    started = time.monotonic()
    NotebookClient(
        notebook,
        timeout=120,
        kernel_name=KERNEL,
        resources={"metadata": {"path": str(HERE)}},
    ).execute()
    for cell in notebook.cells:
        # Timestamps would make every run a diff; nbval does not need them.
        cell.metadata.pop("execution", None)
    # nbclient has already written the language_info of the kernel's reply.
    notebook.metadata.kernelspec = kernelspec()
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
