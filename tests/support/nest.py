"""Drive the real NestJS 12 peers of the dev layer's NestJS project from asyncio tests.

``server.mjs`` prints ``READY <port>`` once listening; ``client.mjs`` prints
``READY`` once connected and then answers one JSON line per command, tagged.
Every wait here is bounded, so a broken peer fails a test instead of hanging it.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
from typing import Any

from nestpy_mini.dev import node

START_TIMEOUT = 20.0
ANSWER_TIMEOUT = 10.0
LINE_LIMIT = 16 * 1024 * 1024


@functools.cache
def nest_missing() -> str | None:
    """Why the NestJS peers cannot run here (after installing them once), or None."""
    try:
        node.project()
    except node.NestUnavailable as exc:
        return str(exc)
    return None


async def _start(script: str, args: list[str]) -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(
        node.node(),
        script,
        *args,
        cwd=node.project(),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        # Answers carry whole payloads; asyncio's default 64 KiB line limit
        # would kill the reader on a large one and leave the peer hanging.
        limit=LINE_LIMIT,
    )
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT)
    except TimeoutError:
        line = b""
    if not line.startswith(b"READY"):
        await _stop(proc)
        assert proc.stderr is not None
        err = (await proc.stderr.read()).decode(errors="replace")[-2000:]
        raise RuntimeError(f"node {script} did not start: {line!r}\n{err}")
    return proc, line.decode().strip()


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            proc.kill()
            # Bounded too: a child blocked on a full pipe nobody drains
            # would otherwise keep this await open for ever.
            await asyncio.wait_for(proc.communicate(), 5)
    # The pipes belong to this loop; close them here, not in a finalizer.
    transport = getattr(proc, "_transport", None)
    if transport is not None:
        transport.close()


def transport_args(transport: str, **options: Any) -> list[str]:
    args = ["--transport", transport]
    for key, value in options.items():
        args += [f"--{key}", str(value)]
    return args


class NestServer:
    """A real Nest microservice in a node process."""

    def __init__(self, transport: str = "tcp", **options: Any) -> None:
        self.args = transport_args(transport, **options)
        self.proc: asyncio.subprocess.Process | None = None
        self.port = 0

    async def start(self) -> NestServer:
        self.proc, ready = await _start("server.mjs", self.args)
        self.port = int(ready.split()[1])
        return self

    async def stop(self) -> None:
        if self.proc is not None:
            await _stop(self.proc)


class NestClient:
    """A real Nest ``ClientProxy`` in a node process, driven by tagged JSON lines."""

    def __init__(self, transport: str = "tcp", **options: Any) -> None:
        self.args = transport_args(transport, **options)
        self.proc: asyncio.subprocess.Process | None = None
        self._tags = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> NestClient:
        self.proc, _ = await _start("client.mjs", self.args)
        self._reader = asyncio.ensure_future(self._read())
        return self

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for line in self.proc.stdout:
            answer = json.loads(line)
            future = self._waiting.pop(answer["tag"], None)
            if future is not None and not future.done():
                future.set_result(answer)
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(RuntimeError("the Nest client exited"))

    async def command(self, op: str, **fields: Any) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None
        tag = next(self._tags)
        future = asyncio.get_running_loop().create_future()
        self._waiting[tag] = future
        line = json.dumps({"tag": tag, "op": op, **fields}, ensure_ascii=False)
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()
        return await asyncio.wait_for(future, ANSWER_TIMEOUT)

    async def send(self, pattern: Any, data: Any) -> dict[str, Any]:
        return await self.command("send", pattern=pattern, data=data)

    async def emit(self, pattern: Any, data: Any) -> dict[str, Any]:
        return await self.command("emit", pattern=pattern, data=data)

    async def stop(self) -> None:
        if self.proc is not None:
            await _stop(self.proc)
        if self._reader is not None:
            await asyncio.wait([self._reader], timeout=5)
