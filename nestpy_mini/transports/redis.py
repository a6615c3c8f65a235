"""Redis: Nest's pub/sub transport, on redis-py's asyncio API.

The wire, as ``@nestjs/microservices`` 12 speaks it:

* The server ``SUBSCRIBE``\\s to every handler's normalized pattern (``PSUBSCRIBE``
  with ``wildcards``) and answers with ``PUBLISH <channel>.reply``.  The route
  is the channel (with ``wildcards``: the subscribed glob), never the
  ``pattern`` in the body.
* A request is ``PUBLISH <normalized> {"pattern": <raw>, "data": ..., "id": ...}``,
  sent only after the client's ``SUBSCRIBE <normalized>.reply`` is confirmed,
  so the reply cannot be missed.  Replies are matched by ``id``.
* An event is ``PUBLISH <normalized> {"pattern": <raw>, "data": ...}``.

What pub/sub gives, and what it does not (it is not a queue):

* **At most once.**  A message published while nobody is subscribed is lost:
  a request sent before its server subscribed simply times out.
* **Every subscriber gets every message.**  Two server instances both run an
  event's handlers, and both answer a request; the client takes the first
  reply for an id and drops the duplicate (a streamed reply from two
  instances would interleave).  Use NATS queue groups or RabbitMQ to share
  work instead.

Both sides use two connections, as Nest does: one subscribed, one publishing.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from ..client import ClientProxy
from ..exceptions import ConnectionClosedError
from ..packets import dumps as _dumps
from ..packets import loads as _loads
from ..patterns import normalize_pattern
from ..server import BaseRpcContext, Server
from . import base as brokers

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 6379
# Seconds.  Every wait on the broker is bounded by one of these.
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_COMMAND_TIMEOUT = 5.0
# An idle subscriber connection PINGs after this long; no answer within as
# long again means the broker is gone even if TCP never said so.
DEFAULT_PING_INTERVAL = 30.0
# The server's re-subscribe backoff starts here and doubles up to retry_delay.
FIRST_RETRY_DELAY = 0.05
DEFAULT_RETRY_DELAY = 1.0
REPLY_SUFFIX = ".reply"

T = TypeVar("T")
logger = logging.getLogger("nestpy_mini.redis")

# (channel, payload, glob): glob is the PSUBSCRIBE pattern a message matched, or None.
OnMessage = Callable[[bytes, bytes, bytes | None], None]


class RedisContext(BaseRpcContext):
    """``args`` are ``(channel, metadata)``, as in Nest's ``RedisContext``."""

    __slots__ = ()

    def get_channel(self) -> str:
        """The channel the message came on (with ``wildcards``: the concrete one)."""
        return self.args[0]

    def get_metadata(self) -> Any:
        """The ``metadata`` the client put in the envelope, if any."""
        return self.args[1]


# --- connecting ---------------------------------------------------------------


class _Limits:
    """The bounds on every wait for the broker, in seconds, read once from the options.

    redis-py's own ``socket_timeout`` is left unset: it wraps every write in a
    task and every read in a timer, per message.  Each await on redis-py here
    is bounded from outside instead, once per batch or per command.
    """

    __slots__ = ("connect", "io", "ping")

    def __init__(self, options: dict[str, Any], connect_timeout: float) -> None:
        self.connect = connect_timeout
        self.io = float(options.get("command_timeout", DEFAULT_COMMAND_TIMEOUT))
        self.ping = float(options.get("ping_interval", DEFAULT_PING_INTERVAL))


def _settings(options: dict[str, Any]) -> tuple[str | None, str]:
    """The URL to use (None when host/port or discovery decide) and a safe description."""
    url = options.get("url")
    if url:
        return str(url), brokers.redact(str(url))
    if "host" in options or "port" in options:
        host = options.get("host", DEFAULT_HOST)
        port = int(options.get("port", DEFAULT_PORT))
        return None, f"redis://{host}:{port}/{int(options.get('db', 0))}"
    return None, "redis (broker found at connect time)"


