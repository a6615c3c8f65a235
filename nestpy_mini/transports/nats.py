"""NATS: Nest's subjects, queue groups and reply inboxes, on nats-py.

The server subscribes to every route as a subject (in the handler's queue
group, else the ``queue`` option) and answers on the request's reply
subject, without headers, as Nest's ``ServerNats`` does.  The client sends
``{"pattern", "data", "id"}`` to the normalized subject with a reply
subject.  Nest makes a fresh inbox and a SUB per request; this client keeps
one wildcard inbox ``<inbox_prefix>.<nuid>.*`` for its lifetime and gives
each request the reply subject ``<that inbox>.<id>``.  A Nest server only
ever answers ``msg.reply``, so this is wire-compatible, and it saves a SUB
and an UNSUB per request.  Replies are matched by the id at the end of their
subject (the only thing a 503 no-responders reply carries), and, as in Nest,
a reply whose body names another id is ignored.

``import nats`` below is the nats-py package, not this module: imports are
absolute, and this file is only ever imported as ``nestpy_mini.transports.nats``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import nats.errors
from nats.aio.client import Client as NatsConnection
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from ..client import ClientProxy
from ..exceptions import ConnectionClosedError
from ..packets import ENVELOPE_KEYS as _ENVELOPE_KEYS
from ..packets import dumps as _dumps
from ..packets import loads as _loads
from ..patterns import normalize_pattern
from ..server import BaseRpcContext, Server
from . import base as brokers

# Nest's EmptyResponseException text, verbatim: what a NestJS caller sees
# when nobody subscribes to the subject (the broker's 503 no-responders).
EMPTY_RESPONSE = 'Empty response. There are no subscribers listening to that message ("{}")'
# nats-py waits 2 s between reconnect attempts by default; a restarted broker
# should be back in service sooner than that.
DEFAULT_RECONNECT_TIME_WAIT = 0.5
DEFAULT_CONNECT_TIMEOUT = 5.0
# How long close() waits for the broker to acknowledge the last writes.
CLOSE_TIMEOUT = 2.0

logger = logging.getLogger("nestpy_mini.nats")

# Options handed to nats-py as they are (user, password, token, tls, name,
# pending_size, ping_interval, ...), the way Nest spreads its options into
# nats.js's connect().  The transport sets the callbacks and servers itself.
_PASSED_THROUGH = frozenset(inspect.signature(NatsConnection.connect).parameters) - {
    "self",
    "servers",
    "error_cb",
    "disconnected_cb",
    "closed_cb",
    "reconnected_cb",
    "max_reconnect_attempts",
}

Callback = Callable[[NatsConnection], Awaitable[None]]


class NatsContext(BaseRpcContext):
    """``args`` are ``(subject, headers)``, as in Nest's ``NatsContext``."""

    __slots__ = ()

    def get_subject(self) -> str:
        """The subject the message was published to."""
        return self.args[0]

    def get_headers(self) -> dict[str, str] | None:
        """The message's NATS headers, or None when it had none."""
        return self.args[1]


async def _servers(options: dict[str, Any]) -> list[str]:
    """The ``servers`` option as a list; found as ``brokers`` finds one when absent.

    Resolved at listen/connect time, never at construction, so building a
    module does not touch the network.
    """
    servers = options.get("servers")
    if not servers:
        broker = __import__("types").SimpleNamespace(url=",".join(brokers.broker_urls("nats", None)))
        return [broker.url]
    return [servers] if isinstance(servers, str) else list(servers)


def _where(servers: list[str]) -> str:
    return ",".join(brokers.redact(s) for s in servers) if servers else "nats"


