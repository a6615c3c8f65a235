"""One kit per transport for the contract suite: how to reach its broker, name its patterns,
read its numbers back, and take its broker away and bring it back.

Patterns are strings such as ``contract.<run>.sum``: every transport can carry
them (Kafka topics cannot hold an object pattern), and the run tag keeps two
runs on one broker apart.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nestpy_mini import NestMicroservice, Transport
from nestpy_mini.dev import brokers
from nestpy_mini.packets import EMPTY_RESPONSE, NO_MESSAGE_HANDLER

RUN = secrets.token_hex(4)


def name(handler: str) -> str:
    return f"contract.{RUN}.{handler}"


@dataclass
class Outage:
    """A broker that the test may stop and start again (for TCP: the server itself)."""

    url: str
    stop: Callable[[], Any]
    start: Callable[[], Any]


@dataclass
class Kit:
    transport: Transport
    kind: str  # the broker kind, "" for TCP
    # The options of a server and a client of one run; ``url`` is the broker's.
    server_options: Callable[[str], dict[str, Any]]
    client_options: Callable[[str, NestMicroservice], dict[str, Any]]
    # How a number comes back: Kafka carries it as text, as Nest's KafkaParser reads it.
    value: Callable[[Any], Any] = field(default=lambda n: n)
    # The error a request to a pattern nobody serves gets, as Nest words it: its
    # no-handler text where a server reads the pattern, "no responders" where the
    # broker says nobody subscribes (NATS, Redis), and None where nobody hears it
    # and the broker cannot tell, so the caller's timeout ends it.
    unknown_pattern: Callable[[str], Any] | None = lambda pattern: NO_MESSAGE_HANDLER
    # A request waiting when the broker goes away fails at once (its reply could
    # not reach us), where the transport can tell.
    in_flight_fails_at_once: bool = True
    # Tansu keeps its log and its groups in memory.  Restarted, it answers a fetch
    # past the end of the new log with nothing (a real Kafka says
    # OFFSET_OUT_OF_RANGE, and the consumer starts over), and the rejoining group
    # has no committed offsets, so it starts at the end: a request sent meanwhile
    # goes unread, and for a while it refuses some records (UNKNOWN_SERVER_ERROR,
    # which fails that request at once).  After such a restart a send may need retries.
    restart_forgets_the_log: bool = False
    # The server logs one line when it loses its broker (and one when it is
    # back), whoever reconnects; aiokafka reconnects without telling.
    says_when_lost: bool = True

    @property
    def id(self) -> str:
        return self.transport.name


def _rmq_queue(url: str) -> dict[str, Any]:
    return {
        "urls": [url],
        "queue": f"contract_{RUN}",
        "queue_options": {"durable": False, "auto_delete": True},
        "socket_options": {"reconnect_time_in_seconds": 0.2},
    }


def _kafka(url: str) -> dict[str, Any]:
    return brokers.kafka_options(url, consumer={"group_id": f"contract-{RUN}"})


KITS = [
    Kit(
        Transport.TCP,
        "",
        lambda url: {"host": "127.0.0.1", "port": int(url) if url else 0},
        lambda url, app: {"port": app.server.port},  # type: ignore[attr-defined]
        says_when_lost=False,  # no broker: its outage is the server's own restart
    ),
    Kit(
        Transport.REDIS,
        "redis",
        lambda url: {"url": url, "retry_delay": 0.1},
        lambda url, app: {"url": url},
        unknown_pattern=EMPTY_RESPONSE.format,
    ),
    Kit(
        Transport.NATS,
        "nats",
        lambda url: {"servers": url, "reconnect_time_wait": 0.05},
        lambda url, app: {"servers": url, "reconnect_time_wait": 0.05},
        unknown_pattern=EMPTY_RESPONSE.format,
    ),
    Kit(
        Transport.MQTT,
        "mqtt",
        lambda url: {"url": url, "reconnect_period": 0.1},
        lambda url, app: {"url": url, "reconnect_period": 0.1},
        unknown_pattern=None,
    ),
    Kit(Transport.RMQ, "rmq", _rmq_queue, lambda url, app: _rmq_queue(url)),
    Kit(
        Transport.KAFKA,
        "kafka",
        _kafka,
        lambda url, app: brokers.kafka_options(url),
        value=str,
        unknown_pattern=None,
        in_flight_fails_at_once=False,
        restart_forgets_the_log=True,
        says_when_lost=False,
    ),
]


async def outage(kit: Kit, rabbit: Any) -> Outage:
    """A private broker of the kit's kind, which the test may stop and start."""
    if kit.kind == "rmq":
        if rabbit is None:
            raise brokers.BrokerUnavailable("the private RabbitMQ node could not start")
        await asyncio.to_thread(rabbit.wait_booted)
        return Outage(
            rabbit.url,
            lambda: rabbit.restart_app("stop_app"),
            lambda: rabbit.restart_app("start_app"),
        )
    port = brokers.free_port()
    started = [await asyncio.to_thread(brokers.start, kit.kind, port)]

    def start() -> None:
        started.append(brokers.start(kit.kind, port))

    return Outage(started[0].url, lambda: started[-1].stop(), start)
