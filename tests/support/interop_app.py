"""The Python twin of ``nestpy_mini/dev/nest/server.mjs``: the same patterns, the same answers.

Each interop test runs once against the Nest server and once against this
one, so the two must stay handler-for-handler alike.  Like ``server.mjs``,
the twin is built for a transport kind: on Kafka a ``{"cmd": X}`` handler
answers ``"cmd.X"`` and the mixed-key pattern is not served, because a Kafka
topic name holds only ASCII letters, digits, ``.``, ``_`` and ``-``.
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


def command(kind: str, name: str) -> str | dict[str, str]:
    """The pattern of the ``name`` command, as ``commandPattern`` in common.mjs makes it."""
    return f"cmd.{name}" if kind == "kafka" else {"cmd": name}


def interop_controller(kind: str) -> type:
    """The controller of ``server.mjs`` for ``kind``: a new class per call,
    since the patterns are fixed when the decorators run."""

    def cmd(name: str) -> str | dict[str, str]:
        return command(kind, name)

    @Controller()
    class InteropController:
        def __init__(self) -> None:
            self.received: list[Any] = []

        @MessagePattern(cmd("sum"))
        def sum(self, data: list[int]) -> int:
            return sum(data or [])

        @MessagePattern(cmd("echo"))
        def echo(self, data: Any) -> Any:
            return data

        @MessagePattern("ping")
        def ping(self) -> str:
            return "pong"

        @MessagePattern(cmd("nothing"))
        def nothing(self, data: Any) -> None:
            return None

        @MessagePattern(cmd("stream"))
        async def stream(self, n: int | str) -> AsyncIterator[int]:
            for i in range(1, int(n or 0) + 1):
                await asyncio.sleep(0.005)
                yield i

        @MessagePattern(cmd("stream_err"))
        async def stream_err(self, data: Any) -> AsyncIterator[int]:
            yield 1
            await asyncio.sleep(0.005)
            raise RpcException("mid-stream")

        @MessagePattern(cmd("rpc_str"))
        def rpc_str(self, data: Any) -> None:
            raise RpcException("bad thing")

        @MessagePattern(cmd("rpc_obj"))
        def rpc_obj(self, data: Any) -> None:
            raise RpcException({"code": 42, "message": "custom"})

        @MessagePattern(cmd("boom"))
        def boom(self, data: Any) -> None:
            raise RuntimeError("secret detail")

        @MessagePattern(cmd("async_sum"))
        async def async_sum(self, data: list[int]) -> int:
            await asyncio.sleep(random.uniform(0.001, 0.01))
            return sum(data or [])

        if kind != "kafka":

            @MessagePattern(MIXED)
            def mixed(self, data: Any) -> str:
                return "mixed"

        if kind == "kafka":  # server.mjs's null handler; None is Nest's null and undefined

            @MessagePattern(cmd("null"))
            def null(self, data: Any) -> None:
                return None

        @MessagePattern(cmd("ctx"))
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

        @MessagePattern(cmd("events"))
        def events(self, data: Any) -> list[Any]:
            return self.received

    return InteropController


def interop_module(kind: str, controller: type | None = None) -> type:
    """A module serving ``controller``, by default ``interop_controller(kind)``."""

    @Module(controllers=[controller or interop_controller(kind)])
    class InteropModule:
        pass

    return InteropModule
