"""Kafka-only interop with real NestJS 12 (kafkajs 2.2.4); the checks every
transport shares, with Kafka's own expectations, are in ``test_interop.py``.
"""

from __future__ import annotations

import asyncio
import functools
import secrets
from collections.abc import Callable
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from support.interop_app import interop_controller, interop_module
from support.interop_callers import start_all
from support.nest import NestClient, NestServer, nest_missing

from nestpy_mini import (
    BaseRpcContext,
    ClientProxyFactory,
    Controller,
    MessagePattern,
    NestFactory,
    Transport,
)
from nestpy_mini.dev import brokers

pytestmark = [
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(nest_missing() is not None, reason=str(nest_missing())),
]


@Controller()
class PythonInstanceController(interop_controller("kafka")):  # type: ignore[misc]
    """The same service, telling its answers apart from the Nest instance's."""

    @MessagePattern("cmd.ctx")
    def ctx(self, data: Any, ctx: BaseRpcContext) -> str:
        return "py:" + ctx.get_topic()  # type: ignore[attr-defined]


async def test_nest_and_python_instances_share_one_group(
    broker_url: Callable[[str], str],
) -> None:
    """kafkajs offers only its "RoundRobinAssigner"; our server offers it too, so
    a Nest instance and a nestpy_mini instance of one service split the partitions."""
    url = broker_url("kafka")
    group = f"nestpy_interop_{secrets.token_hex(5)}"
    topic = "cmd.ctx"
    server = NestServer("kafka", url=url, group=group)
    app = await NestFactory.create_microservice(
        interop_module("kafka", PythonInstanceController),
        transport=Transport.KAFKA,
        options=brokers.kafka_options(url, consumer={"group_id": group}),
    )
    client = ClientProxyFactory.create(Transport.KAFKA, brokers.kafka_options(url, timeout=5))
    try:
        # Side by side: each start joins the group, which takes a second or more.
        await start_all(server.start(), app.start())
        probe = AIOKafkaProducer(bootstrap_servers=url)
        await probe.start()
        try:
            count = len(await probe.partitions_for(topic))
        finally:
            await probe.stop()
        assert count > 1, f"{topic} has one partition: the broker's default must be raised"

        def ours() -> set[int]:
            return {p for t, p in app.server.assignment if t == topic}  # type: ignore[attr-defined]

        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not 0 < len(ours()) < count:
            assert loop.time() < deadline, "the group never split the partitions"
            await asyncio.sleep(0.05)
        answers = [await client.send(topic, {"value": 1, "partition": p}) for p in range(count)]
        assert answers == ["py:cmd.ctx" if p in ours() else "cmd.ctx" for p in range(count)]
    finally:
        await client.close()
        await app.close()
        await server.stop()


async def test_a_null_reply_is_one_null_value_for_both_clients(
    broker_url: Callable[[str], str],
) -> None:
    """A Nest server answering null (``cmd.null``) or undefined (``cmd.nothing``)
    sends one reply record with no value.  Nest's own client emits one null for
    it, so ours emits one None, whether iterated or subscribed."""
    url = broker_url("kafka")
    commands = ["cmd.null", "cmd.nothing"]
    server = NestServer("kafka", url=url, group=f"nestpy_null_{secrets.token_hex(5)}")
    nest = NestClient("kafka", url=url, **{"kafka-patterns": ",".join(commands)})
    client = ClientProxyFactory.create(Transport.KAFKA, brokers.kafka_options(url, timeout=5))
    # Nest's client is given a partition of a reply topic only if the topic is
    # complete when its group forms: these are new, so they are made first.
    maker = AIOKafkaProducer(bootstrap_servers=url)
    await maker.start()
    try:
        for topic in (*commands, *(command + ".reply" for command in commands)):
            await maker.partitions_for(topic)
    finally:
        await maker.stop()
    try:
        await start_all(server.start(), nest.start())
        for command in commands:
            answer = await nest.send(command, 1)
            assert (answer["values"], answer["error"]) == ([None], None)
            assert [value async for value in client.send(command, 1)] == [None]
            seen: list[Any] = []
            note = seen.append
            await client.send(command, 1).subscribe(note, note, functools.partial(note, "done"))
            assert seen == [None, "done"]
    finally:
        await client.close()
        await nest.stop()
        await server.stop()