async def _open_redis(options: dict[str, Any], limits: _Limits) -> tuple[Redis, str]:
    """A ``Redis`` for publishing (its pool also makes the subscriber connection).

    Nothing is connected yet.  Without ``url``/``host``/``port`` the broker is
    found now, at connect time, in a thread because discovery probes sockets.
    """
    common: dict[str, Any] = {
        "socket_connect_timeout": limits.connect,
        "socket_timeout": None,  # see _Limits
        "socket_keepalive": True,
        # No hidden retries: redis-py's default retries a failed command ten
        # times with backoff, which would stretch a send during an outage far
        # past its timeout.  Outages are handled here, explicitly.
        "retry": Retry(NoBackoff(), 0),
        # RESP2: pub/sub messages are plain arrays (redis-py 8 defaults to RESP3).
        "protocol": 2,
    }
    for key in ("username", "password", "db"):
        if options.get(key) is not None:
            common[key] = options[key]
    url, described = _settings(options)
    if url is None and ("host" in options or "port" in options):
        host = options.get("host", DEFAULT_HOST)
        port = int(options.get("port", DEFAULT_PORT))
        return Redis(host=host, port=port, **common), described
    if url is None:
        url = ",".join(brokers.broker_urls("redis", None))
        described = brokers.redact(url)
    return Redis.from_url(url, **common), described


async def _bounded(awaitable: Awaitable[T], within: float, what: str) -> T:
    """``awaitable``, or ``TimeoutError`` naming ``what`` after ``within`` seconds."""
    try:
        return await asyncio.wait_for(awaitable, within)
    except TimeoutError:
        raise TimeoutError(f"{what}: no answer from redis within {within:g} s") from None


