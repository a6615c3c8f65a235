"""The handlers every transport's test app has in common: a stream, each kind
of failure, a hang.

Each test file names them its own way (a run tag on a shared broker, a topic
prefix for MQTT and Kafka) and adds what only its transport has, such as
context getters, wildcards and QoS:

    @Controller()
    class AppController(shared_handlers(lambda name: {"cmd": name}, lambda name: name)):
        ...
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from nestpy_mini import EventPattern, MessagePattern, RpcException


def shared_handlers(request: Callable[[str], Any], event: Callable[[str], str]) -> type:
    """A base class whose handlers answer ``request(name)`` and ``event(name)``."""

    class SharedHandlers:
        @MessagePattern(request("count"))
        async def count(self, n: int) -> AsyncIterator[int]:
            for i in range(1, n + 1):
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

        @EventPattern(event("explodes"))
        def explodes(self, data: object) -> None:
            raise RuntimeError("event handler failure")

    return SharedHandlers
