"""nestpy-mini: NestJS-style microservices for asyncio, on NestJS's own wire protocols.

The public API is everything in ``__all__``; the rest is internal.
"""

from .client import ClientProxy, ClientProxyFactory, ClientsModule, Observable, Subscription
from .common import Controller, Ctx, DynamicModule, Inject, Injectable, Module, Payload
from .exceptions import (
    ConnectionClosedError,
    InvalidMessageError,
    RequestTimeoutError,
    RpcError,
    RpcException,
    WiringError,
)
from .factory import NestFactory, NestMicroservice
from .patterns import EventPattern, MessagePattern
from .server import BaseRpcContext, Server
from .transports import Transport

__all__ = [
    "BaseRpcContext",
    "ClientProxy",
    "ClientProxyFactory",
    "ClientsModule",
    "ConnectionClosedError",
    "Controller",
    "Ctx",
    "DynamicModule",
    "EventPattern",
    "Inject",
    "Injectable",
    "InvalidMessageError",
    "MessagePattern",
    "Module",
    "NestFactory",
    "NestMicroservice",
    "Observable",
    "Payload",
    "RequestTimeoutError",
    "RpcError",
    "RpcException",
    "Server",
    "Subscription",
    "Transport",
    "WiringError",
]
