"""NATS: Nest's ``server-nats`` and ``client-nats``, on nats-py.

The server subscribes to every route as a subject (in the handler's queue group,
else the ``queue`` option) and answers on the request's reply subject, without
headers, as Nest's ``ServerNats``; a request without a reply subject is run and not
answered.  The client sends ``{"pattern", "data", "id"}`` to the normalized subject.
Nest makes an inbox and a SUB per request; this client keeps one wildcard inbox
``<inbox_prefix>.<nuid>.*`` and gives each request the reply subject ``<inbox>.<id>``:
a Nest server only ever answers ``msg.reply``, so the wire is the same, less a SUB
and an UNSUB per request.  A reply is matched by the id ending its subject, the only
thing a 503 no-responders reply carries.  nats-py reconnects and replays every SUB.

``import nats`` is nats-py, not this module: imports are absolute.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import nats.errors
from nats.aio.client import Client as NatsConnection
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from ..exceptions import ConnectionClosedError
from ..packets import dumps
from ..patterns import normalize_pattern
from ..server import BaseRpcContext
from . import broker_urls
from .base import BrokerClient, BrokerServer, Reply, arg, log_back, log_lost, quietly

# nats-py waits 2 s between reconnect attempts by default; a restarted broker
# should be back in service sooner than that.
DEFAULT_RECONNECT_TIME_WAIT = 0.5

# Options handed to nats-py as they are (user, password, token, tls, name,
# inbox_prefix, pending_size, ping_interval, ...), the way Nest spreads its
# options into nats.js's connect().  The callbacks and servers are ours.
_PASSED_THROUGH = frozenset(inspect.signature(NatsConnection.connect).parameters) - {
    "self", "servers", "max_reconnect_attempts",
    "error_cb", "disconnected_cb", "closed_cb", "reconnected_cb",
}


class NatsContext(BaseRpcContext):
    """``args`` are ``(subject, headers)``, as in Nest's ``NatsContext``."""

    __slots__ = ()

    get_subject = arg(0)  # the one published to, even for a wildcard handler
    get_headers = arg(1)  # None when it had none


async def _connect(side: NatsServer | NatsClient) -> NatsConnection:
    """A connected nats-py client for ``side``, which nats-py then reconnects by itself,
    telling ``side._up(False)`` when lost, ``_up(True)`` when back, ``_gave_up()`` at the end.

    nats-py uses one ``max_reconnect_attempts`` for the first connect and for
    reconnects, and below 1 it retries the first connect without end.  Against
    a broker that is down, measured: that fails only at the connect timeout
    (5.0 s with the defaults), against 0.5 s, with the refusal as the reason,
    when the first connect gets one retry.  So it gets one, and the wanted
    policy (default -1: without end) is written into ``nc.options`` once
    connected: the public dict nats-py reads at each reconnect.
    """
    options, log = side.options, side.logger
    side.urls = broker_urls("nats", options.get("servers"))
    settings = {k: v for k, v in options.items() if k in _PASSED_THROUGH}
    settings.setdefault("reconnect_time_wait", DEFAULT_RECONNECT_TIME_WAIT)
    wanted = int(options.get("max_reconnect_attempts", -1))
    nc = NatsConnection()
    last_error: list[BaseException] = []  # why connecting failed, or the link was lost

    async def error_cb(exc: Exception) -> None:
        last_error[:] = [exc]
        # nats-py reports every failed attempt while (re)connecting, and a lost
        # connection is logged once, by disconnected_cb.
        quiet = not nc.is_connected or isinstance(exc, nats.errors.UnexpectedEOF | OSError)
        log.log(logging.DEBUG if quiet else logging.WARNING, "%s: %r", side.describe(), exc)

    async def disconnected_cb() -> None:
        # Once closed (by us, or nats-py gave up), closed_cb tells.
        if nc is side._nc and not nc.is_closed:
            log_lost(log, side.describe(), last_error[-1] if last_error else None)
            side._up(False)

    async def reconnected_cb() -> None:  # every SUB replayed, and a PING round trip made
        if nc is side._nc:
            log_back(log, side.describe())
            side._up(True)

    async def closed_cb() -> None:  # nats-py gave up: our own closes unset side._nc first
        if nc is side._nc:
            side._gave_up()

    try:
        await nc.connect(
            servers=side.urls, error_cb=error_cb, disconnected_cb=disconnected_cb,
            reconnected_cb=reconnected_cb, closed_cb=closed_cb,
            max_reconnect_attempts=wanted if wanted > 0 else 1, **settings,
        )
    except asyncio.CancelledError:  # the connect timeout struck mid-handshake
        await quietly(nc.close(), log, "closing a NATS connection half made")
        raise
    except (nats.errors.Error, OSError, TimeoutError) as exc:
        await quietly(nc.close(), log, "closing a NATS connection never made")
        raise ConnectionError(str(last_error[-1] if last_error else exc)) from exc
    nc.options["max_reconnect_attempts"] = wanted
    return nc


