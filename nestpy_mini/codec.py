"""JSON the way Nest puts it on the wire, shared by every transport.

``dumps`` writes what ``JSON.stringify`` writes for JSON data: no spaces,
non-ASCII as-is.  Both functions call CPython's C encoder and scanner, built
once: ``json.dumps``/``json.loads`` rebuild the encoder on every call and
guess the encoding of bytes, which is about half the cost of a small packet.
"""

from __future__ import annotations

import json
from typing import Any

_WS = " \t\n\r"


def _not_json(name: str) -> Any:
    # Python's parser takes NaN and Infinity; JSON.parse refuses them, so a
    # NestJS peer would drop such a frame, and so do we.
    raise ValueError(f"{name} is not JSON")


_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
_decoder = json.JSONDecoder(parse_constant=_not_json)


def dumps(obj: Any) -> str:
    """Compact JSON text; ``TypeError``/``ValueError`` for what JSON cannot hold."""
    return _encoder.encode(obj)


def loads(text: str | bytes | bytearray) -> Any:
    """Parse one JSON value; ``ValueError`` (``UnicodeDecodeError`` included) otherwise."""
    if not isinstance(text, str):
        text = text.decode()
    return _decoder.decode(text)


try:
    from json.encoder import c_make_encoder, encode_basestring
    from json.scanner import c_make_scanner

    if c_make_encoder is None or c_make_scanner is None:
        raise ImportError
    _c_encode = c_make_encoder(
        None, _encoder.default, encode_basestring, None, ":", ",", False, False, False
    )
    _c_scan = c_make_scanner(_decoder)

    def dumps(obj: Any) -> str:  # type: ignore[no-redef]
        return "".join(_c_encode(obj, 0))

    def loads(text: str | bytes | bytearray) -> Any:  # type: ignore[no-redef]
        if not isinstance(text, str):
            text = text.decode()
        start = 0 if text[:1] not in _WS else len(text) - len(text.lstrip(_WS))
        try:
            value, end = _c_scan(text, start)
        except StopIteration as exc:
            raise ValueError(f"expecting a JSON value at {exc.value}") from None
        if end != len(text) and text[end:].strip(_WS):
            raise ValueError(f"extra data after the JSON value at {end}")
        return value

except ImportError:  # other Pythons keep the public, slower functions above
    pass
