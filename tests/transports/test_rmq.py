"""RabbitMQ transport against a real broker: every semantic TCP has, plus acks,
prefetch, nack of unhandled messages, wildcards, and a broker restart.

Each test uses its own queue (non-durable, auto-deleted where it can be) and
deletes what it created.  The restart test runs its own throwaway RabbitMQ
node (own ports, own epmd, own data dir) so the machine's broker is never
touched; it boots in the background while the other tests run.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aio_pika
import pytest
from conftest import wait_until
from support.apps import (
    shared_handlers,
)

from nestpy_mini import (
    ClientProxy,
    ClientProxyFactory,
    Controller,
    EventPattern,
    MessagePattern,
    Module,
    NestFactory,
    NestMicroservice,
    RpcError,
    Transport,
)
from nestpy_mini.dev import brokers
from nestpy_mini.packets import NO_MESSAGE_HANDLER
from nestpy_mini.patterns import _ROUTE_CACHE
from nestpy_mini.transports.rmq import (
    REPLY_QUEUE,
    RMQ_NO_EVENT_HANDLER,
    RMQ_NO_MESSAGE_HANDLER,
    RmqContext,
    RmqRecordBuilder,
    match_rmq_pattern,
)

events: list[Any] = []
arrivals: list[Any] = []
gates: dict[Any, asyncio.Event] = {}


@Controller()
class AppController(shared_handlers(lambda name: {"cmd": name}, lambda name: name)):
    @MessagePattern({"cmd": "sum"})
    def sum(self, data: list[int]) -> int:
        return sum(data or [])

    @MessagePattern({"cmd": "async_sum"})
    async def async_sum(self, data: list[int]) -> int:
        await asyncio.sleep(0.001)
        return sum(data)

    @MessagePattern({"cmd": "ctx"})
    def ctx(self, data: object, ctx: RmqContext) -> dict[str, Any]:
        message = ctx.get_message()
        return {
            "pattern": ctx.get_pattern(),
            "args_pattern": ctx.get_args()[2],
            "routing_key": message.routing_key,
            "headers": message.headers,
            "delivery_mode": int(message.delivery_mode or 0),
            "priority": message.priority,
            "reply_to": (message.reply_to or "")[:21],
            "channel_is_aio_pika": isinstance(ctx.get_channel_ref(), aio_pika.abc.AbstractChannel),
        }

    @MessagePattern("ping")
    def ping(self) -> str:
        return "pong"

    @MessagePattern("orders.*")
    def orders(self, data: object, ctx: RmqContext) -> str:
        return f"order {ctx.get_pattern()}"

    @EventPattern("user_created")
    def on_user_created(self, data: object) -> None:
        events.append(data)

    @EventPattern("user_created")
    async def also_on_user_created(self, data: object) -> None:
        events.append({"second": data})


@Module(controllers=[AppController])
class AppModule:
    pass


@Controller()
class AckController:
    """Handlers that ack by hand, for ``no_ack: False``."""

    @MessagePattern("held")
    async def held(self, data: Any, ctx: RmqContext) -> Any:
        arrivals.append(data)
        await asyncio.wait_for(gates[data].wait(), 5)
        await ctx.get_message().ack()
        return data

    @EventPattern("held_event")
    async def held_event(self, data: Any, ctx: RmqContext) -> None:
        arrivals.append(data)
        await ctx.get_message().ack()


@Module(controllers=[AckController])
class AckModule:
    pass


@pytest.fixture(autouse=True)
def _reset() -> None:
    events.clear()
    arrivals.clear()
    gates.clear()


class Rmq:
    """Servers, clients and raw connections on one broker; all removed at teardown."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.apps: list[NestMicroservice] = []
        self.clients: list[ClientProxy] = []
        self.raw: list[aio_pika.abc.AbstractConnection] = []
        self.queues: list[str] = []
        self.exchanges: list[str] = []

    def queue(self, prefix: str = "t") -> str:
        name = f"nestpy_{prefix}_{uuid.uuid4().hex[:10]}"
        self.queues.append(name)
        return name

    def options(self, queue: str, **extra: Any) -> dict[str, Any]:
        return {
            "urls": [self.url],
            "queue": queue,
            "queue_options": {"durable": False, "auto_delete": True},
            **extra,
        }

    async def serve(self, module: Any, options: dict[str, Any]) -> NestMicroservice:
        app = await NestFactory.create_microservice(
            module, transport=Transport.RMQ, options={"close_grace": 0.2, **options}
        )
        await app.start()
        self.apps.append(app)
        return app

    def client(self, options: dict[str, Any]) -> ClientProxy:
        client = ClientProxyFactory.create(Transport.RMQ, {"timeout": 3, **options})
        self.clients.append(client)
        return client

    async def connection(self) -> aio_pika.abc.AbstractConnection:
        conn = await aio_pika.connect(self.url, timeout=5)
        self.raw.append(conn)
        return conn

    async def cleanup(self, *, broker_may_be_down: bool = False) -> None:
        for client in self.clients:
            await client.close()
        for app in self.apps:
            await app.close()
        for conn in self.raw:
            await conn.close()
        if not (self.queues or self.exchanges):
            return
        try:
            async with await aio_pika.connect(self.url, timeout=5) as conn:
                channel = await conn.channel()
                for name in self.queues:
                    await channel.queue_delete(name, if_unused=False, if_empty=False)
                for name in self.exchanges:
                    await channel.exchange_delete(name)
        except ConnectionError:
            if not broker_may_be_down:  # a throwaway broker takes its queues with it
                raise


