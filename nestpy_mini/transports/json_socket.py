"""Nest's JSON socket (``helpers/json-socket.ts``): frames, and a connection made of them.

A frame is ``<length>#<json>``, where ``length`` is what JavaScript's
``string.length`` gives for the JSON text: UTF-16 code units, not bytes and
not code points.  An emoji counts two, a Chinese character one, so the
prefix must be computed exactly that way or a NestJS peer desynchronises.
The limits are Nest 12's, under the same names in snake_case.
"""

from __future__ import annotations

import asyncio
import codecs
import logging
import re
from collections.abc import Callable
from typing import Any

from ..packets import dumps, loads
from ..server import LARGE_MESSAGE

# Nest 12's limits: frame size in characters, the idle time allowed inside a
# half-received frame, what may queue for a peer that does not read.
DEFAULT_MAX_BUFFER_SIZE = 128 * 1024 * 1024
DEFAULT_INCOMPLETE_MESSAGE_TIMEOUT = 30.0
DEFAULT_MAX_SEND_BUFFER_SIZE = 128 * 1024 * 1024
_MAX_PREFIX_DIGITS = 12
_Utf8Decoder = codecs.getincrementaldecoder("utf-8")
_STRICT, _LENIENT = 1, 2  # how a non-ASCII frame is being scanned (0: not at all)
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")

logger = logging.getLogger("nestpy_mini.tcp")


class FrameError(ValueError):
    """The byte stream broke the framing; the connection cannot be trusted on.

    ``packets`` are the frames that the same read completed before the break.  They
    arrived whole, and Nest acts on them (an event before a broken frame runs), so
    they are not thrown away with the rest.
    """

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.packets: list[Any] = []


def encode_frame(message: Any) -> bytes:
    """One packet as Nest's JSON socket writes it."""
    text = dumps(message)
    if text.isascii():
        return b"%d#%s" % (len(text), text.encode())
    try:
        body = text.encode()
    except UnicodeEncodeError:
        # A lone surrogate (a string that arrived as "\ud800", say) has no UTF-8 form:
        # JSON.stringify writes it as a \u escape, and so do we.  Only this pays the search.
        text = _LONE_SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
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

    __slots__ = ("_broken", "_buf", "_done", "_length", "_mode", "_seen", "_units", "_utf8")
    __slots__ += ("max_size", "saw_large_frame")

    def __init__(self, max_size: int = DEFAULT_MAX_BUFFER_SIZE) -> None:
        self._buf = bytearray()
        self._length: int | None = None
        self.max_size = max_size
        self.saw_large_frame = False  # the last feed() completed a frame over LARGE_MESSAGE
        self._broken: str | None = None
        self._mode = self._seen = self._done = self._units = 0  # progress of _scan
        self._utf8: codecs.IncrementalDecoder = _Utf8Decoder()

    @property
    def has_partial(self) -> bool:  # a frame has begun but not ended
        return bool(self._buf) or self._length is not None

    def feed(self, data: bytes) -> list[Any]:
        """Every packet completed by ``data``; raises ``FrameError`` on broken framing."""
        if self._broken is not None:  # nothing after lost framing can be located
            raise FrameError(f"the stream already broke: {self._broken}")
        buf = self._buf
        buf += data
        out, pos, large = [], 0, False
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
                        limit = self.max_size
                        raise FrameError(f"frame length {length} exceeds the limit of {limit}")
                    self._length = length
                    pos = hash_at + 1
                if not self._mode:  # not seen to be non-ASCII by an earlier read
                    end = pos + length
                    if end > len(buf):  # a unit takes a byte at least: not all here yet
                        break
                    chunk = buf[pos:end]
                    if chunk.isascii():  # one byte, one unit: the common case
                        body = chunk.decode("ascii")
                if body is None:  # scanned, resuming where an earlier read stopped
                    found = self._scan(buf, pos, length)
                    if found is None:
                        break
                    body, end = found
                self._length, pos = None, end
                large = large or length > LARGE_MESSAGE
                try:
                    out.append(loads(body))
                except (ValueError, RecursionError) as exc:
                    raise FrameError(f"invalid JSON in a frame: {exc}") from None
        except FrameError as exc:
            exc.packets = out
            self._broken = str(exc)
            buf.clear()  # nothing in it can be used any more: free it now
            self._length, self._mode = None, 0
            raise
        del buf[:pos]
        self.saw_large_frame = large
        return out

    def _scan(self, buf: bytearray, pos: int, length: int) -> tuple[str, int] | None:
        """The text of the non-ASCII frame body at ``pos`` and where it ends, or None
        while it is incomplete.  Counts UTF-16 units over the bytes as they come,
        resuming where the last call stopped; bytes that are not UTF-8 count one unit
        each and become U+FFFD, as Node's decoder makes them."""
        dec = self._utf8
        if not self._mode:  # a new frame
            dec.reset()
            dec.errors = "strict"
            self._mode, self._seen, self._done, self._units = _STRICT, 0, 0, 0
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
            self._mode, self._seen, self._done, self._units = _LENIENT, 0, 0, 0
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


