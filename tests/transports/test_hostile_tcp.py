"""Hostile TCP peers: each one loses its own connection, with one log line why,
while a well-behaved client on another connection keeps getting answers.

Every attack runs inside ``good_client_running``: a real nestpy_mini client
asks and checks the whole time, and once more after.  Every test also fails
if anything escaped to asyncio (a traceback from ``data_received``, a task
exception nobody retrieved).
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any, ClassVar

import pytest
from conftest import Serve, wait_until

from nestpy_mini import (
    ClientProxy,
    Controller,
    EventPattern,
    MessagePattern,
    Module,
    NestMicroservice,
)
from nestpy_mini.packets import NO_MESSAGE_HANDLER, UNKNOWN_EXCEPTION_MESSAGE
from nestpy_mini.patterns import _ROUTE_CACHE
from nestpy_mini.transports.json_socket import (
    DEFAULT_INCOMPLETE_MESSAGE_TIMEOUT,
    DEFAULT_MAX_BUFFER_SIZE,
    DEFAULT_MAX_SEND_BUFFER_SIZE,
    FrameDecoder,
    JsonSocket,
    encode_frame,
)
from nestpy_mini.transports.tcp import TcpServer

events: list[Any] = []
LONG_KEY = "k" * 1000  # a registered pattern longer than any frame the screen skips


@Controller()
class TargetController:
    @MessagePattern({"cmd": "sum"})
    def sum(self, data: list[int]) -> int:
        return sum(data)  # a TypeError for data of the wrong type

    @MessagePattern("echo")
    def echo(self, data: Any) -> Any:
        return data

    @MessagePattern("aecho")
    async def aecho(self, data: Any) -> Any:
        await asyncio.sleep(0)
        return data

    @MessagePattern({LONG_KEY: "v"})
    def long_pattern(self, data: Any) -> str:
        return "long"

    @EventPattern("seen")
    def seen(self, data: Any) -> None:
        events.append(data)


@Module(controllers=[TargetController])
class TargetModule: ...


# Small enough to reach in a test; the defaults are Nest's (see the last tests).
LIMITS = {
    "max_buffer_size": 1024 * 1024,
    "incomplete_message_timeout": 0.3,
    "max_send_buffer_size": 64 * 1024,
}
CLOSING = "closing connection: "


def frame(text: str) -> bytes:
    """A frame as Nest writes it: the prefix counts UTF-16 units."""
    return b"%d#%s" % (len(text.encode("utf-16-le", "surrogatepass")) // 2, text.encode())


def raw_frame(body: bytes, units: int | None = None) -> bytes:
    """A frame around bytes that may not be UTF-8; by default one unit a byte."""
    return b"%d#%s" % (len(body) if units is None else units, body)


def request(pattern: Any, data: Any, msg_id: Any) -> bytes:
    return frame(json.dumps({"pattern": pattern, "data": data, "id": msg_id}))


class Raw:
    """A raw socket to the server, for writing what no client would."""

    opened: ClassVar[list[Raw]] = []  # closed after each test by _close_raw_sockets

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = FrameDecoder()
        self.port: int = writer.get_extra_info("sockname")[1]

    @classmethod
    async def open(cls, port: int) -> Raw:
        raw = cls(*await asyncio.open_connection("127.0.0.1", port))
        cls.opened.append(raw)
        return raw

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def packets(self, count: int, within: float = 3.0) -> list[Any]:
        """The next ``count`` packets from the server."""
        got: list[Any] = []
        async with asyncio.timeout(within):
            while len(got) < count:
                data = await self.reader.read(65536)
                assert data, f"the server closed the connection after {got}"
                got += self.decoder.feed(data)
        return got

    async def closed_by_server(self, within: float = 3.0) -> bool:
        """Whether the server ends this connection within ``within`` seconds."""
        try:
            async with asyncio.timeout(within):
                while await self.reader.read(65536):
                    pass
        except TimeoutError:
            return False
        except ConnectionResetError:
            pass
        return True

    async def close(self) -> None:
        if self.writer.transport.get_write_buffer_size():
            # A flooder's unsent bytes would wait for a server that stopped reading it.
            self.writer.transport.abort()
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionResetError, BrokenPipeError):
            pass


@pytest.fixture(autouse=True)
async def _close_raw_sockets() -> AsyncIterator[None]:
    yield
    while Raw.opened:
        await Raw.opened.pop().close()


@pytest.fixture(scope="module", autouse=True)
def _quick_gc() -> Iterator[None]:
    """Keeps the per-test ``gc.collect()`` below cheap: everything alive before this
    module is set aside, which took a full collection from 0.18 s to a few ms."""
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture(autouse=True)
def _no_unhandled_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Nothing may reach asyncio's own error log: that is a crash the server survived by luck."""
    events.clear()
    caplog.set_level(logging.DEBUG, logger="nestpy_mini")
    yield
    gc.collect()  # makes a task whose exception nobody retrieved say so now
    leaked = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
    assert not leaked, leaked


