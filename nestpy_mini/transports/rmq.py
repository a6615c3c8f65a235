"""RabbitMQ: Nest's ``server-rmq`` and ``client-rmq``, on aio-pika's robust connection.

All patterns share one queue.  A request goes to it (with ``wildcards`` or a fanout
exchange: to the exchange, its pattern as routing key) with ``reply_to`` (direct reply-to
by default) and its id as ``correlation_id``, which the reply carries back: as Nest's,
only the no-handler reply names the id in the body."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection
from aiormq.abc import AbstractChannel, ChannelFrame, DeliveredMessage
from pamqp.body import ContentBody
from pamqp.header import ContentHeader
from yarl import URL

from ..client import Record, RecordBuilder
from ..exceptions import ConnectionClosedError
from ..packets import NO_MESSAGE_HANDLER, dumps
from ..server import LARGE_MESSAGE, BaseRpcContext
from . import base, broker_urls, redact
from .base import BrokerClient, BrokerServer, Reply, pattern_text

# Nest's texts (constants.ts), logged when acks are on and no handler matches.
_NACKED = "It has been negative acknowledged, so it will not be re-delivered. Pattern: "
RMQ_NO_MESSAGE_HANDLER = "An unsupported message was received. " + _NACKED
RMQ_NO_EVENT_HANDLER = "An unsupported event was received. " + _NACKED
REPLY_QUEUE = "amq.rabbitmq.reply-to"  # Nest's default: no reply queue to declare
# amqplib's assertQueue shorthands, in snake_case: each sets the queue argument x-<name>.
QUEUE_ARGUMENTS = ("message_ttl", "expires", "dead_letter_exchange", "dead_letter_routing_key",
                   "max_length", "max_priority")
QUEUE_OPTIONS = {"durable", "exclusive", "auto_delete", "arguments", "no_assert", *QUEUE_ARGUMENTS}
Properties = aiormq.spec.Basic.Properties


class RmqRecord(Record):
    """Data plus per-message AMQP properties (snake_case, and ``persistent``), as Nest's."""


class RmqRecordBuilder(RecordBuilder):
    """``RmqRecordBuilder(data).set_options({...}).build()``, as in Nest."""
    record = RmqRecord


class RmqContext(BaseRpcContext):
    """``args`` are ``(message, channel, pattern)``, as in Nest's ``RmqContext``.  The
    aio-pika message is built on first use (14 µs): most handlers never ask for it."""

    __slots__ = ("_channel", "_delivered", "_message", "_no_ack", "_pattern")

    def __init__(self, delivered: DeliveredMessage, channel: Any, pattern: Any,
                 no_ack: bool) -> None:
        self._delivered, self._channel, self._pattern = delivered, channel, pattern
        self._no_ack, self._message = no_ack, None

    @property  # type: ignore[override]
    def args(self) -> tuple[Any, ...]:
        return (self.get_message(), self._channel, self.get_pattern())

    def get_message(self) -> aio_pika.IncomingMessage:
        """The delivery (``body``, ``headers``...); with ``no_ack`` off, ``await ....ack()``."""
        if self._message is None:
            self._message = aio_pika.IncomingMessage(self._delivered, no_ack=self._no_ack)
        return self._message

    def get_channel_ref(self) -> Any:
        return self._channel

    def get_pattern(self) -> str:
        return pattern_text(self._pattern)


def match_rmq_pattern(pattern: str, routing_key: str) -> bool:
    """Nest's ``matchRmqPattern``: ``*`` is one ``.``-segment, a final ``#`` the rest."""
    if not routing_key:
        return pattern == "#"
    parts, keys = pattern.split("."), routing_key.split(".")
    for i, part in enumerate(parts):
        if part == "#":
            return i == len(parts) - 1
        key = keys[i] if i < len(keys) else ""
        if part != key and (part != "*" or not key):
            return False
    return len(parts) == len(keys)


