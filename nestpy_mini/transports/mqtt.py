"""MQTT: Nest's ``server-mqtt`` and ``client-mqtt``, on aiomqtt (paho-mqtt underneath).

Each handler's normalized pattern is a topic (``{"cmd":"sum"}`` is one); a request is
``{"pattern", "data", "id"}`` on it, and its replies come back on ``<topic>/reply`` at
QoS 0, subscribed before the first request.  ``+``/``#`` and ``$share/<group>/`` handlers
match as Nest's."""

from __future__ import annotations

import asyncio
import logging
import secrets
import ssl
import sys
from collections.abc import Awaitable, Callable
from functools import partial, partialmethod
from typing import Any
from urllib.parse import unquote, urlsplit

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ..client import Record, RecordBuilder
from ..exceptions import NoRespondersError
from ..packets import EMPTY_RESPONSE, dumps
from ..patterns import normalize_pattern
from ..server import LARGE_MESSAGE, BaseRpcContext
from . import base, broker_urls
from . import mqtt_fast as fast
from .base import arg

REPLY_SUFFIX = "/reply"
How = tuple[int, bool, Properties | None]  # a publish's QoS, retain flag and properties
logger = logging.getLogger("nestpy_mini.mqtt")
_closing: set[asyncio.Task[None]] = set()  # connections given up on, being closed


class MqttRecord(Record):
    """Data and its publish options (``qos``, ``retain``, ``properties``), as Nest's."""


class MqttRecordBuilder(RecordBuilder):
    """``MqttRecordBuilder(data).set_qos(1).build()``, as Nest's; ``set_properties`` takes
    MQTT 5 publish properties in snake_case: ``{"user_properties": {"x-trace": "1"}}``."""

    record = MqttRecord
    set_qos = partialmethod(RecordBuilder._set, "qos")
    set_retain = partialmethod(RecordBuilder._set, "retain")
    set_dup = partialmethod(RecordBuilder._set, "dup")  # paho sets DUP itself, on a resend
    set_properties = partialmethod(RecordBuilder._set, "properties")


def publish_options(user_properties: dict[str, Any], options: dict[str, Any]) -> How:
    """A record's options as a publish takes them.  Its MQTT 5 properties (which paho
    leaves out on 3.1.1) add the client's ``user_properties``, under its own, as Nest's."""
    given = dict(options.get("properties") or {})
    merged = {**user_properties, **(given.pop("user_properties", None) or {})}
    if not given and not merged:
        return int(options.get("qos", 0)), bool(options.get("retain")), None
    props = Properties(PacketTypes.PUBLISH)
    for key, value in given.items():  # content_type -> ContentType
        setattr(props, "".join(part.capitalize() for part in key.split("_")), value)
    if merged:
        props.UserProperty = [(str(k), str(v)) for k, v in merged.items()]
    return int(options.get("qos", 0)), bool(options.get("retain")), props


class MqttContext(BaseRpcContext):
    """``args`` are ``(topic, packet)``, as in Nest's ``MqttContext``."""

    __slots__ = ()

    get_topic = arg(0)  # the concrete one, even for a wildcard handler
    get_packet = arg(1)  # the aiomqtt.Message: its qos, retain, properties (MQTT 5) ...


def strip_shared_prefix(key: str) -> str:
    """``$share/<group>/a/b`` -> ``a/b``: the broker delivers on the plain topic."""
    return "/".join(key.split("/")[2:]) if key.startswith("$share") else key


def match_topic(pattern: str, topic: str) -> bool:
    """Nest's ``matchMqttPattern``: a level that starts ``+`` matches one, ``#`` the rest."""
    levels, topic_levels = pattern.split("/"), topic.split("/")
    for i, level in enumerate(levels):
        current = topic_levels[i] if i < len(topic_levels) else ""
        if not current and not level:
            continue
        if not current and level != "#":
            return False
        if level[:1] == "#":
            return i == len(levels) - 1
        if level[:1] != "+" and level != current:
            return False
    return len(levels) == len(topic_levels)


