"""TCP: Nest's JSON-socket framing, and a server and a client that use it.

A frame is ``<length>#<json>``, where ``length`` is what JavaScript's
``string.length`` gives for the JSON text: UTF-16 code units, not bytes and
not code points.  An emoji counts two, a Chinese character one, so the
prefix must be computed exactly that way or a NestJS peer desynchronises.
"""

from __future__ import annotations

import asyncio
import codecs
import logging
import math
import re
import ssl
from typing import Any

from ..client import ClientProxy
from ..codec import dumps as _dumps
from ..codec import loads as _loads
from ..patterns import MAX_DEPTH, MAX_KEYS, normalize_pattern, route_of_incoming
from ..server import BaseRpcContext, Server

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 3000
# Nest 12's limits (helpers/json-socket): frame size in characters, the idle
# time allowed inside a half-received frame, and what may queue for a peer.
DEFAULT_MAX_BUFFER_SIZE = 128 * 1024 * 1024
DEFAULT_INCOMPLETE_MESSAGE_TIMEOUT = 30.0
DEFAULT_MAX_SEND_BUFFER_SIZE = 128 * 1024 * 1024
_MAX_PREFIX_DIGITS = 12
# Batched frames leave in writes of at most this many.  One write per whole
# batch made the two ends of a busy connection take turns: the peer sat idle
# until the last of 100 frames was encoded.  Writing every 32 frames lets it
# start on the first ones meanwhile; measured with 100 requests in flight
# over loopback, this raised a nestpy_mini pair from about 50k to 100k req/s
# (16 and 64 did worse; a write per frame costs a syscall each).
CORK_FRAMES = 32
# Frames longer than this (UTF-16 units) are flagged by the decoder so the
# server can screen their patterns; shorter ones cannot carry a costly one.
LARGE_FRAME = 256
# Looked up once: the old code looked it up for every non-ASCII frame.
_Utf8Decoder = codecs.getincrementaldecoder("utf-8")
_STRICT, _LENIENT = 1, 2  # how a non-ASCII frame is being scanned (0: not at all)
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")

logger = logging.getLogger("nestpy_mini.tcp")


class FrameError(ValueError):
    """The byte stream broke the framing; the connection cannot be trusted on."""


