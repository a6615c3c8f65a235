"""Module, Controller, Injectable, MessagePattern, EventPattern and the ``Annotated`` markers.

These only record metadata on the class or function; ``injector.py`` and
``app.py`` read it.  Plain attributes keep the classes ordinary: no
metaclass, nothing wrapped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, overload

T = TypeVar("T", bound=type)
F = TypeVar("F", bound=Callable[..., Any])
Pattern = str | int | float | dict[str, Any]

MODULE_ATTR = "__nestpy_module__"
ROLE_ATTR = "__nestpy_role__"
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
class ModuleMeta:
    imports: list[Any] = field(default_factory=list)
    controllers: list[type] = field(default_factory=list)
    providers: list[Any] = field(default_factory=list)
    exports: list[Any] = field(default_factory=list)
    is_global: bool = False


@dataclass
class DynamicModule:
    """A module configured at import time, like ``ClientsModule.register([...])``."""

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
        meta = ModuleMeta(
            list(imports), list(controllers), list(providers), list(exports), is_global
        )
        setattr(cls, MODULE_ATTR, meta)
        return cls

    return decorate


def _role(role: str) -> Callable[[T], T]:
    def decorate(cls: T) -> T:
        setattr(cls, ROLE_ATTR, role)
        return cls

    return decorate


@overload
def Controller(cls: T, /) -> T: ...
@overload
def Controller(prefix: str = "", /) -> Callable[[T], T]: ...
def Controller(arg: T | str = "", /) -> T | Callable[[T], T]:
    """Mark a class whose handlers the app serves; ``Controller("math")`` prefixes routes."""
    if isinstance(arg, type):
        return _role("controller")(arg)

    def decorate(cls: T) -> T:
        setattr(cls, PREFIX_ATTR, arg.strip("/"))
        return _role("controller")(cls)

    return decorate


@overload
def Injectable(cls: T, /) -> T: ...
@overload
def Injectable(cls: None = None, /) -> Callable[[T], T]: ...
def Injectable(cls: T | None = None, /) -> T | Callable[[T], T]:
    """Mark a class the injector may construct and share."""
    return _role("injectable")(cls) if cls is not None else _role("injectable")


def _mark(pattern: Pattern, is_event: bool, extras: dict[str, Any] | None) -> Callable[[F], F]:
    def decorate(func: F) -> F:
        marks = list(getattr(func, PATTERN_ATTR, ()))
        marks.append((pattern, is_event, dict(extras or {})))
        setattr(func, PATTERN_ATTR, marks)
        return func

    return decorate


def MessagePattern(pattern: Pattern, extras: dict[str, Any] | None = None) -> Callable[[F], F]:
    """Request-response: the handler's return value (or stream) is the reply.

    ``extras`` are per-handler transport settings: ``{"queue": ...}`` on
    NATS, ``{"qos": 1}`` on MQTT.
    """
    return _mark(pattern, False, extras)


def EventPattern(pattern: Pattern, extras: dict[str, Any] | None = None) -> Callable[[F], F]:
    """Fire-and-forget: every handler of the event runs, nothing is replied."""
    return _mark(pattern, True, extras)
