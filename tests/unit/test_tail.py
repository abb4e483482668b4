"""``hl7bridge tail``: which records a trace shows, and what a line says (pure code)."""

from __future__ import annotations

from dataclasses import dataclass, field

import orjson
import pytest

from bridge.errors import ConfigError
from bridge.kafka import Topics
from bridge.tail import Start, Trace, json_line, start_of, text_line, topic_name

pytestmark = pytest.mark.timeout(30)

T0 = 1_714_564_800_000  # 2024-05-01T12:00:00Z
ADT = (
    b"MSH|^~\\&|EHR|GENHOSP|HUB|HUB|20240101120000||ADT^A08^ADT_A01|MSG9|P|2.5.1\r"
    b"PID|1||MRN123^^^GENHOSP^MR||DOE^JANE\r"
)


@dataclass
class Record:
    topic: str = "health.events"
    partition: int = 0
    offset: int = 0
    timestamp: int = T0
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    value: bytes | None = b"{}"
    key: bytes | None = b"GENHOSP|MRN123"


def event(control: str, ce_id: str, **extra: str) -> Record:
    headers = [
        ("ce_type", b"org.hl7bridge.hl7v2.ADT_A01"),
        ("ce_id", ce_id.encode()),
        ("ce_hl7controlid", control.encode()),
        ("ce_hl7sender", b"EHR|GENHOSP"),
        ("ce_hl7messagetype", b"ADT^A01"),
    ]
    headers += [(k, v.encode()) for k, v in extra.items()]
    return Record(headers=headers)


def case_record(event_id: str) -> Record:
    return Record(
        topic="health.diagnosis",
        headers=[
            ("ce_type", b"org.hl7bridge.diagnosis.case.opened"),
            ("ce_id", b"life-1"),
            ("ce_caseid", b"case-1"),
            ("ce_rule", b"critical-results"),
            ("ce_eventid", event_id.encode()),
            ("content-type", b"application/json"),
        ],
    )


def test_a_control_id_selects_its_records_and_the_case_of_its_event() -> None:
    trace = Trace.build(control_id="MSG1")
    assert trace.matches(event("MSG1", "e-1"))
    assert not trace.matches(event("MSG2", "e-2"))
    assert trace.matches(case_record("e-1"))  # linked through the event shown
    assert not trace.matches(case_record("e-2"))


def test_an_event_id_selects_the_event_and_its_cases() -> None:
    trace = Trace.build(event_id="e-2")
    assert not trace.matches(event("MSG1", "e-1"))
    assert trace.matches(event("MSG2", "e-2"))
    assert trace.matches(case_record("e-2"))


def test_sender_and_control_id_must_both_hold() -> None:
    trace = Trace.build(control_id="MSG1", sender="EHR|OTHER")
    assert not trace.matches(event("MSG1", "e-1"))
    assert Trace.build(control_id="MSG1", sender="EHR").matches(event("MSG1", "e-1"))


def test_an_event_without_a_sender_header_is_matched_by_its_source() -> None:
    record = Record(
        headers=[
            ("ce_id", b"e-9"),
            ("ce_source", b"urn:hl7v2:LAB%20A:HOSP"),
            ("ce_hl7controlid", b"MSG9"),
        ]
    )
    assert Trace.build(sender="LAB A|HOSP").matches(record)
    assert Trace.build(sender="LAB A").matches(record)
    assert not Trace.build(sender="LAB|HOSP").matches(record)
    assert "from=LAB A|HOSP" in text_line(record, "health")


def test_time_bounds_are_included_and_apply_to_linked_records_too() -> None:
    trace = Trace.build(since="2024-05-01T12:00:00Z", until="2024-05-01T12:00:01Z")
    assert trace.matches(Record(timestamp=T0)) and trace.matches(Record(timestamp=T0 + 1000))
    assert not trace.matches(Record(timestamp=T0 - 1))
    assert not trace.matches(Record(timestamp=T0 + 1001))
    linked = Trace.build(control_id="MSG1", until="2024-05-01T12:00:00Z")
    assert linked.matches(event("MSG1", "e-1"))
    late = case_record("e-1")
    late.timestamp = T0 + 1
    assert not linked.matches(late)


