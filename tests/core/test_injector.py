"""Dependency injection: by type, by token, providers of every kind, and wiring errors."""

from __future__ import annotations

from typing import Annotated

import pytest

from nestpy_mini import (
    ClientProxy,
    ClientsModule,
    Controller,
    Inject,
    Injectable,
    MessagePattern,
    Module,
    NestFactory,
    Transport,
    WiringError,
)


@Injectable()
class Repo:
    def __init__(self) -> None:
        self.items = ["a"]


@Injectable()
class Service:
    def __init__(self, repo: Repo, prefix: Annotated[str, Inject("PREFIX")]) -> None:
        self.repo = repo
        self.prefix = prefix


async def test_injects_by_type_and_by_token_and_shares_instances() -> None:
    @Controller()
    class Ctl:
        def __init__(self, service: Service, repo: Repo) -> None:
            self.service = service
            self.repo = repo

    @Module(controllers=[Ctl], providers=[Repo, Service, {"provide": "PREFIX", "use_value": ">"}])
    class AppModule:
        pass

    app = await NestFactory.create_microservice(AppModule, options={"port": 0})
    ctl = app.get(Ctl)
    assert ctl.service.prefix == ">"
    assert ctl.service.repo is ctl.repo is app.get(Repo)  # one instance per module
    await app.close()


async def test_factory_and_class_providers_with_inject() -> None:
    class Base:
        name = "base"

    class Impl(Base):
        name = "impl"

    async def make_config(prefix: str) -> dict:
        return {"prefix": prefix * 2}

    @Module(
        providers=[
            {"provide": "PREFIX", "use_value": "#"},
            {"provide": "CONFIG", "use_factory": make_config, "inject": ["PREFIX"]},
            {"provide": Base, "use_class": Impl},
        ]
    )
    class AppModule:
        pass

    app = await NestFactory.create_microservice(AppModule, options={"port": 0})
    assert app.get("CONFIG") == {"prefix": "##"}
    assert app.get(Base).name == "impl"
    await app.close()


async def test_exports_are_visible_to_importers_only() -> None:
    @Module(providers=[Repo], exports=[Repo])
    class RepoModule:
        pass

    @Injectable()
    class UsesRepo:
        def __init__(self, repo: Repo) -> None:
            self.repo = repo

    @Module(imports=[RepoModule], providers=[UsesRepo])
    class AppModule:
        pass

    app = await NestFactory.create_microservice(AppModule, options={"port": 0})
    assert app.get(UsesRepo).repo.items == ["a"]
    await app.close()

    @Module(providers=[Repo])  # not exported
    class PrivateModule:
        pass

    @Module(imports=[PrivateModule], providers=[UsesRepo])
    class BadModule:
        pass

    with pytest.raises(WiringError, match=r"UsesRepo \(parameter 'repo'\) needs Repo.*BadModule"):
        await NestFactory.create_microservice(BadModule, options={"port": 0})


async def test_missing_token_names_class_and_parameter() -> None:
    @Injectable()
    class NeedsClient:
        def __init__(self, client: Annotated[ClientProxy, Inject("MATH_SERVICE")]) -> None:
            self.client = client

    @Module(providers=[NeedsClient])
    class AppModule:
        pass

    with pytest.raises(
        WiringError, match=r"NeedsClient \(parameter 'client'\) needs 'MATH_SERVICE'"
    ):
        await NestFactory.create_microservice(AppModule, options={"port": 0})


async def test_circular_dependency_is_reported_as_a_cycle() -> None:
    @Injectable()
    class A:
        def __init__(self, b: B) -> None: ...

    @Injectable()
    class B:
        def __init__(self, a: A) -> None: ...

    globals().update(A=A, B=B)  # the hints are strings under `from __future__`
    try:

        @Module(providers=[A, B])
        class AppModule:
            pass

        with pytest.raises(
            WiringError, match=r"circular dependency: A in AppModule -> B in AppModule -> A"
        ):
            await NestFactory.create_microservice(AppModule, options={"port": 0})
    finally:
        del globals()["A"], globals()["B"]


async def test_duplicate_message_pattern_names_both_handlers() -> None:
    @Controller()
    class One:
        @MessagePattern({"cmd": "sum"})
        def add(self, data: list[int]) -> int:
            return sum(data)

    @Controller()
    class Two:
        @MessagePattern({"cmd": "sum"})
        def total(self, data: list[int]) -> int:
            return sum(data)

    @Module(controllers=[One, Two])
    class AppModule:
        pass

    with pytest.raises(
        WiringError, match=r'\{"cmd":"sum"\} is handled twice: by One.add and by Two.total'
    ):
        await NestFactory.create_microservice(AppModule, options={"port": 0})


async def test_not_a_module_and_bad_export_and_untyped_parameter() -> None:
    class Plain:
        pass

    @Module(imports=[Plain])
    class AppModule:
        pass

    with pytest.raises(WiringError, match=r"Plain \(imported by AppModule\) is not a module"):
        await NestFactory.create_microservice(AppModule)

    @Module(exports=[Repo])
    class ExportsNothing:
        pass

    with pytest.raises(WiringError, match="ExportsNothing exports Repo, which is neither"):
        await NestFactory.create_microservice(ExportsNothing)

    @Injectable()
    class Untyped:
        def __init__(self, thing) -> None:  # type: ignore[no-untyped-def]
            self.thing = thing

    @Module(providers=[Untyped])
    class UntypedModule:
        pass

    with pytest.raises(
        WiringError, match="Untyped: constructor parameter 'thing' has no type hint"
    ):
        await NestFactory.create_microservice(UntypedModule)


async def test_clients_module_provides_a_client_per_name_and_closes_it() -> None:
    @Injectable()
    class AppService:
        def __init__(self, client: Annotated[ClientProxy, Inject("MATH_SERVICE")]) -> None:
            self.client = client

    clients = ClientsModule.register(
        [{"name": "MATH_SERVICE", "transport": Transport.TCP, "options": {"port": 1}}]
    )

    @Module(imports=[clients], providers=[AppService])
    class AppModule:
        pass

    app = await NestFactory.create_microservice(AppModule, options={"port": 0})
    client = app.get(AppService).client
    assert isinstance(client, ClientProxy)
    assert client is app.get("MATH_SERVICE")
    assert client.describe() == "tcp://127.0.0.1:1"
    await app.close()
    assert not client.is_connected
