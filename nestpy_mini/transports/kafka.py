"""Kafka: Nest's ``server-kafka`` and ``client-kafka``, on aiokafka.

A request or event is one record on the topic named by the pattern (a string
such as ``"math.sum"``) whose value is the data itself, written and read as
Nest's serializer and ``KafkaParser`` do (``kafka_records``): a number travels
as its text.  Its headers name the correlation id and the reply topic and
partition; a reply's name the correlation id, the error and, on the last
record, the end.  A server commits only records it has finished with, as
Nest's kafkajs does (``kafka_commits``).  Settings are aiokafka's defaults
unless the options say otherwise, as Nest keeps kafkajs's: for Tansu, the dev
layer passes its own (``TANSU_TUNING``).
"""

from __future__ import annotations

import asyncio
import inspect
import random
from collections.abc import Callable
from functools import partial
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from aiokafka.errors import KafkaError

from ..exceptions import WiringError
from ..packets import dumps
from ..server import BaseRpcContext
from . import broker_urls
from .base import BrokerClient, BrokerServer, Subscriptions, arg, quietly, within
from .kafka_commits import Commits
from .kafka_records import TOPIC, TOPIC_RULE, KafkaMessage, Record, decode, serialize, valid_topic
from .kafka_records import encode as encode  # re-exported: the codec's other half

# Nest's KafkaHeaders and defaults (enums/kafka-headers.enum, constants).
CORRELATION_ID = "kafka_correlationId"
REPLY_TOPIC = "kafka_replyTopic"
REPLY_PARTITION = "kafka_replyPartition"
NEST_ERR = "kafka_nest-err"
NEST_IS_DISPOSED = "kafka_nest-is-disposed"
DEFAULT_CLIENT_ID, DEFAULT_GROUP_ID = "nestjs-consumer", "nestjs-group"
_DISPOSED = (NEST_IS_DISPOSED, b"\x00")
DEFAULT_JOIN_TIMEOUT, REPLY_TIMEOUT = 30.0, 5.0  # s: for the group's assignment, a reply's send
_HEARTBEAT = partial(asyncio.sleep, 0)  # Nest's context has one; aiokafka heartbeats itself
_NULL = object()  # passes aiokafka's assert of a key or value; serialized as no value
# kafkajs's option names unlike aiokafka's (``*_timeout`` and the like only lack
# ``_ms``), and those aiokafka has no setting for, or that this transport sets.
_RENAMES = {
    "timeout": "request_timeout_ms", "max_wait_time_in_ms": "fetch_max_wait_ms",
    "min_bytes": "fetch_min_bytes", "max_bytes": "fetch_max_bytes",
    "max_bytes_per_partition": "max_partition_fetch_bytes", "idempotent": "enable_idempotence",
    "compression": "compression_type", "ssl": "ssl_context",
}  # fmt: skip
_IGNORED = frozenset(
    "allow_auto_topic_creation retry log_level log_creator connection_timeout brokers client_id "
    "authentication_timeout reauthentication_threshold enforce_request_timeout socket_factory "
    "partition_assigners max_in_flight_requests create_partitioner group_id topics loop "
    "bootstrap_servers key_serializer value_serializer key_deserializer value_deserializer".split()
)

def _settings(options: dict[str, Any], where: str, *classes: type) -> dict[str, Any]:
    """Section ``where`` in aiokafka's names; a clear error for a name neither library has."""
    out: dict[str, Any] = {}
    for name, value in (options.get(where) or {}).items():
        if name in _IGNORED:
            continue
        setting = _RENAMES.get(name, name)
        if setting.endswith(("_timeout", "_interval", "_max_age")):
            setting += "_ms"
        if not all(setting in inspect.signature(cls).parameters for cls in classes):
            names = " and ".join(cls.__name__ for cls in classes)
            raise ValueError(f"Kafka option {where}.{name} is not a setting of {names}")
        out[setting] = value
    return out


