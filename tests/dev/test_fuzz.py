"""The fuzz command, run small: a live server in a subprocess takes a few
thousand hostile inputs and must neither crash nor fail a single check.

This is no performance test; the full run (100,000 inputs) is
``python -m nestpy_mini.dev fuzz``.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest


@pytest.mark.parametrize("seed", [1, 2])
def test_a_small_fuzz_run_has_no_crash_and_passes_every_check(seed: int) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "nestpy_mini.dev", "fuzz", "--inputs", "3000", "--seed", str(seed)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = run.stdout
    assert run.returncode == 0, report + run.stderr[-3000:]
    numbers = {
        label.strip(): int(value.replace(",", ""))
        for label, value in re.findall(r"^([a-z][a-z ()-]+):\s+([\d,]+)", report, re.M)
    }
    assert numbers["inputs tried"] >= 3000
    assert numbers["server crashes"] == 0
    assert numbers["unhandled errors in the server log"] == 0
    assert numbers["connections opened"] > 100  # many connections, not one
    assert numbers["connections closed by the server"] > 0
    checks = re.search(r"checks passed:\s+(\d+)\s+after batches \(of (\d+)\)", report)
    assert checks and checks[1] == checks[2] and int(checks[2]) >= 2
    assert "FAILED" not in report and report.rstrip().endswith("result: ok")
    # Every kind of hostile input the issue names was among them.
    for kind in [
        "random bytes",
        "bad length prefix",
        "huge declared length",
        "truncated frame (stalls)",
        "invalid UTF-8",
        "invalid JSON",
        "100,000 nested brackets",
        "wrong-shape pattern",
        "mutated frames",
        "flood that never reads",
    ]:
        assert re.search(rf"^\s+[\d,]+\s+{re.escape(kind)}$", report, re.M), kind


def test_the_command_explains_itself() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "nestpy_mini.dev", "fuzz", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    for option in ("--inputs", "--seed", "--workers"):
        assert option in run.stdout
