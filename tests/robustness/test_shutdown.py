"""Graceful shutdown: ``close()`` stops accepting, lets running handlers finish
within ``close_grace`` and delivers their replies, cancels what outlives the grace
(its caller is told at once), then closes the sockets, and leaves nothing behind:
no ResourceWarning, no pending task.  Over TCP (in process, and a child process
stopped by SIGTERM) and over NATS and Redis.
"""

from __future__ import annotations

import asyncio
import gc
import secrets
import warnings
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from conftest import wait_until
from support.faults import ServiceProcess

from nestpy_mini import (
    ClientProxy,
    ClientProxyFactory,
    ConnectionClosedError,
    Controller,
    EventPattern,
    Injectable,
    MessagePattern,
    Module,
    NestFactory,
    NestMicroservice,
    RpcError,
    Transport,
)
from nestpy_mini.server import DEFAULT_CLOSE_GRACE
from nestpy_mini.transports.tcp import TcpClient, TcpServer

RUN = secrets.token_hex(4)
SLOW = f"shutdown.{RUN}.slow"
HANG = f"shutdown.{RUN}.hang"
COUNT = f"shutdown.{RUN}.count"
PING = f"shutdown.{RUN}.ping"
NOTE = f"shutdown.{RUN}.note"
HANDLER_SECONDS = 0.3
cancelled: list[Any] = []
notes: list[Any] = []