def _unanswered(packet: dict[str, Any]) -> None:
    """The reply of a request without a reply subject: as in Nest, nothing is sent."""


async def _round_trip(nc: NatsConnection) -> None:
    """A PING round trip that comes back after every command written before it.

    nats-py 2.16's ``flush`` writes its PING straight to the socket, ahead of the
    SUB, UNSUB and PUB commands still waiting for its flusher task, so the broker
    may answer that PING before it has read them.  The flusher writes them while
    the first PING travels; the second PING goes out behind them.
    """
    await nc.flush()
    await nc.flush()


async def _unsubscribe_then_drain(nc: NatsConnection, subs: list[Subscription]) -> None:
    """``Subscription.drain``, with its UNSUB certainly read by the broker before the end.

    ``drain`` sends UNSUB, waits for one PING round trip, handles what has arrived,
    then drops the subscription.  Its PING overtakes its UNSUB (``_round_trip``),
    so the broker went on delivering after that PONG, and nats-py dropped those
    messages without a word: with three queue-group members under load and one
    closing, 206 requests in 6 of 80 closes waited out their callers' timeout.  No
    public call sends UNSUB and keeps the subscription, so the UNSUB goes out
    through nats-py's ``_send_unsubscribe``; after ``_round_trip`` nothing more
    comes, and ``drain`` handles what did and ends the subscription.
    """
    for sub in subs:
        await nc._send_unsubscribe(sub._id)
    await _round_trip(nc)
    await asyncio.gather(*(sub.drain() for sub in subs), return_exceptions=True)


class NatsServer(BrokerServer):
    """Serves handlers over NATS, one subscription per route.

    Options: ``servers`` (a URL or a list; else ``NATS_URL``, else Nest's
    default), ``queue`` (the default queue group; a handler's ``{"queue": ...}``
    extras win), ``max_reconnect_attempts`` (default -1, without end),
    ``reconnect_time_wait`` (s, default 0.5), ``connect_timeout``,
    ``close_grace``, and any other nats-py ``connect`` option by its name.
    """

    kind = transport_name = "nats"

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        self._nc: NatsConnection | None = None
        self._subs: list[Subscription] = []
        self._live = False

    @property
    def is_connected(self) -> bool:
        """True while the broker holds every subscription: after listen and after a reconnect."""
        return self._live

    def _queue_of(self, route: str) -> str:
        """The route's queue group, ``""`` for none: a handler's own extras win, as in Nest."""
        handlers = [self.message_handlers.get(route), *self.event_handlers.get(route, ())]
        queues = [h.extras["queue"] for h in handlers if h is not None and h.extras.get("queue")]
        return queues[0] if queues else self.options.get("queue") or ""

    async def _open(self) -> None:
        nc = self._nc = await _connect(self)
        for route in dict.fromkeys(self.patterns):
            try:
                sub = await nc.subscribe(route, queue=self._queue_of(route), cb=self._taker(route))
            except nats.errors.BadSubjectError as exc:
                raise ValueError(f"pattern {route!r} cannot be a NATS subject") from exc
            self._subs.append(sub)
        # The broker holds every SUB before listen returns, so a request sent
        # right after is not answered by "no responders".
        await _round_trip(nc)
        self._live = True

    def _taker(self, route: str) -> Callable[[Msg], Awaitable[None]]:
        """The callback of one subscription, run by nats-py message by message.  As in
        Nest, its route routes every message on it, and is a foreign payload's pattern."""
        publish = self._nc.publish  # type: ignore[union-attr]

        async def take(msg: Msg) -> None:
            message = self.read(msg.data, route)
            if message is None:
                return
            ctx = NatsContext((msg.subject, msg.headers))
            if not msg.reply:
                self.dispatch(message, route, ctx, _unanswered)
                return
            reply = Reply(partial(publish, msg.reply), hold=True)
            self.dispatch(message, route, ctx, reply)
            await reply.flush(self.logger)

        return take

    def _up(self, up: bool) -> None:
        self._live = up

    def _gave_up(self) -> None:
        self._live = False
        self.logger.error("gave up reconnecting to %s; not serving", self.describe())

    async def _stop_taking(self) -> None:
        """UNSUB first, so that queue-group peers take the new requests, and
        handle the messages already delivered here, within the close grace."""
        self._live = False
        subs, self._subs = self._subs, []
        nc = self._nc
        if nc is None or not nc.is_connected or not subs:
            return
        try:
            async with asyncio.timeout(self.close_grace):
                await _unsubscribe_then_drain(nc, subs)
        except TimeoutError:
            self.logger.warning("NATS subscriptions did not drain in %g s", self.close_grace)

    async def _shutdown(self) -> None:
        nc, self._nc = self._nc, None
        self._live, self._subs = False, []
        if nc is not None:
            await quietly(nc.close(), self.logger, "closing the NATS connection")