@pytest.fixture
async def app(serve: Serve) -> NestMicroservice:
    return await serve(TargetModule, close_grace=0.2, **LIMITS)


@pytest.fixture
async def good(app: NestMicroservice, tcp_client: Callable[..., ClientProxy]) -> ClientProxy:
    client = tcp_client(app.server.port, timeout=3)
    assert await client.send({"cmd": "sum"}, [1, 2]) == 3
    return client


@asynccontextmanager
async def good_client_running(client: ClientProxy) -> AsyncIterator[list[int]]:
    """Ask and check, all along the block and once after; yields the count of answers."""
    answered = [0]
    rng = random.Random(7)

    async def ask() -> None:
        numbers = [rng.randrange(1000) for _ in range(3)]
        assert await client.send({"cmd": "sum"}, numbers) == sum(numbers)
        text = f"张三 😀 {rng.random()}"
        assert await client.send("echo", {"名字": text}) == {"名字": text}
        answered[0] += 1

    async def keep_asking() -> None:
        while True:
            await ask()
            await asyncio.sleep(0.002)

    task = asyncio.ensure_future(keep_asking())
    try:
        yield answered
        # The attack is done: the good client must have been answered in the
        # meantime (its failures surface here), and must be answered still.
        await wait_until(lambda: answered[0] > 0 or task.done())
    finally:
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
    await ask()