# Batched frames leave in writes of at most this many: the named seam of the
# TCP fast path.  One write per whole batch made the two ends of a busy
# connection take turns, the peer idle until the last of 100 frames was
# encoded; writing every 32 lets it start on the first ones.  Measured with
# 100 requests in flight over loopback: a nestpy_mini pair went from about
# 50k to 100k req/s (16 and 64 did worse; a write per frame costs a syscall
# each).  ``write(packet)`` without ``batch`` is the plain path.
CORK_FRAMES = 32

OnPacket = Callable[["JsonSocket", Any], None]
OnLost = Callable[["JsonSocket", Exception | None], None]


class JsonSocket(asyncio.Protocol):
    """One framed connection, server or client side.  ``reason`` keeps why it dropped
    itself, for the callers' error; ``gone`` is done once the socket is closed."""

    def __init__(self, on_packet: OnPacket, on_lost: OnLost, options: dict[str, Any]) -> None:
        self._on_packet, self._on_lost = on_packet, on_lost
        self.decoder = FrameDecoder(int(options.get("max_buffer_size", DEFAULT_MAX_BUFFER_SIZE)))
        stall = options.get("incomplete_message_timeout", DEFAULT_INCOMPLETE_MESSAGE_TIMEOUT)
        self.incomplete_timeout = float(stall)
        self.max_send = int(options.get("max_send_buffer_size", DEFAULT_MAX_SEND_BUFFER_SIZE))
        self.transport: asyncio.Transport | None = None
        self.peer: tuple[str, int] | None = None
        self.reason: str | None = None
        self.gone: asyncio.Future[None] | None = None
        self._drained: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        # Frames written while one read is dispatched, sent in few writes: a
        # syscall per reply would cost more than the replies themselves.
        self._corked: list[bytes] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.gone = asyncio.get_running_loop().create_future()
        peer = transport.get_extra_info("peername")
        self.peer = (peer[0], peer[1]) if peer else None

    def data_received(self, data: bytes) -> None:
        try:
            packets = self.decoder.feed(data)
        except FrameError as exc:
            # As Nest: the whole frames before the break are handled, then the
            # connection ends before any reply to them can be written.
            if self._dispatch(exc.packets, flush=False):
                self.abort(f"broken frame from {self.peer}: {exc}")
            return
        if packets and not self._dispatch(packets, flush=True):
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        wait = self.incomplete_timeout
        if self.decoder.has_partial and wait > 0 and self.transport is not None:
            why = f"{self.peer} stalled inside a frame for {wait:g} s"
            self._timer = asyncio.get_running_loop().call_later(wait, self.abort, why)

    def _dispatch(self, packets: list[Any], flush: bool) -> bool:
        """Hand ``packets`` to the server or client; False if that cost the connection.
        Replies written meanwhile leave together, or with ``flush=False`` not at all."""
        joined = self._corked is not None  # a flush is already scheduled: join it
        if not joined:
            self._corked = []
        try:
            for packet in packets:
                self._on_packet(self, packet)
        except Exception as exc:  # it costs its own connection only, with one line
            logger.debug("dispatch failed for %s", self.peer, exc_info=True)
            self.abort(f"{self.peer} sent a packet that could not be handled: {exc!r:.200}")
            return False
        finally:
            if not joined:
                if flush:
                    self._flush()
                else:
                    self._corked = None
        return True

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
        if transport.get_write_buffer_size() > self.max_send:
            # A peer that never reads must not make us hold its replies forever.
            self.abort(f"{self.peer} is not reading; its send buffer passed the limit")

    async def drain(self) -> None:  # returns once the transport takes writes again
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
        self.reason = reason
        if self.transport is not None:
            self.transport.abort()

    async def close(self, within: float) -> None:
        """Close once what is buffered is sent, and return once the socket is gone
        (a TLS goodbye takes a round trip); abort what is left after ``within`` s."""
        gone = self.gone
        if self.transport is None or gone is None:
            return
        self.transport.close()
        await asyncio.wait([gone], timeout=within)
        if not gone.done():
            self.transport.abort()
            await asyncio.sleep(0)  # an abort's connection_lost runs on the next pass

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._drained is not None and not self._drained.done():
            self._drained.set_exception(ConnectionResetError("connection lost"))
            self._drained.exception()  # retrieved: nobody may be waiting
        if self.gone is not None and not self.gone.done():
            self.gone.set_result(None)
        self._on_lost(self, exc)