class NatsClient(BrokerClient):
    """A client for a Nest NATS microservice (or a nestpy_mini one).

    Options: the server's for connecting, ``headers`` (a dict sent with every request and event),
    ``inbox_prefix`` (default ``_INBOX``) and ``timeout`` (s per request, default 5).

    While nats-py reconnects, a request fails at once with ``ConnectionError`` and
    requests in flight fail with ``ConnectionClosedError``: their replies could not
    reach us.  Events are buffered by nats-py up to its ``pending_size`` (2 MiB by
    default) and sent on reconnect; beyond that, emit fails.
    """

    kind = transport_name = "nats"

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        # NATS header values are text; None sends a plain PUB, as Nest does.
        headers = {str(k): str(v) for k, v in (self.options.get("headers") or {}).items()}
        self.headers: dict[str, str] | None = headers or None
        self._nc: NatsConnection | None = None
        self._reply_prefix = ""  # "<inbox>.": a request's reply subject is this and its id

    @property
    def is_connected(self) -> bool:
        """False before the first send, and while nats-py reconnects."""
        return self._connected and self._nc is not None and self._nc.is_connected

    async def _connect(self) -> None:
        nc = await _connect(self)
        try:
            inbox = nc.new_inbox()
            await nc.subscribe(f"{inbox}.*", cb=self._on_message)
        except BaseException:
            await quietly(nc.close(), self.logger, "closing the NATS connection")
            raise
        self._reply_prefix = f"{inbox}."
        self._nc = nc

    async def _close(self) -> None:
        nc, self._nc = self._nc, None
        if nc is not None:
            await quietly(nc.close(), self.logger, "closing the NATS connection")

    def _up(self, up: bool) -> None:
        if not up:  # replies sent while we are away are lost: fail now, not at the timeout
            lost = ConnectionClosedError(f"connection to {self.describe()} lost; reconnecting")
            self._fail_pending(lost)

    def _gave_up(self) -> None:
        self._nc = None
        self.logger.error("gave up reconnecting to %s; the next send connects", self.describe())
        self._on_connection_lost(ConnectionError("gave up reconnecting"))

    def _ready(self, request: bool) -> NatsConnection:
        """The connection.  While nats-py reconnects, a request fails (its reply
        could not reach us); an event is buffered by nats-py."""
        nc = self._nc
        if nc is None or (request and not nc.is_connected):
            raise ConnectionError(f"not connected to NATS at {self.describe()} (reconnecting)")
        return nc

    async def _publish(self, pattern: Any, data: Any, msg_id: str) -> None:
        body = dumps({"pattern": pattern, "data": data, "id": msg_id}).encode()
        await self._put(self._ready(True), pattern, body, self._reply_prefix + msg_id)

    async def _dispatch_event(self, pattern: Any, data: Any) -> None:
        body = dumps({"pattern": pattern, "data": data}).encode()
        await self._put(self._ready(False), pattern, body, "")

    async def _put(self, nc: NatsConnection, pattern: Any, body: bytes, reply: str) -> None:
        subject = normalize_pattern(pattern)
        try:
            await nc.publish(subject, body, reply=reply, headers=self.headers)
        except (nats.errors.BadSubjectError, nats.errors.MaxPayloadError) as exc:
            raise ValueError(f"cannot publish to NATS subject {subject!r}: {exc!r}") from exc
        except nats.errors.Error as exc:
            raise ConnectionError(f"NATS at {self.describe()}: {exc!r}") from exc

    async def _on_message(self, msg: Msg) -> None:
        """One reply, for the request whose id ends its subject, as Nest's per-request inbox."""
        msg_id = msg.subject[len(self._reply_prefix) :]
        if msg.data:
            self._on_body(msg.data, msg_id)
            return
        self._no_responders(msg_id)  # the broker's 503 (to Nest, any empty reply)


SERVER = NatsServer
CLIENT = NatsClient
