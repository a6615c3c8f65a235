"""The limit: a request-reply pair with no framework at all, for the benchmark.

    python nestpy_mini/dev/bare.py serve --port 0       # prints READY <port> <loop>
    python nestpy_mini/dev/bare.py client --port N      # prints one JSON line
    python nestpy_mini/dev/bare.py serve --transport nats --url nats://127.0.0.1:4222

It speaks what a Nest TCP client and server speak (``<length>#<json>`` frames,
``{"pattern":{"cmd":"sum"},"data":[1,2,3],"id":...}`` answered by
``{"response":6,"isDisposed":true,"id":...}``) with one asyncio ``Protocol``
on each side and plain ``json``: no handler table, no observables, no
exception filters.  Its throughput and latency are what Python and asyncio
allow on this machine, so nestpy_mini's own pair (b) can be read as a share of
it.  It is a yardstick, not an implementation of Nest's protocol: it takes the
length as a byte count (Nest counts UTF-16 code units; the same for this
ASCII-only traffic), and it ignores the limits and errors a real server checks.

Over NATS the pair is nats-py and nothing more: the server subscribes to the
subject ``{"cmd":"sum"}`` and publishes each reply to the request's reply
subject; the client reads every reply on one inbox and matches it by id.

This file imports nothing but the standard library, and the benchmark runs it
by its path (``python .../bare.py``), not as ``nestpy_mini.dev.bare``: that would
import the ``nestpy_mini`` package first, and the bare server's memory and start
would include the framework's.  For the same reason the phases every client runs
(``pool``, ``sequential``) and the end-of-stdin watch of every server live here,
and ``bench.py`` imports them: one copy, timed alike on every side.  ``run`` and
``loop_name`` are ``nestpy_mini.run`` and ``nestpy_mini.app.loop_name`` again, short.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

PATTERN = {"cmd": "sum"}
DATA = [1, 2, 3]
EXPECTED = 6
# The client phases' defaults, for this pair and bench.py's: 5,000 warm-up requests,
# because V8's optimizing tiers need a few thousand calls.  READY_TIMEOUT (s): until a
# client gets its first reply (a broker server may still subscribe).
REQUESTS, CONCURRENCY, LATENCY, WARMUP, READY_TIMEOUT = 20_000, 100, 2_000, 5_000, 20.0


def add_client_arguments(cmd: argparse.ArgumentParser) -> None:
    """The measuring client's options, the same for the bare pair and bench.py's pairs."""
    cmd.add_argument("--requests", type=int, default=REQUESTS)
    cmd.add_argument("--concurrency", type=int, default=CONCURRENCY)
    cmd.add_argument("--latency", type=int, default=LATENCY)
    cmd.add_argument("--warmup", type=int, default=WARMUP)
    cmd.add_argument("--ready-timeout", type=float, default=READY_TIMEOUT)


# --- what every side of the benchmark shares -------------------------------------


def run(main: Coroutine[Any, Any, int], loop: str) -> int:
    """Run ``main`` on the loop a service of the same ``loop`` (and NESTPY_LOOP) would get."""
    loop = (os.environ.get("NESTPY_LOOP") or loop) if loop == "auto" else loop
    if loop != "asyncio":
        try:
            import uvloop  # optional: the 'fast' extra
        except ImportError:
            if loop == "uvloop":
                raise
        else:
            return uvloop.run(main)
    return asyncio.run(main)


def loop_name() -> str:
    """The running loop's package, "uvloop" or "asyncio", as each side reports it."""
    return type(asyncio.get_running_loop()).__module__.split(".")[0]


async def pool(
    call: Callable[[], Awaitable[Any]], expected: Any, total: int, in_flight: int
) -> tuple[float, int]:
    """``total`` calls with ``in_flight`` outstanding at every moment: seconds, wrong replies."""
    remaining = total
    wrong = 0

    async def worker() -> None:
        nonlocal remaining, wrong
        while remaining > 0:
            remaining -= 1
            if await call() != expected:
                wrong += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return time.perf_counter() - start, wrong


async def sequential(
    call: Callable[[], Awaitable[Any]], expected: Any, count: int
) -> tuple[list[int], int]:
    """``count`` calls one after another: nanoseconds of each, wrong replies."""
    samples: list[int] = []
    wrong = 0
    clock = time.perf_counter_ns
    for _ in range(count):
        start = clock()
        value = await call()
        samples.append(clock() - start)
        if value != expected:
            wrong += 1
    return samples, wrong


