"""``python -m nestpy_mini.dev bench`` runs end to end and cleans up after itself.

This tests the command, not the speed: it asserts that every pair was
measured and saved, never how fast anything was.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support.nest import nest_missing

from nestpy_mini.dev.bench import QUICK, parse_args

REPO = Path(__file__).resolve().parents[2]
RUN_TIMEOUT = 120  # seconds; the quick run takes a few
# Fewer requests than even --quick's: these tests check the command, not the figures,
# and most of a run is starting its processes.
FEW = ("--requests", "300", "--latency", "30", "--warmup", "30")
COURSE_COPY = REPO / "notebooks" / "bench_results.json"
COURSE_COPY_BEFORE = COURSE_COPY.read_bytes()  # read at collection, before any run

pytestmark = pytest.mark.skipif(nest_missing() is not None, reason=str(nest_missing()))


def _bench(*argv: str, timeout: float = RUN_TIMEOUT, **env: str) -> subprocess.CompletedProcess:
    """``python -m nestpy_mini.dev bench ARGV`` from the repository, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "nestpy_mini.dev", "bench", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
    )


def _alive(pid: int) -> bool:
    """True if ``pid`` still runs one of the benchmark's processes (not a reused pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z" and b"bench" in cmdline


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, dict]:
    save = tmp_path_factory.mktemp("bench") / "results.json"
    proc = _bench("--quick", "--transports", "tcp", *FEW, "--save", str(save))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc, json.loads(save.read_text())


def test_all_four_pairs_are_measured(quick_run: tuple[subprocess.CompletedProcess, dict]) -> None:
    _, results = quick_run
    pairs = results["summary"]["tcp"]["pairs"]
    assert sorted(pairs) == ["a", "b", "c", "d", "e"]  # (e): the bare asyncio pair
    for pair, stats in pairs.items():
        for figure in ("throughput_rps", "latency_p50_us", "latency_p99_us", "server_rss_mb"):
            spread = stats[figure]
            assert 0 < spread["min"] <= spread["median"] <= spread["max"], (pair, figure)
    raw = [row for row in results["raw"] if row["transport"] == "tcp"]
    assert sorted(row["pair"] for row in raw) == ["a", "b", "c", "d", "e"]
    assert all(row["error"] is None for row in raw)


def test_ratios_and_facts_are_saved(quick_run: tuple[subprocess.CompletedProcess, dict]) -> None:
    proc, results = quick_run
    ratios = results["summary"]["tcp"]["ratios"]
    for name in (
        "throughput_b_over_a",
        "throughput_c_over_a",
        "latency_p50_b_over_a",
        "server_rss_b_over_a",
    ):
        assert ratios[name]["value"] > 0, name
    assert results["import_time"]["with_import_ms"] > 0
    assert results["machine"]["cores"] >= 1 and results["machine"]["node"].startswith("v")
    assert results["settings"]["quick"] is True
    for unit in ("req/s", "µs", "MB", "import nestpy_mini:"):
        assert unit in proc.stdout, unit


def test_the_bare_pair_is_the_extra_row(
    quick_run: tuple[subprocess.CompletedProcess, dict],
) -> None:
    """(e) is measured like the others and set against (b); the four pairs stay as they were."""
    proc, results = quick_run
    assert results["settings"]["pairs"] == ["a", "b", "c", "d"]
    assert results["settings"]["bare"] == ["tcp"]
    assert results["pair_names"]["e"] == {"client": "bare asyncio", "server": "bare asyncio"}
    ratios = results["summary"]["tcp"]["ratios"]
    for name in ("throughput_b_over_e", "latency_p50_b_over_e", "server_rss_b_over_e"):
        assert ratios[name]["value"] > 0, name
    assert "(e) bare asyncio pair" in proc.stdout
    assert "throughput (b)/(e)" in proc.stdout


def test_a_broker_transport_is_measured(tmp_path: Path) -> None:
    """MQTT always has a broker here: a private Mosquitto if one is on PATH, else amqtt."""
    save = tmp_path / "results.json"
    # One pair, NestJS's client against nestpy_mini's server: both sides' MQTT options.
    pair = ["--pairs", "c", *FEW]
    proc = _bench("--quick", "--transports", "mqtt", *pair, "--save", str(save))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(save.read_text())
    pairs = results["summary"]["mqtt"]["pairs"]
    assert sorted(pairs) == ["c"]  # and no bare pair over MQTT
    assert all(stats["throughput_rps"]["min"] > 0 for stats in pairs.values())
    assert results["settings"]["bare"] == []
    source = results["brokers"]["mqtt"]
    if shutil.which("mosquitto"):
        assert source.startswith("private mosquitto"), source
    assert f"broker:    mqtt at {results['broker_urls']['mqtt']} ({source})" in proc.stdout
    assert [pid for pid in results["child_pids"] if _alive(pid)] == []
    assert _private_mosquittos() == []  # the broker stopped with the run


def _private_mosquittos() -> list[str]:
    """Command lines of the Mosquittos the benchmark starts (by their config file's name)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"nestpy-mosquitto-" in cmdline and b"mosquitto" in cmdline.split(b"\0")[0]:
            found.append(cmdline.decode(errors="replace"))
    return found


def test_no_benchmark_process_is_left(quick_run: tuple[subprocess.CompletedProcess, dict]) -> None:
    _, results = quick_run
    # Two servers and two clients of each implementation, and the bare pair's
    # server and client, all started and stopped.
    assert len(results["child_pids"]) == 10
    assert [pid for pid in results["child_pids"] if _alive(pid)] == []


@pytest.mark.skipif(
    len(getattr(os, "sched_getaffinity", lambda _: ())(0)) < 2, reason="pinning needs 2 CPUs"
)
def test_every_server_and_every_client_gets_its_own_cpu(
    quick_run: tuple[subprocess.CompletedProcess, dict],
) -> None:
    proc, results = quick_run
    first, second = sorted(os.sched_getaffinity(0))[:2]
    assert results["settings"]["placement"] == {"server_cpu": first, "client_cpu": second}
    assert f"every server on CPU {first}, every client on CPU {second}" in proc.stdout
    # nestpy_mini's client reports where it was allowed to run: the pinning took.
    py_clients = [row for row in results["raw"] if row["client"] == "nestpy_mini"]
    assert len(py_clients) == 2
    assert all(row["client_cpus"] == [second] for row in py_clients)


@pytest.mark.parametrize(
    ("flags", "env", "said"),
    [
        (["--uvloop"], {}, "--uvloop"),
        (["--loop", "uvloop"], {}, "--loop uvloop"),
        ([], {"NESTPY_LOOP": "uvloop"}, "NESTPY_LOOP=uvloop"),
    ],
)
def test_uvloop_missing_is_one_clear_line_before_anything_starts(
    tmp_path: Path, flags: list[str], env: dict[str, str], said: str
) -> None:
    (tmp_path / "uvloop.py").write_text("raise ImportError('not installed')\n")
    proc = _bench("--quick", *flags, timeout=30, PYTHONPATH=str(tmp_path), **env)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"{said} needs uvloop: pip install 'nestpy-mini[fast]'"
    assert proc.stdout == ""  # no pair was started


def test_each_side_reports_the_loop_it_ran_on(
    quick_run: tuple[subprocess.CompletedProcess, dict],
) -> None:
    """By default the Python sides get what a standalone service gets: nestpy_mini.run's pick."""
    proc, results = quick_run
    expected = "asyncio" if os.environ.get("NESTPY_LOOP") == "asyncio" else "uvloop"
    assert results["settings"]["loop"] == "auto"
    py = {"nestpy_mini": expected, "bare asyncio": expected, "NestJS": "node"}
    for row in results["raw"]:
        assert (row["client_loop"], row["server_loop"]) == (py[row["client"]], py[row["server"]])
    assert results["summary"]["tcp"]["pairs"]["c"]["loop"] == {"client": "node", "server": expected}
    assert re.search(rf"\(c\) NestJS -> nestpy_mini +node/{expected} ", proc.stdout)


def test_results_are_written_only_where_asked(
    quick_run: tuple[subprocess.CompletedProcess, dict],
) -> None:
    """The run above saved to a temporary file, and left the course's copy as it was."""
    quick = parse_args(["--quick"])
    assert quick.save is None  # by default the results are only printed
    assert {name: getattr(quick, name) for name in QUICK} == QUICK  # what the run above overrode
    _, results = quick_run
    settings = results["settings"]
    assert (settings["requests"], settings["latency_requests"], settings["warmup"]) == (300, 30, 30)
    assert COURSE_COPY.read_bytes() == COURSE_COPY_BEFORE