@pytest.fixture
async def rmq(broker_url: Callable[[str], str]) -> AsyncIterator[Rmq]:
    helper = Rmq(broker_url("rmq"))
    yield helper
    await helper.cleanup()


@pytest.fixture
async def client(rmq: Rmq) -> ClientProxy:
    queue = rmq.queue()
    await rmq.serve(AppModule, rmq.options(queue))
    return rmq.client(rmq.options(queue))


# --- the semantics every transport shares ------------------------------------


async def test_context_getters_and_publish_options(rmq: Rmq) -> None:
    queue = rmq.queue()
    await rmq.serve(AppModule, rmq.options(queue))
    client = rmq.client(rmq.options(queue, persistent=True, headers={"x-version": "1.0.0"}))
    record = RmqRecordBuilder(1).set_options({"headers": {"x-trace": "abc"}, "priority": 3}).build()
    assert await client.send({"cmd": "ctx"}, record) == {
        "pattern": '{"cmd":"ctx"}',
        "args_pattern": '{"cmd":"ctx"}',
        "routing_key": queue,
        "headers": {"x-version": "1.0.0", "x-trace": "abc"},
        "delivery_mode": 2,
        "priority": 3,
        "reply_to": "amq.rabbitmq.reply-to",
        "channel_is_aio_pika": True,
    }


async def test_prefetch_one_holds_the_next_message_until_the_ack(rmq: Rmq) -> None:
    queue = rmq.queue("prefetch")
    options = rmq.options(queue, no_ack=False, prefetch_count=1)
    await rmq.serve(AckModule, options)
    client = rmq.client(rmq.options(queue))
    gates.update({1: asyncio.Event(), 2: asyncio.Event()})
    first = asyncio.ensure_future(client.send("held", 1))
    await wait_until(lambda: arrivals == [1])
    second = asyncio.ensure_future(client.send("held", 2))
    await asyncio.sleep(0.3)
    assert arrivals == [1]  # the broker holds message 2 while 1 is unacked
    gates[1].set()
    assert await first == 1
    await wait_until(lambda: arrivals == [1, 2])
    gates[2].set()
    assert await second == 2


async def test_unhandled_messages_are_nacked_and_not_redelivered(
    rmq: Rmq, caplog: pytest.LogCaptureFixture
) -> None:
    queue = rmq.queue("nack")
    # Not auto-deleted: the queue must outlive the server to be inspected.
    options = {**rmq.options(queue, no_ack=False), "queue_options": {"durable": False}}
    app = await rmq.serve(AckModule, options)
    client = rmq.client(options)
    with caplog.at_level(logging.WARNING):
        with pytest.raises(RpcError) as info:  # requests still get the no-handler reply
            await client.send("nope", 1)
        assert info.value.error == NO_MESSAGE_HANDLER
        await client.emit("no_such_event", 1)
        await client.emit("held_event", 7)  # a handled event, acked by its handler
        await wait_until(lambda: arrivals == [7])
        await asyncio.sleep(0.2)  # time enough for a redelivery, were there one
    texts = [r.getMessage() for r in caplog.records]
    assert texts.count(f"{RMQ_NO_MESSAGE_HANDLER}nope") == 1
    assert texts.count(f"{RMQ_NO_EVENT_HANDLER}no_such_event") == 1
    # Closing the server would return unacked messages to the queue: none are left.
    await app.close()
    conn = await rmq.connection()
    declared = await (await conn.channel()).declare_queue(queue, passive=True)
    assert declared.declaration_result.message_count == 0