async def measure(
    impl: str, call: Callable[[], Awaitable[Any]], expected: Any, args: argparse.Namespace
) -> dict[str, Any]:
    """Warm up, then the throughput and latency phases: the JSON every Python client prints."""
    import resource

    await pool(call, expected, args.warmup, args.concurrency)
    await sequential(call, expected, -(-args.warmup // 10))
    elapsed, wrong_pool = await pool(call, expected, args.requests, args.concurrency)
    samples, wrong_seq = await sequential(call, expected, args.latency)
    return {
        "impl": impl,
        "transport": args.transport,
        "loop": loop_name(),
        "requests": args.requests,
        "concurrency": args.concurrency,
        "warmup": args.warmup,
        "elapsed_s": elapsed,
        "throughput_rps": args.requests / elapsed,
        "latency_ns": samples,
        "errors": wrong_pool + wrong_seq,
        "client_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        # Where it was allowed to run: shows that the orchestrator's pinning took.
        "cpus": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    }


def on_stdin_end(loop: asyncio.AbstractEventLoop, callback: Callable[[], Any]) -> None:
    """Call ``callback`` once stdin ends, so a server never outlives its parent's pipe."""
    fd = sys.stdin.fileno() if sys.stdin is not None else -1

    def readable() -> None:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            chunk = b""
        if not chunk:
            loop.remove_reader(fd)
            callback()

    if fd >= 0:
        try:
            loop.add_reader(fd, readable)
        except (OSError, ValueError, PermissionError):  # a regular file: nothing to watch
            pass


# --- the bare pair ----------------------------------------------------------------


def frames(buffer: bytearray) -> list[bytes]:
    """Cut every complete ``<length>#<json>`` frame off the front of ``buffer``."""
    out: list[bytes] = []
    pos = 0
    while (hash_at := buffer.find(b"#", pos)) >= 0:
        end = hash_at + 1 + int(buffer[pos:hash_at])
        if len(buffer) < end:
            break
        out.append(bytes(buffer[hash_at + 1 : end]))
        pos = end
    del buffer[:pos]  # once per read: deleting per frame would move the rest each time
    return out


# Replies to one read leave in writes of at most this many, so that the client
# starts on the first ones while the rest are made: the one batching nestpy_mini
# also does (its CORK_FRAMES), without which the bare pair is not the limit.
WRITE_FRAMES = 32


def frame(message: dict[str, Any]) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    return str(len(body)).encode() + b"#" + body


class SumServer(asyncio.Protocol):
    """One connection: every request is answered with the sum of its data."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        replies = []
        for body in frames(self.buffer):
            request = json.loads(body)
            if "id" in request:  # an event (no id) gets no reply, as in Nest
                total = sum(request.get("data") or [])
                # The reply's fixed part is written as it is: encoding stays the id's only.
                body = b'{"response":%d,"isDisposed":true,"id":%s}' % (
                    total, json.dumps(request["id"]).encode()
                )
                replies.append(b"%d#%s" % (len(body), body))
                if len(replies) == WRITE_FRAMES:
                    self.transport.write(b"".join(replies))
                    replies.clear()
        if replies:
            self.transport.write(b"".join(replies))


class SumClient(asyncio.Protocol):
    """One connection; ``send`` matches each reply to its request by id, as a ClientProxy does.

    Requests made in one pass of the loop leave in one write, as the server's
    replies to one read do: the usual asyncio idiom, without which 100 requests
    in flight cost 100 syscalls per pass.
    """

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.outbox: list[bytes] = []
        self.waiting: dict[str, asyncio.Future[Any]] = {}
        self.next_id = 0
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        for body in frames(self.buffer):
            reply = json.loads(body)
            future = self.waiting.pop(reply["id"], None)
            if future is not None and not future.done():
                future.set_result(reply.get("response"))

    def connection_lost(self, exc: Exception | None) -> None:
        for future in self.waiting.values():
            if not future.done():
                future.set_exception(ConnectionError("the server closed the connection"))
        self.waiting.clear()
        if not self.closed.done():
            self.closed.set_result(None)

    async def send(self, pattern: Any, data: Any, within: float | None = None) -> Any:
        self.next_id += 1
        key = str(self.next_id)
        future = asyncio.get_running_loop().create_future()
        self.waiting[key] = future
        if not self.outbox:
            asyncio.get_running_loop().call_soon(self.flush)
        self.outbox.append(frame({"pattern": pattern, "data": data, "id": key}))
        return await (asyncio.wait_for(future, within) if within else future)

    def flush(self) -> None:
        self.transport.write(b"".join(self.outbox))
        self.outbox.clear()

    async def close(self) -> None:
        self.transport.close()
        await asyncio.wait_for(self.closed, 5.0)


SUBJECT = json.dumps(PATTERN, separators=(",", ":"))  # Nest's route for {"cmd":"sum"}


async def nats_server(url: str) -> Callable[[], Awaitable[None]]:
    """Answer ``SUBJECT`` on NATS; returns how to stop."""
    import nats

    nc = await nats.connect(url)

    async def answer(msg: Any) -> None:
        request = json.loads(msg.data)
        if msg.reply:
            total = sum(request.get("data") or [])
            reply = {"response": total, "isDisposed": True, "id": request["id"]}
            await nc.publish(msg.reply, json.dumps(reply, separators=(",", ":")).encode())

    await nc.subscribe(SUBJECT, cb=answer)
    await nc.flush()  # subscribed at the server before READY
    return nc.close


class NatsSumClient:
    """Requests on ``SUBJECT``, every reply on one inbox subject, matched by id."""

    async def connect(self, url: str) -> None:
        import nats

        self.nc = await nats.connect(url)
        self.inbox = self.nc.new_inbox()
        self.waiting: dict[str, asyncio.Future[Any]] = {}
        self.next_id = 0
        await self.nc.subscribe(self.inbox, cb=self.on_reply)

    async def on_reply(self, msg: Any) -> None:
        reply = json.loads(msg.data)
        future = self.waiting.pop(reply["id"], None)
        if future is not None and not future.done():
            future.set_result(reply.get("response"))

    async def send(self, pattern: Any, data: Any, within: float | None = None) -> Any:
        self.next_id += 1
        key = str(self.next_id)
        future = asyncio.get_running_loop().create_future()
        self.waiting[key] = future
        body = json.dumps({"pattern": pattern, "data": data, "id": key}, separators=(",", ":"))
        await self.nc.publish(SUBJECT, body.encode(), reply=self.inbox)
        try:
            return await (asyncio.wait_for(future, within) if within else future)
        finally:
            self.waiting.pop(key, None)

    async def close(self) -> None:
        await self.nc.close()


async def serve(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM or the end of stdin, like ``bench serve``."""
    loop = asyncio.get_running_loop()
    if args.transport == "nats":
        close = await nats_server(args.url)
        port = 0
    else:
        server = await loop.create_server(SumServer, args.host, args.port)
        port = server.sockets[0].getsockname()[1]

        async def close() -> None:
            server.close()

    print(f"READY {port} {loop_name()}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    on_stdin_end(loop, stop.set)
    await stop.wait()
    await asyncio.wait_for(close(), 5.0)
    return 0


async def first_reply(proto: SumClient | NatsSumClient, within: float) -> None:
    """Retry until one request is answered: a NATS server may not be subscribed yet."""
    deadline = time.monotonic() + within
    while True:
        try:
            if await proto.send(PATTERN, DATA, within=1.0) == EXPECTED:
                return
            raise RuntimeError("the first reply is wrong")
        except TimeoutError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def client(args: argparse.Namespace) -> int:
    """The phases of ``bench client`` over one ``SumClient`` connection; one JSON line out."""

    loop = asyncio.get_running_loop()
    proto: SumClient | NatsSumClient
    if args.transport == "nats":
        proto = NatsSumClient()
        await asyncio.wait_for(proto.connect(args.url), args.ready_timeout)
    else:
        _, proto = await asyncio.wait_for(
            loop.create_connection(SumClient, args.host, args.port), args.ready_timeout
        )

    def call() -> Awaitable[Any]:
        return proto.send(PATTERN, DATA)

    try:
        await first_reply(proto, args.ready_timeout)
        result = await measure("bare", call, EXPECTED, args)
    finally:
        await proto.close()
    print(json.dumps(result, separators=(",", ":")), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bare.py")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("serve", "client"):
        cmd = sub.add_parser(name)
        cmd.add_argument("--transport", default="tcp", choices=("tcp", "nats"))
        cmd.add_argument("--url", default="nats://127.0.0.1:4222", help="the NATS server")
        cmd.add_argument("--host", default="127.0.0.1")
        cmd.add_argument("--port", type=int, default=0)
        cmd.add_argument("--loop", default="auto", choices=("auto", "asyncio", "uvloop"))
        if name == "client":
            add_client_arguments(cmd)
    args = parser.parse_args(argv)
    try:
        return run(serve(args) if args.command == "serve" else client(args), args.loop)
    except (OSError, TimeoutError, RuntimeError) as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
