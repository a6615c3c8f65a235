"""Run every notebook's source once and write both editions of it, with outputs.

The course has one source per notebook, in ``source/``: its prose in English and
in Chinese side by side, each Markdown cell marked with its language in its
metadata (``"lang": "en"`` or ``"lang": "zh"``), and one set of code cells that
both languages share.  This is the one way committed notebooks are made:

    python notebooks/regenerate.py          # every notebook
    python notebooks/regenerate.py 03 05    # those whose names start so

Each source runs top to bottom once, in this folder.  Its code cells, with the
outputs of that one run, then go into both editions: ``NN_name.ipynb`` here
(English, which ``pytest --nbval`` checks) and ``zh/NN_name.ipynb`` (Chinese).
The code and outputs of the two editions are therefore the same objects, and
tests/course/test_editions.py checks that nobody edited one edition alone.
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient
from nbformat import NotebookNode

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "source"
EDITIONS = {"en": HERE, "zh": HERE / "zh"}  # language -> folder of that edition
KERNEL = "python3"


def kernelspec() -> dict[str, str]:
    """The installed kernel's spec, as JupyterLab writes it into a notebook it opens.

    JupyterLab replaces a kernelspec that differs from the running kernel's, and
    that marks the notebook changed the moment it opens: committed notebooks
    must carry this machine's spec ("Python 3 (ipykernel)" today), not a typed one.
    """
    spec = KernelSpecManager().get_kernel_spec(KERNEL)
    return {"display_name": spec.display_name, "language": spec.language, "name": KERNEL}


def edition(source: NotebookNode, lang: str) -> NotebookNode:
    """The cells of ``source`` a reader of ``lang`` sees: unmarked cells and those marked ``lang``.

    The language mark stays in the source only; an edition is a plain notebook.
    """
    notebook = copy.deepcopy(source)
    notebook.cells = [c for c in notebook.cells if c.metadata.get("lang", lang) == lang]
    for cell in notebook.cells:
        cell.metadata.pop("lang", None)
    return notebook


def execute(path: Path) -> NotebookNode:
    """The source at ``path``, run top to bottom in this folder, as a reader's kernel runs it."""
    notebook = nbformat.read(path, as_version=4)
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
    return notebook


def regenerate(path: Path) -> float:
    started = time.monotonic()
    ran = execute(path)
    for lang, folder in EDITIONS.items():
        folder.mkdir(exist_ok=True)
        nbformat.write(edition(ran, lang), folder / path.name)
    return time.monotonic() - started


def main(prefixes: list[str]) -> None:
    paths = sorted(SOURCE.glob("*.ipynb"))
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
