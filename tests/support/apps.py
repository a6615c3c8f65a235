"""What every transport's test app has in common: the handlers (a stream, each
kind of failure, a hang) and the checks of them.

Each test file names them its own way (a run tag on a shared broker, a topic
prefix for MQTT and Kafka) and adds what only its transport has, such as
context getters, wildcards and QoS:

    @Controller()
    class AppController(shared_handlers(lambda name: {"cmd": name}, lambda name: name)):
        ...
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from nestpy_mini import ClientProxy, EventPattern, MessagePattern, RpcError, RpcException


def shared_handlers(request: Callable[[str], Any], event: Callable[[str], str]) -> type:
    """A base class whose handlers answer ``request(name)`` and ``event(name)``."""

    class SharedHandlers:
        @MessagePattern(request("count"))
        async def count(self, n: int) -> AsyncIterator[int]:
            for i in range(1, int(n) + 1):  # int(): Kafka carries a number as its text
                await asyncio.sleep(0.001)
                yield i

        @MessagePattern(request("stream_err"))
        async def stream_err(self, data: object) -> AsyncIterator[int]:
            yield 1
            raise RpcException("mid-stream")

        @MessagePattern(request("hang"))
        async def hang(self, data: object) -> None:
            await asyncio.sleep(30)

        @MessagePattern(request("rpc_str"))
        def rpc_str(self, data: object) -> None:
            raise RpcException("bad thing")

        @MessagePattern(request("rpc_obj"))
        def rpc_obj(self, data: object) -> None:
            raise RpcException({"code": 42, "message": "custom"})

        @MessagePattern(request("boom"))
        def boom(self, data: object) -> None:
            raise KeyError("secret detail")

        @MessagePattern(request("unserializable"))
        def unserializable(self, data: object) -> object:
            return {1, 2}  # a set: JSON cannot hold it, so the caller gets the generic error

        @EventPattern(event("explodes"))
        def explodes(self, data: object) -> None:
            raise RuntimeError("event handler failure")

    return SharedHandlers


# --- the checks of those handlers, the same on every transport ---------------------

COMMON_ERRORS = {
    "rpc_str": {"status": "error", "message": "bad thing"},
    "rpc_obj": {"code": 42, "message": "custom"},
    "boom": {"status": "error", "message": "Internal server error"},
    "unserializable": {"status": "error", "message": "Internal server error"},
}


async def check_streams(
    client: ClientProxy, pattern: Any, value: Callable[[int], Any] = lambda n: n
) -> None:
    """A streamed reply, three ways: awaited (the last value), iterated, subscribed.

    ``value`` is how the transport carries a number back (Kafka: as text).
    """
    assert await client.send(pattern, 3) == value(3)
    assert [v async for v in client.send(pattern, 3)] == [value(i) for i in (1, 2, 3)]
    seen: list[object] = []
    sub = client.send(pattern, 4).subscribe(
        seen.append, lambda e: seen.append(e), lambda: seen.append("done")
    )
    await sub
    assert seen == [*(value(i) for i in (1, 2, 3, 4)), "done"] and sub.closed


async def check_stream_error(
    client: ClientProxy, pattern: Any, value: Callable[[int], Any] = lambda n: n
) -> None:
    """A stream that fails after one value: the value arrives, then the error."""
    seen: list[object] = []
    with pytest.raises(RpcError) as info:
        async for item in client.send(pattern, 0):
            seen.append(item)
    assert seen == [value(1)]
    assert info.value.error == {"status": "error", "message": "mid-stream"}


async def check_error_kinds(
    client: ClientProxy,
    request: Callable[[str], Any],
    caplog: pytest.LogCaptureFixture,
    more: dict[str, Any] | None = None,
    after_each: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Every error kind reaches the caller as Nest sends it (``more``: a
    transport's own cases); a handler's own exception is logged, never sent."""
    with caplog.at_level(logging.ERROR):
        for name, err in {**COMMON_ERRORS, **(more or {})}.items():
            with pytest.raises(RpcError) as info:
                await client.send(request(name), 1)
            assert info.value.error == err
            if after_each is not None:
                await after_each()
    assert "secret detail" in caplog.text