class _Link:
    """One side's robust connection and channel; aio-pika reconnects and declares the queue,
    exchange, bindings and prefetch again, then ``_reopened`` starts the consumer again.

    The hot path is aiormq's API on ``raw``, the channel under aio-pika's (its public
    ``get_underlay_channel()``): aio-pika's ``queue.consume`` adds a task and an
    ``IncomingMessage`` per delivery, its ``exchange.publish`` waits for each write and, in an
    outage, for the broker.  A pair, 100 in flight: 1,490 req/s on aio-pika's API, 3,680 on
    aiormq's; on a busier day, 3,070-3,260 without ``publish``'s batch, 3,900-4,060 with it."""

    def __init__(self, side: Any, start: Callable[[AbstractChannel], Awaitable[None]],
                 lost: Callable[[BaseException | None], None]) -> None:
        self.side, self._start, self._lost = side, start, lost
        self.options = options = side.options
        self.queue: str = options.get("queue") or ""
        queue_options = dict(options.get("queue_options") or {})
        if unknown := set(queue_options) - QUEUE_OPTIONS:
            raise ValueError(f"unknown queue_options: {', '.join(sorted(unknown))}")
        self.no_assert = bool(options.get("no_assert", queue_options.get("no_assert")))
        arguments = dict(queue_options.get("arguments") or {}) | {  # message_ttl: x-message-ttl
            "x-" + key.replace("_", "-"): queue_options[key]
            for key in QUEUE_ARGUMENTS if queue_options.get(key) is not None
        }
        self.declaration = {  # amqplib's assertQueue: durable unless told otherwise
            "durable": bool(queue_options.get("durable", True)), "arguments": arguments or None,
            **{key: bool(queue_options.get(key)) for key in ("exclusive", "auto_delete")}}
        self.by_exchange = options.get("wildcards") or options.get("exchange_type") == "fanout"
        self.exchange: str = options.get("exchange", self.queue) or ""  # as Nest's
        self.connection: AbstractRobustConnection | None = None
        self.channel: AbstractRobustChannel | None = None
        self.raw: AbstractChannel | None = None  # None while the broker is away
        self._batch = base.Batch(self._write)

    async def open(self, queue: bool, exchange: bool, keys: list[str]) -> None:
        """Connect to the first URL that answers; then, as Nest's ``setupChannel``, declare the
        ``queue``, the ``exchange``, bind them by ``keys``, set the prefetch, start consuming."""
        side, options, reasons, loop = self.side, self.options, [], asyncio.get_running_loop()
        deadline, socket = loop.time() + side.connect_timeout, options.get("socket_options") or {}
        tuning = {"reconnect_interval": socket.get("reconnect_time_in_seconds", 5.0),  # Nest's
                  "heartbeat": socket.get("heartbeat_interval_in_seconds", 5)}  # defaults (s)
        side.urls = broker_urls("rmq", options.get("urls"))
        for i, url in enumerate(side.urls):
            settings = {k: v for k, v in tuning.items() if k not in URL(url).query}  # URL's win
            connection = aio_pika.RobustConnection(URL(url), **settings)  # as connect_robust()
            try:  # each URL gets its share of what is left
                await connection.connect(timeout=(deadline - loop.time()) / (len(side.urls) - i))
                break
            except BaseException as exc:  # a robust connection left open would retry for ever
                await base.quietly(connection.close(), side.logger, "closing")
                if not isinstance(exc, Exception):
                    raise
                why = str(exc) or type(exc).__name__
                reasons.append(f"{redact(url)}: {why}" if len(side.urls) > 1 else why)
        else:
            raise ConnectionError("; ".join(reasons))
        try:
            self.connection, self.channel = connection, connection.channel(publisher_confirms=False)
            channel = await self.channel
            declared = queue and await channel.declare_queue(self.queue or None, **self.declaration)
            if exchange:
                kind, arguments = options.get("exchange_type"), options.get("exchange_arguments")
                await channel.declare_exchange(self.exchange, kind or "topic", durable=True,
                                               arguments=dict(arguments or {}))
            for key in keys:
                bound = declared or await channel.get_queue(self.queue, ensure=False)
                await bound.bind(self.exchange, key)
            self.queue = declared.name if declared else self.queue
            await channel.set_qos(int(options.get("prefetch_count") or 0),
                                  global_=bool(options.get("is_global_prefetch_count")))
            await self._start(raw := await channel.get_underlay_channel())
        except BaseException as exc:
            await self.close()
            if isinstance(exc, aiormq.exceptions.ChannelPreconditionFailed):
                raise ConnectionError(f"queue {self.queue!r}: {exc}; every peer must declare it "
                                      "with the same queue_options ({} is durable)") from exc
            raise
        self.raw = raw
        channel.close_callbacks.add(self._closed)
        channel.reopen_callbacks.add(self._reopened)

    def _closed(self, channel: Any, exc: BaseException | None) -> None:
        if self.raw is not None:  # else down already, or closed by close()
            self.raw = None
            base.log_lost(self.side.logger, self.side.describe(), exc)
            self._lost(exc)

    async def _reopened(self, channel: Any) -> None:
        try:
            await self._start(raw := await channel.get_underlay_channel())
        except Exception as exc:
            self.side.logger.error("could not consume again on %s: %r", self.side.describe(), exc)
            return
        self.raw = raw
        base.log_back(self.side.logger, self.side.describe())

    def publish(self, body: bytes, exchange: str, key: str, props: Any,
                wait: bool = False) -> Awaitable[None] | None:
        """One message, in this pass's batch; with ``wait``, until written.  Fails at once in an
        outage.  ``basic_publish`` costs a lock, a put, a ``message_id`` and a write each."""
        if (raw := self.raw) is None or raw.is_closed:
            raise ConnectionError(f"{self.side.describe()} is unreachable; reconnecting meanwhile")
        if len(key.encode()) > 255:
            raise ValueError(f"routing key too long (255 bytes at most): {key[:40]!r}...")
        size, number = raw.max_content_size, raw.number
        frames = [aiormq.spec.Basic.Publish(exchange=exchange, routing_key=key),
                  ContentHeader(body_size=len(body), properties=props),
                  *(ContentBody(body[i:i + size]) for i in range(0, len(body), size))]
        self._batch.add(ChannelFrame.marshall(number, frames).payload)
        return self._written(raw) if wait else None

    def _write(self, payloads: list[bytes]) -> Awaitable[None] | None:
        frame = ChannelFrame(payload=b"".join(payloads), should_close=False)
        if (raw := self.raw) is not None and raw.write_queue.full():
            return raw.write_queue.put(frame)  # the batch waits, and what follows it
        if raw is not None:  # else lost: what waits for a reply fails with the connection
            raw.write_queue.put_nowait(frame)
        return None

    async def _written(self, raw: AbstractChannel) -> None:
        """Until aiormq's writer has drained what is queued (an empty frame, last, tells)."""
        self._batch.flush()
        drained = asyncio.get_running_loop().create_future()
        await raw.write_queue.put(ChannelFrame(b"", False, drained))
        await base.within(drained, self.side.connect_timeout, f"writing to {self.side.describe()}")

    async def close(self) -> None:
        connection, self.connection, self.channel, self.raw = self.connection, None, None, None
        if connection is not None:
            await base.quietly(connection.close(), self.side.logger, "closing the connection")