class _Link:
    """One connection, read by a task until it ends; ``on_lost`` hears of an end ``close``
    did not cause.  QoS 0 and reading take the fast path (``mqtt_fast``), the rest aiomqtt's."""

    def __init__(self, side: Any, on_message: Callable[[aiomqtt.Message], None],
                 on_lost: Callable[[BaseException], None]) -> None:
        self.side, self.on_message, self.on_lost = side, on_message, on_lost
        options = side.options
        side.urls = broker_urls("mqtt", options.get("url"))
        url = urlsplit(side.urls[0])
        tls: ssl.SSLContext | None = options.get("ssl")
        if tls is None and url.scheme in ("mqtts", "ssl", "tls"):
            tls = ssl.create_default_context()
        self.version = int(options.get("protocol_version", 4))  # 4: MQTT 3.1.1, as mqtt.js
        self.client = aiomqtt.Client(
            url.hostname or "127.0.0.1",
            url.port or (8883 if tls else 1883),
            username=options.get("username", unquote(url.username or "") or None),
            password=options.get("password", unquote(url.password or "") or None),
            # A fresh id per connection, as mqtt.js makes one: two connections
            # with one id would keep pushing each other off the broker.
            identifier=options.get("client_id") or f"nestpy_{secrets.token_hex(6)}",
            protocol=aiomqtt.ProtocolVersion(self.version),
            clean_session=None if self.version == 5 else bool(options.get("clean", True)),
            keepalive=int(options.get("keepalive", 60)),  # s, as mqtt.js
            timeout=side.connect_timeout,  # of each CONNACK, SUBACK, PUBACK and close
            tls_context=tls, logger=logger, queue_type=fast.handoff(self.deliver),
        )
        self.client.pending_calls_threshold = sys.maxsize  # else a warning each busy second
        self.closed = False  # by close(), or by the broker
        self._reader: asyncio.Task[None] | None = None  # once connected
        self._batch = base.Batch(partial(fast.write, self.client))
        self._acks: dict[int, asyncio.Future[int]] = {}  # MQTT 5 QoS 1 and 2: by packet id
        paho_client = self.client._client
        paho_client.on_publish = partial(self._on_publish, paho_client.on_publish)

    async def open(self, topics: list[tuple[str, int]]) -> None:
        """Connect, then subscribe ``topics``: paho bounds the TCP connect, aiomqtt each answer."""
        entering = asyncio.ensure_future(self.client.__aenter__())
        try:
            await asyncio.shield(entering)
        except aiomqtt.MqttError as exc:
            raise ConnectionError(str(exc)) from exc
        except BaseException:  # given up on (a timeout): closed if it connects after all
            entering.add_done_callback(self._close_late)
            raise
        paho_client = self.client._client
        paho_client._sock = fast.ReadAhead(paho_client._sock)
        self._reader = asyncio.ensure_future(self._read())
        if topics:
            await self.subscribe(topics)

    async def _read(self) -> None:
        try:
            async for _ in self.client.messages:  # each went to deliver(); this hears the end
                pass
        except aiomqtt.MqttError as exc:
            for ack in self._acks.values():  # no acknowledgement can come now
                if not ack.done():
                    ack.set_exception(ConnectionError(f"the connection was lost: {exc}"))
            if not self.closed:
                self.closed = True
                self.on_lost(exc.__cause__ or exc)

    def deliver(self, message: aiomqtt.Message) -> None:
        try:
            self.on_message(message)
        except Exception:  # one message's failure must not end the connection
            logger.exception("dropped a message on %.200r: its handling failed", message.topic)

    async def subscribe(self, topics: list[tuple[str, int]]) -> None:
        try:
            codes = await self.client.subscribe(topics, timeout=self.side.connect_timeout)
        except aiomqtt.MqttError as exc:
            raise ConnectionError(f"could not subscribe: {exc}") from exc
        if refused := [t for (t, _), code in zip(topics, codes, strict=True) if code.is_failure]:
            raise ConnectionError(f"the broker refused to subscribe {refused}")

    async def publish(self, topic: str, body: bytes, how: How = (0, False, None)) -> None:
        """Publish; return once written (QoS 0) or acknowledged, as Nest's emit resolves.

        An MQTT 5 broker's acknowledgement can say "No matching subscribers" (reason 16):
        that raises ``NoRespondersError``.  aiomqtt's ``publish`` drops the reason, so QoS 1
        and 2 on MQTT 5 go to paho, and ``_on_publish`` hands the reason back."""
        self._batch.flush()  # what was sent before goes first
        try:
            if not how[0] or self.version != 5:
                await self.client.publish(topic, body, *how, timeout=self.side.connect_timeout)
                return
            info = self.client._client.publish(topic, body, *how)
            if info.rc:
                raise aiomqtt.MqttCodeError(info.rc, "could not publish")
            self._acks[info.mid] = ack = asyncio.get_running_loop().create_future()
            try:
                reason = await base.within(ack, self.side.connect_timeout, f"publishing {topic!r}")
            finally:
                self._acks.pop(info.mid, None)
        except aiomqtt.MqttError as exc:
            raise ConnectionError(f"could not publish to {topic!r}: {exc}") from exc
        if reason == 16:
            raise NoRespondersError(EMPTY_RESPONSE.format(topic))

    def _on_publish(self, aiomqtt_on_publish: Any, *args: Any) -> None:
        """paho's ``on_publish(client, userdata, mid, reason, properties)``, then aiomqtt's."""
        ack = self._acks.get(args[2])
        if ack is not None and not ack.done():
            ack.set_result(args[3].value)
        aiomqtt_on_publish(*args)

    def send(self, topic: str, body: bytes, how: How = (0, False, None)) -> Awaitable[None] | None:
        """Publish a request or a reply: None when queued at once (QoS 0), else an awaitable.
        A topic paho would refuse (a wildcard, too long) goes to paho, which says why."""
        name = topic.encode()
        if how[0] or how[2] or "+" in topic or "#" in topic or not 0 < len(name) < 65536:
            return self.publish(topic, body, how)
        if not self.client._client.is_connected():
            raise ConnectionError(f"could not publish to {topic!r}: not connected")
        self._batch.add(fast.encode_publish(name, body, how[1], self.version == 5))
        return None

    async def close(self) -> None:
        self.closed = True
        if self._reader is not None:  # connected: disconnect, which ends the reader
            await base.quietly(self.client.__aexit__(None, None, None), logger, "disconnecting")
            self._reader.cancel()  # in case the broker never answered

    def _close_late(self, entering: asyncio.Future[Any]) -> None:
        if not entering.cancelled() and entering.exception() is None:
            closing = base.quietly(self.client.__aexit__(None, None, None), logger, "closing")
            _closing.add(task := asyncio.ensure_future(closing))
            task.add_done_callback(_closing.discard)


