"""The Python twin of ``tests/nest/server.mjs``: the same patterns, the same answers.

Each interop test runs once against the Nest server and once against this
one, so the two must stay handler-for-handler alike.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

from nestpy_mini import (
    BaseRpcContext,
    Controller,
    EventPattern,
    MessagePattern,
    Module,
    RpcException,
)

MIXED = {"Zeta_1": "z", "alpha": "a", "_under": "u", "B2": "b", "a10": "x", "a9": "y"}


@Controller()
class InteropController:
    def __init__(self) -> None:
        self.received: list[Any] = []

    @MessagePattern({"cmd": "sum"})
    def sum(self, data: list[int]) -> int:
        return sum(data or [])

    @MessagePattern({"cmd": "echo"})
    def echo(self, data: Any) -> Any:
        return data

    @MessagePattern("ping")
    def ping(self) -> str:
        return "pong"

    @MessagePattern({"cmd": "nothing"})
    def nothing(self, data: Any) -> None:
        return None

    @MessagePattern({"cmd": "stream"})
    async def stream(self, n: int) -> AsyncIterator[int]:
        for i in range(1, int(n or 0) + 1):
            await asyncio.sleep(0.005)
            yield i

    @MessagePattern({"cmd": "stream_err"})
    async def stream_err(self, data: Any) -> AsyncIterator[int]:
        yield 1
        await asyncio.sleep(0.005)
        raise RpcException("mid-stream")

    @MessagePattern({"cmd": "rpc_str"})
    def rpc_str(self, data: Any) -> None:
        raise RpcException("bad thing")

    @MessagePattern({"cmd": "rpc_obj"})
    def rpc_obj(self, data: Any) -> None:
        raise RpcException({"code": 42, "message": "custom"})

    @MessagePattern({"cmd": "boom"})
    def boom(self, data: Any) -> None:
        raise RuntimeError("secret detail")

    @MessagePattern({"cmd": "async_sum"})
    async def async_sum(self, data: list[int]) -> int:
        await asyncio.sleep(random.uniform(0.001, 0.01))
        return sum(data or [])

    @MessagePattern(MIXED)
    def mixed(self, data: Any) -> str:
        return "mixed"

    @MessagePattern({"cmd": "ctx"})
    def ctx(self, data: Any, ctx: BaseRpcContext) -> str:
        for getter in ("get_pattern", "get_channel", "get_subject", "get_topic"):
            if hasattr(ctx, getter):
                return getattr(ctx, getter)()
        raise RpcException("context without a pattern getter")

    @EventPattern("user_created")
    def user_created(self, data: Any) -> None:
        self.received.append(data)

    @EventPattern("user_created")
    def user_created_second(self, data: Any) -> None:
        self.received.append({"second": data})

    @MessagePattern({"cmd": "events"})
    def events(self, data: Any) -> list[Any]:
        return self.received


@Module(controllers=[InteropController])
class InteropModule:
    pass
