"""``hl7bridge send`` helpers: reading ACKs of any version, addresses, output lines."""

from __future__ import annotations

import pytest

from adapters.hl7v2.ack import AckError, build_ack
from adapters.hl7v2.er7 import MessageHeader, parse_message
from bridge.errors import ConfigError
from bridge.sender import AckSummary, parse_address, summarize_ack

pytestmark = pytest.mark.timeout(30)

MISSING_CONTROL_ID = AckError("101", "MSH-10", "MSH-10 message control id is empty")
BAD_BIRTH_DATE = AckError("102", "PID-7.1", "not a valid calendar date")


def header(version: str) -> MessageHeader:
    text = f"MSH|^~\\&|SA|SF|RA|RF|20240101120000||ADT^A01|ORIG42|P|{version}\r"
    return parse_message(text.encode()).header


def ack(version: str, code: str, errors: list[AckError]) -> bytes:
    return build_ack(header(version), code, errors=errors, control_id="ACK0001")


# --- summarize_ack ----------------------------------------------------------------------


def test_accepting_ack() -> None:
    summary = summarize_ack("a.hl7", 3, ack("2.5.1", "AA", []))
    assert (summary.file, summary.index) == ("a.hl7", 3)
    assert (summary.ack_code, summary.control_id) == ("AA", "ORIG42")
    assert summary.errors == []
    assert summary.problem is None
    assert summary.accepted is True


def test_v25_ack_with_two_err_segments_codes_and_texts() -> None:
    data = ack("2.5.1", "AE", [MISSING_CONTROL_ID, BAD_BIRTH_DATE])
    assert len(parse_message(data).all_segments("ERR")) == 2
    summary = summarize_ack("a.hl7", 1, data)
    assert (summary.ack_code, summary.control_id) == ("AE", "ORIG42")
    assert [(e["code"], e["text"]) for e in summary.errors] == [
        ("101", "MSH-10 message control id is empty"),
        ("102", "not a valid calendar date"),
    ]
    assert summary.accepted is False


def test_v25_ack_error_locations_name_the_field() -> None:
    summary = summarize_ack("a.hl7", 1, ack("2.5.1", "AE", [MISSING_CONTROL_ID, BAD_BIRTH_DATE]))
    assert [e["location"] for e in summary.errors] == ["MSH-10", "PID-7.1"]


def test_v25_err_without_err8_falls_back_to_the_table_text() -> None:
    data = ack("2.5.1", "AR", [AckError("207", None, "")])
    summary = summarize_ack("a.hl7", 1, data)
    assert summary.errors == [{"code": "207", "location": "", "text": "Application internal error"}]


def test_v23_ack_with_err1() -> None:
    data = ack("2.3", "AE", [MISSING_CONTROL_ID])
    err = parse_message(data).all_segments("ERR")
    assert len(err) == 1
    assert err[0][1] == "MSH^1^10^101&Required field missing&HL70357"
    summary = summarize_ack("a.hl7", 1, data)
    assert (summary.ack_code, summary.control_id) == ("AE", "ORIG42")
    assert summary.errors == [
        {"code": "101", "location": "MSH-10", "text": "Required field missing"}
    ]


def test_v23_ack_with_two_errors_in_repeating_err1() -> None:
    summary = summarize_ack("a.hl7", 1, ack("2.3", "AE", [MISSING_CONTROL_ID, BAD_BIRTH_DATE]))
    assert summary.errors == [
        {"code": "101", "location": "MSH-10", "text": "Required field missing"},
        {"code": "102", "location": "PID-7", "text": "Data type error"},
    ]


def test_enhanced_mode_code_counts_as_accepted() -> None:
    summary = summarize_ack("a.hl7", 1, build_ack(header("2.5.1"), "CA", control_id="X"))
    assert summary.ack_code == "CA"
    assert summary.accepted is True


@pytest.mark.parametrize("answer", [b"", b"garbage\r", b"\x00\x01\x02", b"HTTP/1.1 400 Bad"])
def test_garbage_answer_is_reported_as_a_problem(answer: bytes) -> None:
    summary = summarize_ack("a.hl7", 2, answer)
    assert summary.ack_code == "??"
    assert summary.control_id == ""
    assert summary.problem == "the answer is not an HL7 ACK"
    assert summary.accepted is False


def test_answer_without_msa_is_not_accepted() -> None:
    summary = summarize_ack("a.hl7", 1, b"MSH|^~\\&|A|B|C|D|20240101||ACK|X|P|2.5\r")
    assert summary.ack_code == "??"
    assert summary.accepted is False


# --- parse_address ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("localhost:2575", ("localhost", 2575)),
        ("10.0.0.1:1", ("10.0.0.1", 1)),
        ("[::1]:2575", ("::1", 2575)),
        ("mllp.example.org:65535", ("mllp.example.org", 65535)),
    ],
)
def test_parse_address(address: str, expected: tuple[str, int]) -> None:
    assert parse_address(address) == expected


@pytest.mark.parametrize(
    "address",
    ["localhost", "localhost:", ":2575", "localhost:0", "localhost:65536", "host:abc", "h:-1", ""],
)
def test_bad_address_is_a_config_error(address: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_address(address)
    assert caught.value.key == "address"
    assert repr(address) in str(caught.value)


# --- AckSummary.line --------------------------------------------------------------------


def test_line_of_an_accepted_message() -> None:
    assert AckSummary("a.hl7", 1, "AA", "ORIG42").line() == "a.hl7#1 AA ORIG42"


def test_line_lists_each_error_and_skips_empty_parts() -> None:
    summary = AckSummary(
        "dir/b.hl7",
        2,
        "AE",
        "ORIG42",
        errors=[
            {"code": "101", "location": "MSH-10", "text": "MSH-10 is empty"},
            {"code": "207", "location": "", "text": ""},
        ],
    )
    assert summary.line() == "dir/b.hl7#2 AE ORIG42\n  ERR 101 MSH-10 MSH-10 is empty\n  ERR 207"


def test_line_with_a_problem_and_no_control_id() -> None:
    summary = AckSummary("a.hl7", 4, "--", "", problem="timed out")
    assert summary.line() == "a.hl7#4 -- (timed out)"
