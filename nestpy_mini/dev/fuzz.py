"""Fuzz a live nestpy_mini TCP server: ``python -m nestpy_mini.dev fuzz [--inputs N]
[--seed S] [--workers K]``.

The server runs in a subprocess, so a crash shows as a dead process rather
than a test that hangs.  Inputs go over many connections.  A connection first
carries a batch of well-framed inputs whose outcome is known: requests that
must be answered, with their id and the right value or error, plus events
and non-request packets that must be dropped.  A sentinel request proves the
connection is still open.  Then, on most connections, one chaos input ends it:
garbage, a bad or huge length prefix, a stalled or truncated frame, invalid
UTF-8 or JSON, deep nesting, an id that cannot be written back, a mutated
frame, or a flood that never reads.  Where the outcome is certain the fuzzer
checks it: the server must close.  During and after every batch a
well-behaved client must get correct answers.  Exits 1 on any crash or
failed check.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from .. import (
    ClientProxyFactory,
    Controller,
    EventPattern,
    MessagePattern,
    Module,
    NestFactory,
    RpcException,
    Transport,
)
from ..packets import NO_MESSAGE_HANDLER
from ..transports.json_socket import FrameDecoder, FrameError

# The fuzz server's limits: small, so every limit is reached many times, and
# a stalled frame costs a tenth of a second instead of Nest's 30.
MAX_BUFFER = 1024 * 1024
STALL_TIMEOUT = 0.1
MAX_SEND_BUFFER = 256 * 1024
BATCH_INPUTS = 2000  # inputs between two well-behaved checks
# How long a connection may stay silent before the fuzzer calls it open.
SETTLE = 2.0


# --- the server under test ------------------------------------------------------


@Controller()
class FuzzTargetController:
    """Sync, async and streaming handlers, failing ones, and events."""

    @MessagePattern({"cmd": "sum"})
    def sum(self, data: list[int]) -> int:
        return sum(data)

    @MessagePattern("echo")
    def echo(self, data: Any) -> Any:
        return data

    @MessagePattern("aecho")
    async def aecho(self, data: Any) -> Any:
        await asyncio.sleep(0)
        return data

    @MessagePattern("count")
    async def count(self, data: Any) -> Any:
        for i in range(int(data) % 4):
            yield i

    @MessagePattern("fail")
    def fail(self, data: Any) -> None:
        raise RpcException({"code": 7, "message": "refused"})

    @MessagePattern("boom")
    def boom(self, data: Any) -> None:
        raise ValueError("a handler bug")

    @EventPattern("seen")
    def seen(self, data: Any) -> None:
        pass

    @EventPattern("aseen")
    async def aseen(self, data: Any) -> None:
        await asyncio.sleep(0)


@Module(controllers=[FuzzTargetController])
class FuzzTargetModule: ...


async def serve() -> None:
    """Run the fuzz target until SIGTERM, SIGINT or the end of stdin."""
    app = await NestFactory.create_microservice(
        FuzzTargetModule,
        transport=Transport.TCP,
        options={
            "port": 0,
            "max_buffer_size": MAX_BUFFER,
            "incomplete_message_timeout": STALL_TIMEOUT,
            "max_send_buffer_size": MAX_SEND_BUFFER,
        },
    )
    await app.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # The end of stdin means the fuzzer is gone: never outlive it.
    loop.add_reader(sys.stdin.fileno(), lambda: sys.stdin.buffer.read1() or stop.set())
    print(f"READY {app.server.port}", flush=True)  # type: ignore[attr-defined]
    await stop.wait()
    loop.remove_reader(sys.stdin.fileno())
    await app.close()


# --- inputs ------------------------------------------------------------------------

Check = Callable[[dict[str, Any]], bool]


def _no_handler(packet: dict[str, Any]) -> bool:
    return packet.get("err") == NO_MESSAGE_HANDLER and packet.get("status") == "error"


def _an_error(packet: dict[str, Any]) -> bool:
    return bool(packet.get("err"))


def _ended(packet: dict[str, Any]) -> bool:
    return True


def _response(value: Any) -> Check:
    return lambda packet: "err" not in packet and packet.get("response") == value


def _key(msg_id: Any) -> str:
    """An id as a dictionary key: its JSON, which every id type has."""
    return json.dumps(msg_id, sort_keys=True)


def _is_final(packet: dict[str, Any]) -> bool:
    return bool(packet.get("isDisposed") or packet.get("err") or packet.get("status"))


def _frame_text(text: str) -> bytes:
    return b"%d#%s" % (len(text.encode("utf-16-le", "surrogatepass")) // 2, text.encode())


def _encode(packet: Any) -> bytes:
    """A frame as Nest writes it, made without the code under test (the
    fuzzer must not inherit its bugs): raw UTF-8, or all \\u escapes when a
    lone surrogate has no UTF-8 form."""
    text = json.dumps(packet, ensure_ascii=False, separators=(",", ":"))
    try:
        return _frame_text(text)
    except UnicodeEncodeError:
        return _frame_text(json.dumps(packet, separators=(",", ":")))


@dataclass
class Plan:
    """What one connection sends, and what must come of it."""

    known: list[bytes] = field(default_factory=list)
    expect: dict[str, list[Check]] = field(default_factory=dict)
    kinds: list[str] = field(default_factory=list)
    chaos: bytes | None = None
    chaos_kind: str = ""
    must_close: bool = False
    sentinel_after_chaos: bool = True
    slow: bool = False
    flood: bool = False


WORDS = ["sum", "名字", "张三", "😀", "é", "ß", "\u2028", "\x00", '"', "\\", "#", "42", " ", "🚀🚀"]
DEEP_100K = _frame_text("[" * 100_000 + "]" * 100_000)
INVALID_JSON = ["{abc}", "", "{", "[1,2", '{"a":}', "nul", "tru", "'x'", '{"a" 1}', "1 2", "}{"]
BAD_PREFIXES = [b"abc", b"-5", b"", b"+7", b" 7", b"12abc", b"1.5", b"0x10", b"1e3", b"\xff", b"--"]


class Inputs:
    """Makes plans from one seeded generator, and counts what it made."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.made: Counter[str] = Counter()
        self.connection = 0

    # values
    def text(self) -> str:
        rng = self.rng
        return "".join(rng.choice(WORDS) for _ in range(rng.randrange(4)))

    def value(self, depth: int = 0) -> Any:
        rng = self.rng
        roll = rng.random()
        if depth > 2 or roll < 0.5:
            return rng.choice(
                [
                    None,
                    True,
                    False,
                    rng.randrange(-(10**12), 10**12),
                    rng.random() * 10 ** rng.randrange(-5, 20),
                    self.text(),
                    "\ud800" + self.text(),  # a lone surrogate, echoed as an escape
                ]
            )
        if roll < 0.75:
            return [self.value(depth + 1) for _ in range(rng.randrange(4))]
        return {self.text(): self.value(depth + 1) for _ in range(rng.randrange(4))}

    def odd_id(self, used: set[str], n: int) -> Any:
        """An id of any JSON type, unique on its connection."""
        rng = self.rng
        msg_id = rng.choice(
            [
                f"c{self.connection}-{n}",
                self.connection * 10_000 + n,
                n + 0.5,
                {"n": n, "v": self.value(1)},
                [n, "x"],
                True,
                False,
                None,
                f"ид-😀-{n}",
                f"\udc00-{n}",
                f"long-{n}-" + "x" * rng.randrange(1000, 10_000),
            ]
        )
        return f"c{self.connection}-{n}" if _key(msg_id) in used else msg_id

    # one known input: (frame, id or None, check)
    def known(self, n: int, used: set[str]) -> tuple[str, bytes, Any, Check | None]:
        rng = self.rng
        msg_id: Any = f"c{self.connection}-{n}" if rng.random() < 0.7 else self.odd_id(used, n)
        roll = rng.random()
        if roll < 0.25:
            numbers = [rng.randrange(-1000, 1000) for _ in range(rng.randrange(6))]
            packet = {"pattern": {"cmd": "sum"}, "data": numbers, "id": msg_id}
            return "valid request", _encode(packet), msg_id, _response(sum(numbers))
        if roll < 0.45:
            data = self.value()
            handler = rng.choice(["echo", "aecho"])
            packet = {"pattern": handler, "data": data, "id": msg_id}
            if rng.random() < 0.3:  # \u-escaped ASCII, as some clients send it
                frame = _frame_text(json.dumps(packet))
            else:
                frame = _encode(packet)
            return "echo (unicode, any JSON)", frame, msg_id, _response(data)
        if roll < 0.55:
            pattern = rng.choice(
                [
                    ...,
                    None,
                    True,
                    False,
                    [],
                    ["echo"],
                    {},
                    1.5,
                    42,
                    {"cmd": 1},
                    "[]",
                    {"a": {"b": {"c": {"d": {"e": {"f": {"g": 1}}}}}}},
                    {f"k{i}": i for i in range(30)},
                    "unknown",
                    {"k" * rng.randrange(300, 20_000): 1},
                    "{" + " " * rng.randrange(300, 3000) + '"cmd":"nope"}',
                ]
            )
            packet = {"data": self.value(), "id": msg_id}
            if pattern is not ...:
                packet["pattern"] = pattern
            return "wrong-shape pattern", _encode(packet), msg_id, _no_handler
        if roll < 0.62:
            data = rng.choice(["abc", {"a": 1}, [1, "x"], None, 5, [[1]]])
            packet = {"pattern": {"cmd": "sum"}, "data": data, "id": msg_id}
            if data is None and rng.random() < 0.5:
                del packet["data"]
            return "data the handler fails on", _encode(packet), msg_id, _an_error
        if roll < 0.67:
            handler = rng.choice(["fail", "boom", "count"])
            packet = {"pattern": handler, "data": rng.randrange(10), "id": msg_id}
            check = _ended if handler == "count" else _an_error
            return "failing or streaming handler", _encode(packet), msg_id, check
        if roll < 0.72:
            depth = rng.randrange(20, 400)
            data = json.loads("[" * depth + "]" * depth)
            packet = {"pattern": "echo", "data": data, "id": msg_id}
            return "nested data (under 400)", _encode(packet), msg_id, _response(data)
        if roll < 0.85:
            event = rng.choice(
                [
                    {"pattern": "seen", "data": self.value()},
                    {"pattern": "aseen", "data": self.value()},
                    {"pattern": "nobody", "data": 1},
                    {"pattern": True, "data": 1},
                    {"data": 1},
                    {"pattern": {"cmd": "sum"}, "data": [1]},
                    {"pattern": "k" * rng.randrange(300, 20_000), "data": 1},
                ]
            )
            return "event", _encode(event), None, None
        frame = rng.choice([b"4#null", b"1#5", b'3#"x"', b"2#[]", b"4#true", b"5#false", b"2#{}"])
        return "not a request", frame, None, None

    # one chaos input: (kind, bytes, must the server close, send a sentinel after)
    def chaos(self) -> tuple[str, bytes, bool, bool]:
        rng = self.rng
        valid = _encode({"pattern": "echo", "data": self.value(), "id": "chaos"})
        roll = rng.random()
        if roll < 0.12:
            return "random bytes", rng.randbytes(rng.randrange(1, 300)), False, True
        if roll < 0.18:
            letters = "".join(rng.choice("abcxyz !?{}") for _ in range(rng.randrange(13, 80)))
            return "garbage text", letters.encode(), True, True
        if roll < 0.26:
            return "bad length prefix", rng.choice(BAD_PREFIXES) + b"#" + valid, True, True
        if roll < 0.30:
            huge = rng.choice([MAX_BUFFER + 1, rng.randrange(MAX_BUFFER, 10**12), 10**12 - 1])
            return "huge declared length", b"%d#{" % huge, True, True
        if roll < 0.31:
            return "thirteen-digit length", b"1234567890123#{}", True, True
        if roll < 0.40:
            return "truncated frame (stalls)", valid[: rng.randrange(1, len(valid))], True, False
        if roll < 0.44:
            return (
                "declared length never sent",
                b"%d#{" % rng.randrange(10, MAX_BUFFER),
                True,
                False,
            )
        if roll < 0.52:
            body = rng.choice(INVALID_JSON)
            return "invalid JSON", _frame_text(body), True, True
        if roll < 0.58:
            body = bytearray(b'{"pattern":"echo","data":"ab","id":"u"}')
            for _ in range(rng.randrange(1, 4)):
                body.insert(rng.randrange(len(body)), rng.randrange(0x80, 0x100))
            return "invalid UTF-8", b"%d#%s" % (len(body), body), False, True
        if roll < 0.60:
            return "100,000 nested brackets", DEEP_100K, True, True
        if roll < 0.65:
            depth = rng.randrange(900, 1100)
            nest = "[" * depth + "]" * depth
            where = rng.choice(["data", "id", "pattern"])
            packet = {"pattern": '"echo"', "data": "1", "id": '"d"', where: nest}
            text = "{" + ",".join(f'"{k}":{v}' for k, v in packet.items()) + "}"
            return "nesting near the recursion limit", _frame_text(text), False, True
        if roll < 0.69:
            bad = rng.choice(["NaN", "Infinity", "-Infinity", "[NaN]", '{"a":Infinity}'])
            return "NaN/Infinity id", _frame_text(f'{{"pattern":"echo","id":{bad}}}'), True, True
        if roll < 0.71:
            text = '{"pattern":"echo","data":1,"id":' + "[" * 600 + "]" * 600 + "}"
            return "id nested 600 deep", _frame_text(text), True, True
        if roll < 0.75:
            text = json.dumps(
                {"pattern": "echo", "data": "中文😀" * 5, "id": 1}, ensure_ascii=False
            )
            wrong = len(text.encode()) if rng.random() < 0.5 else len(text)  # bytes, code points
            return "length in bytes or code points", b"%d#%s" % (wrong, text.encode()), True, False
        if roll < 0.78:
            text = '{"pattern":"echo","data":"😀","id":1}'
            cut = text.index("😀") + 1  # the length ends between the emoji's two units
            return "length inside an emoji", b"%d#%s" % (cut, text.encode()), True, True
        stream = bytearray(valid + _encode({"pattern": "ping", "data": 1, "id": 2}))
        for _ in range(rng.randrange(1, 4)):
            at = rng.randrange(len(stream))
            op = rng.randrange(4)
            if op == 0:
                stream[at] = rng.randrange(256)
            elif op == 1:
                stream.insert(at, rng.randrange(256))
            elif op == 2 and len(stream) > 1:
                del stream[at]
            else:
                stream[at:at] = stream[at : at + rng.randrange(1, 20)]
        return "mutated frames", bytes(stream), False, True

    def plan(self) -> Plan:
        """One connection's inputs: up to 17 known ones, then chaos (mostly)."""
        rng = self.rng
        self.connection += 1
        plan = Plan()
        used: set[str] = set()
        for n in range(rng.randrange(0, 18)):
            kind, frame, msg_id, check = self.known(n, used)
            plan.known.append(frame)
            plan.kinds.append(kind)
            if check is not None:
                used.add(_key(msg_id))
                plan.expect.setdefault(_key(msg_id), []).append(check)
        plan.slow = rng.random() < 0.02
        if rng.random() < 0.85:
            kind, data, must_close, sentinel = self.chaos()
            plan.chaos, plan.chaos_kind = data, kind
            plan.must_close, plan.sentinel_after_chaos = must_close, sentinel
        for kind in plan.kinds:
            self.made[kind] += 1
        if plan.chaos_kind:
            self.made[plan.chaos_kind] += 1
        return plan