class _Side:
    """What both sides have: Nest's options as aiokafka's settings, a producer,
    and a task reading a consumer.  aiokafka reconnects by itself (and logs it)."""

    postfix: str  # Nest's, set by each side
    logger: Any
    describe: Callable[[], str]
    _producer: AIOKafkaProducer | None = None
    _record_lost: Callable[[Any, BaseException], None]
    _consumer: AIOKafkaConsumer | None = None
    _reading: asyncio.Task[None] | None = None

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)  # type: ignore[call-arg]
        options = self.options  # type: ignore[attr-defined]
        client, consumer = options.get("client") or {}, options.get("consumer") or {}
        # Nest's postfix keeps a server and a client of one app in groups of their own.
        postfix = str(options.get("postfix_id", self.postfix))
        self.client_id = str(client.get("client_id") or DEFAULT_CLIENT_ID) + postfix
        self.group_id = str(consumer.get("group_id") or DEFAULT_GROUP_ID) + postfix
        self.given = client.get("brokers")
        common = _settings(options, "client", AIOKafkaProducer, AIOKafkaConsumer)
        both = {"client_id": self.client_id, **common}
        self.consumer = {**both, **_settings(options, "consumer", AIOKafkaConsumer)}
        self.producer = {**both, **_settings(options, "send", AIOKafkaProducer)}
        self.producer.update(_settings(options, "producer", AIOKafkaProducer))
        self.producer["value_serializer"] = lambda value: None if value is _NULL else value
        self.keep_binary = bool((options.get("parser") or {}).get("keep_binary"))

    def brokers(self) -> list[str]:
        """Those given, else ``KAFKA_BROKERS``, else Nest's default: read when connecting."""
        return broker_urls("kafka", self.given)

    async def _produce(
        self, topic: str, record: Record, delivered: bool = False, msg_id: str | None = None
    ) -> None:
        """Hand one record to the producer; with ``delivered``, wait until the broker has it."""
        if not TOPIC.fullmatch(topic):  # a reply topic a peer named, say
            raise ValueError(f"{topic!r} is not a Kafka topic name")
        if self._producer is None:
            raise ConnectionError(f"not connected to {self.describe()}")
        key, value, headers, partition, timestamp = record
        value = _NULL if value is None else value
        try:
            delivery = await self._producer.send(topic, value, key, partition, timestamp, headers)
            if delivered:
                await delivery
            else:  # a refusal reaches its request, or the log: never an unread exception
                delivery.add_done_callback(partial(self._undelivered, topic, msg_id))
        except KafkaError as exc:
            raise ConnectionError(f"could not publish to {topic!r}: {exc!r}") from exc

    def _undelivered(self, topic: str, msg_id: str | None, delivery: asyncio.Future[Any]) -> None:
        if not delivery.cancelled() and (exc := delivery.exception()) is not None:
            self._record_lost(msg_id, ConnectionError(f"could not deliver to {topic!r}: {exc!r}"))

    async def _read(self, consumer: AIOKafkaConsumer, handle: Callable[[Any], None]) -> None:
        while True:
            try:
                batches = await consumer.getmany(timeout_ms=1000)
            except KafkaError as exc:  # aiokafka goes on trying by itself
                self.logger.warning("reading from %s failed: %r", self.describe(), exc)
                await asyncio.sleep(0.5)
                continue
            for record in (r for records in batches.values() for r in records):
                try:
                    handle(record)
                except Exception:
                    self.logger.exception("dropped the record %s@%d", record.topic, record.offset)

    async def _stop_taking(self) -> None:
        """Stop reading; a server leaves its group, so its partitions move at once."""
        reading, consumer, self._reading, self._consumer = self._reading, self._consumer, None, None
        if reading is not None:
            reading.cancel()
            await asyncio.wait([reading])
        if consumer is not None:
            await quietly(consumer.stop(), self.logger, "stopping the consumer")

    async def _shutdown(self) -> None:
        await self._stop_taking()
        producer, self._producer = self._producer, None
        if producer is not None:  # stopping flushes what it still holds
            await quietly(producer.stop(), self.logger, "stopping the producer")


class KafkaContext(BaseRpcContext):
    """``args`` are ``(message, partition, topic, consumer, heartbeat, producer)``, as in Nest."""

    __slots__ = ()

    get_message = arg(0)
    get_partition = arg(1)
    get_topic = arg(2)
    get_consumer = arg(3)
    get_heartbeat = arg(4)
    get_producer = arg(5)