class RmqServer(BrokerServer):
    """Serves handlers from one queue, as Nest's ``ServerRMQ``, with its options in
    snake_case (``urls`` are tried in order).  With ``no_ack`` False, handlers ack:
    ``await ctx.get_message().ack()``, and what no handler takes is nacked."""

    kind = transport_name = "rmq"

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        self.no_ack = bool(self.options.get("no_ack", True))
        self.wildcards = bool(self.options.get("wildcards"))
        self.consumer_tag: str | None = self.options.get("consumer_tag")
        self._link = _Link(self, self._consume, lambda exc: None)

    async def _open(self) -> None:
        """Nest's server ``setupChannel``: the queue, and an exchange bound by key and routes."""
        link, options = self._link, self.options
        exchange = bool(options.get("exchange")) or self.wildcards
        fanout = options.get("exchange_type") == "fanout"
        keys = [""] if fanout else list(filter(None, [options.get("routing_key")]))
        keys += self.patterns if self.wildcards else []
        await link.open(not link.queue or not link.no_assert, exchange, keys if exchange else [])

    async def _consume(self, raw: AbstractChannel) -> None:
        ok = await raw.basic_consume(self._link.queue, self._on_delivery, no_ack=self.no_ack,
                                     consumer_tag=self.consumer_tag, timeout=self.connect_timeout)
        self.consumer_tag = ok.consumer_tag

    async def _stop_taking(self) -> None:
        if (raw := self._link.raw) is not None and self.consumer_tag is not None:
            await base.quietly(raw.basic_cancel(self.consumer_tag), self.logger, "cancelling")

    async def _shutdown(self) -> None:
        await self._link.close()

    async def _on_delivery(self, delivered: DeliveredMessage) -> None:
        try:
            handled = await self._handle(delivered)
        except Exception as exc:  # bad input costs a log line, never the consumer
            self.logger.warning("dropped a message on %r: %r", self._link.queue, exc)
            handled = False
        if not handled and not self.no_ack:  # Nest's nack(message, false, false): not again
            nack = aio_pika.IncomingMessage(delivered).nack(requeue=False)
            await base.quietly(nack, self.logger, "nacking")

    async def _handle(self, delivered: DeliveredMessage) -> bool:  # False: nothing handles it
        if (message := self.read(delivered.body)) is None:
            return False
        route = self.route(message.pattern, len(delivered.body) > LARGE_MESSAGE)  # screened
        table = self.message_handlers if message.is_request else self.event_handlers
        if self.wildcards and route not in table:  # Nest: the exact route first
            text, wild = pattern_text(message.pattern), (k for k in table if "*" in k or "#" in k)
            route = next((key for key in wild if match_rmq_pattern(key, text)), route)
        ctx = RmqContext(delivered, self._link.channel, message.pattern, self.no_ack)
        if route not in table and not self.no_ack:
            text = RMQ_NO_MESSAGE_HANDLER if message.is_request else RMQ_NO_EVENT_HANDLER
            self.logger.warning("%s%.200s", text, ctx.get_pattern())
            if not message.is_request:
                return False
        properties = delivered.header.properties
        to, answer = properties.reply_to, Properties(correlation_id=properties.correlation_id)
        if to is None and message.is_request:
            self.logger.warning("request %.200r has no reply_to; its reply is dropped", message.id)
        reply = Reply(lambda body: self._link.publish(body, "", to, answer) if to else None, True)
        if message.is_request and route not in table:  # the one reply that names its id
            reply({"id": message.id, "err": NO_MESSAGE_HANDLER, "status": "error"})
        else:  # the others leave it to the correlation_id, as Nest's
            self.dispatch(message, route, ctx, lambda p: reply({k: p[k] for k in p if k != "id"}))
        await reply.flush(self.logger)
        return route in table


