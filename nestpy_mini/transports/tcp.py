"""TCP: Nest's ``server-tcp`` and ``client-tcp``, on the JSON socket of ``json_socket.py``.

No broker: the client connects to the server, requests and replies share
the connection, and replies are matched to requests by ``id``.  A dropped
connection fails every request still waiting on it at once.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

from ..client import ClientProxy
from ..packets import read_incoming
from ..patterns import normalize_pattern
from ..server import BaseRpcContext, Server
from .base import arg, pattern_text
from .json_socket import JsonSocket

# Nest's TCP_DEFAULT_PORT; the host is loopback, so that nothing is exposed
# beyond the machine unless asked (Nest's default is "localhost").
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 3000
# Seconds close() waits for connections to flush and really close (a TLS
# close_notify exchange, a slow reader) before it aborts what is left.
CLOSE_FLUSH_TIMEOUT = 2.0


class TcpContext(BaseRpcContext):
    """``args`` are ``(connection, pattern, metadata)``, as in Nest's ``TcpContext``."""

    __slots__ = ()

    get_socket_ref = arg(0)
    get_metadata = arg(2)

    def get_pattern(self) -> str:  # as the client sent it
        return pattern_text(self.args[1])

    @property
    def peer(self) -> tuple[str, int] | None:  # the caller's (host, port)
        return self.args[0].peer


class _Served(JsonSocket):
    """A server's connection, tracked from ``connection_made`` on: with TLS, asyncio
    makes the protocol when it accepts, but calls ``connection_made`` only once the
    handshake succeeds, and never calls ``connection_lost`` if it fails.  Tracked from
    the accept, every failed handshake (a plaintext client, a port scan) would stay."""

    def __init__(self, server: TcpServer) -> None:
        super().__init__(server._on_packet, server._on_lost, server.options)
        self.server = server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.server._server is None:  # a TLS handshake that ended after close() began
            transport.abort()
            return
        self.server._connections.add(self)


class TcpServer(Server):
    """Serves handlers over Nest's TCP protocol.

    Options: ``host`` (loopback unless told otherwise), ``port`` (0 picks a
    free one; read it back from ``port`` after listening), ``ssl`` (an
    ``ssl.SSLContext``), and the framing limits named as in Nest 12:
    ``max_buffer_size``, ``incomplete_message_timeout``, ``max_send_buffer_size``.
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
        self._server: asyncio.Server | None = None
        # asyncio's Server.close(), as net.Server#close in Nest, stops accepting but
        # leaves established connections open: they are tracked, for close() to end.
        self._connections: set[_Served] = set()

    def describe(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    async def listen(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Served(self), self.host, self.port, ssl=self.ssl
        )
        self.port = self._server.sockets[0].getsockname()[1]

    def _on_lost(self, conn: JsonSocket, exc: Exception | None) -> None:
        self._connections.discard(conn)  # type: ignore[arg-type]

    def _on_packet(self, conn: JsonSocket, packet: Any) -> None:
        message = read_incoming(packet, None)
        if isinstance(message, str):
            if type(packet) is dict:  # an id no reply can carry: Nest closes such a socket too
                conn.abort(f"{conn.peer} sent a request whose id cannot be written back as JSON")
            else:
                self.logger.warning("dropped a packet from %s: %s", conn.peer, message)
            return
        # The decoder flags a read with a large frame: only such a frame can
        # hold a pattern that is costly to route.
        route = self.route(message.pattern, conn.decoder.saw_large_frame)
        if route is None and not message.is_request:
            self.logger.warning("dropped an event from %s: no handler can match it", conn.peer)
            return
        ctx = TcpContext((conn, message.pattern, message.metadata))
        self.dispatch(message, route, ctx, conn.write)

    async def close(self) -> None:
        """Stop accepting at once, let running handlers finish and their replies
        go out (within ``close_grace``), then close every connection."""
        server, self._server = self._server, None  # a second close() has nothing to do
        if server is None:
            return
        server.close()  # from here on, a new connection is refused
        for conn in self._connections:  # no new requests while draining
            if conn.transport is not None:
                conn.transport.pause_reading()
        await self.drain()
        await asyncio.gather(*(c.close(CLOSE_FLUSH_TIMEOUT) for c in list(self._connections)))
        await server.wait_closed()


class TcpClient(ClientProxy):
    """A client for a Nest TCP microservice (or a nestpy_mini one).

    Options: ``host``, ``port``, ``ssl`` (an ``ssl.SSLContext``), ``timeout``
    (seconds per request, default 5), and the server's framing limits.
    """

    transport_name = "tcp"

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        self.host: str = self.options.get("host", DEFAULT_HOST)
        self.port: int = int(self.options.get("port", DEFAULT_PORT))
        self.ssl: ssl.SSLContext | None = self.options.get("ssl")
        self._conn: JsonSocket | None = None

    def describe(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        _, self._conn = await loop.create_connection(
            lambda: JsonSocket(self._on_packet, self._on_lost, self.options),
            self.host, self.port, ssl=self.ssl,
        )

    def _on_packet(self, conn: JsonSocket, packet: Any) -> None:
        self._on_reply(packet)

    def _on_lost(self, conn: JsonSocket, exc: Exception | None) -> None:
        if conn is self._conn:
            self._conn = None
            reason = conn.reason
            self._on_connection_lost(exc or (ConnectionError(reason) if reason else None))

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close(CLOSE_FLUSH_TIMEOUT)

    def _live(self) -> JsonSocket:
        if self._conn is None:
            raise ConnectionError(f"not connected to {self.describe()}")
        return self._conn

    def _publish(self, pattern: Any, data: Any, msg_id: str) -> None:
        # With other requests in flight, join this frame to theirs in one
        # write; a lone request goes out at once, so latency does not pay.
        packet = {"pattern": pattern, "data": data, "id": msg_id}
        self._live().write(packet, batch=len(self._routing) > 1)

    async def _dispatch_event(self, pattern: Any, data: Any) -> None:
        conn = self._live()
        conn.write({"pattern": normalize_pattern(pattern), "data": data})
        await conn.drain()


SERVER = TcpServer
CLIENT = TcpClient
