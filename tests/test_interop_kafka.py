"""Kafka interop with real NestJS 12 (kafkajs 2.2.4), both ways, through one broker:
a Python client calling a Nest server, and a Nest client calling a nestpy_mini server.

Every check runs in both directions against the same expectations, with
Kafka's own rules, which are Nest's too:

- A Kafka topic name has only ASCII letters, digits, ``.``, ``_`` and ``-``,
  so no object pattern can be a topic: on Kafka, ``server.mjs`` answers
  ``{cmd: X}`` as ``'cmd.X'`` and does not serve the mixed-key pattern, and
  ``KafkaInteropController`` below is ``interop_app``'s controller with those
  patterns.  Our client refuses an object pattern up front, whatever its key order.
- A number travels as its text and comes back a string (``"6"``).
- A reply with no value is a record with a null value.  Nest's client
  delivers that null as a value; ours completes without one (see
  ``nestpy_mini.transports.kafka``), so ``nothing`` differs by caller.
- Nobody consumes an unknown pattern's topic, so nothing answers: the caller
  times out, which our client does quickly with a short per-call timeout.
"""

from __future__ import annotations

import asyncio
import random
import secrets
from collections.abc import AsyncIterator, Callable
from typing import Any, ClassVar

import pytest
import pytest_asyncio
from interop_app import MIXED
from nest_harness import NestClient, NestServer, nest_missing

from nestpy_mini import (
    BaseRpcContext,
    ClientProxyFactory,
    Controller,
    EventPattern,
    MessagePattern,
    Module,
    NestFactory,
    RequestTimeoutError,
    RpcError,
    RpcException,
    Transport,
)

pytestmark = [
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(nest_missing() is not None, reason=str(nest_missing())),
]

RUN = secrets.token_hex(3)
NON_ASCII = {"名字": "张三", "emoji": "😀🚀", "nested": [{"深": ["层", {"é": 1.5}]}, None, True]}


@Controller()
class KafkaInteropController:
    """``interop_app.InteropController`` with the Kafka patterns of ``server.mjs``."""

    def __init__(self) -> None:
        self.received: list[Any] = []

    @MessagePattern("cmd.sum")
    def sum(self, data: list[int]) -> int:
        return sum(data or [])

    @MessagePattern("cmd.echo")
    def echo(self, data: Any) -> Any:
        return data

    @MessagePattern("ping")
    def ping(self) -> str:
        return "pong"

    @MessagePattern("cmd.nothing")
    def nothing(self, data: Any) -> None:
        return None

    @MessagePattern("cmd.stream")
    async def stream(self, n: str) -> AsyncIterator[int]:
        for i in range(1, int(n or 0) + 1):
            await asyncio.sleep(0.005)
            yield i

    @MessagePattern("cmd.stream_err")
    async def stream_err(self, data: Any) -> AsyncIterator[int]:
        yield 1
        await asyncio.sleep(0.005)
        raise RpcException("mid-stream")

    @MessagePattern("cmd.rpc_str")
    def rpc_str(self, data: Any) -> None:
        raise RpcException("bad thing")

    @MessagePattern("cmd.rpc_obj")
    def rpc_obj(self, data: Any) -> None:
        raise RpcException({"code": 42, "message": "custom"})

    @MessagePattern("cmd.boom")
    def boom(self, data: Any) -> None:
        raise RuntimeError("secret detail")

    @MessagePattern("cmd.async_sum")
    async def async_sum(self, data: list[int]) -> int:
        await asyncio.sleep(random.uniform(0.001, 0.01))
        return sum(data or [])

    @MessagePattern("cmd.ctx")
    def ctx(self, data: Any, ctx: BaseRpcContext) -> str:
        return ctx.get_topic()  # type: ignore[attr-defined]

    @EventPattern("user_created")
    def user_created(self, data: Any) -> None:
        self.received.append(data)

    @EventPattern("user_created")
    def user_created_second(self, data: Any) -> None:
        self.received.append({"second": data})

    @MessagePattern("cmd.events")
    def events(self, data: Any) -> list[Any]:
        return self.received


@Module(controllers=[KafkaInteropController])
class KafkaInteropModule:
    pass


def python_client(url: str, timeout: float = 5) -> Any:
    return ClientProxyFactory.create(
        Transport.KAFKA, {"client": {"brokers": url}, "timeout": timeout}
    )


class PythonCaller:
    """nestpy_mini's Kafka client, calling the Nest server."""

    nothing: ClassVar[list[Any]] = []  # None completes with no value

    def __init__(self, url: str, group: str) -> None:
        self.url = url
        self.group = group  # the Nest server's consumer group
        self.client = python_client(url)

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
    """Nest's own ClientKafka, calling the nestpy_mini server."""

    nothing: ClassVar[list[Any]] = [None]  # Nest's client delivers the last record's null

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
    url = broker_url("kafka")
    group = f"interop-{request.param[:2]}-{RUN}"
    if request.param == "python->nest":
        server = await NestServer("kafka", url=url, group=group).start()
        py = PythonCaller(url, group)
        yield py
        await py.close()
        await server.stop()
    else:
        app = await NestFactory.create_microservice(
            KafkaInteropModule,
            transport=Transport.KAFKA,
            options={"client": {"brokers": url}, "consumer": {"group_id": group}},
        )
        await app.start()
        nest = NestCaller(await NestClient("kafka", url=url, group=group).start(), url)
        yield nest
        await nest.close()
        await app.close()


