"""Faults, on real processes and sockets: a server killed mid-request and restarted,
a handler that hangs, a handler that raises, and a broker killed under load.

The TCP server is ``tests/fault_service.py`` in a child process, so SIGKILL is
a real crash: no handler, no reply, the kernel closes the sockets.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_until
from support.faults import ServiceProcess
from support.spares import Spares, spares_for

from nestpy_mini import (
    ClientProxy,
    ClientProxyFactory,
    ConnectionClosedError,
    Controller,
    MessagePattern,
    Module,
    NestFactory,
    RequestTimeoutError,
    RpcError,
    Transport,
)
from nestpy_mini.dev import brokers
from nestpy_mini.transports.tcp import TcpClient

SUM = {"cmd": "sum"}
HANG = {"cmd": "hang"}
BOOM = {"cmd": "boom"}
REFUSE = {"cmd": "refuse"}


@pytest.fixture
async def service() -> AsyncIterator[ServiceProcess]:
    """The fault service in a child process; stopped (or already killed) at teardown.

    Its close grace is short: no test here waits on a graceful close, and the hanging
    handlers would otherwise hold each stop for the whole grace."""
    proc = await asyncio.to_thread(ServiceProcess(close_grace=0.1).start)
    yield proc
    await asyncio.to_thread(proc.stop)


@pytest.fixture
async def client(service: ServiceProcess) -> AsyncIterator[TcpClient]:
    client = TcpClient({"port": service.port, "timeout": 10})
    yield client
    await client.close()


async def test_sigkill_mid_request_fails_in_flight_fast_then_reconnects(
    service: ServiceProcess, client: TcpClient
) -> None:
    assert await client.send(SUM, [1, 2]) == 3
    in_flight = [asyncio.ensure_future(client.send(HANG, i)) for i in range(50)]
    # TCP keeps order and the server dispatches in order, so once this reply
    # is here every hang is running in the server: they are truly mid-request.
    assert await client.send(SUM, [0]) == 0
    assert len(client._routing) == 50

    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.to_thread(service.kill)
    results = await asyncio.wait_for(asyncio.gather(*in_flight, return_exceptions=True), 3)
    failed_after = loop.time() - started
    print(f"\n50 in-flight requests failed {failed_after * 1000:.0f} ms after SIGKILL")
    assert failed_after < 1.0  # their timeout is 10 s: they fail on the lost connection
    assert all(isinstance(r, ConnectionClosedError) for r in results), results
    assert f"connection to tcp://127.0.0.1:{service.port} closed" in str(results[0])
    assert client._routing == {} and not client.is_connected

    # While it is down: a clear error at once, not a wait for the timeout.
    with pytest.raises(ConnectionError, match=f"cannot connect to tcp://127.0.0.1:{service.port}"):
        await client.send(SUM, [1])
    assert loop.time() - started < 2.0

    # The same port again: the client's next send connects and succeeds.
    await asyncio.to_thread(service.start)
    assert await client.send(SUM, [2, 3]) == 5
    assert await asyncio.gather(*(client.send(SUM, [i]) for i in range(100))) == list(range(100))


async def test_a_hanging_handler_times_out_while_the_server_keeps_answering(
    service: ServiceProcess, client: TcpClient
) -> None:
    other = TcpClient({"port": service.port, "timeout": 2})
    loop = asyncio.get_running_loop()
    started = loop.time()
    hanging = [asyncio.ensure_future(client.send(HANG, i, timeout=0.5)) for i in range(5)]
    try:
        # Meanwhile, on the same connection and on another one, answers keep coming.
        for i in range(20):
            assert await client.send(SUM, [i, 1]) == i + 1
            assert await other.send(SUM, [i, 2]) == i + 2
        assert not any(h.done() for h in hanging)
        for h in hanging:
            with pytest.raises(RequestTimeoutError, match=r"no reply to \{'cmd': 'hang'\} within"):
                await h
        assert 0.5 <= loop.time() - started < 1.5
        assert await client.send(SUM, [7]) == 7 and await other.send(SUM, [8]) == 8
    finally:
        await other.close()


async def test_a_raising_handler_gives_an_error_reply_and_the_server_keeps_serving(
    service: ServiceProcess, client: TcpClient
) -> None:
    for i in range(10):
        with pytest.raises(RpcError) as info:
            await client.send(BOOM, i)
        # The bug's text stays in the server's log; the caller gets Nest's generic error.
        assert info.value.error == {"status": "error", "message": "Internal server error"}
        with pytest.raises(RpcError, match=f"refused {i}"):
            await client.send(REFUSE, i)
        assert await client.send(SUM, [i, i]) == 2 * i
    # Failures in a crowd of good requests: each caller gets its own outcome.
    outcomes = await asyncio.gather(
        *(client.send(BOOM if i % 3 == 0 else SUM, [i]) for i in range(300)),
        return_exceptions=True,
    )
    for i, outcome in enumerate(outcomes):
        if i % 3 == 0:
            assert isinstance(outcome, RpcError)
        else:
            assert outcome == i
    assert client.is_connected


# --- a broker killed under load ---------------------------------------------------

RUN = secrets.token_hex(4)
SLOW = f"faults.{RUN}.slow"
ADD = f"faults.{RUN}.add"
KILLED = ["nats", "redis"]  # the kinds of broker killed under load


@Controller()
class LoadController:
    @MessagePattern(SLOW)
    async def slow(self, data: int) -> int:
        await asyncio.sleep(0.3)
        return data

    @MessagePattern(ADD)
    async def add(self, data: list[int]) -> int:
        await asyncio.sleep(0.001)
        return sum(data)


@Module(controllers=[LoadController])
class LoadModule:
    pass


def _parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])  # the name may hold spaces and ")"


def _our_listener(port: int) -> int:
    """The pid of this test's own descendant listening on 127.0.0.1:``port``.

    Found through /proc, and only among our descendants: the test must never
    signal a process it did not start.
    """
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # LISTEN
            inodes.add(f"socket:[{fields[9]}]")
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:  # never this process itself
            continue
        try:
            if not any(os.readlink(fd) in inodes for fd in (entry / "fd").iterdir()):
                continue
            ancestor = int(entry.name)
            while ancestor > 1 and ancestor != me:
                ancestor = _parent_of(ancestor)
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if ancestor == me:
            return int(entry.name)
    raise LookupError(f"no child of this test listens on port {port}")


async def _kill_broker(port: int) -> None:
    pid = await asyncio.to_thread(_our_listener, port)
    os.kill(pid, signal.SIGKILL)


# What a request may end with while its broker is down or coming back: any
# ConnectionError (ConnectionClosedError included), or "no responders"
# (NoRespondersError, an RpcError) before the server's subscriptions are back.
# A timeout is tolerated here; test_restart_under_load.py counts them, and
# requires none where the broker can tell that nobody listens.
OUTAGE_ERRORS = (ConnectionError, RequestTimeoutError, RpcError)


def _outcome(result: Any) -> str:
    if isinstance(result, RpcError):
        assert "There are no subscribers" in str(result), result
        return "no responders"
    if isinstance(result, BaseException):
        assert isinstance(result, OUTAGE_ERRORS), repr(result)
        return type(result).__name__
    return "ok"


@pytest.fixture(scope="module")
def own_brokers(request: pytest.FixtureRequest) -> Iterator[dict[str, Spares]]:
    """A private broker of each kind for the test that kills it."""
    spares = {kind: spares_for(request, kind) for kind in KILLED}
    yield spares
    for kind_spares in spares.values():
        kind_spares.close()


@pytest.mark.parametrize("kind", KILLED)
async def test_a_broker_killed_under_load_fails_fast_and_recovers(
    kind: str, broker_url: Any, own_brokers: dict[str, Spares]
) -> None:
    broker_url(kind)  # skips, with the reason, where this kind of broker cannot run
    broker = await own_brokers[kind].take()
    port = int(broker.url.rsplit(":", 1)[1])
    options: dict[str, Any] = (
        {"servers": broker.url, "reconnect_time_wait": 0.05}
        if kind == "nats"
        else {"url": broker.url, "retry_delay": 0.05}
    )
    transport = Transport.NATS if kind == "nats" else Transport.REDIS
    app = await NestFactory.create_microservice(
        LoadModule, transport=transport, options={**options, "close_grace": 0.5}
    )
    clients: list[ClientProxy] = [
        ClientProxyFactory.create(transport, {**options, "timeout": 1}) for _ in range(4)
    ]
    stop = asyncio.Event()
    tally: Counter[str] = Counter()
    last_ok = [0.0] * len(clients)
    loop = asyncio.get_running_loop()

    async def load(n: int, client: ClientProxy) -> None:
        """Send without pause; every outcome is counted, none may be unexpected."""
        i = 0
        while not stop.is_set():
            i += 1
            try:
                result: Any = await client.send(ADD, [n, i])
                assert result == n + i
                last_ok[n] = loop.time()
            except OUTAGE_ERRORS as exc:
                result = exc
                await asyncio.sleep(0.01)  # an outage: do not spin
            tally[_outcome(result)] += 1

    try:
        await app.start()
        for n, client in enumerate(clients):
            assert await client.send(ADD, [n, 0]) == n
        workers = [asyncio.ensure_future(load(n, c)) for n, c in enumerate(clients)]
        slow = [
            asyncio.ensure_future(c.send(SLOW, i, timeout=10)) for i in range(50) for c in clients
        ]
        await asyncio.sleep(0.1)  # the slow ones are in their handlers now
        await wait_until(lambda: tally["ok"] > 0)  # and the load is being served
        ok_before = tally["ok"]

        killed_at = loop.time()
        await _kill_broker(port)
        await asyncio.to_thread(broker.stop)  # reaps the killed process; it signals no other
        results = await asyncio.wait_for(asyncio.gather(*slow, return_exceptions=True), 5)
        fail_time = loop.time() - killed_at
        assert all(isinstance(r, ConnectionError) for r in results), Counter(map(repr, results))

        broker = await asyncio.to_thread(brokers.start, kind, port)
        restarted_at = loop.time()
        await wait_until(lambda: min(last_ok) > restarted_at, within=10)
        recovered = loop.time() - restarted_at
        stop.set()
        await asyncio.wait_for(asyncio.gather(*workers), 5)
        print(
            f"\n{kind}: {len(slow)} in-flight requests failed {fail_time * 1000:.0f} ms "
            f"after SIGKILL (timeout 10 s); every client served again {recovered * 1000:.0f} ms "
            f"after the restart; outcomes {dict(tally)}"
        )
        assert fail_time < 2.0
        assert tally["ok"] > ok_before
        # And the service is whole again, under load.
        sums = await asyncio.gather(*(c.send(ADD, [i, 1]) for c in clients for i in range(100)))
        assert sums == [i + 1 for _ in clients for i in range(100)]
    finally:
        stop.set()
        for client in clients:
            await client.close()
        await app.close()
        own_brokers[kind].stop(broker)  # in the background
