"""``bridge.convert``: HL7 v2 files → the structured CloudEvents the bridge publishes."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any

import orjson
import pytest
from fhir.resources.R4B.bundle import Bundle

from adapters.hl7v2.er7 import parse_message
from bridge.cli import main
from bridge.convert import (
    Converted,
    ConvertOptions,
    NotConverted,
    convert_batches,
    convert_files,
    convert_message,
    describe_error,
    write_results,
)
from bridge.errors import ConfigError, DataTypeError
from bridge.events import hl7v2_event
from bridge.normalize import MappingOptions

pytestmark = pytest.mark.timeout(60)

MSH = "MSH|^~\\&|SENDAPP|SENDFAC|RECVAPP|RECVFAC|20240101120000+0100||{type}|{cid}|P|2.5.1"
PID = "PID|1||12345^^^MRN^MR||DOE^JANE^Q||19800203|F|||1 MAIN ST^^SPRINGFIELD^IL^62701"


def message(*segments: str, cid: str = "CTRL1", type_: str = "ADT^A01^ADT_A01") -> bytes:
    return ("\r".join([MSH.format(type=type_, cid=cid), *segments]) + "\r").encode()


GOOD = message("EVN|A01|20240101120000", PID)
WITH_Z = message("EVN|A01|20240101120000", PID, "ZPI|1|custom thing", cid="CTRL2")
BAD_BIRTH = message(PID.replace("19800203", "19801345"), cid="CTRL3")


def run(
    data: list[bytes], options: ConvertOptions | None = None, **flags: bool
) -> tuple[int, bytes, str]:
    out, err = io.BytesIO(), io.StringIO()
    status = write_results(
        convert_batches([("a.hl7", data)], options or ConvertOptions()),
        out=out,
        err=err,
        **flags,
    )
    return status, out.getvalue(), err.getvalue()


def documents(output: bytes) -> list[dict[str, Any]]:
    """Indented documents one after the other: split where a new top-level object starts."""
    text = output.decode()
    parts = text.replace("}\n{", "}\n\x00{").split("\x00")
    return [orjson.loads(p) for p in parts if p.strip()]


# --- the event is the one bridge.events describes ---------------------------------------------


def test_structured_event_has_the_attributes_bridge_events_gives() -> None:
    status, out, err = run([GOOD])
    assert status == 0
    assert err.strip() == "1 converted, 0 not converted"
    [event] = documents(out)
    expected = hl7v2_event(parse_message(GOOD), instance_id=None, mapping=MappingOptions())
    want = expected.event.structured(expected.data)
    # ``time`` is when the event was made; everything else is the same, data included.
    assert event.pop("time")
    want.pop("time")
    assert event == orjson.loads(orjson.dumps(want))
    assert event["specversion"] == "1.0"
    assert event["type"] == "org.hl7bridge.hl7v2.ADT_A01"
    assert event["source"] == "urn:hl7v2:SENDAPP:SENDFAC"
    assert event["datacontenttype"] == "application/fhir+json"
    assert event["hl7controlid"] == "CTRL1"
    assert event["hl7messagetype"] == "ADT^A01"
    assert event["hl7version"] == "2.5.1"
    assert "bridgeinstance" not in event  # no bridge instance made it
    patient = next(
        e["resource"] for e in event["data"]["entry"] if e["resource"]["resourceType"] == "Patient"
    )
    assert event["subject"] == f"Patient/{patient['id']}"
    assert patient["birthDate"] == "1980-02-03"
    assert patient["name"][0]["family"] == "DOE"
    Bundle.model_validate(event["data"])


def test_same_message_gets_the_same_event_id_and_data() -> None:
    first = convert_message(GOOD, ConvertOptions())
    second = convert_message(GOOD, ConvertOptions())
    assert first.event.id == second.event.id
    assert first.data == second.data


def test_data_only_prints_the_bundle() -> None:
    status, out, _ = run([GOOD], data_only=True)
    assert status == 0
    [bundle] = documents(out)
    assert bundle["resourceType"] == "Bundle"
    assert bundle["type"] == "message"
    assert bundle["entry"][0]["resource"]["resourceType"] == "MessageHeader"


def test_json_lines_prints_one_document_per_line() -> None:
    status, out, _ = run([GOOD, WITH_Z], json_lines=True)
    assert status == 0
    lines = out.decode().splitlines()
    assert len(lines) == 2
    assert [orjson.loads(line)["hl7controlid"] for line in lines] == ["CTRL1", "CTRL2"]


def test_default_output_is_indented_one_document_per_message() -> None:
    _, out, _ = run([GOOD, WITH_Z])
    assert out.startswith(b'{\n  "specversion"')
    assert [d["hl7controlid"] for d in documents(out)] == ["CTRL1", "CTRL2"]


# --- unmapped content ---------------------------------------------------------------------------


def test_z_segment_is_listed_in_hl7unmapped() -> None:
    _, out, _ = run([WITH_Z])
    [event] = documents(out)
    assert "ZPI" in event["hl7unmapped"].split(",")
    header = event["data"]["entry"][0]["resource"]
    assert {"url": "urn:hl7bridge:StructureDefinition:unmapped", "valueString": "ZPI"} in header[
        "extension"
    ]


def test_strict_mapping_refuses_a_message_with_unmapped_content() -> None:
    status, out, err = run([WITH_Z], ConvertOptions(strict_mapping=True))
    assert status == 1
    assert out == b""
    assert err.splitlines()[0].startswith("a.hl7#1: UnmappedContent: ")
    assert "ZPI" in err


# --- failures ----------------------------------------------------------------------------------


def test_a_bad_message_is_reported_with_its_location_and_the_others_still_convert() -> None:
    status, out, err = run([GOOD, BAD_BIRTH, WITH_Z], json_lines=True)
    assert status == 1
    assert len(out.decode().splitlines()) == 2
    first, summary = err.splitlines()
    assert first.startswith("a.hl7#2: DataTypeError at PID-7: ")
    assert "19801345" not in err  # never the message's content
    assert summary == "2 converted, 1 not converted"


def test_failures_come_as_not_converted_entries() -> None:
    results = list(convert_batches([("x.hl7", [BAD_BIRTH, GOOD])], ConvertOptions()))
    assert isinstance(results[0], NotConverted)
    assert results[0].index == 1
    assert results[0].error.startswith("DataTypeError at PID-7:")
    assert isinstance(results[1], Converted)
    assert results[1].structured()["hl7controlid"] == "CTRL1"


def test_header_is_validated() -> None:
    no_processing_id = GOOD.replace(b"|CTRL1|P|", b"|CTRL1||")
    status, _, err = run([no_processing_id])
    assert status == 1
    assert err.startswith("a.hl7#1: RequiredFieldMissing at MSH-11: ")


def test_not_hl7_is_reported() -> None:
    status, _, err = run([b"MSH|bad"])
    assert status == 1
    assert err.startswith("a.hl7#1: NotHl7Error")


def test_message_types_the_bridge_does_not_accept_are_still_converted() -> None:
    other = message(PID, type_="ZZZ^Z01")
    status, out, _ = run([other])
    assert status == 0
    assert documents(out)[0]["type"] == "org.hl7bridge.hl7v2.ZZZ_Z01"


def test_describe_error_of_a_defect_names_the_class_and_place_not_the_text() -> None:
    empty: dict[str, str] = {}
    try:
        empty["secret-value"]
    except KeyError as exc:
        text = describe_error(exc)
    assert text.startswith("internal error (a bridge defect): KeyError raised in ")
    assert "secret" not in text
    assert describe_error(DataTypeError("bad", location="OBX-5")) == "DataTypeError at OBX-5: bad"
    assert describe_error(DataTypeError("bad")) == "DataTypeError: bad"


# --- options -------------------------------------------------------------------------------------


def test_identifier_systems_option_changes_the_patient_identifier() -> None:
    options = ConvertOptions(mapping=MappingOptions(identifier_systems={"MRN": "urn:oid:1.2.3"}))
    described = convert_message(GOOD, options)
    patient = next(
        e["resource"] for e in described.data["entry"] if e["resource"]["resourceType"] == "Patient"
    )
    assert patient["identifier"][0] == {
        "type": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]
        },
        "system": "urn:oid:1.2.3",
        "value": "12345",
    }


def test_cli_parses_identifier_systems_with_the_settings_rule(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    path = tmp_path / "a.hl7"
    path.write_bytes(GOOD)
    status = main(
        ["convert", "--data-only", "--identifier-systems", "MRN=urn:oid:9.8.7", str(path)]
    )
    out, _ = capsysbinary.readouterr()
    assert status == 0
    patient = documents(out)[0]["entry"][1]["resource"]
    assert patient["identifier"][0]["system"] == "urn:oid:9.8.7"


def test_cli_bad_identifier_systems_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "a.hl7"
    path.write_bytes(GOOD)
    assert main(["convert", "--identifier-systems", "no-equals-sign", str(path)]) == 2
    err = capsys.readouterr().err
    assert "identifier_systems (from --identifier-systems)" in err
    assert "NAMESPACE=URI" in err


# --- files ---------------------------------------------------------------------------------------


def test_messages_of_several_files_with_crlf_bom_and_mllp_framing(tmp_path: Path) -> None:
    crlf = tmp_path / "crlf.hl7"
    crlf.write_bytes(b"\xef\xbb\xbf" + GOOD.replace(b"\r", b"\r\n") + WITH_Z.replace(b"\r", b"\n"))
    framed = tmp_path / "framed.mllp"
    framed.write_bytes(b"\x0b" + BAD_BIRTH + b"\x1c\r")
    out, err = io.BytesIO(), io.StringIO()
    status = convert_files([crlf, framed], ConvertOptions(), json_lines=True, out=out, err=err)
    assert status == 1
    assert [orjson.loads(x)["hl7controlid"] for x in out.getvalue().splitlines()] == [
        "CTRL1",
        "CTRL2",
    ]
    assert err.getvalue().startswith(f"{framed}#1: DataTypeError at PID-7")


def test_missing_file_is_a_configuration_error_before_any_output(tmp_path: Path) -> None:
    good = tmp_path / "good.hl7"
    good.write_bytes(GOOD)
    out = io.BytesIO()
    with pytest.raises(ConfigError, match=r"missing\.hl7"):
        convert_files([good, tmp_path / "missing.hl7"], ConvertOptions(), out=out)
    assert out.getvalue() == b""


def test_file_without_a_message_is_a_configuration_error(tmp_path: Path) -> None:
    empty = tmp_path / "notes.txt"
    empty.write_text("no message here\n")
    with pytest.raises(ConfigError, match=r"notes\.txt holds no HL7 v2 message"):
        convert_files([empty], ConvertOptions(), out=io.BytesIO())


ORU_LOCAL_TIME = (
    b"MSH|^~\\&|LAB|FAC|||20240101120000||ORU^R01^ORU_R01|C9|P|2.5.1\r"
    b"PID|1||12345^^^MRN^MR||DOE^JANE||19800203|F\r"
    b"OBR|1|P1|F1|1-1^Test^LN|||20240101113000\r"
    b"OBX|1|NM|1-1^Test^LN||4.4|mg/dL^^UCUM|||||F|||20240101120000\r"
)


def test_options_come_from_the_bridge_settings() -> None:
    from bridge.config import Settings
    from bridge.convert import options_from_settings

    settings = Settings.model_validate(
        {
            "identifier_systems": "MRN=urn:oid:1.2.3",
            "hl7_default_timezone": "America/Chicago",
            "strict_mapping": True,
        }
    )
    options = options_from_settings(settings)
    assert options.mapping.identifier_systems == {"MRN": "urn:oid:1.2.3"}
    assert options.mapping.default_timezone == "America/Chicago"
    assert options.strict_mapping is True


@pytest.mark.parametrize(
    ("zone", "effective"),
    [("UTC", "2024-01-01T12:00:00+00:00"), ("America/Chicago", "2024-01-01T12:00:00-06:00")],
)
def test_cli_default_timezone_sets_the_offset_of_local_times(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes], zone: str, effective: str
) -> None:
    path = tmp_path / "oru.hl7"
    path.write_bytes(ORU_LOCAL_TIME)
    assert main(["convert", "--data-only", "--hl7-default-timezone", zone, str(path)]) == 0
    bundle = documents(capsysbinary.readouterr()[0])[0]
    [observation] = [
        e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation"
    ]
    assert observation["effectiveDateTime"] == effective


def test_data_json_cannot_carry_is_reported_not_crashed() -> None:
    # A mapping defect that leaves a value orjson refuses (an int beyond 64 bits): that
    # message is reported, the next one is still printed.
    good = convert_message(GOOD, ConvertOptions())
    broken = dataclasses.replace(good, data={"resourceType": "Bundle", "total": 2**70})
    results = iter([Converted("a.hl7", 1, broken), Converted("a.hl7", 2, good)])
    out, err = io.BytesIO(), io.StringIO()
    status = write_results(results, out=out, err=err, json_lines=True)
    assert status == 1
    assert len(out.getvalue().splitlines()) == 1
    first = err.getvalue().splitlines()[0]
    assert first.startswith("a.hl7#1: the FHIR data cannot be written as JSON (a bridge defect)")
    assert str(2**70) not in err.getvalue()
