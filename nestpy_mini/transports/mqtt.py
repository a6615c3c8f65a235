"""MQTT: Nest's MQTT transport, on aiomqtt (paho-mqtt underneath).

The wire is Nest's: every handler's normalized pattern is a topic of its own
(``{"cmd":"sum"}`` is a topic name), requests carry ``{"pattern", "data",
"id"}``, and replies go to ``<incoming topic>/reply`` at QoS 0, where the
client, subscribed once per pattern, matches them to requests by ``id``.

aiomqtt does not reconnect by itself, so ``_Link`` keeps one logical
connection alive across broker restarts: it reconnects with a small capped
backoff, subscribes again, and logs one line per outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import ssl
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote, urlsplit

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from ..client import ClientProxy
from ..packets import dumps as _dumps
from ..packets import loads as _loads
from ..patterns import normalize_pattern, route_of_incoming
from ..server import BaseRpcContext, Server
from . import base as brokers

REPLY_SUFFIX = "/reply"
DEFAULT_PORT = 1883
DEFAULT_TLS_PORT = 8883
# mqtt.js's defaults: keepalive 60 s, reconnectPeriod 1 s (here the backoff cap).
DEFAULT_KEEPALIVE = 60
DEFAULT_RECONNECT_PERIOD = 1.0
DEFAULT_CONNECT_TIMEOUT = 10.0
FIRST_RETRY_DELAY = 0.05
# MQTT 3.1.1 unless asked otherwise, as mqtt.js (and so Nest) connects.
PROTOCOLS = {
    3: aiomqtt.ProtocolVersion.V31,
    4: aiomqtt.ProtocolVersion.V311,
    5: aiomqtt.ProtocolVersion.V5,
}
_TLS_SCHEMES = frozenset({"mqtts", "ssl", "tls"})
_PLAIN_SCHEMES = frozenset({"mqtt", "tcp"})
# Incoming topics whose routes are remembered; more are looked up afresh.
_ROUTE_CACHE_SIZE = 4096

logger = logging.getLogger("nestpy_mini.mqtt")
# paho logs every packet at debug level; its own name lets that be silenced.
_paho_logger = logging.getLogger("nestpy_mini.mqtt.paho")
# Connections whose connect finished after their caller gave up: held here
# until they are closed, so the garbage collector cannot drop the task.
_late: set[asyncio.Task[Any]] = set()


# --- records: per-message publish options, as Nest's MqttRecordBuilder ------


class MqttRecord:
    """Data plus the publish options of one request or event (``qos``, ``retain``,
    ``properties``), as Nest's ``MqttRecord``; only ``data`` goes on the wire."""

    __slots__ = ("data", "options")

    def __init__(self, data: Any, options: dict[str, Any] | None = None) -> None:
        self.data = data
        self.options: dict[str, Any] = dict(options or {})


class MqttRecordBuilder:
    """``MqttRecordBuilder(data).set_qos(1).build()``, as in Nest.

    ``properties`` take snake_case names of MQTT 5 publish properties, e.g.
    ``{"user_properties": {"x-trace": "abc"}, "content_type": "application/json"}``.
    """

    def __init__(self, data: Any = None) -> None:
        self.data = data
        self.options: dict[str, Any] = {}

    def set_data(self, data: Any) -> MqttRecordBuilder:
        self.data = data
        return self

    def set_qos(self, qos: int) -> MqttRecordBuilder:
        self.options["qos"] = qos
        return self

    def set_retain(self, retain: bool) -> MqttRecordBuilder:
        self.options["retain"] = retain
        return self

    def set_dup(self, dup: bool) -> MqttRecordBuilder:
        # Kept for parity with Nest; paho sets DUP itself on redelivery.
        self.options["dup"] = dup
        return self

    def set_properties(self, properties: dict[str, Any]) -> MqttRecordBuilder:
        self.options["properties"] = properties
        return self

    def build(self) -> MqttRecord:
        return MqttRecord(self.data, self.options)


