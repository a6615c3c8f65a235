"""The HTTP half of a hybrid app: Nest-style routes, served by Starlette and uvicorn.

``NestFactory.create(AppModule)`` gives a ``NestApplication`` (``app.py``);
its controllers' ``@Get``/``@Post`` methods become HTTP routes here, and
``connect_microservice`` adds transports that serve the same controllers'
message patterns, so one module answers both HTTP and messages, as in the
chapter's section 2.3.  Installed with the ``http`` extra.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar, get_args, get_origin, get_type_hints

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from .client import Observable

F = TypeVar("F", bound=Callable[..., Any])
ROUTE_ATTR = "__nestpy_routes__"
logger = logging.getLogger("nestpy_mini.http")


def _route(method: str, path: str) -> Callable[[F], F]:
    def decorate(func: F) -> F:
        routes = [*getattr(func, ROUTE_ATTR, ()), (method, path)]
        setattr(func, ROUTE_ATTR, routes)
        return func

    return decorate


def Get(path: str = "") -> Callable[[F], F]:
    return _route("GET", path)


def Post(path: str = "") -> Callable[[F], F]:
    return _route("POST", path)


def Put(path: str = "") -> Callable[[F], F]:
    return _route("PUT", path)


def Delete(path: str = "") -> Callable[[F], F]:
    return _route("DELETE", path)


@dataclass(frozen=True)
class Query:
    """``Annotated[str, Query("q")]``: one query-string parameter (all of them without a name)."""

    name: str | None = None


@dataclass(frozen=True)
class Param:
    """``Annotated[str, Param("id")]`` for a route ``":id"``."""

    name: str


@dataclass(frozen=True)
class Body:
    """``Annotated[T, Body()]``: the JSON body; a pydantic model type is validated."""

    key: str | None = None


class HttpException(Exception):
    """Raise in an HTTP handler to answer with ``status``, like Nest's ``HttpException``."""

    def __init__(self, response: str | dict[str, Any], status: int) -> None:
        super().__init__(response if isinstance(response, str) else json.dumps(response))
        self.response = response
        self.status = status

    def body(self) -> dict[str, Any]:
        if isinstance(self.response, dict):
            return self.response
        return {"statusCode": self.status, "message": self.response}


def _nest_path(prefix: str, path: str) -> str:
    """Nest's ``:id`` segments as Starlette's ``{id}``."""
    parts = [p for p in (*prefix.split("/"), *path.strip("/").split("/")) if p]
    return "/" + "/".join(f"{{{p[1:]}}}" if p.startswith(":") else p for p in parts)


async def _argument(request: Request, hint: Any) -> Any:
    base, marker = hint, None
    if get_origin(hint) is Annotated:
        base, *extras = get_args(hint)
        marker = next((e for e in extras if isinstance(e, Query | Param | Body)), None)
    if base is Request or (marker is None and isinstance(base, type) and issubclass(base, Request)):
        return request
    if isinstance(marker, Param):
        value: Any = request.path_params.get(marker.name)
    elif isinstance(marker, Query):
        value = request.query_params.get(marker.name) if marker.name else dict(request.query_params)
    elif isinstance(marker, Body):
        value = await request.json() if await request.body() else None
        if marker.key is not None and isinstance(value, dict):
            value = value.get(marker.key)
    else:
        raise TypeError(f"cannot bind a parameter of type {hint!r}; use Query, Param or Body")
    if isinstance(base, type) and hasattr(base, "model_validate"):
        try:
            return base.model_validate(value)
        except ValueError as exc:
            raise HttpException(
                {
                    "statusCode": 400,
                    "message": "Validation failed",
                    "errors": json.loads(exc.json()),
                },
                400,
            ) from exc
    if base in (int, float) and isinstance(value, str):
        try:
            return base(value)
        except ValueError as exc:
            raise HttpException(f"{value!r} is not a valid {base.__name__}", 400) from exc
    return value


def _endpoint(method: Callable[..., Any], name: str) -> Callable[[Request], Any]:
    hints = get_type_hints(getattr(method, "__func__", method), include_extras=True)
    params = [p.name for p in inspect.signature(method).parameters.values()]

    async def endpoint(request: Request) -> Response:
        try:
            args = [await _argument(request, hints.get(p)) for p in params]
            result = method(*args)
            if inspect.isawaitable(result) or isinstance(result, Observable):
                # Nest resolves an Observable returned by an HTTP handler to its last value.
                result = await result
        except HttpException as exc:
            return JSONResponse(exc.body(), exc.status)
        except Exception:
            logger.exception("%s failed", name)
            return JSONResponse({"statusCode": 500, "message": "Internal server error"}, 500)
        if isinstance(result, Response):
            return result
        if isinstance(result, str):
            return PlainTextResponse(result)
        return JSONResponse(result)

    return endpoint


def build_routes(controllers: list[tuple[Any, str]]) -> list[Route]:
    """A route per ``@Get``/``@Post``... method of each ``(controller, prefix)``."""
    routes = []
    for controller, prefix in controllers:
        cls = type(controller)
        for attr in dir(cls):
            for verb, path in getattr(getattr(cls, attr, None), ROUTE_ATTR, ()):
                endpoint = _endpoint(getattr(controller, attr), f"{cls.__name__}.{attr}")
                routes.append(Route(_nest_path(prefix, path), endpoint, methods=[verb]))
    return routes


class _Uvicorn(uvicorn.Server):
    """uvicorn without its signal handlers: in a notebook, Ctrl-C/interrupt
    belongs to the kernel, and ``close()`` is how the app stops."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


# How long start() waits for uvicorn to bind, and close() for it to finish.
START_TIMEOUT = 10.0
CLOSE_TIMEOUT = 10.0


class HttpServer:
    """The controllers' routes on uvicorn, started and stopped inside the caller's loop."""

    def __init__(self, controllers: list[tuple[Any, str]]) -> None:
        self.asgi = Starlette(routes=build_routes(controllers))
        self._server: _Uvicorn | None = None
        self._task: asyncio.Task[None] | None = None
        self.host = "127.0.0.1"
        self.port = 0

    async def start(self, host: str, port: int) -> None:
        config = uvicorn.Config(
            self.asgi, host=host, port=port, log_level="warning", lifespan="off", access_log=False
        )
        self._server = server = _Uvicorn(config)
        self._task = asyncio.ensure_future(self._serve(server))
        for _ in range(int(START_TIMEOUT / 0.01)):  # uvicorn sets a flag; nothing to await
            if server.started or self._task.done():
                break
            await asyncio.sleep(0.01)
        if not server.started:
            await self._task  # raises why it could not start
            raise OSError(f"HTTP server did not start on {host}:{port}")
        self.host = host
        self.port = server.servers[0].sockets[0].getsockname()[1]

    @staticmethod
    async def _serve(server: _Uvicorn) -> None:
        try:
            await server.serve()
        except SystemExit as exc:  # uvicorn exits the process on bind errors
            raise OSError(f"HTTP server could not start (uvicorn exit {exc.code})") from None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def close(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await asyncio.wait([self._task], timeout=CLOSE_TIMEOUT)
        self._server = self._task = None
