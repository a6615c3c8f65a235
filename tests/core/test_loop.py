"""``nestpy_mini.run``: uvloop where it imports, asyncio when asked, and nothing global.

Each case runs in a fresh interpreter, so the loop policy it sees is the one the
import left, and the environment (``NESTPY_LOOP``, a shadowed uvloop) is its own.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HINT = "loop='uvloop' needs uvloop: pip install 'nestpy-mini[fast]'"

# Prints the loop that nestpy_mini.run started, as the coroutine sees it from inside.
WHICH = """
import sys
import nestpy_mini
from nestpy_mini.app import loop_name

async def main():
    return loop_name()

print(nestpy_mini.run(main(), **({"loop": sys.argv[1]} if len(sys.argv) > 1 else {})))
"""


def python(code: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("NESTPY_LOOP", "PYTHONPATH")}
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        env={**base, **(env or {})},
    )


@pytest.fixture
def no_uvloop(tmp_path: Path) -> dict[str, str]:
    """An environment in which ``import uvloop`` fails, installed or not."""
    (tmp_path / "uvloop.py").write_text("raise ImportError('not installed')\n")
    return {"PYTHONPATH": str(tmp_path)}


@pytest.mark.parametrize(
    ("env", "args", "expected"),
    [
        ({}, (), "uvloop"),  # the default, "auto", takes it: it is in the default install
        ({"NESTPY_LOOP": "asyncio"}, (), "asyncio"),  # turned off without a code change
        ({"NESTPY_LOOP": "uvloop"}, (), "uvloop"),
        ({"NESTPY_LOOP": "uvloop"}, ("asyncio",), "asyncio"),  # an explicit loop= wins
        ({}, ("uvloop",), "uvloop"),
    ],
)
def test_run_picks_the_loop(env: dict[str, str], args: tuple[str, ...], expected: str) -> None:
    proc = python(WHICH, *args, env=env)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"{expected}\n", "")


def test_auto_falls_back_to_asyncio_without_uvloop(no_uvloop: dict[str, str]) -> None:
    proc = python(WHICH, env=no_uvloop)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "asyncio\n", "")


@pytest.mark.parametrize("how", [("uvloop",), ()], ids=["loop=", "NESTPY_LOOP"])
def test_uvloop_asked_for_and_missing_is_one_clear_line(
    no_uvloop: dict[str, str], how: tuple[str, ...]
) -> None:
    env = no_uvloop if how else {**no_uvloop, "NESTPY_LOOP": "uvloop"}
    proc = python(WHICH, *how, env=env)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip().splitlines()[-1] == f"ModuleNotFoundError: {HINT}"
    assert "never awaited" not in proc.stderr  # the coroutine was closed, not leaked


def test_a_bad_nestpy_loop_names_the_choices() -> None:
    proc = python(WHICH, env={"NESTPY_LOOP": "uv"})
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last == "ValueError: loop 'uv' (NESTPY_LOOP or loop=): choose auto|asyncio|uvloop"


def test_importing_leaves_the_loop_policy_alone() -> None:
    """A notebook imports nestpy_mini into a kernel whose loop already runs: it must keep it."""
    code = """
import asyncio
before = asyncio.get_event_loop_policy()
import nestpy_mini, nestpy_mini.dev.bench, nestpy_mini.dev.cli
after_import = asyncio.get_event_loop_policy()

async def main():
    return None

nestpy_mini.run(main())  # on uvloop: still no policy installed
print(after_import is before, asyncio.get_event_loop_policy() is before,
      type(before).__module__.split(".")[0])
"""
    proc = python(code)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "True True asyncio\n", "")
