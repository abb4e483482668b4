"""Reading back what the bridge published, for the integration and e2e tests."""

from __future__ import annotations

import asyncio
import time

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

#: How long one fetch waits for records before the loop checks its deadline again.
_FETCH_WAIT_MS = 200


async def read_topic(
    bootstrap: str,
    topic: str,
    *,
    min_records: int = 0,
    timeout_s: float = 10.0,
) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record of every partition of ``topic``, from the beginning, in fetch order.

    Reads up to the end offsets seen when the partitions were found. With
    ``min_records`` > 0 it keeps reading until that many arrived or ``timeout_s``
    passed, and returns what it has either way (the caller asserts). A topic that
    does not exist (yet) is looked for until ``timeout_s`` passes, then gives [].
    """
    deadline = time.monotonic() + timeout_s
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    try:
        await consumer.start()  # inside: a failed start is stopped too (no leak)
        partitions = await _wait_for_partitions(consumer, topic, deadline)
        if not partitions:
            return []
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        end_offsets: dict[TopicPartition, int] = await consumer.end_offsets(partitions)
        records: list[ConsumerRecord[bytes, bytes]] = []
        while time.monotonic() < deadline:
            positions = {tp: await consumer.position(tp) for tp in partitions}
            caught_up = all(positions[tp] >= end_offsets[tp] for tp in partitions)
            if caught_up and len(records) >= min_records:
                break
            batches = await consumer.getmany(*partitions, timeout_ms=_FETCH_WAIT_MS)
            for batch in batches.values():
                records.extend(batch)
        # Tansu (memory storage) sometimes reports an end offset one short after
        # concurrent writes; one more fetch picks up a record past it, so a
        # test that counts records also sees one too many.
        batches = await consumer.getmany(*partitions, timeout_ms=_FETCH_WAIT_MS)
        for batch in batches.values():
            records.extend(batch)
        return records
    finally:
        await consumer.stop()


async def _wait_for_partitions(
    consumer: AIOKafkaConsumer, topic: str, deadline: float
) -> list[TopicPartition]:
    while True:
        # topics() refreshes the metadata; partitions_for_topic only reads the cache.
        if topic in await consumer.topics():
            numbers = consumer.partitions_for_topic(topic) or set()
            if numbers:
                return [TopicPartition(topic, n) for n in sorted(numbers)]
        if time.monotonic() >= deadline:
            return []
        await asyncio.sleep(0.1)
