"""Private brokers for tests that need a broker of their own, started ahead of their turn.

Starting an embedded broker takes a few tenths of a second (a Python process
that starts the broker and waits until it answers), and stopping one about
as long.  ``Spares`` starts the next test's broker while the test before it
runs, and stops a used one in the background.  Each test still gets a fresh
broker that no other test has touched.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from nestpy_mini.dev import brokers


class Spares:
    """Fresh private brokers of one kind for ``wanted`` tests, each started before it is asked for.

    Threads, not tasks: each test may run on an event loop of its own.
    """

    def __init__(self, kind: str, wanted: int) -> None:
        self.kind = kind
        self.wanted = wanted  # how many more tests will take one
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"spare-{kind}")
        self._next: Future[brokers.Broker] | None = None
        self._stopping: list[Future[None]] = []
        self._refill()

    def _start(self) -> Future[brokers.Broker]:
        return self._pool.submit(lambda: brokers.start(self.kind, brokers.free_port()))

    def _refill(self) -> None:
        if self.wanted > 0:
            self.wanted -= 1
            self._next = self._start()

    async def take(self) -> brokers.Broker:
        """A broker of its own for the calling test; the next one starts meanwhile."""
        started, self._next = self._next or self._start(), None
        broker = await asyncio.wrap_future(started)
        self._refill()
        return broker

    def stop(self, broker: brokers.Broker) -> None:
        """Stop ``broker`` in the background; ``close`` waits for it."""
        self._stopping.append(self._pool.submit(broker.stop))

    def close(self) -> None:
        """Stop a spare nobody took, wait for every stop, and raise the first error."""
        if self._next is not None:
            try:
                spare = self._next.result()
            except Exception:
                pass  # it could not start, but no test asked for it: none reports it
            else:
                spare.stop()
        self._pool.shutdown(wait=True)
        for stopping in self._stopping:
            stopping.result()


def spares_for(request: pytest.FixtureRequest, kind: str) -> Spares:
    """``Spares`` for the tests of the requesting module that use this fixture."""
    wanted = sum(
        request.fixturename in getattr(item, "fixturenames", ())
        for item in request.session.items
        if getattr(item, "module", None) is request.module
    )
    return Spares(kind, wanted)
