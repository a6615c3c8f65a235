"""The NATS transport against a real broker: every semantic TCP has, plus queue groups,
headers, no-responders and a broker restart under a running server and client."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from typing import Any

import nats
import pytest
from conftest import Apps, Clients, wait_until
from support.apps import (
    shared_handlers,
)

from nestpy_mini import (
    ClientProxy,
    Controller,
    EventPattern,
    MessagePattern,
    Module,
    RpcError,
    Transport,
)
from nestpy_mini.dev import brokers
from nestpy_mini.packets import EMPTY_RESPONSE
from nestpy_mini.transports.nats import NatsClient, NatsContext, NatsServer

# The broker may be shared with other test runs: every subject carries this run's token.
RUN = secrets.token_hex(4)
events: list[Any] = []


def p(cmd: str) -> dict[str, str]:
    return {"cmd": cmd, "run": RUN}


@Controller()
class AppController(shared_handlers(p, lambda name: f"{name}.{RUN}")):
    @MessagePattern(p("sum"))
    def sum(self, data: list[int]) -> int:
        return sum(data or [])

    @MessagePattern(p("async_sum"))
    async def async_sum(self, data: list[int]) -> int:
        await asyncio.sleep(0.001)
        return sum(data)

    @MessagePattern(f"ping.{RUN}")
    def ping(self) -> str:
        return "pong"

    @MessagePattern(p("ctx"))
    def ctx(self, data: object, ctx: NatsContext) -> list[object]:
        return [ctx.get_subject(), ctx.get_headers()]

    @EventPattern(f"user_created.{RUN}")
    def on_user_created(self, data: object) -> None:
        events.append(data)

    @EventPattern(f"user_created.{RUN}")
    async def also_on_user_created(self, data: object, ctx: NatsContext) -> None:
        events.append({"second": data, "headers": ctx.get_headers()})


@Module(controllers=[AppController])
class AppModule:
    pass


@Controller()
class WhoController:
    """Records what each instance received, to tell queue-group members apart."""

    def __init__(self) -> None:
        self.requests = 0
        self.events: list[object] = []

    @MessagePattern(p("who"))
    def who(self, data: int) -> int:
        self.requests += 1
        return data

    @MessagePattern(p("who_extras"), {"queue": f"extras-{RUN}"})
    def who_extras(self, data: int) -> int:
        self.requests += 1
        return data

    @EventPattern(f"broadcast.{RUN}")
    def broadcast(self, data: object) -> None:
        self.events.append(data)


@Module(controllers=[WhoController])
class WhoModule:
    pass


@pytest.fixture(autouse=True)
def _reset() -> None:
    events.clear()


@pytest.fixture
def url(broker_url: Callable[[str], str]) -> str:
    return broker_url("nats")


@pytest.fixture
def start(apps: Apps, url: str) -> Callable[..., Any]:
    """Start a module as a NATS microservice."""
    options = {"servers": url, "close_grace": 0.2}
    return lambda module=AppModule, **more: apps(module, Transport.NATS, {**options, **more})


@pytest.fixture
def make_client(clients: Clients, url: str) -> Callable[..., ClientProxy]:
    return lambda **more: clients(Transport.NATS, {"servers": url, "timeout": 2, **more})


@pytest.fixture
async def client(start: Callable[..., Any], make_client: Callable[..., ClientProxy]) -> ClientProxy:
    await start()
    return make_client()


@pytest.fixture
async def raw(url: str) -> AsyncIterator[nats.aio.client.Client]:
    """A bare nats-py connection, to look at the wire and to send bad input."""
    nc = await nats.connect(url)
    yield nc
    await nc.close()


async def test_no_subscriber_fails_at_once_with_nests_text(client: ClientProxy) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(RpcError) as info:
        await client.send({"run": RUN, "cmd": "missing"}, 1, timeout=5)
    assert loop.time() - started < 1  # the broker's 503, not the timeout
    subject = f'{{"cmd":"missing","run":"{RUN}"}}'
    assert info.value.error == EMPTY_RESPONSE.format(subject)
    assert str(info.value) == (
        f'Empty response. There are no subscribers listening to that message ("{subject}")'
    )


async def test_context_subject_and_headers(
    start: Callable[..., Any], make_client: Callable[..., ClientProxy]
) -> None:
    await start()
    plain = make_client()
    subject = f'{{"cmd":"ctx","run":"{RUN}"}}'
    assert await plain.send(p("ctx"), 1) == [subject, None]
    tagged = make_client(headers={"x-version": "1.0.0", "x-trace": "abc"})
    assert await tagged.send(p("ctx"), 1) == [subject, {"x-version": "1.0.0", "x-trace": "abc"}]
    await tagged.emit(f"user_created.{RUN}", {"userId": "h"})  # events carry them too
    await wait_until(lambda: len(events) == 2)
    assert {
        "second": {"userId": "h"},
        "headers": {"x-version": "1.0.0", "x-trace": "abc"},
    } in events


async def test_queue_group_shares_requests_and_events(
    start: Callable[..., Any], make_client: Callable[..., ClientProxy]
) -> None:
    apps = [await start(WhoModule, queue=f"opt-{RUN}") for _ in range(2)]
    who = [app.get(WhoController) for app in apps]
    client = make_client()
    for pattern in (p("who"), p("who_extras")):  # the option's group, then the handler's
        assert await asyncio.gather(*(client.send(pattern, i) for i in range(50))) == list(
            range(50)
        )
        assert sum(w.requests for w in who) == 50  # each answered exactly once
        assert all(w.requests > 0 for w in who)  # by both members
        for w in who:
            w.requests = 0
    for i in range(10):
        await client.emit(f"broadcast.{RUN}", i)
    await wait_until(lambda: sum(len(w.events) for w in who) == 10)
    await asyncio.sleep(0.05)
    assert sorted(who[0].events + who[1].events) == list(range(10))


async def test_without_a_queue_every_server_gets_every_event(
    start: Callable[..., Any], make_client: Callable[..., ClientProxy]
) -> None:
    apps = [await start(WhoModule) for _ in range(2)]
    who = [app.get(WhoController) for app in apps]
    client = make_client()
    for i in range(5):
        await client.emit(f"broadcast.{RUN}", i)
    await wait_until(lambda: all(len(w.events) == 5 for w in who))
    # The handler's own queue group still shares its requests.
    assert await asyncio.gather(*(client.send(p("who_extras"), i) for i in range(20))) == list(
        range(20)
    )
    assert sum(w.requests for w in who) == 20


async def test_wire_request_event_and_reply_as_nest(
    client: ClientProxy, raw: nats.aio.client.Client
) -> None:
    """What a bystander sees on the broker is what Nest's client and server put there."""
    requests: list[Any] = []
    replies: list[Any] = []
    seen_events: list[Any] = []

    def into(box: list[Any]) -> Callable[[Any], Any]:
        async def append(msg: Any) -> None:
            box.append(msg)

        return append

    await client.connect()
    inbox = client._reply_prefix  # type: ignore[attr-defined]
    await raw.subscribe(f'{{"cmd":"sum","run":"{RUN}"}}', cb=into(requests))
    await raw.subscribe(f"user_created.{RUN}", cb=into(seen_events))
    await raw.subscribe(f"{inbox}*", cb=into(replies))
    await raw.flush()
    assert await client.send({"run": RUN, "cmd": "sum"}, [1, 2]) == 3
    await client.emit(f"user_created.{RUN}", {"u": 1})
    # The bystander's callbacks run in tasks of their own: on a loaded machine, later.
    await wait_until(lambda: requests and replies and seen_events, within=10)
    assert (len(requests), len(replies), len(seen_events)) == (1, 1, 1)
    (request,), (reply,), (event,) = requests, replies, seen_events
    msg_id = json.loads(request.data)["id"]
    # The raw pattern in the body, in the caller's key order; pattern, data, id.
    assert request.data.decode() == (
        f'{{"pattern":{{"run":"{RUN}","cmd":"sum"}},"data":[1,2],"id":"{msg_id}"}}'
    )
    assert request.reply == f"{inbox}{msg_id}" and request.headers is None
    # The reply: to the request's reply subject, no headers, one packet.
    assert reply.subject == request.reply and reply.headers is None
    assert reply.data == f'{{"response":3,"isDisposed":true,"id":"{msg_id}"}}'.encode()
    assert event.reply == ""
    assert event.data == f'{{"pattern":"user_created.{RUN}","data":{{"u":1}}}}'.encode()