class _Publisher:
    """Every PUBLISH of one side, on a connection of its own.

    Callers only append.  A writer task sends whatever queued up during one
    loop pass in one write, and a reader task takes the broker's replies to
    those PUBLISHes as they come back, in order.  Writing never waits for
    them: waiting for each batch's replies before writing the next (as a
    redis-py pipeline does) left both sides idle for a Redis round trip per
    batch, and cost a third of the throughput under load.

    A token travels with each message: an ``asyncio.Future`` is resolved once
    the broker has taken its message (or failed); any other token is handed
    to ``on_failed`` if its message could not be published.
    """

    def __init__(
        self,
        redis: Redis,
        on_failed: Callable[[list[Any], BaseException], None],
        limits: _Limits,
    ) -> None:
        self.conn = redis.connection_pool.make_connection()
        self._on_failed = on_failed
        self._limits = limits
        self._queue: list[tuple[bytes, Any]] = []  # (packed PUBLISH, token)
        self._unacked: deque[Any] = deque()  # tokens written, oldest first
        self._acked = 0  # replies read so far; the watchdog compares it
        self._all_acked = asyncio.Event()
        self._all_acked.set()
        self._watchdog: asyncio.TimerHandle | None = None
        self._reader: asyncio.Task[None] | None = None
        self._dying: asyncio.Task[None] | None = None  # a reader being cancelled
        self._wake = asyncio.Event()
        self._closing = False
        self._writer: asyncio.Task[None] | None = None

    async def open(self) -> None:
        """Connect now, so a broker that cannot be reached fails the caller at once."""
        await self._connect()
        self._writer = asyncio.ensure_future(self._write_loop())

    async def _connect(self) -> None:
        # socket_connect_timeout bounds the TCP connect; this bounds the handshake too.
        await _bounded(self.conn.connect(), self._limits.connect, "connect")
        self._reader = asyncio.ensure_future(self._read_loop(self.conn))

    def publish(self, channel: bytes | str, payload: bytes, token: Any = None) -> None:
        if self._closing or self._writer is None:  # nobody would write it: fail now
            self._fail([token], ConnectionClosedError("publisher closed"))
            return
        if type(channel) is str:
            channel = channel.encode()
        # RESP, packed by hand: redis-py's general packer cost more than the
        # rest of a reply's handling.
        command = b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n" % (
            len(channel),
            channel,
            len(payload),
            payload,
        )
        self._queue.append((command, token))
        self._wake.set()

    async def _write_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._queue = self._queue, []
            if batch:
                await self._write(batch)
            if self._closing and not self._queue:
                return

    async def _write(self, batch: list[tuple[bytes, Any]]) -> None:
        tokens = [token for _, token in batch]
        if self._reader is None:  # the connection was lost: open a new one
            try:
                await self._reconnect()
            except Exception as exc:  # nothing was written
                self._fail(tokens, exc)
                return
        self._unacked.extend(tokens)
        self._all_acked.clear()
        if self._watchdog is None:
            self._arm_watchdog()
        try:
            commands = [command for command, _ in batch]
            await _bounded(
                self.conn.send_packed_command(commands, check_health=False),
                self._limits.io,
                f"PUBLISH of {len(batch)}",
            )
        except Exception as exc:  # the broker is gone: fail what it did not confirm
            self._lost(exc)

    async def _reconnect(self) -> None:
        if self._dying is not None:  # its reader must be gone before a new one reads
            await asyncio.wait([self._dying])
            self._dying = None
        await self.conn.disconnect()
        await self._connect()

    async def _read_loop(self, conn: AbstractConnection) -> None:
        unacked = self._unacked
        while True:
            try:
                # math.inf: block with no timeout (None would mean socket_timeout).
                await conn.read_response(timeout=math.inf)
                error = None
            except ResponseError as exc:  # this one PUBLISH was refused (ACL, say)
                error = exc
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # RedisError, OSError: the link is gone
                self._lost(exc)
                return
            self._acked += 1
            if not unacked:  # a reply to nothing we sent: the stream is not ours
                self._lost(ConnectionError("redis sent an unexpected reply"))
                return
            token = unacked.popleft()
            if error is not None:
                self._fail([token], error)
            elif isinstance(token, asyncio.Future) and not token.done():
                token.set_result(None)
            if not unacked:
                self._all_acked.set()

    def _arm_watchdog(self) -> None:
        loop = asyncio.get_running_loop()
        self._watchdog = loop.call_later(self._limits.io, self._watch, self._acked)

    def _watch(self, seen: int) -> None:
        """Every ``io`` seconds while replies are owed: some must have come since."""
        self._watchdog = None
        if not self._unacked:
            return  # the next write arms it again
        if self._acked == seen:
            within = self._limits.io
            self._lost(TimeoutError(f"no answer from redis to PUBLISH within {within:g} s"))
            return
        self._arm_watchdog()

    def _lost(self, exc: BaseException) -> None:
        """The connection failed: everything written and not confirmed fails with ``exc``.

        The next write connects again; a message may still have reached the
        broker, so a failed request can have run (at most once, never twice).
        """
        reader, self._reader = self._reader, None
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
            self._dying = reader
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        unacked = list(self._unacked)
        self._unacked.clear()
        self._all_acked.set()
        if unacked:
            self._fail(unacked, exc)

    def _fail(self, tokens: list[Any], exc: BaseException) -> None:
        others = []
        for token in tokens:
            if isinstance(token, asyncio.Future):
                if not token.done():
                    token.set_exception(exc)
            else:
                others.append(token)
        if others:
            self._on_failed(others, exc)

    async def close(self, within: float) -> None:
        """Write what is queued and wait for the broker to take it (for at most
        ``within`` seconds), then disconnect."""
        self._closing = True
        self._wake.set()
        writer = self._writer
        if writer is not None:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + within
            await asyncio.wait([writer], timeout=within)
            if not writer.done():
                writer.cancel()
                await asyncio.wait([writer])
            elif self._reader is not None:
                acked = asyncio.ensure_future(self._all_acked.wait())
                await asyncio.wait([acked], timeout=max(0.0, deadline - loop.time()))
                acked.cancel()
        self._lost(ConnectionClosedError("closed before redis confirmed the message"))
        if self._dying is not None:
            await asyncio.wait([self._dying])
        queued, self._queue = self._queue, []
        if queued:
            self._fail(
                [token for _, token in queued],
                ConnectionClosedError("closed before the message was published"),
            )
        try:
            await self.conn.disconnect()
        except Exception as exc:
            logger.debug("error while closing a redis connection: %s", exc)


