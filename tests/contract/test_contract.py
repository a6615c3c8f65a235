"""What every transport promises alike, checked once and run over all six.

Cold ``send`` and hot ``emit``; streamed replies, and a stream that fails
after some values; every error shape as Nest sends it; timeouts per client
and per call; 50 concurrent sends; ``close()`` failing what waits; and a
broker that goes away and comes back.  What a transport alone has (NATS queue
groups, RabbitMQ acks, MQTT QoS, Kafka groups, TCP framing) is tested in
``tests/transports``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_asyncio
from conftest import wait_until
from support.apps import check_error_kinds, check_stream_error, check_streams, shared_handlers
from support.kits import KITS, Kit, Outage, name, outage

from nestpy_mini import (
    ClientProxy,
    ClientProxyFactory,
    ConnectionClosedError,
    Controller,
    EventPattern,
    MessagePattern,
    Module,
    NestFactory,
    NestMicroservice,
    NoRespondersError,
    RequestTimeoutError,
    RpcError,
)

calls: list[str] = []
events: list[Any] = []


@Controller()
class ContractController(shared_handlers(name, name)):
    @MessagePattern(name("sum"))
    def sum(self, data: list[int]) -> int:
        calls.append("sum")
        return sum(data or [])

    @MessagePattern(name("length"))
    def length(self, data: str) -> int:
        return len(data)

    @EventPattern(name("created"))
    def created(self, data: Any) -> None:
        events.append(("first", data))

    @EventPattern(name("created"))
    async def also_created(self, data: Any) -> None:
        await asyncio.sleep(0)
        events.append(("second", data))


@Module(controllers=[ContractController])
class ContractModule: ...


# One server per transport serves every test of the module: a Kafka consumer group
# takes a second to form, and so on.  Each test has its own client.
pytestmark = pytest.mark.asyncio(loop_scope="module")
OUTAGE_TEST = "test_the_broker_goes_away_and_comes_back"


@pytest.fixture(scope="module", params=KITS, ids=lambda kit: kit.id)
def kit(request: pytest.FixtureRequest) -> Kit:
    return request.param


@pytest.fixture(autouse=True)
def _reset() -> None:
    calls.clear()
    events.clear()


async def _started(app: NestMicroservice) -> NestMicroservice:
    try:
        await app.start()
    except BaseException:
        await app.close()
        raise
    return app


async def _module_server(kit: Kit, url: str) -> NestMicroservice:
    """The server that every test of ``kit`` but the outage test talks to."""
    options = {**kit.server_options(url), "close_grace": 0.2}
    app = await NestFactory.create_microservice(
        ContractModule, transport=kit.transport, options=options
    )
    app.url = url  # type: ignore[attr-defined]
    return await _started(app)


async def _outage_server(kit: Kit, rabbit: Any) -> tuple[Outage | None, NestMicroservice]:
    """The outage test's own broker (none for TCP) and a server on it."""
    down = await outage(kit, rabbit) if kit.kind else None
    options = {**kit.server_options(down.url if down else ""), "close_grace": 0.2}
    try:
        app = await NestFactory.create_microservice(
            ContractModule, transport=kit.transport, options=options
        )
        return down, await _started(app)
    except BaseException:
        if down is not None and kit.kind != "rmq":
            await asyncio.to_thread(down.stop)
        raise


