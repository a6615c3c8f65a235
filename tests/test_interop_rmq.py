"""RabbitMQ interop with real NestJS 12, both ways: a Python client calling a
Nest server, and a Nest client calling a nestpy_mini server.

Every check runs in both directions against the same expectations.  The Nest
peers declare their queue with Nest's default ``queueOptions`` (``{}``, which
amqplib makes durable), so the Python side declares it the same way and the
queue is deleted once the module is done.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aio_pika
import pytest
import pytest_asyncio
from interop_app import MIXED, InteropModule
from nest_harness import NestClient, NestServer, nest_missing

from nestpy_mini import ClientProxyFactory, NestFactory, RpcError, Transport
from nestpy_mini.exceptions import NO_MESSAGE_HANDLER

pytestmark = [
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(nest_missing() is not None, reason=str(nest_missing())),
]

NON_ASCII = {"名字": "张三", "emoji": "😀🚀", "nested": [{"深": ["层", {"é": 1.5}]}, None, True]}


class PythonCaller:
    """nestpy_mini's RMQ client, calling the Nest server."""

    def __init__(self, url: str, queue: str) -> None:
        options = {"urls": [url], "queue": queue, "timeout": 5}
        self.client = ClientProxyFactory.create(Transport.RMQ, options)

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
    """Nest's own ClientRMQ, calling the nestpy_mini server."""

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


async def _delete_queue(url: str, queue: str) -> None:
    async with await aio_pika.connect(url, timeout=5) as conn:
        channel = await conn.channel()
        await channel.queue_delete(queue, if_unused=False, if_empty=False)


@pytest.fixture(scope="module")
def amqp_url(broker_url: Callable[[str], str]) -> str:
    return broker_url("rmq")


@pytest_asyncio.fixture(
    scope="module", loop_scope="module", params=["python->nest", "nest->python"]
)
async def caller(
    request: pytest.FixtureRequest, amqp_url: str
) -> AsyncIterator[PythonCaller | NestCaller]:
    queue = f"nestpy_interop_{uuid.uuid4().hex[:10]}"
    try:
        if request.param == "python->nest":
            server = await NestServer("rmq", url=amqp_url, queue=queue).start()
            py = PythonCaller(amqp_url, queue)
            yield py
            await py.close()
            await server.stop()
        else:
            app = await NestFactory.create_microservice(
                InteropModule,
                transport=Transport.RMQ,
                options={"urls": [amqp_url], "queue": queue},  # durable, as Nest's {} is
            )
            await app.start()
            nest = NestCaller(await NestClient("rmq", url=amqp_url, queue=queue).start())
            yield nest
            await nest.close()
            await app.close()
    finally:
        await _delete_queue(amqp_url, queue)


async def test_request_response(caller: PythonCaller | NestCaller) -> None:
    assert await caller.send({"cmd": "sum"}, [1, 2, 3]) == ([6], None)
    assert await caller.send("ping", {}) == (["pong"], None)
    assert await caller.send({"cmd": "async_sum"}, [5, 5]) == ([10], None)
    # None (undefined in Nest) completes with no value at all, not with null.
    assert await caller.send({"cmd": "nothing"}, 1) == ([], None)


async def test_nested_non_ascii_payload(caller: PythonCaller | NestCaller) -> None:
    assert await caller.send({"cmd": "echo"}, NON_ASCII) == ([NON_ASCII], None)
    long_text = "中文😀" * 2000
    assert await caller.send({"cmd": "echo"}, long_text) == ([long_text], None)
    if isinstance(caller, PythonCaller):
        # Well past one AMQP frame (128 KiB).  Only this way round: the Nest
        # harness reads its client's answers as lines of at most 64 KiB.
        huge = "中文😀" * 50_000
        assert await caller.send({"cmd": "echo"}, huge) == ([huge], None)


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
        # Unlike Redis and MQTT, an RMQ server answers an unknown pattern.
        ("no_such_cmd", NO_MESSAGE_HANDLER),
    ],
)
async def test_error_kinds(caller: PythonCaller | NestCaller, cmd: str, err: Any) -> None:
    assert await caller.send({"cmd": cmd}, 1) == ([], err)


async def test_object_pattern_keys_in_any_order(caller: PythonCaller | NestCaller) -> None:
    reordered = dict(reversed(list(MIXED.items())))
    assert await caller.send(reordered, 0) == (["mixed"], None)
    # A pattern sent as an already-normalized string finds the same handler.
    assert await caller.send('{"cmd":"sum"}', [2, 3]) == ([5], None)


async def test_context_pattern(caller: PythonCaller | NestCaller) -> None:
    # RmqContext.getPattern(): JSON.stringify of the pattern as sent.
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