async def test_inbox_prefix_option(
    start: Callable[..., Any], make_client: Callable[..., ClientProxy], raw: nats.aio.client.Client
) -> None:
    await start()
    client = make_client(inbox_prefix=f"_MINE.{RUN}")
    replies: list[Any] = []

    async def record(msg: Any) -> None:
        replies.append(msg.subject)

    await raw.subscribe(f"_MINE.{RUN}.>", cb=record)
    await raw.flush()
    assert await client.send(p("sum"), [7]) == 7
    await wait_until(lambda: len(replies) == 1)
    assert replies[0].startswith(f"_MINE.{RUN}.")


async def test_bad_input_is_dropped_and_nothing_breaks(
    client: ClientProxy, raw: nats.aio.client.Client, caplog: pytest.LogCaptureFixture
) -> None:
    assert await client.send(p("sum"), [1]) == 1
    subject = f'{{"cmd":"sum","run":"{RUN}"}}'
    inbox = client._reply_prefix  # type: ignore[attr-defined]
    with caplog.at_level(logging.DEBUG, logger="nestpy_mini"):
        await raw.publish(subject, b"not json", reply=f"{inbox}x1")
        await raw.publish(subject, b"\xff\xfe", reply=f"{inbox}x2")
        await raw.publish(f"user_created.{RUN}", b"[1, 2]")  # foreign: the whole payload
        await raw.publish(f"explodes.{RUN}", b"{}")
        await raw.publish(f"{inbox}nope", b"{{{")  # not JSON, on the client's inbox
        await raw.publish(f"{inbox}nope", b'{"response":1,"isDisposed":true,"id":"nope"}')
        await raw.publish(f"{inbox}nope", b"")  # an empty reply for nobody
        await raw.flush()
        await wait_until(lambda: [1, 2] in events)
        assert await client.send(p("sum"), [2, 3]) == 5
    assert 'on \'{"cmd":"sum"' in caplog.text and "that is not JSON" in caplog.text
    assert "dropped a reply that is not JSON: b'{{{'" in caplog.text
    assert "answers none of our requests: {'response': 1, 'isDisposed': True, 'id': 'nope'}" in (
        caplog.text
    )