class _Subscriber:
    """The subscribed connection, and one task reading everything it receives.

    A raw redis-py connection rather than ``PubSub``: ``PubSub`` reconnects and
    re-subscribes inside its retry wrapper, behind the caller's back, and
    builds a dict per message.  Owning the socket lets each side decide what
    an outage means (the server re-subscribes, the client fails what waits)
    and keeps the read loop to a few comparisons per message.

    A watchdog timer, not a timeout per read, notices a silent broker: after
    ``ping`` seconds without traffic it sends PING, and if nothing at all has
    arrived ``ping`` seconds later the connection is declared lost.
    """

    def __init__(
        self,
        conn: AbstractConnection,
        on_message: OnMessage,
        on_lost: Callable[[_Subscriber, BaseException], None],
        limits: _Limits,
    ) -> None:
        self.conn = conn
        self._on_message = on_message
        self._on_lost = on_lost
        self._limits = limits
        self._acks: dict[tuple[bytes, bytes], asyncio.Future[None]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._received = 0  # responses read so far; the watchdog compares it
        self._checked = 0
        self._pinged = False
        self._chores: set[asyncio.Task[None]] = set()
        self.closed = False

    async def open(self) -> None:
        # socket_connect_timeout bounds the TCP connect; this bounds the handshake too.
        await _bounded(self.conn.connect(), self._limits.connect, "connect")
        self._reader = asyncio.ensure_future(self._read())
        if self._limits.ping > 0:
            loop = asyncio.get_running_loop()
            self._watchdog = loop.call_later(self._limits.ping, self._watch)

    def expect_ack(self, kind: bytes, name: bytes) -> asyncio.Future[None]:
        """A future resolved when the broker confirms ``kind`` (b"subscribe"...) of ``name``."""
        future = self._acks.get((kind, name))
        if future is None or future.done():
            future = asyncio.get_running_loop().create_future()
            self._acks[(kind, name)] = future
        return future

    async def command(self, *args: bytes | str) -> None:
        """Send one command; its answer arrives through the read loop."""
        conn = self.conn
        # Checked right before sending: redis-py would otherwise quietly open
        # a fresh socket here, one this subscriber does not read from.
        if self.closed or not conn.is_connected:
            raise ConnectionError("the subscriber connection is closed")
        await _bounded(conn.send_command(*args, check_health=False), self._limits.io, "send")

    async def subscribe(self, kind: bytes, names: list[bytes]) -> None:
        """SUBSCRIBE (or PSUBSCRIBE) ``names`` and wait until all are confirmed."""
        if not names:
            return
        acks = [self.expect_ack(kind, name) for name in names]
        await self.command(kind.upper(), *names)
        await _bounded(asyncio.gather(*acks), self._limits.connect, kind.decode())

    async def _read(self) -> None:
        conn = self.conn
        on_message = self._on_message
        try:
            while True:
                try:
                    # math.inf: block with no timeout (None would mean socket_timeout).
                    resp = await conn.read_response(timeout=math.inf)
                except ResponseError as exc:  # an answer to one command; the link is fine
                    logger.warning("redis refused a subscriber command: %s", exc)
                    # Which (P)SUBSCRIBE it answered is unknown: fail every
                    # waiter now rather than let each wait out its timeout.
                    self._fail_acks(ConnectionError(f"redis refused to subscribe: {exc}"))
                    continue
                self._received += 1
                try:
                    kind = resp[0]
                    if kind == b"message":
                        on_message(resp[1], resp[2], None)
                    elif kind == b"pmessage":
                        on_message(resp[2], resp[3], resp[1])
                    elif kind in (b"subscribe", b"psubscribe"):
                        future = self._acks.pop((kind, resp[1]), None)
                        if future is not None and not future.done():
                            future.set_result(None)
                except Exception:  # one bad message must not stop the reading
                    logger.exception("failed to handle a message from redis")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # RedisError, OSError: the link is gone
            await self._lost(exc)

    def _watch(self) -> None:
        if self.closed:
            return
        if self._received != self._checked:
            self._checked = self._received
            self._pinged = False
        elif not self._pinged:
            self._pinged = True
            self._chore(self._ping())
        else:
            silence = 2 * self._limits.ping
            self._chore(self._expire(TimeoutError(f"no answer to PING within {silence:g} s")))
            return
        loop = asyncio.get_running_loop()
        self._watchdog = loop.call_later(self._limits.ping, self._watch)

    def _chore(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)

    async def _ping(self) -> None:
        try:
            await self.command("PING")
        except Exception as exc:  # the read loop or the watchdog reports it
            logger.debug("redis PING not sent: %s", exc)

    async def _expire(self, exc: BaseException) -> None:
        reader = self._reader
        if reader is not None and not reader.done():
            reader.cancel()
            await asyncio.wait([reader])
        if not self.closed:
            await self._lost(exc)

    async def _lost(self, exc: BaseException) -> None:
        self.closed = True
        self._stop_watchdog()
        self._fail_acks(ConnectionError(f"redis connection lost: {exc}"))
        await self._disconnect()
        self._on_lost(self, exc)

    def _stop_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def _fail_acks(self, error: BaseException) -> None:
        acks, self._acks = self._acks, {}
        for future in acks.values():
            if not future.done():
                future.set_exception(error)
                future.exception()  # nobody may be waiting for it

    async def _disconnect(self) -> None:
        try:
            await self.conn.disconnect()  # bounded by socket_connect_timeout
        except Exception as exc:
            logger.debug("error while closing a redis connection: %s", exc)

    async def close(self) -> None:
        self.closed = True
        self._stop_watchdog()
        tasks = [t for t in (self._reader, *self._chores) if t is not None and not t.done()]
        self._reader = None
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        self._fail_acks(ConnectionClosedError("closed"))
        await self._disconnect()


# --- server ---------------------------------------------------------------------


class RedisServer(Server):
    """Serves handlers over Nest's Redis transport.

    Options: ``url`` (``redis://[user:pass@]host:port/db``, ``rediss://`` for TLS)
    or ``host``/``port``/``username``/``password``/``db`` (without any of them
    the broker is found at listen time, see ``nestpy_mini.brokers``);
    ``wildcards`` (PSUBSCRIBE each pattern as a glob, like Nest's option);
    ``connect_timeout``, ``command_timeout`` and ``ping_interval`` in seconds;
    ``retry_attempts`` (re-subscribe attempts per outage; default: no limit)
    and ``retry_delay`` (the cap of the re-subscribe backoff, in seconds).

    When the broker goes away the server logs one line, re-subscribes to every
    channel with a small backoff, and serves again once the broker is back.
    Messages published in between are lost: that is pub/sub.
    """

    transport_name = "redis"

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        self.wildcards = bool(self.options.get("wildcards", False))
        self.connect_timeout = float(self.options.get("connect_timeout", DEFAULT_CONNECT_TIMEOUT))
        self._limits = _Limits(self.options, self.connect_timeout)
        attempts = self.options.get("retry_attempts")
        self.retry_attempts: int | None = int(attempts) if attempts is not None else None
        self.retry_delay = float(self.options.get("retry_delay", DEFAULT_RETRY_DELAY))
        self.url = _settings(self.options)[1]
        self._redis: Redis | None = None
        self._publisher: _Publisher | None = None
        self._sub: _Subscriber | None = None
        self._routes: dict[bytes, str] = {}
        self._reconnect: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def is_subscribed(self) -> bool:
        """True while every handler's channel is subscribed (False during an outage)."""
        return self._sub is not None and not self._sub.closed

    async def listen(self) -> None:
        self._closing = False
        self._redis, self.url = await _open_redis(self.options, self._limits)
        # The channel of each handler is its route; a message names its
        # channel (or glob), so one dict lookup finds the route.
        self._routes = {route.encode(): route for route in self.patterns}
        self._publisher = _Publisher(self._redis, self._replies_failed, self._limits)
        try:
            await self._publisher.open()  # now, as Nest does
            self._sub = await self._subscribe_all()
        except (RedisError, OSError) as exc:
            await self._shutdown()
            raise ConnectionError(f"cannot serve on {self.url}: {exc}") from exc
        except BaseException:
            await self._shutdown()
            raise

    async def _subscribe_all(self) -> _Subscriber:
        assert self._redis is not None
        conn = self._redis.connection_pool.make_connection()
        sub = _Subscriber(conn, self._on_message, self._on_lost, self._limits)
        try:
            await sub.open()
            await sub.subscribe(
                b"psubscribe" if self.wildcards else b"subscribe", list(self._routes)
            )
        except BaseException:
            await sub.close()
            raise
        return sub

    def _on_lost(self, sub: _Subscriber, exc: BaseException) -> None:
        if self._closing or sub is not self._sub:
            return
        self._sub = None
        self.logger.warning(
            "lost the redis connection at %s (%s); re-subscribing as soon as it is back",
            self.url,
            exc,
        )
        self._reconnect = asyncio.ensure_future(self._resubscribe())

    async def _resubscribe(self) -> None:
        """Re-subscribe to every channel, backing off; one log line when done."""
        delay = FIRST_RETRY_DELAY
        attempt = 0
        while not self._closing:
            attempt += 1
            await asyncio.sleep(delay)
            try:
                sub = await self._subscribe_all()
            except Exception as exc:  # RedisError, OSError (TimeoutError too)
                if self.retry_attempts is not None and attempt >= self.retry_attempts:
                    self.logger.error(
                        "gave up re-subscribing at %s after %d attempts (%s); not serving",
                        self.url,
                        attempt,
                        exc,
                    )
                    return
                delay = min(delay * 2, self.retry_delay)
                continue
            if self._closing:
                await sub.close()
                return
            self._sub = sub
            self.logger.info(
                "re-subscribed to %d channel(s) at %s after %d attempt(s)",
                len(self._routes),
                self.url,
                attempt,
            )
            return

    def _replies_failed(self, tokens: list[Any], exc: BaseException) -> None:
        self.logger.warning("could not publish %d reply packet(s): %s", len(tokens), exc)

    def _on_message(self, channel: bytes, payload: bytes, glob: bytes | None) -> None:
        route = self._routes.get(channel if glob is None else glob)
        if route is None:  # not one of ours; cannot happen unless the broker misbehaves
            return
        try:
            packet = _loads(payload.decode())  # bad UTF-8 is a ValueError too
        except (ValueError, RecursionError):
            self.logger.warning("dropped a message on %r that is not JSON", _text(channel))
            return
        if not isinstance(packet, dict) or ("pattern" not in packet and "data" not in packet):
            if glob is not None and channel.endswith(b".reply"):
                # A glob such as "users.*" also matches "users.x.reply", where
                # the replies go; those are not for the server.
                return
            self.logger.warning("dropped a message on %r that is not a Nest packet", _text(channel))
            return
        ctx = RedisContext((_text(channel), packet.get("metadata")))
        if "id" not in packet:  # only a missing id makes an event, as in Nest
            self.handle_event(route, packet.get("data"), ctx)
            return
        msg_id = packet["id"]
        if isinstance(msg_id, dict | list):
            self.logger.warning("dropped a request on %r whose id is not a scalar", _text(channel))
            return
        publish = self._publisher.publish  # type: ignore[union-attr]
        reply_channel = channel + b".reply"

        def reply(packet: dict[str, Any]) -> None:
            publish(reply_channel, _dumps(packet).encode())

        self.handle_request(route, packet.get("data"), msg_id, ctx, reply)

    async def close(self) -> None:
        if self._redis is None:
            return
        self._closing = True
        reconnect, self._reconnect = self._reconnect, None
        if reconnect is not None and not reconnect.done():
            reconnect.cancel()
            await asyncio.wait([reconnect])
        sub, self._sub = self._sub, None
        if sub is not None:
            await sub.close()  # no new requests while draining
        await self.drain()
        await self._shutdown()

    async def _shutdown(self) -> None:
        publisher, self._publisher = self._publisher, None
        if publisher is not None:
            await publisher.close(self.close_grace)
        redis, self._redis = self._redis, None
        if redis is not None:
            await _aclose(redis)


def _text(channel: bytes) -> str:
    return channel.decode("utf-8", "replace")


async def _aclose(redis: Redis) -> None:
    try:
        await redis.aclose()
    except Exception as exc:
        logger.debug("error while closing a redis client: %s", exc)


# --- client ---------------------------------------------------------------------


class RedisClient(ClientProxy):
    """A client for a Nest Redis microservice (or a nestpy_mini one).

    Options: ``url`` or ``host``/``port``/``username``/``password``/``db`` (none:
    the broker is found at connect time), ``timeout`` (seconds per request,
    default 5), ``connect_timeout``, ``command_timeout``, ``ping_interval``.
    ``wildcards`` is accepted and ignored, as Nest's client ignores it.

    Reply channels (``<pattern>.reply``) stay subscribed for the client's
    lifetime instead of per request: the wire is the same, a round trip less.
    When the connection drops, waiting requests fail with
    ``ConnectionClosedError`` and the next send connects again.
    """

    transport_name = "redis"

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        self.url = _settings(self.options)[1]
        self._limits = _Limits(self.options, self.connect_timeout)
        self._redis: Redis | None = None
        self._publisher: _Publisher | None = None
        self._sub: _Subscriber | None = None
        # Route -> confirmation of the SUBSCRIBE to its reply channel, and
        # the routes whose reply channel is confirmed, for the fast path.
        self._replies: dict[str, asyncio.Future[None]] = {}
        self._confirmed: set[str] = set()
        self._discarding: set[asyncio.Task[None]] = set()

    def describe(self) -> str:
        return self.url

    async def _connect(self) -> None:
        if self._discarding:  # the last connection's sockets are still closing
            await asyncio.wait(set(self._discarding), timeout=self.connect_timeout)
        redis, self.url = await _open_redis(self.options, self._limits)
        publisher = _Publisher(redis, self._publish_failed, self._limits)
        conn = redis.connection_pool.make_connection()
        sub = _Subscriber(conn, self._on_message, self._on_lost, self._limits)
        try:
            results = await asyncio.gather(sub.open(), publisher.open(), return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    raise result
        except BaseException as exc:
            await _discard(sub, publisher, redis, 0)
            if isinstance(exc, RedisError):
                raise ConnectionError(str(exc)) from exc
            raise
        self._redis, self._publisher, self._sub = redis, publisher, sub
        self._replies, self._confirmed = {}, set()

    def _on_lost(self, sub: _Subscriber, exc: BaseException) -> None:
        if sub is not self._sub:
            return
        logger.warning("lost the redis connection at %s: %s", self.url, exc)
        self._drop_connection(0)
        self._on_connection_lost(exc)

    def _drop_connection(self, grace: float) -> None:
        sub, publisher, redis = self._sub, self._publisher, self._redis
        self._sub = self._publisher = self._redis = None
        self._replies, self._confirmed = {}, set()
        task = asyncio.ensure_future(_discard(sub, publisher, redis, grace))
        self._discarding.add(task)
        task.add_done_callback(self._discarding.discard)

    async def _close(self) -> None:
        self._drop_connection(self.timeout)
        await asyncio.wait(set(self._discarding), timeout=self.timeout + self.connect_timeout)

    def _on_message(self, channel: bytes, payload: bytes, glob: bytes | None) -> None:
        try:
            packet = _loads(payload.decode())
        except (ValueError, RecursionError):
            logger.warning("dropped a reply on %r that is not JSON", _text(channel))
            return
        if not isinstance(packet, dict):
            logger.warning("dropped a reply on %r that is not a JSON object", _text(channel))
            return
        if not isinstance(packet.get("id"), str):  # ours are strings; others are not for us
            logger.debug("dropped a reply on %r without a string id", _text(channel))
            return
        self._on_reply(packet)

    def _publish_failed(self, tokens: list[Any], exc: BaseException) -> None:
        error = ConnectionError(f"could not publish to {self.url}: {exc}")
        for msg_id in tokens:
            call = self._routing.get(msg_id)
            if call is not None:
                call.fail(error)

    def _publish(self, pattern: Any, data: Any, msg_id: str) -> Awaitable[None] | None:
        publisher = self._publisher
        if publisher is None or self._sub is None:
            raise ConnectionError(f"not connected to {self.url}")
        route = normalize_pattern(pattern)
        payload = _dumps({"pattern": pattern, "data": data, "id": msg_id}).encode()
        if route in self._confirmed:  # the common case: no coroutine, no wait
            publisher.publish(route, payload, msg_id)
            return None
        return self._publish_once_subscribed(route, payload, msg_id)

    async def _publish_once_subscribed(self, route: str, payload: bytes, msg_id: str) -> None:
        """The first requests to a pattern: SUBSCRIBE its reply channel, wait for the
        broker's confirmation (no longer than the request may wait), then publish."""
        sub = self._sub
        assert sub is not None
        ready = self._replies.get(route)
        if ready is None:
            ready = await self._subscribe_replies(route, sub)
        if not ready.done():
            call = self._routing.get(msg_id)
            waits: set[asyncio.Future[Any]] = {ready} if call is None else {ready, call.done}
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if not ready.done():
                return  # the request timed out or failed first; _request raises that
        if ready.exception() is not None:
            if self._replies.get(route) is ready:
                del self._replies[route]  # the next send asks again
            raise ConnectionError(f"cannot subscribe to {route}{REPLY_SUFFIX}: {ready.exception()}")
        if sub is not self._sub or self._publisher is None:
            raise ConnectionError(f"connection to {self.url} lost while subscribing")
        self._confirmed.add(route)
        self._publisher.publish(route, payload, msg_id)

    async def _subscribe_replies(self, route: str, sub: _Subscriber) -> asyncio.Future[None]:
        channel = (route + REPLY_SUFFIX).encode()
        ready = sub.expect_ack(b"subscribe", channel)
        self._replies[route] = ready
        try:
            await sub.command("SUBSCRIBE", channel)
        except Exception as exc:
            if self._replies.get(route) is ready:
                del self._replies[route]
            if not ready.done():
                ready.set_exception(exc)
                ready.exception()  # retrieved: concurrent waiters see it through ready
            raise ConnectionError(f"cannot subscribe to {_text(channel)}: {exc}") from exc
        return ready

    async def _dispatch_event(self, pattern: Any, data: Any) -> None:
        publisher = self._publisher
        if publisher is None:
            raise ConnectionError(f"not connected to {self.url}")
        # Nest's Redis client sends the pattern raw, as in a request.
        payload = _dumps({"pattern": pattern, "data": data}).encode()
        written: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        publisher.publish(normalize_pattern(pattern), payload, written)
        try:
            await asyncio.wait_for(written, self.timeout)
        except RedisError as exc:
            raise ConnectionError(f"could not publish to {self.url}: {exc}") from exc


async def _discard(
    sub: _Subscriber | None, publisher: _Publisher | None, redis: Redis | None, grace: float
) -> None:
    """Close one connection pair: the subscriber first, then what is left to publish."""
    if sub is not None:
        await sub.close()
    if publisher is not None:
        await publisher.close(grace)
    if redis is not None:
        await _aclose(redis)


SERVER = RedisServer
CLIENT = RedisClient