class _Replies:
    """Writes one request's reply records in order, each once the handler lets the
    loop run: so a stream's end mark, made while its last value waits, rides on it,
    as in Nest's ``Server#send``.  Alone, the mark would be a record with no value,
    which a Nest client (and ours) delivers as one more null."""

    def __init__(self, server: KafkaServer, topic: str, partition: Any, correlation: bytes) -> None:
        self.server, self.topic, self.correlation = server, topic, correlation
        # Nest's parseFloat(header): a partition, or the producer's choice.
        self.partition = int(partition) if partition and partition.isdigit() else None
        self.waiting: list[Record] = []
        self.sending = False

    def __call__(self, packet: dict[str, Any]) -> None:
        err = packet.get("err")
        if self.waiting and packet.get("isDisposed") and "response" not in packet and not err:
            self.waiting[-1][2].append(_DISPOSED)
            return
        key, value, headers, partition, timestamp = serialize(packet.get("response"))
        headers.append((CORRELATION_ID, self.correlation))
        if err:
            text = dumps(err) if isinstance(err, dict | list) else str(err)
            headers.append((NEST_ERR, text.encode()))
        if packet.get("isDisposed"):
            headers.append(_DISPOSED)
        partition = partition if self.partition is None else self.partition
        self.waiting.append((key, value, headers, partition, timestamp))
        if not self.sending:
            self.sending = True
            self.server._spawn(self._send())

    async def _send(self) -> None:
        try:
            while self.waiting:
                sending = self.server._produce(self.topic, self.waiting.pop(0))
                await within(sending, REPLY_TIMEOUT, f"replying on {self.topic!r}")
        except Exception as exc:  # the broker is gone, or the reply topic cannot be
            dropped, self.waiting = 1 + len(self.waiting), []
            self.server.logger.warning("dropped %d replies to %r: %r", dropped, self.topic, exc)
        finally:
            self.sending = False


class KafkajsRoundRobin(RoundRobinPartitionAssignor):
    """Round robin under kafkajs's name, the one Nest offers, so both can share a group."""

    name = "RoundRobinAssigner"
    version = 0


