"""Both sides of the NestJS interop tests, for every transport.

A *caller* sends the interop commands one way: ``python->nest`` is
nestpy_mini's client calling a real Nest server (``nestpy_mini/dev/nest/server.mjs``),
``nest->python`` is Nest's own client (``client.mjs``) calling a nestpy_mini
server of ``interop_app``.  Both answer ``send`` with ``(values, error)``, so
one test body checks both directions against the same expectations.

What differs between transports is Nest's own behaviour, and it is written
once, in ``KINDS``; everything a test needs to know about a transport is there.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aio_pika
from redis.asyncio import Redis

from nestpy_mini import ClientProxy, ClientProxyFactory, NestFactory, RpcError, Transport
from nestpy_mini.dev import brokers
from nestpy_mini.packets import EMPTY_RESPONSE, NO_MESSAGE_HANDLER

from .interop_app import command, interop_module
from .nest import NestClient, NestServer

PY_TO_NEST = "python->nest"
NEST_TO_PY = "nest->python"
DIRECTIONS = (PY_TO_NEST, NEST_TO_PY)
NO_REPLY = "no reply: nobody listens, so the caller can only time out"
SUBSCRIBE_WITHIN = 10.0
BROKER_TIMEOUT = 5.0  # for the tests' own broker commands: none may hang a run


async def redis_subscribers(url: str, channel: str) -> int:
    """How many clients subscribe ``channel``: Redis's broker can say, by PUBSUB NUMSUB."""
    redis = Redis.from_url(url, protocol=2, socket_timeout=BROKER_TIMEOUT)
    try:
        [(_, count)] = await redis.pubsub_numsub(channel)
        return int(count)
    finally:
        await redis.aclose()


@dataclass(frozen=True)
class Kind:
    """One transport, and each place where Nest's behaviour on it differs."""

    name: str
    transport: Transport
    #: What an unknown pattern gets: the error every server replies with, or
    #: NO_REPLY where no server subscribes it (and Nest's client, which has no
    #: timeout of its own, would wait for ever, so ours checks it both ways).
    unknown: str
    #: Where nobody subscribes, the broker says so (a Redis PUBLISH count of 0), and our
    #: client fails at once with NoRespondersError instead of timing out.
    nobody_fails_fast: bool = False
    #: Kafka: a number travels as its text, and an object pattern cannot be a
    #: topic (``{cmd: X}`` is ``"cmd.X"``; the mixed-key handler is not served).
    kafka_names: bool = False
    #: Kafka: a reply with no value is a record with a null value, which Nest's
    #: client delivers as a value where ours completes without one.
    nest_delivers_null: bool = False
    #: Kafka: Nest's server runs one handler at a time per partition (kafkajs's
    #: eachMessage), so 500 requests to the randomly slow ``async_sum`` would
    #: take seconds there; the concurrency check sends them to ``sum``.
    serial_handlers: bool = False
    #: NATS: Nest's client fails a send with an ``Error`` (printed by client.mjs
    #: as ``{message, name}``) where ours raises ``RpcError`` carrying the text.
    nest_error_objects: bool = False
    #: Where the broker can count a channel's subscribers (Redis), the proof
    #: that nobody listens to an unknown pattern.
    subscribers: Callable[[str, str], Awaitable[int]] | None = None

    def cmd(self, name: str) -> str | dict[str, str]:
        """The pattern of command ``name`` on this transport."""
        return command(self.name, name)

    def route(self, name: str) -> str:
        """The route (channel, subject, topic) Nest makes of ``self.cmd(name)``."""
        return f"cmd.{name}" if self.kafka_names else f'{{"cmd":"{name}"}}'

    def number(self, value: int) -> int | str:
        """``value`` as a caller receives it."""
        return str(value) if self.kafka_names else value


KINDS = {
    kind.name: kind
    for kind in (
        Kind("tcp", Transport.TCP, unknown=NO_MESSAGE_HANDLER),
        Kind("redis", Transport.REDIS, unknown=NO_REPLY, subscribers=redis_subscribers,
             nobody_fails_fast=True),
        Kind(
            "nats",
            Transport.NATS,
            # The broker's 503 no-responders, as Nest words it.
            unknown=EMPTY_RESPONSE.format('{"cmd":"no_such_cmd"}'),
            nest_error_objects=True,
        ),
        Kind("mqtt", Transport.MQTT, unknown=NO_REPLY),
        Kind("rmq", Transport.RMQ, unknown=NO_MESSAGE_HANDLER),
        Kind(
            "kafka",
            Transport.KAFKA,
            unknown=NO_REPLY,
            kafka_names=True,
            nest_delivers_null=True,
            serial_handlers=True,
        ),
    )
}


@dataclass
class Endpoint:
    """Where one caller's server is, in the option names of each side."""

    kind: Kind
    url: str  # the broker's; "" on TCP
    name: str  # the RMQ queue, the Kafka consumer group
    port: int = 0  # TCP: the server's, once it listens

    def options(self) -> dict[str, Any]:
        """nestpy_mini's options to reach it, for a client and a server alike."""
        match self.kind.name:
            case "tcp":
                return {"port": self.port}
            case "nats":
                return {"servers": self.url}
            case "rmq":
                # Durable, as Nest's default queueOptions ({}) make it in amqplib.
                return {"urls": [self.url], "queue": self.name}
            case "kafka":  # tuned as common.mjs tunes kafkajs, where the broker is Tansu
                return brokers.kafka_options(self.url)
            case _:
                return {"url": self.url}

    def server_options(self) -> dict[str, Any]:
        """A nestpy_mini server's options: Kafka's also name the consumer group."""
        if self.kind.name == "kafka":
            return brokers.kafka_options(self.url, consumer={"group_id": self.name})
        return self.options()

    def nest_args(self) -> dict[str, Any]:
        """The switches of server.mjs and client.mjs."""
        match self.kind.name:
            case "tcp":
                return {"host": "127.0.0.1", "port": self.port}
            case "rmq":
                return {"url": self.url, "queue": self.name}
            case "kafka":
                return {"url": self.url, "group": self.name}
            case _:
                return {"url": self.url}

    def python_client(self, timeout: float = 5) -> ClientProxy:
        """A new nestpy_mini client of this server; the caller closes it."""
        options = {**self.options(), "timeout": timeout}
        return ClientProxyFactory.create(self.kind.transport, options)


