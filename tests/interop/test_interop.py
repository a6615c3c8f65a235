"""Interop with real NestJS 12 on every transport, both ways: nestpy_mini's
client calling a Nest server, and Nest's client calling a nestpy_mini server.

Every case here runs for each transport in both directions against the same
expectations, so no implementation can drift from Nest unnoticed.  Where Nest
itself behaves differently on a transport, the case reads it from that
transport's ``Kind`` in ``interop_callers``.  Checks that exist for one
transport only are in ``test_interop_<kind>.py``.

Each (transport, direction) pair starts its peer once for the whole module,
and the next pairs' peers start in the background while its tests run (see
``Peers``); a broker that cannot be found skips its pairs with the one-line reason.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from typing import Any

import pytest
import pytest_asyncio
from support.interop_app import MIXED
from support.interop_callers import DIRECTIONS, KINDS, NO_REPLY, Caller, open_caller
from support.nest import nest_missing

from nestpy_mini import NoRespondersError, RequestTimeoutError

pytestmark = [
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(nest_missing() is not None, reason=str(nest_missing())),
]

NON_ASCII = {"名字": "张三", "emoji": "😀🚀", "nested": [{"深": ["层", {"é": 1.5}]}, None, True]}
Peer = tuple[str, str]  # (kind, direction)
# Direction first: pairs that run one after the other are of different kinds, so the
# next ones can start while a pair's tests run (two of one kind never run side by side).
PEERS: list[Peer] = [(kind, direction) for direction in DIRECTIONS for kind in KINDS]
AHEAD = len(KINDS) - 1  # the pairs started before their turn: every other kind's next one


class Peers:
    """Opens the caller of each pair, and the next ``AHEAD`` pairs in the background.

    A peer takes about half a second to start (a node process), a Kafka one a
    second more (a consumer group forms): started while the pair before runs
    its tests, that time is spent side by side.  Each pair still has its own
    peer, used by its own tests only.  Two pairs of one kind are never open at
    once: both would serve the same channels, subjects and topics.
    """

    def __init__(self, order: list[Peer], broker_url: Callable[[str], str]) -> None:
        self.order = order  # the pairs in the order this run's tests use them
        self.broker_url = broker_url
        self.open: dict[Peer, asyncio.Future[tuple[AsyncExitStack, Caller]]] = {}

    def _start(self, peer: Peer) -> asyncio.Future[tuple[AsyncExitStack, Caller]]:
        kind, direction = peer
        url = "" if kind == "tcp" else self.broker_url(kind)  # skips here, not in a task

        async def opening() -> tuple[AsyncExitStack, Caller]:
            stack = AsyncExitStack()
            try:
                return stack, await stack.enter_async_context(open_caller(kind, direction, url))
            except BaseException:
                await stack.aclose()
                raise

        self.open[peer] = started = asyncio.ensure_future(opening())
        return started

    async def get(self, peer: Peer) -> Caller:
        """``peer``'s caller: started ahead, or now; then the next pairs start."""
        for other in [p for p in self.open if p[0] == peer[0] and p != peer]:
            await self.close(other)  # out of the expected order: never two of a kind
        try:
            _, caller = await (self.open.get(peer) or self._start(peer))
        except BaseException:
            await self.close(peer)
            raise
        if peer in self.order:
            at = self.order.index(peer)
            for later in self.order[at + 1 : at + 1 + AHEAD]:
                if later in self.open:
                    continue
                if any(open_peer[0] == later[0] for open_peer in self.open):
                    break  # its kind's pair before it is still open: it waits its turn
                try:
                    self._start(later)
                except pytest.skip.Exception:
                    continue  # its own tests say why, when their turn comes
        return caller

    async def close(self, peer: Peer) -> None:
        """Stop ``peer``'s side once it has started (every start is bounded)."""
        started = self.open.pop(peer, None)
        if started is None:
            return
        try:
            stack, _ = await started
        except Exception:
            return  # it stopped what it had started; its tests reported the failure
        await stack.aclose()

    async def close_all(self) -> None:
        for peer in list(self.open):
            await self.close(peer)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def peers(
    request: pytest.FixtureRequest, broker_url: Callable[[str], str]
) -> AsyncIterator[Peers]:
    """Every pair's peer, each started once per module, the next ones ahead of time."""
    params = [
        item.callspec.params.get("caller")
        for item in request.session.items
        if getattr(item, "module", None) is request.module and hasattr(item, "callspec")
    ]
    opened = Peers(list(dict.fromkeys(p for p in params if p is not None)), broker_url)
    try:
        yield opened
    finally:
        await opened.close_all()


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=PEERS, ids="-".join)
async def caller(request: pytest.FixtureRequest, peers: Peers) -> AsyncIterator[Caller]:
    """The caller of one (transport, direction), its peer started once per module."""
    yield await peers.get(request.param)
    await peers.close(request.param)