def publish_properties(
    user_properties: dict[str, Any] | None, properties: dict[str, Any] | None = None
) -> Properties | None:
    """MQTT 5 PUBLISH properties: the client's ``user_properties`` merged with a
    record's ``properties`` (whose user properties win, as in Nest)."""
    merged_user = {**(user_properties or {}), **((properties or {}).get("user_properties") or {})}
    props = Properties(PacketTypes.PUBLISH)
    empty = True
    for key, value in (properties or {}).items():
        if key == "user_properties":
            continue
        setattr(props, "".join(part.capitalize() for part in key.split("_")), value)
        empty = False
    if merged_user:
        props.UserProperty = [(str(k), str(v)) for k, v in merged_user.items()]
        empty = False
    return None if empty else props


# --- context ------------------------------------------------------------------


class MqttContext(BaseRpcContext):
    """``args`` are ``(topic, packet)``, as in Nest's ``MqttContext``."""

    __slots__ = ()

    def get_topic(self) -> str:
        """The topic the message arrived on: concrete even for a wildcard handler."""
        return self.args[0]

    def get_packet(self) -> aiomqtt.Message:
        """The received message: ``qos``, ``retain``, ``mid``, ``properties`` (MQTT 5)."""
        return self.args[1]


# --- topic matching, as Nest's ServerMqtt does it ------------------------------


def strip_shared_prefix(key: str) -> str:
    """``$share/<group>/a/b`` -> ``a/b``: the broker delivers on the plain topic."""
    return "/".join(key.split("/")[2:]) if key.startswith("$share") else key


def match_topic(pattern: str, topic: str) -> bool:
    """Nest's ``matchMqttPattern``: a level starting ``+`` matches one level, a
    level starting ``#`` matches the rest."""
    pattern_levels = pattern.split("/")
    topic_levels = topic.split("/")
    last = len(pattern_levels) - 1
    for i, level in enumerate(pattern_levels):
        current = topic_levels[i] if i < len(topic_levels) else ""
        if not current and not level:
            continue
        if not current and level != "#":
            return False
        if level[:1] == "#":
            return i == last
        if level[:1] != "+" and level != current:
            return False
    return len(pattern_levels) == len(topic_levels)


def _check_filter(topic: str) -> None:
    """Refuse a filter the broker would answer by disconnecting us (MQTT 3.1.1
    has no way to refuse one SUBSCRIBE): ``+``/``#`` must fill a whole level."""
    levels = topic.split("/")
    for i, level in enumerate(levels):
        if ("+" in level or "#" in level) and level not in ("+", "#"):
            raise ValueError(f"pattern {topic!r} is not a valid MQTT topic filter")
        if level == "#" and i != len(levels) - 1:
            raise ValueError(f"pattern {topic!r}: '#' must be the last level")
    if not topic:
        raise ValueError("an empty pattern cannot be an MQTT topic")


def _is_wildcard(key: str) -> bool:
    return "+" in key or "#" in key or key.startswith("$share")


# --- connection settings --------------------------------------------------------