class MqttServer(base.BrokerServer):
    """Serves handlers over Nest's MQTT transport; reconnects and re-subscribes after an outage.

    Options, Nest's in snake_case: ``url`` (``mqtt://``, ``mqtts://``), ``username``,
    ``password``, ``client_id``, ``clean``, ``keepalive``, ``ssl`` (an ``SSLContext``),
    ``protocol_version`` (4; 5 for MQTT 5), ``subscribe_options`` (``qos``, under a handler's
    ``{"qos": n}``), ``connect_timeout``, ``reconnect_period`` (the backoff's cap, s) and
    ``max_reconnect_attempts``."""

    kind = transport_name = "mqtt"
    retry_options = ("reconnect_period", 1.0, "max_reconnect_attempts")  # mqtt.js's 1 s
    _link: _Link | None = None

    async def _open(self) -> None:
        so, table = self.options.get("subscribe_options") or {}, {}
        for route in self.patterns:  # one filter per route, at its handler's QoS, as Nest's
            handler = self.message_handlers.get(route) or self.event_handlers[route][0]
            table.setdefault(route, int(handler.extras.get("qos", so.get("qos", 0))))
        self._link = _Link(self, self._on_message, self._lost)  # only the newest can end
        await self._link.open(list(table.items()))

    def _on_message(self, message: aiomqtt.Message) -> None:
        topic = message.topic.value
        incoming = self.read(message.payload, topic)
        if incoming is None:
            return
        # Routed by its topic, as Nest's: the exact route, else the first filter matching.
        route = self.route(topic, len(topic) > LARGE_MESSAGE)
        table = self.message_handlers if incoming.is_request else self.event_handlers
        if route is not None and route not in table:
            route = next((k for k in table if match_topic(strip_shared_prefix(k), route)), route)
        reply = base.Reply(partial(self._send_reply, topic + REPLY_SUFFIX))
        self.dispatch(incoming, route, MqttContext((topic, message)), reply)

    def _send_reply(self, topic: str, body: bytes) -> Awaitable[None] | None:  # QoS 0, as Nest's
        return self._link.send(topic, body)  # type: ignore[union-attr]

    async def _stop_taking(self) -> None:
        if self._link is not None:  # a $share group's other members take what comes now
            unsubscribe = self._link.client.unsubscribe(list(dict.fromkeys(self.patterns)))
            await base.quietly(unsubscribe, self.logger, "unsubscribing")

    async def _shutdown(self) -> None:
        if self._link is not None:  # kept: replies still running find it closed
            await self._link.close()


