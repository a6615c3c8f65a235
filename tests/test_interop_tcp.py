"""TCP interop with real NestJS 12, both ways: a Python client calling a Nest
server, and a Nest client calling a nestpy_mini server.

Every check runs in both directions against the same expectations, so the
two implementations cannot drift apart unnoticed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from interop_app import MIXED, InteropModule
from nest_harness import NestClient, NestServer, nest_missing

from nestpy_mini import ClientProxyFactory, NestFactory, RpcError, Transport

pytestmark = [
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(nest_missing() is not None, reason=str(nest_missing())),
]

NON_ASCII = {"名字": "张三", "emoji": "😀🚀", "nested": [{"深": ["层", {"é": 1.5}]}, None, True]}


class PythonCaller:
    """nestpy_mini's client, calling the Nest server."""

    def __init__(self, port: int) -> None:
        self.client = ClientProxyFactory.create(Transport.TCP, {"port": port, "timeout": 5})

    async def send(self, pattern: Any, data: Any) -> tuple[list[Any], Any]:
        values: list[Any] = []
        try:
            async for value in self.client.send(pattern, data):
                values.append(value)
        except RpcError as exc:
            return values, exc.error
        return values, None

    async def emit(self, pattern: Any, data: Any) -> None:
        await self.client.emit(pattern, data)

    async def many(self, pattern: Any, datas: list[Any]) -> list[Any]:
        return list(await asyncio.gather(*(self.client.send(pattern, d) for d in datas)))

    async def close(self) -> None:
        await self.client.close()


class NestCaller:
    """Nest's own ClientProxy, calling the nestpy_mini server."""

    def __init__(self, client: NestClient) -> None:
        self.client = client

    async def send(self, pattern: Any, data: Any) -> tuple[list[Any], Any]:
        answer = await self.client.send(pattern, data)
        return answer["values"], answer["error"]

    async def emit(self, pattern: Any, data: Any) -> None:
        assert (await self.client.emit(pattern, data))["ok"] is True

    async def many(self, pattern: Any, datas: list[Any]) -> list[Any]:
        answer = await self.client.command("send_many", pattern=pattern, datas=datas)
        assert answer["errors"] == [None] * len(datas)
        return answer["results"]

    async def close(self) -> None:
        await self.client.stop()


@pytest_asyncio.fixture(
    scope="module", loop_scope="module", params=["python->nest", "nest->python"]
)
async def caller(request: pytest.FixtureRequest) -> AsyncIterator[PythonCaller | NestCaller]:
    if request.param == "python->nest":
        server = await NestServer("tcp", host="127.0.0.1", port=0).start()
        py = PythonCaller(server.port)
        yield py
        await py.close()
        await server.stop()
    else:
        app = await NestFactory.create_microservice(
            InteropModule, transport=Transport.TCP, options={"port": 0}
        )
        await app.start()
        nest = NestCaller(await NestClient("tcp", host="127.0.0.1", port=app.server.port).start())
        yield nest
        await nest.close()
        await app.close()


async def test_request_response(caller: PythonCaller | NestCaller) -> None:
    assert await caller.send({"cmd": "sum"}, [1, 2, 3]) == ([6], None)
    assert await caller.send("ping", {}) == (["pong"], None)
    assert await caller.send({"cmd": "async_sum"}, [5, 5]) == ([10], None)
    # None (undefined in Nest) completes with no value at all, not with null.
    assert await caller.send({"cmd": "nothing"}, 1) == ([], None)


async def test_nested_non_ascii_payload(caller: PythonCaller | NestCaller) -> None:
    assert await caller.send({"cmd": "echo"}, NON_ASCII) == ([NON_ASCII], None)
    long_text = "中文😀" * 2000  # frames well past one socket read
    assert await caller.send({"cmd": "echo"}, long_text) == ([long_text], None)


async def test_streamed_reply(caller: PythonCaller | NestCaller) -> None:
    assert await caller.send({"cmd": "stream"}, 4) == ([1, 2, 3, 4], None)
    assert await caller.send({"cmd": "stream_err"}, 0) == (
        [1],
        {"status": "error", "message": "mid-stream"},
    )


@pytest.mark.parametrize(
    ("cmd", "err"),
    [
        ("rpc_str", {"status": "error", "message": "bad thing"}),
        ("rpc_obj", {"code": 42, "message": "custom"}),
        ("boom", {"status": "error", "message": "Internal server error"}),
        ("no_such_cmd", "There is no matching message handler defined in the remote service."),
    ],
)
async def test_error_kinds(caller: PythonCaller | NestCaller, cmd: str, err: Any) -> None:
    assert await caller.send({"cmd": cmd}, 1) == ([], err)


async def test_object_pattern_keys_in_any_order(caller: PythonCaller | NestCaller) -> None:
    reordered = dict(reversed(list(MIXED.items())))
    assert await caller.send(reordered, None or 0) == (["mixed"], None)
    # A pattern sent as an already-normalized string finds the same handler.
    assert await caller.send('{"cmd":"sum"}', [2, 3]) == ([5], None)


async def test_context_pattern(caller: PythonCaller | NestCaller) -> None:
    assert await caller.send({"cmd": "ctx"}, 1) == (['{"cmd":"ctx"}'], None)


async def test_events_reach_every_handler(caller: PythonCaller | NestCaller) -> None:
    await caller.emit("user_created", {"userId": "u1", "name": "李四 🎉"})
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while True:
        values, err = await caller.send({"cmd": "events"}, 1)
        if len(values[0]) >= 2 or loop.time() > deadline:
            break
        await asyncio.sleep(0.02)
    assert err is None
    first = {"userId": "u1", "name": "李四 🎉"}
    assert values[0][-2:] == [first, {"second": first}]


async def test_500_concurrent_requests_over_one_connection(
    caller: PythonCaller | NestCaller,
) -> None:
    datas = [[i, i * 10, -3] for i in range(500)]
    assert await caller.many({"cmd": "async_sum"}, datas) == [i * 11 - 3 for i in range(500)]
