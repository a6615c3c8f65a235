"""What every broker transport shares, so that each broker's file holds only its wire.

* **Where the broker is**: the options' URL, else the env URL, else Nest's default
  address (``broker_urls``), so that two processes with defaults meet, or both fail at
  once saying how to get a broker.  The framework never starts one: ``nestpy_mini.dev`` does.
* **Bounded waits** for connecting, subscribing and closing.
* **Reconnecting**: one backoff policy (``BrokerServer._reconnect``, for Redis and MQTT,
  whose libraries do not reconnect) and the same two log lines everywhere.
* **Reading and replying**: ``BrokerServer.read`` sorts a message, ``Reply`` writes replies,
  ``Batch`` turns what one loop pass writes into one write.
* **Contexts**: ``arg`` and ``pattern_text`` read them as Nest's do, for TCP's as well.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from ..client import ClientProxy
from ..exceptions import NoRespondersError
from ..packets import EMPTY_RESPONSE, Incoming, dumps, loads, read_incoming
from ..patterns import normalize_pattern
from ..server import BaseRpcContext, Server
from . import describe, unreachable

T = TypeVar("T")

# Seconds.  Every wait on a broker is bounded by one of these.
CONNECT_TIMEOUT = 5.0
CLOSE_TIMEOUT = 3.0
# Reconnect attempts start this far apart and double up to the transport's cap.
FIRST_RETRY_DELAY = 0.05


async def within(awaitable: Awaitable[T], seconds: float, what: str) -> T:
    """``awaitable``, or a ``TimeoutError`` that says what took too long."""
    try:
        async with asyncio.timeout(seconds) as bound:
            return await awaitable
    except TimeoutError:
        if not bound.expired():  # the awaitable's own timeout, with its own words
            raise
        raise TimeoutError(f"{what}: no answer within {seconds:g} s") from None


async def quietly(awaitable: Awaitable[Any], log: logging.Logger, what: str) -> None:
    """Close something within ``CLOSE_TIMEOUT``; a broker that is gone must not stall shutdown."""
    try:
        await within(awaitable, CLOSE_TIMEOUT, what)
    except Exception as exc:
        log.debug("%s: %r", what, exc)


def log_lost(log: logging.Logger, where: str, cause: BaseException | str | None) -> None:
    """The one line logged when a connection to a broker is lost, whoever reconnects."""
    log.warning("lost %s (%s); reconnecting", where, cause or "closed")


def log_back(log: logging.Logger, where: str, attempts: int | None = None) -> None:
    """The one line logged when it is back, with every subscription in place again."""
    after = f" after {attempts} attempt(s)" if attempts else ""
    log.info("back on %s%s; subscriptions restored", where, after)


def arg(index: int) -> Callable[[BaseRpcContext], Any]:
    """A context's ``get_*()``: Nest's contexts give each of their ``args`` a name."""
    return lambda ctx: ctx.args[index]


def pattern_text(pattern: Any) -> str:
    """Nest's ``getPatternAsString``: a string as it came, anything else as JSON."""
    return pattern if isinstance(pattern, str) else dumps(pattern)


class Batch:
    """Gathers what one loop pass writes and hands it to ``write`` as one list: with 100 in
    flight a server answers dozens per pass, and each write costs its library's bookkeeping
    and a syscall.  The flush is a ``call_soon``, after every callback already due.  ``write``
    returns None, or an awaitable (a full queue) that later items wait for, in order."""

    __slots__ = ("_due", "_waiting", "items", "write")

    def __init__(self, write: Callable[[list[Any]], Awaitable[None] | None]) -> None:
        self.write, self.items, self._due = write, [], False
        self._waiting: asyncio.Future[None] | None = None

    def add(self, item: Any) -> None:
        self.items.append(item)
        if not self._due and self._waiting is None:
            self._due = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._due = False
        if self._waiting is not None or not self.items:
            return
        items, self.items = self.items, []
        written = self.write(items)
        if written is not None:
            self._waiting = asyncio.ensure_future(written)
            self._waiting.add_done_callback(self._written)

    def _written(self, future: asyncio.Future[None]) -> None:
        self._waiting = None
        if not future.cancelled() and future.exception() is not None:
            logging.getLogger("nestpy_mini").warning("a write failed: %r", future.exception())
        self.flush()