async def _open(
    servers: list[str],
    options: dict[str, Any],
    log: logging.Logger,
    on_lost: Callback,
    on_back: Callback,
    on_gone: Callback,
) -> NatsConnection:
    """A connected nats-py client that reconnects by itself, without bound by default.

    nats-py uses one ``max_reconnect_attempts`` for the first connect and for
    reconnects, and any value below 1 makes the first connect retry forever
    against a broker that is down.  So the first connect gets a bounded
    number of attempts (it fails fast and clearly), and the wanted policy is
    put in place once connected.
    """
    settings = {k: v for k, v in options.items() if k in _PASSED_THROUGH}
    settings.setdefault("reconnect_time_wait", DEFAULT_RECONNECT_TIME_WAIT)
    wanted = int(options.get("max_reconnect_attempts", -1))
    nc = NatsConnection()
    errors: list[BaseException] = []

    async def error_cb(exc: Exception) -> None:
        errors.append(exc)
        del errors[:-1]
        # While (re)connecting nats-py reports every failed attempt, and a
        # lost connection is already logged once by the disconnect callback.
        quiet = not nc.is_connected or isinstance(exc, nats.errors.UnexpectedEOF | OSError)
        log.log(logging.DEBUG if quiet else logging.WARNING, "NATS at %s: %r", _where(servers), exc)

    async def disconnected_cb() -> None:
        await on_lost(nc)

    async def reconnected_cb() -> None:
        await on_back(nc)

    async def closed_cb() -> None:
        await on_gone(nc)

    try:
        await nc.connect(
            servers=servers,
            error_cb=error_cb,
            disconnected_cb=disconnected_cb,
            reconnected_cb=reconnected_cb,
            closed_cb=closed_cb,
            max_reconnect_attempts=wanted if wanted > 0 else 1,
            **settings,
        )
    except asyncio.CancelledError:
        # The caller's connect timeout struck mid-handshake: leave nothing open.
        await _shut(nc)
        raise
    except (nats.errors.Error, OSError, TimeoutError) as exc:
        await _shut(nc)
        raise ConnectionError(str(errors[-1] if errors else exc)) from exc
    # nats-py reads its options at each reconnect, so this takes effect now.
    nc.options["max_reconnect_attempts"] = wanted
    return nc


async def _shut(nc: NatsConnection) -> None:
    """Close ``nc``, bounded: a dead socket must not hold up shutdown."""
    if nc.is_closed:
        return
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await nc.close()
    except (TimeoutError, nats.errors.Error, OSError) as exc:
        logger.warning("closing the NATS connection: %r", exc)


def _no_reply(packet: dict[str, Any]) -> None:
    """A request without a reply subject is run and not answered, as in Nest."""


class _Reply:
    """Publishes the reply packets of one request to its reply subject.

    Packets made while the subscription callback is still running (every
    synchronous handler) are held and published by the callback itself, so
    the common case costs no task; later ones (async handlers, streams) are
    published as awaitables, which the server base awaits.
    """

    __slots__ = ("held", "nc", "subject")

    def __init__(self, nc: NatsConnection, subject: str) -> None:
        self.nc = nc
        self.subject = subject
        self.held: list[bytes] | None = []

    def __call__(self, packet: dict[str, Any]) -> Awaitable[None] | None:
        body = _dumps(packet).encode()  # raises here, where the base expects it
        if self.held is not None:
            self.held.append(body)
            return None
        return self.nc.publish(self.subject, body)