async def test_wildcards_route_through_a_topic_exchange(rmq: Rmq) -> None:
    queue = rmq.queue("wild")
    rmq.exchanges.append(queue)  # the exchange is named after the queue, and durable
    await rmq.serve(AppModule, rmq.options(queue, wildcards=True))
    client = rmq.client(rmq.options(queue, wildcards=True))
    assert await client.send("orders.created", 1) == "order orders.created"
    assert await client.send({"cmd": "sum"}, [2, 3]) == 5  # exact routes still win
    assert match_rmq_pattern("orders.#", "orders.a.b") and not match_rmq_pattern("a.*", "a.b.c")


async def test_rmq_queue_properties_and_bodies_are_nests(rmq: Rmq) -> None:
    """Requests carry reply_to and correlation_id = id; replies have no id but the
    no-handler one, in Nest's key order."""
    queue = rmq.queue("wire")
    await rmq.serve(AppModule, rmq.options(queue))
    conn = await rmq.connection()
    channel = await conn.channel()
    replies: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
    reply_to = await channel.get_queue("amq.rabbitmq.reply-to", ensure=False)
    await reply_to.consume(replies.put, no_ack=True)
    got = []
    for body in (
        b'{"pattern":{"cmd":"sum"},"data":[1,2,3],"id":"c262420878aeb8b5d8828"}',
        b'{"pattern":"nope","data":1,"id":"05d8e01de09abc8b9ea2d"}',
    ):
        corr = json.loads(body)["id"]
        message = aio_pika.Message(body, correlation_id=corr, reply_to="amq.rabbitmq.reply-to")
        await channel.default_exchange.publish(message, routing_key=queue)
        got.append(await asyncio.wait_for(replies.get(), 3))
        assert got[-1].correlation_id == corr
    first, second = got
    assert first.body == b'{"response":6,"isDisposed":true}'
    assert second.body == (
        b'{"id":"05d8e01de09abc8b9ea2d","err":"There is no matching message handler '
        b'defined in the remote service.","status":"error"}'
    )