def closing_lines(caplog: pytest.LogCaptureFixture, raw: Raw) -> list[str]:
    """The log lines that announced closing ``raw``'s connection."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.getMessage().startswith(CLOSING) and f", {raw.port})" in r.getMessage()
    ]


async def assert_closed_with_one_line(
    caplog: pytest.LogCaptureFixture, raw: Raw, reason: str, within: float = 3.0
) -> str:
    assert await raw.closed_by_server(within), "the server kept the connection open"
    await wait_until(lambda: bool(closing_lines(caplog, raw)))
    lines = closing_lines(caplog, raw)
    assert len(lines) == 1, lines
    assert reason in lines[0], lines[0]
    assert "\n" not in lines[0] and len(lines[0]) < 400, lines[0]
    return lines[0]


# --- framing: garbage, prefixes, lengths, JSON --------------------------------

DEEP = "[" * 100_000 + "]" * 100_000

BROKEN_STREAMS = {
    "garbage text": (b"hello world, this is not a frame at all", "no length prefix"),
    "garbage bytes": (bytes(range(256)) * 4, "no length prefix"),
    "letters as length": (b'abc#{"pattern":"echo","id":1}', "corrupted length prefix"),
    "negative length": (b"-5#{}", "corrupted length prefix"),
    "empty length": (b"#{}", "corrupted length prefix"),
    # Nest's parseInt reads these as 7 and 12; a strict reading closes instead.
    "plus sign": (b'+7#"hello"', "corrupted length prefix"),
    "digits then letters": (b'12abc#{"x":123456}', "corrupted length prefix"),
    "thirteen digits": (b"1234567890123#{}", "no length prefix"),
    "huge declared length": (b"99999999999#{", "exceeds the limit"),
    "one past max_buffer_size": (b"%d#{" % (1024 * 1024 + 1), "exceeds the limit"),
    "zero length": (b"0#", "invalid JSON"),
    "invalid JSON": (b"5#{abc}", "invalid JSON"),
    "invalid JSON then valid": (b"5#{abc}" + request("echo", 1, "lost"), "invalid JSON"),
    "invalid UTF-8 outside strings": (raw_frame(b"{\xff:\xfe}"), "invalid JSON"),
    "truncated UTF-8 outside strings": (raw_frame(b"[1,\xe4\xb8]", 6), "invalid JSON"),
    "100,000 nested brackets": (frame(DEEP), "invalid JSON"),
    "100,000 nested in data": (frame('{"pattern":"echo","id":1,"data":' + DEEP + "}"), "JSON"),
    "100,000 nested in id": (frame('{"pattern":"echo","data":1,"id":' + DEEP + "}"), "JSON"),
    "length inside an emoji": ("1#😀 more".encode(), "inside a character"),
    # JSON.parse refuses NaN and Infinity anywhere, so Nest drops the frame; so do we.
    "NaN id": (frame('{"pattern":"echo","data":1,"id":NaN}'), "NaN is not JSON"),
    "Infinity id": (frame('{"pattern":"aecho","data":1,"id":-Infinity}'), "Infinity is not JSON"),
    "NaN inside an object id": (frame('{"pattern":"echo","id":{"a":[NaN]}}'), "NaN is not JSON"),
    "NaN in data": (frame('{"pattern":"echo","data":NaN,"id":"d1"}'), "NaN is not JSON"),
    "Infinity in data": (frame('{"pattern":"aecho","data":[Infinity],"id":"d1"}'), "not JSON"),
    # Valid JSON, but past a float's range: it parses as infinity, which no reply can hold.
    "id 1e999": (frame('{"pattern":"echo","data":1,"id":1e999}'), "cannot be written back"),
    "1e999 inside an object id": (frame('{"pattern":"echo","id":{"a":[-1e999]}}'), "cannot be"),
    "id nested 600 deep": (request("echo", 1, json.loads("[" * 600 + "]" * 600)), "cannot be"),
}


@pytest.mark.parametrize("stream", BROKEN_STREAMS.values(), ids=BROKEN_STREAMS.keys())
async def test_a_broken_stream_closes_only_its_connection_with_one_log_line(
    app: NestMicroservice,
    good: ClientProxy,
    caplog: pytest.LogCaptureFixture,
    stream: tuple[bytes, str],
) -> None:
    data, reason = stream
    bystander = await Raw.open(app.server.port)  # an idle raw peer must survive too
    async with good_client_running(good):
        attacker = await Raw.open(app.server.port)
        attacker.send(data)
        await assert_closed_with_one_line(caplog, attacker, reason)
    bystander.send(request("echo", "still here", "b1"))
    assert await bystander.packets(1) == [
        {"response": "still here", "isDisposed": True, "id": "b1"}
    ]
    await bystander.close()


async def test_frames_before_a_break_in_the_same_read_are_handled_but_not_answered(
    app: NestMicroservice, good: ClientProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """As Nest 12 (captured, WIRE.md section 1): the whole frames of a read run before
    the break closes the connection; replies to them are not written."""
    events.clear()
    async with good_client_running(good):
        attacker = await Raw.open(app.server.port)
        attacker.send(request("echo", 1, "a1"))
        assert await attacker.packets(1) == [{"response": 1, "isDisposed": True, "id": "a1"}]
        event = frame(json.dumps({"pattern": "seen", "data": "before the break"}))
        attacker.send(event + request("echo", 2, "a2") + b"5#{abc}")
        await assert_closed_with_one_line(caplog, attacker, "invalid JSON")
    assert attacker.decoder.feed(b"") == []  # nothing for a2 arrived
    assert events == ["before the break"], "a whole event before the break was dropped"


# --- frames that stop half-way ------------------------------------------------

STALLS = {
    "prefix only": b"12",
    "short text without #": b"hello",
    "body cut short": request("echo", "x" * 50, "s1")[:30],
    "declared length never sent": b"1000000#{",
    "multi-byte character cut": frame('{"pattern":"echo","data":"中文","id":1}')[:30],
}


@pytest.mark.parametrize("data", STALLS.values(), ids=STALLS.keys())
async def test_a_stalled_frame_is_closed_after_the_incomplete_message_timeout(
    app: NestMicroservice, good: ClientProxy, caplog: pytest.LogCaptureFixture, data: bytes
) -> None:
    loop = asyncio.get_running_loop()
    async with good_client_running(good) as answered:
        attacker = await Raw.open(app.server.port)
        attacker.send(data)
        started = loop.time()
        await assert_closed_with_one_line(caplog, attacker, "stalled inside a frame for 0.3 s")
        assert loop.time() - started >= 0.25  # not before the timeout...
        assert answered[0] > 0  # ...and others were answered meanwhile


async def test_a_slow_frame_that_keeps_coming_is_not_cut(app: NestMicroservice) -> None:
    """As Nest: the timer restarts on every read, so a slow transfer is never cut."""
    raw = await Raw.open(app.server.port)
    data = request("echo", "slow but steady", "slow")
    for i in range(0, len(data), 8):  # about 0.6 s in all, past the 0.3 s timeout
        raw.send(data[i : i + 8])
        await asyncio.sleep(0.08)
    assert await raw.packets(1) == [
        {"response": "slow but steady", "isDisposed": True, "id": "slow"}
    ]
    await raw.close()


async def test_many_slowloris_connections_starve_nobody(
    app: NestMicroservice, good: ClientProxy, caplog: pytest.LogCaptureFixture
) -> None:
    async with good_client_running(good) as answered:
        attackers = [await Raw.open(app.server.port) for _ in range(50)]
        for raw in attackers:
            raw.send(b'40#{"pattern":"echo"')
        await asyncio.sleep(0.15)
        assert answered[0] > 0  # answered while all fifty hold half a frame
        closed = await asyncio.gather(*(raw.closed_by_server() for raw in attackers))
    assert all(closed)
    for raw in attackers:
        assert len(closing_lines(caplog, raw)) == 1
    assert len(app.server._connections) == 1  # the good client's only


async def test_a_bug_in_dispatch_costs_only_the_connection_that_hit_it(
    app: NestMicroservice,
    good: ClientProxy,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The last line of defence: whatever dispatch raises closes that one
    connection with one log line, instead of escaping to asyncio."""
    server: TcpServer = app.server  # type: ignore[assignment]
    handle = server.handle_request

    def buggy(route: str | None, *args: Any) -> None:
        if route == "aecho":  # the good client never asks this one
            raise KeyError("a bug nobody has found yet")
        handle(route, *args)

    monkeypatch.setattr(server, "handle_request", buggy)
    async with good_client_running(good):
        attacker = await Raw.open(app.server.port)
        attacker.send(request("aecho", 1, "bug"))
        line = await assert_closed_with_one_line(caplog, attacker, "could not be handled")
        assert "a bug nobody has found yet" in line


