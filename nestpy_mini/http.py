"""The HTTP half of a hybrid app (the chapter's 2.3), on Starlette and uvicorn: the ``http`` extra.

``NestFactory.create(AppModule)`` gives a ``NestApplication`` (``app.py``) whose controllers'
``@Get``/``@Post`` methods become routes here, while ``connect_microservice`` serves the same
controllers' message patterns: one module answers both.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any, get_args, get_origin, get_type_hints

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from .client import Observable
from .decorators import F, mark

ROUTE_ATTR = "__nestpy_routes__"
CLOSE_TIMEOUT = 10.0  # seconds close() waits for requests in flight
logger = logging.getLogger("nestpy_mini.http")


def _mapping(verb: str) -> Callable[[str], Callable[[F], F]]:
    """One decorator per verb, as Nest builds ``@Get`` and the rest from ``RequestMapping``."""

    def decorator(path: str = "") -> Callable[[F], F]:
        return mark(ROUTE_ATTR, (verb, path))

    return decorator


Get, Post, Put, Delete = (_mapping(verb) for verb in ("GET", "POST", "PUT", "DELETE"))


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
    """``Annotated[T, Body()]``: the JSON body (``Body("key")`` one field); pydantic validates."""

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


async def _argument(request: Request, hint: Any) -> Any:
    """The value of one handler parameter, as its ``Query``/``Param``/``Body`` marker says."""
    base, *extras = get_args(hint) if get_origin(hint) is Annotated else (hint,)
    marker = next((e for e in extras if isinstance(e, Query | Param | Body)), None)
    if isinstance(marker, Param):
        value: Any = request.path_params.get(marker.name)
    elif isinstance(marker, Query):
        value = request.query_params.get(marker.name) if marker.name else dict(request.query_params)
    elif isinstance(marker, Body):
        value = await request.json() if await request.body() else None
        if marker.key is not None and isinstance(value, dict):
            value = value.get(marker.key)
    elif isinstance(base, type) and issubclass(base, Request):
        return request
    else:
        raise TypeError(f"cannot bind a parameter of type {hint!r}; use Query, Param or Body")
    if hasattr(base, "model_validate"):
        try:
            return base.model_validate(value)
        except ValueError as exc:
            errors = json.loads(exc.json())
            body = {"statusCode": 400, "message": "Validation failed", "errors": errors}
            raise HttpException(body, 400) from exc
    if base in (int, float) and isinstance(value, str):
        try:
            return base(value)
        except ValueError as exc:
            raise HttpException(f"{value!r} is not a valid {base.__name__}", 400) from exc
    return value


def _endpoint(method: Callable[..., Any], name: str) -> Callable[[Request], Any]:
    hints = get_type_hints(getattr(method, "__func__", method), include_extras=True)
    params = list(inspect.signature(method).parameters)

    async def endpoint(request: Request) -> Response:
        try:
            result = method(*[await _argument(request, hints.get(p)) for p in params])
            if inspect.isawaitable(result) or isinstance(result, Observable):
                result = await result  # Nest answers with an Observable's last value
        except HttpException as exc:
            return JSONResponse(exc.body(), exc.status)
        except Exception:
            logger.exception("%s failed", name)
            return JSONResponse({"statusCode": 500, "message": "Internal server error"}, 500)
        if isinstance(result, Response):
            return result
        return PlainTextResponse(result) if isinstance(result, str) else JSONResponse(result)

    return endpoint


def _route(prefix: str, verb: str, path: str, method: Callable[..., Any], name: str) -> Route:
    """Nest's ``:id`` segments become Starlette's ``{id}``."""
    parts = [p for p in (*prefix.split("/"), *path.strip("/").split("/")) if p]
    nest_path = "/" + "/".join(f"{{{p[1:]}}}" if p.startswith(":") else p for p in parts)
    return Route(nest_path, _endpoint(method, name), methods=[verb])


class _Uvicorn(uvicorn.Server):
    """uvicorn without signal handlers: in a notebook Ctrl-C is the kernel's; close() stops it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpServer:
    """The controllers' routes on uvicorn, started and stopped inside the caller's loop."""

    def __init__(self, controllers: list[tuple[Any, str]]) -> None:
        routes = []
        for controller, prefix in controllers:
            cls = type(controller)
            for attr in dir(cls):
                for verb, path in getattr(getattr(cls, attr, None), ROUTE_ATTR, ()):
                    method = getattr(controller, attr)
                    routes.append(_route(prefix, verb, path, method, f"{cls.__name__}.{attr}"))
        self.asgi = Starlette(routes=routes)
        self._server: _Uvicorn | None = None
        self._task: asyncio.Task[None] | None = None
        self.host = "127.0.0.1"
        self.port = 0

    async def start(self, host: str, port: int) -> None:
        # Bound here rather than by uvicorn, which calls sys.exit() when the port is taken.
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            sock = socket.create_server((host, port), family=family)
        except OSError as exc:
            raise OSError(exc.errno, f"HTTP server could not start: {exc.strerror}") from None
        config = uvicorn.Config(self.asgi, log_level="warning", lifespan="off", access_log=False)
        self._server = server = _Uvicorn(config)
        self._task = asyncio.ensure_future(server.serve(sockets=[sock]))
        while not server.started:  # uvicorn sets a flag; there is nothing to await
            if self._task.done():
                raise OSError("HTTP server stopped while starting") from self._task.exception()
            await asyncio.sleep(0.01)
        self.host = host
        self.port = sock.getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def close(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await asyncio.wait([self._task], timeout=CLOSE_TIMEOUT)
        self._server = self._task = None