async def test_client_wire_format_and_bad_replies(
    rmq: Rmq, caplog: pytest.LogCaptureFixture
) -> None:
    """A hand-made server: checks what the client sends, answers with junk first."""
    queue = rmq.queue("fake")
    conn = await rmq.connection()
    channel = await conn.channel()
    incoming = await channel.declare_queue(queue, durable=False, auto_delete=True)
    seen: list[aio_pika.abc.AbstractIncomingMessage] = []

    async def fake_server(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        seen.append(message)
        if message.reply_to is None:
            return
        exchange = channel.default_exchange
        for body, corr in (
            (b"not json", message.correlation_id),
            (b'{"response":666,"isDisposed":true}', "someone-else"),
            (b'{"foo":"bar"}', message.correlation_id),  # foreign: the response itself
        ):
            await exchange.publish(aio_pika.Message(body, correlation_id=corr), message.reply_to)

    await incoming.consume(fake_server, no_ack=True)
    client = rmq.client(rmq.options(queue))
    with caplog.at_level(logging.WARNING):
        assert await client.send({"cmd": "sum"}, [1, 2, 3]) == {"foo": "bar"}
    assert "that is not JSON" in caplog.text
    await client.emit("user_created", {"userId": "u1"})
    await wait_until(lambda: len(seen) == 2)
    request, event = seen
    body = json.loads(request.body)
    assert list(body) == ["pattern", "data", "id"]
    assert body["pattern"] == {"cmd": "sum"} and request.correlation_id == body["id"]
    assert request.reply_to is not None and request.reply_to.startswith("amq.rabbitmq.reply-to")
    assert request.delivery_mode == aio_pika.DeliveryMode.NOT_PERSISTENT
    assert event.body == b'{"pattern":"user_created","data":{"userId":"u1"}}'
    assert event.reply_to is None and event.correlation_id is None


async def test_bad_input_is_dropped_and_the_server_keeps_serving(
    client: ClientProxy, rmq: Rmq, caplog: pytest.LogCaptureFixture
) -> None:
    queue = client.queue  # type: ignore[attr-defined]
    conn = await rmq.connection()
    exchange = (await conn.channel()).default_exchange
    with caplog.at_level(logging.WARNING):
        for body in (
            b"not json",
            b"[1,2]",
            b'{"foo":1}',
            b'{"pattern":{"cmd":"sum"},"data":[1],"id":"no-reply-to"}',
            b'{"pattern":[1,true],"data":1,"id":"odd-pattern"}',
            b'{"pattern":NaN,"data":1}',  # not JSON, as JSON.parse has it
        ):
            await exchange.publish(aio_pika.Message(body), routing_key=queue)
        assert await client.send({"cmd": "sum"}, [2, 2]) == 4
    # One line each, in the base's words: a foreign object is an event with no
    # pattern, as Nest's deserializer reads it.
    assert caplog.text.count("that is not JSON") == 2
    assert caplog.text.count("it is not a JSON object") == 1
    assert caplog.text.count("dropped an event: no handler can match its pattern") == 1
    assert "has no reply_to" in caplog.text


async def test_connect_failures_are_clear_and_urls_fall_through(rmq: Rmq) -> None:
    dead = f"amqp://guest:secret@127.0.0.1:{brokers.free_port()}"
    lonely = rmq.client({"urls": [dead], "queue": rmq.queue(), "connect_timeout": 2})
    with pytest.raises(
        ConnectionError, match=r"cannot connect to rmq at amqp://guest:\*\*\*@"
    ) as info:
        await lonely.send("ping", 1)
    assert "secret" not in str(info.value)
    queue = rmq.queue()
    await rmq.serve(AppModule, rmq.options(queue))
    fallback = rmq.client({**rmq.options(queue), "urls": [dead, rmq.url]})
    assert await fallback.send("ping", 1) == "pong"
    # A queue declared differently elsewhere: the broker refuses, and we say why.
    odd = rmq.queue("odd")
    conn = await rmq.connection()
    await (await conn.channel()).declare_queue(odd, durable=False)
    with pytest.raises(ConnectionError, match=r"PRECONDITION_FAILED.*same queue_options"):
        await rmq.serve(AppModule, {"urls": [rmq.url], "queue": odd})
    with pytest.raises(ValueError, match="unknown queue_options: autoDelete"):
        rmq.client({"queue": "q", "queue_options": {"autoDelete": True}})


async def test_huge_patterns_from_the_queue_are_screened_before_routing(
    rmq: Rmq, caplog: pytest.LogCaptureFixture
) -> None:
    """Any client of the queue picks the pattern that the server routes.  Routing
    sorts a pattern's keys at Python speed: unscreened, a 3 MB key held the loop
    for about half a second per message.  Screened as on TCP, such a pattern is answered
    unrouted, never cached, and the loop keeps turning."""
    queue = rmq.queue("screen")
    await rmq.serve(AppModule, rmq.options(queue))
    good = rmq.client(rmq.options(queue))
    assert await good.send("ping", 1) == "pong"
    channel = await (await rmq.connection()).channel()
    replies: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
    await (await channel.get_queue(REPLY_QUEUE, ensure=False)).consume(replies.put, no_ack=True)
    loop = asyncio.get_running_loop()
    stall = [0.0]

    async def watch_the_loop() -> None:
        while True:
            before = loop.time()
            await asyncio.sleep(0.005)
            stall[0] = max(stall[0], loop.time() - before - 0.005)

    watcher = asyncio.ensure_future(watch_the_loop())
    try:
        for i in range(5):
            key = f"{i}" + "k" * 3_000_000
            for n, pattern in enumerate(({key: 1}, json.dumps({key: "v"}), {"cmd": key})):
                body = json.dumps({"pattern": pattern, "data": 1, "id": f"{i}.{n}"}).encode()
                request = aio_pika.Message(body, correlation_id=f"{i}.{n}", reply_to=REPLY_QUEUE)
                await channel.default_exchange.publish(request, routing_key=queue)
            event = json.dumps({"pattern": {key: 1}, "data": 1}).encode()
            await channel.default_exchange.publish(aio_pika.Message(event), routing_key=queue)
            for _ in range(3):
                reply = await asyncio.wait_for(replies.get(), 10)
                packet = {"id": reply.correlation_id, "err": NO_MESSAGE_HANDLER, "status": "error"}
                assert json.loads(reply.body) == packet
            assert await good.send({"cmd": "sum"}, [i, 1]) == i + 1
    finally:
        watcher.cancel()
    assert stall[0] < 0.15, f"the loop was held for {stall[0]:.2f} s"
    assert all(len(str(key)) < 2000 for key in _ROUTE_CACHE)
    assert max(len(r.getMessage()) for r in caplog.records) < 1000  # patterns are cut short


# --- broker restart, on a RabbitMQ node of the test's own --------------------------


