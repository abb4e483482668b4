"""Dead letters with lineage, and ``hl7bridge replay``, against the real broker.

One instance that accepts only ADT^A01 rejects an ADT^A08 (AR 200) and a message
without a trigger event (AE 101); their DLQ records carry the ACK that was sent
and the peer. A second instance that accepts every ADT then gets them replayed.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from datetime import UTC, datetime
from typing import Any

import pytest

from adapters.hl7v2.er7 import parse_message
from adapters.mllp.client import MLLPClient
from bridge.cli import main
from bridge.replay import ReplayTarget, describe_record, replay, select_records
from bridge.service import BridgeInstance
from tests.conftest import REPO_ROOT
from tests.integration.conftest import InstanceFactory
from tests.kafka_helpers import read_topic

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

ADT = (
    "MSH|^~\\&|EHR|GENHOSP|HL7BRIDGE|HUB|20240101120000||{type}|{control}|P|2.5.1\r"
    "EVN|A01|20240101120000\r"
    "PID|1||MRN123^^^GENHOSP^MR||DOE^JANE||19800101|F\r"
    "PV1|1|I|WARD1^101^A\r"
)


def _adt(control: str, message_type: str = "ADT^A01^ADT_A01") -> bytes:
    return ADT.format(control=control, type=message_type).encode()


def _msa(ack: bytes) -> tuple[str, str]:
    message = parse_message(ack)
    return message.field("MSA", 1), message.field("MSA", 2)


def _headers(record: Any) -> dict[str, bytes]:
    return dict(record.headers)


async def _send_all(instance: BridgeInstance, messages: list[bytes]) -> list[bytes]:
    async with MLLPClient("127.0.0.1", instance.mllp.port) as client:
        return [await client.send(m, timeout_s=15) for m in messages]


async def _select(bootstrap: str, topic: str, **criteria: Any) -> list[Any]:
    return [r async for r in select_records(bootstrap, topic, timeout_s=20, **criteria)]


def _controls(records: list[Any]) -> list[str]:
    return [describe_record(r).control_id for r in records]


def _rfc3339(timestamp_ms: int) -> str:
    return datetime.fromtimestamp(timestamp_ms / 1000, UTC).isoformat(timespec="milliseconds")


def _events_with_control(records: list[Any], control: str) -> list[Any]:
    return [r for r in records if _headers(r).get("ce_hl7controlid") == control.encode()]


async def test_dlq_lineage_then_replay_after_the_fix(
    start_instance: InstanceFactory, broker: Any, topic_prefix: str
) -> None:
    bootstrap = broker.bootstrap
    dlq_topic, raw_topic = f"{topic_prefix}.dlq", f"{topic_prefix}.raw.hl7v2"
    events_topic = f"{topic_prefix}.events"
    strict = await start_instance(bootstrap, accept_message_types=("ADT^A01",))

    a08 = _adt("R1", "ADT^A08^ADT_A01")  # a type this instance does not take: AR 200
    no_trigger = _adt("BAD1", "ADT")  # MSH-9 without trigger event: AE 101
    accepted = _adt("OK1")
    acks = await _send_all(strict, [a08, no_trigger, accepted])
    assert [_msa(a) for a in acks] == [("AR", "R1"), ("AE", "BAD1"), ("AA", "OK1")]

    # --- the DLQ records carry the lineage ----------------------------------------------------
    dlq = await read_topic(bootstrap, dlq_topic, min_records=2, timeout_s=15)
    assert sorted(_controls(dlq)) == ["BAD1", "R1"]
    by_control = {describe_record(r).control_id: r for r in dlq}
    for control, ack, reason, err in (
        ("R1", acks[0], b"unsupported_message_type", b"200"),
        ("BAD1", acks[1], b"required_field_missing", b"101"),
    ):
        record = by_control[control]
        headers = _headers(record)
        assert record.value == (a08 if control == "R1" else no_trigger)
        assert headers["dlq_reason"] == reason
        assert headers["dlq_err_code"] == err
        assert headers["dlq_ack"] == ack  # exactly what the sender got
        assert _msa(headers["dlq_ack"]) == _msa(ack)
        assert parse_message(headers["dlq_ack"]).header.message_code == "ACK"
        assert re.fullmatch(rb"127\.0\.0\.1:\d{1,5}", headers["dlq_peer"])
        assert headers["dlq_channel"] == b"mllp"
        assert headers["ce_hl7sender"] == b"EHR|GENHOSP"
        assert headers["ce_hl7controlid"] == control.encode()
        assert headers["ce_bridgeinstance"] == b"it-1"
        assert re.fullmatch(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", headers["dlq_time"])
    assert _msa(_headers(by_control["BAD1"])["dlq_ack"]) == ("AE", "BAD1")

    # --- selection ----------------------------------------------------------------------------
    assert _controls(await _select(bootstrap, dlq_topic)) == ["R1", "BAD1"]  # time order
    assert _controls(await _select(bootstrap, dlq_topic, control_id="R1")) == ["R1"]
    assert _controls(await _select(bootstrap, dlq_topic, sender="EHR|GENHOSP")) == ["R1", "BAD1"]
    assert await _select(bootstrap, dlq_topic, sender="EHR|ELSEWHERE") == []
    r1 = by_control["R1"]
    exact = await _select(
        bootstrap, dlq_topic, partitions=[r1.partition], from_offset=r1.offset, to_offset=r1.offset
    )
    assert [(r.partition, r.offset) for r in exact] == [(r1.partition, r1.offset)]
    same_partition = sorted(r.offset for r in dlq if r.partition == r1.partition)
    whole = await _select(bootstrap, dlq_topic, partitions=[r1.partition], from_offset=0)
    assert sorted(r.offset for r in whole) == same_partition
    # record timestamps, bounds included (R1 was written at least linger_ms before BAD1)
    assert r1.timestamp < by_control["BAD1"].timestamp
    r1_time = _rfc3339(r1.timestamp)
    bad1_time = _rfc3339(by_control["BAD1"].timestamp)
    assert _controls(await _select(bootstrap, dlq_topic, since=bad1_time)) == ["BAD1"]
    assert _controls(await _select(bootstrap, dlq_topic, until=r1_time)) == ["R1"]
    both = await _select(bootstrap, dlq_topic, since=r1_time, until=bad1_time)
    assert _controls(both) == ["R1", "BAD1"]
    raw = await _select(bootstrap, raw_topic, sender="EHR")
    assert _controls(raw) == ["OK1"]

    # --- dry run: lists, sends nothing ------------------------------------------------------
    fixed = await start_instance(bootstrap, instance_id="it-2")  # accepts every ADT
    target = ReplayTarget("127.0.0.1", fixed.mllp.port, timeout_s=15)
    dry = await replay(await _select(bootstrap, dlq_topic), target, dry_run=True)
    assert [(i.status, i.control_id, i.reason) for i in dry.items] == [
        ("would_send", "R1", "unsupported_message_type"),
        ("would_send", "BAD1", "required_field_missing"),
    ]
    assert dry.ok
    await asyncio.sleep(0.5)
    assert fixed.metrics.messages.labels("mllp", "AA", "ADT^A08")._value.get() == 0
    events = await read_topic(bootstrap, events_topic, min_records=1)
    assert _controls(events) == ["OK1"]

    # --- replay R1 to the fixed instance: accepted now, published -----------------------------
    report = await replay(
        await _select(bootstrap, dlq_topic, control_id="R1"), target, dry_run=False
    )
    assert [(i.status, i.ack_code, i.ack_control_id) for i in report.items] == [
        ("accepted", "AA", "R1")
    ]
    assert report.ok
    events = await read_topic(bootstrap, events_topic, min_records=2)
    replayed = _events_with_control(events, "R1")
    assert len(replayed) == 1
    assert _headers(replayed[0])["ce_type"] == b"org.hl7bridge.hl7v2.ADT_A08"
    assert _headers(replayed[0])["ce_bridgeinstance"] == b"it-2"

    # --- the CLI: every DLQ record; R1 is a duplicate now, BAD1 is still invalid ------------
    env = {k: v for k, v in os.environ.items() if not k.startswith("HL7BRIDGE_")}
    argv = [
        sys.executable,
        "-m",
        "bridge.cli",
        "replay",
        "--kafka",
        bootstrap,
        "--topic-prefix",
        topic_prefix,
        "--dlq",
        "--to",
        f"127.0.0.1:{fixed.mllp.port}",
        "--json",
        "--timeout-s",
        "20",
    ]
    done = await asyncio.to_thread(
        subprocess.run, argv, capture_output=True, text=True, timeout=90, env=env, cwd=REPO_ROOT
    )
    assert done.returncode == 1, done.stderr  # BAD1 is answered AE again
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(o["control_id"], o["status"], o["ack_code"]) for o in lines[:-1]] == [
        ("R1", "accepted", "AA"),
        ("BAD1", "not_accepted", "AE"),
    ]
    assert lines[1]["errors"][0]["code"] == "101"
    assert lines[-1]["summary"]["accepted"] == 1
    assert lines[-1]["summary"]["not_accepted"] == 1
    await asyncio.sleep(0.5)
    events = await read_topic(bootstrap, events_topic, min_records=2)
    # within dedupe_window_s the second R1 is answered like the first, not published again
    assert len(_events_with_control(events, "R1")) == 1
    assert fixed.metrics.duplicates.labels("mllp")._value.get() == 1
    # BAD1 went to the DLQ again, from the replaying connection
    dlq = await read_topic(bootstrap, dlq_topic, min_records=3, timeout_s=15)
    assert sorted(_controls(dlq)) == ["BAD1", "BAD1", "R1"]
    again = [r for r in dlq if _headers(r).get("ce_bridgeinstance") == b"it-2"]
    assert _controls(again) == ["BAD1"]


async def test_replay_of_an_offset_range_with_the_cli_text_output(
    start_instance: InstanceFactory, broker: Any, topic_prefix: str, capsys: Any
) -> None:
    bootstrap = broker.bootstrap
    strict = await start_instance(bootstrap, accept_message_types=("ORU",))
    controls = [f"Q{i}" for i in range(6)]
    acks = await _send_all(strict, [_adt(c) for c in controls])
    assert [_msa(a)[0] for a in acks] == ["AR"] * 6
    dlq = await read_topic(bootstrap, f"{topic_prefix}.dlq", min_records=6, timeout_s=15)
    assert sorted(_controls(dlq)) == controls
    # DLQ records have no key: they spread over the partitions; take the fullest one
    partition = max({r.partition for r in dlq}, key=lambda p: sum(r.partition == p for r in dlq))
    wanted = {r.offset: describe_record(r).control_id for r in dlq if r.partition == partition}
    last = max(wanted)

    args = [
        "replay",
        "--kafka",
        bootstrap,
        "--topic-prefix",
        topic_prefix,
        "--dlq",
        "--partition",
        str(partition),
        "--from-offset",
        str(last),
        "--to-offset",
        str(last),
        "--dry-run",
    ]
    code = await asyncio.to_thread(main, args)
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out == [
        f"would send {partition}:{last} {wanted[last]} sender=EHR|GENHOSP type=ADT^A01 "
        "reason=unsupported_message_type",
        "dry run: 1 selected, 1 would be sent, 0 FHIR skipped; nothing sent",
    ]

    fixed = await start_instance(bootstrap, instance_id="it-2")
    args[-1:] = ["--to", f"127.0.0.1:{fixed.mllp.port}"]
    code = await asyncio.to_thread(main, args)
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out == [
        f"{partition}:{last} {wanted[last]} → AA",
        "1 selected: 1 accepted, 0 not accepted, 0 FHIR skipped",
    ]
    events = await read_topic(bootstrap, f"{topic_prefix}.events", min_records=1)
    assert _controls(events) == [wanted[last]]


async def test_unknown_topic_is_bad_usage_and_no_broker_is_unavailable(
    broker: Any, topic_prefix: str, capsys: Any
) -> None:
    base = ["replay", "--dlq", "--dry-run", "--timeout-s", "10"]
    code = await asyncio.to_thread(
        main, [*base, "--kafka", broker.bootstrap, "--topic-prefix", topic_prefix]
    )
    assert code == 2
    assert f"topic '{topic_prefix}.dlq' does not exist" in capsys.readouterr().err

    code = await asyncio.to_thread(main, [*base, "--kafka", "127.0.0.1:1"])
    assert code == 3
    assert "Kafka at 127.0.0.1:1" in capsys.readouterr().err
