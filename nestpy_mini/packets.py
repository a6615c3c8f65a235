"""Nest's wire rules, once: envelope keys, error texts, JSON, and JavaScript's number text.

A request is ``{"pattern", "data", "id"}``, an event the same without ``id``, a reply
``{"response", "isDisposed", "id"}`` or ``{"err", ...}``.  What a NestJS peer would do with a
packet is decided here, so that all six transports decide it alike.
"""

from __future__ import annotations

import json
import math
from decimal import Decimal
from json.encoder import c_make_encoder, encode_basestring
from typing import Any, NamedTuple

# Nest's texts, verbatim (constants.ts): NestJS peers compare and log them.
NO_MESSAGE_HANDLER = "There is no matching message handler defined in the remote service."
NO_EVENT_HANDLER = (
    "There is no matching event handler defined in the remote service. Event pattern: "
)
UNKNOWN_EXCEPTION_MESSAGE = "Internal server error"
INTERNAL_ERROR = {"status": "error", "message": UNKNOWN_EXCEPTION_MESSAGE}
# Nest's EmptyResponseException: a request that no subscriber can answer.
EMPTY_RESPONSE = 'Empty response. There are no subscribers listening to that message ("{}")'
# When close() cancels a handler past the grace: else a broker caller waits out its timeout.
SHUTDOWN_ERROR = {
    "status": "error",
    "message": "The server is shutting down: the handler did not finish within its close grace",
}

# The only keys a Nest reply carries (IncomingResponseDeserializer); a reply with any other
# key is a foreign payload, delivered whole as the response.
ENVELOPE_KEYS = frozenset({"id", "err", "response", "isDisposed", "status"})


# --- JSON, as JSON.stringify writes it and JSON.parse reads it --------------
def _not_json(name: str) -> Any:
    # Python's parser takes NaN and Infinity; JSON.parse refuses them, so a NestJS peer
    # would drop such a message, and so do we.
    raise ValueError(f"{name} is not JSON")


_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
_decoder = json.JSONDecoder(parse_constant=_not_json)
_WS = " \t\n\r"
# The fast path: the C encoder built once (``encode`` builds it per call), and the scanner
# called without ``decode``'s regular expressions.  The plain version is
# ``_encoder.encode(obj)`` and ``_decoder.decode(text)``.  Measured on a 90-byte request and
# its reply, Python 3.11: loads 1.34 -> 0.97 µs, dumps 1.56 -> 0.74 µs, a tenth of what a
# TCP request costs each side.  Without the C encoder, ``iterencode`` takes the same call.
if c_make_encoder is None:
    _encode = _encoder.iterencode
else:
    _encode = c_make_encoder(
        None, _encoder.default, encode_basestring, None, ":", ",", False, False, False
    )


def dumps(obj: Any) -> str:
    """Compact JSON text; ``TypeError``/``ValueError`` for what JSON cannot hold."""
    return "".join(_encode(obj, 0))


def loads(text: str | bytes | bytearray) -> Any:
    """One JSON value; ``ValueError`` (``UnicodeDecodeError`` included) otherwise."""
    if not isinstance(text, str):
        text = text.decode()
    try:
        value, end = _decoder.scan_once(text, len(text) - len(text.lstrip(_WS)))
    except StopIteration as exc:
        raise ValueError(f"expecting a JSON value at {exc.value}") from None
    if text[end:].strip(_WS):
        raise ValueError(f"extra data after the JSON value at {end}")
    return value


def js_number(value: int | float) -> str:
    """``String(n)`` for a number that arrived through ``JSON.parse``.

    Both languages print the shortest digits that read back the same double, but place the
    point differently: JavaScript writes ``0.00001``, ``1e-7`` and ``Infinity`` where Python
    writes ``1e-05``, ``1e-07`` and ``inf``.  Integers past 2**53 are rounded to a double
    first, as ``JSON.parse`` does."""
    if type(value) is int and abs(value) < 2**53:
        return str(value)
    if value < 0:
        return "-" + js_number(-value)
    try:
        number = float(value)
    except OverflowError:  # an int past a double's range
        return "Infinity"
    if number != number:
        return "NaN"
    if number in (0, math.inf):
        return "Infinity" if number else "0"
    if 1e-6 <= number < 1e21:  # the shortest digits, as Python's repr, in fixed notation
        return format(Decimal(repr(number)).normalize(), "f")
    mantissa, exponent = repr(number).split("e")
    return f"{mantissa}e{int(exponent):+d}"


