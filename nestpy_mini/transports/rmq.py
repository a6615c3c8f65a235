"""RabbitMQ: Nest's RMQ transport on aio-pika, wire-compatible with NestJS 12.

All patterns share one queue.  A request goes to that queue through the
default exchange (or, with ``wildcards`` or a fanout exchange, to the exchange
with the pattern as routing key), carrying ``reply_to`` (RabbitMQ's direct
reply-to pseudo-queue by default) and ``correlation_id`` equal to the body's
``id``.  The server routes on the body's ``pattern`` and answers with
``sendToQueue(reply_to)``: the reply body has **no** ``id`` (only the
no-handler reply does), so the client correlates on ``correlation_id`` alone.

Connections come from ``aio_pika.connect_robust``, which reconnects and
re-declares queues, exchanges, bindings and the prefetch setting.  The hot
path (publishing, consuming) talks to the underlying aiormq channel directly:
aio-pika's publish and consume wrappers cost an extra task and object per
message and would *wait* for a reconnect instead of failing fast.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import aiormq
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection, AbstractRobustQueue
from aiormq.abc import DeliveredMessage
from pamqp import commands as spec

from ..client import ClientProxy
from ..exceptions import RequestTimeoutError
from ..packets import ENVELOPE_KEYS as _ENVELOPE_KEYS
from ..packets import NO_MESSAGE_HANDLER
from ..packets import dumps as _dumps
from ..packets import loads as _loads
from ..patterns import route_of_incoming
from ..server import BaseRpcContext, Server
from . import base as brokers

logger = logging.getLogger("nestpy_mini.rmq")

# Nest's texts (constants.js), logged verbatim when an unhandled message is nacked.
RMQ_NO_MESSAGE_HANDLER = (
    "An unsupported message was received. It has been negative acknowledged, "
    "so it will not be re-delivered. Pattern: "
)
RMQ_NO_EVENT_HANDLER = (
    "An unsupported event was received. It has been negative acknowledged, "
    "so it will not be re-delivered. Pattern: "
)
# Nest's client default: RabbitMQ's direct reply-to, no reply queue to declare.
REPLY_QUEUE = "amq.rabbitmq.reply-to"
# amqp-connection-manager's defaults, which Nest inherits.
DEFAULT_RECONNECT_SECONDS = 5.0
DEFAULT_HEARTBEAT_SECONDS = 5
DEFAULT_CONNECT_TIMEOUT = 5.0
# Bounds for the waits that have no caller-given timeout.
REPLY_PUBLISH_TIMEOUT = 5.0
CLOSE_TIMEOUT = 5.0

# amqplib's assertQueue shorthands, as snake_case options, and the queue
# arguments they stand for.
_QUEUE_ARGUMENT_OPTIONS = {
    "message_ttl": "x-message-ttl",
    "expires": "x-expires",
    "dead_letter_exchange": "x-dead-letter-exchange",
    "dead_letter_routing_key": "x-dead-letter-routing-key",
    "max_length": "x-max-length",
    "max_priority": "x-max-priority",
}
_QUEUE_OPTIONS = frozenset(
    {"durable", "exclusive", "auto_delete", "arguments", "no_assert", *_QUEUE_ARGUMENT_OPTIONS}
)
# Per-message publish options (RmqRecord) and the AMQP property each sets.
_RECORD_PROPERTIES = {
    "headers": "headers",
    "priority": "priority",
    "delivery_mode": "delivery_mode",
    "expiration": "expiration",
    "message_id": "message_id",
    "timestamp": "timestamp",
    "type": "message_type",
    "user_id": "user_id",
    "app_id": "app_id",
    "content_type": "content_type",
    "content_encoding": "content_encoding",
}

# JSON.stringify's output: compact, UTF-8, no NaN.


class RmqRecord:
    """Data plus per-message publish options, as Nest's ``RmqRecord``.

    ``options`` are AMQP properties in snake_case: ``headers``, ``priority``,
    ``persistent``, ``expiration``, ``message_id``, ``timestamp``, ``type``,
    ``user_id``, ``app_id``, ``content_type``, ``content_encoding``.
    """

    __slots__ = ("data", "options")

    def __init__(self, data: Any, options: dict[str, Any] | None = None) -> None:
        unknown = set(options or ()) - {*_RECORD_PROPERTIES, "persistent"}
        if unknown:
            raise ValueError(f"unknown RmqRecord options: {', '.join(sorted(unknown))}")
        self.data = data
        self.options: dict[str, Any] = dict(options or {})


class RmqRecordBuilder:
    """``RmqRecordBuilder(data).set_options({...}).build()``, as in Nest."""

    def __init__(self, data: Any = None) -> None:
        self._data = data
        self._options: dict[str, Any] = {}

    def set_data(self, data: Any) -> RmqRecordBuilder:
        self._data = data
        return self

    def set_options(self, options: dict[str, Any]) -> RmqRecordBuilder:
        self._options = {**self._options, **options}
        return self

    def build(self) -> RmqRecord:
        return RmqRecord(self._data, self._options)


class RmqContext(BaseRpcContext):
    """``args`` are ``(message, channel, pattern)``, as in Nest's ``RmqContext``.

    The aio-pika ``IncomingMessage`` is built on first use: it costs more than
    decoding the packet, and most handlers never look at it.
    """

    __slots__ = ("_channel", "_delivered", "_message", "_no_ack", "_pattern")

    def __init__(
        self, delivered: DeliveredMessage, channel: Any, pattern: str, no_ack: bool
    ) -> None:
        self._delivered = delivered
        self._channel = channel
        self._pattern = pattern
        self._no_ack = no_ack
        self._message: aio_pika.IncomingMessage | None = None

    @property  # type: ignore[override]
    def args(self) -> tuple[Any, ...]:
        return (self.get_message(), self._channel, self._pattern)

    def get_args(self) -> tuple[Any, ...]:
        return self.args

    def get_arg_by_index(self, index: int) -> Any:
        return self.args[index]

    def get_message(self) -> aio_pika.IncomingMessage:
        """The delivery: ``body``, ``headers``, ``routing_key``... and, with
        ``no_ack`` off, ``await ctx.get_message().ack()`` (or ``nack``)."""
        if self._message is None:
            self._message = aio_pika.IncomingMessage(self._delivered, no_ack=self._no_ack)
        return self._message

    def get_channel_ref(self) -> Any:
        """The aio-pika channel the message arrived on."""
        return self._channel

    def get_pattern(self) -> str:
        """The pattern as a string (``JSON.stringify`` of an object, keys as sent)."""
        return self._pattern


def match_rmq_pattern(pattern: str, routing_key: str) -> bool:
    """Nest's ``matchRmqPattern``: ``*`` is one ``.``-segment, a final ``#`` the rest."""
    if not routing_key:
        return pattern == "#"
    pattern_parts = pattern.split(".")
    key_parts = routing_key.split(".")
    last = len(pattern_parts) - 1
    for i, part in enumerate(pattern_parts):
        key = key_parts[i] if i < len(key_parts) else ""
        if not key and not part:
            continue
        if not key and part != "#":
            return False
        if part == "#":
            return i == last
        if part not in ("*", key):
            return False
    return len(pattern_parts) == len(key_parts)