class _Settings:
    """What a connection needs, read once from Nest-named options (snake_case)."""

    def __init__(self, options: dict[str, Any], role: str, connect_timeout: float) -> None:
        self.options = options
        self.role = role
        self.url: str | None = options.get("url")
        if self.url is None and options.get("host"):
            scheme = "mqtts" if options.get("ssl") else "mqtt"
            self.url = f"{scheme}://{options['host']}:{int(options.get('port', DEFAULT_PORT))}"
        version = int(options.get("protocol_version", 4))
        if version not in PROTOCOLS:
            raise ValueError(f"protocol_version must be 3, 4 or 5, not {version}")
        self.protocol_version = version
        self.keepalive = int(options.get("keepalive", DEFAULT_KEEPALIVE))
        self.connect_timeout = float(options.get("connect_timeout", connect_timeout))
        self.reconnect_period = float(options.get("reconnect_period", DEFAULT_RECONNECT_PERIOD))
        attempts = options.get("max_reconnect_attempts")
        self.max_reconnect_attempts = None if attempts is None else int(attempts)
        self.client_id: str | None = options.get("client_id")
        self.clean: bool = bool(options.get("clean", True))

    @property
    def where(self) -> str:
        """The broker for log lines and errors: never with a password."""
        return brokers.redact(self.url) if self.url else "mqtt (broker not resolved yet)"

    async def resolve(self) -> None:
        """Find a broker when none was named; at connect time, never at construction."""
        if self.url is None:
            self.url = ",".join(brokers.broker_urls("mqtt", None))

    def new_client(self) -> _AioClient:
        assert self.url is not None
        parts = urlsplit(self.url)
        scheme = (parts.scheme or "mqtt").lower()
        if scheme not in _TLS_SCHEMES | _PLAIN_SCHEMES:
            raise ValueError(f"unsupported MQTT url scheme {scheme!r} in {self.where}")
        tls: ssl.SSLContext | None = self.options.get("ssl")
        if tls is None and scheme in _TLS_SCHEMES:
            tls = ssl.create_default_context()
        port = parts.port or (DEFAULT_TLS_PORT if tls else DEFAULT_PORT)
        username = self.options.get("username", unquote(parts.username or "") or None)
        password = self.options.get("password", unquote(parts.password or "") or None)
        # A fresh id per connection, as mqtt.js does (mqttjs_<hex>): two
        # connections with one id would keep kicking each other off the broker.
        identifier = self.client_id or f"nestpy_{self.role}_{secrets.token_hex(4)}"
        client = _AioClient(
            parts.hostname or "127.0.0.1",
            port,
            username=username,
            password=password,
            identifier=identifier,
            protocol=PROTOCOLS[self.protocol_version],
            clean_session=None if self.protocol_version == 5 else self.clean,
            timeout=self.connect_timeout,
            keepalive=self.keepalive,
            tls_context=tls,
            logger=_paho_logger,
        )
        client.set_connect_timeout(self.connect_timeout)
        return client


def _ignore(message: aiomqtt.Message) -> None:
    """Where messages go until the owner of a connection sets ``on_packet``."""


class _AioClient(aiomqtt.Client):
    """aiomqtt's client with two shortcuts for the hot path.

    aiomqtt queues each message and its iterator makes a task per message;
    here ``_on_message`` (paho's callback, run in the event loop's reader)
    hands each one straight to ``on_packet``.  ``publish_nowait`` queues a QoS
    0 publish without a coroutine, so a reply needs no task.  Both rely on
    aiomqtt 2.x internals (``_on_message``, ``_client``), pinned by the project.
    """

    on_packet: Callable[[aiomqtt.Message], None] = staticmethod(_ignore)

    def set_connect_timeout(self, seconds: float) -> None:
        # paho's TCP connect runs in a thread; bound it so no attempt hangs.
        self._client.connect_timeout = seconds

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        try:
            self.on_packet(
                aiomqtt.Message(
                    message.topic,
                    message.payload,
                    message.qos,
                    message.retain,
                    message.mid,
                    getattr(message, "properties", None),
                )
            )
        except Exception:
            # An exception escaping here would make paho drop the connection;
            # the topic is not logged since decoding it may be what failed.
            logger.exception("dropped a message (mid %s): its handling failed", message.mid)

    def publish_nowait(
        self, topic: str, payload: bytes, qos: int = 0, retain: bool = False, props: Any = None
    ) -> None:
        """Queue a publish; paho writes it on the loop's next turn."""
        info = self._client.publish(topic, payload, qos, retain, props)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise ConnectionError(f"could not publish to {topic!r}: {paho.error_string(info.rc)}")

    async def wait_closed(self) -> BaseException | None:
        """Return once the connection ends, with its cause.  ``messages`` stays
        empty (see ``_on_message``), so iterating it just waits for the end."""
        try:
            async for _ in self.messages:
                pass
        except aiomqtt.MqttError as exc:
            return exc.__cause__ or exc
        return None

    def force_close(self) -> None:
        """Close the socket now, when no orderly DISCONNECT is possible."""
        with contextlib.suppress(Exception):
            self._client._sock_close()


