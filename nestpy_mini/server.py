"""The transport-independent half of a microservice: handlers and dispatch.

A transport decodes a packet, builds its context and calls
``handle_request`` or ``handle_event``; everything about how a handler is
called and how its outcome becomes reply packets lives here, once.  Reply
packets carry Nest's keys in Nest's order (``response``, ``isDisposed``,
``err``, then ``id``) so NestJS clients read them unchanged.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, get_args, get_origin, get_type_hints

from .decorators import Ctx, Payload
from .exceptions import RpcException, WiringError
from .packets import (
    NO_EVENT_HANDLER,
    SHUTDOWN_ERROR,
    UNKNOWN_EXCEPTION_MESSAGE,
    Incoming,
    failure,
    final,
    no_handler,
)
from .patterns import normalize_pattern, route_of_incoming, screened_route

Reply = Callable[[dict[str, Any]], Awaitable[None] | None]

# How long close() lets running handlers finish before cancelling them.
DEFAULT_CLOSE_GRACE = 5.0
# How long close() then waits for the cancelled ones to unwind: a handler that
# swallows its cancellation must not hold shutdown up for ever.
CANCEL_WAIT = 1.0
# Patterns in messages longer than this (characters) are screened before
# routing (see patterns.screened_route); shorter ones cannot be costly.
LARGE_MESSAGE = 256


class BaseRpcContext:
    """What a handler can learn about the message besides its data."""

    __slots__ = ("args",)

    def __init__(self, args: tuple[Any, ...]) -> None:
        self.args = args

    def get_args(self) -> tuple[Any, ...]:
        return self.args

    def get_arg_by_index(self, index: int) -> Any:
        return self.args[index]


def _validation_error(exc: Exception) -> RpcException:
    details = json.loads(exc.json(include_url=False)) if hasattr(exc, "json") else str(exc)
    return RpcException({"status": "error", "message": "Validation failed", "errors": details})


def _param_source(hint: Any, position: int) -> tuple[str, Any, Any]:
    """Where one handler parameter comes from: ``("data"|"ctx", key, model)``."""
    base, marker = hint, None
    if get_origin(hint) is Annotated:
        base, *extras = get_args(hint)
        marker = next((e for e in extras if isinstance(e, Payload | Ctx)), None)
    model = base if isinstance(base, type) and hasattr(base, "model_validate") else None
    if isinstance(marker, Ctx):
        return "ctx", None, None
    if isinstance(marker, Payload):
        return "data", marker.key, model
    return ("data" if position == 0 else "ctx"), None, model


class Handler:
    """A bound controller method with its parameters resolved once, up front."""

    __slots__ = ("call", "extras", "is_async", "is_stream", "name")

    def __init__(
        self, method: Callable[..., Any], name: str, extras: dict[str, Any] | None = None
    ) -> None:
        self.name = name
        # Per-handler transport settings, e.g. {"queue": ...} on NATS, {"qos": 1} on MQTT.
        self.extras: dict[str, Any] = dict(extras or {})
        func = getattr(method, "__func__", method)
        self.is_stream = inspect.isasyncgenfunction(func)
        self.is_async = inspect.iscoroutinefunction(func)
        try:
            hints = get_type_hints(func, include_extras=True)
        except NameError:
            hints = {}
        params = [
            p
            for p in inspect.signature(method).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        if len(params) > 2 and not all(get_origin(hints.get(p.name)) is Annotated for p in params):
            raise WiringError(
                f"{name}: a handler takes (data) or (data, context); mark others with "
                "Annotated[..., Payload()] or Annotated[..., Ctx()]"
            )
        sources = [_param_source(hints.get(p.name), i) for i, p in enumerate(params)]
        plain = [(kind, key) for kind, key, model in sources if model is None]
        if len(plain) == len(sources) and plain in (
            [],
            [("data", None)],
            [("data", None), ("ctx", None)],
        ):
            # The common shapes call straight through: this runs per message.
            if not plain:
                self.call = lambda data, ctx: method()
            elif len(plain) == 1:
                self.call = lambda data, ctx: method(data)
            else:
                self.call = method
            return

        def call(data: Any, ctx: Any) -> Any:
            args = []
            for kind, key, model in sources:
                if kind == "ctx":
                    args.append(ctx)
                    continue
                value = data.get(key) if key is not None and isinstance(data, dict) else data
                if model is not None:
                    try:
                        value = model.model_validate(value)
                    except ValueError as exc:
                        raise _validation_error(exc) from exc
                args.append(value)
            return method(*args)

        self.call = call


def error_payload(exc: BaseException, logger: logging.Logger, where: str) -> Any:
    """The ``err`` value Nest would send for ``exc``; details of others are only logged."""
    if isinstance(exc, RpcException):
        err = exc.get_error()
        return err if isinstance(err, dict) else {"status": "error", "message": err}
    logger.error("%s raised; the caller gets %r", where, UNKNOWN_EXCEPTION_MESSAGE, exc_info=exc)
    return {"status": "error", "message": UNKNOWN_EXCEPTION_MESSAGE}


# JSON values that can be a pattern.  Nest routes an array as an object keyed
# by index; true, false and null it never matches, nor a missing pattern.
_PATTERN_TYPES = frozenset({str, dict, int, float, list})

# What encoding a reply raises for a value JSON cannot hold: a set, NaN, a
# lone surrogate, or nesting deeper than the encoder's recursion.
_UNWRITABLE = (TypeError, ValueError, RecursionError)

# Results that are surely neither awaitables nor streams: checked by type
# first, because inspect.isawaitable costs more than a plain handler call.
_PLAIN = frozenset({int, float, str, bool, list, dict, type(None)})


class Server:
    """Base of every transport's server: the handler table and dispatch."""

    transport_name = "base"
    # Whether a request cancelled by close() gets a SHUTDOWN_ERROR reply.  A
    # broker transport needs it (its caller hears nothing else); TCP turns it
    # off: closing the socket tells its caller at once (ConnectionClosedError).
    reply_when_cancelled = True

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        self.options: dict[str, Any] = dict(options or {})
        self.message_handlers: dict[str, Handler] = {}
        self.event_handlers: dict[str, list[Handler]] = {}
        self.logger = logging.getLogger(f"nestpy_mini.{type(self).__name__}")
        self._tasks: set[asyncio.Task[Any]] = set()
        self.close_grace = float(self.options.get("close_grace", DEFAULT_CLOSE_GRACE))
        # The screen's budget for untrusted patterns: the longest route served.
        self._route_budget = LARGE_MESSAGE

    # --- the handler table -------------------------------------------------
    def add_handler(
        self,
        pattern: Any,
        method: Callable[..., Any],
        is_event: bool,
        name: str = "",
        extras: dict[str, Any] | None = None,
    ) -> None:
        route = normalize_pattern(pattern)
        self._route_budget = max(self._route_budget, len(route))
        handler = Handler(method, name or getattr(method, "__qualname__", repr(method)), extras)
        if is_event:
            self.event_handlers.setdefault(route, []).append(handler)
            return
        if route in self.message_handlers:
            raise WiringError(
                f"message pattern {route} is handled twice: by "
                f"{self.message_handlers[route].name} and by {handler.name}"
            )
        self.message_handlers[route] = handler

    @property
    def patterns(self) -> list[str]:
        """Every route served, messages first: transports that subscribe per pattern use it."""
        return [*self.message_handlers, *self.event_handlers]

    # --- lifecycle, per transport -------------------------------------------
    async def listen(self) -> None:
        """Start serving and return once ready."""
        raise NotImplementedError

    async def close(self) -> None:
        await self.drain()

    async def drain(self) -> None:
        """Let running handlers finish (bounded by ``close_grace``), then cancel the rest.

        The transport has stopped taking new messages before this is called.
        Tasks started meanwhile (a reply being written, a stream's next value)
        are waited for too, within the same grace.  A cancelled request
        answers its caller with ``SHUTDOWN_ERROR`` (see ``_finish_request``).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.close_grace
        while self._tasks:
            left = deadline - loop.time()
            # One wait even with no grace left: tasks spawned this very loop
            # pass get to start, so a cancelled one still runs its except clause.
            _, pending = await asyncio.wait(set(self._tasks), timeout=max(left, 0))
            if pending and left <= 0:
                break
        pending = set(self._tasks)
        if not pending:
            return
        self.logger.warning(
            "%d handler(s) still running after the %g s close grace; cancelling them",
            len(pending),
            self.close_grace,
        )
        for task in pending:
            task.cancel()
        _, stuck = await asyncio.wait(pending, timeout=CANCEL_WAIT)
        if stuck:
            self.logger.error("%d handler(s) ignored their cancellation; left behind", len(stuck))

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- dispatch ------------------------------------------------------------
    def route(self, pattern: Any, large: bool = False) -> str | None:
        """The route of a pattern a peer sent; None when no handler can match it.

        ``large`` says the message was long enough to hide a costly pattern,
        which is then screened first (``patterns.screened_route``).
        """
        kind = type(pattern)
        if kind is str and pattern[:1] != "{":
            return pattern
        if kind not in _PATTERN_TYPES:
            return None
        if large and kind is not int and kind is not float:
            return screened_route(pattern, self._route_budget)
        return route_of_incoming(pattern)

    def dispatch(self, message: Incoming, route: str | None, ctx: Any, reply: Reply) -> None:
        """Run one sorted message: a request is always answered, an event never."""
        if message.is_request:
            self.handle_request(route, message.data, message.id, ctx, reply)
        elif route is None:
            self.logger.warning("dropped an event: no handler can match its pattern")
        else:
            self.handle_event(route, message.data, ctx)

    def handle_request(
        self, route: str | None, data: Any, msg_id: Any, ctx: Any, reply: Reply
    ) -> None:
        """Run the handler for one request and send every reply packet for ``msg_id``.

        ``route`` None is a pattern no handler can match (missing, null, true):
        the caller still gets Nest's no-handler error with its id, not silence.
        """
        handler = self.message_handlers.get(route)
        if handler is None:
            self._send(reply, no_handler(msg_id), msg_id)
            return
        if handler.is_async or handler.is_stream:
            self._spawn(self._run_request(handler, data, msg_id, ctx, reply))
            return
        # A plain function answers without a task: the fast, common case.
        try:
            result = handler.call(data, ctx)
        except Exception as exc:
            err = error_payload(exc, self.logger, handler.name)
            self._send(reply, failure(err, msg_id), msg_id)
            return
        if type(result) not in _PLAIN and (
            inspect.isawaitable(result) or hasattr(result, "__anext__")
        ):
            self._spawn(self._finish_request(handler, result, msg_id, reply))
            return
        self._send(reply, final(result, msg_id), msg_id)

    async def _run_request(
        self, handler: Handler, data: Any, msg_id: Any, ctx: Any, reply: Reply
    ) -> None:
        try:
            result = handler.call(data, ctx)
        except Exception as exc:
            err = error_payload(exc, self.logger, handler.name)
            await self._asend(reply, failure(err, msg_id), msg_id)
            return
        await self._finish_request(handler, result, msg_id, reply)

    async def _finish_request(
        self, handler: Handler, result: Any, msg_id: Any, reply: Reply
    ) -> None:
        try:
            if hasattr(result, "__anext__"):
                # A stream: each value goes out as it comes, then the end marker.
                async for value in result:
                    await self._asend(reply, {"response": value, "id": msg_id}, msg_id)
                await self._asend(reply, {"isDisposed": True, "id": msg_id}, msg_id)
                return
            value = await result if inspect.isawaitable(result) else result
        except asyncio.CancelledError:
            # drain() cancelled it past the close grace: say so to the caller,
            # who would otherwise wait for its timeout (on a broker, in full).
            if self.reply_when_cancelled:
                packet = failure(SHUTDOWN_ERROR, msg_id)
                await self._asend(reply, packet, msg_id)
            raise
        except Exception as exc:
            err = error_payload(exc, self.logger, handler.name)
            await self._asend(reply, failure(err, msg_id), msg_id)
            return
        await self._asend(reply, final(value, msg_id), msg_id)

    def _send(self, reply: Reply, packet: dict[str, Any], msg_id: Any) -> None:
        try:
            pending = reply(packet)
        except _UNWRITABLE as exc:
            pending = self._unserializable(reply, exc, msg_id)
        if pending is not None:
            self._spawn(self._await_reply(pending))

    async def _asend(self, reply: Reply, packet: dict[str, Any], msg_id: Any) -> None:
        try:
            pending = reply(packet)
        except _UNWRITABLE as exc:
            pending = self._unserializable(reply, exc, msg_id)
        if pending is not None:
            await self._await_reply(pending)

    def _unserializable(self, reply: Reply, exc: Exception, msg_id: Any) -> Awaitable[None] | None:
        self.logger.error("reply to %.200r is not JSON-serializable: %s", msg_id, exc)
        err = {"status": "error", "message": UNKNOWN_EXCEPTION_MESSAGE}
        try:
            return reply(failure(err, msg_id))
        except _UNWRITABLE:
            # The id itself cannot be written (1e999, nested too deep), so no
            # reply can carry it.  Raised on, it would end the task or read
            # that sent it; TCP closes such a connection before it gets here.
            self.logger.error("no reply can carry the id %.200r; dropped", msg_id)
            return None

    async def _await_reply(self, pending: Awaitable[None]) -> None:
        try:
            await pending
        except Exception as exc:  # the peer or broker went away; others go on
            self.logger.warning("could not deliver a reply: %s", exc)

    def handle_event(self, route: str, data: Any, ctx: Any) -> None:
        """Run every handler of an event; failures are logged, never replied."""
        handlers = self.event_handlers.get(route)
        if not handlers:
            # Cut short: the pattern came from the peer, and may be megabytes.
            self.logger.error("%s%.200s", NO_EVENT_HANDLER, route)
            return
        for handler in handlers:
            try:
                result = handler.call(data, ctx)
            except Exception:
                self.logger.exception("event handler %s failed", handler.name)
                continue
            if inspect.isawaitable(result) or hasattr(result, "__anext__"):
                self._spawn(self._finish_event(handler, result))

    async def _finish_event(self, handler: Handler, result: Any) -> None:
        try:
            if hasattr(result, "__anext__"):
                async for _ in result:
                    pass
            else:
                await result
        except Exception:
            self.logger.exception("event handler %s failed", handler.name)
