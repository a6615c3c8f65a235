"""The playground widget, driven in code against real services: what it shows and sends."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from conftest import Serve, wait_until

from nestpy_mini import (
    Controller,
    EventPattern,
    MessagePattern,
    Module,
    NestFactory,
    RpcException,
    Transport,
)
from nestpy_mini.dev.playground import (
    Playground,
    WireTap,
    parse_pattern,
    split_frames,
    wire_line,
)

calls: list[object] = []
events: list[object] = []


@Controller()
class MathController:
    @MessagePattern({"cmd": "sum"})
    def sum(self, data: list[int]) -> int:
        calls.append(data)
        return sum(data or [])

    @MessagePattern({"cmd": "count"})
    async def count(self, n: int) -> AsyncIterator[int]:
        for i in range(1, n + 1):
            yield i

    @MessagePattern({"cmd": "rpc_obj"})
    def rpc_obj(self, data: object) -> None:
        raise RpcException({"code": 42, "message": "custom"})

    @EventPattern("user_created")
    def user_created(self, data: object) -> None:
        events.append(data)


@Module(controllers=[MathController])
class MathModule:
    pass


@pytest.fixture(autouse=True)
def _reset() -> None:
    calls.clear()
    events.clear()


@pytest.fixture
async def playground(serve: Serve) -> AsyncIterator[Playground]:
    app = await serve(MathModule)
    pg = Playground({"TCP": (Transport.TCP, {"port": app.server.port})}, timeout=2)
    yield pg
    await pg.close()


async def click(pg: Playground, button: Any, pattern: str, payload: str) -> None:
    pg.pattern_box.value = pattern
    pg.payload_box.value = payload
    button.click()
    assert pg.pending is not None
    await pg.pending


async def test_send_shows_the_reply_and_both_frames(playground: Playground) -> None:
    await click(playground, playground.send_button, '{"cmd": "sum"}', "[1, 2, 3]")
    assert playground.reply_text == "6"
    assert "6" in playground.reply_area.value
    request, reply = playground.wire_text.splitlines()
    assert request == """→ b'54#{"pattern":{"cmd":"sum"},"data":[1,2,3],"id":"play-1"}'"""
    assert reply == """← b'46#{"response":6,"isDisposed":true,"id":"play-1"}'"""
    assert "play-1" in playground.wire_area.value
    # The next request is play-2: ids are repeatable from one run to the next.
    await click(playground, playground.send_button, '{"cmd": "sum"}', "[4]")
    assert playground.reply_text == "4" and '"id":"play-2"' in playground.wire_text


async def test_a_streamed_reply_shows_every_value(playground: Playground) -> None:
    await click(playground, playground.send_button, '{"cmd": "count"}', "3")
    assert playground.reply_text.splitlines() == ["1", "2", "3"]
    assert playground.wire_text.count("←") == 4  # three values, then the end marker


async def test_emit_reaches_the_handler_and_its_frame_has_no_id(playground: Playground) -> None:
    await click(playground, playground.emit_button, "user_created", '{"userId": "42"}')
    await wait_until(lambda: events == [{"userId": "42"}])
    assert "no reply" in playground.reply_text
    assert playground.wire_text == ("""→ b'49#{"pattern":"user_created","data":{"userId":"42"}}'""")


async def test_non_ascii_data_shows_as_bytes_and_as_text(playground: Playground) -> None:
    # 张三 is 2 characters and 6 bytes: the prefix 49 counts characters, as JavaScript does,
    # so a reader needs the text under the bytes to check it.
    await click(playground, playground.emit_button, "user_created", '{"userId": "张三"}')
    await wait_until(lambda: events == [{"userId": "张三"}])
    assert playground.wire_text.splitlines() == [
        r"""→ b'49#{"pattern":"user_created","data":{"userId":"\xe5\xbc\xa0\xe4\xb8\x89"}}'""",
        """    49#{"pattern":"user_created","data":{"userId":"张三"}}""",
    ]
    assert "张三" in playground.wire_area.value


def test_wire_line_adds_text_only_under_non_ascii_bytes() -> None:
    assert wire_line("→ ", b"2#{}") == "→ b'2#{}'"  # ASCII: the bytes already read as text
    shown = wire_line("ch  ", "é".encode(), "  (reply to r)")
    assert shown == "ch  b'\\xc3\\xa9'  (reply to r)\n      é"  # the text under the bytes
    assert wire_line("", b"\xff") == "b'\\xff'\n  \\xff"  # not UTF-8: escaped, never an exception


async def test_invalid_json_shows_an_error_and_sends_nothing(playground: Playground) -> None:
    playground.payload_box.value = "[1, 2"
    playground.send_button.click()
    assert playground.pending is None  # nothing was even scheduled
    assert playground.reply_text.startswith("The payload is not valid JSON")
    assert "Nothing was sent" in playground.reply_text
    assert playground.wire_text == "(nothing went over the wire)"
    await click(playground, playground.send_button, '{"cmd": "sum"}', "[1]")
    assert calls == [[1]] and '"id":"play-1"' in playground.wire_text  # the first id still