# --- the attack --------------------------------------------------------------------


@dataclass
class Tally:
    """What happened, for the report."""

    inputs: int = 0
    connections: int = 0
    closed_by_server: int = 0
    replies_checked: int = 0
    batches: int = 0
    checks_passed: int = 0
    checks_during: int = 0
    failures: list[str] = field(default_factory=list)
    made: Counter[str] = field(default_factory=Counter)

    def fail(self, why: str) -> None:
        if len(self.failures) < 20:
            self.failures.append(why)
        else:
            self.failures[-1] = f"... and more ({why})"


class Conn:
    """One raw connection, with the framing parser as the only reader."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = FrameDecoder(64 * 1024 * 1024)
        self.packets: list[Any] = []

    async def read_until(self, done: Callable[[], bool], within: float) -> str:
        """ "done", "closed" (by the server), "silent", or "broken" (a bad frame from it)."""
        try:
            async with asyncio.timeout(within):
                while not done():
                    data = await self.reader.read(256 * 1024)
                    if not data:
                        return "closed"
                    self.packets += self.decoder.feed(data)
        except TimeoutError:
            return "silent"
        except (ConnectionResetError, BrokenPipeError):
            return "closed"
        except FrameError as exc:
            self.packets += exc.packets
            return "broken"
        return "done"

    def close(self) -> None:
        self.writer.transport.abort()  # unsent bytes (a flood's) must not hold it


async def _write(conn: Conn, data: bytes, slow: bool, rng: random.Random) -> None:
    """Write in a few pieces, so frames split anywhere; ``slow`` pauses between
    them (shorter than the stall timeout, so nothing may be cut)."""
    cuts = sorted(rng.randrange(len(data) + 1) for _ in range(rng.randrange(4)))
    for start, end in zip([0, *cuts], [*cuts, len(data)], strict=True):
        conn.writer.write(data[start:end])
        await asyncio.sleep(STALL_TIMEOUT / 10 if slow else 0)


def _sentinel(name: str) -> tuple[bytes, Callable[[list[Any]], bool]]:
    frame = _encode({"pattern": "echo", "data": name, "id": name})
    return frame, lambda packets: any(
        isinstance(p, dict) and p.get("id") == name and p.get("response") == name for p in packets
    )


async def run_plan(port: int, plan: Plan, rng: random.Random, tally: Tally) -> None:
    """Send one plan over a new connection and check what came back."""
    try:
        conn = Conn(*await asyncio.open_connection("127.0.0.1", port))
    except OSError as exc:
        tally.fail(f"cannot connect: {exc}")
        return
    tally.connections += 1
    try:
        await _run(conn, plan, rng, tally)
    except Exception as exc:  # reported, so one bad plan cannot hide the rest
        tally.fail(f"{plan.chaos_kind or 'known inputs'}: the fuzzer itself failed: {exc!r}")
    finally:
        conn.close()


async def _run(conn: Conn, plan: Plan, rng: random.Random, tally: Tally) -> None:
    sentinel, answered = _sentinel("s1")
    await _write(conn, b"".join(plan.known) + sentinel, plan.slow, rng)
    tally.inputs += len(plan.known)
    expect = {key: list(checks) for key, checks in plan.expect.items()}
    seen = 0

    def settled() -> bool:
        """Check the final replies that came since last time; True once all did."""
        nonlocal seen
        for packet in conn.packets[seen:]:
            if not isinstance(packet, dict) or not _is_final(packet):
                continue
            checks = expect.get(_key(packet.get("id")))
            if checks:
                if checks.pop(0)(packet):
                    tally.replies_checked += 1
                else:
                    tally.fail(f"wrong reply {packet!r:.200}")
        seen = len(conn.packets)
        return answered(conn.packets) and not any(expect.values())

    outcome = await conn.read_until(settled, SETTLE + 3)
    if outcome != "done":
        missing = [k for k, v in expect.items() if v]
        tally.fail(f"valid frames: connection {outcome}; no reply for {missing[:3]}")
        return
    if plan.flood:
        tally.inputs += 1
        if await _flood(conn) == "closed":
            tally.closed_by_server += 1
        else:
            tally.fail("a flood that never reads was not closed")
        return
    if plan.chaos is None:
        return
    tally.inputs += 1
    data = plan.chaos
    sentinel, answered = _sentinel("s2")
    if plan.sentinel_after_chaos:
        data += sentinel
    conn.writer.write(data)
    outcome = await conn.read_until(lambda: answered(conn.packets), STALL_TIMEOUT + SETTLE)
    if outcome == "closed":
        tally.closed_by_server += 1
    elif plan.must_close:
        tally.fail(f"{plan.chaos_kind}: expected a close, got {outcome}: {plan.chaos[:60]!r}")


async def _flood(conn: Conn) -> str:
    """Write requests and never read, until the server gives up on us."""
    chunk = b"".join(_encode({"pattern": "echo", "data": "f", "id": i}) for i in range(2000))
    sock = conn.writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fill up sooner
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while loop.time() < deadline:
        if conn.writer.transport.is_closing():
            return "closed"
        conn.writer.write(chunk)
        try:
            await asyncio.wait_for(conn.writer.drain(), 0.05)
        except TimeoutError:
            pass
        except (ConnectionResetError, BrokenPipeError):
            return "closed"
        # The server closes it by resetting; a read then notices.
        if conn.reader.at_eof() or conn.reader.exception() is not None:
            return "closed"
    return "open"


async def well_behaved(client: Any, tally: Tally, stop: asyncio.Event, rng: random.Random) -> None:
    """A polite client on its own connection: asks and checks until ``stop``."""
    while not stop.is_set():
        if await _ask(client, rng, tally):
            tally.checks_during += 1
        await asyncio.sleep(0.01)


async def _ask(client: Any, rng: random.Random, tally: Tally) -> bool:
    numbers = [rng.randrange(1000) for _ in range(5)]
    data = {"名字": "张三 😀", "n": rng.random(), "nested": [[{"é": None}]]}
    try:
        got = (
            await client.send({"cmd": "sum"}, numbers),
            await client.send("echo", data),
            await client.send("aecho", data),
        )
    except Exception as exc:
        tally.fail(f"the well-behaved client failed: {exc!r}")
        return False
    if got != (sum(numbers), data, data):
        tally.fail(f"the well-behaved client got a wrong answer: {got!r:.200}")
        return False
    return True


# --- the command -------------------------------------------------------------------


def _rss(pid: int) -> tuple[float, float] | None:
    """The process's resident and peak resident memory, in MiB (Linux only)."""
    try:
        fields = dict(
            line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        )
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024
    except (OSError, KeyError, ValueError):
        return None


