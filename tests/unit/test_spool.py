"""The store-and-forward spool: durable, ordered, bounded; the forwarder keeps order
and retries while Kafka is away."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bridge.errors import OverloadedError
from bridge.kafka import OutRecord
from bridge.spool import Spool, SpoolingPublisher
from tests.fakes import FakePublisher

pytestmark = pytest.mark.timeout(30)


def records(n: int) -> list[OutRecord]:
    return [
        OutRecord("t.raw", f"raw-{n}".encode(), b"patient-1", [("ce_id", f"id-{n}".encode())]),
        OutRecord("t.events", f"event-{n}".encode(), None, []),
    ]


def test_spooled_records_survive_a_reopen_in_order(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db", max_bytes=1024 * 1024)
    for n in range(5):
        spool.append(records(n))
    spool.close()
    again = Spool(tmp_path / "s.db", max_bytes=1024 * 1024)
    assert again.count == 5 and again.size_bytes > 0
    oldest = again.oldest(10)
    assert [rs for _, _, rs in oldest] == [records(n) for n in range(5)]
    seq = oldest[1][0]
    again.delete_through(seq, sum(s for _, s, _ in oldest[:2]), 2)
    assert [rs for _, _, rs in again.oldest(10)] == [records(n) for n in range(2, 5)]
    assert again.count == 3


def test_a_full_spool_refuses_with_overloaded(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db", max_bytes=400)
    spool.append(records(1))
    with pytest.raises(OverloadedError):
        for n in range(10):
            spool.append(records(n))
    assert spool.size_bytes <= 400


async def test_the_forwarder_sends_in_order_and_retries_while_kafka_is_away(
    tmp_path: Path,
) -> None:
    kafka = FakePublisher()
    kafka.fail_next = 3  # Kafka away for three attempts
    spooling = SpoolingPublisher(Spool(tmp_path / "s.db", max_bytes=1024 * 1024), kafka)
    spooling.start()
    for n in range(20):
        assert await spooling.publish(records(n)) == []  # on disk: answered at once
    for _ in range(200):
        if len(kafka.records) == 40:
            break
        await asyncio.sleep(0.05)
    assert [r.value for r in kafka.on("t.raw")] == [f"raw-{n}".encode() for n in range(20)]
    await spooling.stop(drain_timeout_s=1)


async def test_the_forwarder_waits_for_missing_topics_before_sending_again(
    tmp_path: Path,
) -> None:
    kafka = FakePublisher()
    kafka.fail_next = 1  # the broker went away ...
    kafka.missing = {"t.raw"}  # ... and came back without the topic
    spooling = SpoolingPublisher(Spool(tmp_path / "s.db", max_bytes=1024 * 1024), kafka)
    spooling.start()
    for n in range(5):
        await spooling.publish(records(n))
    await asyncio.sleep(1.5)
    assert kafka.calls == 1 and kafka.records == []  # not sent to a broker without the topic
    kafka.missing = set()  # topic provisioned again
    for _ in range(100):
        if len(kafka.records) == 10:
            break
        await asyncio.sleep(0.05)
    assert [r.value for r in kafka.on("t.raw")] == [f"raw-{n}".encode() for n in range(5)]
    await spooling.stop(drain_timeout_s=1)


async def test_a_spool_left_by_a_previous_run_is_forwarded_first(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db", max_bytes=1024 * 1024)
    for n in range(3):
        spool.append(records(n))
    spool.close()
    kafka = FakePublisher()
    spooling = SpoolingPublisher(Spool(tmp_path / "s.db", max_bytes=1024 * 1024), kafka)
    spooling.start()
    await spooling.publish(records(3))
    for _ in range(100):
        if len(kafka.records) == 8:
            break
        await asyncio.sleep(0.05)
    assert [r.value for r in kafka.on("t.raw")] == [f"raw-{n}".encode() for n in range(4)]
    await spooling.stop(drain_timeout_s=1)