async def test_a_reply_for_another_id_is_ignored_like_nest(
    client: ClientProxy, raw: nats.aio.client.Client
) -> None:
    """A reply whose body id differs from its subject's is dropped; the caller waits on."""
    fake = f"fake.{RUN}"
    answered: list[str] = []

    async def wrong_then_right(msg: Any) -> None:
        msg_id = json.loads(msg.data)["id"]
        await raw.publish(msg.reply, b'{"response":"wrong","isDisposed":true,"id":"other"}')
        await raw.publish(msg.reply, b'{"foreign":true}')  # no envelope: the whole response
        answered.append(msg_id)

    await raw.subscribe(fake, cb=wrong_then_right)
    await raw.flush()
    assert await client.send(fake, 1) == {"foreign": True}
    assert len(answered) == 1


async def test_unreachable_broker_is_a_clear_error_fast() -> None:
    port = brokers.free_port()
    client = NatsClient({"servers": f"nats://app:hunter2@127.0.0.1:{port}", "timeout": 2})
    loop = asyncio.get_running_loop()
    started = loop.time()
    refused = rf"cannot connect to nats at nats://app:\*\*\*@127.0.0.1:{port}: .*; start one"
    with pytest.raises(ConnectionError, match=refused):
        await client.send(p("sum"), [1])
    assert loop.time() - started < 1.5
    server = NatsServer({"servers": [f"nats://127.0.0.1:{port}"], "reconnect_time_wait": 0.05})
    with pytest.raises(ConnectionError, match=r"cannot connect to nats at nats://127\.0\.0\.1"):
        await server.listen()
    await server.close()


async def test_servers_option_defaults_to_the_broker_found(url: str, start: Any) -> None:
    await start()
    client = NatsClient({"timeout": 2})
    try:
        assert await client.send(p("sum"), [4]) == 4
        assert client.describe() == brokers.redact(brokers.find("nats").url)
    finally:
        await client.close()


