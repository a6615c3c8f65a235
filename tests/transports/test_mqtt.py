"""A nestpy_mini client and server over a real MQTT broker: every semantic the issue lists.

The broker is the machine's Mosquitto when one answers on 1883, else amqtt
(embedded, MQTT 3.1.1 only).  Topics carry a per-run prefix so two runs on
one broker cannot answer each other's requests.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiomqtt
import pytest
from conftest import Apps, Clients, wait_until
from support.apps import (
    shared_handlers,
)

from nestpy_mini import (
    Controller,
    EventPattern,
    MessagePattern,
    Module,
    NestMicroservice,
    NoRespondersError,
    RequestTimeoutError,
    Transport,
)
from nestpy_mini.dev import brokers
from nestpy_mini.transports.mqtt import (
    MqttClient,
    MqttContext,
    MqttRecordBuilder,
    MqttServer,
    match_topic,
    strip_shared_prefix,
)
from nestpy_mini.transports.mqtt_fast import encode_publish

RUN = secrets.token_hex(3)
T = f"nestpy/{RUN}/"  # every topic of this file starts here
OBJ = {"cmd": "obj", "run": RUN}  # an object pattern: its topic is its JSON route
OBJ_TOPIC = f'{{"cmd":"obj","run":"{RUN}"}}'
SHARED = f"$share/g{RUN}/{T}shared"

events: list[Any] = []
calls: list[Any] = []


@Controller()
class AppController(shared_handlers(lambda name: T + name, lambda name: T + name)):
    @MessagePattern(T + "sum")
    def sum(self, data: list[int]) -> int:
        calls.append(("sum", id(self)))
        return sum(data)

    @MessagePattern(OBJ)
    async def obj(self, data: Any, ctx: MqttContext) -> list[Any]:
        await asyncio.sleep(0.001)
        return [data, ctx.get_topic()]

    @MessagePattern(T + "ctx")
    def ctx(self, data: Any, ctx: MqttContext) -> dict[str, Any]:
        packet = ctx.get_packet()
        return {
            "topic": ctx.get_topic(),
            "same": ctx.get_args() == (ctx.get_topic(), packet),
            "qos": packet.qos,
            "retain": packet.retain,
            "payload": json.loads(packet.payload),
        }

    @MessagePattern(T + "qos1", {"qos": 1})
    def qos1(self, data: Any, ctx: MqttContext) -> int:
        return ctx.get_packet().qos

    @MessagePattern(T + "qos_default")
    def qos_default(self, data: Any, ctx: MqttContext) -> int:
        return ctx.get_packet().qos

    @MessagePattern(T + "sensors/+/temp")
    def temp(self, data: Any, ctx: MqttContext) -> list[Any]:
        return [ctx.get_topic(), data]

    @MessagePattern(SHARED)
    def shared(self, data: Any, ctx: MqttContext) -> list[Any]:
        calls.append(("shared", id(self)))
        props = ctx.get_packet().properties
        return [ctx.get_topic(), sorted(getattr(props, "UserProperty", []) or [])]

    @EventPattern(T + "user_created")
    def on_user_created(self, data: Any) -> None:
        events.append(data)

    @EventPattern(T + "user_created")
    async def also_on_user_created(self, data: Any) -> None:
        events.append({"second": data})

    @EventPattern(T + "fanout")
    def fanout(self, data: Any) -> None:
        events.append((id(self), data))

    @EventPattern(T + "logs/#")
    def logs(self, data: Any, ctx: MqttContext) -> None:
        events.append([ctx.get_topic(), data])


@Module(controllers=[AppController])
class AppModule:
    pass


StartServer = Callable[..., Awaitable[NestMicroservice]]
MakeClient = Callable[..., MqttClient]


@pytest.fixture(autouse=True)
def _reset() -> None:
    events.clear()
    calls.clear()


@pytest.fixture
def url(broker_url: Callable[[str], str]) -> str:
    return broker_url("mqtt")


@pytest.fixture
def start_server(apps: Apps, url: str) -> StartServer:
    """Start AppModule as an MQTT microservice."""
    options = {"url": url, "close_grace": 0.2}
    return lambda **more: apps(AppModule, Transport.MQTT, {**options, **more})


@pytest.fixture
def make_client(clients: Clients, url: str) -> MakeClient:
    def make(**more: Any) -> MqttClient:
        client = clients(Transport.MQTT, {"url": url, "timeout": 2, **more})
        assert isinstance(client, MqttClient)
        return client

    return make


@pytest.fixture
async def client(start_server: StartServer, make_client: MakeClient) -> MqttClient:
    await start_server()
    return make_client()


@pytest.fixture
async def raw(url: str) -> AsyncIterator[aiomqtt.Client]:
    """A plain aiomqtt client, to put arbitrary bytes on the broker."""
    parts = url.split("://", 1)[1].split(":")
    async with aiomqtt.Client(parts[0], int(parts[1]), identifier=f"raw_{RUN}") as mqtt:
        yield mqtt


def on_amqtt() -> bool:
    return brokers.find("mqtt").source.startswith("embedded")


async def test_mqtt_context_topic_and_packet(client: MqttClient) -> None:
    answer = await client.send(T + "ctx", {"名": "値"})
    assert answer["topic"] == T + "ctx" and answer["same"] is True
    assert answer["qos"] == 0 and answer["retain"] is False
    assert answer["payload"]["pattern"] == T + "ctx" and answer["payload"]["data"] == {"名": "値"}


async def test_qos_from_handler_extras_and_subscribe_options(
    start_server: StartServer, make_client: MakeClient
) -> None:
    app = await start_server()
    client = make_client()
    # Delivered QoS = min(published, subscribed): extras {"qos": 1} subscribe at 1.
    assert await client.send(T + "qos1", MqttRecordBuilder(0).set_qos(1).build()) == 1
    assert await client.send(T + "qos_default", MqttRecordBuilder(0).set_qos(1).build()) == 0
    if not on_amqtt():  # amqtt 0.12 delivers at the subscription's QoS instead
        assert await client.send(T + "qos1", 0) == 0  # published at 0
    await app.close()
    await start_server(subscribe_options={"qos": 1})
    assert await client.send(T + "qos_default", MqttRecordBuilder(0).set_qos(1).build()) == 1
    await client.emit(T + "user_created", MqttRecordBuilder({"q": 1}).set_qos(1).build())
    await wait_until(lambda: len(events) == 2)
    assert events[0] == {"q": 1}  # the record's options never reach the wire


async def test_every_instance_receives_events(
    start_server: StartServer, make_client: MakeClient
) -> None:
    await start_server()
    await start_server()
    await make_client().emit(T + "fanout", "hello")
    await wait_until(lambda: len(events) == 2)
    assert len({instance for instance, _ in events}) == 2
    assert {data for _, data in events} == {"hello"}


async def test_wildcard_handlers(client: MqttClient) -> None:
    # Answered on <concrete topic>/reply, where the client listens.
    assert await client.send(T + "sensors/kitchen/temp", 21) == [T + "sensors/kitchen/temp", 21]
    assert await client.send(T + "sensors/hall/temp", 19) == [T + "sensors/hall/temp", 19]
    await client.emit(T + "logs/app/web", "started")
    await wait_until(lambda: len(events) == 1)
    assert events == [[T + "logs/app/web", "started"]]


def test_topic_matching_as_nest() -> None:
    assert match_topic("a/+/c", "a/b/c") and not match_topic("a/+/c", "a/b/d")
    assert match_topic("a/#", "a/b/c") and match_topic("a/#", "a")
    assert not match_topic("a/+", "a/b/c") and not match_topic("a/b", "a")
    assert strip_shared_prefix("$share/grp/a/+") == "a/+"
    assert strip_shared_prefix("a/b") == "a/b"


async def test_mqtt5_shared_subscription_and_user_properties(
    start_server: StartServer, make_client: MakeClient
) -> None:
    if on_amqtt():
        pytest.skip("amqtt speaks MQTT 3.1.1 only: no shared subscriptions, no user properties")
    await start_server(protocol_version=5)
    await start_server(protocol_version=5)
    client = make_client(protocol_version=5, user_properties={"x-version": "1.0.0"})
    record = MqttRecordBuilder(1).set_properties({"user_properties": {"x-trace": "abc"}}).build()
    answers = await asyncio.gather(*(client.send(T + "shared", record) for _ in range(10)))
    props = [["x-trace", "abc"], ["x-version", "1.0.0"]]
    assert answers == [[T + "shared", props]] * 10
    assert len(calls) == 10  # the group shares the requests: each is handled once
    assert len({instance for _, instance in calls}) == 2


async def test_mqtt_bad_input_is_dropped_with_a_log_line(
    client: MqttClient, raw: aiomqtt.Client, caplog: pytest.LogCaptureFixture
) -> None:
    assert await client.send(T + "sum", [1]) == 1  # subscribed to sum/reply now
    with caplog.at_level(logging.WARNING, logger="nestpy_mini"):
        await raw.publish(T + "sum", b"not json")
        await raw.publish(T + "sum", b"\xff\xfe{")
        await raw.publish(T + "sum", b"[1, 2]")
        await raw.publish(T + "sum/reply", b"garbage")
        await raw.publish(T + "sum/reply", b"7")
        await raw.publish(T + "sum/reply", b'{"id":"nobody","response":1,"isDisposed":true}')
        # A foreign message (neither pattern nor data) is an event with the whole
        # payload as data, as Nest's IncomingRequestDeserializer maps it.
        await raw.publish(T + "user_created", b'{"temp": 21}')
        await wait_until(lambda: len(events) == 2)
        assert await client.send(T + "sum", [2, 3]) == 5
    assert events == [{"temp": 21}, {"second": {"temp": 21}}]
    dropped = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(dropped) == 3, dropped  # not JSON: twice on the server, once on the client
    # As Nest's deserializers read them: [1, 2] is no Nest packet, so it is an event
    # on its topic, which no event handler takes; a reply that names none of our
    # requests (7, "nobody") is dropped without a word.
    assert caplog.text.count("no matching event handler") == 1


async def test_a_reply_whose_id_is_not_a_string_is_dropped_quietly(
    client: MqttClient, raw: aiomqtt.Client, caplog: pytest.LogCaptureFixture
) -> None:
    """Our ids are strings: a reply with an object or a list for its id answers none
    of our requests, and is dropped as such, not with a TypeError traceback."""
    assert await client.send(T + "sum", [1]) == 1  # subscribed to sum/reply now
    with caplog.at_level(logging.DEBUG, logger="nestpy_mini"):
        for bad_id in (b'{"a":1}', b"[1]"):
            await raw.publish(T + "sum/reply", b'{"id":%b,"response":1,"isDisposed":true}' % bad_id)
        await wait_until(lambda: sum("dropped" in r.getMessage() for r in caplog.records) >= 2)
        assert await client.send(T + "sum", [2, 3]) == 5
    loud = [r.getMessage() for r in caplog.records if r.exc_info or r.levelno >= logging.WARNING]
    assert loud == []
    assert "TypeError" not in caplog.text and "Traceback" not in caplog.text


async def test_unreachable_broker_is_a_clear_error() -> None:
    port = brokers.free_port()
    client = MqttClient({"url": f"mqtt://user:hunter2@127.0.0.1:{port}", "timeout": 1})
    with pytest.raises(ConnectionError, match=rf"127.0.0.1:{port}") as info:
        await client.send(T + "sum", [1])
    assert "hunter2" not in str(info.value)  # credentials never reach a message
    await client.close()


async def test_broker_is_found_at_connect_time(start_server: StartServer, url: str) -> None:
    await start_server()
    client = MqttClient({"timeout": 2})
    assert client.url is None  # nothing resolved at construction
    try:
        assert await client.send(T + "sum", [4]) == 4
        assert client.url == brokers.find("mqtt").url == url
    finally:
        await client.close()


async def test_reconnect_can_be_bounded(caplog: pytest.LogCaptureFixture) -> None:
    port = brokers.free_port()
    broker = await asyncio.to_thread(brokers.start, "mqtt", port)
    options = {"url": broker.url, "max_reconnect_attempts": 2, "reconnect_period": 0.1}
    server = MqttServer(options)
    server.add_handler(T + "sum", sum, is_event=False)
    client = MqttClient({"url": broker.url, "timeout": 1})
    try:
        await server.listen()
        await client.connect()
        with caplog.at_level(logging.WARNING, logger="nestpy_mini"):
            await asyncio.to_thread(broker.stop)
            await wait_until(lambda: "gave up" in caplog.text)
        assert "after 2 attempts" in caplog.text
        # The client reconnects when a send needs it, so it has no attempts to count.
        with pytest.raises(ConnectionError, match="cannot connect"):
            await client.send(T + "sum", [1])
        broker = await asyncio.to_thread(brokers.start, "mqtt", port)
        await client.connect()
        assert client.is_connected
    finally:
        await client.close()
        await server.close()
        await asyncio.to_thread(broker.stop)


async def test_event_body_carries_the_raw_pattern_as_nest_does(
    client: MqttClient, raw: aiomqtt.Client
) -> None:
    # Captured from Nest 12.1.1: the topic is the normalized route, while the
    # body keeps the pattern as the caller wrote it (key order included).
    pattern = {"t": T, "b": 1, "a": 2}
    topic = '{"a":2,"b":1,"t":"' + T + '"}'
    await raw.subscribe(topic)
    await client.emit(pattern, {"x": 1})
    async with asyncio.timeout(3):
        async for message in raw.messages:
            assert message.topic.value == topic
            assert json.loads(message.payload) == {"pattern": pattern, "data": {"x": 1}}
            assert message.payload.startswith(b'{"pattern":{"t":')
            break


def _packets(data: bytes) -> list[bytes]:
    """MQTT packets, whole, from a byte stream: each is a type byte, a varint length, a body."""
    out, at = [], 0
    while at < len(data):
        length, shift, i = 0, 0, at + 1
        while True:
            length |= (data[i] & 0x7F) << shift
            shift, i = shift + 7, i + 1
            if not data[i - 1] & 0x80:
                break
        out.append(data[at:i + length])
        at = i + length
    return out


@pytest.mark.parametrize("version", [4, 5])
async def test_a_qos0_publish_is_encoded_as_paho_encodes_it(version: int) -> None:
    """The fast path writes PUBLISH itself: its bytes must be paho's, byte for byte,
    across the remaining length's 1-, 2- and 3-byte forms, with and without retain."""
    heard, gone = bytearray(), asyncio.get_running_loop().create_future()

    async def broker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"\x20\x02\x00\x00" if version == 4 else b"\x20\x03\x00\x00\x00")
        while chunk := await reader.read(65536):
            heard.extend(chunk)
        writer.close()
        gone.set_result(None)

    server = await asyncio.start_server(broker, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    cases = [("a/b", b"x" * n, retain) for n in (0, 100, 200, 20_000) for retain in (False, True)]
    async with aiomqtt.Client("127.0.0.1", port, protocol=aiomqtt.ProtocolVersion(version)) as c:
        for topic, body, retain in cases:
            await c.publish(topic, body, qos=0, retain=retain)
        await wait_until(lambda: len(_packets(bytes(heard))) >= 1 + len(cases))
    await gone
    server.close()
    await server.wait_closed()
    expected = [encode_publish(t.encode(), b, r, version == 5) for t, b, r in cases]
    assert _packets(bytes(heard))[1:1 + len(cases)] == expected  # after CONNECT, before DISCONNECT


async def test_mqtt5_no_matching_subscribers_fails_a_qos1_request_at_once(
    make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    """The broker's PUBACK says "No matching subscribers" (reason 16): the request fails
    then, naming its topic.  At QoS 0 the broker says nothing, and the timeout ends it."""
    if on_amqtt():
        pytest.skip("amqtt speaks MQTT 3.1.1 only: no reason codes")
    client = make_client(protocol_version=5, timeout=5)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(NoRespondersError) as info:
        await client.send(T + "nobody", MqttRecordBuilder(1).set_qos(1).build())
    assert loop.time() - started < 0.5
    assert f'("{T}nobody")' in str(info.value)
    with pytest.raises(RequestTimeoutError):
        await client.send(T + "nobody", 1, timeout=0.3)
    with caplog.at_level(logging.DEBUG, "nestpy_mini"):
        await client.emit(T + "nobody", MqttRecordBuilder(1).set_qos(1).build())  # fine
    assert "reached no subscriber" in caplog.text
    quiet = make_client(protocol_version=5, check_subscribers=False)
    with pytest.raises(RequestTimeoutError):
        await quiet.send(T + "nobody", MqttRecordBuilder(1).set_qos(1).build(), timeout=0.3)