def _queue_declaration(options: dict[str, Any]) -> dict[str, Any]:
    """aio-pika ``declare_queue`` arguments for Nest's ``queueOptions``.

    amqplib's ``assertQueue`` makes a queue durable unless told otherwise, so
    ``{}`` means durable here too: a Nest peer must declare it identically.
    """
    unknown = set(options) - _QUEUE_OPTIONS
    if unknown:
        raise ValueError(
            f"unknown queue_options: {', '.join(sorted(unknown))} "
            f"(expected some of {', '.join(sorted(_QUEUE_OPTIONS))})"
        )
    arguments = dict(options.get("arguments") or {})
    for key, argument in _QUEUE_ARGUMENT_OPTIONS.items():
        if options.get(key) is not None:
            arguments[argument] = options[key]
    return {
        "durable": bool(options.get("durable", True)),
        "exclusive": bool(options.get("exclusive", False)),
        "auto_delete": bool(options.get("auto_delete", False)),
        "arguments": arguments or None,
    }


def _urls(options: dict[str, Any]) -> list[str]:
    urls = options.get("urls")
    if urls is None:
        return []
    return [urls] if isinstance(urls, str) else [str(u) for u in urls]


def _pattern_string(pattern: Any) -> str:
    """Nest's ``getPatternAsString``: a string as is, anything else as JSON."""
    return pattern if isinstance(pattern, str) else _dumps(pattern)


