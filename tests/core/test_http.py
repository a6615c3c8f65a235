"""A hybrid app: one module answering HTTP (Starlette/uvicorn) and TCP messages.

No `from __future__ import annotations` here: the modules are built inside
functions, and the injector reads constructor hints at runtime.
"""

from typing import Annotated

import httpx
import pytest
from pydantic import BaseModel

from nestpy_mini import (
    ClientProxy,
    ClientProxyFactory,
    ClientsModule,
    Controller,
    Inject,
    Injectable,
    MessagePattern,
    Module,
    NestFactory,
    Transport,
)
from nestpy_mini.http import Body, Get, HttpException, Param, Post, Query


class Order(BaseModel):
    item: str
    qty: int


async def test_hybrid_app_serves_http_and_tcp_from_one_module() -> None:
    math = await _math_service()
    try:
        app = await NestFactory.create(_hybrid_module(math.server.port))
        micro = app.connect_microservice(transport=Transport.TCP, options={"port": 0})
        await app.start_all_microservices()
        await app.listen(0)
        async with httpx.AsyncClient(base_url=app.url, timeout=5) as http:
            # HTTP -> AppService -> ClientProxy.send -> the math service over TCP
            assert (await http.get("/math/sum", params={"nums": "1,2,3"})).json() == 6
            assert (await http.get("/math/items/42")).json() == {"id": 42}
            bad = await http.get("/math/items/x")
            assert bad.status_code == 400
            assert bad.json() == {"statusCode": 400, "message": "'x' is not a valid int"}
            made = await http.post("/math/orders", json={"item": "茶", "qty": "2"})
            assert made.json() == {"item": "茶", "qty": 2}
            invalid = await http.post("/math/orders", json={"item": "茶"})
            assert invalid.status_code == 400
            assert invalid.json()["errors"][0]["loc"] == ["qty"]
            assert (await http.get("/math/teapot")).status_code == 418
            failed = await http.get("/math/fail")
            assert failed.json() == {"statusCode": 500, "message": "Internal server error"}
        # ...and the same controller's message pattern, over the connected TCP transport.
        client = ClientProxyFactory.create(Transport.TCP, {"port": micro.server.port})
        assert await client.send({"cmd": "double"}, 21) == 42
        await client.close()
        service_client = app.get("MATH_SERVICE")
        await app.close()
        assert not service_client.is_connected  # closed with the app
    finally:
        await math.close()


async def test_port_in_use_is_a_clear_error() -> None:
    first = await NestFactory.create(_hybrid_module(1))
    await first.listen(0)
    second = await NestFactory.create(_hybrid_module(1))
    with pytest.raises(OSError, match="could not start"):
        await second.listen(first.port)
    await second.close()
    await first.close()


async def _math_service():  # type: ignore[no-untyped-def]
    @Controller()
    class MathController:
        @MessagePattern({"cmd": "sum"})
        def sum(self, data: list[int]) -> int:
            return sum(data)

    @Module(controllers=[MathController])
    class MathModule:
        pass

    app = await NestFactory.create_microservice(MathModule, options={"port": 0})
    return await app.start()


def _hybrid_module(math_port: int) -> type:
    @Injectable()
    class AppService:
        def __init__(self, client: Annotated[ClientProxy, Inject("MATH_SERVICE")]) -> None:
            self.client = client

        def sum(self, arr: list[int]):  # type: ignore[no-untyped-def]
            return self.client.send({"cmd": "sum"}, arr)

    @Controller("math")
    class AppController:
        def __init__(self, service: AppService) -> None:
            self.service = service

        @Get("sum")
        def sum(self, nums: Annotated[str, Query("nums")]):  # type: ignore[no-untyped-def]
            return self.service.sum([int(n) for n in nums.split(",")])

        @Get("items/:id")
        def item(self, item_id: Annotated[int, Param("id")]) -> dict[str, int]:
            return {"id": item_id}

        @Post("orders")
        def order(self, order: Annotated[Order, Body()]) -> dict[str, object]:
            return order.model_dump()

        @Get("teapot")
        def teapot(self) -> None:
            raise HttpException("I'm a teapot", 418)

        @Get("fail")
        async def fail(self) -> None:
            raise RuntimeError("hidden")

        @MessagePattern({"cmd": "double"})
        def double(self, n: int) -> int:
            return 2 * n

    clients = ClientsModule.register(
        [{"name": "MATH_SERVICE", "transport": Transport.TCP, "options": {"port": math_port}}]
    )

    @Module(imports=[clients], controllers=[AppController], providers=[AppService])
    class AppModule:
        pass

    return AppModule
