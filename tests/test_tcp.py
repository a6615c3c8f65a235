"""A nestpy_mini client and server over real loopback TCP: every semantic the issue lists."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Annotated

import pytest
from common_app import (
    COMMON_ERRORS,
    check_error_kinds,
    check_stream_error,
    check_streams,
    shared_handlers,
)
from conftest import Serve, wait_until
from pydantic import BaseModel

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
    RequestTimeoutError,
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

    @MessagePattern({"cmd": "unserializable"})
    def unserializable(self, data: object) -> object:
        return {1, 2}

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


async def test_send_sums(client: ClientProxy) -> None:
    assert await client.send({"cmd": "sum"}, [1, 2, 3]) == 6
    assert await client.send({"cmd": "async_sum"}, [4, 5]) == 9
    assert await client.send("ping", {}) == "pong"


async def test_send_is_cold_until_awaited(client: ClientProxy) -> None:
    request = client.send({"cmd": "sum"}, [1])
    await asyncio.sleep(0.05)
    assert calls == [] and not client.is_connected  # connect() is lazy too
    assert await request == 1
    assert await request == 1  # each await is a new request, like re-subscribing
    assert calls == ["sum", "sum"]


async def test_streamed_reply_three_ways(client: ClientProxy) -> None:
    await check_streams(client, {"cmd": "count"})


async def test_stream_error_after_values(client: ClientProxy) -> None:
    await check_stream_error(client, {"cmd": "stream_err"})


async def test_every_error_kind_reaches_the_caller_as_nest_sends_it(
    client: ClientProxy, caplog: pytest.LogCaptureFixture
) -> None:
    more = {
        "unserializable": {"status": "error", "message": "Internal server error"},
        "missing": "There is no matching message handler defined in the remote service.",
    }
    await check_error_kinds(client, lambda name: {"cmd": name}, caplog, more)
    assert str(RpcError(COMMON_ERRORS["boom"])) == "Internal server error"  # never sent


async def test_errors_do_not_stop_the_server(client: ClientProxy) -> None:
    for _ in range(3):
        with pytest.raises(RpcError):
            await client.send({"cmd": "boom"}, 1)
        assert await client.send({"cmd": "sum"}, [2, 2]) == 4


async def test_emit_is_hot_and_every_event_handler_runs(client: ClientProxy) -> None:
    client.emit("user_created", {"userId": "u1"})  # not awaited: it leaves anyway
    await wait_until(lambda: len(events) == 2)
    assert events == [{"userId": "u1"}, {"second": {"userId": "u1"}}]
    assert await client.emit("user_created", {"userId": "u2"}) is None  # no reply
    await client.emit("explodes", 1)  # a failing handler is logged, not fatal
    await client.emit("nobody_listens", 1)
    assert await client.send({"cmd": "sum"}, [1]) == 1


async def test_timeout_per_call_and_server_keeps_serving(client: ClientProxy) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(RequestTimeoutError, match=r"no reply to \{'cmd': 'hang'\} within 0.2 s"):
        await client.send({"cmd": "hang"}, 1, timeout=0.2)
    assert loop.time() - started < 1.0
    assert await client.send({"cmd": "sum"}, [1, 1]) == 2


async def test_default_timeout_is_finite(client: ClientProxy) -> None:
    assert client.timeout == 2  # set by the fixture; the library default is 5 s
    client.timeout = 0.1
    with pytest.raises(RequestTimeoutError):
        await client.send({"cmd": "hang"}, 1)


async def test_close_fails_pending_requests_at_once(client: ClientProxy) -> None:
    pending = asyncio.ensure_future(client.send({"cmd": "hang"}, 1, timeout=10))
    await wait_until(lambda: client.is_connected and bool(client._routing))
    await client.close()
    with pytest.raises(ConnectionClosedError, match="was closed"):
        await asyncio.wait_for(pending, 1)
    assert await client.send({"cmd": "sum"}, [3]) == 3  # and it reconnects on demand


async def test_connect_is_idempotent_and_concurrent_safe(client: ClientProxy) -> None:
    await asyncio.gather(*(client.connect() for _ in range(5)))
    first = client._conn  # type: ignore[attr-defined]
    await client.connect()
    assert client._conn is first  # type: ignore[attr-defined]


async def test_connect_refused_is_a_clear_error(tcp_client: Callable[..., ClientProxy]) -> None:
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


async def test_many_concurrent_requests_on_one_connection(client: ClientProxy) -> None:
    results = await asyncio.gather(*(client.send({"cmd": "async_sum"}, [i, i]) for i in range(500)))
    assert results == [2 * i for i in range(500)]


async def test_non_ascii_round_trip(client: ClientProxy) -> None:
    data = {"名字": "张三", "emoji": "😀🚀", "nested": [{"深": ["层", {"x": "é"}]}]}
    assert await client.send({"cmd": "sum"}, []) == 0
    app_reply = await client.send("ping", data)
    assert app_reply == "pong"
    client.emit("user_created", data)
    await wait_until(lambda: len(events) == 2)
    assert events[0] == data


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