async def test_request_response(caller: Caller) -> None:
    kind = caller.kind
    assert await caller.send(kind.cmd("sum"), [1, 2, 3]) == ([kind.number(6)], None)
    assert await caller.send("ping", {}) == (["pong"], None)
    assert await caller.send(kind.cmd("async_sum"), [5, 5]) == ([kind.number(10)], None)
    # None (undefined in Nest) completes with no value at all, not with null;
    # on Kafka the reply is a record with no value, which both clients deliver as null.
    nothing = [None] if kind.nest_delivers_null else []
    assert await caller.send(kind.cmd("nothing"), 1) == (nothing, None)


async def test_nested_non_ascii_payload(caller: Caller) -> None:
    echo = caller.kind.cmd("echo")
    assert await caller.send(echo, NON_ASCII) == ([NON_ASCII], None)
    long_text = "中文😀" * 2000  # about 20 KB: past one socket read
    assert await caller.send(echo, long_text) == ([long_text], None)
    # About 500 KB: well past one AMQP frame (128 KiB) and any read buffer.
    huge = "中文😀" * 50_000
    assert await caller.send(echo, huge) == ([huge], None)


async def test_streamed_reply(caller: Caller) -> None:
    kind = caller.kind
    assert await caller.send(kind.cmd("stream"), 4) == (
        [kind.number(i) for i in (1, 2, 3, 4)],
        None,
    )
    assert await caller.send(kind.cmd("stream_err"), 0) == (
        [kind.number(1)],
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
    assert await caller.send(caller.kind.cmd(cmd), 1) == ([], err)


async def test_unknown_pattern(caller: Caller) -> None:
    """TCP and RMQ servers answer that no handler matches; on NATS the broker
    answers 503 no-responders; on Redis, MQTT and Kafka no server subscribes
    an unknown pattern, so nothing answers: on Redis the PUBLISH count tells our
    client at once, on MQTT (QoS 0) and Kafka it times out quickly."""
    kind = caller.kind
    pattern = kind.cmd("no_such_cmd")
    if kind.unknown != NO_REPLY:
        assert await caller.send(pattern, 1) == ([], kind.unknown)
        return
    if kind.subscribers is not None:
        # Whichever server runs, it subscribed only to its handlers' channels.
        route = kind.route("no_such_cmd")
        assert await kind.subscribers(caller.endpoint.url, route) == 0
    loop = asyncio.get_running_loop()
    async with caller.python_client() as client:
        started = loop.time()
        if kind.nobody_fails_fast:
            with pytest.raises(NoRespondersError, match="no subscribers listening"):
                await client.send(pattern, 1, timeout=5)
        else:
            with pytest.raises(RequestTimeoutError):
                await client.send(pattern, 1, timeout=0.3)
        assert loop.time() - started < 1.5


async def test_object_pattern_keys_in_any_order(caller: Caller) -> None:
    reordered = dict(reversed(list(MIXED.items())))
    if caller.kind.kafka_names:
        # No object pattern can be a Kafka topic, so server.mjs does not serve
        # this one there, and our client refuses it up front in either order.
        async with caller.python_client() as client:
            for pattern in (MIXED, reordered):
                with pytest.raises(ValueError, match="Kafka refuses"):
                    await client.send(pattern, 0)
        return
    assert await caller.send(reordered, 0) == (["mixed"], None)
    # A pattern sent as an already-normalized string finds the same handler.
    assert await caller.send('{"cmd":"sum"}', [2, 3]) == ([5], None)


async def test_context_route(caller: Caller) -> None:
    """The context's getter (TCP/RMQ getPattern, Redis getChannel, NATS
    getSubject, MQTT/Kafka getTopic) gives the route, as Nest's does."""
    kind = caller.kind
    assert await caller.send(kind.cmd("ctx"), 1) == ([kind.route("ctx")], None)


async def test_events_reach_every_handler(caller: Caller) -> None:
    first = {"userId": "u1", "name": "李四 🎉"}
    await caller.emit("user_created", first)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while True:
        values, err = await caller.send(caller.kind.cmd("events"), 1)
        if len(values[0]) >= 2 or loop.time() > deadline:
            break
        await asyncio.sleep(0.02)
    assert err is None
    assert values[0][-2:] == [first, {"second": first}]


async def test_500_concurrent_requests(caller: Caller) -> None:
    """On TCP our client sends them all over one connection."""
    kind = caller.kind
    cmd = kind.cmd("sum" if kind.serial_handlers else "async_sum")
    datas = [[i, i * 10, -3] for i in range(500)]
    assert await caller.many(cmd, datas) == [kind.number(i * 11 - 3) for i in range(500)]