def _start_server(log: TextIO) -> tuple[subprocess.Popen[bytes], int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "nestpy_mini.dev.fuzz", "--serve"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=log,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode().split()
    if len(line) != 2 or line[0] != "READY":
        proc.kill()
        raise RuntimeError(f"the fuzz server did not start: {line!r}")
    return proc, int(line[1])


async def _worker(port: int, queue: Iterator[Plan], rng: random.Random, tally: Tally) -> None:
    """Take the batch's plans one after another; workers share ``queue``."""
    for plan in queue:
        await run_plan(port, plan, rng, tally)


async def attack(
    port: int, proc: subprocess.Popen[bytes], total: int, seed: int, workers: int
) -> Tally:
    """Every batch over ``workers`` concurrent connections, then a check."""
    rng = random.Random(seed)
    inputs = Inputs(rng)
    tally = Tally(made=inputs.made)
    client = ClientProxyFactory.create(Transport.TCP, {"port": port, "timeout": 10})
    while tally.inputs < total and proc.poll() is None:
        plans = []
        planned = 0
        while planned < min(BATCH_INPUTS, total - tally.inputs):
            plan = inputs.plan()
            plans.append(plan)
            planned += len(plan.known) + (1 if plan.chaos_kind else 0)
        if tally.batches % 10 == 0:
            # A flood costs the server tens of thousands of requests: one in
            # ten batches has one, the first batch always.
            plans[-1].chaos, plans[-1].flood = None, True
            plans[-1].chaos_kind, plans[-1].must_close = "flood that never reads", True
            inputs.made["flood that never reads"] += 1
        tally.batches += 1
        queue = iter(plans)
        stop = asyncio.Event()
        checker = asyncio.ensure_future(well_behaved(client, tally, stop, random.Random(seed)))
        await asyncio.gather(
            *(_worker(port, queue, random.Random(rng.random()), tally) for _ in range(workers))
        )
        stop.set()
        await checker
        if proc.poll() is None and await _ask(client, rng, tally):  # after the batch
            tally.checks_passed += 1
        print(
            f"\r  {tally.inputs:,} inputs, {tally.connections:,} connections",
            end="",
            file=sys.stderr,
            flush=True,
        )
    print(file=sys.stderr)
    await client.close()
    return tally


def main(argv: list[str] | None = None) -> int:
    """Run the fuzzer and print its report; 0 when nothing failed."""
    parser = argparse.ArgumentParser(prog="python -m nestpy_mini.dev fuzz", description=__doc__)
    parser.add_argument("--inputs", type=int, default=100_000, help="how many inputs to send")
    parser.add_argument("--seed", type=int, default=1, help="the generator's seed")
    parser.add_argument("--workers", type=int, default=16, help="concurrent connections")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        asyncio.run(serve())
        return 0
    with tempfile.TemporaryDirectory(prefix="nestpy-fuzz-") as tmp:
        log_path = Path(tmp) / "server.log"
        with log_path.open("w") as log:
            return _fuzz(args.inputs, args.seed, max(1, args.workers), log, log_path)


def _fuzz(total: int, seed: int, workers: int, log: TextIO, log_path: Path) -> int:
    print(f"nestpy_mini fuzz: {total:,} inputs, seed {seed}, {workers} workers")
    proc, port = _start_server(log)
    try:
        before = _rss(proc.pid)
        started = time.perf_counter()
        tally = asyncio.run(attack(port, proc, total, seed, workers))
        elapsed = time.perf_counter() - started
        after = _rss(proc.pid)
        crashed = proc.poll() is not None
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    log.flush()
    lines = log_path.read_text(errors="replace").splitlines()
    logged_closes = sum("closing connection:" in line for line in lines)
    unhandled = [line for line in lines if line.startswith(("ERROR asyncio", "CRITICAL"))]
    caught = [line for line in lines if "could not be handled" in line]
    unhandled += caught  # our own safety net: a dispatch bug, even if contained
    exit_code = proc.returncode
    crashes = 1 if crashed or exit_code not in (0, -signal.SIGTERM) else 0
    checks, batches = tally.checks_passed, tally.batches

    def mib(pair: tuple[float, float] | None, i: int) -> str:
        return f"{pair[i]:.1f}" if pair else "n/a"

    print(f"inputs tried:                      {tally.inputs:>9,}")
    print(f"connections opened:                {tally.connections:>9,}")
    print(
        f"connections closed by the server:  {tally.closed_by_server:>9,}"
        f"   (server log: {logged_closes:,} closing lines)"
    )
    print(f"server crashes:                    {crashes:>9}")
    print(f"unhandled errors in the server log:{len(unhandled):>9}")
    print(
        f"well-behaved checks passed:        {checks:>9,}   after batches"
        f" (of {batches:,}), and {tally.checks_during:,} during them"
    )
    print(f"replies checked (id and answer):   {tally.replies_checked:>9,}")
    print(f"elapsed seconds:                   {elapsed:>9.1f}")
    print(
        f"server RSS before / after (peak):  {mib(before, 0)} / {mib(after, 0)}"
        f" ({mib(after, 1)}) MiB"
    )
    print("inputs by kind:")
    for kind, n in sorted(tally.made.items(), key=lambda item: -item[1]):
        print(f"  {n:>8,}  {kind}")
    for why in tally.failures:
        print(f"FAILED: {why}")
    for line in unhandled[:10]:
        print(f"SERVER: {line[:300]}")
    failed = crashes or tally.failures or unhandled or checks < batches
    print("result: FAILED" if failed else "result: ok")
    return 1 if failed else 0


if __name__ == "__main__":
    if "--serve" in sys.argv:
        import logging

        # One line per record, with the logger's name: the report counts
        # asyncio's own error lines (an exception that escaped) separately.
        logging.basicConfig(
            level=logging.WARNING, format="%(levelname)s %(name)s %(message)s", stream=sys.stderr
        )
    sys.exit(main())