# --- invalid UTF-8 inside strings: U+FFFD, as Node decodes it --------------------


async def test_invalid_utf8_in_a_string_becomes_the_replacement_character(
    app: NestMicroservice,
) -> None:
    raw = await Raw.open(app.server.port)
    raw.send(raw_frame(b'{"pattern":"echo","data":"a\xffb\xc3","id":"u1"}'))
    raw.send(raw_frame(b'{"pattern":"echo","data":"\xed\xa0\x80","id":"u2"}'))  # a surrogate
    first, second = await raw.packets(2)
    assert first == {"response": "a\ufffdb\ufffd", "isDisposed": True, "id": "u1"}
    assert second["id"] == "u2" and set(second["response"]) == {"\ufffd"}
    await raw.close()


# --- well framed, wrong shape: an error reply carrying the id, never silence ----

NO_HANDLER_PATTERNS = {
    "missing": ...,
    "null": None,
    "true": True,
    "false": False,
    "empty array": [],
    "array": ["echo"],
    "empty object": {},
    "number": 1.5,
    "integer": 42,
    "wrong value type": {"cmd": 1},
    "string of an array": "[]",
    "nested past max depth": {"a": {"b": {"c": {"d": {"e": {"f": {"g": 1}}}}}}},
    "too many keys": {f"k{i}": i for i in range(30)},
    "unknown": "no such pattern",
}


@pytest.mark.parametrize("pattern", NO_HANDLER_PATTERNS.values(), ids=NO_HANDLER_PATTERNS.keys())
async def test_a_pattern_that_matches_nothing_gets_the_no_handler_error_with_its_id(
    app: NestMicroservice, good: ClientProxy, pattern: Any
) -> None:
    packet: dict[str, Any] = {"data": 1, "id": "w1"}
    if pattern is not ...:
        packet["pattern"] = pattern
    async with good_client_running(good):
        raw = await Raw.open(app.server.port)
        raw.send(frame(json.dumps(packet)))
        assert await raw.packets(1) == [{"id": "w1", "status": "error", "err": NO_MESSAGE_HANDLER}]
        raw.send(request("echo", "open", "w2"))  # and the connection stays open
        assert (await raw.packets(1))[0]["id"] == "w2"
        await raw.close()


