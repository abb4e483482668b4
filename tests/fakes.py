"""In-memory stand-ins for the unit tests (no servers): never used where a test
claims to talk to Kafka or ZooKeeper."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence

from bridge.errors import PublishError
from bridge.kafka import Delivered, OutRecord


class FakePublisher:
    """A Publisher that keeps what it acknowledged.

    ``down_topics``: a batch touching one of them raises PublishError (Kafka down).
    ``fail_next``: that many calls raise PublishError, whatever the topic.
    ``gate``: when set, each call waits for it before answering (a slow broker);
    ``entered`` is set as soon as a call arrives.
    ``missing``: topics the broker does not know (:meth:`missing_topics`).
    """

    def __init__(self) -> None:
        self.batches: list[list[OutRecord]] = []
        self.calls = 0
        self.down_topics: set[str] = set()
        self.fail_next = 0
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()
        self.missing: set[str] = set()

    @property
    def records(self) -> list[OutRecord]:
        return [record for batch in self.batches for record in batch]

    def on(self, topic: str) -> list[OutRecord]:
        return [record for record in self.records if record.topic == topic]

    async def missing_topics(self, topics: Iterable[str]) -> set[str]:
        return set(topics) & self.missing

    async def publish(self, records: Sequence[OutRecord]) -> list[Delivered]:
        self.calls += 1
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_next:
            self.fail_next -= 1
            raise PublishError("broker down (test)")
        if self.down_topics & {record.topic for record in records}:
            raise PublishError("broker down (test)")
        self.batches.append(list(records))
        return [Delivered(record.topic, 0, i) for i, record in enumerate(records)]