class NatsServer(Server):
    """Serves handlers over NATS, one subscription per route.

    Options: ``servers`` (a URL or a list; found by ``brokers`` when absent),
    ``queue`` (the default queue group; a handler's ``{"queue": ...}`` extras
    win), ``max_reconnect_attempts`` (default -1, unbounded),
    ``reconnect_time_wait`` (seconds, default 0.5), ``connect_timeout``,
    ``close_grace``, and any other nats-py ``connect`` option by its name.
    """

    transport_name = "nats"

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        self.queue: str | None = self.options.get("queue")
        self.connect_timeout = float(self.options.get("connect_timeout", DEFAULT_CONNECT_TIMEOUT))
        self.servers: list[str] = []
        self._nc: NatsConnection | None = None
        self._subs: list[Subscription] = []
        self._live = False

    @property
    def is_connected(self) -> bool:
        """True while the broker holds every subscription: after listen and after a reconnect."""
        return self._live

    def describe(self) -> str:
        return _where(self.servers)

    def _subscriptions(self) -> list[tuple[str, str]]:
        """``(subject, queue group)`` per route; ``""`` is no group."""
        out = []
        for route in dict.fromkeys(self.patterns):
            handlers = [self.message_handlers.get(route), *self.event_handlers.get(route, ())]
            queues = [
                h.extras["queue"] for h in handlers if h is not None and h.extras.get("queue")
            ]
            out.append((route, queues[0] if queues else (self.queue or "")))
        return out

    async def listen(self) -> None:
        self.servers = await _servers(self.options)
        opening = _open(self.servers, self.options, self.logger, self._lost, self._back, self._gone)
        try:
            nc = await asyncio.wait_for(opening, self.connect_timeout)
        except TimeoutError as exc:
            raise ConnectionError(
                f"cannot connect to {self.describe()}: no answer within {self.connect_timeout:g} s"
            ) from exc
        except ConnectionError as exc:
            raise ConnectionError(f"cannot connect to {self.describe()}: {exc}") from exc
        try:
            for subject, queue in self._subscriptions():
                try:
                    sub = await nc.subscribe(subject, queue=queue, cb=self._subscriber(subject, nc))
                except nats.errors.BadSubjectError as exc:
                    raise ValueError(f"pattern {subject!r} cannot be a NATS subject") from exc
                self._subs.append(sub)
            # A PING round trip: the broker has every SUB before listen returns,
            # so a request sent right after is not answered by "no responders".
            await nc.flush(timeout=self.connect_timeout)
        except BaseException:
            self._subs.clear()
            await _shut(nc)
            raise
        self._nc = nc
        self._live = True

    def _subscriber(self, route: str, nc: NatsConnection) -> Callable[[Msg], Awaitable[None]]:
        """The callback for one subject: nats-py runs it message by message."""
        handle_request = self.handle_request
        handle_event = self.handle_event
        log = self.logger

        async def on_message(msg: Msg) -> None:
            try:
                packet = _loads(msg.data)
            except ValueError:
                log.warning("dropped a message on %r that is not JSON", msg.subject)
                return
            ctx = NatsContext((msg.subject, msg.headers))
            if not isinstance(packet, dict) or ("pattern" not in packet and "data" not in packet):
                # A foreign message: Nest hands the whole payload to the
                # subject's event handler.
                handle_event(route, packet, ctx)
                return
            if "id" not in packet:  # only a missing id makes an event
                handle_event(route, packet.get("data"), ctx)
                return
            if not msg.reply:
                handle_request(route, packet.get("data"), packet["id"], ctx, _no_reply)
                return
            reply = _Reply(nc, msg.reply)
            handle_request(route, packet.get("data"), packet["id"], ctx, reply)
            held, reply.held = reply.held, None
            for body in held or ():
                try:
                    await nc.publish(msg.reply, body)
                except (nats.errors.Error, OSError) as exc:
                    log.warning("could not deliver a reply: %r", exc)

        return on_message

    async def _lost(self, nc: NatsConnection) -> None:
        if nc is self._nc:
            self._live = False
            self.logger.warning("lost NATS at %s; reconnecting", self.describe())

    async def _back(self, nc: NatsConnection) -> None:
        # nats-py has replayed every SUB and done a PING round trip by now.
        if nc is self._nc:
            self._live = True
            self.logger.info("reconnected to NATS at %s; subscriptions restored", self.describe())

    async def _gone(self, nc: NatsConnection) -> None:
        if nc is self._nc:
            self._live = False
            self.logger.error("NATS at %s: gave up reconnecting; not serving", self.describe())

    async def close(self) -> None:
        nc, self._nc = self._nc, None
        self._live = False
        if nc is None:
            return
        subs, self._subs = self._subs, []
        if nc.is_connected and subs:
            # UNSUB first, so queue-group peers take the new requests, and let
            # the messages already delivered here be handled.
            try:
                async with asyncio.timeout(self.close_grace):
                    await asyncio.gather(*(s.drain() for s in subs), return_exceptions=True)
            except TimeoutError:
                self.logger.warning("NATS subscriptions did not drain in %g s", self.close_grace)
        await self.drain()
        await _shut(nc)