class PythonCaller:
    """nestpy_mini's client, calling the Nest server."""

    direction = PY_TO_NEST

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.kind = endpoint.kind
        self.client = endpoint.python_client()

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

    @asynccontextmanager
    async def python_client(self) -> AsyncIterator[ClientProxy]:
        """Our client against this server: the caller's own."""
        yield self.client

    async def close(self) -> None:
        await self.client.close()


class NestCaller:
    """Nest's own ClientProxy, calling the nestpy_mini server."""

    direction = NEST_TO_PY

    def __init__(self, endpoint: Endpoint, client: NestClient) -> None:
        self.endpoint = endpoint
        self.kind = endpoint.kind
        self.client = client

    async def send(self, pattern: Any, data: Any) -> tuple[list[Any], Any]:
        answer = await self.client.send(pattern, data)
        error = answer["error"]
        if self.kind.nest_error_objects and isinstance(error, dict):
            if error.keys() == {"message", "name"}:
                error = error["message"]
        return answer["values"], error

    async def emit(self, pattern: Any, data: Any) -> None:
        assert (await self.client.emit(pattern, data))["ok"] is True

    async def many(self, pattern: Any, datas: list[Any]) -> list[Any]:
        answer = await self.client.command("send_many", pattern=pattern, datas=datas)
        assert answer["errors"] == [None] * len(datas)
        return answer["results"]

    @asynccontextmanager
    async def python_client(self) -> AsyncIterator[ClientProxy]:
        """Our client against this server, for what Nest's client cannot check
        (it has no timeout of its own); closed on exit."""
        client = self.endpoint.python_client()
        try:
            yield client
        finally:
            await client.close()


Caller = PythonCaller | NestCaller


async def until_subscribed(url: str) -> None:
    """Wait until every channel of a Redis ``interop_app`` server has a subscriber.

    Nest's server prints READY before ioredis has its SUBSCRIBEs confirmed,
    and a request published before that is lost (pub/sub is at most once).
    """
    app = await NestFactory.create_microservice(
        interop_module("redis"), transport=Transport.REDIS, options={"url": url}
    )
    await app.close()  # never started: only the handler table was wanted
    channels: list[str] = app.server.patterns
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SUBSCRIBE_WITHIN
    redis = Redis.from_url(url, protocol=2, socket_timeout=BROKER_TIMEOUT)
    try:
        while not all(count > 0 for _, count in await redis.pubsub_numsub(*channels)):
            if loop.time() > deadline:
                raise AssertionError(
                    f"the Nest server did not subscribe within {SUBSCRIBE_WITHIN} s"
                )
            await asyncio.sleep(0.02)
    finally:
        await redis.aclose()


async def start_all(*starts: Awaitable[Any]) -> None:
    """Await start-ups side by side.  Each is bounded, and a failure is raised
    only once all have ended, so none is left starting with nobody to stop it."""
    for outcome in await asyncio.gather(*starts, return_exceptions=True):
        if isinstance(outcome, BaseException):
            raise outcome


async def delete_queue(url: str, queue: str) -> None:
    """Drop an RMQ queue that the peers declared durable, so none is left behind."""
    async with asyncio.timeout(2 * BROKER_TIMEOUT):
        async with await aio_pika.connect(url, timeout=BROKER_TIMEOUT) as conn:
            channel = await conn.channel()
            await channel.queue_delete(queue, if_unused=False, if_empty=False)


@asynccontextmanager
async def open_caller(kind_name: str, direction: str, url: str = "") -> AsyncIterator[Caller]:
    """Start the server of ``direction`` and yield the caller of the other side.

    Everything started is stopped on exit, in reverse order, even when a
    later step fails; every wait in here is bounded (see nest_harness).
    """
    kind = KINDS[kind_name]
    endpoint = Endpoint(kind, url, name=f"nestpy_interop_{secrets.token_hex(5)}")
    async with AsyncExitStack() as stack:
        if kind.name == "rmq":
            stack.push_async_callback(delete_queue, url, endpoint.name)
        caller: Caller
        if direction == PY_TO_NEST:
            server = await NestServer(kind.name, **endpoint.nest_args()).start()
            stack.push_async_callback(server.stop)
            endpoint.port = server.port
            if kind.name == "redis":
                await until_subscribed(url)
            caller = PythonCaller(endpoint)
            stack.push_async_callback(caller.close)
        else:
            app = await NestFactory.create_microservice(
                interop_module(kind.name),
                transport=kind.transport,
                options=endpoint.server_options(),
            )
            stack.push_async_callback(app.close)
            starts = [app.start()]  # on Redis, done once every SUBSCRIBE is confirmed
            if kind.name == "tcp":  # Nest's client needs the port our server gets
                await starts.pop()
                endpoint.port = app.server.port
            nest = NestClient(kind.name, **endpoint.nest_args())
            stack.push_async_callback(nest.stop)
            # Through a broker the two start side by side: on Kafka each joins
            # a consumer group, which takes a second or more.
            await start_all(*starts, nest.start())
            caller = NestCaller(endpoint, nest)
        yield caller
