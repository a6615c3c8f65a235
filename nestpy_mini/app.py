"""NestFactory, the applications it returns, and the clients that ``ClientsModule`` provides.

``start()`` is Nest's ``listen()``: it returns once the server is ready.  ``listen()`` here also
waits until the app is closed, as a script's last line wants (``run(main())`` starts that loop);
``start()`` and ``close()`` are the pair for code already inside an event loop, such as a
notebook cell.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from .client import ClientProxy
from .decorators import PATTERN_ATTR, PREFIX_ATTR, DynamicModule, Module
from .exceptions import WiringError
from .injector import Container
from .server import Server
from .transports import Transport, load

if TYPE_CHECKING:
    from .http import HttpServer

SHUTDOWN_SIGNALS = (signal.SIGINT, signal.SIGTERM)
LOOPS = ("auto", "asyncio", "uvloop")
T = TypeVar("T")


def run(main: Coroutine[Any, Any, T], *, loop: str = "auto") -> T:
    """``asyncio.run`` for a script's last line, on uvloop where it imports (uvicorn's "auto"):
    measured, a pair's p50 -13% on TCP and -22% on NATS (the README's benchmark section).

    The loop is chosen per run and no policy is installed on import: a notebook keeps its
    kernel's loop.  ``NESTPY_LOOP`` replaces the default "auto", to turn uvloop off without a
    code change.  "uvloop" without uvloop raises ``ModuleNotFoundError`` with the install
    line, as an HTTP app without Starlette does."""
    choice = (os.environ.get("NESTPY_LOOP") or loop) if loop == "auto" else loop
    runner: Callable[[Coroutine[Any, Any, T]], T] = asyncio.run
    problem: Exception | None = None
    if choice not in LOOPS:
        problem = ValueError(f"loop {choice!r} (NESTPY_LOOP or loop=): choose {'|'.join(LOOPS)}")
    elif choice != "asyncio":
        try:
            import uvloop

            runner = uvloop.run
        except ImportError:
            if choice == "uvloop":
                hint = "loop='uvloop' needs uvloop: pip install 'nestpy-mini[fast]'"
                problem = ModuleNotFoundError(hint, name="uvloop")
    if problem is not None:
        main.close()  # never started: no "never awaited" warning after the one clear line
        raise problem
    return runner(main)


def loop_name() -> str:
    """The running loop's package, "uvloop" or "asyncio": what a benchmark or a log records."""
    return type(asyncio.get_running_loop()).__module__.split(".")[0]


class NestMicroservice:
    """A microservice: the controllers' message and event handlers served over one transport."""

    def __init__(
        self, container: Container, server: Server, *, owns_container: bool = True
    ) -> None:
        for controller in container.controllers:
            cls = type(controller)
            for attr in dir(cls):
                marks = getattr(getattr(cls, attr, None), PATTERN_ATTR, ())
                for pattern, is_event, extras in marks:
                    name = f"{cls.__name__}.{attr}"
                    server.add_handler(pattern, getattr(controller, attr), is_event, name, extras)
        self.container = container
        self.server = server
        self._owns_container = owns_container  # False in a hybrid app: the app runs the hooks
        self._started = False
        self._closing = False
        self._closed = asyncio.Event()  # set once a close is done
        self._signal_loop: asyncio.AbstractEventLoop | None = None
        self._signal_close: asyncio.Future[None] | None = None

    def get(self, token: Any) -> Any:
        return self.container.get(token)

    async def _hooks(self, *names: str) -> None:
        if self._owns_container:
            await self.container.call_hooks(*names)

    async def start(self) -> NestMicroservice:
        """Begin serving; return once the server is ready, as Nest's ``listen()`` does."""
        if not self._started:
            await self.server.listen()
            self._started = True
            self._closing = False  # started again after a close: a later close() is a new one
            self._closed.clear()
            await self._hooks("on_application_bootstrap")
        return self

    def enable_shutdown_hooks(self) -> NestMicroservice:
        """Close gracefully on SIGINT/SIGTERM, as Nest's ``enableShutdownHooks``."""
        self._signal_loop = asyncio.get_running_loop()
        for sig in SHUTDOWN_SIGNALS:
            self._signal_loop.add_signal_handler(sig, self._on_signal)
        return self

    def _on_signal(self) -> None:
        if self._signal_close is None or self._signal_close.done():
            # Kept: a task nobody references could be garbage-collected mid-close.
            self._signal_close = asyncio.ensure_future(self.close())

    async def listen(self) -> None:
        """``start()``, then wait until ``close()`` is called (by a handler, a signal, another
        task): a script's last line.  Nest's ``listen()`` resolves once ready, as ``start()``."""
        await self.start()
        await self._closed.wait()

    async def close(self) -> None:
        """Stop accepting (in this call, not in a task), let running handlers finish within
        ``close_grace``, then run the shutdown hooks, which close the clients.  A second close
        (a signal during an explicit one) waits for the first."""
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        if self._signal_loop is not None:
            for sig in SHUTDOWN_SIGNALS:
                self._signal_loop.remove_signal_handler(sig)
            self._signal_loop = None
        try:
            if self._started:
                self._started = False
                await self.server.close()
                await self._hooks("on_module_destroy")
            await self._hooks("on_application_shutdown")
        finally:
            # Even if a hook failed: listen() must return, or a SIGTERM'd process never exits.
            self._closed.set()

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
        self.microservices.append(NestMicroservice(self.container, server, owns_container=False))
        return self.microservices[-1]

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
        await self.container.call_hooks("on_application_bootstrap")

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
        await self.container.call_hooks("on_module_destroy", "on_application_shutdown")


class NestFactory:
    """Creates applications from a root module: each builds the module graph (raising on
    wiring mistakes) and runs ``on_module_init`` first."""

    @staticmethod
    async def create(module: Any) -> NestApplication:
        """An HTTP application; add transports with ``connect_microservice`` for a hybrid."""
        return NestApplication(await Container(module).init())

    @staticmethod
    async def create_microservice(
        module: Any,
        *,
        transport: Transport | int = Transport.TCP,
        options: dict[str, Any] | None = None,
        strategy: Server | None = None,
    ) -> NestMicroservice:
        """The module served over ``transport``, or by ``strategy``, a custom ``Server``."""
        server = strategy if strategy is not None else load(transport).SERVER(options)
        return NestMicroservice(await Container(module).init(), server)


class ClientProxyFactory:
    """Builds the client for a transport, as Nest's factory of the same name."""

    @staticmethod
    def create(
        transport: Transport | int = Transport.TCP,
        options: dict[str, Any] | None = None,
        custom_class: type[ClientProxy] | None = None,
    ) -> ClientProxy:
        return (custom_class or load(transport).CLIENT)(options)


@Module()
class ClientsModule:
    """``ClientsModule.register([...])`` provides one client per ``name`` token."""

    @staticmethod
    def register(clients: list[dict[str, Any]], *, is_global: bool = False) -> DynamicModule:
        providers = []
        for spec in clients:
            if "name" not in spec:
                raise WiringError(f"ClientsModule.register: client {spec!r} has no 'name'")
            transport = spec.get("transport", Transport.TCP)
            args = (transport, spec.get("options"), spec.get("custom_class"))
            factory = functools.partial(ClientProxyFactory.create, *args)
            providers.append({"provide": spec["name"], "use_factory": factory})
        names = [spec["name"] for spec in clients]
        return DynamicModule(ClientsModule, providers=providers, exports=names, is_global=is_global)
