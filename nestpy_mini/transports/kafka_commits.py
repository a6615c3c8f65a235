"""What a Kafka server commits: the offsets of records whose handling has ended.

The committed offset is where a partition's next owner starts reading, after a
rebalance or a crash.  aiokafka's auto-commit commits every record it has handed
over, and nestpy_mini runs the handlers of many records at once, so a record still
being handled when a commit came was committed: had the process died then, the
next owner would have started past it, and its caller would never have had an
answer.  kafkajs, under Nest, resolves a record's offset only once ``eachMessage``
has finished with it.  So the server turns aiokafka's auto-commit off and commits,
every ``auto_commit_interval``, up to the first record of each partition that a
handler still holds: at least once, as in Nest.  A crash then costs some records a
second run, never an answer.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError


class Commits:
    """The server's commits.  ``take`` each record before it is dispatched, ``hold`` the
    tasks spawned after it (its dispatch's, and at worst a later one's, which only
    delays its commit); ``commit`` runs every ``every`` seconds once ``start``ed, and
    when partitions are revoked; ``stop`` commits a last time."""

    def __init__(self, consumer: AIOKafkaConsumer, every: float, logger: logging.Logger) -> None:
        self._consumer, self._every, self._logger = consumer, every, logger
        self._next: dict[TopicPartition, int] = {}  # past the last record taken
        self._held: dict[TopicPartition, Counter[int]] = {}  # offset -> tasks still running
        self._done: dict[TopicPartition, int] = {}  # what was committed last
        self._current: tuple[TopicPartition, int] | None = None
        self._loop: asyncio.Task[None] | None = None

    def reset(self, positions: dict[TopicPartition, int]) -> None:
        """Partitions (re)assigned, with the positions committed for them: records held
        from an earlier ownership no longer count."""
        for tp, position in positions.items():
            self._next[tp] = self._done[tp] = position
            self._held[tp] = Counter()

    def take(self, record: Any) -> None:
        tp = TopicPartition(record.topic, record.partition)
        self._next[tp] = record.offset + 1
        self._current = (tp, record.offset)

    def hold(self, task: asyncio.Task[Any]) -> None:
        """Keep the record taken last uncommitted until ``task`` ends."""
        if self._current is None:
            return
        tp, offset = self._current
        held = self._held.setdefault(tp, Counter())
        held[offset] += 1
        task.add_done_callback(lambda _: self._release(held, offset))

    @staticmethod
    def _release(held: Counter[int], offset: int) -> None:
        held[offset] -= 1
        if not held[offset]:
            del held[offset]

    def committable(self) -> dict[TopicPartition, int]:
        """Per assigned partition: its first record still held, else past the last taken."""
        offsets = {}
        for tp in self._consumer.assignment():
            held = self._held.get(tp)
            offset = min(held) if held else self._next.get(tp)
            if offset is not None and offset != self._done.get(tp):
                offsets[tp] = offset
        return offsets

    async def commit(self) -> None:
        offsets = self.committable()
        if not offsets:
            return
        try:
            await self._consumer.commit(offsets)
        except KafkaError as exc:  # a rebalance under way: the next commit tries again
            self._logger.debug("commit of %s failed: %r", offsets, exc)
        else:
            self._done.update(offsets)

    def start(self) -> None:
        self._loop = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._every)
            await self.commit()

    async def stop(self) -> None:
        if self._loop is not None:
            self._loop.cancel()
            await asyncio.wait([self._loop])
            self._loop = None
        await self.commit()