async def test_an_rpc_exception_shows_the_error_dict(playground: Playground) -> None:
    await click(playground, playground.send_button, '{"cmd": "rpc_obj"}', "{}")
    assert playground.reply_text == 'RpcError: {"code": 42, "message": "custom"}'
    assert "b00020" in playground.reply_area.value  # shown as an error
    assert '"err":{"code":42,"message":"custom"}' in playground.wire_text.splitlines()[1]


async def test_an_unknown_pattern_and_a_malformed_pattern(playground: Playground) -> None:
    await click(playground, playground.send_button, "nope", "1")
    assert "There is no matching message handler" in playground.reply_text
    playground.pattern_box.value = '{"cmd": '
    playground.send_button.click()
    assert playground.reply_text.startswith("Invalid pattern: the pattern looks like JSON")


async def test_close_leaves_nothing_running(serve: Serve) -> None:
    app = await serve(MathModule)
    pg = Playground({"TCP": (Transport.TCP, {"port": app.server.port})})
    await click(pg, pg.send_button, '{"cmd": "sum"}', "[1]")
    pg.emit_button.click()  # still running when close() is called
    tap = pg._taps["TCP"]
    await pg.close()
    assert pg.pending is not None and pg.pending.done()
    assert isinstance(tap, WireTap) and tap._server is None and not tap._writers
    assert asyncio.all_tasks() == {asyncio.current_task()}
    assert pg.send_button.disabled and pg.emit_button.disabled


async def test_a_service_that_is_not_there(unused_tcp_port: int) -> None:
    pg = Playground({"TCP": (Transport.TCP, {"port": unused_tcp_port})})
    try:
        await pg.send()
        assert pg.reply_text.startswith("ConnectionClosedError")
        assert "! cannot connect to 127.0.0.1:" in pg.wire_text
    finally:
        await pg.close()


def test_parse_pattern() -> None:
    assert parse_pattern(' {"cmd": "sum"} ') == {"cmd": "sum"}
    assert parse_pattern("user_created") == "user_created"
    assert parse_pattern("42") == 42
    with pytest.raises(ValueError, match="empty"):
        parse_pattern("  ")


def test_split_frames_counts_utf16_units_like_the_transport() -> None:
    body = '{"x":"😀é"}'.encode()  # the emoji is two units, é one: 11 units in all
    buf = bytearray(b"11#" + body + b"2#{}")
    assert split_frames(buf[:8]) == []  # a frame cut short waits for the rest
    assert split_frames(buf) == [b"11#" + body, b"2#{}"] and buf == b""


@pytest.mark.parametrize(
    ("kind", "transport", "key"),
    [
        ("redis", Transport.REDIS, "url"),
        ("nats", Transport.NATS, "servers"),
        ("mqtt", Transport.MQTT, "url"),
    ],
)
async def test_broker_targets_show_channel_and_payload(
    broker_url: Callable[[str], str], kind: str, transport: Transport, key: str
) -> None:
    run = secrets.token_hex(4)  # the broker may be shared: this run's own pattern

    @Controller()
    class RunController:
        @MessagePattern({"cmd": "sum", "run": run})
        def sum(self, data: list[int]) -> int:
            return sum(data)

    @Module(controllers=[RunController])
    class RunModule:
        pass

    options = {key: broker_url(kind)}
    app = await NestFactory.create_microservice(RunModule, transport=transport, options=options)
    await app.start()
    pg = Playground({kind: (transport, options)}, timeout=3)
    try:
        await click(pg, pg.send_button, f'{{"cmd": "sum", "run": "{run}"}}', "[1, 2, 3]")
        assert pg.reply_text == "6"
        request = f'{{"pattern":{{"cmd":"sum","run":"{run}"}},"data":[1,2,3],"id":"play-1"}}'
        lines = [line for line in pg.wire_text.splitlines() if "play-1" in line]
        assert any(line.startswith(f'{{"cmd":"sum","run":"{run}"}}  ') for line in lines)
        reply = b'{"response":6,"isDisposed":true,"id":"play-1"}'
        assert any(repr(request.encode()) in line for line in lines)
        assert any(repr(reply) in line for line in lines)
    finally:
        await pg.close()
        await app.close()


@pytest.mark.parametrize(
    ("transport", "options"),
    [
        (Transport.REDIS, {"url": "redis://127.0.0.1:{port}"}),
        (Transport.NATS, {"servers": "nats://127.0.0.1:{port}"}),
        (Transport.MQTT, {"url": "mqtt://127.0.0.1:{port}"}),
    ],
)
async def test_a_broker_that_is_down_shows_the_error_and_leaks_nothing(
    unused_tcp_port: int, transport: Transport, options: dict[str, str]
) -> None:
    target = {key: url.format(port=unused_tcp_port) for key, url in options.items()}
    pg = Playground({"down": (transport, target)}, timeout=1)
    await click(pg, pg.send_button, '{"cmd": "sum"}', "[1]")  # the task itself does not fail
    assert pg.reply_text.split(":")[0] in {"ConnectionError", "MqttError"}
    assert pg.wire_text == "(nothing went over the wire)"
    assert "b00020" in pg.reply_area.value
    await pg.close()
    assert asyncio.all_tasks() == {asyncio.current_task()}
