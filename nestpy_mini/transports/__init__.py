"""The transports, and Nest's defaults for where their brokers are (its ``constants.ts``).

Each module holds one transport's server and client side by side, named
``SERVER`` and ``CLIENT``.  A module is loaded on first use, so that
``import nestpy_mini`` stays light and needs no broker library: each broker
transport comes with its extra, ``pip install 'nestpy-mini[redis]'`` and so on.
"""

from __future__ import annotations

import importlib
import os
import re
from enum import IntEnum
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit


class Transport(IntEnum):
    """The same names and numbers as Nest's ``Transport`` enum."""

    TCP = 0
    REDIS = 1
    NATS = 2
    MQTT = 3
    GRPC = 4
    RMQ = 5
    KAFKA = 6


# The transports built; each module, and the extra that brings its broker library,
# have the transport's lower-case name.
_BUILT = tuple(transport for transport in Transport if transport is not Transport.GRPC)

ENV = {"redis": "REDIS_URL", "nats": "NATS_URL", "mqtt": "MQTT_URL", "rmq": "AMQP_URL"}
ENV["kafka"] = "KAFKA_BROKERS"
# Nest's defaults on the loopback address; amqplib's guest login is implied
# by Nest's bare "amqp://localhost".  Kafka names brokers as a comma-separated
# host:port list, never as a URL.
DEFAULT_URL = {
    "redis": "redis://127.0.0.1:6379",
    "nats": "nats://127.0.0.1:4222",
    "mqtt": "mqtt://127.0.0.1:1883",
    "rmq": "amqp://guest:guest@127.0.0.1:5672",
    "kafka": "127.0.0.1:9092",
}


def load(transport: Transport | int) -> ModuleType:
    """The module implementing ``transport``; one clear line when it cannot be loaded."""
    transport = Transport(transport)
    if transport not in _BUILT:
        available = ", ".join(t.name for t in _BUILT)
        raise NotImplementedError(
            f"Transport.{transport.name} is not available in nestpy_mini (available: {available})"
        )
    name = transport.name.lower()
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as exc:  # a broker library, not one of ours
        if transport is Transport.TCP or (exc.name or "").startswith("nestpy_mini"):
            raise
        pip = f"pip install 'nestpy-mini[{name}]'"
        message = f"Transport.{transport.name} needs {exc.name}: {pip}"
        raise ModuleNotFoundError(message, name=exc.name) from None


def broker_urls(kind: str, given: Any) -> list[str]:
    """The broker addresses a transport uses: those given, else the env URL, else Nest's
    default.  Read when connecting, so that building a module does not read the env."""
    if not given:
        given = os.environ.get(ENV[kind]) or DEFAULT_URL[kind]
    if isinstance(given, str):  # Kafka lists its brokers as "host:port,host:port"
        given = given.split(",") if kind == "kafka" else [given]
    return [str(url).strip() for url in given if str(url).strip()]


def redact(url: str) -> str:
    """``url`` without its password: credentials never reach a log line or an error."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return parts._replace(netloc=netloc).geturl()


def describe(kind: str, urls: list[str]) -> str:
    """Where a side connects, for logs and errors: never with a password."""
    return ",".join(map(redact, urls)) or f"{kind} (not connected yet)"


def unreachable(kind: str, where: str, why: BaseException | str) -> ConnectionError:
    """The one line a user reads when no broker answers: where, why, and what to do."""
    text = f"cannot connect to {kind} at {where}: {str(why).rstrip('. ') or repr(why)}"
    if not _NO_ANSWER.search(text):  # a broker answered (and refused the login, say)
        return ConnectionError(text)
    if kind == "rmq":
        how = "start RabbitMQ"
    else:
        how = f"start one (`python -m nestpy_mini.dev broker {kind}` runs one on the default port)"
    return ConnectionError(f"{text}; {how}, or set {ENV[kind]} to one that runs")


# What the libraries say when nothing listens, or nothing answers, at an address.
_NO_ANSWER = re.compile(
    r"refused|Errno 111|Connect call failed|no answer|timed out|unreachable|not known|"
    r"Name or service|Unable to bootstrap|No servers available",
    re.IGNORECASE,
)
