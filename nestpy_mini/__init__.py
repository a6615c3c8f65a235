"""nestpy-mini: NestJS-style microservices for asyncio, on NestJS's own wire protocols.

The public API is everything in ``__all__``; the rest is internal.  Nothing here starts a
process: brokers and tools live in ``nestpy_mini.dev``.
"""

from .app import (
    ClientProxyFactory,
    ClientsModule,
    NestApplication,
    NestFactory,
    NestMicroservice,
    run,
)
from .client import ClientProxy, Observable, Subscription
from .decorators import (
    Controller,
    Ctx,
    DynamicModule,
    EventPattern,
    Inject,
    Injectable,
    MessagePattern,
    Module,
    Payload,
)
from .exceptions import (
    ConnectionClosedError,
    InvalidMessageError,
    NoRespondersError,
    RequestTimeoutError,
    RpcError,
    RpcException,
    WiringError,
)
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
    "NestApplication",
    "NestFactory",
    "NestMicroservice",
    "NoRespondersError",
    "Observable",
    "Payload",
    "RequestTimeoutError",
    "RpcError",
    "RpcException",
    "Server",
    "Subscription",
    "Transport",
    "WiringError",
    "run",
]