def _setup_error(where: str, exc: BaseException) -> ConnectionError:
    """The broker said no to a declaration: say which, and the usual reason."""
    hint = ""
    if isinstance(exc, aiormq.exceptions.ChannelPreconditionFailed):
        hint = (
            "; every peer of a queue must declare it with the same queue_options "
            "(Nest's default {} means durable)"
        )
    return ConnectionError(f"the broker refused the setup of {where}: {exc}{hint}")


def _describe_error(exc: BaseException, url: str) -> str:
    """An exception's text with the URL's password blanked out, just in case."""
    text = str(exc) or type(exc).__name__
    password = urlsplit(url).password
    return text.replace(password, "***") if password else text


async def _close_quietly(connection: AbstractRobustConnection) -> None:
    """Close within ``CLOSE_TIMEOUT``; a broker that is gone must not stall shutdown."""
    try:
        await asyncio.wait_for(connection.close(), CLOSE_TIMEOUT)
    except Exception as exc:
        logger.debug("closing the RabbitMQ connection: %s", exc)


class _RmqPeer:
    """What the server and the client share: options and the robust connection."""

    options: dict[str, Any]

    def _init_peer(self) -> None:
        options = self.options
        self.urls = _urls(options)
        self.url: str | None = None
        self.queue: str = options.get("queue") or ""
        queue_options = dict(options.get("queue_options") or {})
        self.queue_declaration = _queue_declaration(queue_options)
        self.no_assert = bool(options.get("no_assert", queue_options.get("no_assert", False)))
        self.prefetch_count = int(options.get("prefetch_count") or 0)
        self.is_global_prefetch_count = bool(options.get("is_global_prefetch_count", False))
        self.no_ack = bool(options.get("no_ack", True))
        self.wildcards = bool(options.get("wildcards", False))
        self.exchange_type_option: str | None = options.get("exchange_type")
        self.exchange_type = self.exchange_type_option or "topic"
        # Nest: getOptionsProp(options, 'exchange', options.queue).
        self.exchange: str = options.get("exchange", self.queue) or ""
        self.exchange_arguments = dict(options.get("exchange_arguments") or {})
        self.routing_key: str | None = options.get("routing_key")
        socket_options = dict(options.get("socket_options") or {})
        self.reconnect_seconds = float(
            socket_options.get("reconnect_time_in_seconds", DEFAULT_RECONNECT_SECONDS)
        )
        self.heartbeat_seconds = int(
            socket_options.get("heartbeat_interval_in_seconds", DEFAULT_HEARTBEAT_SECONDS)
        )
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        # The live aiormq channel, or None while the broker is unreachable.
        self._raw: aiormq.abc.AbstractChannel | None = None
        # True from a working setup until the connection is lost.
        self._up = False

    @property
    def _exchange_mode(self) -> bool:
        """Publishing to an exchange by pattern instead of to the queue."""
        return self.wildcards or self.exchange_type_option == "fanout"

    def _where(self) -> str:
        urls = [self.url] if self.url else self.urls
        where = ", ".join(brokers.redact(u) for u in urls) or "rmq"
        return f"{where} (queue {self.queue!r})"

    async def _open_connection(self, budget: float) -> AbstractRobustConnection:
        """Connect to the first reachable URL within ``budget`` seconds.

        Reconnects go to the URL that answered first.  A connection whose
        first attempt failed (or was cancelled) is closed here, or its
        reconnect loop would outlive the attempt.
        """
        urls = self.urls or [",".join(brokers.broker_urls("rmq", None))]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget
        reasons: list[str] = []
        for url in urls:
            remaining = deadline - loop.time()
            if remaining <= 0:
                reasons.append(f"{brokers.redact(url)}: not tried, out of time")
                continue
            made: list[AbstractRobustConnection] = []

            def factory(*args: Any, _made: list[Any] = made, **kwargs: Any) -> Any:
                _made.append(aio_pika.RobustConnection(*args, **kwargs))
                return _made[-1]

            # Settings already in the URL's query win over socket_options' defaults.
            query = urlsplit(url).query
            tuning = {
                key: value
                for key, value in (
                    ("reconnect_interval", self.reconnect_seconds),
                    ("heartbeat", self.heartbeat_seconds),
                )
                if f"{key}=" not in query
            }
            try:
                connection = await aio_pika.connect_robust(
                    url,
                    timeout=remaining,
                    connection_class=factory,  # type: ignore[arg-type]
                    **tuning,
                )
            except asyncio.CancelledError:
                for conn in made:
                    await _close_quietly(conn)
                raise
            except Exception as exc:
                for conn in made:
                    await _close_quietly(conn)
                reasons.append(f"{brokers.redact(url)}: {_describe_error(exc, url)}")
                continue
            self.url = url
            return connection
        raise ConnectionError("; ".join(reasons))

    async def _declare_server(self, channel: AbstractRobustChannel, routes: list[str]) -> str:
        """Nest's server ``setupChannel`` minus the consumer; returns the queue's name.

        Declared through aio-pika's robust channel, so all of it is declared
        again after a reconnect.
        """
        name = self.queue
        queue: AbstractRobustQueue | None = None
        if self.queue == "" or not self.no_assert:  # an unnamed queue is always declared
            queue = await channel.declare_queue(self.queue or None, **self.queue_declaration)
            name = queue.name
        if self.options.get("exchange") or self.wildcards:
            exchange = await channel.declare_exchange(
                self.exchange, self.exchange_type, durable=True, arguments=self.exchange_arguments
            )
            bound = queue or await channel.get_queue(name, ensure=False)
            fanout = self.exchange_type_option == "fanout"
            if self.routing_key or fanout:
                await bound.bind(exchange, "" if fanout else self.routing_key)
            if self.wildcards:  # every handler's route is a binding key
                for route in routes:
                    await bound.bind(exchange, route)
        await channel.set_qos(
            prefetch_count=self.prefetch_count, global_=self.is_global_prefetch_count
        )
        return name

    async def _declare_client(self, channel: AbstractRobustChannel) -> None:
        """Nest's client ``setupChannel`` minus the reply consumer."""
        if not self._exchange_mode:
            queue: AbstractRobustQueue | None = None
            if not self.no_assert and self.queue:
                queue = await channel.declare_queue(self.queue, **self.queue_declaration)
            if self.options.get("exchange") and self.routing_key:
                bound = queue or await channel.get_queue(self.queue, ensure=False)
                await bound.bind(self.options["exchange"], self.routing_key)
        else:
            await channel.declare_exchange(
                self.exchange, self.exchange_type, durable=True, arguments=self.exchange_arguments
            )
        await channel.set_qos(
            prefetch_count=self.prefetch_count, global_=self.is_global_prefetch_count
        )


