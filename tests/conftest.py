"""Shared fixtures: real servers on real loopback sockets, closed after each test."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from support.rabbit import PrivateRabbit, rabbit_missing

from nestpy_mini import (
    ClientProxy,
    ClientProxyFactory,
    NestFactory,
    NestMicroservice,
    Transport,
)
from nestpy_mini.dev import brokers

Serve = Callable[..., Awaitable[NestMicroservice]]
Apps = Callable[[Any, Transport, dict[str, Any]], Awaitable[NestMicroservice]]
Clients = Callable[[Transport, dict[str, Any]], ClientProxy]


@pytest.fixture
async def apps() -> AsyncIterator[Apps]:
    """Start a module over a transport with these options; every app is closed at teardown."""
    started: list[NestMicroservice] = []

    async def start(module: Any, transport: Transport, options: dict[str, Any]) -> NestMicroservice:
        app = await NestFactory.create_microservice(module, transport=transport, options=options)
        await app.start()
        started.append(app)
        return app

    yield start
    for app in started:
        await app.close()


@pytest.fixture
async def clients() -> AsyncIterator[Clients]:
    """Make a client for a transport with these options; all are closed at teardown."""
    made: list[ClientProxy] = []

    def make(transport: Transport, options: dict[str, Any]) -> ClientProxy:
        client = ClientProxyFactory.create(transport, options)
        made.append(client)
        return client

    yield make
    for client in made:
        await client.close()


@pytest.fixture
def serve(apps: Apps) -> Serve:
    """Start a module as a TCP microservice on a free port."""
    return lambda module, **options: apps(module, Transport.TCP, {"port": 0, **options})


@pytest.fixture
def tcp_client(clients: Clients) -> Callable[..., ClientProxy]:
    """Make clients for a port."""
    return lambda port, **options: clients(Transport.TCP, {"port": port, **options})


async def wait_until(predicate: Callable[[], bool], within: float = 3.0) -> None:
    """Poll ``predicate`` until true; fail the test instead of hanging."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {within:.1f} s")
        await asyncio.sleep(0.005)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """With NESTPY_NO_SKIP=1 (set by CI) a skipped test fails: CI must run everything."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("NESTPY_NO_SKIP") and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped, but NESTPY_NO_SKIP is set: {reason}"


@pytest.fixture(scope="session")
def broker_url() -> Callable[[str], str]:
    """The URL of a usable broker of a kind, found as ``nestpy_mini.brokers`` finds it.

    Where none can serve, the test is skipped with the one-line reason (a
    failure under NESTPY_NO_SKIP).  An env URL that does not answer is an
    error, never a skip: it was asked for explicitly.
    """

    def get(kind: str) -> str:
        try:
            return brokers.find(kind).url
        except brokers.BrokerUnavailable as exc:
            if os.environ.get(brokers.ENV[kind]):
                raise
            pytest.skip(str(exc))

    return get


# The RabbitMQ restart test's private node boots in about 6 s: it starts as
# soon as collection shows the test will run, and boots while others run.
_rabbit: PrivateRabbit | None = None


def pytest_collection_finish(session: pytest.Session) -> None:
    global _rabbit
    restarts = ("test_rmq.py::test_broker_restart", "test_the_broker_goes_away_and_comes_back[RMQ]",
                "test_restart_under_load.py::test_a_broker_restart_under_load")
    wanted = any(i.nodeid.endswith(restarts) for i in session.items)
    if wanted and rabbit_missing() is None:
        _rabbit = PrivateRabbit()
        _rabbit.start_in_background()


def pytest_sessionfinish(session: pytest.Session) -> None:
    if _rabbit is not None:
        _rabbit.close()


@pytest.fixture(scope="session")
def private_rabbit() -> PrivateRabbit | None:
    """The restart test's RabbitMQ node, already booting; None where it cannot run."""
    return _rabbit


@pytest.fixture
def stranger() -> Iterator[int]:
    """A TCP port where something answers (an HTTP 400), but in no broker's protocol."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.05)  # so the loop notices `done` without a connection
    port = server.getsockname()[1]
    done = threading.Event()

    def answer() -> None:
        while not done.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    yield port
    done.set()
    thread.join(2)
    server.close()
