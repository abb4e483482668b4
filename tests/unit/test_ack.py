"""ACK building: parsed back with our own reader and checked field by field."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from adapters.hl7v2 import er7
from adapters.hl7v2.ack import (
    TABLE_0357,
    AckError,
    ack_code_for,
    ack_error_from,
    build_ack,
    commit_mode,
    header_for_unparseable,
    map_ack_code,
)
from adapters.hl7v2.er7 import Hl7Message, MessageHeader, parse_message
from bridge import errors
from bridge.errors import (
    BridgeError,
    NotHl7Error,
    PublishError,
    RequiredFieldMissing,
    UnsupportedVersion,
)

pytestmark = pytest.mark.timeout(30)

CORPUS = Path(__file__).resolve().parents[2].parent / "shared" / "corpus"
MS_DIR = CORPUS / "microsoft-fhir-converter" / "data" / "SampleData" / "Hl7v2"
FIXED_TIME = datetime(2024, 3, 1, 12, 30, 45, tzinfo=UTC)


def original(name: str) -> Hl7Message:
    return parse_message((MS_DIR / name).read_bytes())


def ack_of(header: MessageHeader | None, code: str = "AA", **kwargs: Any) -> Hl7Message:
    data = build_ack(header, code, control_id="ACK00001", timestamp=FIXED_TIME, **kwargs)
    assert isinstance(data, bytes)
    assert data.endswith(b"\r")
    assert b"\n" not in data
    assert not data.startswith(b"\x0b")
    return parse_message(data)


def test_accept_ack_for_v28_swaps_sender_and_receiver() -> None:
    msg = original("ADT-A01-01.hl7")
    ack = ack_of(msg.header)
    h = ack.header
    assert h.sending_application == msg.header.receiving_application == "EHRApp^1.Edu^ISO"
    assert h.sending_facility == msg.header.receiving_facility
    assert h.receiving_application == msg.header.sending_application == "ADTApp"
    assert h.receiving_facility == msg.header.sending_facility
    assert ack.segments[0][9] == "ACK^A01^ACK"
    assert h.control_id == "ACK00001"
    assert h.processing_id == "P"
    assert h.version_id == "2.8"
    assert h.message_datetime == "20240301123045+0000"
    assert [s[0] for s in ack.segments] == ["MSH", "MSA"]
    assert ack.field("MSA", 1) == "AA"
    assert ack.field("MSA", 2) == "MSG00001"
    er7.validate_header(h)


def test_default_timestamp_is_now_with_offset() -> None:
    data = build_ack(original("LAB-ORU-1.hl7").header, "AA", control_id="1")
    stamp = parse_message(data).header.message_datetime
    assert re.fullmatch(r"\d{14}[+-]\d{4}", stamp)
    parsed = datetime.strptime(stamp, "%Y%m%d%H%M%S%z")
    assert abs(parsed - datetime.now(UTC)) < timedelta(minutes=1)


def test_timestamp_keeps_its_offset() -> None:
    ts = datetime(2024, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=-5)))
    data = build_ack(None, "AA", control_id="1", timestamp=ts)
    assert parse_message(data).header.message_datetime == "20240102030405-0500"


def test_error_ack_v25_has_err_with_location_code_and_message() -> None:
    msg = original("LAB-ORU-1.hl7")
    err = ack_error_from(RequiredFieldMissing("PID-3 is empty", location="PID-3"))
    ack = ack_of(msg.header, "AE", errors=[err])
    assert ack.segments[0][9] == "ACK^R01^ACK"
    assert (ack.header.processing_id, ack.header.version_id) == ("T", "2.5")
    assert ack.field("MSA", 1) == "AE"
    assert ack.field("MSA", 2) == "182"
    assert ack.field("MSA", 3) == ""
    err_seg = ack.segment("ERR")
    assert err_seg is not None
    assert err_seg[1] == ""
    assert err_seg[2] == "PID^1^3"
    assert err_seg[3] == "101^Required field missing^HL70357"
    assert ack.field("ERR", 3) == "101"
    assert err_seg[4] == "E"
    assert ack.field("ERR", 8) == "PID-3 is empty"


def test_several_errors_v25_give_one_err_each() -> None:
    errs = [
        AckError("101", "MSH-10", "MSH-10 is empty"),
        AckError("102", "PID-7.1", "bad date", severity="W"),
        AckError("207", None, "internal"),
    ]
    ack = ack_of(original("ORU-R01-01.hl7").header, "AE", errors=errs)
    segs = ack.all_segments("ERR")
    assert [s[2] for s in segs] == ["MSH^1^10", "PID^1^7^1^1", ""]
    assert [s[3].split("^")[0] for s in segs] == ["101", "102", "207"]
    assert [s[4] for s in segs] == ["E", "W", "E"]


def test_v23_ack_uses_msa3_and_eld_in_err1() -> None:
    msg = original("ADT01-23.hl7")
    errs = [
        AckError("207", "MSH-10", "cannot take it now"),
        AckError("102", "PID-7", "bad date"),
    ]
    ack = ack_of(msg.header, "AR", errors=errs)
    assert ack.segments[0][9] == "ACK^A01"
    assert ack.header.version_id == "2.3"
    assert ack.field("MSA", 1) == "AR"
    assert ack.field("MSA", 2) == "599102"
    assert ack.field("MSA", 3) == "cannot take it now"
    assert ack.field("MSA", 6) == "207"
    assert ack.field("MSA", 6, component=2) == "Application internal error"
    assert len(ack.all_segments("ERR")) == 1
    err1 = ack.segment("ERR")
    assert err1 is not None
    assert err1[1] == (
        "MSH^1^10^207&Application internal error&HL70357~PID^1^7^102&Data type error&HL70357"
    )


def test_v23_text_overrides_msa3_and_is_clipped() -> None:
    ack = ack_of(original("ADT01-23.hl7").header, "AE", text="x" * 200)
    assert len(ack.field("MSA", 3)) == 80
    assert ack.segment("ERR") is None


def test_v24_is_old_style_errors_with_new_style_message_type() -> None:
    msg = original("ORU-R01-RMGEAD.hl7")
    assert msg.header.version_id == "2.4"
    ack = ack_of(msg.header, "AE", errors=[AckError("101", "OBX-5", "missing")])
    assert ack.segments[0][9] == "ACK^R01^ACK"
    err1 = ack.segment("ERR")
    assert err1 is not None
    assert err1[1] == "OBX^1^5^101&Required field missing&HL70357"


def test_text_in_v25_goes_to_err8() -> None:
    h = original("LAB-ORU-1.hl7").header
    ack = ack_of(h, "AE", errors=[AckError("101", "PID-3", "own")], text="summary")
    assert ack.field("ERR", 8) == "summary"
    assert ack.field("MSA", 3) == ""
    accepted = ack_of(h, "AA", text="stored")
    assert accepted.field("ERR", 3) == "0"
    assert accepted.field("ERR", 4) == "I"
    assert accepted.field("ERR", 8) == "stored"
    rejected = ack_of(h, "AR", text="broker down")
    assert rejected.field("ERR", 3) == "207"
    assert rejected.field("ERR", 4) == "E"


def test_text_with_delimiters_and_line_breaks_is_escaped() -> None:
    h = original("LAB-ORU-1.hl7").header
    text = "a|b^c~d\\e&f\r\nnext"
    ack = ack_of(h, "AE", errors=[AckError("102", "OBX-5", text)])
    assert len(ack.segments) == 3
    assert ack.field("ERR", 8) == text
    old = ack_of(original("ADT01-23.hl7").header, "AE", text="a|b^c")
    assert old.field("MSA", 3) == "a|b^c"


def test_ack_without_header() -> None:
    data = build_ack(None, "AR", control_id="ACK9", timestamp=FIXED_TIME)
    ack = parse_message(data)
    assert ack.header.version_id == "2.5.1"
    assert ack.header.processing_id == "P"
    assert ack.segments[0][9] == "ACK"
    assert ack.header.sending_application == ack.header.receiving_application == ""
    msa = ack.segment("MSA")
    assert msa is not None
    assert msa[1:3] == ["AR", ""]


def test_ack_to_an_ack_or_a_message_without_trigger() -> None:
    h = parse_message(b"MSH|^~\\&|A|B|C|D|2024||ACK|9|P|2.5.1\rMSA|AA|1").header
    ack = ack_of(h)
    assert ack.segments[0][9] == "ACK"


def test_latin1_ack_is_encoded_in_the_message_charset() -> None:
    data = (
        b"MSH|^~\\&|APP|Z\xfcrich|RECV|FAC|20240101120000+0100||ADT^A01^ADT_A01|C1|P|2.5.1"
        b"||||||8859/1\rPID|1||1^^^H||M\xfcller\r"
    )
    msg = parse_message(data)
    ack_bytes = build_ack(msg.header, "AA", control_id="A1", timestamp=FIXED_TIME)
    assert b"|APP|Z\xfcrich|" in ack_bytes
    ack = parse_message(ack_bytes)
    assert ack.header.charset == "8859/1"
    assert ack.header.receiving_facility == "Zürich"
    assert ack.field("MSH", 18) == "8859/1"


def test_unlabelled_latin1_message_gets_a_latin1_ack() -> None:
    data = b"MSH|^~\\&|APP|K\xf6ln|R|F|2024||ADT^A01|C1|P|2.5.1\r"
    msg = parse_message(data)
    assert msg.codec == "latin-1"
    ack_bytes = build_ack(msg.header, "AA", control_id="A1")
    assert b"|APP|K\xf6ln|" in ack_bytes
    assert parse_message(ack_bytes).header.charset == ""


def test_custom_delimiters_and_truncation_character_are_kept() -> None:
    data = b"MSH*:!$%#*APP*FAC*R*RF*20240101120000+0100**ORU:R01:ORU_R01*C9*D*2.7\r"
    msg = parse_message(data)
    ack_bytes = build_ack(
        msg.header, "AE", errors=[AckError("101", "PID-3", "a*b")], control_id="A:1"
    )
    assert ack_bytes.startswith(b"MSH*:!$%#*R*RF*APP*FAC*")
    ack = parse_message(ack_bytes)
    assert ack.segments[0][9] == "ACK:R01:ACK"
    assert ack.header.control_id == "A$S$1"
    assert ack.field("MSH", 10) == "A:1"
    assert ack.header.processing_id == "D"
    assert ack.field("ERR", 2, component=3) == "3"
    assert ack.field("ERR", 8) == "a*b"


def test_ack_from_an_unparseable_frame_head() -> None:
    full = (MS_DIR / "ADT-A01-01.hl7").read_bytes()
    head = full[:4096][:300]
    h = header_for_unparseable(head)
    assert h is not None
    ack = ack_of(h, "AE", errors=[AckError("207", None, "frame too large")])
    assert ack.field("MSA", 2) == "MSG00001"
    assert ack.header.receiving_application == "ADTApp"
    assert header_for_unparseable(b"not hl7") is None


def test_ack_for_a_message_with_an_invalid_header() -> None:
    msg = parse_message(b"MSH|^~\\&|A|B|C|D|2024||ADT^A01|77|P|9.9\r")
    with pytest.raises(UnsupportedVersion) as info:
        er7.validate_header(msg.header)
    exc = info.value
    ack = ack_of(msg.header, ack_code_for(msg.header, exc), errors=[ack_error_from(exc)])
    assert ack.field("MSA", 1) == "AR"
    assert ack.field("MSA", 2) == "77"
    assert ack.header.version_id == "9.9"
    assert ack.field("ERR", 2) == "MSH"
    assert ack.field("ERR", 2, component=3) == "12"
    assert ack.field("ERR", 3) == "203"


@pytest.mark.parametrize(
    ("location", "erl"),
    [
        ("MSH-10", "MSH^1^10"),
        ("PID-3.1", "PID^1^3^1^1"),
        ("PID-3.4.2", "PID^1^3^1^4^2"),
        ("OBX[2]-5", "OBX^2^5"),
        ("MSH", "MSH^1"),
        (None, ""),
        ("somewhere", ""),
    ],
)
def test_error_locations(location: str | None, erl: str) -> None:
    ack = ack_of(None, "AE", errors=[AckError("101", location, "m")])
    err = ack.segment("ERR")
    assert err is not None
    assert err[2] == erl


def test_ack_codes_original_and_enhanced_mode() -> None:
    original_mode = original("LAB-ORU-1.hl7").header
    enhanced = original("ORU-R01-01.hl7").header
    assert not commit_mode(original_mode)
    assert not commit_mode(None)
    assert commit_mode(enhanced)
    # A stray blank (ADT01-23.hl7 has "| " in MSH-15) is not enhanced mode.
    assert not commit_mode(original("ADT01-23.hl7").header)

    assert ack_code_for(original_mode, True) == "AA"
    assert ack_code_for(original_mode, False) == "AE"
    assert ack_code_for(original_mode, RequiredFieldMissing("x")) == "AE"
    assert ack_code_for(original_mode, PublishError("x")) == "AR"
    assert ack_code_for(enhanced, True) == "CA"
    assert ack_code_for(enhanced, RequiredFieldMissing("x")) == "CE"
    assert ack_code_for(enhanced, UnsupportedVersion("x")) == "CR"
    assert ack_code_for(None, NotHl7Error("x")) == "AE"

    assert map_ack_code("AA", enhanced) == "CA"
    assert map_ack_code("CE", original_mode) == "AE"
    assert map_ack_code("AR", original_mode) == "AR"


def test_enhanced_mode_with_ne_still_gets_an_answer() -> None:
    h = parse_message(b"MSH|^~\\&|A|B|C|D|2024||ADT^A01|5|P|2.5.1|||NE|AL\r").header
    assert h.accept_ack_type == "NE"
    code = ack_code_for(h, True)
    assert code == "CA"
    ack = ack_of(h, code)
    assert ack.field("MSA", 1) == "CA"
    assert ack.header.accept_ack_type == ""


def test_ack_error_from_exception() -> None:
    err = ack_error_from(RequiredFieldMissing("MSH-10 is empty", location="MSH-10"))
    assert err == AckError("101", "MSH-10", "MSH-10 is empty", "E")


def test_table_0357_covers_every_error_class() -> None:
    classes = [c for c in vars(errors).values() if isinstance(c, type)]
    for cls in classes:
        if issubclass(cls, BridgeError):
            assert cls.err_code in TABLE_0357


def test_unknown_ack_code_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        build_ack(None, "OK", control_id="1")