class RmqServer(_RmqPeer, Server):
    """Serves handlers from one RabbitMQ queue, as Nest's ``ServerRMQ``.

    Options (Nest's names in snake_case): ``urls`` (the first that answers
    is used; default: ``brokers.find("rmq")``), ``queue``, ``queue_options``
    (``durable`` defaults to True as in amqplib; ``exclusive``,
    ``auto_delete``, ``arguments``, ``message_ttl``...), ``prefetch_count``
    (0), ``is_global_prefetch_count``, ``no_ack`` (True; when False, handlers
    ack through ``await ctx.get_message().ack()`` and Nest never acks for
    them), ``no_assert``, ``exchange``, ``exchange_type`` ("topic"),
    ``exchange_arguments``, ``routing_key``, ``wildcards``, ``consumer_tag``,
    ``socket_options`` (``reconnect_time_in_seconds``,
    ``heartbeat_interval_in_seconds``), and ``connect_timeout``.
    """

    transport_name = "rmq"

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        Server.__init__(self, options)
        self._init_peer()
        self.consumer_tag: str | None = self.options.get("consumer_tag")
        self.connect_timeout = float(self.options.get("connect_timeout", DEFAULT_CONNECT_TIMEOUT))
        self.queue_name = self.queue
        self._wild_messages: list[str] = []
        self._wild_events: list[str] = []

    @property
    def address(self) -> str:
        return self._where()

    async def listen(self) -> None:
        """Connect, declare and start consuming; returns once messages flow."""
        self._wild_messages = [k for k in self.message_handlers if "*" in k or "#" in k]
        self._wild_events = [k for k in self.event_handlers if "*" in k or "#" in k]
        try:
            connection = await self._open_connection(self.connect_timeout)
        except ConnectionError as exc:
            raise ConnectionError(f"cannot connect to {self._where()}: {exc}") from exc
        try:
            await asyncio.wait_for(self._setup(connection), self.connect_timeout)
        except BaseException as exc:
            self._raw, self._channel, self._up = None, None, False
            await _close_quietly(connection)
            if isinstance(exc, TimeoutError):
                raise ConnectionError(
                    f"setting up {self._where()} took longer than {self.connect_timeout:g} s"
                ) from exc
            if isinstance(exc, aiormq.exceptions.AMQPError):
                raise _setup_error(self._where(), exc) from exc
            raise
        self._connection = connection
        connection.close_callbacks.add(self._on_connection_closed)

    async def _setup(self, connection: AbstractRobustConnection) -> None:
        channel = await connection.channel(publisher_confirms=False)
        self.queue_name = await self._declare_server(channel, self.patterns)
        self._channel = channel  # contexts refer to it from the first delivery on
        await self._consume(await channel.get_underlay_channel())
        channel.close_callbacks.add(self._on_channel_closed)
        channel.reopen_callbacks.add(self._on_channel_reopened)

    async def _consume(self, raw: aiormq.abc.AbstractChannel) -> None:
        ok = await raw.basic_consume(
            self.queue_name,
            self._on_message,
            no_ack=self.no_ack,
            consumer_tag=self.consumer_tag,
            timeout=self.connect_timeout,
        )
        self.consumer_tag = ok.consumer_tag
        self._raw = raw
        self._up = True

    # --- connection state -----------------------------------------------------
    def _on_connection_closed(self, sender: Any, exc: BaseException | None) -> None:
        # aio-pika calls this for every failed reconnect attempt too: log once.
        if sender is self._connection and self._up:
            self._up = False
            self._raw = None
            self.logger.warning(
                "lost the connection to %s (%s); reconnecting every %g s",
                self._where(),
                exc,
                self.reconnect_seconds,
            )

    def _on_channel_closed(self, sender: Any, exc: BaseException | None) -> None:
        if sender is self._channel:
            self._raw = None

    async def _on_channel_reopened(self, channel: AbstractRobustChannel) -> None:
        """aio-pika re-declared the queue and prefetch; our own consumer is ours to restore."""
        if channel is not self._channel or self._connection is None:
            return
        await self._consume(await channel.get_underlay_channel())
        self.logger.info("consuming %r again on %s", self.queue_name, self._where())

    # --- dispatch ---------------------------------------------------------------
    def _resolve(self, route: str, pattern: str, table: dict[str, Any], wild: list[str]) -> str:
        """With ``wildcards``, an exact route first, then the first matching ``*``/``#`` key."""
        if route in table or not wild:
            return route
        for key in wild:
            if match_rmq_pattern(key, pattern):
                return key
        return route

    async def _on_message(self, delivered: DeliveredMessage) -> None:
        try:
            await self._dispatch(delivered)
        except Exception as exc:  # bad input must cost one log line, never the consumer
            self.logger.warning("dropped a message on %r: %r", self.queue_name, exc)
            await self._nack(delivered)

    async def _dispatch(self, delivered: DeliveredMessage) -> None:
        try:
            packet = _loads(delivered.body)
        except (ValueError, RecursionError):
            packet = None
        if not isinstance(packet, dict) or ("pattern" not in packet and "data" not in packet):
            self.logger.warning(
                "dropped a message on %r that is not a Nest packet: %r",
                self.queue_name,
                delivered.body[:80],
            )
            await self._nack(delivered)
            return
        pattern = packet.get("pattern")
        pattern_text = "" if "pattern" not in packet else _pattern_string(pattern)
        route = route_of_incoming(pattern) if pattern is not None else ""
        ctx = RmqContext(delivered, self._channel, pattern_text, self.no_ack)
        if "id" not in packet:  # only a missing id makes an event; "id": null is a request
            route = self._resolve(route, pattern_text, self.event_handlers, self._wild_events)
            if route not in self.event_handlers and not self.no_ack:
                self.logger.warning("%s%s", RMQ_NO_EVENT_HANDLER, pattern_text)
                await self._nack(delivered)
                return
            self.handle_event(route, packet.get("data"), ctx)
            return
        properties = delivered.header.properties
        reply = _Reply(self, properties.reply_to, properties.correlation_id)
        if properties.reply_to is None:
            self.logger.warning("request %r has no reply_to; its reply is dropped", packet["id"])
        route = self._resolve(route, pattern_text, self.message_handlers, self._wild_messages)
        if route not in self.message_handlers:
            if not self.no_ack:
                self.logger.warning("%s%s", RMQ_NO_MESSAGE_HANDLER, pattern_text)
                await self._nack(delivered)
            # The only reply with an id, in Nest's key order.
            reply.send({"id": packet["id"], "err": NO_MESSAGE_HANDLER, "status": "error"})
        else:
            self.handle_request(route, packet.get("data"), packet["id"], ctx, reply)
        # Replies made while the handler ran synchronously go out from this
        # delivery's task, instead of the base spawning a task for each.
        collected, reply.collected = reply.collected, None
        for body in collected or ():
            await reply.publish(body)

    async def _nack(self, delivered: DeliveredMessage) -> None:
        """Reject without requeue (Nest's ``nack(msg, false, false)``); only when acks are on."""
        if self.no_ack or delivered.delivery_tag is None:
            return
        try:
            await delivered.channel.basic_nack(delivered.delivery_tag, requeue=False)
        except Exception as exc:
            self.logger.warning("could not nack a message: %s", exc)

    async def _publish_reply(self, reply_to: str, correlation_id: str | None, body: bytes) -> None:
        raw = self._raw
        if raw is None:
            self.logger.warning(
                "could not deliver a reply to %s: the broker is unreachable", reply_to
            )
            return
        try:
            await raw.basic_publish(
                body,
                routing_key=reply_to,
                properties=spec.Basic.Properties(correlation_id=correlation_id),
                timeout=REPLY_PUBLISH_TIMEOUT,
                wait=False,
            )
        except Exception as exc:
            self.logger.warning("could not deliver a reply to %s: %s", reply_to, exc)

    async def close(self) -> None:
        """Stop consuming, let running handlers reply, then close the connection."""
        connection, self._connection = self._connection, None
        if connection is None:
            return
        channel = self._channel
        if channel is not None:
            channel.reopen_callbacks.discard(self._on_channel_reopened)
        raw = self._raw
        if raw is not None and self.consumer_tag is not None and not raw.is_closed:
            try:
                await raw.basic_cancel(self.consumer_tag, timeout=CLOSE_TIMEOUT)
            except Exception as exc:
                self.logger.debug("cancelling the consumer: %s", exc)
        await self.drain()
        self._raw = None
        self._channel = None
        await _close_quietly(connection)


