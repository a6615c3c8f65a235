"""NestFactory and the application objects it returns.

``listen()`` serves until the app is closed, as in Nest.  ``start()`` and
``close()`` are the non-blocking pair for code that already runs inside an
event loop, such as a notebook cell.
"""

from __future__ import annotations

import asyncio
import inspect
import signal
from typing import TYPE_CHECKING, Any

from .injector import Container
from .patterns import PATTERN_ATTR
from .server import Server
from .transports import Transport, load

if TYPE_CHECKING:
    from .http import NestApplication


async def call_hooks(instances: list[Any], name: str) -> None:
    for instance in instances:
        hook = getattr(instance, name, None)
        if hook is not None:
            result = hook()
            if inspect.isawaitable(result):
                await result


def register_handlers(server: Server, controllers: list[Any]) -> None:
    """Give ``server`` every ``@MessagePattern``/``@EventPattern`` method of the controllers."""
    for controller in controllers:
        cls = type(controller)
        for attr in dir(cls):
            func = getattr(cls, attr, None)
            for pattern, is_event, extras in getattr(func, PATTERN_ATTR, ()):
                server.add_handler(
                    pattern, getattr(controller, attr), is_event, f"{cls.__name__}.{attr}", extras
                )


class NestMicroservice:
    """A microservice: one module graph served over one transport."""

    def __init__(
        self, container: Container, server: Server, *, owns_container: bool = True
    ) -> None:
        self.container = container
        self.server = server
        self._owns_container = owns_container
        self._started = False
        self._closed: asyncio.Event | None = None
        # The one close in progress (or done): a second close() -- a signal
        # during an explicit close, say -- waits for it instead of running the
        # shutdown hooks (which close the clients) under handlers still running.
        self._closing: asyncio.Future[None] | None = None
        self._signals: tuple[asyncio.AbstractEventLoop, list[int]] | None = None
        self._signal_close: asyncio.Future[None] | None = None

    def get(self, token: Any) -> Any:
        """The instance the container built for ``token``."""
        return self.container.get(token)

    async def start(self) -> NestMicroservice:
        """Begin serving and return at once."""
        if self._started:
            return self
        await self.server.listen()
        self._started = True
        self._closed = asyncio.Event()
        # Started again after a close: a later close() is a new one.
        self._closing = self._signal_close = None
        if self._owns_container:
            await call_hooks(list(self.container.instances()), "on_application_bootstrap")
        return self

    def enable_shutdown_hooks(self) -> NestMicroservice:
        """Close gracefully on SIGINT/SIGTERM, as Nest's ``enableShutdownHooks``."""
        loop = asyncio.get_running_loop()
        sigs = [signal.SIGINT, signal.SIGTERM]
        for sig in sigs:
            loop.add_signal_handler(sig, self._on_signal)
        self._signals = (loop, sigs)
        return self

    async def listen(self) -> None:
        """Serve until ``close()`` is called (from a handler, a signal, another task)."""
        await self.start()
        assert self._closed is not None
        await self._closed.wait()

    async def close(self) -> None:
        """Stop accepting, let running handlers finish (within ``close_grace``),
        close connections and clients.  Safe to call again, or at the same time:
        every caller returns once the one close is done."""
        if self._closing is not None:
            # shield: a waiter cancelled here must not cancel the close itself.
            await asyncio.shield(self._closing)
            return
        # The first caller closes inline, not in a task: the transport stops
        # accepting within this very call, before any other task runs.
        done = self._closing = asyncio.get_running_loop().create_future()
        try:
            await self._close()
        except asyncio.CancelledError:
            done.cancel()
            raise
        except BaseException as exc:
            done.set_exception(exc)
            done.exception()  # retrieved: there may be no other caller to see it
            raise
        done.set_result(None)

    def _on_signal(self) -> None:
        # The task is kept: a bare ensure_future() could be garbage-collected mid-close.
        if self._signal_close is None:
            self._signal_close = asyncio.ensure_future(self.close())

    async def _close(self) -> None:
        self._remove_signal_handlers()
        try:
            if self._started:
                self._started = False
                await self.server.close()
                if self._owns_container:
                    await call_hooks(list(self.container.instances()), "on_module_destroy")
            if self._owns_container:
                await call_hooks(list(self.container.instances()), "on_application_shutdown")
        finally:
            # Even if a hook failed: listen() must return, or a SIGTERM'd process never exits.
            if self._closed is not None:
                self._closed.set()

    def _remove_signal_handlers(self) -> None:
        signals, self._signals = self._signals, None
        if signals is not None and not signals[0].is_closed():
            for sig in signals[1]:
                signals[0].remove_signal_handler(sig)

    async def __aenter__(self) -> NestMicroservice:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class NestFactory:
    """Creates applications from a root module."""

    @staticmethod
    async def create(module: Any) -> NestApplication:
        """An HTTP application; add transports with ``connect_microservice`` for a hybrid."""
        from .http import NestApplication  # Starlette loads only for HTTP apps

        container = Container(module)
        await container.init()
        await call_hooks(list(container.instances()), "on_module_init")
        return NestApplication(container)

    @staticmethod
    async def create_microservice(
        module: Any,
        *,
        transport: Transport | int = Transport.TCP,
        options: dict[str, Any] | None = None,
        strategy: Server | None = None,
    ) -> NestMicroservice:
        """Build the module graph (raising on wiring mistakes) and a server for it."""
        container = Container(module)
        await container.init()
        await call_hooks(list(container.instances()), "on_module_init")
        server = strategy if strategy is not None else load(transport).SERVER(options)
        register_handlers(server, container.controllers)
        return NestMicroservice(container, server)
