"""The HL7 v2 ACK contract of the pipeline, with an in-memory publisher and no servers."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import orjson
import pytest

from adapters.hl7v2.er7 import Hl7Message, parse_message
from adapters.mllp.server import RejectReason
from bridge.config import DEFAULT_ACCEPTED_MESSAGE_TYPES
from bridge.dedupe import DuplicateFilter, content_fingerprint
from bridge.envelope import hl7v2_event_id
from bridge.kafka import OutRecord, Topics
from bridge.metrics import BridgeMetrics
from bridge.normalize import patient_resource_id
from bridge.pipeline import Hl7v2Pipeline, PipelineSettings
from tests.fakes import FakePublisher

pytestmark = pytest.mark.timeout(30)

DLQ_SCHEMA = json.loads(
    (Path(__file__).resolve().parents[2] / "schemas" / "dlq-headers.schema.json").read_text()
)

RAW_TOPIC = "t.raw.hl7v2"
EVENTS_TOPIC = "t.events"
DLQ_TOPIC = "t.dlq"
PEER = "peer"
# Patient data in the sample message; none of it may reach a log line.
MRN = "MRN7781234"
FAMILY = "ZZFAMILYNAME"
GIVEN = "ZZGIVENNAME"
PID = f"PID|1||{MRN}^^^HOSP^MR||{FAMILY}^{GIVEN}||19800101|F"
PATIENT_KEY = f"HOSP|{MRN}"


def message(
    *,
    control_id: str = "CTRL0001",
    message_type: str = "ADT^A01^ADT_A01",
    version: str = "2.5.1",
    timestamp: str = "20240101120000+0100",
    accept_ack: str = "",
    pid: str | None = PID,
    evn: str = "EVN|A01|20240101120000",
    sender: str = "SENDAPP|SENDFAC",
) -> bytes:
    msh = f"MSH|^~\\&|{sender}|RECVAPP|RECVFAC|{timestamp}||{message_type}|{control_id}|P|{version}"
    if accept_ack:
        msh += f"|||{accept_ack}|NE"
    segments = [msh, evn]
    if pid is not None:
        segments.append(pid)
    segments.append("PV1|1|I")
    return ("\r".join(segments) + "\r").encode()


def make_pipeline(
    publisher: FakePublisher,
    metrics: BridgeMetrics,
    accept: tuple[str, ...] = DEFAULT_ACCEPTED_MESSAGE_TYPES,
) -> Hl7v2Pipeline:
    settings = PipelineSettings(topics=Topics("t"), instance_id="u1", accept_message_types=accept)
    return Hl7v2Pipeline(
        settings, publisher, DuplicateFilter(window_s=60, max_entries=100), metrics
    )


@pytest.fixture
def pipeline(publisher: FakePublisher, metrics: BridgeMetrics) -> Hl7v2Pipeline:
    return make_pipeline(publisher, metrics)


def sample(metrics: BridgeMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, {"channel": "mllp", **labels})
    return 0.0 if value is None else value


def messages_count(metrics: BridgeMetrics, ack_code: str, message_type: str) -> float:
    return sample(metrics, "hl7bridge_messages_total", ack_code=ack_code, message_type=message_type)


async def handle(pipeline: Hl7v2Pipeline, payload: bytes) -> Hl7Message:
    return parse_message(await pipeline.handle_frame(payload, PEER))


def msa(ack: Hl7Message) -> tuple[str, str]:
    return ack.field("MSA", 1), ack.field("MSA", 2)


def errs(ack: Hl7Message) -> list[tuple[str, str]]:
    """(ERR-3.1 code, ERR-2 location as sent) of each ERR segment."""
    return [(seg[3].split("^")[0], seg[2]) for seg in ack.all_segments("ERR")]


def headers_of(record: OutRecord) -> dict[str, bytes]:
    names = [name for name, _ in record.headers]
    assert len(names) == len(set(names)), f"repeated header in {names}"
    return dict(record.headers)


# --- accepted ---------------------------------------------------------------------------


async def test_accepted_message_is_published_raw_then_event_and_answered_aa(
    pipeline: Hl7v2Pipeline, publisher: FakePublisher, metrics: BridgeMetrics
) -> None:
    payload = message()
    ack = await handle(pipeline, payload)

    assert msa(ack) == ("AA", "CTRL0001")
    assert ack.all_segments("ERR") == []
    assert publisher.calls == 1
    assert [r.topic for r in publisher.records] == [RAW_TOPIC, EVENTS_TOPIC]
    raw, event = publisher.records
    assert raw.value == payload
    assert raw.key == event.key == PATIENT_KEY.encode()
    bundle = orjson.loads(event.value)
    assert bundle["resourceType"] == "Bundle"
    assert bundle["type"] == "message"
    assert bundle["identifier"]["value"] == "CTRL0001"
    patient = bundle["entry"][1]["resource"]
    assert patient["resourceType"] == "Patient"
    assert patient["identifier"][0]["value"] == MRN
    assert messages_count(metrics, "AA", "ADT^A01") == 1
    assert publisher.on(DLQ_TOPIC) == []


async def test_raw_and_event_share_ce_id_and_carry_their_headers(
    pipeline: Hl7v2Pipeline, publisher: FakePublisher
) -> None:
    payload = message() + b"ZPI|1|local\r"  # a Z-segment: listed as unmapped, no error
    await handle(pipeline, payload)
    raw, event = (headers_of(r) for r in publisher.records)

    text = parse_message(payload).text
    expected_id = hl7v2_event_id("SENDAPP|SENDFAC", "CTRL0001", content_fingerprint(text))
    assert raw["ce_id"] == event["ce_id"] == expected_id.encode()
    assert raw["content-type"] == b"x-application/hl7-v2+er7; charset=utf-8"
    assert event["content-type"] == b"application/fhir+json"
    assert raw["ce_type"] == b"org.hl7bridge.hl7v2.raw"
    assert event["ce_type"] == b"org.hl7bridge.hl7v2.ADT_A01"
    subject = f"Patient/{patient_resource_id(PATIENT_KEY)}".encode()
    for headers in (raw, event):
        assert headers["ce_specversion"] == b"1.0"
        assert headers["ce_source"] == b"urn:hl7v2:SENDAPP:SENDFAC"
        assert headers["ce_subject"] == subject
        assert headers["ce_hl7controlid"] == b"CTRL0001"
        assert headers["ce_hl7messagetype"] == b"ADT^A01"
        assert headers["ce_hl7version"] == b"2.5.1"
        assert headers["ce_bridgeinstance"] == b"u1"
    assert event["ce_hl7unmapped"] == b"ZPI"
    assert "ce_hl7unmapped" not in raw


async def test_enhanced_mode_accept_is_answered_ca(pipeline: Hl7v2Pipeline) -> None:
    ack = await handle(pipeline, message(accept_ack="AL"))
    assert msa(ack) == ("CA", "CTRL0001")


async def test_enhanced_mode_rejection_is_answered_cr(pipeline: Hl7v2Pipeline) -> None:
    ack = await handle(pipeline, message(message_type="QRY^A19", accept_ack="AL"))
    assert msa(ack) == ("CR", "CTRL0001")
    assert errs(ack) == [("200", "MSH^1^9")]


async def test_message_without_pid_is_keyed_by_sender(
    pipeline: Hl7v2Pipeline, publisher: FakePublisher
) -> None:
    ack = await handle(pipeline, message(pid=None))
    assert msa(ack) == ("AA", "CTRL0001")
    assert [r.key for r in publisher.records] == [b"sender|SENDAPP|SENDFAC"] * 2
    for record in publisher.records:
        assert "ce_subject" not in headers_of(record)


# --- rejected: content and channel ------------------------------------------------------

MISSING_CONTROL_ID = message(control_id="")
MISSING_TYPE = message(message_type="")
NOT_ACCEPTED = message(message_type="QRY^A19")
BAD_VERSION = message(version="9.9")
NOT_HL7 = b"this is not an HL7 message at all\r"

REJECTIONS = [
    # payload, MSA-1, MSA-2, ERR code, ERR-2, dlq_reason, dlq_location
    (MISSING_CONTROL_ID, "AE", "", "101", "MSH^1^10", "required_field_missing", "MSH-10"),
    (MISSING_TYPE, "AE", "CTRL0001", "101", "MSH^1^9", "required_field_missing", "MSH-9"),
    (NOT_ACCEPTED, "AR", "CTRL0001", "200", "MSH^1^9", "unsupported_message_type", "MSH-9"),
    (BAD_VERSION, "AR", "CTRL0001", "203", "MSH^1^12", "unsupported_version", "MSH-12"),
    (NOT_HL7, "AE", "", "100", "MSH^1", "not_hl7_error", "MSH"),
]
REJECTION_IDS = ["no-msh10", "no-msh9", "not-accepted", "version-9.9", "not-hl7"]


@pytest.mark.parametrize(
    ("payload", "ack_code", "control_id", "err_code", "err_location", "reason", "location"),
    REJECTIONS,
    ids=REJECTION_IDS,
)
async def test_rejection_answers_with_err_and_writes_one_dlq_record(
    pipeline: Hl7v2Pipeline,
    publisher: FakePublisher,
    metrics: BridgeMetrics,
    payload: bytes,
    ack_code: str,
    control_id: str,
    err_code: str,
    err_location: str,
    reason: str,
    location: str,
) -> None:
    answer = await pipeline.handle_frame(payload, "127.0.0.1:53412")
    ack = parse_message(answer)

    assert msa(ack) == (ack_code, control_id)
    assert errs(ack) == [(err_code, err_location)]
    assert [r.topic for r in publisher.records] == [DLQ_TOPIC]
    record = publisher.records[0]
    assert record.value == payload
    assert record.key is None
    headers = headers_of(record)
    assert headers["dlq_reason"] == reason.encode()
    assert headers["dlq_err_code"] == err_code.encode()
    assert headers["dlq_ack_code"] == ack_code.encode()
    assert headers["dlq_location"] == location.encode()
    assert headers["dlq_channel"] == b"mllp"
    assert headers["dlq_peer"] == b"127.0.0.1:53412"
    assert headers["dlq_ack"] == answer  # the very bytes the sender got back
    assert headers["ce_bridgeinstance"] == b"u1"
    assert set(headers) <= set(DLQ_SCHEMA["properties"])
    assert set(DLQ_SCHEMA["required"]) <= set(headers)
    if control_id:
        assert headers["ce_hl7controlid"] == control_id.encode()
    else:
        assert "ce_hl7controlid" not in headers
    if payload is NOT_HL7:
        assert "ce_hl7sender" not in headers
    else:
        assert headers["ce_hl7sender"] == b"SENDAPP|SENDFAC"
    assert sample(metrics, "hl7bridge_rejections_total", reason=reason, err_code=err_code) == 1
    assert messages_count(metrics, ack_code, "other") == 1
    assert messages_count(metrics, "AA", "ADT^A01") == 0


async def test_dlq_record_names_the_directory_channel_as_peer_and_the_epoch(
    pipeline: Hl7v2Pipeline, publisher: FakePublisher
) -> None:
    label = "directory:lab"
    answer = await pipeline.handle_frame(NOT_ACCEPTED, label, channel=label, epoch=7)

    assert msa(parse_message(answer)) == ("AR", "CTRL0001")
    headers = headers_of(publisher.on(DLQ_TOPIC)[0])
    assert headers["dlq_channel"] == b"directory:lab"
    assert headers["dlq_peer"] == b"directory:lab"
    assert headers["ce_leaderepoch"] == b"7"
    assert headers["dlq_ack"] == answer
    assert set(headers) <= set(DLQ_SCHEMA["properties"])


async def test_dlq_ack_is_the_enhanced_mode_answer_as_sent(
    pipeline: Hl7v2Pipeline, publisher: FakePublisher
) -> None:
    answer = await pipeline.handle_frame(message(message_type="QRY^A19", accept_ack="AL"), PEER)

    headers = headers_of(publisher.on(DLQ_TOPIC)[0])
    assert headers["dlq_ack_code"] == b"AR"  # the contract's code
    assert headers["dlq_ack"] == answer
    assert msa(parse_message(headers["dlq_ack"])) == ("CR", "CTRL0001")  # what was sent


async def test_mapping_rejection_records_the_ack_and_peer_too(
    pipeline: Hl7v2Pipeline, publisher: FakePublisher
) -> None:
    payload = message(pid=f"PID|1||{MRN}^^^HOSP^MR||{FAMILY}^{GIVEN}||20231345|F")
    answer = await pipeline.handle_frame(payload, "[::1]:40000")

    headers = headers_of(publisher.on(DLQ_TOPIC)[0])
    assert headers["dlq_reason"] == b"data_type_error"
    assert headers["dlq_peer"] == b"[::1]:40000"
    assert headers["dlq_ack"] == answer
    assert errs(parse_message(headers["dlq_ack"])) == [("102", "PID^1^7")]
    assert headers["ce_hl7sender"] == b"SENDAPP|SENDFAC"
    assert headers["ce_hl7messagetype"] == b"ADT^A01"


async def test_accept_everything_takes_any_type(
    publisher: FakePublisher, metrics: BridgeMetrics
) -> None:
    pipeline = make_pipeline(publisher, metrics, accept=("*",))
    ack = await handle(pipeline, NOT_ACCEPTED)
    assert msa(ack) == ("AA", "CTRL0001")
    assert [r.topic for r in publisher.records] == [RAW_TOPIC, EVENTS_TOPIC]


async def test_exact_type_entry_accepts_only_that_trigger(
    publisher: FakePublisher, metrics: BridgeMetrics
) -> None:
    pipeline = make_pipeline(publisher, metrics, accept=("ADT^A01",))
    a01 = await handle(pipeline, message(control_id="C-A01", message_type="ADT^A01^ADT_A01"))
    a02 = await handle(pipeline, message(control_id="C-A02", message_type="ADT^A02^ADT_A02"))
    assert msa(a01) == ("AA", "C-A01")
    assert msa(a02) == ("AR", "C-A02")
    assert errs(a02) == [("200", "MSH^1^9")]
    assert [r.topic for r in publisher.records] == [RAW_TOPIC, EVENTS_TOPIC, DLQ_TOPIC]


async def test_mapping_error_is_answered_ae_and_sent_to_the_dlq(
    pipeline: Hl7v2Pipeline, publisher: FakePublisher
) -> None:
    payload = message(pid=f"PID|1||{MRN}^^^HOSP^MR||{FAMILY}^{GIVEN}||20231345|F")
    ack = await handle(pipeline, payload)
    assert msa(ack) == ("AE", "CTRL0001")
    assert errs(ack) == [("102", "PID^1^7")]
    assert [r.topic for r in publisher.records] == [DLQ_TOPIC]
    assert headers_of(publisher.records[0])["dlq_reason"] == b"data_type_error"


# --- Kafka unavailable ------------------------------------------------------------------


async def test_publisher_down_answers_ar_207_without_a_dlq_record(
    pipeline: Hl7v2Pipeline, publisher: FakePublisher, metrics: BridgeMetrics
) -> None:
    publisher.down_topics = {RAW_TOPIC, EVENTS_TOPIC, DLQ_TOPIC}
    ack = await handle(pipeline, message())

    assert msa(ack) == ("AR", "CTRL0001")
    assert errs(ack) == [("207", "")]
    assert publisher.calls == 1  # the records only: a Kafka failure is no DLQ case
    assert publisher.records == []
    assert messages_count(metrics, "AA", "ADT^A01") == 0
    assert messages_count(metrics, "AR", "other") == 1
    assert (
        sample(metrics, "hl7bridge_rejections_total", reason="publish_error", err_code="207") == 1
    )
    assert sample(metrics, "hl7bridge_dlq_failures_total") == 0


@pytest.mark.parametrize("payload", [MISSING_CONTROL_ID, BAD_VERSION], ids=["ae", "ar"])
async def test_dlq_write_failing_answers_ar_207(
    pipeline: Hl7v2Pipeline, publisher: FakePublisher, metrics: BridgeMetrics, payload: bytes
) -> None:
    publisher.down_topics = {DLQ_TOPIC}
    ack = await handle(pipeline, payload)

    assert ack.field("MSA", 1) == "AR"
    assert errs(ack) == [("207", "")]
    assert publisher.calls == 1
    assert publisher.records == []
    assert sample(metrics, "hl7bridge_dlq_failures_total") == 1
    assert messages_count(metrics, "AR", "other") == 1
    assert messages_count(metrics, "AE", "other") == 0


async def test_failed_attempt_is_not_remembered_so_a_retry_publishes(
    pipeline: Hl7v2Pipeline, publisher: FakePublisher, metrics: BridgeMetrics
) -> None:
    publisher.fail_next = 1
    first = await handle(pipeline, message())
    retry = await handle(pipeline, message())

    assert msa(first) == ("AR", "CTRL0001")
    assert msa(retry) == ("AA", "CTRL0001")
    assert publisher.calls == 2
    assert [r.topic for r in publisher.records] == [RAW_TOPIC, EVENTS_TOPIC]
    assert sample(metrics, "hl7bridge_duplicates_total") == 0


# --- duplicates -------------------------------------------------------------------------


async def test_resent_message_is_answered_aa_and_not_published_again(
    pipeline: Hl7v2Pipeline, publisher: FakePublisher, metrics: BridgeMetrics
) -> None:
    first_bytes = await pipeline.handle_frame(message(), PEER)
    again_bytes = await pipeline.handle_frame(message(), PEER)
    first, again = parse_message(first_bytes), parse_message(again_bytes)

    assert msa(again) == ("AA", "CTRL0001")
    assert again.header.control_id != first.header.control_id  # each ACK its own MSH-10
    assert publisher.calls == 1
    assert len(publisher.records) == 2
    assert sample(metrics, "hl7bridge_duplicates_total") == 1
    assert messages_count(metrics, "AA", "ADT^A01") == 2


async def test_resend_with_a_fresh_msh7_is_still_a_duplicate(
    pipeline: Hl7v2Pipeline, publisher: FakePublisher, metrics: BridgeMetrics
) -> None:
    await handle(pipeline, message(timestamp="20240101120000+0100"))
    ack = await handle(pipeline, message(timestamp="20240101120513+0100"))
    assert msa(ack) == ("AA", "CTRL0001")
    assert len(publisher.records) == 2
    assert sample(metrics, "hl7bridge_duplicates_total") == 1


async def test_duplicate_in_enhanced_mode_is_answered_ca(
    pipeline: Hl7v2Pipeline, publisher: FakePublisher
) -> None:
    first = await handle(pipeline, message(accept_ack="AL"))
    again = await handle(pipeline, message(accept_ack="AL"))
    assert msa(first) == msa(again) == ("CA", "CTRL0001")
    assert len(publisher.records) == 2


async def test_reused_control_id_with_other_content_is_published(
    pipeline: Hl7v2Pipeline, publisher: FakePublisher, metrics: BridgeMetrics
) -> None:
    await handle(pipeline, message())
    ack = await handle(pipeline, message(evn="EVN|A01|20240102090000"))

    assert msa(ack) == ("AA", "CTRL0001")
    assert [r.topic for r in publisher.records] == [RAW_TOPIC, EVENTS_TOPIC] * 2
    assert sample(metrics, "hl7bridge_control_id_reuse_total") == 1
    assert sample(metrics, "hl7bridge_duplicates_total") == 0
    first_id = headers_of(publisher.records[0])["ce_id"]
    second_id = headers_of(publisher.records[2])["ce_id"]
    assert first_id != second_id


async def test_resend_while_in_flight_waits_for_the_first_attempt(
    pipeline: Hl7v2Pipeline, publisher: FakePublisher, metrics: BridgeMetrics
) -> None:
    publisher.gate = asyncio.Event()
    first = asyncio.create_task(pipeline.handle_frame(message(), PEER))
    await asyncio.wait_for(publisher.entered.wait(), timeout=5)
    second = asyncio.create_task(pipeline.handle_frame(message(), PEER))
    for _ in range(10):
        await asyncio.sleep(0)
    assert not second.done()
    assert publisher.calls == 1

    publisher.gate.set()
    acks = await asyncio.wait_for(asyncio.gather(first, second), timeout=5)

    assert [msa(parse_message(a)) for a in acks] == [("AA", "CTRL0001")] * 2
    assert publisher.calls == 1
    assert len(publisher.records) == 2
    assert sample(metrics, "hl7bridge_duplicates_total") == 1


async def test_resend_of_an_in_flight_attempt_that_fails_publishes_itself(
    pipeline: Hl7v2Pipeline, publisher: FakePublisher
) -> None:
    publisher.gate = asyncio.Event()
    publisher.fail_next = 1
    first = asyncio.create_task(pipeline.handle_frame(message(), PEER))
    await asyncio.wait_for(publisher.entered.wait(), timeout=5)
    second = asyncio.create_task(pipeline.handle_frame(message(), PEER))
    for _ in range(10):
        await asyncio.sleep(0)
    publisher.gate.set()
    first_ack, second_ack = await asyncio.wait_for(asyncio.gather(first, second), timeout=5)

    assert msa(parse_message(first_ack)) == ("AR", "CTRL0001")
    assert msa(parse_message(second_ack)) == ("AA", "CTRL0001")
    assert publisher.calls == 2
    assert [r.topic for r in publisher.records] == [RAW_TOPIC, EVENTS_TOPIC]


async def test_two_resends_of_a_failed_in_flight_attempt_publish_once(
    pipeline: Hl7v2Pipeline, publisher: FakePublisher
) -> None:
    publisher.gate = asyncio.Event()
    publisher.fail_next = 1
    tasks = [asyncio.create_task(pipeline.handle_frame(message(), PEER))]
    await asyncio.wait_for(publisher.entered.wait(), timeout=5)
    tasks += [asyncio.create_task(pipeline.handle_frame(message(), PEER)) for _ in range(2)]
    for _ in range(10):
        await asyncio.sleep(0)
    publisher.gate.set()
    acks = await asyncio.wait_for(asyncio.gather(*tasks), timeout=5)

    assert [msa(parse_message(a))[0] for a in acks] == ["AR", "AA", "AA"]
    assert [r.topic for r in publisher.records] == [RAW_TOPIC, EVENTS_TOPIC]


async def test_resend_is_answered_when_the_control_id_is_reused_meanwhile(
    pipeline: Hl7v2Pipeline, publisher: FakePublisher
) -> None:
    publisher.gate = asyncio.Event()
    original = asyncio.create_task(pipeline.handle_frame(message(), PEER))
    await asyncio.wait_for(publisher.entered.wait(), timeout=5)
    resend = asyncio.create_task(pipeline.handle_frame(message(), PEER))
    for _ in range(10):
        await asyncio.sleep(0)
    other = asyncio.create_task(pipeline.handle_frame(message(evn="EVN|A01|20240102090000"), PEER))
    for _ in range(10):
        await asyncio.sleep(0)
    publisher.gate.set()

    tasks = [original, resend, other]
    _, pending = await asyncio.wait(tasks, timeout=2)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)

    assert pending == set()
    assert [msa(parse_message(t.result()))[0] for t in tasks] == ["AA", "AA", "AA"]
    assert len(publisher.records) == 4


# --- answered without processing --------------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "ack_code", "metric_reason"),
    [
        (RejectReason.TOO_LARGE, "AE", "message_too_large"),
        (RejectReason.TOO_MANY_CONNECTIONS, "AR", "overloaded_error"),
        (RejectReason.SHUTTING_DOWN, "AR", "unavailable_error"),
        (RejectReason.HANDLER_FAILED, "AR", "unavailable_error"),
    ],
)
def test_reject_frame_answers_207_echoing_msh10_from_the_head(
    pipeline: Hl7v2Pipeline,
    publisher: FakePublisher,
    metrics: BridgeMetrics,
    reason: RejectReason,
    ack_code: str,
    metric_reason: str,
) -> None:
    head = message(control_id="BIG0042")[:120]  # the first segment, cut short
    assert b"\r" not in head[: head.index(b"BIG0042")]
    ack = parse_message(pipeline.reject_frame(head, reason))

    assert msa(ack) == (ack_code, "BIG0042")
    assert errs(ack) == [("207", "")]
    assert ack.header.receiving_application == "SENDAPP"
    assert publisher.calls == 0
    assert sample(metrics, "hl7bridge_rejections_total", reason=metric_reason, err_code="207") == 1


def test_reject_frame_of_unreadable_head_leaves_msa2_empty(pipeline: Hl7v2Pipeline) -> None:
    ack = parse_message(pipeline.reject_frame(b"\x00\x01garbage", RejectReason.TOO_LARGE))
    assert msa(ack) == ("AE", "")
    assert errs(ack) == [("207", "")]


# --- robustness -------------------------------------------------------------------------


async def test_unexpected_normalizer_failure_goes_to_the_dlq_and_processing_continues(
    pipeline: Hl7v2Pipeline,
    publisher: FakePublisher,
    metrics: BridgeMetrics,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(*args: object, **kwargs: object) -> dict[str, object]:
        raise RuntimeError("mapping defect")

    monkeypatch.setattr("bridge.events.normalize", broken)
    with caplog.at_level(logging.ERROR, logger="bridge.pipeline"):
        failed = await handle(pipeline, message(control_id="C-BROKEN"))

    assert msa(failed) == ("AE", "C-BROKEN")
    assert errs(failed) == [("207", "")]
    assert [r.topic for r in publisher.records] == [DLQ_TOPIC]
    assert headers_of(publisher.records[0])["dlq_reason"] == b"message_error"
    assert any("normalization failed" in r.getMessage() for r in caplog.records)

    monkeypatch.undo()
    ok = await handle(pipeline, message(control_id="C-NEXT"))
    resent = await handle(pipeline, message(control_id="C-BROKEN"))
    assert msa(ok) == ("AA", "C-NEXT")
    assert msa(resent) == ("AA", "C-BROKEN")  # the failed one was not remembered
    assert [r.topic for r in publisher.records] == [DLQ_TOPIC] + [RAW_TOPIC, EVENTS_TOPIC] * 2
    assert sample(metrics, "hl7bridge_duplicates_total") == 0


async def test_no_patient_data_in_logs(
    pipeline: Hl7v2Pipeline, publisher: FakePublisher, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    rejected = await handle(pipeline, message(message_type="QRY^A19", control_id="C-1"))
    accepted = await handle(pipeline, message(control_id="C-2"))
    # A reused control id is logged: the log line must name no patient either.
    reused = await handle(pipeline, message(control_id="C-2", evn="EVN|A01|20240102090000"))

    assert [msa(a)[0] for a in (rejected, accepted, reused)] == ["AR", "AA", "AA"]
    assert caplog.records, "expected the control id reuse warning to be captured"
    for secret in (MRN, FAMILY, GIVEN, PATIENT_KEY, patient_resource_id(PATIENT_KEY)):
        assert secret not in caplog.text


async def test_ce_source_uses_the_first_component_with_any_delimiters(
    pipeline: Hl7v2Pipeline, publisher: FakePublisher
) -> None:
    payload = (
        "MSH|$~\\&|SENDAPP$1.2.3$ISO|SENDFAC$9.8$ISO|RECVAPP|RECVFAC|20240101120000"
        "||ADT$A01$ADT_A01|CTRL0001|P|2.5.1\r" + PID.replace("^", "$") + "\r"
    ).encode()
    ack = await handle(pipeline, payload)
    assert msa(ack) == ("AA", "CTRL0001")
    assert headers_of(publisher.records[0])["ce_source"] == b"urn:hl7v2:SENDAPP:SENDFAC"
