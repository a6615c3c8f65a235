"""The README's terminal example: start the math service, call it, read ``6``."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nestpy_mini.dev", *args],
        capture_output=True,
        text=True,
        timeout=20,
        cwd=ROOT,
    )


def test_math_service_script_answers_the_cli() -> None:
    port = free_port()
    service = subprocess.Popen(
        [sys.executable, "notebooks/math_service.py", "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert service.stdout is not None
        assert service.stdout.readline() == f"math service listening on 127.0.0.1:{port}\n"
        result = cli("send", "--port", str(port), '{"cmd": "sum"}', "[1, 2, 3]")
        assert (result.returncode, result.stdout) == (0, "6\n")
        assert cli("emit", "--port", str(port), "user_created", '{"userId": "42"}').returncode == 0
        assert service.stdout.readline() == "User created 42\n"
        unknown = cli("send", "--port", str(port), '{"cmd": "nope"}', "1")
        assert unknown.returncode == 1
        assert "no matching message handler" in unknown.stderr
    finally:
        service.terminate()  # SIGTERM: enable_shutdown_hooks closes it gracefully
        _, err = service.communicate(timeout=10)
    assert service.returncode == 0, err


def test_cli_reports_an_unreachable_service_in_one_line() -> None:
    result = cli("send", "--port", str(free_port()), '{"cmd": "sum"}', "[1]")
    assert result.returncode == 1
    assert result.stderr.startswith("error: cannot connect to tcp://127.0.0.1:")
    assert result.stderr.count("\n") == 1


def test_a_broker_transport_is_addressed_by_its_url_never_by_the_tcp_port(
    broker_url: Callable[[str], str],
) -> None:
    """``send --transport redis`` goes to the Redis broker (the env URL, else Nest's default
    address), not to port 3000, the TCP default; ``--port`` there is an error, not a guess."""
    url = broker_url("redis")
    service = subprocess.Popen(
        [sys.executable, "-m", "nestpy_mini.dev", "serve", "--transport", "redis", "--url", url,
         "notebooks.math_service:AppModule"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert service.stdout is not None
        assert service.stdout.readline().startswith("serving notebooks.math_service:AppModule on")
        env = {**os.environ, "REDIS_URL": url}
        args = ("send", "--transport", "redis", '{"cmd": "sum"}', "[1, 2, 3]")
        result = subprocess.run(
            [sys.executable, "-m", "nestpy_mini.dev", *args],
            capture_output=True, text=True, timeout=20, cwd=ROOT, env=env,
        )  # fmt: skip
        assert (result.returncode, result.stdout, result.stderr) == (0, "6\n", "")
        by_url = cli("send", "--transport", "redis", "--url", url, '{"cmd": "sum"}', "[4]")
        assert (by_url.returncode, by_url.stdout) == (0, "4\n")
        wrong = cli("send", "--transport", "redis", "--port", "3000", '{"cmd": "sum"}', "[1]")
        assert wrong.returncode != 0
        assert "REDIS takes --url (its broker), not --host/--port" in wrong.stderr
    finally:
        service.terminate()
        service.communicate(timeout=10)


def test_cli_runs_on_nestpy_mini_run(tmp_path: Path) -> None:
    """NESTPY_LOOP reaches the CLI: asking for a missing uvloop is one line, before any connect."""
    (tmp_path / "uvloop.py").write_text("raise ImportError('not installed')\n")
    result = subprocess.run(
        [sys.executable, "-m", "nestpy_mini.dev", "send", '{"cmd": "sum"}', "[1]"],
        capture_output=True,
        text=True,
        timeout=20,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(tmp_path), "NESTPY_LOOP": "uvloop"},
    )
    assert result.returncode == 1
    assert result.stderr == "error: loop='uvloop' needs uvloop: pip install 'nestpy-mini[fast]'\n"
