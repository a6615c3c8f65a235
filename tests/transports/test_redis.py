"""A nestpy_mini client and server over a real Redis broker: every semantic, plus pub/sub's own.

Channel names carry a per-run tag, so runs sharing one broker never answer
each other's requests.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from conftest import Apps, Clients, wait_until
from redis.asyncio import Redis
from support.apps import (
    shared_handlers,
)
from support.spares import Spares, spares_for

from nestpy_mini import (
    ClientProxy,
    Controller,
    EventPattern,
    MessagePattern,
    Module,
    NestFactory,
    NestMicroservice,
    NoRespondersError,
    RequestTimeoutError,
    Transport,
)
from nestpy_mini.dev import brokers
from nestpy_mini.patterns import normalize_pattern
from nestpy_mini.transports.redis import RedisClient, RedisContext, RedisServer

RUN = secrets.token_hex(4)


def cmd(name: str) -> dict[str, str]:
    """An object pattern unique to this run: ``{"cmd": name, "run": RUN}``."""
    return {"cmd": name, "run": RUN}


USER_CREATED = f"user_created.{RUN}"
calls: list[str] = []
events: list[Any] = []


@Controller()
class AppController(shared_handlers(cmd, lambda name: f"{name}.{RUN}")):
    @MessagePattern(cmd("sum"))
    def sum(self, data: list[int]) -> int:
        calls.append("sum")
        return sum(data or [])

    @MessagePattern(cmd("async_sum"))
    async def async_sum(self, data: list[int]) -> int:
        await asyncio.sleep(0.001)
        return sum(data)


    @MessagePattern(cmd("ctx"))
    def ctx(self, data: object, ctx: RedisContext) -> list[Any]:
        return [ctx.get_channel(), ctx.get_metadata(), ctx.get_args()[0]]

    @MessagePattern(f"ping.{RUN}")
    def ping(self) -> str:
        return "pong"

    @EventPattern(USER_CREATED)
    def on_user_created(self, data: object) -> None:
        events.append(data)

    @EventPattern(USER_CREATED)
    async def also_on_user_created(self, data: object) -> None:
        events.append({"second": data})


@Module(controllers=[AppController])
class AppModule:
    pass


@Controller()
class WildController:
    @MessagePattern(f"orders.{RUN}.*")
    def order(self, data: object, ctx: RedisContext) -> str:
        return ctx.get_channel()

    @EventPattern(f"audit.{RUN}.*")
    def audit(self, data: object, ctx: RedisContext) -> None:
        events.append([ctx.get_channel(), data])


@Module(controllers=[WildController])
class WildModule:
    pass


Start = Callable[..., Awaitable[NestMicroservice]]
MakeClient = Callable[..., ClientProxy]


@pytest.fixture(autouse=True)
def _reset() -> None:
    calls.clear()
    events.clear()


@pytest.fixture
def url(broker_url: Callable[[str], str]) -> str:
    return broker_url("redis")


@pytest.fixture(scope="module")
def own_redis(request: pytest.FixtureRequest) -> Iterator[Spares]:
    """Private Redis brokers for the tests that pause, restrict or stop theirs."""
    spares = spares_for(request, "redis")
    yield spares
    spares.close()


@pytest.fixture
def start(apps: Apps, url: str) -> Start:
    """Start a module as a Redis microservice."""
    options = {"url": url, "close_grace": 0.2}
    return lambda module=AppModule, **more: apps(module, Transport.REDIS, {**options, **more})


@pytest.fixture
def make_client(clients: Clients, url: str) -> MakeClient:
    return lambda **more: clients(Transport.REDIS, {"url": url, "timeout": 2, **more})


@pytest.fixture
async def raw(url: str) -> AsyncIterator[Redis]:
    """A plain redis-py client, to see and forge what travels on the broker."""
    redis = Redis.from_url(url, protocol=2)
    yield redis
    await redis.aclose()


@pytest.fixture
async def client(start: Start, make_client: MakeClient) -> ClientProxy:
    await start()
    return make_client()


async def test_redis_context_channel_and_metadata(client: ClientProxy, raw: Redis) -> None:
    channel = normalize_pattern(cmd("ctx"))
    assert await client.send(cmd("ctx"), 1) == [channel, None, channel]
    # Metadata comes from the envelope (Nest's dispatch hooks set it).
    async with raw.pubsub() as pubsub:
        await pubsub.subscribe(channel + ".reply")
        await pubsub.get_message(timeout=1)  # the subscribe confirmation
        envelope = {"pattern": cmd("ctx"), "data": 1, "id": "m1", "metadata": {"trace": "t"}}
        await raw.publish(channel, json.dumps(envelope))
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=2)
    assert message is not None
    reply = json.loads(message["data"])
    assert reply["response"] == [channel, {"trace": "t"}, channel]


async def test_redis_channels_and_envelopes_are_nests(client: ClientProxy, raw: Redis) -> None:
    """Raw pattern in the body, normalized channel, reply on <channel>.reply, keys in order."""
    pattern = {"run": RUN, "cmd": "sum"}  # key order as the caller wrote it
    channel = normalize_pattern(pattern)
    async with raw.pubsub() as pubsub:
        await pubsub.subscribe(channel, channel + ".reply", USER_CREATED)
        for _ in range(3):
            await pubsub.get_message(timeout=1)
        assert await client.send(pattern, [1, 2, 3]) == 6
        await client.emit(USER_CREATED, {"k": "é"})
        seen = []
        while len(seen) < 3:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=2)
            assert message is not None
            seen.append((message["channel"].decode(), message["data"].decode()))
    request, reply, event = seen
    msg_id = json.loads(request[1])["id"]
    assert request == (
        channel,
        json.dumps({"pattern": pattern, "data": [1, 2, 3], "id": msg_id}, separators=(",", ":")),
    )
    assert reply == (channel + ".reply", f'{{"response":6,"isDisposed":true,"id":"{msg_id}"}}')
    assert event == (USER_CREATED, f'{{"pattern":"{USER_CREATED}","data":{{"k":"é"}}}}')


async def test_reply_channel_stays_subscribed(client: ClientProxy, raw: Redis) -> None:
    reply_channel = normalize_pattern(cmd("sum")) + ".reply"
    for i in range(3):
        assert await client.send(cmd("sum"), [i]) == i
    assert await raw.pubsub_numsub(reply_channel) == [(reply_channel.encode(), 1)]


async def test_every_instance_gets_every_message(
    start: Start, make_client: MakeClient, raw: Redis
) -> None:
    """Pub/sub is a broadcast: two servers both run an event and both answer a request;
    the client keeps the first reply for the id and drops the duplicate."""
    await start()
    await start()
    client = make_client()
    await client.emit(USER_CREATED, "hello")
    await wait_until(lambda: len(events) == 4)
    assert sorted(map(str, events)) == sorted(["hello", "hello", *[str({"second": "hello"})] * 2])
    reply_channel = normalize_pattern(cmd("sum")) + ".reply"
    async with raw.pubsub() as pubsub:
        await pubsub.subscribe(reply_channel)
        await pubsub.get_message(timeout=1)
        assert await client.send(cmd("sum"), [20, 22]).to_list() == [42]  # one value, not two
        replies = []
        while len(replies) < 2:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=2)
            assert message is not None
            replies.append(json.loads(message["data"]))
    assert calls == ["sum", "sum"]
    assert replies[0] == replies[1]  # the same answer, for the same id, from each instance
    # A stream has no single reply to keep: both instances' values interleave.
    values = await client.send(cmd("count"), 3).to_list()
    assert sorted(values)[:4] == [1, 1, 2, 2] and values[-1] == 3


async def test_a_message_nobody_hears_is_lost(start: Start, make_client: MakeClient) -> None:
    """At most once: an event published before any server subscribed never arrives."""
    client = make_client()
    await client.emit(USER_CREATED, "too early")
    await start()
    await client.emit(USER_CREATED, "heard")
    await wait_until(lambda: len(events) == 2)
    await asyncio.sleep(0.05)
    assert events == ["heard", {"second": "heard"}]


async def test_wildcards_psubscribe_and_reply_on_the_concrete_channel(
    start: Start, make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    await start(WildModule, wildcards=True)
    client = make_client()
    with caplog.at_level(logging.WARNING):
        assert await client.send(f"orders.{RUN}.created", 1) == f"orders.{RUN}.created"
        assert await client.send(f"orders.{RUN}.paid", 2) == f"orders.{RUN}.paid"
        await client.emit(f"audit.{RUN}.login", {"u": 1})
        await wait_until(lambda: len(events) == 1)
    assert events == [[f"audit.{RUN}.login", {"u": 1}]]
    # "orders.<run>.*" also matches the reply channels; the server ignores them quietly.
    assert "dropped" not in caplog.text


async def test_redis_bad_input_is_dropped_with_a_log_line(
    client: ClientProxy, raw: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    channel = normalize_pattern(cmd("sum"))
    assert await client.send(cmd("sum"), [1]) == 1  # the reply channel is subscribed now
    with caplog.at_level(logging.DEBUG):
        for junk in (b"not json", b"\xff\xfe", b"[1,2]", b'{"foo":1}', b'{"data":1,"id":[1]}'):
            await raw.publish(channel, junk)
        for junk in (b"garbage", b"7", b'{"response":1,"isDisposed":true,"id":"nope"}'):
            await raw.publish(channel + ".reply", junk)
        assert await client.send(cmd("sum"), [2, 3]) == 5
    text = caplog.text
    assert text.count("that is not JSON") == 3  # twice on the server, once on the client
    # As Nest's IncomingRequestDeserializer: a payload that is no Nest packet is
    # an event on its channel, with the whole payload as data; none handles it.
    assert text.count("no matching event handler") == 2
    assert "dropped a reply that answers none of our requests: 7" in text
    assert "'id': 'nope'" in text
    # A list id is echoed, as Nest echoes any id; the handler failed on data 1.
    assert calls == ["sum", "sum", "sum"]


async def test_host_port_options_and_discovery(start: Start, url: str) -> None:
    await start()
    parts = urlsplit(url)
    by_host = RedisClient(
        {"host": parts.hostname, "port": parts.port, "password": parts.password, "timeout": 2}
    )
    found = RedisClient({"timeout": 2})  # no address: the env URL, else Nest's default
    assert "not connected yet" in found.describe()
    try:
        assert await by_host.send(cmd("sum"), [1, 1]) == 2
        assert await found.send(cmd("sum"), [2, 2]) == 4
        assert found.describe() == brokers.redact(brokers.find("redis").url)
    finally:
        await by_host.close()
        await found.close()


async def test_redis_connect_refused_is_a_clear_error(caplog: pytest.LogCaptureFixture) -> None:
    port = brokers.free_port()
    client = RedisClient({"url": f"redis://user:s3cret@127.0.0.1:{port}/0", "timeout": 1})
    refused = rf"cannot connect to redis at redis://user:\*\*\*@127.0.0.1:{port}/0: .*; start one"
    with pytest.raises(ConnectionError, match=refused):
        await client.send(cmd("sum"), [1])
    server = RedisServer({"url": f"redis://user:s3cret@127.0.0.1:{port}/0", "connect_timeout": 1})
    with pytest.raises(ConnectionError, match=refused):
        await server.listen()
    await client.close()
    assert "s3cret" not in caplog.text


async def test_bad_credentials_fail_clearly_without_showing_them(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    parts = urlsplit(url)
    client = RedisClient(
        {"url": f"redis://nobody:s3cret@{parts.hostname}:{parts.port}/0", "timeout": 1}
    )
    with pytest.raises(ConnectionError, match=r"nobody:\*\*\*@.*(invalid|WRONGPASS)") as info:
        await client.send(cmd("sum"), [1])
    await client.close()
    assert "s3cret" not in str(info.value) and "s3cret" not in caplog.text


async def test_a_silent_broker_is_noticed_by_the_ping_watchdog(
    caplog: pytest.LogCaptureFixture, own_redis: Spares
) -> None:
    """A broker that stops answering without closing the socket is not waited on forever."""
    broker = await own_redis.take()
    options = {"url": broker.url, "ping_interval": 0.1, "retry_delay": 0.1}
    app = await NestFactory.create_microservice(
        AppModule, transport=Transport.REDIS, options={**options, "close_grace": 0.2}
    )
    client = RedisClient({**options, "timeout": 2})
    raw = Redis.from_url(broker.url, protocol=2)
    server = app.server
    assert isinstance(server, RedisServer)
    try:
        await app.start()
        assert await client.send(cmd("sum"), [1, 2]) == 3
        await asyncio.sleep(0.35)  # idle: PINGs are answered, nothing is lost
        assert server.is_subscribed and "lost" not in caplog.text

        await raw.execute_command("CLIENT", "PAUSE", "700", "ALL")  # silent, sockets open
        await wait_until(lambda: not server.is_subscribed, within=1)
        await wait_until(lambda: server.is_subscribed, within=5)
        assert await client.send(cmd("sum"), [2, 3]) == 5
        assert "no answer from redis to PING within 0.2 s" in caplog.text
    finally:
        await raw.aclose()
        await client.close()
        await app.close()
        own_redis.stop(broker)  # in the background


async def test_a_refused_subscribe_fails_listen_at_once(own_redis: Spares) -> None:
    """An ACL that forbids a channel is reported by listen(), not waited out."""
    broker = await own_redis.take()
    admin = Redis.from_url(broker.url, protocol=2)
    try:
        await admin.execute_command(
            "ACL", "SETUSER", "limited", "on", ">pw", "resetchannels", "&allowed*", "+@all"
        )
        limited = broker.url.replace("redis://", "redis://limited:pw@")
        server = RedisServer({"url": limited, "connect_timeout": 3})
        server.add_handler("forbidden", lambda data: data, is_event=False)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(ConnectionError, match="refused to subscribe: No permissions"):
            await server.listen()
        assert loop.time() - started < 1.0
        assert not server.is_subscribed
    finally:
        await admin.aclose()
        own_redis.stop(broker)  # in the background


async def test_retry_attempts_bound_the_resubscribing(
    caplog: pytest.LogCaptureFixture, own_redis: Spares
) -> None:
    broker = await own_redis.take()
    server = RedisServer({"url": broker.url, "retry_attempts": 2, "retry_delay": 0.05})
    server.add_handler(cmd("sum"), sum, is_event=False)
    try:
        await server.listen()
        await asyncio.to_thread(broker.stop)
        await wait_until(lambda: "gave up reconnecting" in caplog.text)
        assert "after 2 attempts" in caplog.text and not server.is_subscribed
    finally:
        await server.close()
        own_redis.stop(broker)  # in the background


async def test_a_refused_publish_fails_that_request_only(own_redis: Spares) -> None:
    """One PUBLISH the broker refuses fails its own request at once; the connection goes on."""
    broker = await own_redis.take()
    admin = Redis.from_url(broker.url, protocol=2)
    await admin.execute_command(
        "ACL", "SETUSER", "limited", "on", ">pw", "resetchannels", "&allowed*", "&forbidden.reply",
        "+@all",
    )  # fmt: skip
    server = RedisServer({"url": broker.url, "close_grace": 0.2})
    server.add_handler("allowed", lambda data: sum(data), is_event=False)
    client = RedisClient({"url": broker.url.replace("redis://", "redis://limited:pw@")})
    try:
        await server.listen()
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(ConnectionError, match=r"could not publish .*No permissions"):
            await client.send("forbidden", [1])
        assert loop.time() - started < 1.0  # refused, not timed out
        results = await asyncio.gather(*(client.send("allowed", [i, 1]) for i in range(20)))
        assert results == [i + 1 for i in range(20)]
    finally:
        await client.close()
        await server.close()
        await admin.aclose()
        own_redis.stop(broker)  # in the background


async def test_a_publish_the_broker_never_confirms_fails_within_command_timeout(
    own_redis: Spares,
) -> None:
    """Writes do not wait for the broker's confirmations, so a watchdog bounds them."""
    broker = await own_redis.take()
    admin = Redis.from_url(broker.url, protocol=2)
    client = RedisClient({"url": broker.url, "command_timeout": 0.3, "timeout": 5})
    try:
        await client.emit("audit", {"n": 1})  # confirmed: the broker is fine
        # PUBLISH is a write: paused, it is neither answered nor refused.
        await admin.execute_command("CLIENT", "PAUSE", "1500", "WRITE")
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TimeoutError, match=r"no answer from redis to PUBLISH within 0\.3 s"):
            await client.emit("audit", {"n": 2})
        assert 0.3 <= loop.time() - started < 1.0
        await admin.execute_command("CLIENT", "UNPAUSE")
        await client.emit("audit", {"n": 3})  # a new connection, made on the next write
    finally:
        await client.close()
        await admin.aclose()
        own_redis.stop(broker)  # in the background


async def test_a_send_to_a_service_that_is_not_running_fails_at_once(
    make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    """The PUBLISH reached 0 subscribers, so no reply can come: it fails in milliseconds,
    naming the channel, where it used to wait out its timeout.  An event to nobody is fine."""
    client = make_client(timeout=5)
    await client.connect()
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(NoRespondersError) as info:
        await client.send(cmd("nobody"), 1)
    took = loop.time() - started
    assert took < 0.5, f"took {took:.3f} s"
    channel = normalize_pattern(cmd("nobody"))
    assert str(info.value) == (
        f'Empty response. There are no subscribers listening to that message ("{channel}")'
    )
    assert isinstance(info.value, ConnectionError)
    with caplog.at_level(logging.DEBUG, "nestpy_mini"):
        await client.emit(USER_CREATED, "nobody listens")  # not an error
    assert "reached no subscriber" in caplog.text


async def test_check_subscribers_off_waits_for_a_reply(make_client: MakeClient) -> None:
    """For Redis Cluster, whose PUBLISH counts only one node's subscribers."""
    client = make_client(check_subscribers=False)
    with pytest.raises(RequestTimeoutError):
        await client.send(cmd("nobody"), 1, timeout=0.3)