async def test_giving_up_reconnecting_is_said_once_and_the_client_connects_afresh(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With max_reconnect_attempts, nats-py closes the connection after its last
    attempt: that is one "gave up" line per side, not a second "lost ...;
    reconnecting".  The next send then connects again."""
    port = brokers.free_port()
    broker = await asyncio.to_thread(brokers.start, "nats", port)
    options = {"servers": broker.url, "reconnect_time_wait": 0.05, "max_reconnect_attempts": 2}
    server = NatsServer({**options, "close_grace": 0.1})
    server.add_handler(p("sum"), lambda data: sum(data), is_event=False)
    client = NatsClient({**options, "timeout": 2})
    try:
        await server.listen()
        assert await client.send(p("sum"), [1, 2]) == 3
        await asyncio.to_thread(broker.stop)
        await wait_until(lambda: caplog.text.count("gave up reconnecting") == 2, within=5)
        lost = [r for r in caplog.records if r.getMessage().startswith("lost ")]
        assert len(lost) == 2, [r.getMessage() for r in lost]  # the server's and the client's
        assert not server.is_connected and not client.is_connected

        broker = await asyncio.to_thread(brokers.start, "nats", port)
        await server.close()  # it stopped serving; a new listen serves again
        await server.listen()
        assert await client.send(p("sum"), [2, 3]) == 5
    finally:
        await client.close()
        await server.close()
        await asyncio.to_thread(broker.stop)


class LateNats:
    """A NATS server on a real socket, reading commands strictly in order as
    nats-server does, and records them.  Once ``armed``, on the next PING while a
    subscription is live it answers PONG, and 2 ms later, before reading on, it
    delivers one request on that subscription, as a publisher on another connection
    would."""

    def __init__(self) -> None:
        self.pubs: list[tuple[str, bytes]] = []
        self.subs: dict[str, str] = {}  # sid -> subject
        self.unsubscribed: list[str] = []
        self.verbs: list[str] = []  # every command read, in order
        self.armed = False
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"nats://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        info = {"server_id": "late", "version": "2.10.0", "proto": 1, "max_payload": 1 << 20}
        writer.write(b"INFO " + json.dumps(info).encode() + b"\r\n")
        delivered = False
        try:
            while line := (await reader.readline()).decode().strip():
                verb, *args = line.split()
                self.verbs.append(verb)
                if verb == "SUB":
                    self.subs[args[-1]] = args[0]
                elif verb == "UNSUB":
                    self.unsubscribed.append(args[0])
                elif verb == "PUB":
                    body = await reader.readexactly(int(args[-1]) + 2)
                    self.pubs.append((args[0], body[:-2]))
                elif verb == "PING":
                    writer.write(b"PONG\r\n")
                    live = [sid for sid in self.subs if sid not in self.unsubscribed]
                    if live and self.armed and not delivered:
                        delivered = True
                        await writer.drain()
                        await asyncio.sleep(0.002)
                        body = json.dumps({"pattern": "late.sum", "data": [1, 2], "id": "l1"})
                        head = f"MSG {self.subs[live[0]]} {live[0]} _INBOX.late.l1 {len(body)}"
                        writer.write(f"{head}\r\n{body}\r\n".encode())
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@Controller()
class LateController:
    @MessagePattern("late.sum")
    def sum(self, data: list[int]) -> int:
        return sum(data)


async def test_listen_returns_once_the_broker_has_read_every_sub(apps: Apps) -> None:
    """The PONG that ends listen answers a PING sent after the SUBs, so a request sent
    right after listen cannot meet "no responders" (nats-py's flush() alone puts its
    PING ahead of the SUBs it has not written yet)."""
    peer = LateNats()
    url = await peer.start()
    try:
        module = Module(controllers=[LateController])(type("LateModule", (), {}))
        await apps(module, Transport.NATS, {"servers": url})
        assert peer.verbs[-2:] == ["SUB", "PING"], peer.verbs
    finally:
        await peer.close()


async def test_a_request_delivered_before_the_broker_reads_the_unsub_is_answered(
    apps: Apps,
) -> None:
    """nats-py's flush() writes its PING ahead of a pending UNSUB, so the PONG that
    Subscription.drain waits for can come before the broker has read the UNSUB.  A
    request the broker delivers in between must be handled and answered, not dropped
    (which cost 206 requests their timeout in 6 of 80 closes under load)."""
    peer = LateNats()
    url = await peer.start()
    try:
        module = Module(controllers=[LateController])(type("LateModule", (), {}))
        app = await apps(module, Transport.NATS, {"servers": url, "close_grace": 1})
        assert list(peer.subs.values()) == ["late.sum"]
        peer.armed = True
        await app.close()
        await wait_until(lambda: peer.pubs, within=2)
        assert peer.pubs == [("_INBOX.late.l1", b'{"response":3,"isDisposed":true,"id":"l1"}')]
        assert peer.unsubscribed, "the server never unsubscribed"
    finally:
        await peer.close()
