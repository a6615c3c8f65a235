"""Patterns and routes, exactly as Nest's ``transformPatternToRoute`` makes them.

A pattern such as ``{"cmd": "sum"}`` is matched as a *route*: a string built
the way ``@nestjs/microservices`` builds it, so a handler registered here is
found by a packet that a NestJS client sent.  Keys are sorted with
JavaScript's ``localeCompare`` (ICU collation), not by code point, which
matters as soon as keys mix case, digits and underscores.
"""

from __future__ import annotations

import unicodedata
from functools import lru_cache
from typing import Any

from .packets import js_number, loads

# Nest's limits for client-controlled patterns (utils/transform-pattern.utils).
MAX_DEPTH = 5
MAX_KEYS = 20

# Printable ASCII in the order Node's default collator (ICU root, en-US) sorts
# it, case folded.  Read off `node -e` with `localeCompare`; see tests.
_ICU_ASCII_ORDER = " _-,;:!?.'\"()[]{}@*/\\&#%`^+<=>|~$0123456789abcdefghijklmnopqrstuvwxyz"
_PRIMARY = {c: i for i, c in enumerate(_ICU_ASCII_ORDER)}

SortKey = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


def _collation_key(text: str) -> SortKey:
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


def _sort_key(key: Any) -> SortKey:
    text = str(key)
    return collation_key(text) if len(text) <= _CACHED_KEY_CHARS else _collation_key(text)


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def normalize_pattern(pattern: Any, depth: int = 0) -> str:
    """The route string Nest uses as the handler key of ``pattern``."""
    if isinstance(pattern, str):
        return pattern
    if pattern is None or isinstance(pattern, bool):
        return {None: "null", True: "true", False: "false"}[pattern]
    if isinstance(pattern, int | float):
        return js_number(pattern)
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
# because patterns come from peers, who could send endless new ones, and
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


def screened_route(pattern: Any, budget: int) -> str | None:
    """The route of an untrusted pattern, or None when it can match no route
    of at most ``budget`` characters.

    Routing costs Python-speed work per character of a pattern's keys, and
    the caches keep what they are given: megabyte keys stalled the loop for
    seconds and pinned gigabytes.  A route contains every key and string of
    its pattern, so a pattern costlier than the longest route served matches
    none of them, and is dropped unrouted.
    """
    if type(pattern) is str:
        if pattern[:1] != "{" or len(pattern) <= budget:
            return route_of_incoming(pattern)
        try:
            parsed = loads(pattern)
        except (ValueError, RecursionError):
            return pattern  # not JSON: its own route, as in Nest
        # Uncached: the cache would keep the long text.
        return normalize_pattern(parsed) if _route_cost(parsed, budget) <= budget else None
    if type(pattern) in (dict, list) and _route_cost(pattern, budget) > budget:
        return None
    return route_of_incoming(pattern)


def _route_cost(pattern: Any, budget: int) -> int:
    """What routing ``pattern`` costs, in characters; counting stops past ``budget``.

    Each key and string that normalizing reaches ends up in the route, so
    their total is a lower bound on the route's length.  A list counts its
    length too: it is converted item by item before any limit applies.
    """
    total = 0
    stack = [(pattern, 0)]
    while stack and total <= budget:
        node, depth = stack.pop()
        if type(node) is not dict and type(node) is not list:
            total += len(node) if type(node) is str else 0
            continue
        if type(node) is list:
            total += len(node)
        if depth > MAX_DEPTH or len(node) > MAX_KEYS:
            continue  # a placeholder in the route: normalizing looks no deeper
        if type(node) is dict:
            total += sum(map(len, node))
        children = node.values() if type(node) is dict else node
        stack.extend((child, depth + 1) for child in children)
    return total