# --- incoming requests and events ------------------------------------------
# An id nested this deep is refused: far past any real id, and still half the encoder's
# recursion limit away wherever a reply is written.
MAX_ID_DEPTH = 500


class Incoming(NamedTuple):
    """One message as a server reads it.  ``is_request`` is False for an event."""

    pattern: Any
    data: Any
    id: Any
    is_request: bool
    metadata: Any = None  # what a Nest client's dispatch hook put beside the data


def read_incoming(packet: Any, channel: str | None) -> Incoming | str:
    """Sort a decoded message as Nest's ``IncomingRequestDeserializer`` does: the message, or
    a reason to drop it.  A payload that is not a Nest packet (no ``pattern``, no ``data``: a
    sensor's own JSON) is an event on ``channel`` with the whole payload as data; without a
    channel (TCP, RabbitMQ) it keeps what it has.  Only a missing ``id`` makes an event:
    ``"id": null`` is a request."""
    foreign = type(packet) is not dict or ("pattern" not in packet and "data" not in packet)
    if foreign and channel is not None:
        return Incoming(channel, packet, None, False)
    if type(packet) is not dict:
        return "it is not a JSON object"
    pattern, data, metadata = packet.get("pattern"), packet.get("data"), packet.get("metadata")
    if "id" not in packet:
        return Incoming(pattern, data, None, False, metadata)
    msg_id = packet["id"]
    if type(msg_id) is not str and not writable_id(msg_id):
        return "its id cannot be written back as JSON"
    return Incoming(pattern, data, msg_id, True, metadata)


def writable_id(msg_id: Any) -> bool:
    """Whether a request id can be echoed in a reply, as Nest echoes any id: not when it holds
    a number past a double's range (``1e999`` parses as infinity, which JSON cannot hold) or
    nests deeper than ``MAX_ID_DEPTH``."""
    stack = [(msg_id, 0)]
    while stack:
        node, depth = stack.pop()
        kind = type(node)
        if kind is float and not math.isfinite(node):
            return False
        if kind is dict or kind is list:
            if depth >= MAX_ID_DEPTH:
                return False
            stack.extend((child, depth + 1) for child in (node.values() if kind is dict else node))
    return True


# --- replies: Nest's keys in Nest's order, so NestJS clients read them unchanged
def final(value: Any, msg_id: Any) -> dict[str, Any]:
    """The last reply packet.  ``None`` leaves ``response`` out, as Nest does for ``undefined``:
    a Nest client would otherwise emit an extra ``null``."""
    if value is None:
        return {"isDisposed": True, "id": msg_id}
    return {"response": value, "isDisposed": True, "id": msg_id}


def failure(err: Any, msg_id: Any) -> dict[str, Any]:
    return {"err": err, "isDisposed": True, "id": msg_id}


def no_handler(msg_id: Any) -> dict[str, Any]:
    return {"id": msg_id, "status": "error", "err": NO_MESSAGE_HANDLER}


def read_reply(packet: Any, msg_id: str | None = None) -> dict[str, Any] | None:
    """A decoded reply as a client applies it; None when it is not for us.

    A payload with keys outside the envelope is foreign and becomes the response, as Nest's
    ``IncomingResponseDeserializer`` reads it.  ``msg_id`` is the id read beside the body
    (NATS's reply subject, RabbitMQ's correlation id); a body naming another is dropped, as in
    Nest.  Our ids are strings: no other id is ours."""
    found = packet.get("id") if type(packet) is dict else None
    if type(packet) is not dict or not packet or not packet.keys() <= ENVELOPE_KEYS:
        ident = msg_id or found
        return {"id": ident, "response": packet, "isDisposed": True} if type(ident) is str else None
    if msg_id is not None:
        if found and found != msg_id:
            return None
        packet["id"] = msg_id
    elif type(found) is not str:
        return None
    return packet
