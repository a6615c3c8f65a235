"""The errors a handler raises and the errors a caller catches."""

from __future__ import annotations

from typing import Any


def _message(error: Any, default: str) -> str:
    """An error's text as Nest reads it: its ``message`` field when that is a string."""
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error["message"]
    return default


class RpcException(Exception):
    """Raise in a handler to send ``error`` to the caller: a string arrives as ``{"status":
    "error", "message": error}``, a dict unchanged, as in Nest's ``BaseRpcExceptionFilter``."""

    def __init__(self, error: str | dict[str, Any]) -> None:
        self.error = error
        super().__init__(error if isinstance(error, str) else _message(error, "Rpc Exception"))

    def get_error(self) -> str | dict[str, Any]:
        return self.error


class RpcError(Exception):
    """What a caller gets when the remote handler failed: ``error`` is the reply's ``err``
    unchanged, so code written against a NestJS service reads the same fields."""

    def __init__(self, error: Any) -> None:
        self.error = error
        super().__init__(_message(error, str(error)))


class RequestTimeoutError(TimeoutError):
    """No reply (or no next value of a stream) arrived within the timeout."""


class NoRespondersError(RpcError, ConnectionError):
    """The broker said at once that nobody subscribes to the request's channel, so no reply
    can come: NATS's "no responders", a Redis ``PUBLISH`` that reached no subscriber, an
    MQTT 5 ``PUBACK`` "No matching subscribers".  ``error`` is the text Nest's NATS client
    gives (its ``EmptyResponseException``), with the channel's name; ``except RpcError``, as
    for NATS in Nest, and ``except ConnectionError`` both catch it."""


class ConnectionClosedError(ConnectionError):
    """The connection went away while a request was waiting for its reply."""


class InvalidMessageError(ValueError):
    """``send``/``emit`` was given ``None`` as pattern or data, as Nest forbids."""

    def __init__(self) -> None:
        super().__init__("The invalid data or message pattern (undefined/null)")


class WiringError(Exception):
    """The module graph cannot be built: raised at start-up, naming the culprit."""
