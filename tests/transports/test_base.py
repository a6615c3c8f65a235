"""``base.Batch``: what MQTT and RabbitMQ write in one loop pass leaves as one write."""

from __future__ import annotations

import asyncio
import logging

import pytest

from nestpy_mini.transports.base import Batch


async def test_one_pass_is_one_write_in_order() -> None:
    writes: list[list[int]] = []
    batch = Batch(lambda items: writes.append(items))
    for i in range(5):
        batch.add(i)
    assert writes == []  # not before the pass ends
    await asyncio.sleep(0)
    assert writes == [[0, 1, 2, 3, 4]]
    batch.add(5)
    await asyncio.sleep(0)
    assert writes == [[0, 1, 2, 3, 4], [5]]


async def test_a_write_that_waits_holds_back_what_follows_in_order() -> None:
    loop, writes = asyncio.get_running_loop(), []
    room = loop.create_future()  # a full queue, until it has room

    def write(items: list[int]) -> asyncio.Future[None] | None:
        writes.append(items)
        return room if len(writes) == 1 else None

    batch = Batch(write)
    batch.add(1)
    await asyncio.sleep(0)
    batch.add(2)
    batch.add(3)
    batch.flush()  # as an emit does: still held back
    await asyncio.sleep(0.01)
    assert writes == [[1]]
    room.set_result(None)
    await asyncio.sleep(0.01)
    assert writes == [[1], [2, 3]]


async def test_a_failed_write_is_logged_and_the_next_pass_still_goes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    writes: list[list[str]] = []

    async def write_then_fail(items: list[str]) -> None:
        writes.append(items)
        if items == ["bad"]:
            raise ConnectionError("socket gone")

    batch = Batch(write_then_fail)
    with caplog.at_level(logging.WARNING, "nestpy_mini"):
        batch.add("bad")
        await asyncio.sleep(0.01)
        batch.add("good")
        await asyncio.sleep(0.01)
    assert writes == [["bad"], ["good"]]
    assert "socket gone" in caplog.text
