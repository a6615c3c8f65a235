"""NestFactory, the applications it returns, and the clients that ``ClientsModule`` provides.

``start()`` is Nest's ``listen()``: it returns once the server is ready.
``listen()`` here also waits until the app is closed, which is what a
script's last line wants; ``start()`` and ``close()`` are the pair for code
that already runs inside an event loop, such as a notebook cell.
"""

from __future__ import annotations

import asyncio
import inspect
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .client import ClientProxy
from .decorators import PATTERN_ATTR, PREFIX_ATTR, DynamicModule, Module
from .exceptions import WiringError
from .injector import Container
from .server import Server
from .transports import Transport, load

if TYPE_CHECKING:
    from .http import HttpServer


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
        """Start, then serve until ``close()`` is called (by a handler, a signal, another task)."""
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


class NestApplication:
    """An HTTP app that can also serve message patterns: the chapter's hybrid app (2.3)."""

    def __init__(self, container: Container) -> None:
        self.container = container
        self.microservices: list[NestMicroservice] = []
        self.http: HttpServer | None = None

    def get(self, token: Any) -> Any:
        return self.container.get(token)

    def connect_microservice(
        self, *, transport: Transport | int = Transport.TCP, options: dict[str, Any] | None = None
    ) -> NestMicroservice:
        """Serve this app's message patterns over ``transport`` as well."""
        server = load(transport).SERVER(options)
        register_handlers(server, self.container.controllers)
        microservice = NestMicroservice(self.container, server, owns_container=False)
        self.microservices.append(microservice)
        return microservice

    async def start_all_microservices(self) -> None:
        for microservice in self.microservices:
            await microservice.start()

    async def listen(self, port: int = 3000, host: str = "127.0.0.1") -> None:
        """Start HTTP and return once it accepts connections, as Nest's ``listen``."""
        try:
            from .http import HttpServer  # Starlette loads only for HTTP apps
        except ModuleNotFoundError as exc:
            raise ModuleNotFoundError(
                f"HTTP apps need {exc.name}: pip install 'nestpy-mini[http]'", name=exc.name
            ) from None

        routes = [(c, getattr(type(c), PREFIX_ATTR, "")) for c in self.container.controllers]
        self.http = HttpServer(routes)
        await self.http.start(host, port)
        await call_hooks(list(self.container.instances()), "on_application_bootstrap")

    @property
    def url(self) -> str:
        """``http://host:port`` once listening."""
        if self.http is None:
            raise RuntimeError("the HTTP server is not listening yet: await app.listen() first")
        return self.http.url

    @property
    def port(self) -> int:
        return self.http.port if self.http is not None else 0

    async def close(self) -> None:
        """Close the microservices, then HTTP, then the providers (clients included)."""
        for microservice in self.microservices:
            await microservice.close()
        if self.http is not None:
            await self.http.close()
        await call_hooks(list(self.container.instances()), "on_module_destroy")
        await call_hooks(list(self.container.instances()), "on_application_shutdown")


class NestFactory:
    """Creates applications from a root module."""

    @staticmethod
    async def create(module: Any) -> NestApplication:
        """An HTTP application; add transports with ``connect_microservice`` for a hybrid."""
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


class ClientProxyFactory:
    """Builds the client for a transport, as Nest's factory of the same name."""

    @staticmethod
    def create(
        transport: Transport | int = Transport.TCP,
        options: dict[str, Any] | None = None,
        custom_class: type[ClientProxy] | None = None,
    ) -> ClientProxy:
        if custom_class is not None:
            return custom_class(options)
        return load(transport).CLIENT(options)


@Module()
class ClientsModule:
    """``ClientsModule.register([...])`` provides one client per ``name`` token."""

    @staticmethod
    def register(clients: list[dict[str, Any]], *, is_global: bool = False) -> DynamicModule:
        providers = []
        for spec in clients:
            if "name" not in spec:
                raise WiringError(f"ClientsModule.register: client {spec!r} has no 'name'")
            providers.append({"provide": spec["name"], "use_factory": _client_factory(spec)})
        return DynamicModule(
            ClientsModule,
            providers=providers,
            exports=[p["provide"] for p in providers],
            is_global=is_global,
        )


def _client_factory(spec: dict[str, Any]) -> Callable[[], ClientProxy]:
    transport = spec.get("transport", Transport.TCP)
    options = spec.get("options")
    custom = spec.get("custom_class")
    return lambda: ClientProxyFactory.create(transport, options, custom)