async def _enter(client: _AioClient, within: float) -> None:
    """Connect ``client`` within ``within`` seconds; a connection that completes
    after the caller gave up (timeout, cancel) is closed instead of leaking."""
    task = asyncio.ensure_future(client.__aenter__())
    try:
        await asyncio.wait_for(asyncio.shield(task), within)
    except BaseException:
        if not task.done():
            task.add_done_callback(lambda t: _close_late(client, t, within))
        elif not task.cancelled() and task.exception() is None:
            await _leave(client, within)
        else:
            # e.g. no CONNACK in time: aiomqtt leaves the socket open.
            client.force_close()
        raise


def _close_late(client: _AioClient, task: asyncio.Future[Any], timeout: float) -> None:
    if task.cancelled() or task.exception() is not None:
        return
    closing = asyncio.ensure_future(_leave(client, timeout))
    _late.add(closing)
    closing.add_done_callback(_late.discard)


async def _leave(client: _AioClient, within: float) -> None:
    """Disconnect politely if possible, else just close the socket; never hangs."""
    try:
        await asyncio.wait_for(client.__aexit__(None, None, None), within)
    except (aiomqtt.MqttError, OSError, TimeoutError):
        pass
    client.force_close()


def _connect_error(settings: _Settings, exc: BaseException) -> ConnectionError:
    return ConnectionError(f"cannot connect to MQTT broker {settings.where}: {exc}")


class _Link:
    """One logical connection that outlives broker restarts.

    ``client`` is the live aiomqtt client, or None while the broker is away.
    After every (re)connect ``on_up`` subscribes again; ``on_down`` hears of
    each loss.  The first connect raises; later ones retry with a backoff that
    doubles from 50 ms up to ``reconnect_period``, each attempt bounded by
    ``connect_timeout``, until it works, ``max_reconnect_attempts`` runs out,
    or the link is closed.
    """

    def __init__(
        self,
        settings: _Settings,
        on_packet: Callable[[aiomqtt.Message], None],
        on_up: Callable[[_AioClient], Awaitable[None]],
        on_down: Callable[[BaseException | None], None],
        log: logging.Logger,
    ) -> None:
        self.settings = settings
        self.on_packet = on_packet
        self.on_up = on_up
        self.on_down = on_down
        self.log = log
        self.client: _AioClient | None = None
        self.last_error: BaseException | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def reconnecting(self) -> bool:
        return self.client is None and self._task is not None and not self._task.done()

    async def open(self) -> None:
        await self._attempt()
        self._task = asyncio.ensure_future(self._supervise())

    async def _attempt(self) -> None:
        client = self.settings.new_client()
        client.on_packet = self.on_packet
        timeout = self.settings.connect_timeout
        try:
            await _enter(client, timeout)
        except (aiomqtt.MqttError, OSError, TimeoutError) as exc:
            raise _connect_error(self.settings, exc) from exc
        # Live before on_up: a request may arrive as soon as its SUBACK does,
        # and its reply must find the connection.
        self.client = client
        try:
            await asyncio.wait_for(self.on_up(client), timeout)
        except BaseException as exc:
            self.client = None
            await _leave(client, timeout)
            if isinstance(exc, aiomqtt.MqttError | TimeoutError):
                raise _connect_error(self.settings, exc) from exc
            raise

    async def _supervise(self) -> None:
        while True:
            client = self.client
            assert client is not None
            cause = await client.wait_closed()
            client.force_close()
            self.client = None
            if self._closing:
                return
            self.last_error = cause
            self.on_down(cause)
            # The one line per outage; attempts are logged at debug level only.
            self.log.warning(
                "lost the connection to MQTT broker %s (%s); reconnecting",
                self.settings.where,
                cause or "closed by the broker",
            )
            if not await self._reconnect():
                return

    async def _reconnect(self) -> bool:
        loop = asyncio.get_running_loop()
        started = loop.time()
        delay = FIRST_RETRY_DELAY
        attempts = 0
        cap = self.settings.reconnect_period
        limit = self.settings.max_reconnect_attempts
        if cap <= 0:  # mqtt.js's reconnectPeriod 0: never reconnect
            limit = 0
        while limit is None or attempts < limit:
            await asyncio.sleep(delay)
            attempts += 1
            try:
                await self._attempt()
            except (ConnectionError, ValueError) as exc:
                self.last_error = exc.__cause__ or exc
                self.log.debug("reconnect attempt %d failed: %s", attempts, exc)
                delay = min(delay * 2, cap)
                continue
            self.log.debug(
                "reconnected to %s after %.2f s (%d attempts)",
                self.settings.where,
                loop.time() - started,
                attempts,
            )
            return True
        self.log.error(
            "gave up reconnecting to MQTT broker %s after %d attempts",
            self.settings.where,
            attempts,
        )
        return False

    async def close(self) -> None:
        self._closing = True
        client, self.client = self.client, None
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task], timeout=self.settings.connect_timeout)
        if client is not None:
            await _leave(client, self.settings.connect_timeout)


