"""A nestpy_mini client and server over real loopback TCP: every semantic the issue lists."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Annotated

import pytest
from conftest import Serve, wait_until
from pydantic import BaseModel
from support.apps import (
    shared_handlers,
)

from nestpy_mini import (
    ClientProxy,
    ConnectionClosedError,
    Controller,
    Ctx,
    EventPattern,
    InvalidMessageError,
    MessagePattern,
    Module,
    Payload,
    RpcError,
)
from nestpy_mini.transports.tcp import TcpContext

calls: list[str] = []
events: list[object] = []


class User(BaseModel):
    user_id: str
    age: int


@Controller()
class AppController(shared_handlers(lambda name: {"cmd": name}, lambda name: name)):
    @MessagePattern({"cmd": "sum"})
    def sum(self, data: list[int]) -> int:
        calls.append("sum")
        return sum(data or [])

    @MessagePattern({"cmd": "async_sum"})
    async def async_sum(self, data: list[int]) -> int:
        await asyncio.sleep(0.001)
        return sum(data)


    @MessagePattern({"cmd": "ctx"})
    def ctx(self, data: object, ctx: TcpContext) -> list[object]:
        return [ctx.get_pattern(), ctx.peer[0] if ctx.peer else None]

    @MessagePattern({"cmd": "bind"})
    def bind(
        self,
        context: Annotated[TcpContext, Ctx()],
        name: Annotated[str, Payload("name")],
    ) -> str:
        return f"{name} via {context.get_pattern()}"

    @MessagePattern({"cmd": "validate"})
    def validate(self, user: User) -> str:
        return f"{user.user_id} is {user.age}"

    @MessagePattern("ping")
    def ping(self) -> str:
        return "pong"

    @EventPattern("user_created")
    def on_user_created(self, data: object) -> None:
        events.append(data)

    @EventPattern("user_created")
    async def also_on_user_created(self, data: object) -> None:
        events.append({"second": data})


@Module(controllers=[AppController])
class AppModule:
    pass


@pytest.fixture(autouse=True)
def _reset() -> None:
    calls.clear()
    events.clear()


@pytest.fixture
async def client(serve: Serve, tcp_client: Callable[..., ClientProxy]) -> ClientProxy:
    app = await serve(AppModule, close_grace=0.2)
    return tcp_client(app.server.port, timeout=2)


async def test_connect_is_idempotent_and_concurrent_safe(client: ClientProxy) -> None:
    await asyncio.gather(*(client.connect() for _ in range(5)))
    first = client._conn  # type: ignore[attr-defined]
    await client.connect()
    assert client._conn is first  # type: ignore[attr-defined]


async def test_tcp_connect_refused_is_a_clear_error(tcp_client: Callable[..., ClientProxy]) -> None:
    client = tcp_client(1)
    with pytest.raises(ConnectionError, match=r"cannot connect to tcp://127.0.0.1:1"):
        await client.send({"cmd": "sum"}, [1])


async def test_server_gone_mid_request_fails_fast(
    serve: Serve, tcp_client: Callable[..., ClientProxy]
) -> None:
    app = await serve(AppModule, close_grace=0)
    client = tcp_client(app.server.port, timeout=10)
    pending = asyncio.ensure_future(client.send({"cmd": "hang"}, 1))
    await wait_until(lambda: bool(client._routing))
    await app.close()
    with pytest.raises(ConnectionClosedError, match="closed"):
        await asyncio.wait_for(pending, 2)


async def test_none_is_rejected_like_nest(client: ClientProxy) -> None:
    with pytest.raises(InvalidMessageError):
        client.send({"cmd": "sum"}, None)
    with pytest.raises(InvalidMessageError):
        client.emit(None, 1)


async def test_context_exposes_pattern_and_peer(client: ClientProxy) -> None:
    assert await client.send({"cmd": "ctx"}, 1) == ['{"cmd":"ctx"}', "127.0.0.1"]
    assert await client.send({"cmd": "bind"}, {"name": "Ada"}) == 'Ada via {"cmd":"bind"}'


async def test_pydantic_payload_is_validated(client: ClientProxy) -> None:
    assert await client.send({"cmd": "validate"}, {"user_id": "u1", "age": "7"}) == "u1 is 7"
    with pytest.raises(RpcError) as info:
        await client.send({"cmd": "validate"}, {"user_id": "u1", "age": "old"})
    assert info.value.error["message"] == "Validation failed"
    assert info.value.error["errors"][0]["loc"] == ["age"]


async def test_id_prefix_makes_ids_repeatable(
    serve: Serve, tcp_client: Callable[..., ClientProxy]
) -> None:
    app = await serve(AppModule)
    client = tcp_client(app.server.port, id_prefix="demo-")
    seen: list[str] = []
    original = client._publish

    def spy(pattern: object, data: object, msg_id: str) -> object:
        seen.append(msg_id)
        return original(pattern, data, msg_id)

    client._publish = spy  # type: ignore[method-assign]
    assert await client.send({"cmd": "sum"}, [1]) == 1
    assert await client.send({"cmd": "sum"}, [2]) == 2
    assert seen == ["demo-1", "demo-2"]