async def test_request_response(caller: Caller) -> None:
    assert await caller.send("cmd.sum", [1, 2, 3]) == (["6"], None)
    assert await caller.send("ping", {}) == (["pong"], None)
    assert await caller.send("cmd.async_sum", [5, 5]) == (["10"], None)
    assert await caller.send("cmd.nothing", 1) == (caller.nothing, None)


async def test_nested_non_ascii_payload(caller: Caller) -> None:
    assert await caller.send("cmd.echo", NON_ASCII) == ([NON_ASCII], None)
    long_text = "中文😀" * 2000
    assert await caller.send("cmd.echo", long_text) == ([long_text], None)


async def test_streamed_reply(caller: Caller) -> None:
    assert await caller.send("cmd.stream", 4) == (["1", "2", "3", "4"], None)
    assert await caller.send("cmd.stream_err", 0) == (
        ["1"],
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
    assert await caller.send(f"cmd.{cmd}", 1) == ([], err)


async def test_unknown_pattern_gets_no_reply(caller: Caller) -> None:
    """Checked with our client both ways: Nest's would wait forever."""
    client = caller.client if isinstance(caller, PythonCaller) else python_client(caller.url)
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        with pytest.raises(RequestTimeoutError):
            await client.send("cmd.no_such_cmd", 1, timeout=0.3)
        assert loop.time() - started < 1.5
    finally:
        if isinstance(caller, NestCaller):
            await client.close()


async def test_object_patterns_cannot_be_kafka_topics(caller: Caller) -> None:
    client = caller.client if isinstance(caller, PythonCaller) else python_client(caller.url)
    try:
        for pattern in (MIXED, dict(reversed(list(MIXED.items())))):
            with pytest.raises(ValueError, match="Kafka refuses"):
                await client.send(pattern, 0)
    finally:
        if isinstance(caller, NestCaller):
            await client.close()


async def test_context_topic(caller: Caller) -> None:
    assert await caller.send("cmd.ctx", 1) == (["cmd.ctx"], None)


async def test_events_reach_every_handler(caller: Caller) -> None:
    await caller.emit("user_created", {"userId": "u1", "name": "李四 🎉"})
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while True:
        values, err = await caller.send("cmd.events", 1)
        if len(values[0]) >= 2 or loop.time() > deadline:
            break
        await asyncio.sleep(0.02)
    assert err is None
    first = {"userId": "u1", "name": "李四 🎉"}
    assert values[0][-2:] == [first, {"second": first}]


async def test_500_concurrent_requests(caller: Caller) -> None:
    datas = [[i, i * 10, -3] for i in range(500)]
    assert await caller.many("cmd.sum", datas) == [str(i * 11 - 3) for i in range(500)]


@Controller()
class PythonInstanceController(KafkaInteropController):
    """The same service, telling its answers apart from the Nest instance's."""

    @MessagePattern("cmd.ctx")
    def ctx(self, data: Any, ctx: BaseRpcContext) -> str:
        return "py:" + ctx.get_topic()  # type: ignore[attr-defined]


@Module(controllers=[PythonInstanceController])
class PythonInstanceModule:
    pass


async def test_nest_and_python_instances_share_one_group(caller: Caller) -> None:
    """kafkajs offers only its "RoundRobinAssigner"; our server offers it too, so
    a Nest instance and a nestpy_mini instance of one service split the partitions.

    It joins the group of the Nest server of "python->nest", so it runs once,
    last in that pass; with "nest->python" there is no Nest server to join.
    """
    if not isinstance(caller, PythonCaller):
        return
    app = await NestFactory.create_microservice(
        PythonInstanceModule,
        transport=Transport.KAFKA,
        options={"client": {"brokers": caller.url}, "consumer": {"group_id": caller.group}},
    )
    topic = "cmd.ctx"
    try:
        await app.start()
        server = app.server
        count = len(await caller.client.partitions_for(topic))
        assert count > 1, f"{topic} has one partition: the broker's default must be raised"

        def ours() -> set[int]:
            return {p for t, p in server.assignment if t == topic}  # type: ignore[attr-defined]

        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not 0 < len(ours()) < count:
            assert loop.time() < deadline, "the group never split the partitions"
            await asyncio.sleep(0.05)
        answers = [
            await caller.client.send(topic, {"value": 1, "partition": p}) for p in range(count)
        ]
        assert answers == ["py:cmd.ctx" if p in ours() else "cmd.ctx" for p in range(count)]
    finally:
        await app.close()