BAD_DATA = {
    "string for a list": frame('{"pattern":{"cmd":"sum"},"data":"abc","id":"d1"}'),
    "object for a list": frame('{"pattern":{"cmd":"sum"},"data":{"a":1},"id":"d1"}'),
    "data missing": frame('{"pattern":{"cmd":"sum"},"id":"d1"}'),
    # Parses (as infinity) but cannot be written back: the generic error, with the id.
    "1e999 echoed": frame('{"pattern":"echo","data":1e999,"id":"d1"}'),
    "1e999 echoed later": frame('{"pattern":"aecho","data":[-1e999],"id":"d1"}'),
}


@pytest.mark.parametrize("data", BAD_DATA.values(), ids=BAD_DATA.keys())
async def test_data_that_fails_the_handler_gets_the_generic_error_with_its_id(
    app: NestMicroservice, data: bytes
) -> None:
    raw = await Raw.open(app.server.port)
    raw.send(data)
    err = {"status": "error", "message": UNKNOWN_EXCEPTION_MESSAGE}
    assert await raw.packets(1) == [{"err": err, "isDisposed": True, "id": "d1"}]
    raw.send(request("echo", "open", "d2"))
    assert (await raw.packets(1))[0]["id"] == "d2"
    await raw.close()


async def test_nesting_across_the_recursion_limit_is_answered_or_closed(
    app: NestMicroservice, good: ClientProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """Around Python's recursion limit a value may parse and yet not encode
    again, a little deeper on the stack.  That once let a RecursionError out of
    data_received.  Now each depth is answered with its id (the value, or the
    generic error) or closed with one line; nothing reaches asyncio."""
    outcomes = set()
    async with good_client_running(good):
        for depth in range(940, 1001):
            for handler in ("echo", "aecho"):
                raw = await Raw.open(app.server.port)
                data = "[" * depth + "]" * depth
                raw.send(frame(f'{{"pattern":"{handler}","id":{depth},"data":{data}}}'))
                try:
                    (reply,) = await raw.packets(1)
                except AssertionError:  # closed before any reply
                    await assert_closed_with_one_line(caplog, raw, "invalid JSON")
                    outcomes.add("closed")
                    continue
                assert reply["id"] == depth
                outcomes.add("answered" if "response" in reply else "generic error")
                if "err" in reply:
                    assert reply["err"]["message"] == UNKNOWN_EXCEPTION_MESSAGE
                await raw.close()
    assert {"answered", "closed"} <= outcomes


async def test_a_reply_too_deep_to_encode_becomes_the_generic_error() -> None:
    """The same, deterministically: the first reply raises RecursionError."""
    server = TcpServer({})
    server.add_handler("deep", lambda data: data, is_event=False)
    sent: list[Any] = []

    def reply(packet: dict[str, Any]) -> None:
        if "response" in packet:
            raise RecursionError("maximum recursion depth exceeded while encoding")
        sent.append(packet)

    server.handle_request("deep", [[]], "r1", None, reply)
    err = {"status": "error", "message": UNKNOWN_EXCEPTION_MESSAGE}
    assert sent == [{"err": err, "isDisposed": True, "id": "r1"}]


# Nest echoes the id it got, whatever its JSON type; so does nestpy_mini.
IDS = {
    "object": {"a": 1, "b": [None, "x"]},
    "array": [1, "x"],
    "true": True,
    "false": False,
    "null": None,
    "float": 1.5,
    "integer": 12345,
    "big number": 1e300,
    "emoji": "😀",
    "lone surrogate": "\ud800",
    "nested 400 deep": json.loads("[" * 400 + "]" * 400),
}


@pytest.mark.parametrize("handler", ["echo", "aecho"])
@pytest.mark.parametrize("msg_id", IDS.values(), ids=IDS.keys())
async def test_an_id_of_any_json_type_is_echoed(
    app: NestMicroservice, handler: str, msg_id: Any
) -> None:
    raw = await Raw.open(app.server.port)
    raw.send(request(handler, "x", msg_id) + request("nobody", "x", msg_id))
    got = await raw.packets(2)
    assert {"response": "x", "isDisposed": True, "id": msg_id} in got
    assert {"id": msg_id, "status": "error", "err": NO_MESSAGE_HANDLER} in got
    await raw.close()


NOT_REQUESTS = {
    "null": b"4#null",
    "number": b"1#5",
    "string": b'7#"hello"',
    "array": b"2#[]",
    "true": b"4#true",
    "event without pattern": frame('{"data":1}'),
    "event with a true pattern": frame('{"pattern":true,"data":1}'),
    "event nobody handles": frame('{"pattern":"nobody","data":1}'),
}


@pytest.mark.parametrize("data", NOT_REQUESTS.values(), ids=NOT_REQUESTS.keys())
async def test_packets_that_are_no_request_are_dropped_and_the_connection_stays(
    app: NestMicroservice, caplog: pytest.LogCaptureFixture, data: bytes
) -> None:
    """As Nest: such a packet is an event nobody handles; logged, never answered."""
    raw = await Raw.open(app.server.port)
    raw.send(data + request("echo", "after", "n1"))
    assert await raw.packets(1) == [{"response": "after", "isDisposed": True, "id": "n1"}]
    lines = [r.getMessage() for r in caplog.records]
    dropped = [line for line in lines if f", {raw.port})" in line or "nobody" in line]
    assert len(dropped) == 1 and "\n" not in dropped[0]
    await raw.close()


# --- patterns too costly to route ------------------------------------------------


async def test_huge_patterns_are_neither_walked_nor_cached(
    app: NestMicroservice, good: ClientProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """Routing used to sort megabyte keys in Python and cache them: 300 such
    requests took 52 s and pinned 3.7 GB.  A route holds every key of its
    pattern, so one longer than every registered route is answered unrouted."""
    raw = await Raw.open(app.server.port)
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with good_client_running(good):
        for i in range(20):
            key = f"{i}" + "k" * 1_000_000
            raw.send(request({key: 1}, 1, i) + request({"cmd": key}, 1, i))
            raw.send(request("{" + key, 1, i) + request(json.dumps({key: "v"}), 1, i))
            raw.send(frame(json.dumps({"pattern": key, "data": 1})))  # an event
            got = await raw.packets(4)
            assert all(p == {"id": i, "status": "error", "err": NO_MESSAGE_HANDLER} for p in got)
    assert loop.time() - started < 10
    assert all(len(str(key)) < 2000 for key in _ROUTE_CACHE)
    # The unknown-event lines are cut short, not megabytes long.
    assert max(len(r.getMessage()) for r in caplog.records) < 1000
    await raw.close()


async def test_the_screen_still_routes_every_registered_pattern(app: NestMicroservice) -> None:
    """Large frames are screened, yet a long registered pattern, or a pattern
    padded with whitespace, still finds its handler: the screen is exact."""
    raw = await Raw.open(app.server.port)
    padding = " " * 5000
    raw.send(request({LONG_KEY: "v"}, "x" * 5000, 1))
    raw.send(request("{" + padding + json.dumps(LONG_KEY) + ':"v"}', 1, 2))
    raw.send(request(f'{{"cmd" :{padding}"sum"}}', [2, 3], 3))
    assert await raw.packets(3) == [
        {"response": "long", "isDisposed": True, "id": 1},
        {"response": "long", "isDisposed": True, "id": 2},
        {"response": 5, "isDisposed": True, "id": 3},
    ]
    await raw.close()


# --- a peer that floods requests and never reads --------------------------------


async def flood(raw: Raw, seconds: float) -> None:
    """Write requests as fast as the socket takes them, and never read."""
    chunk = b"".join(request("echo", "flood", f"f{i}") for i in range(2000))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while loop.time() < deadline and not raw.writer.is_closing():
        raw.send(chunk)
        try:
            await asyncio.wait_for(raw.writer.drain(), 0.05)
        except (TimeoutError, ConnectionResetError, BrokenPipeError):
            await asyncio.sleep(0.01)


async def test_a_flooder_that_never_reads_is_closed_past_max_send_buffer_size(
    app: NestMicroservice, good: ClientProxy, caplog: pytest.LogCaptureFixture
) -> None:
    async with good_client_running(good) as answered:
        attacker = await Raw.open(app.server.port)
        flooding = asyncio.ensure_future(flood(attacker, 5))
        await wait_until(lambda: bool(closing_lines(caplog, attacker)), within=5)
        assert answered[0] > 0
        flooding.cancel()
    (line,) = closing_lines(caplog, attacker)
    assert "is not reading; its send buffer passed the limit" in line
    await attacker.close()


async def test_with_the_default_send_limit_a_flooder_is_paused_and_bounded(
    serve: Serve, tcp_client: Callable[..., ClientProxy]
) -> None:
    """As Nest: a peer that does not read stops being read, so what the server
    holds for it stays bounded even though the limit is 128 MiB."""
    app = await serve(TargetModule, close_grace=0.2)
    good = tcp_client(app.server.port, timeout=3)
    server: TcpServer = app.server  # type: ignore[assignment]
    async with good_client_running(good) as answered:
        await good.connect()
        attacker = await Raw.open(app.server.port)
        flooding = asyncio.ensure_future(flood(attacker, 10))
        await wait_until(lambda: len(server._connections) == 2)
        (conn,) = [c for c in server._connections if c.peer and c.peer[1] == attacker.port]
        assert conn.transport is not None
        await wait_until(lambda: not conn.transport.is_reading(), within=8)  # type: ignore[union-attr]
        held = conn.transport.get_write_buffer_size()
        before = answered[0]
        await asyncio.sleep(0.3)
        assert answered[0] > before  # others are answered while it is paused
        assert conn.transport.get_write_buffer_size() == held < 2 * 1024 * 1024
        flooding.cancel()
    await attacker.close()
    await wait_until(lambda: len(server._connections) == 1)


# --- the limits: Nest's defaults, each one configurable --------------------------


def test_the_limits_default_to_nests() -> None:
    assert DEFAULT_MAX_BUFFER_SIZE == 128 * 1024 * 1024  # characters (UTF-16 units)
    assert DEFAULT_INCOMPLETE_MESSAGE_TIMEOUT == 30.0
    assert DEFAULT_MAX_SEND_BUFFER_SIZE == 128 * 1024 * 1024
    conn = JsonSocket(print, print, TcpServer({}).options)
    assert conn.decoder.max_size == 128 * 1024 * 1024
    assert (conn.incomplete_timeout, conn.max_send) == (30.0, 128 * 1024 * 1024)


async def test_max_buffer_size_is_enforced_to_the_unit(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    app = await serve(TargetModule, max_buffer_size=100)
    fits = '{"pattern":"echo","data":"%s","id":1}' % ("😀" * 32 + "x")
    assert len(fits.encode("utf-16-le")) // 2 == 100
    raw = await Raw.open(app.server.port)
    raw.send(frame(fits))
    assert (await raw.packets(1))[0]["id"] == 1
    raw.send(frame(fits.replace('"id":1', '"id":12')))  # 101 units
    await assert_closed_with_one_line(caplog, raw, "length 101 exceeds the limit of 100")


# --- a big frame trickling in ---------------------------------------------------


@pytest.mark.parametrize(
    ("char", "count"), [("x", 32 << 20), ("中😀", 4 << 20)], ids=["ascii", "cjk"]
)
def test_a_big_frame_arriving_in_many_reads_costs_no_more_than_one_read(
    char: str, count: int
) -> None:
    """Each 256 KiB read used to copy (or decode) the whole frame so far, so a
    big frame from a slow or hostile peer blocked the loop quadratically long:
    in 256 KiB reads, 32 MB of ASCII cost 4.5 times a single read, 28 MB of
    Chinese and emoji 22 times.  Now it is about the same."""
    frame = encode_frame({"pattern": "echo", "data": char * count, "id": 1})
    whole = trickled = float("inf")
    for _ in range(3):  # the best of three, each way, against a busy machine
        started = time.perf_counter()
        assert FrameDecoder().feed(frame)[0]["data"] == char * count
        whole = min(whole, time.perf_counter() - started)
        decoder = FrameDecoder()
        started = time.perf_counter()
        for i in range(0, len(frame), 256 * 1024):
            got = decoder.feed(frame[i : i + 256 * 1024])
        trickled = min(trickled, time.perf_counter() - started)
        assert got[0]["data"] == char * count
    assert trickled < 2 * whole