# --- server -------------------------------------------------------------------------


class MqttServer(Server):
    """Serves handlers over MQTT, one topic per pattern.

    Options (Nest's names in snake_case): ``url`` (``mqtt://``, ``mqtts://``;
    or ``host``/``port``; the broker is found by ``brokers.find`` when none is
    given), ``subscribe_options`` (``{"qos", "nl", "rap", "rh"}``; a handler's
    ``{"qos": n}`` extras win), ``protocol_version`` (4 = MQTT 3.1.1 by
    default, 5), ``username``, ``password``, ``client_id``, ``clean``,
    ``keepalive``, ``ssl`` (an ``ssl.SSLContext``), and, in seconds,
    ``connect_timeout``, ``reconnect_period`` (0: no reconnect) and
    ``max_reconnect_attempts`` (unbounded by default, as mqtt.js).
    """

    transport_name = "mqtt"

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        self.settings = _Settings(self.options, "server", DEFAULT_CONNECT_TIMEOUT)
        self.subscribe_options: dict[str, Any] = dict(self.options.get("subscribe_options") or {})
        self._link: _Link | None = None
        self._accepting = False
        self._wild_messages: list[tuple[str, str]] = []
        self._wild_events: list[tuple[str, str]] = []
        self._routes: dict[str, tuple[str, str]] = {}

    @property
    def url(self) -> str | None:
        return self.settings.url

    def subscriptions(self) -> dict[str, int]:
        """Topic filter -> QoS, per handler, as Nest subscribes them."""
        default_qos = int(self.subscribe_options.get("qos", 0))
        table: dict[str, int] = {}
        for route in self.patterns:
            if route in table:
                continue
            handler = self.message_handlers.get(route) or self.event_handlers[route][0]
            table[route] = int(handler.extras.get("qos", default_qos))
        return table

    async def listen(self) -> None:
        table = self.subscriptions()
        for topic in table:
            _check_filter(topic)
        self._wild_messages = [
            (k, strip_shared_prefix(k)) for k in self.message_handlers if _is_wildcard(k)
        ]
        self._wild_events = [
            (k, strip_shared_prefix(k)) for k in self.event_handlers if _is_wildcard(k)
        ]
        self._routes.clear()
        await self.settings.resolve()
        self._link = _Link(
            self.settings, self._on_packet, self._subscribe, self._on_down, self.logger
        )
        self._accepting = True
        try:
            await self._link.open()
        except BaseException:
            self._accepting = False
            self._link = None
            raise

    async def _subscribe(self, client: _AioClient) -> None:
        """Subscribe every handler's topic in one SUBSCRIBE, after each (re)connect."""
        table = self.subscriptions()
        if not table:
            return
        if self.settings.protocol_version == 5:
            extra = {
                "noLocal": bool(self.subscribe_options.get("nl", False)),
                "retainAsPublished": bool(self.subscribe_options.get("rap", False)),
                "retainHandling": int(self.subscribe_options.get("rh", 0)),
            }
            topics: list[tuple[str, Any]] = [
                (t, SubscribeOptions(qos=q, **extra)) for t, q in table.items()
            ]
        else:
            topics = list(table.items())
        codes = await client.subscribe(topics, timeout=self.settings.connect_timeout)
        for (topic, _), code in zip(topics, codes, strict=False):
            if getattr(code, "is_failure", False):
                self.logger.warning(
                    "MQTT broker %s refused to subscribe %r: %s", self.settings.where, topic, code
                )

    def _on_down(self, cause: BaseException | None) -> None:
        """Replies of requests still running will find no connection; they log that."""

    def _route(self, topic: str) -> tuple[str, str]:
        """(message handler key, event handler key) for an incoming topic: an exact
        route first, then the wildcard and ``$share`` keys, in order, as Nest."""
        found = self._routes.get(topic)
        if found is not None:
            return found
        route = route_of_incoming(topic)
        message = route if route in self.message_handlers else ""
        if not message:
            message = next((k for k, p in self._wild_messages if match_topic(p, route)), "")
        event = route if route in self.event_handlers else ""
        if not event:
            event = next((k for k, p in self._wild_events if match_topic(p, route)), route)
        if len(self._routes) >= _ROUTE_CACHE_SIZE:
            self._routes.clear()
        self._routes[topic] = found = (message, event)
        return found

    def _on_packet(self, message: aiomqtt.Message) -> None:
        if not self._accepting:
            return
        topic = message.topic.value
        try:
            packet = _loads(message.payload)
        except (ValueError, RecursionError):
            self.logger.warning("dropped a message on %r that is not JSON", topic)
            return
        if not isinstance(packet, dict):
            self.logger.warning("dropped a message on %r that is not a JSON object", topic)
            return
        ctx = MqttContext((topic, message))
        if "pattern" not in packet and "data" not in packet:
            # Nest's IncomingRequestDeserializer: a foreign message (a sensor's own
            # JSON, say) is an event on its topic whose data is the whole payload.
            self.handle_event(self._route(topic)[1], packet, ctx)
            return
        if "id" not in packet:  # only a missing id makes an event, as in Nest
            self.handle_event(self._route(topic)[1], packet.get("data"), ctx)
            return
        reply_topic = topic + REPLY_SUFFIX
        self.handle_request(
            self._route(topic)[0],
            packet.get("data"),
            packet["id"],
            ctx,
            lambda reply: self._reply(reply_topic, reply),
        )

    def _reply(self, topic: str, packet: dict[str, Any]) -> None:
        """Publish one reply packet at QoS 0 with no properties, as Nest does."""
        body = _dumps(packet).encode()  # TypeError/ValueError are the base's to handle
        link = self._link
        client = link.client if link is not None else None
        if client is None:
            self.logger.warning("could not deliver a reply on %r: the broker is away", topic)
            return
        try:
            client.publish_nowait(topic, body)
        except ConnectionError as exc:
            self.logger.warning("could not deliver a reply: %s", exc)

    async def close(self) -> None:
        """Stop taking messages, let running handlers reply, then disconnect."""
        link, self._accepting = self._link, False
        if link is None:
            return
        await self.drain()
        self._link = None
        await link.close()


