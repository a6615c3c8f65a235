"""The chapter's promise: one AppController, any transport, by changing one option.

The same module answers ``send({"cmd": "sum"}, [1, 2, 3])`` with ``6`` and
receives ``emit("user_created", ...)`` over every transport.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from typing import Any

import pytest
from conftest import wait_until

from nestpy_mini import (
    ClientProxyFactory,
    Controller,
    EventPattern,
    MessagePattern,
    Module,
    NestFactory,
    Transport,
)
from nestpy_mini.dev import brokers

created: list[Any] = []


@Controller()
class AppController:
    @MessagePattern({"cmd": "sum"})
    @MessagePattern("math.sum")  # Kafka topics cannot hold '{', '"' or ':'
    def sum(self, data: list[int]) -> int:
        return sum(data or [])

    @EventPattern("user_created")
    def handle_user_created(self, data: dict[str, Any]) -> None:
        created.append(data)


@Module(controllers=[AppController])
class AppModule:
    pass


def options_for(transport: Transport, broker_url: Callable[[str], str]) -> dict[str, Any]:
    """The one thing that changes per transport: where the messages go."""
    if transport is Transport.TCP:
        return {"port": 0}
    if transport is Transport.REDIS:
        return {"url": broker_url("redis")}
    if transport is Transport.NATS:
        return {"servers": broker_url("nats")}
    if transport is Transport.MQTT:
        return {"url": broker_url("mqtt")}
    if transport is Transport.KAFKA:
        return brokers.kafka_options(broker_url("kafka"))
    queue = f"nestpy_sum_{secrets.token_hex(4)}"  # private to this test run
    return {
        "urls": [broker_url("rmq")],
        "queue": queue,
        "queue_options": {"durable": False, "auto_delete": True},
    }


@pytest.mark.parametrize(
    "transport",
    [
        Transport.TCP,
        Transport.REDIS,
        Transport.NATS,
        Transport.MQTT,
        Transport.RMQ,
        Transport.KAFKA,
    ],
    ids=lambda t: t.name,
)
async def test_same_controller_over_every_transport(
    transport: Transport, broker_url: Callable[[str], str]
) -> None:
    created.clear()
    # Kafka carries string patterns only, and, as in Nest, a reply that is a
    # bare number arrives as its text: kafka-parser parses only '{' and '['.
    pattern: Any = "math.sum" if transport is Transport.KAFKA else {"cmd": "sum"}
    six: Any = "6" if transport is Transport.KAFKA else 6
    options = options_for(transport, broker_url)
    app = await NestFactory.create_microservice(AppModule, transport=transport, options=options)
    await app.start()
    if transport is Transport.TCP:
        options = {"port": app.server.port}
    client = ClientProxyFactory.create(transport, {**options, "timeout": 5})
    try:
        assert await client.send(pattern, [1, 2, 3]) == six
        await client.emit("user_created", {"userId": "42"})
        await wait_until(lambda: created == [{"userId": "42"}], within=10)
        results = await asyncio.gather(*(client.send(pattern, [i, i]) for i in range(50)))
        assert [int(r) for r in results] == [2 * i for i in range(50)]
    finally:
        await client.close()
        await app.close()
