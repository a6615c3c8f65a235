"""Module, Controller, Injectable, MessagePattern, EventPattern and the ``Annotated`` markers.

Metadata only, in plain attributes that ``injector.py`` and ``app.py`` read: nothing wrapped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, overload

T = TypeVar("T", bound=type)
F = TypeVar("F", bound=Callable[..., Any])
Pattern = str | int | float | dict[str, Any]

MODULE_ATTR = "__nestpy_module__"
PREFIX_ATTR = "__nestpy_prefix__"
PATTERN_ATTR = "__nestpy_patterns__"


@dataclass(frozen=True)
class Inject:
    """``Annotated[ClientProxy, Inject("MATH_SERVICE")]``: inject by token, not by type."""

    token: Any


@dataclass(frozen=True)
class Payload:
    """``Annotated[T, Payload()]`` binds the message data; ``Payload("key")`` one field of it."""

    key: str | None = None


@dataclass(frozen=True)
class Ctx:
    """``Annotated[TcpContext, Ctx()]`` binds the transport's context."""


@dataclass
class DynamicModule:
    """Nest's module metadata plus the module class: what ``@Module`` records on a class, and
    what ``ClientsModule.register([...])`` returns to add to that class's own metadata."""

    module: type
    imports: Sequence[Any] = ()
    controllers: Sequence[type] = ()
    providers: Sequence[Any] = ()
    exports: Sequence[Any] = ()
    is_global: bool = False


def Module(
    *,
    imports: Sequence[Any] = (),
    controllers: Sequence[type] = (),
    providers: Sequence[Any] = (),
    exports: Sequence[Any] = (),
    is_global: bool = False,
) -> Callable[[T], T]:
    """Declare what a module builds (providers, controllers) and shares (exports)."""

    def decorate(cls: T) -> T:
        meta = DynamicModule(cls, imports, controllers, providers, exports, is_global)
        setattr(cls, MODULE_ATTR, meta)
        return cls

    return decorate


@overload
def Controller(cls: T, /) -> T: ...
@overload
def Controller(prefix: str = "", /) -> Callable[[T], T]: ...
def Controller(arg: T | str = "", /) -> T | Callable[[T], T]:
    """A class whose handlers the app serves; ``Controller("math")`` prefixes its HTTP routes."""
    if isinstance(arg, type):
        return arg

    def decorate(cls: T) -> T:
        setattr(cls, PREFIX_ATTR, arg.strip("/"))
        return cls

    return decorate


@overload
def Injectable(cls: T, /) -> T: ...
@overload
def Injectable(cls: None = None, /) -> Callable[[T], T]: ...
def Injectable(cls: T | None = None, /) -> T | Callable[[T], T]:
    """Nest's ``@Injectable()``. It records nothing: Nest needs it to emit the constructor's
    types, which Python keeps anyway, so any class listed in ``providers`` is constructed."""
    return cls if cls is not None else Injectable  # @Injectable() is @Injectable


def mark(attr: str, value: Any) -> Callable[[F], F]:
    """Append ``value`` to the list in ``func.<attr>``: one method may carry several marks."""

    def decorate(func: F) -> F:
        setattr(func, attr, [*getattr(func, attr, ()), value])
        return func

    return decorate


def MessagePattern(pattern: Pattern, extras: dict[str, Any] | None = None) -> Callable[[F], F]:
    """Request-response: the handler's return value (or stream) is the reply.  ``extras`` are
    per-handler transport settings: ``{"queue": ...}`` on NATS, ``{"qos": 1}`` on MQTT."""
    return mark(PATTERN_ATTR, (pattern, False, dict(extras or {})))


def EventPattern(pattern: Pattern, extras: dict[str, Any] | None = None) -> Callable[[F], F]:
    """Fire-and-forget: every handler of the event runs, nothing is replied."""
    return mark(PATTERN_ATTR, (pattern, True, dict(extras or {})))