# --- client -------------------------------------------------------------------------


class MqttClient(ClientProxy):
    """A client for a Nest MQTT microservice (or a nestpy_mini one).

    Options: the server's connection options (``url``, ``protocol_version``,
    ``username``, ...), plus ``user_properties`` (merged into every publish;
    MQTT 5 only) and ``timeout`` (seconds per request, default 5).  Send
    ``MqttRecordBuilder(data).set_qos(1).build()`` as data for per-message
    publish options.
    """

    transport_name = "mqtt"

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        self.settings = _Settings(self.options, "client", self.connect_timeout)
        self.user_properties: dict[str, Any] = dict(self.options.get("user_properties") or {})
        self._v5 = self.settings.protocol_version == 5
        # Built once: the hot path publishes with these unchanged.
        self._properties = publish_properties(self.user_properties) if self._v5 else None
        self._link: _Link | None = None
        # Patterns whose reply topic has been subscribed, ever (re-subscribed
        # after a reconnect) and on the live connection.
        self._reply_topics: dict[str, None] = {}
        self._reply_ready: set[str] = set()
        self._reply_pending: dict[str, asyncio.Task[None]] = {}

    def describe(self) -> str:
        return self.settings.where

    @property
    def url(self) -> str | None:
        return self.settings.url

    async def _connect(self) -> None:
        link = self._link
        if link is not None:
            if link.client is not None:
                return  # back after an outage: the link did the work
            if link.reconnecting:
                raise ConnectionError(
                    f"the connection was lost; reconnecting (last error: {link.last_error})"
                )
            await self._shutdown()  # the link gave up: start over
        await self.settings.resolve()
        link = _Link(self.settings, self._on_packet, self._on_up, self._on_down, logger)
        try:
            await link.open()
        except ConnectionError as exc:
            # The base says "cannot connect to <broker>: "; give it just the cause.
            raise ConnectionError(str(exc.__cause__ or exc)) from exc
        self._link = link

    async def _on_up(self, client: _AioClient) -> None:
        """After each (re)connect: subscribe every reply topic used so far, at once."""
        self._reply_ready.clear()
        if self._reply_topics:
            topics = [(topic + REPLY_SUFFIX, 0) for topic in self._reply_topics]
            await client.subscribe(topics, timeout=self.settings.connect_timeout)
            self._reply_ready.update(self._reply_topics)

    def _on_down(self, cause: BaseException | None) -> None:
        # A SUBACK still awaited on the dead connection will never come.
        for task in self._reply_pending.values():
            task.cancel()
        self._reply_pending.clear()
        self._reply_ready.clear()
        self._on_connection_lost(cause)

    def _on_packet(self, message: aiomqtt.Message) -> None:
        try:
            packet = _loads(message.payload)
        except (ValueError, RecursionError):
            logger.warning("dropped a reply on %r that is not JSON", message.topic.value)
            return
        if not isinstance(packet, dict):
            logger.warning("dropped a reply on %r that is not a JSON object", message.topic.value)
            return
        self._on_reply(packet)

    def _live(self) -> _AioClient:
        link = self._link
        client = link.client if link is not None else None
        if client is None:
            why = link.last_error if link is not None else None
            raise ConnectionError(
                f"not connected to MQTT broker {self.describe()}: {why or 'closed'}"
            )
        return client

    async def _publish(self, pattern: Any, data: Any, msg_id: str) -> None:
        client = self._live()
        topic = normalize_pattern(pattern)
        if topic not in self._reply_ready:
            # The first request on a pattern waits for its reply topic's SUBACK;
            # a reply published before it would be lost.
            if not await self._within(msg_id, asyncio.shield(self._subscribe_reply(client, topic))):
                return
        options: dict[str, Any] | None = None
        if isinstance(data, MqttRecord):
            options, data = data.options, data.data
        body = _dumps({"pattern": pattern, "data": data, "id": msg_id}).encode()
        if options is None:
            client.publish_nowait(topic, body, 0, False, self._properties)
            return
        qos, retain, props = self._publish_options(options)
        if qos == 0:
            client.publish_nowait(topic, body, 0, retain, props)
            return
        await self._within(msg_id, self._confirmed(client, topic, body, qos, retain, props))

    async def _within(self, msg_id: str, step: Awaitable[Any]) -> bool:
        """Await ``step``, unless the request ends first (its timeout, a lost
        connection): then False, and the request raises its own error."""
        call = self._routing.get(msg_id)
        task = asyncio.ensure_future(step)
        if call is None:
            await task
            return True
        await asyncio.wait([task, call.done], return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()
            return True
        task.cancel()
        return False

    def _subscribe_reply(self, client: _AioClient, topic: str) -> asyncio.Task[None]:
        """One SUBSCRIBE per reply topic, shared by concurrent first requests;
        the subscription stays for the client's lifetime (no per-request churn)."""
        task = self._reply_pending.get(topic)
        if task is None:
            task = asyncio.ensure_future(self._do_subscribe_reply(client, topic))
            self._reply_pending[topic] = task
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return task

    async def _do_subscribe_reply(self, client: _AioClient, topic: str) -> None:
        try:
            codes = await client.subscribe(
                topic + REPLY_SUFFIX, 0, timeout=self.settings.connect_timeout
            )
        except aiomqtt.MqttError as exc:
            raise ConnectionError(
                f"could not subscribe to {topic + REPLY_SUFFIX!r}: {exc}"
            ) from exc
        finally:
            if self._reply_pending.get(topic) is asyncio.current_task():
                del self._reply_pending[topic]
        if any(getattr(code, "is_failure", False) for code in codes):
            raise ConnectionError(f"the broker refused to subscribe {topic + REPLY_SUFFIX!r}")
        self._reply_topics[topic] = None
        if self._link is not None and self._link.client is client:
            self._reply_ready.add(topic)

    def _publish_options(self, options: dict[str, Any]) -> tuple[int, bool, Any]:
        props = self._properties
        if self._v5 and options.get("properties"):
            props = publish_properties(self.user_properties, options["properties"])
        return int(options.get("qos", 0)), bool(options.get("retain", False)), props

    async def _confirmed(
        self, client: _AioClient, topic: str, body: bytes, qos: int, retain: bool, props: Any
    ) -> None:
        """Publish at QoS 1/2 and wait for the broker's acknowledgement."""
        try:
            await client.publish(
                topic, body, qos, retain, props, timeout=self.settings.connect_timeout
            )
        except aiomqtt.MqttError as exc:
            raise ConnectionError(f"could not publish to {topic!r}: {exc}") from exc

    async def _dispatch_event(self, pattern: Any, data: Any) -> None:
        client = self._live()
        topic = normalize_pattern(pattern)
        options: dict[str, Any] = {}
        if isinstance(data, MqttRecord):
            options, data = data.options, data.data
        qos, retain, props = self._publish_options(options)
        body = _dumps({"pattern": pattern, "data": data}).encode()  # raw, as Nest sends it
        # Awaited until written (QoS 0) or acknowledged, as Nest's emit resolves.
        await self._confirmed(client, topic, body, qos, retain, props)

    async def _shutdown(self) -> None:
        link, self._link = self._link, None
        for task in list(self._reply_pending.values()):
            task.cancel()
        self._reply_pending.clear()
        self._reply_ready.clear()
        self._reply_topics.clear()
        if link is not None:
            await link.close()

    async def _close(self) -> None:
        await self._shutdown()

    async def close(self) -> None:
        """Close; this also stops a link that is reconnecting, which the base,
        seeing no connection, would not close."""
        await super().close()
        await self._shutdown()


SERVER = MqttServer
CLIENT = MqttClient