class MqttClient(base.BrokerClient):
    """A client for a Nest MQTT microservice, with the server's connection options, and
    ``user_properties`` (MQTT 5: sent with every publish).  Data built by ``MqttRecordBuilder``
    carries its own publish options.  Reply topics stay subscribed for the connection's
    lifetime, not per request as in Nest: a round trip less.  After a loss, a send connects."""

    kind = transport_name = "mqtt"

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        self.user_properties: dict[str, Any] = dict(self.options.get("user_properties") or {})
        self._how = publish_options(self.user_properties, {})  # for data that is no record
        self._link: _Link | None = None
        self._replies = base.Subscriptions(self._subscribe_reply)

    @property
    def url(self) -> str | None:  # as given, else found when connecting
        return self.urls[0] if self.urls else self.options.get("url")

    async def _connect(self) -> None:
        self._replies.clear()
        on_message = lambda message: self._on_body(message.payload)  # noqa: E731 (replies only)
        self._link = _Link(self, on_message, self._lost)
        await self._link.open([])

    def _lost(self, cause: BaseException) -> None:  # only the newest link can end
        self._link = None
        self._replies.lost()
        self._on_connection_lost(cause)

    async def _close(self) -> None:
        if self._link is not None:
            await self._link.close()

    async def _subscribe_reply(self, route: str) -> None:
        await self._require(self._link).subscribe([(route + REPLY_SUFFIX, 0)])

    def _split(self, data: Any) -> tuple[Any, How]:
        if isinstance(data, MqttRecord):
            return data.data, publish_options(self.user_properties, data.options)
        return data, self._how

    async def _publish(self, pattern: Any, data: Any, msg_id: str) -> None:
        topic = normalize_pattern(pattern)
        data, how = self._split(data)
        body = dumps({"pattern": pattern, "data": data, "id": msg_id}).encode()
        ready = topic in self._replies.ready
        if ready or await self._unless_done(msg_id, self._replies.ensure(topic)):
            sent = self._require(self._link).send(topic, body, how)  # QoS 0: None, no wait
            if sent is not None:
                try:
                    await self._unless_done(msg_id, sent)
                except NoRespondersError:
                    self._no_responders(msg_id)

    async def _dispatch_event(self, pattern: Any, data: Any) -> None:
        data, how = self._split(data)
        body = dumps({"pattern": pattern, "data": data}).encode()  # raw, as Nest sends it
        try:
            await self._require(self._link).publish(normalize_pattern(pattern), body, how)
        except NoRespondersError as exc:  # an event to nobody is fine, as in Nest
            self.logger.debug("an event reached no subscriber: %s", exc)


SERVER = MqttServer
CLIENT = MqttClient