class NatsClient(ClientProxy):
    """A client for a Nest NATS microservice (or a nestpy_mini one).

    Options: ``servers`` (a URL or a list; found by ``brokers`` when absent),
    ``headers`` (a dict merged into every request and event), ``inbox_prefix``
    (default ``_INBOX``), ``timeout`` (seconds per request, default 5),
    ``max_reconnect_attempts`` (default -1, unbounded), ``reconnect_time_wait``
    (default 0.5 s), ``connect_timeout``, and any other nats-py ``connect``
    option by its name.

    While nats-py reconnects, a request fails at once with ``ConnectionError``
    and requests in flight fail with ``ConnectionClosedError``: their replies
    could not reach us.  Events are buffered by nats-py up to its
    ``pending_size`` (2 MiB by default) and sent on reconnect; beyond that,
    emit fails.
    """

    transport_name = "nats"

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        headers = self.options.get("headers")
        # NATS header values are text; None means a plain PUB, as in Nest.
        self.headers: dict[str, str] | None = (
            {str(k): str(v) for k, v in headers.items()} if headers else None
        )
        self.servers: list[str] = []
        self._nc: NatsConnection | None = None
        self._reply_prefix = ""
        # The subject of each request, for the text of a no-responders error:
        # the 503 reply carries nothing but its reply subject.
        self._subjects: dict[str, str] = {}
        self._prune_at = 1024

    def describe(self) -> str:
        return _where(self.servers)

    @property
    def is_connected(self) -> bool:
        return self._connected and self._nc is not None and self._nc.is_connected

    async def _connect(self) -> None:
        self.servers = await _servers(self.options)
        nc = await _open(self.servers, self.options, logger, self._lost, self._back, self._gone)
        try:
            inbox = nc.new_inbox()
            await nc.subscribe(f"{inbox}.*", cb=self._on_message)
        except BaseException:
            await _shut(nc)
            raise
        self._reply_prefix = f"{inbox}."
        self._nc = nc

    async def _close(self) -> None:
        nc, self._nc = self._nc, None
        self._subjects.clear()
        if nc is not None:
            await _shut(nc)

    async def _lost(self, nc: NatsConnection) -> None:
        if nc is self._nc:
            logger.warning("lost NATS at %s; reconnecting", self.describe())
            self._subjects.clear()
            # Replies sent while we are away are lost: fail now, not at timeout.
            self._fail_pending(
                ConnectionClosedError(f"connection to {self.describe()} lost; reconnecting")
            )

    async def _back(self, nc: NatsConnection) -> None:
        if nc is self._nc:
            logger.info("reconnected to NATS at %s", self.describe())

    async def _gone(self, nc: NatsConnection) -> None:
        if nc is self._nc:  # nats-py gave up: the next send connects afresh
            self._nc = None
            self._on_connection_lost(ConnectionError("gave up reconnecting"))

    def _ready(self) -> NatsConnection:
        nc = self._nc
        if nc is None or not nc.is_connected:
            raise ConnectionError(f"not connected to NATS at {self.describe()} (reconnecting)")
        return nc

    async def _publish(self, pattern: Any, data: Any, msg_id: str) -> None:
        nc = self._ready()
        subject = normalize_pattern(pattern)
        body = _dumps({"pattern": pattern, "data": data, "id": msg_id}).encode()
        if len(self._subjects) >= self._prune_at:
            self._prune()
        self._subjects[msg_id] = subject
        try:
            await nc.publish(subject, body, reply=self._reply_prefix + msg_id, headers=self.headers)
        except (nats.errors.BadSubjectError, nats.errors.MaxPayloadError) as exc:
            raise ValueError(f"cannot publish to NATS subject {subject!r}: {exc!r}") from exc
        except nats.errors.Error as exc:
            raise ConnectionError(f"NATS at {self.describe()}: {exc!r}") from exc

    def _prune(self) -> None:
        """Forget the subjects of requests that ended without a final reply (timeouts)."""
        routing = self._routing
        self._subjects = {k: v for k, v in self._subjects.items() if k in routing}
        self._prune_at = 2 * len(self._subjects) + 1024

    async def _dispatch_event(self, pattern: Any, data: Any) -> None:
        nc = self._nc
        if nc is None:
            raise ConnectionError(f"not connected to NATS at {self.describe()}")
        subject = normalize_pattern(pattern)
        body = _dumps({"pattern": pattern, "data": data}).encode()
        try:
            await nc.publish(subject, body, headers=self.headers)
        except (nats.errors.BadSubjectError, nats.errors.MaxPayloadError) as exc:
            raise ValueError(f"cannot publish to NATS subject {subject!r}: {exc!r}") from exc
        except nats.errors.Error as exc:
            raise ConnectionError(f"NATS at {self.describe()}: {exc!r}") from exc

    async def _on_message(self, msg: Msg) -> None:
        """One reply: correlated by the id in its reply subject, as Nest's per-request inbox is."""
        msg_id = msg.subject[len(self._reply_prefix) :]
        if not msg.data:
            # A 503 no-responders status (or any empty reply, as Nest reads it).
            subject = self._subjects.pop(msg_id, "")
            self._on_reply({"id": msg_id, "err": EMPTY_RESPONSE.format(subject)})
            return
        try:
            packet = _loads(msg.data)
        except ValueError:
            logger.warning("dropped a reply on %r that is not JSON", msg.subject)
            return
        if not isinstance(packet, dict) or not packet or not packet.keys() <= _ENVELOPE_KEYS:
            # Not a Nest envelope: the whole payload is the response.
            packet = {"id": msg_id, "response": packet, "isDisposed": True}
        elif not packet.get("id"):
            packet["id"] = msg_id
        elif packet["id"] != msg_id:
            # Nest ignores a reply whose id is not its request's.
            logger.debug("dropped a reply for id %r on %r", packet["id"], msg.subject)
            return
        if packet.get("isDisposed") or packet.get("err"):
            self._subjects.pop(msg_id, None)
        self._on_reply(packet)


SERVER = NatsServer
CLIENT = NatsClient