class KafkaServer(_Side, BrokerServer, ConsumerRebalanceListener):
    """Serves handlers over Kafka, as Nest's server does: in one consumer group.  Options
    are Nest's in snake_case (``client``, ``consumer``, ``run``...), and ``join_timeout``."""

    kind = transport_name = "kafka"
    postfix = "-server"

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        self.join_timeout = float(self.options.get("join_timeout", DEFAULT_JOIN_TIMEOUT))
        run = self.options.get("run") or {}
        from_beginning = (self.options.get("subscribe") or {}).get("from_beginning")
        self.consumer = {
            "group_id": self.group_id,
            # Nest's default (from_beginning false): a new group starts at the end.
            "auto_offset_reset": "earliest" if from_beginning else "latest",
            "enable_auto_commit": False,  # commits of finished records only: kafka_commits
            "partition_assignment_strategy": (KafkajsRoundRobin,),
            **self.consumer,
        }
        self.assignment: set[tuple[str, int]] = set()
        self._joined: asyncio.Future[None] | None = None
        every = int(run.get("auto_commit_interval", 1000)) / 1000
        self._every = every if run.get("auto_commit", True) else None
        self._commits: Commits | None = None

    def _record_lost(self, msg_id: str | None, error: BaseException) -> None:  # a reply
        self.logger.warning("%s", error)

    async def listen(self) -> None:  # connect and subscribe, then wait for the assignment
        await super().listen()
        if self._joined is not None:
            try:
                await within(self._joined, self.join_timeout, f"joining group {self.group_id}")
            except BaseException:
                await self.close()
                raise

    async def _open(self) -> None:
        # A controller shared with other transports may hold object patterns too.
        bad = [route for route in self.patterns if not TOPIC.fullmatch(route)]
        if bad and len(bad) == len(self.patterns):
            raise WiringError(f"no pattern of this app can be a Kafka topic ({TOPIC_RULE}): {bad}")
        if bad:
            self.logger.warning("not served over Kafka (%s): %s", TOPIC_RULE, ", ".join(bad))
        topics = [route for route in dict.fromkeys(self.patterns) if route not in bad]
        self.urls = self.brokers()
        self._producer = producer = AIOKafkaProducer(bootstrap_servers=self.urls, **self.producer)
        try:
            await producer.start()
            # Topics are created first (by the broker, on this metadata request):
            # one that appeared while the group formed would make it form twice.
            await asyncio.gather(*(producer.partitions_for(topic) for topic in topics))
            if not topics:  # no handlers: nothing to consume
                return
            self._consumer = AIOKafkaConsumer(bootstrap_servers=self.urls, **self.consumer)
            await self._consumer.start()
        except KafkaError as exc:
            raise ConnectionError(repr(exc)) from exc
        if self._every is not None:
            self._commits = Commits(self._consumer, self._every, self.logger)
            self._commits.start()
        self._joined = asyncio.get_running_loop().create_future()
        self._consumer.subscribe(topics, listener=self)  # the group forms from here
        self._reading = asyncio.ensure_future(self._read(self._consumer, self._on_record))

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self.assignment = set()
        if self._commits is not None:  # what was finished here, before others read on
            await self._commits.commit()

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        """Resolve and commit a position for each new partition: ``listen()`` returns
        after this, so no later request can fall before it (aiokafka would look a
        new group's end up later), and after a rebalance the next owner starts there."""
        try:
            if self._consumer is not None and assigned:
                positions = {tp: await self._consumer.position(tp) for tp in assigned}
                if self._commits is not None:
                    await self._consumer.commit(positions)
                    self._commits.reset(positions)
        except KafkaError as exc:
            self.logger.warning("could not commit new partitions' positions: %r", exc)
        self.assignment = {(tp.topic, tp.partition) for tp in assigned}
        if self._joined is not None and not self._joined.done():
            self._joined.set_result(None)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = super()._spawn(coro)
        if self._commits is not None:
            self._commits.hold(task)  # the record being dispatched stays uncommitted
        return task

    async def _stop_taking(self) -> None:
        commits, self._commits = self._commits, None
        if commits is not None:
            await commits.stop()
        await super()._stop_taking()

    def _on_record(self, record: Any) -> None:
        if self._commits is not None:
            self._commits.take(record)  # the tasks its dispatch spawns hold it
        value = record.value if self.keep_binary else decode(record.value)
        message, topic = KafkaMessage(record, value), record.topic
        args = (message, record.partition, topic, self._consumer, _HEARTBEAT, self._producer)
        # Nest's KafkaRequestDeserializer: the topic is the pattern and the
        # value the data; with no value at all, the data is the message.
        data = message if value is None else value
        headers = dict(record.headers or ())
        correlation, reply_topic = headers.get(CORRELATION_ID), headers.get(REPLY_TOPIC)
        if not correlation or not reply_topic or topic not in self.message_handlers:
            self.handle_event(topic, data, KafkaContext(args))
            return
        where = reply_topic.decode("utf-8", "replace")
        reply = _Replies(self, where, headers.get(REPLY_PARTITION), correlation)
        msg_id = correlation.decode("utf-8", "replace")
        self.handle_request(topic, data, msg_id, KafkaContext(args), reply)


