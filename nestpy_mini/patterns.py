"""Message and event patterns, and Nest's pattern-to-route normalization.

A pattern such as ``{"cmd": "sum"}`` is matched as a *route*: a string built
the way ``transformPatternToRoute`` in ``@nestjs/microservices`` builds it, so a
handler registered here is found by a packet that a NestJS client sent.  Keys
are sorted with JavaScript's ``localeCompare`` (ICU collation), not by code
point, which matters as soon as keys mix case, digits and underscores.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Callable
from decimal import Decimal
from functools import lru_cache
from typing import Any, TypeVar

from .codec import loads

Pattern = str | int | float | dict[str, Any]
F = TypeVar("F", bound=Callable[..., Any])

PATTERN_ATTR = "__nestpy_patterns__"

# Nest's limits for client-controlled patterns (utils/transform-pattern.utils).
MAX_DEPTH = 5
MAX_KEYS = 20

# Printable ASCII in the order Node's default collator (ICU root, en-US) sorts
# it, case folded.  Read off `node -e` with `localeCompare`; see tests.
_ICU_ASCII_ORDER = " _-,;:!?.'\"()[]{}@*/\\&#%`^+<=>|~$0123456789abcdefghijklmnopqrstuvwxyz"
_PRIMARY = {c: i for i, c in enumerate(_ICU_ASCII_ORDER)}


def _collation_key(text: str) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """A sort key that orders strings as ``a.localeCompare(b)`` does in Node.

    ICU compares whole strings level by level: base letters first, then
    accents, then case (lower before upper).  Exact for ASCII, which is what
    real patterns use; other letters sort by their base form, then code point.
    """
    primary: list[int] = []
    secondary: list[int] = []
    tertiary: list[int] = []
    for ch in text:
        lower = ch.lower() if ch.isascii() else ch
        if lower in _PRIMARY:
            primary.append(_PRIMARY[lower])
            secondary.append(0)
            tertiary.append(1 if ch != lower else 0)
            continue
        decomposed = unicodedata.normalize("NFD", ch)
        base, marks = decomposed[0], decomposed[1:]
        base_lower = base.lower()
        primary.append(_PRIMARY.get(base_lower, 1000 + ord(base_lower)))
        secondary.append(sum(ord(m) for m in marks))
        tertiary.append(1 if base != base_lower else 0)
    return tuple(primary), tuple(secondary), tuple(tertiary)


collation_key = lru_cache(maxsize=4096)(_collation_key)
# Keys longer than this are sorted without the cache.  Keys come from peers,
# and a key's sort key holds three tuples as long as the key: cached, 4,096
# keys of 100 KB would pin 10 GB.  Real keys are a few characters.
_CACHED_KEY_CHARS = 64


def _sort_key(key: Any) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    text = str(key)
    if len(text) <= _CACHED_KEY_CHARS:
        return collation_key(text)
    return _collation_key(text)


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _js_string(value: Any) -> str:
    """``String(value)`` for the scalars a pattern may hold."""
    if value is True:
        return "true"
    if value is False:
        return "false"
    if value is None:
        return "null"
    if isinstance(value, int | float):
        # Below 2**53 every integer is exact in a double and prints as itself.
        if abs(value) < 2**53 and (type(value) is int or value.is_integer()):
            return str(int(value))
        try:
            return _js_number(float(value))  # JSON.parse reads every number as a double
        except OverflowError:  # an int past a double's range: Infinity to JavaScript
            return "Infinity" if value > 0 else "-Infinity"
    return str(value)


def _js_number(value: float) -> str:
    """A float as JavaScript's ``Number#toString`` writes it.

    Both languages print the shortest digits that read back the same number,
    but place the point differently: JavaScript writes ``0.00001`` and
    ``1e-7`` where Python writes ``1e-05`` and ``1e-07``, and ``Infinity``
    where Python writes ``inf``.
    """
    if value != value:
        return "NaN"
    if value in (math.inf, -math.inf):
        return "Infinity" if value > 0 else "-Infinity"
    if value == 0:
        return "0"
    sign = "-" if value < 0 else ""
    _, digit_tuple, exponent = Decimal(repr(abs(value))).normalize().as_tuple()
    digits = "".join(map(str, digit_tuple))
    k, n = len(digits), int(exponent) + len(digits)  # value = 0.<digits> * 10**n
    if k <= n <= 21:
        return sign + digits + "0" * (n - k)
    if 0 < n <= 21:
        return f"{sign}{digits[:n]}.{digits[n:]}"
    if -6 < n <= 0:
        return f"{sign}0.{'0' * -n}{digits}"
    mantissa = digits if k == 1 else f"{digits[0]}.{digits[1:]}"
    return f"{sign}{mantissa}e{'+' if n > 0 else '-'}{abs(n - 1)}"


def normalize_pattern(pattern: Any, depth: int = 0) -> str:
    """Turn a pattern into the route string Nest uses as the handler key."""
    if isinstance(pattern, str):
        return pattern
    if isinstance(pattern, bool) or pattern is None:
        return _js_string(pattern)
    if isinstance(pattern, int | float):
        return _js_string(pattern)
    if isinstance(pattern, list | tuple):
        # JavaScript arrays are objects whose keys are their indexes.
        pattern = {str(i): v for i, v in enumerate(pattern)}
    if not isinstance(pattern, dict):
        return str(pattern)
    if depth > MAX_DEPTH:
        return "[MAX_DEPTH_REACHED]"
    if len(pattern) > MAX_KEYS:
        return "[TOO_MANY_KEYS]"
    parts = []
    for key in sorted(pattern, key=_sort_key):
        value = pattern[key]
        if isinstance(value, str):
            parts.append(f'"{_escape(str(key))}":"{_escape(value)}"')
        else:
            parts.append(f'"{_escape(str(key))}":{normalize_pattern(value, depth + 1)}')
    return "{" + ",".join(parts) + "}"


# Routes of recent incoming patterns.  Normalizing sorts keys by collation on
# every message, which is most of the dispatch cost; the cache is bounded
# because patterns come from clients, who could send endless new ones, and
# keeps only short ones, or 1,024 megabyte patterns would pin gigabytes.
_ROUTE_CACHE: dict[Any, str] = {}
_ROUTE_CACHE_SIZE = 1024
_CACHED_ROUTE_CHARS = 1024  # real routes are far shorter


def route_of_incoming(pattern: Any) -> str:
    """The route of a pattern that arrived on the wire.

    Nest clients send object patterns raw over TCP but as strings in events
    and on brokers; a string that parses as JSON is normalized again, exactly
    as ``Server#getRouteFromPattern`` does.
    """
    if isinstance(pattern, str):
        if pattern[:1] != "{":
            return pattern
        key: Any = pattern
    elif isinstance(pattern, dict) and all(type(v) is str for v in pattern.values()):
        # Only all-string values: 1 == True would make other keys collide.
        key = tuple(pattern.items())
    else:
        return normalize_pattern(pattern)
    route = _ROUTE_CACHE.get(key)
    if route is None:
        route = _route_uncached(pattern)
        # A route holds every key and string value of its pattern, so its
        # length bounds a dict key's too; a string key may be longer.
        if len(route) <= _CACHED_ROUTE_CHARS and len(key) <= _CACHED_ROUTE_CHARS:
            if len(_ROUTE_CACHE) >= _ROUTE_CACHE_SIZE:
                _ROUTE_CACHE.clear()
            _ROUTE_CACHE[key] = route
    return route


def _route_uncached(pattern: Any) -> str:
    if isinstance(pattern, str):
        try:
            pattern = loads(pattern)
        except (ValueError, RecursionError):  # not JSON: matched as it is, as in Nest
            return pattern
    return normalize_pattern(pattern)


def _mark(pattern: Pattern, is_event: bool, extras: dict[str, Any] | None) -> Callable[[F], F]:
    def decorate(func: F) -> F:
        marks = list(getattr(func, PATTERN_ATTR, ()))
        marks.append((pattern, is_event, dict(extras or {})))
        setattr(func, PATTERN_ATTR, marks)
        return func

    return decorate


def MessagePattern(pattern: Pattern, extras: dict[str, Any] | None = None) -> Callable[[F], F]:
    """Request-response: the handler's return value (or stream) is the reply."""
    return _mark(pattern, False, extras)


def EventPattern(pattern: Pattern, extras: dict[str, Any] | None = None) -> Callable[[F], F]:
    """Fire-and-forget: every handler of the event runs, nothing is replied."""
    return _mark(pattern, True, extras)
