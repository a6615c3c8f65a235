"""The transports, loaded on first use so that ``import nestpy_mini`` stays light.

Each module holds one transport's server and client side by side and names
them ``SERVER`` and ``CLIENT``.
"""

from __future__ import annotations

import importlib
from enum import IntEnum
from types import ModuleType


class Transport(IntEnum):
    """The same names and numbers as Nest's ``Transport`` enum."""

    TCP = 0
    REDIS = 1
    NATS = 2
    MQTT = 3
    GRPC = 4
    RMQ = 5
    KAFKA = 6


_MODULES = {
    Transport.TCP: "tcp",
    Transport.REDIS: "redis",
    Transport.NATS: "nats",
    Transport.MQTT: "mqtt",
    Transport.RMQ: "rmq",
    Transport.KAFKA: "kafka",
}


def load(transport: Transport | int) -> ModuleType:
    """The module implementing ``transport``; a clear error for one not built yet."""
    transport = Transport(transport)
    name = _MODULES.get(transport)
    if name is None:
        available = ", ".join(t.name for t in _MODULES)
        raise NotImplementedError(
            f"Transport.{transport.name} is not available in nestpy_mini (available: {available})"
        )
    return importlib.import_module(f"{__name__}.{name}")