class RmqClient(BrokerClient):
    """A client with the server's options, plus ``reply_queue``, ``persistent``, ``headers``.
    While aio-pika reconnects it stays connected: what waits fails, new sends fail at once."""

    kind = transport_name = "rmq"

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        self.reply_queue: str = self.options.get("reply_queue") or REPLY_QUEUE
        self.delivery_mode = 2 if self.options.get("persistent") else 1
        self.headers: dict[str, Any] = dict(self.options.get("headers") or {})
        self._link = _Link(self, self._consume, lambda exc: self._fail_pending(
            ConnectionClosedError(f"connection to {self.describe()} closed: {exc}")))
        self.queue = self._link.queue

    async def _connect(self) -> None:
        """Nest's client ``setupChannel``: its queue (bound to ``exchange``), or its exchange."""
        link, key = self._link, self.options.get("routing_key")
        direct, exchange = not link.by_exchange, self.options.get("exchange")
        await link.open(direct and bool(link.queue) and not link.no_assert, not direct,
                        [key] if direct and exchange and key else [])

    async def _consume(self, raw: AbstractChannel) -> None:  # direct reply-to: without acks
        await raw.basic_consume(self.reply_queue, self._on_delivery, no_ack=True,
                                timeout=self.connect_timeout)

    def _on_delivery(self, delivered: DeliveredMessage) -> None:  # the id is aside
        self._on_body(delivered.body, delivered.header.properties.correlation_id)

    async def _close(self) -> None:
        await self._link.close()

    def _send(self, packet: dict[str, Any], wait: bool, **fields: Any) -> Awaitable[None] | None:
        """Publish ``packet``, with any ``RmqRecord``'s options as AMQP properties."""
        headers, record, fields["delivery_mode"] = self.headers, packet["data"], self.delivery_mode
        if isinstance(record, RmqRecord):
            packet["data"], options = record.data, dict(record.options or {})
            headers = {**headers, **(options.pop("headers", None) or {})}
            if "persistent" in options:
                fields["delivery_mode"] = 2 if options.pop("persistent") else 1
            fields |= {"message_type" if k == "type" else k: v for k, v in options.items()}
        body, properties = dumps(packet).encode(), Properties(headers=headers or None, **fields)
        link = self._link  # by the exchange with wildcards or fanout, as Nest's
        key = pattern_text(packet["pattern"]) if link.by_exchange else link.queue
        return link.publish(body, link.exchange if link.by_exchange else "", key, properties, wait)

    def _publish(self, pattern: Any, data: Any, msg_id: str) -> Awaitable[None] | None:
        packet = {"pattern": pattern, "data": data, "id": msg_id}  # the reply confirms it
        return self._send(packet, False, reply_to=self.reply_queue, correlation_id=msg_id)

    async def _dispatch_event(self, pattern: Any, data: Any) -> None:
        await self._send({"pattern": pattern, "data": data}, True)  # type: ignore[misc] # written


SERVER = RmqServer
CLIENT = RmqClient