class Reply:
    """Writes the reply packets of one request to where its transport sends them.

    A packet is encoded when the server base calls this, so that a value JSON
    cannot hold raises there and the base answers with an error instead.  With
    ``hold``, the packets a synchronous handler makes are kept for ``flush()``
    after dispatch (no task per reply, which is most replies); later ones go at once.
    """

    __slots__ = ("held", "send")

    def __init__(self, send: Callable[[bytes], Awaitable[None] | None], hold: bool = False) -> None:
        self.send = send
        self.held: list[bytes] | None = [] if hold else None

    def __call__(self, packet: dict[str, Any]) -> Awaitable[None] | None:
        body = dumps(packet).encode()
        if self.held is not None:
            self.held.append(body)
            return None
        try:
            return self.send(body)
        except ConnectionError as exc:  # the broker went away; the caller's timeout tells
            logging.getLogger("nestpy_mini").warning("could not deliver a reply: %s", exc)
            return None

    async def flush(self, log: logging.Logger) -> None:
        held, self.held = self.held, None
        for body in held or ():
            try:
                sent = self.send(body)
                if sent is not None:
                    await sent
            except Exception as exc:  # the broker went away; the server goes on
                log.warning("could not deliver a reply: %r", exc)


class BrokerServer(Server):
    """A server whose messages come through a broker.  A transport sets ``kind``, implements
    ``_open`` (connect and subscribe; an unreachable broker raises ``OSError``), ``_stop_taking``
    (stop consuming, so that draining ends) and ``_shutdown`` (disconnect), feeds every message
    to ``read``, then to ``dispatch`` with its route, and calls ``_lost`` if its library does
    not reconnect by itself."""

    kind = ""
    # The options that name the reconnect backoff's cap (with its default, in
    # seconds) and its number of attempts, in the transport's Nest names.
    retry_options: tuple[str, float, str] = ("retry_delay", 1.0, "retry_attempts")

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        self.connect_timeout = float(self.options.get("connect_timeout", CONNECT_TIMEOUT))
        self.urls: list[str] = []
        self._open_now = False
        cap, default, attempts = self.retry_options
        self.retry_cap = float(self.options.get(cap, default))
        tries = self.options.get(attempts)
        self.retry_attempts = None if tries is None else int(tries)  # None: until closed
        self._reconnecting: asyncio.Task[None] | None = None

    def describe(self) -> str:
        return describe(self.kind, self.urls)

    @property
    def reconnecting(self) -> bool:
        return self._reconnecting is not None and not self._reconnecting.done()

    async def listen(self) -> None:
        """Connect and subscribe every handler; return once the broker holds them all."""
        if self._open_now:
            return
        self._lost_early: BaseException | None = None
        try:
            await within(self._open(), self.connect_timeout, "connecting")
        except (OSError, TimeoutError) as exc:
            await self._shutdown()
            raise unreachable(self.kind, self.describe(), exc) from exc
        except BaseException:
            await self._shutdown()
            raise
        self._open_now = True
        if self._lost_early is not None:  # lost between subscribing and here
            self._lost(self._lost_early)

    async def close(self) -> None:
        """Stop taking messages, let running handlers reply, then disconnect."""
        if not self._open_now:
            return
        self._open_now = False
        task, self._reconnecting = self._reconnecting, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task])
        await self._stop_taking()
        await self.drain()
        await self._shutdown()

    async def _open(self) -> None:
        raise NotImplementedError

    async def _stop_taking(self) -> None:
        raise NotImplementedError

    async def _shutdown(self) -> None:
        raise NotImplementedError

    def _lost(self, cause: BaseException | None) -> None:
        if not self._open_now:
            self._lost_early = cause or ConnectionError("closed")
        elif self.retry_cap <= 0:  # mqtt.js's reconnectPeriod 0: never reconnect
            self.logger.error("lost %s (%s); not reconnecting", self.describe(), cause or "closed")
        elif not self.reconnecting:
            log_lost(self.logger, self.describe(), cause)
            self._reconnecting = asyncio.ensure_future(self._reconnect())

    async def _reconnect(self) -> None:
        """``_open`` again until it succeeds: attempts start ``FIRST_RETRY_DELAY``
        apart and double up to ``retry_cap`` s; ``retry_attempts`` bounds their number."""
        delay = FIRST_RETRY_DELAY
        for attempt in itertools.count(1):
            await asyncio.sleep(delay)
            try:
                await self._shutdown()  # what the lost connection, or a failed attempt, left
                await self._open()
            except Exception as exc:
                if self.retry_attempts is not None and attempt >= self.retry_attempts:
                    gave_up = "gave up reconnecting to %s after %d attempts (%s)"
                    self.logger.error(gave_up, self.describe(), attempt, exc)
                    return
                delay = min(delay * 2, self.retry_cap)
            else:
                log_back(self.logger, self.describe(), attempt)
                return

    def read(self, body: bytes, channel: str | None = None) -> Incoming | None:
        where = "" if channel is None else f" on {channel!r:.200}"
        try:
            packet = loads(body)
        except (ValueError, RecursionError):
            self.logger.warning("dropped a message%s that is not JSON", where)
            return None
        message = read_incoming(packet, channel)
        if isinstance(message, str):
            self.logger.warning("dropped a message%s: %s", where, message)
            return None
        return message