def _escape_surrogate(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def encode_frame(message: Any) -> bytes:
    """One packet as Nest's JSON socket writes it."""
    text = _dumps(message)
    if text.isascii():
        return b"%d#%s" % (len(text), text.encode())
    try:
        body = text.encode()
    except UnicodeEncodeError:
        # A lone surrogate (a string that arrived as "\ud800", say) has no
        # UTF-8 form; JSON.stringify writes it as a \u escape, and so do we.
        # Only this failure pays for the search.
        text = _LONE_SURROGATE.sub(_escape_surrogate, text)
        body = text.encode()
    units = len(text.encode("utf-16-le", "surrogatepass")) // 2
    return b"%d#%s" % (units, body)


class FrameDecoder:
    """Turns received bytes into decoded JSON packets, frame by frame.

    Between calls it holds at most one unfinished frame: ``max_size`` units
    and its prefix, which is ``3 * max_size + 13`` bytes at worst (a UTF-16
    unit takes up to three UTF-8 bytes).  A frame that arrives over many reads
    is scanned once in all, never again from its start on each read: that
    made a 32 MB frame cost seconds of a blocked event loop.
    """

    __slots__ = (
        "_broken",
        "_buf",
        "_done",
        "_length",
        "_mode",
        "_seen",
        "_units",
        "_utf8",
        "max_size",
        "saw_large_frame",
    )

    def __init__(self, max_size: int = DEFAULT_MAX_BUFFER_SIZE) -> None:
        self._buf = bytearray()
        self._length: int | None = None
        self.max_size = max_size
        # True when the last feed() completed a frame longer than LARGE_FRAME.
        self.saw_large_frame = False
        self._broken: str | None = None
        # Progress through a non-ASCII frame's body (see _scan).
        self._mode = 0
        self._seen = self._done = self._units = 0
        self._utf8: codecs.IncrementalDecoder | None = None

    @property
    def has_partial(self) -> bool:
        """True while a frame has begun but not ended."""
        return bool(self._buf) or self._length is not None

    def feed(self, data: bytes) -> list[Any]:
        """Every packet completed by ``data``; raises ``FrameError`` on broken framing."""
        if self._broken is not None:
            # Once framing is lost nothing after it can be located: no packet
            # may come out of what follows, so every later call fails too.
            raise FrameError(f"the stream already broke: {self._broken}")
        buf = self._buf
        buf += data
        out = []
        pos = 0
        large = False
        try:
            while True:
                length = self._length
                body = None
                if length is None:
                    hash_at = buf.find(b"#", pos, pos + _MAX_PREFIX_DIGITS + 1)
                    if hash_at < 0:
                        if len(buf) - pos > _MAX_PREFIX_DIGITS:
                            raise FrameError(f"no length prefix: {bytes(buf[pos : pos + 16])!r}")
                        break
                    prefix = bytes(buf[pos:hash_at])
                    if not prefix.isdigit():
                        raise FrameError(f"corrupted length prefix {prefix!r}")
                    length = int(prefix)
                    if length > self.max_size:
                        raise FrameError(
                            f"declared frame length {length} exceeds the limit of {self.max_size}"
                        )
                    self._length = length
                    pos = hash_at + 1
                elif self._mode:
                    # Only a frame carried over from an earlier read gets here:
                    # a non-ASCII one resumes its scan where that read stopped.
                    found = self._scan(buf, pos, length)
                    if found is None:
                        break
                    body, end = found
                if body is None:
                    end = pos + length
                    if end > len(buf):
                        # Each UTF-16 unit takes at least one byte, so the frame
                        # is not all here.  Wait without copying it: a big frame
                        # arrives in hundreds of reads.
                        break
                    chunk = buf[pos:end]
                    if chunk.isascii():  # one byte, one unit: the common case
                        body = chunk.decode("ascii")
                    else:
                        found = self._scan(buf, pos, length)
                        if found is None:
                            break
                        body, end = found
                self._length = None
                pos = end
                if length > LARGE_FRAME:
                    large = True
                try:
                    out.append(_loads(body))
                except (ValueError, RecursionError) as exc:
                    raise FrameError(f"invalid JSON in a frame: {exc}") from None
        except FrameError as exc:
            self._broken = str(exc)
            buf.clear()  # nothing in it can be used any more: free it now
            self._length = None
            self._mode = 0
            raise
        del buf[:pos]
        self.saw_large_frame = large
        return out

    def _scan(self, buf: bytearray, pos: int, length: int) -> tuple[str, int] | None:
        """The text of the non-ASCII frame body at ``pos`` and where it ends,
        or None while it is incomplete.

        Counts UTF-16 units over the bytes as they come, resuming where the
        last call stopped.  Bytes that are not UTF-8 count one unit each and
        become U+FFFD, as Node's decoder makes them.
        """
        dec = self._utf8
        if not self._mode:  # a new frame
            if dec is None:
                dec = self._utf8 = _Utf8Decoder()
            else:
                dec.reset()
            dec.errors = "strict"
            self._mode = _STRICT
            self._seen = self._done = self._units = 0
        # _seen: bytes given to the decoder; _done: bytes of the text it gave
        # back (it may hold the start of a character); _units: that text's length.
        seen, done, units = self._seen, self._done, self._units
        need = length - units
        # The rest needs at most three bytes a unit, and one more shows a
        # four-byte character that would straddle the frame's end.
        stop = min(len(buf) - pos, done + 3 * need + 1)
        try:
            text = dec.decode(buf[pos + seen : pos + stop])
        except UnicodeDecodeError:
            # Not UTF-8 (perhaps only past this frame's end): count again from
            # the frame's start, keeping each bad byte.  Once per frame at most.
            dec.reset()
            dec.errors = "surrogateescape"
            self._mode = _LENIENT
            self._seen = self._done = self._units = 0
            return self._scan(buf, pos, length)
        encoded = text.encode("utf-16-le", "surrogatepass")
        count = len(encoded) // 2
        if count < need:
            self._seen = stop
            self._done = stop - len(dec.getstate()[0])
            self._units = units + count
            return None
        if count == len(text):  # no character takes two units
            piece = text[:need]
        else:
            piece = encoded[: 2 * need].decode("utf-16-le", "surrogatepass")
            if "\ud800" <= piece[-1] <= "\udbff":
                raise FrameError("the frame length ends inside a character")
        end = pos + done + len(piece.encode("utf-8", dec.errors))
        if done == 0 and self._mode == _STRICT:
            body = piece  # the whole body, already decoded
        else:
            body = buf[pos:end].decode("utf-8", "replace")
        self._mode = 0
        return body, end


class TcpContext(BaseRpcContext):
    """``args`` are ``(connection, pattern, metadata)``, as in Nest's ``TcpContext``."""

    __slots__ = ()

    def get_socket_ref(self) -> TcpConnection:
        return self.args[0]

    def get_pattern(self) -> str:
        """The pattern as the client sent it, as a string (``JSON.stringify`` for objects)."""
        pattern = self.args[1]
        return pattern if isinstance(pattern, str) else _dumps(pattern)

    def get_metadata(self) -> Any:
        return self.args[2]

    @property
    def peer(self) -> tuple[str, int] | None:
        """The caller's address, ``(host, port)``."""
        return self.args[0].peer


class TcpConnection(asyncio.Protocol):
    """One framed connection; used by both the server and the client side."""

    def __init__(
        self,
        on_packet: Any,
        on_lost: Any,
        max_buffer_size: int,
        incomplete_timeout: float,
        max_send_buffer_size: int,
    ) -> None:
        self._on_packet = on_packet
        self._on_lost = on_lost
        self.decoder = FrameDecoder(max_buffer_size)
        self.incomplete_timeout = incomplete_timeout
        self.max_send_buffer_size = max_send_buffer_size
        self.transport: asyncio.Transport | None = None
        self.peer: tuple[str, int] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._drained: asyncio.Future[None] | None = None
        # Frames written while one read is dispatched, sent in few writes:
        # under load a read holds many requests, and a syscall per reply
        # would cost more than the replies themselves.
        self._corked: list[bytes] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = (peer[0], peer[1]) if peer else None

    def data_received(self, data: bytes) -> None:
        try:
            packets = self.decoder.feed(data)
        except FrameError as exc:
            self.abort(f"broken frame from {self.peer}: {exc}")
            return
        if packets:
            try:
                if self._corked is not None:  # a flush is already scheduled: join it
                    for packet in packets:
                        self._on_packet(self, packet)
                else:
                    self._corked = []
                    try:
                        for packet in packets:
                            self._on_packet(self, packet)
                    finally:
                        self._flush()
            except Exception as exc:
                # Whatever a packet made dispatch raise must cost its own
                # connection only, with one line of log.  Let out, asyncio
                # would log a traceback and drop the rest of the read anyway.
                logger.debug("dispatch failed for %s", self.peer, exc_info=True)
                self.abort(f"{self.peer} sent a packet that could not be handled: {exc!r:.200}")
                return
        if self.decoder.has_partial:
            self._arm_timer()
        elif self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm_timer(self) -> None:
        if self.incomplete_timeout <= 0 or self.transport is None:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(
            self.incomplete_timeout,
            self.abort,
            f"{self.peer} stalled inside a frame for {self.incomplete_timeout:g} s",
        )

    def write(self, packet: Any, batch: bool = False) -> None:
        """Send one packet.  ``batch`` defers it to the end of this loop pass,
        where it leaves with the other batched frames, ``CORK_FRAMES`` a write."""
        frame = encode_frame(packet)  # raises for unserializable data: the caller's error
        corked = self._corked
        if corked is not None:
            corked.append(frame)
            if len(corked) >= CORK_FRAMES:  # let the peer start on these
                self._send(b"".join(corked))
                corked.clear()
        elif batch:
            self._corked = [frame]
            asyncio.get_running_loop().call_soon(self._flush)
        else:
            self._send(frame)

    def _flush(self) -> None:
        corked, self._corked = self._corked, None
        if corked:
            self._send(b"".join(corked))

    def _send(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(data)
        if transport.get_write_buffer_size() > self.max_send_buffer_size:
            # A peer that never reads must not make us hold its replies forever.
            self.abort(f"{self.peer} is not reading; its send buffer passed the limit")

    async def drain(self) -> None:
        """Wait while the transport asked us to stop writing."""
        if self._drained is not None:
            await self._drained

    def pause_writing(self) -> None:
        # Stop reading too: a peer that sends requests but does not read
        # the replies would otherwise make us queue replies without bound.
        self._drained = asyncio.get_running_loop().create_future()
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self._drained = None
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def abort(self, reason: str) -> None:
        logger.warning("closing connection: %s", reason)
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._drained is not None and not self._drained.done():
            self._drained.set_exception(ConnectionResetError("connection lost"))
            self._drained.exception()  # retrieved: nobody may be waiting
        self._on_lost(self, exc)


def _limits(options: dict[str, Any]) -> tuple[int, float, int]:
    return (
        int(options.get("max_buffer_size", DEFAULT_MAX_BUFFER_SIZE)),
        float(options.get("incomplete_message_timeout", DEFAULT_INCOMPLETE_MESSAGE_TIMEOUT)),
        int(options.get("max_send_buffer_size", DEFAULT_MAX_SEND_BUFFER_SIZE)),
    )


# JSON values that can be a pattern.  Nest routes an array as an object keyed
# by index; true, false and null it never matches, nor a missing pattern.
_PATTERN_TYPES = frozenset({str, dict, int, float, list})
# How deep an object or array id may nest and still be echoed: far past any
# real id, and still half the encoder's recursion limit away wherever a
# reply is written (the parser alone would let ids nest about 980 deep).
_MAX_ID_DEPTH = 500


def _route_cost(pattern: Any, budget: int) -> int:
    """What routing ``pattern`` costs, in characters; counting stops past ``budget``.

    Each key and string that normalizing reaches ends up in the route, so
    their total is a lower bound on the route's length.  A list counts its
    length too: it is converted item by item before any limit applies.
    """
    total = 0
    stack = [(pattern, 0)]
    while stack:
        node, depth = stack.pop()
        if type(node) is list:
            total += len(node)
            children: Any = node
        else:
            children = node.values()
        if depth > MAX_DEPTH or len(node) > MAX_KEYS:
            continue  # a placeholder in the route: normalizing looks no deeper
        if children is not node:
            total += sum(map(len, node))  # the keys
        for child in children:
            kind = type(child)
            if kind is str:
                total += len(child)
            elif kind is dict or kind is list:
                stack.append((child, depth + 1))
        if total > budget:
            break
    return total


def _echoable(msg_id: Any) -> bool:
    """Whether a (non-string) request id can be written back as it came.

    Nest echoes any id, an object or an array too, and so do we.  Two kinds
    cannot be written: a number past a float's range (``1e999`` parses as
    infinity, which JSON cannot hold), and a container nested deeper than
    ``_MAX_ID_DEPTH``.  (NaN and Infinity themselves never parse, as in Nest.)
    """
    kind = type(msg_id)
    if kind is float:
        return math.isfinite(msg_id)
    if kind is not dict and kind is not list:
        return True  # int, bool, None
    stack = [(msg_id, 0)]
    while stack:
        node, depth = stack.pop()
        if depth >= _MAX_ID_DEPTH:
            return False
        for child in node.values() if type(node) is dict else node:
            kind = type(child)
            if kind is float and not math.isfinite(child):
                return False
            if kind is dict or kind is list:
                stack.append((child, depth + 1))
    return True


# Seconds close() waits for its connections to flush and really close (a TLS
# close_notify exchange, a slow reader) before it aborts what is left.
CLOSE_FLUSH_TIMEOUT = 2.0


class _EndedConnection(TcpConnection):
    """A connection that keeps why it dropped itself, and tells when it is gone.

    ``gone`` lets a close() return only once the socket is really closed; the
    ``reason`` (a frame over ``max_buffer_size``, a stalled frame) reaches a
    client's callers in their ``ConnectionClosedError``, not only the log.
    """

    reason: str | None = None
    gone: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.gone = asyncio.get_running_loop().create_future()
        super().connection_made(transport)

    def abort(self, reason: str) -> None:
        self.reason = reason
        super().abort(reason)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.gone is not None and not self.gone.done():
            self.gone.set_result(None)
        super().connection_lost(exc)


class _ServedConnection(_EndedConnection):
    """A server's connection, tracked by the server from ``connection_made`` on.

    With TLS, asyncio makes the protocol when it accepts, but calls
    ``connection_made`` only once the handshake succeeds, and never calls
    ``connection_lost`` if it fails.  Tracked from the accept, every failed
    handshake (a plaintext client, a port scan) would be kept for ever.
    """

    server: TcpServer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.server._closing:  # a TLS handshake that ended after close() began
            transport.abort()
            return
        self.server._connections.add(self)


class TcpServer(Server):
    """Serves handlers over Nest's TCP protocol.

    Options: ``host`` (loopback unless told otherwise), ``port`` (0 picks a
    free one; read it back from ``port`` after listening), ``ssl`` (an
    ``ssl.SSLContext``), and the framing limits named as in Nest 12.
    """

    transport_name = "tcp"
    # close() ends the connection of a request it cancelled: its caller gets
    # ConnectionClosedError at once, as from a NestJS server that closes.
    reply_when_cancelled = False

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        self.host: str = self.options.get("host", DEFAULT_HOST)
        self.port: int = int(self.options.get("port", DEFAULT_PORT))
        self.ssl: ssl.SSLContext | None = self.options.get("ssl")
        self._limits = _limits(self.options)
        self._server: asyncio.Server | None = None
        self._closing = False
        # asyncio's Server.close() stops accepting but leaves established
        # connections open; they are tracked so close() can end them too.
        self._connections: set[_ServedConnection] = set()

    async def listen(self) -> None:
        loop = asyncio.get_running_loop()
        self._closing = False
        self._server = await loop.create_server(
            self._accept,
            self.host,
            self.port,
            ssl=self.ssl,
        )
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _accept(self) -> TcpConnection:
        conn = _ServedConnection(self._on_packet, self._on_lost, *self._limits)
        conn.server = self  # it adds itself to _connections once made
        return conn

    def _on_lost(self, conn: TcpConnection, exc: Exception | None) -> None:
        self._connections.discard(conn)

    def _on_packet(self, conn: TcpConnection, packet: Any) -> None:
        if type(packet) is not dict:
            self.logger.warning("dropped a packet from %s that is not a JSON object", conn.peer)
            return
        pattern = packet.get("pattern")
        kind = type(pattern)
        route: str | None
        if kind not in _PATTERN_TYPES:
            route = None  # no handler can match it
        elif conn.decoder.saw_large_frame and kind is not int and kind is not float:
            # Checked per read, not per packet: only a large frame can hold a
            # pattern that is costly to route.
            route = self._screened_route(pattern)
        else:
            route = route_of_incoming(pattern)
        ctx = TcpContext((conn, pattern, packet.get("metadata")))
        if "id" not in packet:  # only a missing id makes an event; "id": null is a request
            if route is None:
                self.logger.warning("dropped an event from %s: no handler can match it", conn.peer)
                return
            self.handle_event(route, packet.get("data"), ctx)
            return
        msg_id = packet["id"]
        # Ids are strings in practice, so only others pay for this check.
        if type(msg_id) is not str and not _echoable(msg_id):
            conn.abort(f"{conn.peer} sent a request id that cannot be written back as JSON")
            return
        # A request whose pattern matches nothing still gets an answer: Nest's
        # no-handler error, carrying its id.
        self.handle_request(route, packet.get("data"), msg_id, ctx, conn.write)

    def _screened_route(self, pattern: Any) -> str | None:
        """The route of a pattern from a large frame, or None if it can match nothing.

        Routing costs Python-speed work per character of a pattern's keys and
        the route caches keep what they are given: megabyte keys stalled the
        loop for seconds and pinned gigabytes.  A route contains every key and
        string of its pattern, so one costlier than the longest registered
        route matches none of them, and is dropped unrouted.
        """
        budget = max(LARGE_FRAME, *map(len, self.message_handlers), *map(len, self.event_handlers))
        if type(pattern) is str:
            if pattern[:1] != "{":
                return pattern  # its own route: nothing cached, nothing walked
            if len(pattern) <= budget:
                return route_of_incoming(pattern)
            try:
                parsed = _loads(pattern)
            except (ValueError, RecursionError):
                return pattern  # not JSON: matched as it is, as Nest does
            if _route_cost(parsed, budget) > budget:
                return None
            return normalize_pattern(parsed)  # uncached: the cache would keep the long text
        if _route_cost(pattern, budget) > budget:
            return None
        return route_of_incoming(pattern)

    async def close(self) -> None:
        """Stop accepting at once, let running handlers finish and their replies
        go out (within ``close_grace``), then close every connection."""
        server, self._server = self._server, None  # a second close() has nothing to do
        if server is None:
            return
        self._closing = True
        server.close()  # from here on, a new connection is refused
        for conn in self._connections:  # no new requests while draining
            if conn.transport is not None:
                conn.transport.pause_reading()
        await self.drain()
        for conn in list(self._connections):
            if conn.transport is not None:
                conn.transport.close()  # sends what is buffered first
        # Return only once they are closed, so no socket outlives close(): a
        # TLS goodbye takes a round trip, a peer that does not read holds the
        # flush.  Bounded, then aborted.
        gone = [conn.gone for conn in self._connections if conn.gone is not None]
        if gone:
            await asyncio.wait(gone, timeout=CLOSE_FLUSH_TIMEOUT)
        for conn in list(self._connections):
            if conn.transport is not None:
                conn.transport.abort()
        await server.wait_closed()
        await asyncio.sleep(0)  # an abort's connection_lost runs on the next pass


class TcpClient(ClientProxy):
    """A client for a Nest TCP microservice (or a nestpy_mini one).

    Options: ``host``, ``port``, ``ssl`` (an ``ssl.SSLContext``), ``timeout``
    (seconds per request, default 5), and the framing limits.
    """

    transport_name = "tcp"

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        self.host: str = self.options.get("host", DEFAULT_HOST)
        self.port: int = int(self.options.get("port", DEFAULT_PORT))
        self.ssl: ssl.SSLContext | None = self.options.get("ssl")
        self._limits = _limits(self.options)
        self._conn: _EndedConnection | None = None

    def describe(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(
            lambda: _EndedConnection(self._on_packet, self._on_lost, *self._limits),
            self.host,
            self.port,
            ssl=self.ssl,
        )
        self._conn = conn

    def _on_packet(self, conn: TcpConnection, packet: Any) -> None:
        if isinstance(packet, dict):
            self._on_reply(packet)

    def _on_lost(self, conn: TcpConnection, exc: Exception | None) -> None:
        if conn is self._conn:
            reason = self._conn.reason
            self._conn = None
            self._on_connection_lost(exc or (ConnectionError(reason) if reason else None))

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None or conn.transport is None:
            return
        conn.transport.close()
        # Return once the socket is really closed (a TLS goodbye takes a round
        # trip), so none outlives close(); bounded, then aborted.
        assert conn.gone is not None  # set by connection_made, before _connect returned
        await asyncio.wait([conn.gone], timeout=CLOSE_FLUSH_TIMEOUT)
        if not conn.gone.done():
            conn.transport.abort()
            await asyncio.sleep(0)

    def _publish(self, pattern: Any, data: Any, msg_id: str) -> None:
        conn = self._conn
        if conn is None:
            raise ConnectionError(f"not connected to {self.describe()}")
        # With other requests in flight, join this frame to theirs in one
        # write; a lone request goes out at once, so latency does not pay.
        conn.write({"pattern": pattern, "data": data, "id": msg_id}, batch=len(self._routing) > 1)

    async def _dispatch_event(self, pattern: Any, data: Any) -> None:
        conn = self._conn
        if conn is None:
            raise ConnectionError(f"not connected to {self.describe()}")
        conn.write({"pattern": normalize_pattern(pattern), "data": data})
        await conn.drain()


SERVER = TcpServer
CLIENT = TcpClient
