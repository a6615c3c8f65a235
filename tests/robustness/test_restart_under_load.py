"""A broker killed and restarted one second later, under a steady 200 requests a second.

What a caller may see: an answer, right; or an error at once.  A request may wait
out its timeout only where the broker could not tell that nobody would answer it
(MQTT 3.1.1, RabbitMQ keeping it for a consumer that comes later).  Once the
service is back, every request is answered.  The counts are printed as a table.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections import Counter
from typing import Any

import pytest
from support.kits import KITS, RUN, Kit, outage

from nestpy_mini import (
    ClientProxyFactory,
    Controller,
    MessagePattern,
    Module,
    NestFactory,
    RequestTimeoutError,
)
from nestpy_mini.dev import brokers
from nestpy_mini.transports.mqtt import MqttRecordBuilder

PATTERN = f"load.{RUN}.add"
RATE, TIMEOUT = 200, 3.0  # requests a second; each request's timeout (s)
STOP, START, END = 0.3, 1.3, 2.8  # s after the first request: kill, restart, last request
SETTLE = 0.5  # s after the service is back, by which the client is back too
handled: Counter[int] = Counter()


@Controller()
class Adder:
    @MessagePattern(PATTERN)
    def add(self, data: list[int]) -> int:
        handled[data[0]] += 1
        return data[0] + data[1]


@Module(controllers=[Adder])
class LoadModule: ...


class _Back(logging.Handler):
    """When each server logs that it is back, with its subscriptions in place: its logger
    is ``nestpy_mini.<Kind>Server`` (clients log the same line under their own names)."""

    def __init__(self) -> None:
        super().__init__()
        self.at: dict[str, float] = {}  # kit id: the first "back on" of its server

    def emit(self, record: logging.LogRecord) -> None:
        name = record.name.removeprefix("nestpy_mini.")
        if record.getMessage().startswith("back on") and name.endswith("Server"):
            kit_id, now = name.removesuffix("Server").upper(), asyncio.get_running_loop().time()
            self.at.setdefault(kit_id, now)


LOAD_KITS = [kit for kit in KITS if kit.kind in ("redis", "nats", "mqtt", "rmq")]


async def _broker(kit: Kit, private_rabbit: Any, mqtt5: bool) -> tuple[str, Any, Any]:
    """A private broker's URL, and how to stop it and start it again on the same port."""
    if kit.kind != "mqtt":
        down = await outage(kit, private_rabbit)
        return down.url, down.stop, down.start
    port, engine = brokers.free_port(), "mosquitto" if mqtt5 else None  # MQTT 5: Mosquitto
    started = [await asyncio.to_thread(brokers.start, "mqtt", port, engine)]
    return (started[0].url, lambda: started[-1].stop(),
            lambda: started.append(brokers.start("mqtt", port, engine)))


async def _under_load(kit: Kit, private_rabbit: Any, back: _Back) -> dict[str, Any]:
    """Send RATE requests a second for END s; kill the broker at STOP, restart it at START."""
    mqtt5 = kit.kind == "mqtt" and shutil.which("mosquitto") is not None  # amqtt: 3.1.1 only
    url, stop, start = await _broker(kit, private_rabbit, mqtt5)
    version = {"protocol_version": 5} if mqtt5 else {}
    server_options = {**kit.server_options(url), **version, "close_grace": 0.2}
    app = await NestFactory.create_microservice(
        LoadModule, transport=kit.transport, options=server_options
    )
    await app.start()
    client = ClientProxyFactory.create(
        kit.transport, {**kit.client_options(url, app), **version, "timeout": TIMEOUT}
    )
    loop = asyncio.get_running_loop()
    outcomes: list[tuple[float, str, float]] = []  # (sent at, outcome, took)
    offset = {"redis": 0, "nats": 1, "mqtt": 2, "rmq": 3}[kit.kind] * 1_000_000

    async def one(i: int) -> None:
        sent = loop.time()
        data: Any = [offset + i, 1]
        data = MqttRecordBuilder(data).set_qos(1).build() if mqtt5 else data
        try:
            value = await client.send(PATTERN, data)
            outcome = "answered" if value == kit.value(offset + i + 1) else "wrong"
        except RequestTimeoutError:
            outcome = "timed out"
        except Exception:
            outcome = "failed fast"
        outcomes.append((sent, outcome, loop.time() - sent))

    try:
        assert await client.send(PATTERN, [offset, 1]) == kit.value(offset + 1)
        begin, tasks, i, killed, restarted = loop.time(), [], 1, False, False
        while (now := loop.time() - begin) < END:
            if now >= STOP and not killed:
                killed = True
                await asyncio.to_thread(stop)
            if now >= START and not restarted:
                restarted = True
                await asyncio.to_thread(start)
            tasks.append(asyncio.ensure_future(one(i)))
            i += 1
            await asyncio.sleep(max(0.0, begin + i / RATE - loop.time()))
        await asyncio.gather(*tasks)
    finally:
        await client.close()
        await app.close()
        await asyncio.to_thread(stop)
    return {"kit": kit, "outcomes": outcomes, "mqtt5": mqtt5, "back": back.at.get(kit.id)}


async def test_a_broker_restart_under_load(
    private_rabbit: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """All four at once, each on its own broker: the test takes the time of one."""
    back = _Back()
    logging.getLogger("nestpy_mini").addHandler(back)
    caplog.set_level(logging.INFO, "nestpy_mini")  # to hear "back on"
    try:
        done = await asyncio.gather(
            *(_under_load(kit, private_rabbit, back) for kit in LOAD_KITS), return_exceptions=True
        )  # each run stops its broker before the test ends, whatever the others did
    finally:
        logging.getLogger("nestpy_mini").removeHandler(back)
    for failed in done:
        if isinstance(failed, BaseException):
            raise failed
    runs: list[dict[str, Any]] = done  # type: ignore[assignment]
    print(f"\n{'broker':8} {'sent':>5} {'answered':>9} {'failed fast':>12} {'timed out':>10} "
          f"{'wrong':>6}")
    for run in runs:
        counts = Counter(outcome for _, outcome, _ in run["outcomes"])
        print(f"{run['kit'].id:8} {len(run['outcomes']):>5} {counts['answered']:>9} "
              f"{counts['failed fast']:>12} {counts['timed out']:>10} {counts['wrong']:>6}")
    assert max(handled.values()) == 1, "a request was handled twice"
    for run in runs:
        kit, outcomes, back_at = run["kit"], run["outcomes"], run["back"]
        counts = Counter(outcome for _, outcome, _ in outcomes)
        fast = [took for _, outcome, took in outcomes if outcome == "failed fast"]
        assert counts["wrong"] == 0, kit.id
        assert fast and max(fast) < TIMEOUT / 2, f"{kit.id}: the outage failed nothing at once"
        if kit.kind != "rmq" and (kit.kind != "mqtt" or run["mqtt5"]):  # the broker can tell
            assert counts["timed out"] == 0, f"{kit.id}: waited out the timeout for nothing"
        assert back_at is not None, f"{kit.id}: the server never said it was back"
        late = [(outcome, round(sent - back_at, 3)) for sent, outcome, _ in outcomes
                if sent > back_at + SETTLE and outcome != "answered"]
        assert late == [], f"{kit.id}: sent {SETTLE} s after the service was back, unanswered"