class _Reply:
    """The reply function for one request: strips ``id`` and publishes to ``reply_to``."""

    __slots__ = ("collected", "correlation_id", "reply_to", "server")

    def __init__(self, server: RmqServer, reply_to: str | None, correlation_id: str | None) -> None:
        self.server = server
        self.reply_to = reply_to
        self.correlation_id = correlation_id
        # Bodies held while the handler runs synchronously; None afterwards.
        self.collected: list[bytes] | None = []

    def __call__(self, packet: dict[str, Any]) -> Awaitable[None] | None:
        # Nest's RMQ server never puts the id in a reply: correlation_id does that job.
        packet.pop("id", None)
        return self.send(packet)

    def send(self, packet: dict[str, Any]) -> Awaitable[None] | None:
        body = _dumps(packet).encode()  # raises here, so the base can answer an error instead
        if self.reply_to is None:
            return None
        if self.collected is not None:
            self.collected.append(body)
            return None
        return self.publish(body)

    def publish(self, body: bytes) -> Awaitable[None]:
        assert self.reply_to is not None
        return self.server._publish_reply(self.reply_to, self.correlation_id, body)


class RmqClient(_RmqPeer, ClientProxy):
    """A client for a Nest RMQ microservice (or a nestpy_mini one).

    Options: the server's (``urls``, ``queue``, ``queue_options``,
    ``prefetch_count``, ``is_global_prefetch_count``, ``no_assert``,
    ``exchange``, ``exchange_type``, ``exchange_arguments``, ``routing_key``,
    ``wildcards``, ``socket_options``) plus ``reply_queue`` (RabbitMQ's direct
    reply-to by default), ``persistent`` (delivery mode 2), ``headers`` (added
    to every message), ``timeout`` and ``connect_timeout``.  Replies are
    always consumed without acks: direct reply-to refuses anything else.
    """

    transport_name = "rmq"

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        ClientProxy.__init__(self, options)
        self._init_peer()
        self.reply_queue: str = self.options.get("reply_queue") or REPLY_QUEUE
        self.persistent = bool(self.options.get("persistent", False))
        self.headers: dict[str, Any] = dict(self.options.get("headers") or {})
        self._delivery_mode = 2 if self.persistent else 1

    def describe(self) -> str:
        return f"rmq {self._where()}"

    async def _connect(self) -> None:
        if self._connection is not None:
            # The robust connection reconnects by itself; say so instead of waiting.
            if self._raw is not None:
                return
            raise ConnectionError(
                "the broker connection is down; reconnecting every "
                f"{self.reconnect_seconds:g} s in the background"
            )
        connection = await self._open_connection(self.connect_timeout)
        try:
            await self._setup(connection)
        except BaseException as exc:
            self._raw, self._channel, self._up = None, None, False
            await _close_quietly(connection)
            if isinstance(exc, aiormq.exceptions.AMQPError):
                raise _setup_error(f"queue {self.queue!r}", exc) from exc
            raise
        self._connection = connection
        connection.close_callbacks.add(self._on_connection_closed)

    async def _setup(self, connection: AbstractRobustConnection) -> None:
        channel = await connection.channel(publisher_confirms=False)
        await self._declare_client(channel)
        self._channel = channel
        await self._consume_replies(await channel.get_underlay_channel())
        channel.close_callbacks.add(self._on_channel_closed)
        channel.reopen_callbacks.add(self._on_channel_reopened)

    async def _consume_replies(self, raw: aiormq.abc.AbstractChannel) -> None:
        # Direct reply-to works only for messages published on the channel
        # that consumes it, so requests go out on this same channel.
        await raw.basic_consume(
            self.reply_queue, self._on_reply_message, no_ack=True, timeout=self.connect_timeout
        )
        self._raw = raw
        self._up = True

    def _on_connection_closed(self, sender: Any, exc: BaseException | None) -> None:
        # aio-pika calls this for every failed reconnect attempt too: act once.
        if sender is self._connection and self._up:
            self._up = False
            self._raw = None
            logger.warning("lost the connection to %s (%s); reconnecting", self._where(), exc)
            self._on_connection_lost(exc)

    def _on_channel_closed(self, sender: Any, exc: BaseException | None) -> None:
        if sender is self._channel and self._connection is not None:
            # Replies to the old channel's reply-to address can never arrive.
            self._raw = None
            self._on_connection_lost(exc)

    async def _on_channel_reopened(self, channel: AbstractRobustChannel) -> None:
        if channel is self._channel and self._connection is not None:
            await self._consume_replies(await channel.get_underlay_channel())
            logger.info("connected to %s again", self._where())

    async def close(self) -> None:
        await super().close()
        # The base closes only a connected client; a robust connection that is
        # still reconnecting must be closed too, or it retries forever.
        await self._close()

    async def _close(self) -> None:
        connection, self._connection = self._connection, None
        self._raw = None
        self._channel = None
        if connection is not None:
            await _close_quietly(connection)

    # --- the hot path -------------------------------------------------------------
    async def _on_reply_message(self, message: DeliveredMessage) -> None:
        correlation_id = message.header.properties.correlation_id
        if correlation_id not in self._routing:  # checked before parsing: cheap to drop
            logger.debug("dropped a reply for an unknown correlation_id %r", correlation_id)
            return
        try:
            body = _loads(message.body)
        except (ValueError, RecursionError):
            logger.warning("dropped a reply for %r that is not JSON", correlation_id)
            return
        if isinstance(body, dict) and body and body.keys() <= _ENVELOPE_KEYS:
            body["id"] = correlation_id  # Nest's server leaves the id out of RMQ replies
            self._on_reply(body)
        else:  # a foreign reply is the response itself, as Nest reads it
            self._on_reply({"id": correlation_id, "response": body, "isDisposed": True})

    def _properties(self, data: Any, **extra: Any) -> tuple[Any, spec.Basic.Properties]:
        """The data to send and its AMQP properties, after any ``RmqRecord`` options."""
        fields: dict[str, Any] = {"delivery_mode": self._delivery_mode, **extra}
        headers = self.headers
        if isinstance(data, RmqRecord):
            options = data.options
            data = data.data
            if "persistent" in options:
                fields["delivery_mode"] = 2 if options["persistent"] else 1
            for key, value in options.items():
                if key == "headers":
                    headers = {**headers, **(value or {})}
                elif key != "persistent":
                    fields[_RECORD_PROPERTIES[key]] = value
        return data, spec.Basic.Properties(headers=headers, **fields)

    async def _send_raw(
        self, body: bytes, pattern: Any, properties: Any, limit: float, wait: bool
    ) -> None:
        raw = self._raw
        if raw is None:
            raise ConnectionError(f"not connected to {self.describe()}: the broker is unreachable")
        if self._exchange_mode:
            exchange, routing_key = self.exchange, _pattern_string(pattern)
        else:
            exchange, routing_key = "", self.queue
        try:
            await raw.basic_publish(
                body,
                exchange=exchange,
                routing_key=routing_key,
                properties=properties,
                timeout=limit,
                wait=wait,
            )
        except TimeoutError as exc:
            raise RequestTimeoutError(
                f"publishing to {self.describe()} took longer than {limit:g} s"
            ) from exc
        except (aiormq.exceptions.AMQPError, RuntimeError) as exc:
            raise ConnectionError(f"could not publish to {self.describe()}: {exc}") from exc

    async def _publish(self, pattern: Any, data: Any, msg_id: str) -> None:
        data, properties = self._properties(data, reply_to=self.reply_queue, correlation_id=msg_id)
        body = _dumps({"pattern": pattern, "data": data, "id": msg_id}).encode()
        call = self._routing.get(msg_id)
        # No wait for the socket write: the reply is the confirmation that matters.
        limit = call.timeout if call else self.timeout
        await self._send_raw(body, pattern, properties, limit, wait=False)

    async def _dispatch_event(self, pattern: Any, data: Any) -> None:
        data, properties = self._properties(data)
        body = _dumps({"pattern": pattern, "data": data}).encode()
        # An event has no reply: waiting for the write is what "emitted" can mean.
        await self._send_raw(body, pattern, properties, self.timeout, wait=True)


SERVER = RmqServer
CLIENT = RmqClient
