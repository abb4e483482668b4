"""CloudEvents envelope: the exact Kafka headers and the deterministic identities."""

from __future__ import annotations

import re
import uuid
from dataclasses import replace

import pytest

from bridge.envelope import (
    EventAttributes,
    deterministic_id,
    hl7v2_event_id,
    hl7v2_event_type,
    hl7v2_source,
    now_rfc3339,
)

pytestmark = pytest.mark.timeout(30)

FP = bytes(range(16))


def minimal() -> EventAttributes:
    return EventAttributes(
        id="id-1", source="urn:hl7v2:APP:FAC", type="org.hl7bridge.t", time="2024-01-01T00:00:00Z"
    )


def test_minimal_event_has_exactly_the_required_headers_in_order() -> None:
    assert minimal().headers() == [
        ("ce_specversion", b"1.0"),
        ("ce_id", b"id-1"),
        ("ce_source", b"urn:hl7v2:APP:FAC"),
        ("ce_type", b"org.hl7bridge.t"),
        ("ce_time", b"2024-01-01T00:00:00Z"),
        ("content-type", b"application/fhir+json"),
    ]


def test_every_optional_header_when_valued() -> None:
    attrs = EventAttributes(
        id="id-1",
        source="urn:hl7v2:APP:FAC",
        type="org.hl7bridge.t",
        time="2024-01-01T00:00:00Z",
        subject="Patient/p-1",
        content_type=b"x-application/hl7-v2+er7; charset=latin-1",
        hl7_control_id="CTRL1",
        hl7_message_type="ORU^R01",
        hl7_version="2.5.1",
        bridge_instance="u1",
        leader_epoch=7,
        unmapped=("OBR", "OBX"),
    )
    assert attrs.headers() == [
        ("ce_specversion", b"1.0"),
        ("ce_id", b"id-1"),
        ("ce_source", b"urn:hl7v2:APP:FAC"),
        ("ce_type", b"org.hl7bridge.t"),
        ("ce_time", b"2024-01-01T00:00:00Z"),
        ("content-type", b"x-application/hl7-v2+er7; charset=latin-1"),
        ("ce_subject", b"Patient/p-1"),
        ("ce_hl7controlid", b"CTRL1"),
        ("ce_hl7messagetype", b"ORU^R01"),
        ("ce_hl7version", b"2.5.1"),
        ("ce_bridgeinstance", b"u1"),
        ("ce_leaderepoch", b"7"),
        ("ce_hl7unmapped", b"OBR,OBX"),
    ]


def test_leader_epoch_zero_is_a_value() -> None:
    headers = dict(replace(minimal(), leader_epoch=0).headers())
    assert headers["ce_leaderepoch"] == b"0"


def test_absent_optionals_have_no_header() -> None:
    names = [name for name, _ in minimal().headers()]
    for absent in ("ce_subject", "ce_leaderepoch", "ce_hl7unmapped", "ce_hl7controlid"):
        assert absent not in names


def test_empty_string_control_id_is_still_sent() -> None:
    headers = dict(replace(minimal(), hl7_control_id="").headers())
    assert headers["ce_hl7controlid"] == b""


def test_headers_are_utf8() -> None:
    attrs = replace(minimal(), source="urn:hl7v2:Ärzte:FAC")
    assert dict(attrs.headers())["ce_source"] == "urn:hl7v2:Ärzte:FAC".encode()


# --- identities -------------------------------------------------------------------------


def test_event_id_is_a_deterministic_uuid5() -> None:
    first = hl7v2_event_id("APP|FAC", "CTRL1", FP)
    assert first == hl7v2_event_id("APP|FAC", "CTRL1", FP)
    assert uuid.UUID(first).version == 5
    assert first == deterministic_id("hl7v2", "APP|FAC", "CTRL1", FP.hex())


@pytest.mark.parametrize(
    ("sender", "control_id", "fingerprint"),
    [
        ("APP|OTHER", "CTRL1", FP),
        ("APP|FAC", "CTRL2", FP),
        ("APP|FAC", "CTRL1", bytes(16)),
    ],
    ids=["sender", "control-id", "fingerprint"],
)
def test_event_id_changes_with_each_part(sender: str, control_id: str, fingerprint: bytes) -> None:
    assert hl7v2_event_id(sender, control_id, fingerprint) != hl7v2_event_id("APP|FAC", "CTRL1", FP)


def test_event_id_parts_do_not_run_into_each_other() -> None:
    assert hl7v2_event_id("APP|FA", "CCTRL1", FP) != hl7v2_event_id("APP|FAC", "CTRL1", FP)
    assert deterministic_id("ab", "c") != deterministic_id("a", "bc")


@pytest.mark.parametrize(
    ("application", "facility", "expected"),
    [
        ("APP", "FAC", "urn:hl7v2:APP:FAC"),
        ("APP^1.2.3^ISO", "FAC^9.8^ISO", "urn:hl7v2:APP:FAC"),
        ("MY APP/1", "FAC:2", "urn:hl7v2:MY%20APP%2F1:FAC%3A2"),
        ("Ärzte", "a&b", "urn:hl7v2:%C3%84rzte:a%26b"),
        ("", "", "urn:hl7v2:-:-"),
        ("^1.2.3^ISO", "FAC", "urn:hl7v2:-:FAC"),
    ],
)
def test_source(application: str, facility: str, expected: str) -> None:
    assert hl7v2_source(application, facility) == expected


@pytest.mark.parametrize(
    ("message_type", "expected"),
    [
        ("ORU^R01", "org.hl7bridge.hl7v2.ORU_R01"),
        ("ADT^A01", "org.hl7bridge.hl7v2.ADT_A01"),
        ("ACK", "org.hl7bridge.hl7v2.ACK"),
    ],
)
def test_event_type(message_type: str, expected: str) -> None:
    assert hl7v2_event_type(message_type) == expected


def test_now_is_rfc3339_utc_with_milliseconds() -> None:
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z", now_rfc3339())
