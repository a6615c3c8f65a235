"""Redis interop with real NestJS 12, both ways, through a real broker: a Python
client calling a Nest server, and a Nest client calling a nestpy_mini server.

Every check runs in both directions against the same expectations.  The one
asymmetry is an unknown pattern: on Redis nobody subscribes to it, so no reply
ever comes and a caller can only time out; Nest's client has no timeout of
its own, so that case is checked with the Python client against both servers.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_asyncio
from interop_app import MIXED, InteropModule
from nest_harness import NestClient, NestServer, nest_missing
from redis.asyncio import Redis

from nestpy_mini import (
    ClientProxyFactory,
    NestFactory,
    NestMicroservice,
    RequestTimeoutError,
    RpcError,
    Transport,
)

pytestmark = [
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(nest_missing() is not None, reason=str(nest_missing())),
]

NON_ASCII = {"名字": "张三", "emoji": "😀🚀", "nested": [{"深": ["层", {"é": 1.5}]}, None, True]}
SUBSCRIBE_WITHIN = 10.0


class PythonCaller:
    """nestpy_mini's Redis client, calling whichever server listens."""

    def __init__(self, url: str) -> None:
        self.client = ClientProxyFactory.create(Transport.REDIS, {"url": url, "timeout": 5})

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
    """Nest's own Redis ClientProxy, calling the nestpy_mini server."""

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


async def interop_channels(url: str) -> list[str]:
    """The channels a server of ``InteropModule`` (or its twin, server.mjs) subscribes to."""
    app = await NestFactory.create_microservice(
        InteropModule, transport=Transport.REDIS, options={"url": url}
    )
    await app.close()  # never started: only the handler table was wanted
    return app.server.patterns


async def until_subscribed(raw: Redis, channels: list[str]) -> None:
    """Wait until every channel has a subscriber.

    Nest's server prints READY before ioredis has its SUBSCRIBEs confirmed,
    and a request published before that is lost (pub/sub is at most once).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SUBSCRIBE_WITHIN
    while True:
        counts = await raw.pubsub_numsub(*channels)
        if all(count > 0 for _, count in counts):
            return
        if loop.time() > deadline:
            raise AssertionError(f"the Nest server did not subscribe within {SUBSCRIBE_WITHIN} s")
        await asyncio.sleep(0.02)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def url(broker_url: Callable[[str], str]) -> str:
    return broker_url("redis")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def raw(url: str) -> AsyncIterator[Redis]:
    redis = Redis.from_url(url, protocol=2)
    yield redis
    await redis.aclose()


@pytest_asyncio.fixture(
    scope="module", loop_scope="module", params=["python->nest", "nest->python"]
)
async def caller(
    request: pytest.FixtureRequest, url: str, raw: Redis
) -> AsyncIterator[PythonCaller | NestCaller]:
    if request.param == "python->nest":
        server = await NestServer("redis", url=url).start()
        await until_subscribed(raw, await interop_channels(url))
        py = PythonCaller(url)
        yield py
        await py.close()
        await server.stop()
    else:
        app: NestMicroservice = await NestFactory.create_microservice(
            InteropModule, transport=Transport.REDIS, options={"url": url}
        )
        await app.start()  # returns once every SUBSCRIBE is confirmed
        nest = NestCaller(await NestClient("redis", url=url).start())
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
    long_text = "中文😀" * 2000  # a message of about 20 KB
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
    ],
)
async def test_error_kinds(caller: PythonCaller | NestCaller, cmd: str, err: Any) -> None:
    assert await caller.send({"cmd": cmd}, 1) == ([], err)


async def test_unknown_pattern_gets_no_reply(
    caller: PythonCaller | NestCaller, url: str, raw: Redis
) -> None:
    # Whichever server runs, it subscribed only to its handlers' channels...
    assert await raw.pubsub_numsub('{"cmd":"no_such_cmd"}') == [(b'{"cmd":"no_such_cmd"}', 0)]
    # ...so our client (against the same server) can only time out, and does so quickly.
    client = ClientProxyFactory.create(Transport.REDIS, {"url": url})
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        with pytest.raises(RequestTimeoutError):
            await client.send({"cmd": "no_such_cmd"}, 1, timeout=0.3)
    finally:
        await client.close()
    assert loop.time() - started < 1.5


async def test_object_pattern_keys_in_any_order(caller: PythonCaller | NestCaller) -> None:
    reordered = dict(reversed(list(MIXED.items())))
    assert await caller.send(reordered, 0) == (["mixed"], None)
    # A pattern sent as an already-normalized string finds the same handler.
    assert await caller.send('{"cmd":"sum"}', [2, 3]) == ([5], None)


async def test_context_channel(caller: PythonCaller | NestCaller) -> None:
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


async def test_500_concurrent_requests(caller: PythonCaller | NestCaller) -> None:
    datas = [[i, i * 10, -3] for i in range(500)]
    assert await caller.many({"cmd": "async_sum"}, datas) == [i * 11 - 3 for i in range(500)]