class BrokerClient(ClientProxy):
    """A client whose requests go through a broker: where it is, and reading replies."""

    kind = ""

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        self.urls: list[str] = []
        # False: wait even where the broker says nobody subscribes (Redis Cluster counts one node).
        self.check_subscribers = bool(self.options.get("check_subscribers", True))

    def describe(self) -> str:
        return describe(self.kind, self.urls)

    def _no_responders(self, msg_id: str) -> None:
        """The broker said nobody subscribes to the channel: fail now, not at the timeout."""
        call = self._routing.get(msg_id)
        if call is not None and self.check_subscribers:
            call.fail(NoRespondersError(EMPTY_RESPONSE.format(normalize_pattern(call.pattern))))

    def _cannot_connect(self, why: str) -> ConnectionError:
        return unreachable(self.kind, self.describe(), why)

    def _require(self, connection: T | None) -> T:
        """``connection``, or the error a send gets while there is none (lost, closed)."""
        if connection is None:
            raise ConnectionError(f"not connected to {self.describe()}")
        return connection

    def _on_body(self, body: bytes, msg_id: str | None = None) -> None:
        """One reply as it came off the broker; ``msg_id`` where the transport carries it aside."""
        try:
            packet = loads(body)
        except (ValueError, RecursionError):
            self.logger.warning("dropped a reply that is not JSON: %.80r", body)
            return
        self._on_reply(packet, msg_id)

    async def _unless_done(self, msg_id: str, step: Awaitable[Any]) -> bool:
        """Await ``step`` (a subscription, a confirmation) unless the request ends first
        (timed out, connection lost): then False, and the request raises its own error."""
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


class Subscriptions:
    """Reply channels, each subscribed once, before the first request that needs it: a reply
    published before the broker confirms the subscription would be lost.  Concurrent first
    requests share one SUBSCRIBE; after a loss, the next request on each subscribes again."""

    def __init__(self, subscribe: Callable[[str], Awaitable[None]]) -> None:
        self._subscribe = subscribe
        self.ready: set[str] = set()
        self._pending: dict[str, asyncio.Future[None]] = {}

    async def ensure(self, name: str) -> None:
        future = self._pending.get(name)
        if future is None:
            future = self._pending[name] = asyncio.ensure_future(self._subscribe(name))
            future.add_done_callback(lambda f: self._settled(name, f))
        # Shielded: one request's timeout must not cancel the others' wait.
        await asyncio.shield(future)

    def _settled(self, name: str, future: asyncio.Future[None]) -> None:
        if self._pending.get(name) is future:
            del self._pending[name]
        if not future.cancelled() and future.exception() is None:
            self.ready.add(name)

    def lost(self) -> None:
        """The connection is gone: nothing is subscribed on the next one."""
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()
        self.ready.clear()

    clear = lost  # for a new connection