class KafkaClient(_Side, BrokerClient):
    """A client for a Nest Kafka microservice: the server's options, ``timeout`` and
    ``producer_only_mode`` (no reply consumer: ``emit`` only).  Nest's client joins a
    group for its reply topics and must be told each pattern before ``connect()``;
    this one joins none: a pattern's first send assigns it a partition of
    ``<topic>.reply`` and waits for its end, so no rebalance pauses the others."""

    kind = transport_name = "kafka"
    postfix = "-client"  # Nest's; its group id is kept for reference: ours joins none

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        self.producer_only_mode = bool(self.options.get("producer_only_mode", False))
        self._record_lost = self._fail_request  # a request's record: the request fails at once
        self._early: list[str] = []
        self._replies = Subscriptions(self._assign)
        self.reply_partitions: dict[str, int] = {}  # the partition we read, per reply topic
        self._positions: dict[TopicPartition, int] = {}  # the next offset to read (_assign)

    def subscribe_to_response_of(self, pattern: Any) -> None:  # optional: readies it early
        self._early.append(valid_topic(pattern) + ".reply")

    async def _connect(self) -> None:
        self.urls = self.brokers()
        self._producer = AIOKafkaProducer(bootstrap_servers=self.urls, **self.producer)
        if not self.producer_only_mode:
            # "earliest": where a broker says our offset is past the log's end
            # (the log was made anew), all it holds is new.
            settings = {"auto_offset_reset": "earliest", **self.consumer}
            self._consumer = AIOKafkaConsumer(bootstrap_servers=self.urls, **settings)
        try:
            await self._producer.start()
            if self._consumer is not None:
                await self._consumer.start()
                for reply_topic in dict.fromkeys(self._early):
                    await self._replies.ensure(reply_topic)
        except BaseException as exc:
            await self._close()
            if isinstance(exc, KafkaError):
                raise ConnectionError(repr(exc)) from exc  # the base names the broker
            raise

    async def _close(self) -> None:
        await self._shutdown()
        for table in (self._replies, self.reply_partitions, self._positions):
            table.clear()

    async def _assign(self, reply_topic: str) -> None:
        """Take a partition of ``reply_topic`` and learn where it ends, before the first request."""
        consumer = self._require(self._consumer)
        try:  # the broker creates the topic on this request, where it may
            partitions = await self._require(self._producer).partitions_for(reply_topic)
        except KafkaError as exc:
            raise ConnectionError(f"no reply topic {reply_topic!r}: {exc!r}") from exc
        tp = TopicPartition(reply_topic, random.choice(sorted(partitions)))  # spreads clients
        self._positions[tp] = (await consumer.end_offsets([tp]))[tp]
        # assign() replaces the assignment and forgets every position, so each
        # partition is put back where it was; no await until all are.
        consumer.assign(list(self._positions))
        for each, offset in self._positions.items():
            consumer.seek(each, offset)
        self.reply_partitions[reply_topic] = tp.partition
        if self._reading is None:
            self._reading = asyncio.ensure_future(self._read(consumer, self._on_record))

    def _on_record(self, record: Any) -> None:
        self._positions[TopicPartition(record.topic, record.partition)] = record.offset + 1
        headers = dict(record.headers or ())
        correlation = headers.get(CORRELATION_ID)
        if correlation is None:
            self.logger.warning("dropped a record on %s without a correlation id", record.topic)
            return
        # Nest's KafkaResponseDeserializer, then createObserver: an error ends
        # the call; a last record delivers its value even when it has none (null).
        err = headers.get(NEST_ERR)
        if err is not None:
            packet = {"err": decode(err), "isDisposed": True}
        else:
            value = record.value if self.keep_binary else decode(record.value)
            packet = {"response": value, "isDisposed": NEST_IS_DISPOSED in headers}
        self._on_reply(packet, correlation.decode("utf-8", "replace"))

    def _publish(self, pattern: Any, data: Any, msg_id: str) -> Any:
        if self.producer_only_mode:
            raise WiringError("producer_only_mode: this client reads no replies; use emit()")
        topic = valid_topic(pattern)
        return self._unless_done(msg_id, self._send_request(topic, serialize(data), msg_id))

    async def _send_request(self, topic: str, record: Record, msg_id: str) -> None:
        reply_topic = topic + ".reply"
        if reply_topic not in self._replies.ready:
            await self._replies.ensure(reply_topic)
        partition = str(self.reply_partitions[reply_topic]).encode()
        ids = (CORRELATION_ID, msg_id.encode()), (REPLY_TOPIC, reply_topic.encode())
        record[2].extend([*ids, (REPLY_PARTITION, partition)])
        await self._produce(topic, record, msg_id=msg_id)

    async def _dispatch_event(self, pattern: Any, data: Any) -> None:
        topic = valid_topic(pattern)
        what = f"publishing to {topic!r} on {self.describe()}"
        await within(self._produce(topic, serialize(data), delivered=True), self.timeout, what)


SERVER = KafkaServer
CLIENT = KafkaClient
