"""``hl7bridge replay`` without servers: what a record is, the selection filters, the
report, and replay against a fake MLLP client."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest

import bridge.replay as replay_module
from adapters.hl7v2.ack import AckError, build_ack
from adapters.hl7v2.er7 import parse_message
from bridge.cli import main
from bridge.errors import ConfigError
from bridge.replay import (
    ReplayTarget,
    Selection,
    describe_record,
    filter_records,
    parse_time,
    record_kind,
    replay,
)

pytestmark = pytest.mark.timeout(30)

T0 = parse_time("2024-05-01T12:00:00Z")


def hl7(control: str, sender: str = "EHR|GENHOSP", message_type: str = "ADT^A01") -> bytes:
    return (
        f"MSH|^~\\&|{sender}|HL7BRIDGE|HUB|20240501120000||{message_type}|{control}|P|2.5.1\r"
        "EVN|A01|20240501120000\r"
        "PID|1||MRN1^^^GENHOSP^MR||DOE^JANE||19800101|F\r"
    ).encode()


@dataclass
class Rec:
    """What replay reads of an aiokafka ConsumerRecord."""

    value: bytes | None
    offset: int
    partition: int = 0
    timestamp: int = T0
    headers: Sequence[tuple[str, bytes]] = field(default_factory=list)
    topic: str = "t.dlq"


def dlq(control: str, offset: int, **kw: Any) -> Rec:
    sender = kw.pop("sender", "EHR|GENHOSP")
    headers = [
        ("dlq_reason", b"unsupported_message_type"),
        ("dlq_channel", b"mllp"),
        ("ce_hl7sender", sender.encode()),
        ("ce_hl7controlid", control.encode()),
        ("ce_hl7messagetype", b"ZZZ^Z01"),
    ]
    return Rec(hl7(control, sender, "ZZZ^Z01"), offset, headers=headers, **kw)


def raw(control: str, offset: int, **kw: Any) -> Rec:
    sender = kw.pop("sender", "EHR|GENHOSP")
    headers = [
        ("content-type", b"x-application/hl7-v2+er7; charset=utf-8"),
        ("ce_hl7controlid", control.encode()),
    ]
    return Rec(hl7(control, sender), offset, headers=headers, topic="t.raw.hl7v2", **kw)


FHIR_DLQ = Rec(
    b'{"resourceType": "Patient"}',
    9,
    headers=[("dlq_channel", b"fhir"), ("dlq_reason", b"invalid")],
)


# --- describe_record and record_kind --------------------------------------------------------


def test_dlq_record_is_described_from_its_headers() -> None:
    info = describe_record(dlq("C1", 0, sender="LAB|NORTH"))
    assert (info.kind, info.control_id, info.sender) == ("hl7v2", "C1", "LAB|NORTH")
    assert (info.message_type, info.reason) == ("ZZZ^Z01", "unsupported_message_type")


def test_raw_record_sender_and_type_come_from_the_msh() -> None:
    info = describe_record(raw("C2", 0, sender="RIS^1.2.3^ISO|WEST"))
    assert (info.kind, info.control_id) == ("hl7v2", "C2")
    assert info.sender == "RIS^1.2.3^ISO|WEST"
    assert info.message_type == "ADT^A01"
    assert info.reason is None


def test_record_without_headers_is_read_from_its_value() -> None:
    info = describe_record(Rec(hl7("C3", "A|B"), 0))
    assert (info.kind, info.control_id, info.sender, info.message_type) == (
        "hl7v2",
        "C3",
        "A|B",
        "ADT^A01",
    )


def test_not_hl7_dlq_record_has_no_control_id_or_sender() -> None:
    record = Rec(b"garbage", 0, headers=[("dlq_channel", b"mllp"), ("dlq_reason", b"x")])
    info = describe_record(record)
    assert (info.kind, info.control_id, info.sender, info.message_type) == ("hl7v2", "", "", "")


@pytest.mark.parametrize(
    ("headers", "value", "kind"),
    [
        ({"content-type": b"application/fhir+json"}, b"{}", "fhir"),
        ({"content-type": b"x-application/hl7-v2+er7; charset=utf-8"}, b"MSH|", "hl7v2"),
        ({"dlq_channel": b"fhir"}, b"{}", "fhir"),
        ({"dlq_channel": b"mllp"}, b'{"not": "hl7"}', "hl7v2"),  # what the MLLP channel got
        ({"dlq_channel": b"directory:lab"}, b"MSH|", "hl7v2"),
        ({}, b"\xef\xbb\xbf  {", "fhir"),
        ({}, b"<Patient/>", "fhir"),
        ({}, b"MSH|^~\\&|", "hl7v2"),
    ],
)
def test_record_kind(headers: dict[str, bytes], value: bytes, kind: str) -> None:
    assert record_kind(headers, value) == kind


# --- selection --------------------------------------------------------------------------------


def test_parse_time_takes_rfc3339_with_an_offset() -> None:
    assert parse_time("2024-05-01T12:00:00Z") == 1714564800000
    assert parse_time("2024-05-01T14:00:00.250+02:00") == 1714564800250
    for bad in ("2024-05-01", "2024-05-01T12:00:00", "yesterday", ""):
        with pytest.raises(ConfigError, match="RFC 3339") as caught:
            parse_time(bad, key="until")
        assert caught.value.message.startswith(repr(bad))


def test_parse_time_is_exact_to_the_millisecond() -> None:
    for ms in range(T0, T0 + 2000, 7):
        moment = datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")
        assert parse_time(moment) == ms


@pytest.mark.parametrize(
    ("criteria", "key"),
    [
        ({"from_offset": 3}, "partition"),
        ({"to_offset": 3, "partitions": [0, 1]}, "partition"),
        ({"from_offset": 5, "to_offset": 4, "partitions": [0]}, "from_offset"),
        ({"from_offset": -1, "partitions": [0]}, "from_offset"),
        ({"partitions": [-1]}, "partition"),
        ({"since": "2024-05-02T00:00:00Z", "until": "2024-05-01T00:00:00Z"}, "since"),
        ({"since": "2024-05-01"}, "since"),
        ({"sender": "|"}, "sender"),
        ({"control_id": ""}, "control_id"),
    ],
)
def test_bad_criteria_are_refused_naming_the_key(criteria: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Selection.build(**criteria)
    assert caught.value.key == key


def test_no_criteria_select_everything_in_time_order() -> None:
    records = [
        dlq("C3", 0, partition=1, timestamp=T0 + 30),
        dlq("C1", 0, partition=0, timestamp=T0 + 10),
        dlq("C2", 1, partition=0, timestamp=T0 + 20),
        dlq("C0", 2, partition=2, timestamp=T0 + 20),
    ]
    chosen = filter_records(records, Selection.build())
    assert [describe_record(r).control_id for r in chosen] == ["C1", "C2", "C0", "C3"]


def test_offset_range_is_inclusive_and_per_partition() -> None:
    records = [dlq(f"P{p}O{o}", o, partition=p) for p in (0, 1) for o in range(6)]
    chosen = filter_records(records, Selection.build(partitions=[1], from_offset=2, to_offset=4))
    assert [(r.partition, r.offset) for r in chosen] == [(1, 2), (1, 3), (1, 4)]
    only_from = filter_records(records, Selection.build(partitions=[0], from_offset=4))
    assert [(r.partition, r.offset) for r in only_from] == [(0, 4), (0, 5)]


def test_time_range_bounds_are_included() -> None:
    records = [dlq(f"C{i}", i, timestamp=T0 + i * 1000) for i in range(5)]
    selection = Selection.build(since="2024-05-01T12:00:01Z", until="2024-05-01T14:00:03+02:00")
    assert [r.offset for r in filter_records(records, selection)] == [1, 2, 3]
    assert [
        r.offset for r in filter_records(records, Selection.build(until="2024-05-01T12:00:00Z"))
    ] == [0]


def test_sender_matches_app_and_facility_exactly_or_app_alone() -> None:
    records = [
        dlq("A", 0, sender="EHR|GENHOSP"),
        dlq("B", 1, sender="EHR|NORTH"),
        dlq("C", 2, sender="LAB|GENHOSP"),
        raw("D", 3, sender="EHR|GENHOSP"),  # no ce_hl7sender: read from MSH-3/MSH-4
        dlq("E", 4, sender="EHR^1.2.3^ISO|GENHOSP"),
    ]

    def controls(sender: str) -> list[str]:
        chosen = filter_records(records, Selection.build(sender=sender))
        return [describe_record(r).control_id for r in chosen]

    assert controls("EHR|GENHOSP") == ["A", "D"]
    assert controls("EHR") == ["A", "B", "D"]
    assert controls("EHR^1.2.3^ISO|GENHOSP") == ["E"]
    assert controls("RIS|GENHOSP") == []


def test_control_id_from_headers_or_msh10() -> None:
    records = [dlq("X1", 0), raw("X2", 1), Rec(hl7("X1"), 2), dlq("X10", 3)]
    chosen = filter_records(records, Selection.build(control_id="X1"))
    assert [r.offset for r in chosen] == [0, 2]


def test_criteria_combine() -> None:
    records = [
        dlq("A", 0, partition=0, sender="EHR|GENHOSP", timestamp=T0),
        dlq("A", 1, partition=0, sender="LAB|GENHOSP", timestamp=T0),
        dlq("A", 2, partition=0, sender="EHR|GENHOSP", timestamp=T0 - 1),
        dlq("A", 0, partition=1, sender="EHR|GENHOSP", timestamp=T0),
    ]
    selection = Selection.build(
        partitions=[0], sender="EHR|GENHOSP", control_id="A", since="2024-05-01T12:00:00Z"
    )
    assert [(r.partition, r.offset) for r in filter_records(records, selection)] == [(0, 0)]


# --- replay ----------------------------------------------------------------------------------


class FakeClient:
    """Stands in for one MLLPClient connection: answers each message by ``answer``."""

    def __init__(self, answer: Callable[[bytes], bytes]) -> None:
        self.answer = answer
        self.sent: list[bytes] = []
        self.closed = False

    async def send(self, payload: bytes, *, timeout_s: float | None = 30.0) -> bytes:
        self.sent.append(payload)
        return self.answer(payload)

    async def close(self) -> None:
        self.closed = True


def ack_for(payload: bytes, code: str, errors: Sequence[AckError] = ()) -> bytes:
    return build_ack(parse_message(payload).header, code, errors=errors, control_id="ACK1")


class FakeMllp:
    """Replaces MLLPClient in bridge.replay: keeps every connection it opened."""

    def __init__(self) -> None:
        self.clients: list[FakeClient] = []
        self.refuse = False
        self.answer: Callable[[bytes], bytes] = lambda payload: ack_for(payload, "AA")

    async def connect(self, host: str, port: int, *, timeout_s: float = 10.0) -> FakeClient:
        assert (host, port, timeout_s) == ("127.0.0.1", 2575, 5)
        if self.refuse:
            raise ConnectionRefusedError(111, "Connection refused")
        client = FakeClient(self.answer)
        self.clients.append(client)
        return client


@pytest.fixture
def mllp(monkeypatch: pytest.MonkeyPatch) -> FakeMllp:
    fake = FakeMllp()
    monkeypatch.setattr(replay_module, "MLLPClient", fake)
    return fake


TARGET = ReplayTarget("127.0.0.1", 2575, timeout_s=5)


async def test_dry_run_lists_and_sends_nothing(mllp: FakeMllp) -> None:
    records = [dlq("C1", 0), FHIR_DLQ, raw("C2", 4, partition=2)]
    seen: list[str] = []
    report = await replay(records, None, dry_run=True, on_item=lambda i: seen.append(i.line()))

    assert mllp.clients == []  # no connection at all
    assert seen == [
        "would send 0:0 C1 sender=EHR|GENHOSP type=ZZZ^Z01 reason=unsupported_message_type",
        "skipped 0:9 - (a FHIR record: replay takes HL7 v2 only)",
        "would send 2:4 C2 sender=EHR|GENHOSP type=ADT^A01",
    ]
    assert report.summary() == {
        "dry_run": True,
        "selected": 3,
        "sent": 0,
        "accepted": 0,
        "not_accepted": 0,
        "not_sent": 0,
        "would_send": 2,
        "skipped_fhir": 1,
        "skipped_other": 0,
    }
    assert report.ok
    assert (
        report.summary_line()
        == "dry run: 3 selected, 2 would be sent, 1 FHIR skipped; nothing sent"
    )


async def test_replay_sends_each_value_on_one_connection(mllp: FakeMllp) -> None:
    records = [dlq("C1", 0), dlq("C2", 1), FHIR_DLQ]

    async def stream() -> AsyncIterator[Rec]:
        for record in records:
            yield record

    report = await replay(stream(), TARGET, dry_run=False)

    assert len(mllp.clients) == 1
    assert mllp.clients[0].sent == [records[0].value, records[1].value]
    assert mllp.clients[0].closed
    assert [(i.status, i.ack_code, i.ack_control_id) for i in report.items] == [
        ("accepted", "AA", "C1"),
        ("accepted", "AA", "C2"),
        ("skipped", None, None),
    ]
    assert report.ok
    assert report.summary_line() == "3 selected: 2 accepted, 0 not accepted, 1 FHIR skipped"
    assert report.items[0].line() == "0:0 C1 → AA"


async def test_a_rejection_fails_the_replay_and_shows_the_err(mllp: FakeMllp) -> None:
    def answer(payload: bytes) -> bytes:
        if b"|C2|" in payload:
            return ack_for(payload, "AR", [AckError("200", "MSH-9", "type not accepted")])
        return ack_for(payload, "AA")

    mllp.answer = answer
    report = await replay([dlq("C1", 0), dlq("C2", 1)], TARGET, dry_run=False)

    assert [i.status for i in report.items] == ["accepted", "not_accepted"]
    assert report.items[1].line() == "0:1 C2 → AR\n  ERR 200 MSH-9 type not accepted"
    assert not report.ok
    item = report.items[1].to_json()
    assert json.loads(json.dumps(item))["errors"] == [
        {"code": "200", "location": "MSH-9", "text": "type not accepted"}
    ]
    assert (item["partition"], item["offset"], item["time"]) == (0, 1, "2024-05-01T12:00:00.000Z")


async def test_unreachable_target_sends_nothing_more(mllp: FakeMllp) -> None:
    mllp.refuse = True
    report = await replay([dlq("C1", 0), dlq("C2", 1)], TARGET, dry_run=False)

    assert mllp.clients == []
    assert [i.status for i in report.items] == ["not_sent", "not_sent"]
    assert report.items[0].problem is not None
    assert report.items[0].problem.startswith("cannot connect to 127.0.0.1:2575")
    assert not report.ok
    assert report.summary()["not_sent"] == 2


async def test_replay_without_a_target_must_be_a_dry_run() -> None:
    with pytest.raises(ConfigError, match="needs a target"):
        await replay([], None, dry_run=False)


# --- the command line (usage only: no servers) ------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["replay", "--dlq", "--dry-run", "--from-offset", "3"],  # offsets need --partition
        ["replay", "--dlq", "--dry-run", "--since", "2024-05-01"],  # no time, no offset
        ["replay", "--dlq", "--to", "nowhere"],  # not HOST:PORT
        ["replay", "--dlq", "--dry-run", "--timeout-s", "0"],
    ],
)
def test_bad_usage_exits_2_before_connecting(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*argv, "--kafka", "127.0.0.1:1"]) == 2
    assert "configuration error" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["replay", "--dry-run"],  # --dlq or --raw
        ["replay", "--dlq"],  # --to or --dry-run
        ["replay", "--dlq", "--raw", "--dry-run"],
        ["replay", "--dlq", "--dry-run", "--to", "127.0.0.1:2575"],
        ["replay", "--dlq", "--dry-run", "--partition", "x"],
    ],
)
def test_argument_errors_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
