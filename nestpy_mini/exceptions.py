"""The errors a handler raises and the errors a caller catches."""

from __future__ import annotations

from typing import Any


class RpcException(Exception):
    """Raise in a handler to send ``error`` to the caller as it is.

    A string arrives as ``{"status": "error", "message": error}``, a dict
    arrives unchanged: the same rule as Nest's ``BaseRpcExceptionFilter``.
    """

    def __init__(self, error: str | dict[str, Any]) -> None:
        self.error = error
        if isinstance(error, str):
            message = error
        elif isinstance(error, dict) and isinstance(error.get("message"), str):
            message = error["message"]
        else:
            message = "Rpc Exception"
        super().__init__(message)

    def get_error(self) -> str | dict[str, Any]:
        return self.error


class RpcError(Exception):
    """What a caller gets when the remote handler failed.

    ``error`` is the ``err`` value of the reply, unchanged, so code written
    against a NestJS service can inspect the same fields.
    """

    def __init__(self, error: Any) -> None:
        self.error = error
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            message = error["message"]
        else:
            message = str(error)
        super().__init__(message)


class RequestTimeoutError(TimeoutError):
    """No reply (or no next value of a stream) arrived within the timeout."""


class ConnectionClosedError(ConnectionError):
    """The connection went away while a request was waiting for its reply."""


class InvalidMessageError(ValueError):
    """``send``/``emit`` was given ``None`` as pattern or data, as Nest forbids."""

    def __init__(self) -> None:
        super().__init__("The invalid data or message pattern (undefined/null)")


class WiringError(Exception):
    """The module graph cannot be built: raised at start-up, naming the culprit."""