class Ahead:
    """Starts the servers a kit's tests need while the tests before them run.

    Starting takes time that is mostly waiting: a Kafka consumer group takes a
    second or more to form, a private broker a few tenths.  So when a kit's
    first test begins, its outage test's broker and server start, and so does
    the next kit's module server; the old kit's server closes (waiting out its
    grace for the handlers that still hang) while the next kit's tests run.
    Each server still serves exactly the tests it served when started in turn,
    and none is sent anything before they run: each is on its own broker, or
    answers only this run's patterns.
    """

    def __init__(
        self, order: list[Kit], outages: set[str], broker_url: Callable[[str], str], rabbit: Any
    ) -> None:
        self.order = order  # the kits in the order this run's tests use them
        self.outages = outages  # the ids of the kits whose outage test runs
        self.broker_url = broker_url
        self.rabbit = rabbit
        self.servers: dict[str, asyncio.Future[NestMicroservice]] = {}
        self.outage_servers: dict[str, asyncio.Future[tuple[Outage | None, NestMicroservice]]] = {}
        self.closing: list[asyncio.Future[None]] = []

    def _start_server(self, kit: Kit) -> asyncio.Future[NestMicroservice]:
        url = self.broker_url(kit.kind) if kit.kind else ""  # skips here, never in a task
        self.servers[kit.id] = started = asyncio.ensure_future(_module_server(kit, url))
        return started

    async def server(self, kit: Kit) -> NestMicroservice:
        app = await (self.servers.get(kit.id) or self._start_server(kit))
        if kit.id in self.outages and kit.id not in self.outage_servers:
            self.outage_servers[kit.id] = asyncio.ensure_future(_outage_server(kit, self.rabbit))
        ids = [k.id for k in self.order]
        later = self.order[ids.index(kit.id) + 1 :] if kit.id in ids else []
        if later and later[0].id not in self.servers:
            try:
                self._start_server(later[0])
            except pytest.skip.Exception:
                pass  # its own tests say why, when their turn comes
        return app

    def close_server(self, kit: Kit) -> None:
        started = self.servers.pop(kit.id, None)
        if started is not None:
            self.closing.append(asyncio.ensure_future(self._close(started)))

    def stop_later(self, down: Outage) -> None:
        """Stop an outage test's broker while the next tests run."""
        self.closing.append(asyncio.ensure_future(asyncio.to_thread(down.stop)))

    async def outage_server(self, kit: Kit) -> tuple[Outage | None, NestMicroservice]:
        """The outage test's broker and server, now its own: the test stops them."""
        self.outages.discard(kit.id)  # taken: none is started for it again
        started = self.outage_servers.pop(kit.id, None)
        return await (started or _outage_server(kit, self.rabbit))

    @staticmethod
    async def _close(started: asyncio.Future[NestMicroservice]) -> None:
        try:
            app = await started
        except Exception:
            return  # a server that failed to start reported it to its tests
        await app.close()

    async def aclose(self) -> None:
        """Close what no test took, and wait for what is closing; raise the first error."""
        for started in self.servers.values():
            self.closing.append(asyncio.ensure_future(self._close(started)))
        self.servers.clear()
        for kit_id, started in list(self.outage_servers.items()):
            try:
                down, app = await started
            except Exception:
                continue
            await app.close()
            if down is not None and kit_id != "RMQ":
                await asyncio.to_thread(down.stop)
        self.outage_servers.clear()
        outcomes = await asyncio.gather(*self.closing, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def ahead(
    request: pytest.FixtureRequest, broker_url: Callable[[str], str], private_rabbit: Any
) -> AsyncIterator[Ahead]:
    mine = [
        item
        for item in request.session.items
        if getattr(item, "module", None) is request.module and hasattr(item, "callspec")
    ]
    kits = [item.callspec.params["kit"] for item in mine]
    order = list({kit.id: kit for kit in kits}.values())  # each kit once, in the run's order
    outages = {item.callspec.params["kit"].id for item in mine if item.originalname == OUTAGE_TEST}
    started = Ahead(order, outages, broker_url, private_rabbit)
    try:
        yield started
    finally:
        await started.aclose()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def app(kit: Kit, ahead: Ahead) -> AsyncIterator[NestMicroservice]:
    yield await ahead.server(kit)
    ahead.close_server(kit)


@pytest_asyncio.fixture(loop_scope="module")
async def client(kit: Kit, app: NestMicroservice) -> AsyncIterator[ClientProxy]:
    options = {**kit.client_options(app.url, app), "timeout": 5}  # type: ignore[attr-defined]
    client = ClientProxyFactory.create(kit.transport, options)
    yield client
    await client.close()


async def test_send_is_cold_until_awaited(kit: Kit, client: ClientProxy) -> None:
    request = client.send(name("sum"), [1, 2, 3])
    await asyncio.sleep(0.05)  # a broker round trip here takes about a millisecond
    assert calls == []  # nothing left yet: Nest's send is a cold Observable
    assert await request == kit.value(6)
    assert calls == ["sum"]
    assert await request == kit.value(6) and calls == ["sum", "sum"]  # each await sends again


async def test_emit_is_hot_and_every_event_handler_runs(client: ClientProxy) -> None:
    client.emit(name("created"), {"userId": "42"})  # not awaited: it leaves all the same
    await wait_until(lambda: len(events) == 2, within=10)
    assert sorted(events) == [("first", {"userId": "42"}), ("second", {"userId": "42"})]


async def test_a_streamed_reply_three_ways(kit: Kit, client: ClientProxy) -> None:
    await check_streams(client, name("count"), kit.value)


async def test_a_stream_that_fails_after_values(kit: Kit, client: ClientProxy) -> None:
    await check_stream_error(client, name("stream_err"), kit.value)


async def test_every_error_shape_reaches_the_caller_and_the_server_goes_on(
    kit: Kit, client: ClientProxy, caplog: pytest.LogCaptureFixture
) -> None:
    await check_error_kinds(client, name, caplog)
    client.emit(name("explodes"), 1)  # an event handler that raises is logged, never sent
    await wait_until(lambda: "event handler failure" in caplog.text)
    assert await client.send(name("sum"), [2, 2]) == kit.value(4)


async def test_a_pattern_nobody_serves(kit: Kit, client: ClientProxy) -> None:
    """Nest's no-handler error where the server reads the pattern; "no responders" at once
    where the broker says nobody subscribes; else the caller's timeout ends it."""
    if kit.unknown_pattern is not None:
        started = asyncio.get_running_loop().time()
        with pytest.raises(RpcError) as info:
            await client.send(name("nobody"), 1, timeout=2)
        assert info.value.error == kit.unknown_pattern(name("nobody"))
        assert asyncio.get_running_loop().time() - started < 1  # not the 2 s timeout
        if kit.kind in ("redis", "nats"):
            assert isinstance(info.value, NoRespondersError)
            assert isinstance(info.value, ConnectionError)
    else:
        with pytest.raises(RequestTimeoutError):
            await client.send(name("nobody"), 1, timeout=0.2)
    assert await client.send(name("sum"), [1]) == kit.value(1)


async def test_timeouts_per_client_and_per_call(kit: Kit, app: NestMicroservice) -> None:
    options = {**kit.client_options(app.url, app), "timeout": 0.2}  # type: ignore[attr-defined]
    client = ClientProxyFactory.create(kit.transport, options)
    try:
        assert await client.send(name("sum"), [1], timeout=5) == kit.value(1)  # ready
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(RequestTimeoutError, match=r"within 0\.2 s"):
            await client.send(name("hang"), 1)  # the client's own timeout
        with pytest.raises(RequestTimeoutError, match=r"within 0\.1 s"):
            await client.send(name("hang"), 1, timeout=0.1)  # this call's
        assert loop.time() - started < 1.5
        assert await client.send(name("sum"), [1, 1], timeout=5) == kit.value(2)
    finally:
        await client.close()


async def test_fifty_concurrent_sends_each_get_their_own_reply(
    kit: Kit, client: ClientProxy
) -> None:
    replies = await asyncio.gather(*(client.send(name("sum"), [i, i]) for i in range(50)))
    assert replies == [kit.value(2 * i) for i in range(50)]


async def test_large_messages_among_small_ones_arrive_whole(
    kit: Kit, client: ClientProxy
) -> None:
    """300 KB is more than one read of the MQTT socket (64 KiB) and than one AMQP frame
    (128 KiB): each side must put a message together from pieces, in flight with others."""
    sizes = [300_000 + i if i % 10 == 0 else i for i in range(40)]
    replies = await asyncio.gather(*(client.send(name("length"), "x" * n) for n in sizes))
    assert replies == [kit.value(n) for n in sizes]


async def test_non_ascii_data_round_trips(kit: Kit, client: ClientProxy) -> None:
    data = {"名字": "张三", "emoji": "😀🚀", "nested": [{"深": ["层", {"x": "é"}]}]}
    client.emit(name("created"), data)
    await wait_until(lambda: len(events) == 2, within=10)
    assert [payload for _, payload in events] == [data, data]


async def test_close_fails_pending_requests_at_once(kit: Kit, client: ClientProxy) -> None:
    assert await client.send(name("sum"), [1]) == kit.value(1)
    pending = asyncio.ensure_future(client.send(name("hang"), 1, timeout=30))
    await wait_until(lambda: bool(client._routing))
    await client.close()
    with pytest.raises(ConnectionClosedError, match="was closed"):
        await asyncio.wait_for(pending, 2)
    assert await client.send(name("sum"), [3]) == kit.value(3)  # it connects again on demand


async def test_the_broker_goes_away_and_comes_back(
    kit: Kit, ahead: Ahead, caplog: pytest.LogCaptureFixture
) -> None:
    """A send during the outage fails clearly within its timeout; once the broker is back
    (for TCP: the server), the server serves again by itself and the client resumes."""
    down, app = await ahead.outage_server(kit)  # its own broker, and a server started on it
    server_options = {**kit.server_options(down.url if down else ""), "close_grace": 0.2}
    # TCP: the outage is the server's, on the same port
    url = down.url if down else str(app.server.port)  # type: ignore[attr-defined]
    options = {**kit.client_options(url, app), "timeout": 2, "connect_timeout": 2}
    client = ClientProxyFactory.create(kit.transport, options)
    loop = asyncio.get_running_loop()
    try:
        assert await client.send(name("sum"), [1, 2]) == kit.value(3)
        waiting = asyncio.ensure_future(client.send(name("hang"), 1, timeout=30))
        await wait_until(lambda: bool(client._routing))

        if down is not None:
            await asyncio.to_thread(down.stop)
        else:
            await app.close()
        if kit.in_flight_fails_at_once:  # its reply can no longer come: at once, not at 30 s
            with pytest.raises((ConnectionError, RpcError)):
                await asyncio.wait_for(waiting, 3)
        else:
            waiting.cancel()
        started = loop.time()
        with pytest.raises((ConnectionError, RequestTimeoutError)):
            await client.send(name("sum"), [1], timeout=1)
        assert loop.time() - started < 2.5  # within its timeouts, never a hang

        if down is not None:
            await asyncio.to_thread(down.start)
        else:
            again = {**server_options, "port": int(url)}
            app = await NestFactory.create_microservice(
                ContractModule, transport=kit.transport, options=again
            )
            await app.start()
        deadline = loop.time() + 30
        while True:
            try:
                assert await client.send(name("sum"), [2, 3], timeout=0.5) == kit.value(5)
                break
            except (ConnectionError, RequestTimeoutError):
                assert loop.time() < deadline, "the transport did not recover within 30 s"
                await asyncio.sleep(0.05)
        async def answered(i: int) -> Any:
            """A send; where the restart forgot the log, retried for up to 15 s."""
            until = loop.time() + (15 if kit.restart_forgets_the_log else 0)
            while True:
                try:
                    return await client.send(name("sum"), [i], timeout=1)
                except (ConnectionError, RequestTimeoutError):  # said clearly, at once
                    if loop.time() > until:
                        raise

        replies = await asyncio.gather(*(answered(i) for i in range(5)))
        assert replies == [kit.value(i) for i in range(5)]
        client.emit(name("created"), "back")  # and events flow again
        await wait_until(lambda: ("first", "back") in events, within=10)
        if kit.says_when_lost:  # one line per outage, not one per reconnect attempt
            server = f"nestpy_mini.{type(app.server).__name__}"
            lost = [r for r in caplog.records if r.name == server and "lost" in r.message]
            assert len(lost) == 1, [r.message for r in lost]
    finally:
        with caplog.at_level(logging.CRITICAL):
            await client.close()
            await app.close()
            if down is not None and kit.kind != "rmq":
                ahead.stop_later(down)