def test_no_criteria_shows_everything() -> None:
    trace = Trace.build()
    assert trace.matches(Record(headers=[])) and trace.matches(case_record("x"))


@pytest.mark.parametrize(
    ("criteria", "key"),
    [
        ({"since": "yesterday"}, "since"),
        ({"since": "2024-05-02T00:00:00Z", "until": "2024-05-01T00:00:00Z"}, "since"),
        ({"control_id": ""}, "control_id"),
        ({"event_id": ""}, "event_id"),
        ({"sender": "|"}, "sender"),
    ],
)
def test_bad_criteria_name_the_option(criteria: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Trace.build(**criteria)
    assert caught.value.key == key


def test_a_text_line_has_coordinates_type_and_ids_never_key_or_value() -> None:
    record = event("MSG1", "e-1", ce_subject="Patient/p-1")
    record.partition, record.offset = 2, 1234
    line = text_line(record, "health")
    assert line == (
        "2024-05-01T12:00:00.000Z events 2@1234 hl7v2.ADT_A01 ctl=MSG1 from=EHR|GENHOSP "
        "type=ADT^A01 id=e-1 subject=Patient/p-1"
    )
    assert "MRN123" not in line
    with_data = text_line(record, "health", data=True)
    assert with_data.startswith(line) and "key: GENHOSP|MRN123" in with_data


def test_a_dlq_record_without_headers_shows_its_msh_and_reason() -> None:
    record = Record(
        topic="health.dlq",
        headers=[
            ("dlq_reason", b"unsupported_message_type"),
            ("dlq_err_code", b"200"),
            ("dlq_ack_code", b"AR"),
            ("dlq_channel", b"mllp"),
        ],
        value=ADT,
        key=None,
    )
    line = text_line(record, "health")
    assert line == (
        "2024-05-01T12:00:00.000Z dlq 0@0 - ctl=MSG9 from=EHR|GENHOSP type=ADT^A08 "
        "reason=unsupported_message_type err=200 ack=AR channel=mllp"
    )
    assert "DOE" not in line and "MRN123" not in line
    assert Trace.build(control_id="MSG9").matches(record)


def test_a_json_line_carries_every_header_and_the_value_only_with_data() -> None:
    record = event("MSG1", "e-1")
    record.value = b'{"resourceType": "Bundle"}'
    plain = orjson.loads(json_line(record))
    assert plain == {
        "topic": "health.events",
        "partition": 0,
        "offset": 0,
        "timestamp": "2024-05-01T12:00:00.000Z",
        "headers": {
            "ce_type": "org.hl7bridge.hl7v2.ADT_A01",
            "ce_id": "e-1",
            "ce_hl7controlid": "MSG1",
            "ce_hl7sender": "EHR|GENHOSP",
            "ce_hl7messagetype": "ADT^A01",
        },
    }
    full = orjson.loads(json_line(record, data=True))
    assert full["value"] == {"resourceType": "Bundle"} and full["key"] == "GENHOSP|MRN123"
    raw = Record(topic="health.raw.hl7v2", value=ADT, headers=[])
    assert orjson.loads(json_line(raw, data=True))["value"].startswith("MSH|")


def test_where_reading_starts() -> None:
    assert start_of(from_beginning=False, since=None, last=None, follow=True) == Start("end")
    assert start_of(from_beginning=False, since=None, last=None, follow=False) == Start("beginning")
    assert start_of(from_beginning=True, since=None, last=None, follow=True) == Start("beginning")
    assert start_of(from_beginning=False, since=None, last=5, follow=True) == Start("last", last=5)
    assert start_of(
        from_beginning=False, since="2024-05-01T12:00:00Z", last=None, follow=True
    ) == Start("since", since_ms=T0)
    with pytest.raises(ConfigError):
        start_of(from_beginning=False, since=None, last=0, follow=True)


def test_topic_names() -> None:
    topics = Topics("health")
    assert topic_name(topics, "events") == "health.events"
    assert topic_name(topics, "events.lab") == "health.events.lab"  # a routed topic
    for bad in ("", ".events", "ev ents"):
        with pytest.raises(ConfigError):
            topic_name(topics, bad)
