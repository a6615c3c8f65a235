"""The English and Chinese editions are one source run once: the same code and outputs.

`pytest --nbval` runs the English edition only; these checks are what make
that enough for the Chinese one.  Each edition must be exactly what
notebooks/regenerate.py writes from the bilingual source in notebooks/source/
and the outputs of its one run, so a code cell edited in one edition alone, or
an edition written by hand, fails here with the cell it concerns.
"""

from __future__ import annotations

import difflib
import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import nbformat
import pytest
from nbformat import NotebookNode

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"


def load_regenerate() -> ModuleType:
    spec = importlib.util.spec_from_file_location("regenerate", NOTEBOOKS / "regenerate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


regenerate = load_regenerate()
NAMES = sorted(p.name for p in regenerate.SOURCE.glob("*.ipynb"))
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
HAN = re.compile(r"[\u4e00-\u9fff]")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def read(path: Path) -> NotebookNode:
    return nbformat.read(path, as_version=4)


def with_outputs(source: NotebookNode, ran: NotebookNode) -> NotebookNode:
    """``source`` with the outputs and execution counts of ``ran``'s code cells, in order."""
    code = [c for c in source.cells if c.cell_type == "code"]
    done = [c for c in ran.cells if c.cell_type == "code"]
    assert len(code) == len(done), f"{len(code)} code cells in the source, {len(done)} in English"
    for cell, result in zip(code, done, strict=True):
        cell.outputs = result.outputs
        cell.execution_count = result.execution_count
    return source


def code_blocks(cell: NotebookNode) -> list[tuple[str, str]]:
    """The fenced blocks a translation keeps: all but Mermaid, whose labels it translates."""
    return [(kind, body) for kind, body in FENCE.findall(cell.source) if kind != "mermaid"]


def heading(cell: NotebookNode) -> str:
    return re.match(r"#*", cell.source).group()  # type: ignore[union-attr]  # always matches


def difference(name: str, index: int, expected: NotebookNode, actual: NotebookNode) -> str | None:
    """Where ``actual`` is not the cell regenerate.py would have written, and how."""
    where = f"{name}, cell {index} (id {actual.get('id')})"
    if (expected.cell_type, expected.get("id")) != (actual.cell_type, actual.get("id")):
        return f"{where}: expected the {expected.cell_type} cell {expected.get('id')}"
    if expected.source != actual.source:
        diff = difflib.unified_diff(
            expected.source.splitlines(), actual.source.splitlines(), "source", name, lineterm=""
        )
        return f"{where}: its text is not the source's\n" + "\n".join(diff)
    if expected.metadata != actual.metadata:
        return f"{where}: metadata {dict(actual.metadata)}, the source's {dict(expected.metadata)}"
    if expected.get("outputs") != actual.get("outputs"):
        return f"{where}: its outputs are not the ones the other edition holds"
    if expected.get("execution_count") != actual.get("execution_count"):
        return f"{where}: execution count {actual.execution_count}, not {expected.execution_count}"
    return None


def test_every_notebook_has_a_source_and_two_editions() -> None:
    english = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    chinese = sorted(p.name for p in (NOTEBOOKS / "zh").glob("*.ipynb"))
    assert len(NAMES) >= 12
    assert english == NAMES, "an English notebook without a source, or the other way round"
    assert chinese == NAMES, "a Chinese notebook without a source, or the other way round"


@pytest.mark.parametrize("name", NAMES)
def test_both_editions_are_the_source_run_once(name: str) -> None:
    english = read(NOTEBOOKS / name)
    ran = with_outputs(read(regenerate.SOURCE / name), english)
    for lang, folder in regenerate.EDITIONS.items():
        path = folder / name
        expected, actual = regenerate.edition(ran, lang), read(path)
        shown = str(path.relative_to(NOTEBOOKS.parent))
        problems = [
            problem
            for index, (want, have) in enumerate(zip(expected.cells, actual.cells, strict=False))
            if (problem := difference(shown, index, want, have))
        ]
        if len(expected.cells) != len(actual.cells):
            problems.append(f"{shown}: {len(actual.cells)} cells, not {len(expected.cells)}")
        assert not problems, (
            f"{problems[0]}\n(edit notebooks/source/{name} and run"
            f" python notebooks/regenerate.py {name[:3].rstrip('_')})"
        )


@pytest.mark.parametrize("name", NAMES)
def test_every_prose_cell_has_its_translation_beside_it(name: str) -> None:
    cells = read(regenerate.SOURCE / name).cells
    for index, cell in enumerate(cells):
        lang = cell.metadata.get("lang")
        assert lang in (None, "en", "zh"), f"cell {cell.id}: unknown language {lang!r}"
        assert not (lang and cell.cell_type == "code"), f"cell {cell.id}: code is for both"
        if lang != "en":
            continue
        twin = cells[index + 1] if index + 1 < len(cells) else None
        assert twin is not None and twin.metadata.get("lang") == "zh", (
            f"cell {cell.id}: no Chinese cell right after it"
        )
        prose = FENCE.sub("", twin.source)
        assert HAN.search(prose), f"cell {twin.id}: no Chinese in its prose"
        assert code_blocks(twin) == code_blocks(cell), (
            f"cell {twin.id}: its code blocks differ from the English (only Mermaid may)"
        )
        assert heading(twin) == heading(cell), f"cell {twin.id}: not the English heading level"
    marked = [c for c in cells if c.metadata.get("lang") == "zh"]
    assert len(marked) == sum(c.metadata.get("lang") == "en" for c in cells), "a Chinese cell alone"


@pytest.mark.parametrize("lang", sorted(regenerate.EDITIONS))
def test_links_between_notebooks_lead_somewhere(lang: str) -> None:
    folder = regenerate.EDITIONS[lang]
    broken = []
    for name in NAMES:
        for cell in read(folder / name).cells:
            for target in LINK.findall(cell.source) if cell.cell_type == "markdown" else ():
                if "://" in target or target.startswith(("#", "mailto:")):
                    continue
                if not (folder / target.split("#")[0]).exists():
                    broken.append(f"{name}: {target}")
    assert not broken, f"links to nothing in the {lang} edition: {broken}"


def test_each_course_map_links_to_the_other_edition() -> None:
    english = "\n".join(c.source for c in read(NOTEBOOKS / "00_course_map.ipynb").cells)
    chinese = "\n".join(c.source for c in read(NOTEBOOKS / "zh" / "00_course_map.ipynb").cells)
    assert "](zh/00_course_map.ipynb)" in english
    assert "](../00_course_map.ipynb)" in chinese


def test_a_chinese_notebook_runs_its_code_where_the_english_one_does() -> None:
    """JupyterLab starts the kernel in notebooks/zh/; the first `import course` moves it."""
    probe = (
        "import os, course, math_service; "
        "print(os.getcwd(), course.__file__, math_service.__file__, sep='\\n')"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=NOTEBOOKS / "zh",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [
        str(NOTEBOOKS),
        str(NOTEBOOKS / "course.py"),
        str(NOTEBOOKS / "math_service.py"),
    ]
