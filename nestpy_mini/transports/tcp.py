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
import ssl
from typing import Any

from ..client import ClientProxy
from ..codec import dumps as _dumps
from ..codec import loads as _loads
from ..patterns import normalize_pattern, route_of_incoming
from ..server import BaseRpcContext, Server

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 3000
# Nest 12's limits (helpers/json-socket): frame size in characters, the idle
# time allowed inside a half-received frame, and what may queue for a peer.
DEFAULT_MAX_BUFFER_SIZE = 128 * 1024 * 1024
DEFAULT_INCOMPLETE_MESSAGE_TIMEOUT = 30.0
DEFAULT_MAX_SEND_BUFFER_SIZE = 128 * 1024 * 1024
_MAX_PREFIX_DIGITS = 12

logger = logging.getLogger("nestpy_mini.tcp")


class FrameError(ValueError):
    """The byte stream broke the framing; the connection cannot be trusted on."""


def encode_frame(message: Any) -> bytes:
    """One packet as Nest's JSON socket writes it."""
    text = _dumps(message)
    if text.isascii():
        return b"%d#%s" % (len(text), text.encode())
    units = len(text.encode("utf-16-le", "surrogatepass")) // 2
    return f"{units}#{text}".encode()


class FrameDecoder:
    """Turns received bytes into decoded JSON packets, frame by frame."""

    __slots__ = ("_buf", "_length", "max_size")

    def __init__(self, max_size: int = DEFAULT_MAX_BUFFER_SIZE) -> None:
        self._buf = bytearray()
        self._length: int | None = None
        self.max_size = max_size

    @property
    def has_partial(self) -> bool:
        """True while a frame has begun but not ended."""
        return bool(self._buf) or self._length is not None

    def feed(self, data: bytes) -> list[Any]:
        """Every packet completed by ``data``; raises ``FrameError`` on broken framing."""
        buf = self._buf
        buf += data
        out = []
        pos = 0
        while True:
            if self._length is None:
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
            length = self._length
            end = pos + length
            # Fast path: ASCII bytes are one UTF-16 unit each.
            chunk = buf[pos:end]
            if chunk.isascii():
                if end > len(buf):
                    break  # an ASCII frame still arriving: wait, without decoding
                body = chunk.decode("ascii")
            else:
                found = self._non_ascii_body(buf, pos, length)
                if found is None:
                    break
                body, end = found
            self._length = None
            pos = end
            try:
                out.append(_loads(body))
            except (ValueError, RecursionError) as exc:
                raise FrameError(f"invalid JSON in a frame: {exc}") from None
        del buf[:pos]
        return out

    @staticmethod
    def _non_ascii_body(buf: bytearray, pos: int, units: int) -> tuple[str, int] | None:
        """The text of ``units`` UTF-16 units starting at ``pos``, and where it ends."""
        # A UTF-16 unit never takes more than three UTF-8 bytes.
        chunk = bytes(buf[pos : pos + 3 * units])
        # surrogateescape keeps invalid bytes countable (one unit each, as
        # Node's decoder counts its replacement character) and reversible.
        text = codecs.getincrementaldecoder("utf-8")("surrogateescape").decode(chunk)
        encoded = text.encode("utf-16-le", "surrogatepass")
        if len(encoded) < 2 * units:
            return None
        body = encoded[: 2 * units].decode("utf-16-le", "surrogatepass")
        if body and "\ud800" <= body[-1] <= "\udbff":
            raise FrameError("the frame length ends inside a character")
        raw = body.encode("utf-8", "surrogateescape")
        return raw.decode("utf-8", "replace"), pos + len(raw)


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
        # Frames written while one read is dispatched, sent in one write:
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
        where it leaves in one write with every other batched frame."""
        frame = encode_frame(packet)  # raises for unserializable data: the caller's error
        if self._corked is not None:
            self._corked.append(frame)
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


# JSON values that can be a pattern (bool is excluded: JSON true is no route).
_PATTERN_TYPES = frozenset({str, dict, int, float})


class TcpServer(Server):
    """Serves handlers over Nest's TCP protocol.

    Options: ``host`` (loopback unless told otherwise), ``port`` (0 picks a
    free one; read it back from ``port`` after listening), ``ssl`` (an
    ``ssl.SSLContext``), and the framing limits named as in Nest 12.
    """

    transport_name = "tcp"

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        self.host: str = self.options.get("host", DEFAULT_HOST)
        self.port: int = int(self.options.get("port", DEFAULT_PORT))
        self.ssl: ssl.SSLContext | None = self.options.get("ssl")
        self._limits = _limits(self.options)
        self._server: asyncio.Server | None = None
        # asyncio's Server.close() stops accepting but leaves established
        # connections open; they are tracked so close() can end them too.
        self._connections: set[TcpConnection] = set()

    async def listen(self) -> None:
        loop = asyncio.get_running_loop()
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
        conn = TcpConnection(self._on_packet, self._on_lost, *self._limits)
        self._connections.add(conn)
        return conn

    def _on_lost(self, conn: TcpConnection, exc: Exception | None) -> None:
        self._connections.discard(conn)

    def _on_packet(self, conn: TcpConnection, packet: Any) -> None:
        if type(packet) is not dict:
            self.logger.warning("dropped a packet from %s that is not a JSON object", conn.peer)
            return
        pattern = packet.get("pattern")
        valid = type(pattern) in _PATTERN_TYPES
        ctx = TcpContext((conn, pattern, packet.get("metadata")))
        if "id" not in packet:  # only a missing id makes an event; "id": null is a request
            if not valid:
                self.logger.warning("dropped an event from %s without a valid pattern", conn.peer)
                return
            self.handle_event(route_of_incoming(pattern), packet.get("data"), ctx)
            return
        # A request with a pattern of the wrong type still gets an answer.
        route = route_of_incoming(pattern) if valid else ""
        self.handle_request(route, packet.get("data"), packet["id"], ctx, conn.write)

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for conn in self._connections:  # no new requests while draining
            if conn.transport is not None:
                conn.transport.pause_reading()
        await self.drain()
        for conn in list(self._connections):
            if conn.transport is not None:
                conn.transport.close()
        await self._server.wait_closed()
        self._server = None
        await asyncio.sleep(0)  # let the transports finish closing


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
        self._conn: TcpConnection | None = None

    def describe(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(
            lambda: TcpConnection(self._on_packet, self._on_lost, *self._limits),
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
            self._conn = None
            self._on_connection_lost(exc)

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and conn.transport is not None:
            conn.transport.close()
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
