"""MQTT interop with real NestJS 12, both ways, through one broker: a Python
client calling a Nest server, and a Nest client calling a nestpy_mini server.

Every check runs in both directions against the same expectations.  One
difference from TCP is Nest's own: an unknown pattern reaches no subscriber,
so nobody replies and the caller times out.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_asyncio
from interop_app import MIXED, InteropModule
from nest_harness import NestClient, NestServer, nest_missing

from nestpy_mini import (
    ClientProxyFactory,
    NestFactory,
    RequestTimeoutError,
    RpcError,
    Transport,
)

pytestmark = [
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(nest_missing() is not None, reason=str(nest_missing())),
]

NON_ASCII = {"名字": "张三", "emoji": "😀🚀", "nested": [{"深": ["层", {"é": 1.5}]}, None, True]}


class PythonCaller:
    """nestpy_mini's MQTT client, calling the Nest server."""

    def __init__(self, url: str) -> None:
        self.client = ClientProxyFactory.create(Transport.MQTT, {"url": url, "timeout": 5})

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
    """Nest's own ClientMqtt, calling the nestpy_mini server."""

    def __init__(self, client: NestClient, url: str) -> None:
        self.client = client
        self.url = url

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


Caller = PythonCaller | NestCaller


@pytest_asyncio.fixture(
    scope="module", loop_scope="module", params=["python->nest", "nest->python"]
)
async def caller(
    request: pytest.FixtureRequest, broker_url: Callable[[str], str]
) -> AsyncIterator[Caller]:
    url = broker_url("mqtt")
    if request.param == "python->nest":
        server = await NestServer("mqtt", url=url).start()
        py = PythonCaller(url)
        yield py
        await py.close()
        await server.stop()
    else:
        app = await NestFactory.create_microservice(
            InteropModule, transport=Transport.MQTT, options={"url": url}
        )
        await app.start()
        nest = NestCaller(await NestClient("mqtt", url=url).start(), url)
        yield nest
        await nest.close()
        await app.close()


async def test_request_response(caller: Caller) -> None:
    assert await caller.send({"cmd": "sum"}, [1, 2, 3]) == ([6], None)
    assert await caller.send("ping", {}) == (["pong"], None)
    assert await caller.send({"cmd": "async_sum"}, [5, 5]) == ([10], None)
    # None (undefined in Nest) completes with no value at all, not with null.
    assert await caller.send({"cmd": "nothing"}, 1) == ([], None)


async def test_nested_non_ascii_payload(caller: Caller) -> None:
    assert await caller.send({"cmd": "echo"}, NON_ASCII) == ([NON_ASCII], None)
    long_text = "中文😀" * 2000  # one message well past a socket read
    assert await caller.send({"cmd": "echo"}, long_text) == ([long_text], None)


async def test_streamed_reply(caller: Caller) -> None:
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
    ],
)
async def test_error_kinds(caller: Caller, cmd: str, err: Any) -> None:
    assert await caller.send({"cmd": cmd}, 1) == ([], err)


async def test_unknown_pattern_gets_no_reply(caller: Caller) -> None:
    """Neither server subscribes an unknown pattern, so nothing answers; our
    client says so with a RequestTimeoutError after its short timeout.  Against
    our server this is checked with our client: Nest's would wait forever."""
    url = caller.url if isinstance(caller, NestCaller) else None
    client = caller.client if isinstance(caller, PythonCaller) else None
    if client is None:
        client = ClientProxyFactory.create(Transport.MQTT, {"url": url})
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        with pytest.raises(RequestTimeoutError):
            await client.send({"cmd": "no_such_cmd"}, 1, timeout=0.3)
        assert loop.time() - started < 1.5
    finally:
        if isinstance(caller, NestCaller):
            await client.close()


async def test_object_pattern_keys_in_any_order(caller: Caller) -> None:
    reordered = dict(reversed(list(MIXED.items())))
    assert await caller.send(reordered, 0) == (["mixed"], None)
    # A pattern sent as an already-normalized string names the same topic.
    assert await caller.send('{"cmd":"sum"}', [2, 3]) == ([5], None)


async def test_context_topic(caller: Caller) -> None:
    assert await caller.send({"cmd": "ctx"}, 1) == (['{"cmd":"ctx"}'], None)


async def test_events_reach_every_handler(caller: Caller) -> None:
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


async def test_500_concurrent_requests(caller: Caller) -> None:
    datas = [[i, i * 10, -3] for i in range(500)]
    assert await caller.many({"cmd": "async_sum"}, datas) == [i * 11 - 3 for i in range(500)]