@Controller()
class ShutdownController:
    @MessagePattern(SLOW)
    async def slow(self, data: int) -> int:
        await asyncio.sleep(HANDLER_SECONDS)
        return data

    @MessagePattern(HANG)
    async def hang(self, data: int) -> None:
        try:
            await asyncio.sleep(30)
        finally:
            cancelled.append(data)  # runs only when close() cancels it

    @MessagePattern(COUNT)
    async def count(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            await asyncio.sleep(0.01)
            yield i

    @MessagePattern(PING)
    def ping(self, data: object) -> str:
        return "pong"

    @EventPattern(NOTE)
    async def note(self, data: object) -> None:
        await asyncio.sleep(0.05)
        notes.append(data)


@Module(controllers=[ShutdownController])
class ShutdownModule:
    pass


order: list[str] = []


@Injectable()
class Lifecycle:
    """Records when the app's shutdown hook runs (it is what closes injected clients)."""

    def on_application_shutdown(self) -> None:
        order.append("shutdown hook")


@Controller()
class OrderController:
    @MessagePattern(f"shutdown.{RUN}.work")
    async def work(self, data: int) -> int:
        await asyncio.sleep(HANDLER_SECONDS)
        order.append("handler done")
        return data


@Module(controllers=[OrderController], providers=[Lifecycle])
class OrderModule:
    pass


@pytest.fixture(autouse=True)
def _reset() -> None:
    cancelled.clear()
    notes.clear()
    order.clear()


@contextmanager
def no_leaks() -> Iterator[None]:
    """Fail if anything inside (or collected right after) warns of an unclosed resource."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", ResourceWarning)
        yield
        gc.collect()
    leaked = [str(w.message) for w in seen if issubclass(w.category, ResourceWarning)]
    assert leaked == []


def assert_no_pending_tasks() -> None:
    others = asyncio.all_tasks() - {asyncio.current_task()}
    assert others == set(), others


def options_for(kind: str, broker_url: Any = None) -> tuple[Transport, dict[str, Any]]:
    """The transport and its connection options; a broker kind is skipped where none runs."""
    if kind == "tcp":
        return Transport.TCP, {"port": 0}
    url = broker_url(kind)
    if kind == "nats":
        return Transport.NATS, {"servers": url}
    return Transport.REDIS, {"url": url}


async def start_app(kind: str, broker_url: Any = None, **options: Any) -> NestMicroservice:
    transport, where = options_for(kind, broker_url)
    app = await NestFactory.create_microservice(
        ShutdownModule, transport=transport, options={**where, **options}
    )
    await app.start()
    return app


def client_for(
    app: NestMicroservice, kind: str, broker_url: Any = None, **options: Any
) -> ClientProxy:
    transport, where = options_for(kind, broker_url)
    if kind == "tcp":
        where = {"port": app.server.port}  # type: ignore[attr-defined]
    return ClientProxyFactory.create(transport, {**where, "timeout": 10, **options})


# --- TCP ------------------------------------------------------------------------


def test_close_grace_defaults_to_five_seconds() -> None:
    assert DEFAULT_CLOSE_GRACE == 5.0
    assert TcpServer().close_grace == 5.0
    assert TcpServer({"close_grace": 0.5}).close_grace == 0.5


async def test_tcp_close_refuses_new_connections_then_delivers_in_flight_replies() -> None:
    with no_leaks():
        app = await start_app("tcp", close_grace=5)
        port = app.server.port  # type: ignore[attr-defined]
        client = client_for(app, "tcp")
        assert await client.send(PING, 1) == "pong"
        in_flight = [asyncio.ensure_future(client.send(SLOW, i)) for i in range(20)]
        stream = asyncio.ensure_future(client.send(COUNT, 20).to_list())
        client.emit(NOTE, "last event")
        await wait_until(lambda: len(app.server._tasks) >= 22)

        loop = asyncio.get_running_loop()
        started = loop.time()
        closing = asyncio.ensure_future(app.close())
        await asyncio.sleep(0)  # close() has begun
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", port)
        late = TcpClient({"port": port, "timeout": 10})
        with pytest.raises(ConnectionError, match="cannot connect"):
            await late.send(PING, 1)

        # Handlers already running finish, and their replies reach the caller.
        assert await asyncio.gather(*in_flight) == list(range(20))
        assert await stream == list(range(20))
        await closing
        took = loop.time() - started
        assert notes == ["last event"]
        assert HANDLER_SECONDS - 0.05 < took < 2.0  # waited for them, not for the grace
        await wait_until(lambda: not client.is_connected)  # and then closed the socket
        with pytest.raises(ConnectionError, match="cannot connect"):
            await client.send(PING, 1)
        await client.close()
        await late.close()
        assert_no_pending_tasks()


async def test_tcp_a_handler_outliving_the_grace_is_cancelled_and_its_caller_told() -> None:
    with no_leaks():
        app = await start_app("tcp", close_grace=0.3)
        client = client_for(app, "tcp")
        hanging = [asyncio.ensure_future(client.send(HANG, i)) for i in range(3)]
        quick = asyncio.ensure_future(client.send(SLOW, 7))
        await wait_until(lambda: len(app.server._tasks) == 4)

        loop = asyncio.get_running_loop()
        started = loop.time()
        await app.close()
        took = loop.time() - started
        assert 0.3 <= took < 1.0  # the grace, then no longer
        assert await quick == 7  # finished within the grace: delivered
        assert sorted(cancelled) == [0, 1, 2]
        for request in hanging:
            # Told at once, not after its 10 s timeout: the server closed the socket.
            with pytest.raises(ConnectionClosedError, match="closed"):
                await asyncio.wait_for(request, 0.1)
        await client.close()
        assert_no_pending_tasks()


async def test_tcp_close_with_idle_and_busy_clients_leaves_nothing_behind() -> None:
    with no_leaks():
        app = await start_app("tcp", close_grace=0.2)
        clients = [client_for(app, "tcp") for _ in range(5)]
        for client in clients:
            assert await client.send(PING, 1) == "pong"
        busy = [asyncio.ensure_future(c.send(HANG, i)) for i, c in enumerate(clients[:2])]
        await wait_until(lambda: len(app.server._tasks) == 2)
        first = asyncio.ensure_future(app.close())
        await asyncio.sleep(0)
        await app.close()  # a second close, during the first: it returns when that is done
        assert first.done()
        assert not app.server._connections  # type: ignore[attr-defined]
        for request in busy:
            with pytest.raises(ConnectionClosedError):
                await request
        for client in clients:
            await client.close()
        await app.close()  # and again, when all is closed
        assert_no_pending_tasks()


async def test_a_second_close_waits_and_the_hooks_run_once_after_the_handlers() -> None:
    """A close() during a close (a signal during an explicit close, say) once ran the
    shutdown hook at once, closing injected clients under handlers still running."""
    app = await NestFactory.create_microservice(
        OrderModule, transport=Transport.TCP, options={"port": 0, "close_grace": 2}
    )
    await app.start()
    client = client_for(app, "tcp")
    try:
        working = asyncio.ensure_future(client.send(f"shutdown.{RUN}.work", 1))
        await wait_until(lambda: len(app.server._tasks) == 1)
        first = asyncio.ensure_future(app.close())
        await asyncio.sleep(0)
        await app.close()
        assert first.done() and await working == 1
        await app.close()  # and once more, after the fact
        assert order == ["handler done", "shutdown hook"]
    finally:
        await client.close()


async def test_tcp_listen_returns_once_closed() -> None:
    app = await NestFactory.create_microservice(
        ShutdownModule, transport=Transport.TCP, options={"port": 0, "close_grace": 0.2}
    )
    serving = asyncio.ensure_future(app.listen())
    await wait_until(lambda: getattr(app.server, "_server", None) is not None)
    assert not serving.done()
    await app.close()
    await asyncio.wait_for(serving, 1)


async def test_sigterm_closes_a_service_process_gracefully() -> None:
    """``enable_shutdown_hooks``: SIGTERM lets running requests finish, then the process exits 0."""
    service = await asyncio.to_thread(ServiceProcess(close_grace=3).start)
    client = TcpClient({"port": service.port, "timeout": 10})
    try:
        echo = {"cmd": "echo"}
        assert await client.send({"cmd": "sum"}, [1]) == 1
        in_flight = [
            asyncio.ensure_future(client.send(echo, {"token": i, "nums": [i], "delay": 0.3}))
            for i in range(10)
        ]
        assert await client.send({"cmd": "sum"}, [2]) == 2  # the echoes are all running
        assert service.proc is not None
        service.proc.terminate()
        replies = await asyncio.wait_for(asyncio.gather(*in_flight), 3)
        assert replies == [{"token": i, "sum": i} for i in range(10)]
        code = await asyncio.to_thread(service.proc.wait, 5)
        assert code == 0
    finally:
        await client.close()
        await asyncio.to_thread(service.stop)


# --- over a broker ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["nats", "redis"])
async def test_broker_close_delivers_in_flight_replies_and_cancels_past_the_grace(
    kind: str, broker_url: Any
) -> None:
    with no_leaks():
        app = await start_app(kind, broker_url, close_grace=0.6)
        client = client_for(app, kind, broker_url)
        assert await client.send(PING, 1) == "pong"
        in_flight = [asyncio.ensure_future(client.send(SLOW, i)) for i in range(20)]
        hanging = asyncio.ensure_future(client.send(HANG, 99))
        await wait_until(lambda: len(app.server._tasks) == 21)

        loop = asyncio.get_running_loop()
        started = loop.time()
        closing = asyncio.ensure_future(app.close())
        await asyncio.sleep(0.1)  # close() has begun: the subscriptions are gone
        late = loop.time()
        with pytest.raises((RpcError, ConnectionError, TimeoutError)) as info:
            await client.send(PING, 2, timeout=0.5)  # not taken by the closing server
        if kind == "nats":  # NATS says so at once: nobody listens any more
            assert "There are no subscribers" in str(info.value)
            assert loop.time() - late < 0.3

        assert await asyncio.gather(*in_flight) == list(range(20))
        with pytest.raises(RpcError, match="shutting down"):
            await asyncio.wait_for(hanging, 2)  # told at once, not after its 10 s timeout
        await closing
        took = loop.time() - started
        assert cancelled == [99]
        assert 0.6 <= took < 1.5
        await client.close()
        assert_no_pending_tasks()


async def test_a_nats_queue_member_closing_under_load_loses_no_request(broker_url: Any) -> None:
    """One of three queue-group members closes while requests keep coming: every request
    is answered, by it or by the two that stay.  nats-server can deliver a message to a
    member after that member's UNSUB and the PONG that follows it; a member that stops
    reading at the PONG drops it, and its caller waits out the timeout."""
    group = f"shutdown-{secrets.token_hex(3)}"
    for trial in range(5):
        apps = [await start_app("nats", broker_url, queue=group) for _ in range(3)]
        client = client_for(apps[0], "nats", broker_url, timeout=2)
        try:
            await asyncio.gather(*(client.send(PING, n) for n in range(50)))
            sends = [client.send(PING, n) for n in range(300)]
            *replies, _ = await asyncio.gather(*sends, apps[0].close(), return_exceptions=True)
            lost = [r for r in replies if isinstance(r, BaseException)]
            assert lost == [], f"trial {trial}: {len(lost)} of 300 lost, first: {lost[0]!r}"
        finally:
            await client.close()
            for app in apps:
                await app.close()
