"""The message Bundle's MessageHeader and Patient, for every corpus message."""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
from fhir.resources.R4B.bundle import Bundle
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.hl7v2.er7 import Hl7Message, parse_message, patient_key
from bridge.errors import BridgeError, DataTypeError
from bridge.normalize import normalize, patient_resource_id, to_fhir_bundle
from bridge.normalize.ids import NAMESPACE, uuid5_str

pytestmark = pytest.mark.timeout(30)

CORPUS = Path(__file__).resolve().parents[2].parent / "shared" / "corpus"
MS_DIR = CORPUS / "microsoft-fhir-converter" / "data" / "SampleData" / "Hl7v2"
LFH_DIR = CORPUS / "linuxforhealth-hl7v2-fhir-converter" / "src" / "test" / "resources"
CORPUS_FILES = sorted(MS_DIR.glob("*.hl7")) + sorted(LFH_DIR.glob("*.hl7"))
FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
SOURCE = "urn:hl7bridge:test:mllp"
MSH_251 = (
    "MSH|^~\\&|SENDAPP|SENDFAC|RECVAPP|RECVFAC|20240101120000+0100||ADT^A01^ADT_A01|CTRL1|P|2.5.1"
)


def parse(name: str) -> Hl7Message:
    return parse_message((MS_DIR / name).read_bytes())


def bundle_of(msg: Hl7Message, event_id: str = "evt-1") -> dict[str, Any]:
    return to_fhir_bundle(msg, event_id=event_id, source=SOURCE)


def patient_of(bundle: dict[str, Any]) -> dict[str, Any]:
    patients: list[dict[str, Any]] = [
        e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient"
    ]
    assert len(patients) == 1
    return patients[0]


def synthetic(*segments: str) -> Hl7Message:
    return parse_message("\r".join((MSH_251, *segments)).encode())


def test_corpus_has_messages_with_pid() -> None:
    with_pid = [p for p in CORPUS_FILES if parse_message(p.read_bytes()).segment("PID")]
    assert len(with_pid) >= 130


@pytest.mark.parametrize("path", CORPUS_FILES, ids=lambda p: p.name)
def test_every_corpus_bundle_validates_as_fhir_r4(path: Path) -> None:
    msg = parse_message(path.read_bytes())
    if msg.segment("PID") is None:
        pytest.skip("no PID segment")
    bundle = bundle_of(msg, event_id=f"{msg.header.sender_key}|{msg.header.control_id}")
    model = Bundle.model_validate(bundle)
    assert model.type == "message"
    header, patient = bundle["entry"][0], bundle["entry"][1]
    assert header["resource"]["resourceType"] == "MessageHeader"
    assert patient["resource"]["resourceType"] == "Patient"
    # fullUrl, resource id and MessageHeader.focus agree; the Patient is the first focus.
    assert header["resource"]["focus"][0] == {"reference": patient["fullUrl"]}
    for entry in bundle["entry"]:
        assert entry["fullUrl"] == f"urn:uuid:{entry['resource']['id']}"
        assert FHIR_ID.fullmatch(entry["resource"]["id"])
    assert FHIR_ID.fullmatch(bundle["id"])
    orjson.dumps(bundle)


def test_adt_a01_values() -> None:
    bundle = bundle_of(parse("ADT-A01-01.hl7"))
    header = bundle["entry"][0]["resource"]
    assert header["eventCoding"] == {
        "system": "http://terminology.hl7.org/CodeSystem/v2-0003",
        "code": "A01",
    }
    assert header["source"] == {"name": "ADTApp", "endpoint": "urn:hl7bridge:application:ADTApp"}
    assert header["sender"] == {"display": "GHHSFacility"}
    assert header["destination"] == [
        {
            "name": "EHRApp",
            "endpoint": "urn:hl7bridge:application:EHRApp",
            "receiver": {"display": "GHHRFacility"},
        }
    ]
    assert bundle["identifier"]["value"] == "MSG00001"
    assert {"system": "urn:hl7bridge:hl7v2:message-type", "code": "ADT^A01"} in bundle["meta"][
        "tag"
    ]
    assert bundle["meta"]["source"] == SOURCE

    patient = patient_of(bundle)
    assert patient["identifier"][0]["value"] == "PATID1234"
    assert patient["identifier"][0]["system"] == "urn:hl7bridge:authority:test1"
    assert patient["identifier"][0]["type"]["coding"][0]["code"] == "MR"
    assert patient["identifier"][1]["value"] == "123456789"
    assert patient["name"][0]["family"] == "EVERYMAN"
    assert patient["name"][0]["given"] == ["ADAM", "A"]
    assert patient["name"][0]["prefix"] == ["Dr."]
    assert patient["name"][0]["use"] == "usual"
    assert patient["name"][1] == {"family": "Josh", "given": ["stanley"], "use": "official"}
    assert patient["gender"] == "male"
    assert patient["birthDate"] == "1988-08-18"
    address = patient["address"][0]
    assert address["line"] == ["1000", "Hospital Lane", "Ste. 123"]
    assert (address["city"], address["state"], address["postalCode"]) == (
        "Ann Arbor",
        "MI",
        "99999",
    )
    assert address["country"] == "USA"
    assert address["type"] == "postal"
    # PID-13 78788788^^CP^5555^^^1111^^^^^2222: the IG's XTN map takes XTN-12 first.
    assert {"system": "phone", "value": "2222", "use": "mobile"} in patient["telecom"]
    # MSH-7 has no seconds: the timestamp is the conversion time, in UTC.
    assert bundle["timestamp"].endswith("Z")


def test_lab_oru_values() -> None:
    bundle = bundle_of(parse("LAB-ORU-1.hl7"))
    assert bundle["timestamp"] == "2014-10-06T06:45:00+07:00"
    assert bundle["entry"][0]["resource"]["eventCoding"]["code"] == "R01"
    assert "destination" in bundle["entry"][0]["resource"]
    patient = patient_of(bundle)
    assert patient["identifier"][0] == {
        "type": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]
        },
        "system": "urn:hl7bridge:authority:1",
        "value": "10006579",
    }
    assert [i["type"]["coding"][0]["code"] for i in patient["identifier"]] == ["MR", "SS"]
    assert patient["name"] == [{"family": "DUCK", "given": ["DONALD", "D"]}]
    assert patient["gender"] == "male"
    assert patient["birthDate"] == "1924-10-10"
    assert patient["telecom"] == [
        {"system": "phone", "value": "8885551212", "use": "home"},
        {"system": "phone", "value": "8885551212", "use": "work"},
    ]


def test_public_health_oru_values_with_oids() -> None:
    bundle = bundle_of(parse("ORU-R01-01.hl7"))
    header = bundle["entry"][0]["resource"]
    assert header["source"] == {
        "name": "IA PHIMS Stage",
        "endpoint": "urn:oid:2.16.840.1.114222.4.3.3.5.1.2",
    }
    assert header["destination"][0]["endpoint"] == "urn:oid:2.16.840.1.114222.4.3.3.19"
    patient = patient_of(bundle)
    assert patient["identifier"][0]["value"] == "14"
    assert patient["identifier"][0]["system"] == "urn:oid:2.16.840.1.114222.4.3.3.5.1.2"
    assert patient["identifier"][0]["type"]["coding"][0]["code"] == "PI"
    assert patient["name"] == [{"family": "Finn", "given": ["Huckleberry"], "use": "official"}]
    assert patient["gender"] == "male"
    assert patient["birthDate"] == "1963-08-15"
    assert patient["address"][0]["use"] == "home"
    assert patient["address"][0]["city"] == "GRINNELL"


def test_v23_message_values() -> None:
    patient = patient_of(bundle_of(parse("ADT01-23.hl7")))
    assert patient["name"][0]["family"] == "DUCK"
    assert patient["birthDate"] == "1924-10-10"


def test_ids_are_deterministic() -> None:
    msg = parse("ADT-A01-01.hl7")
    first, again = bundle_of(msg, "evt-1"), bundle_of(msg, "evt-1")
    other = bundle_of(msg, "evt-2")
    assert first["id"] == again["id"] == str(uuid.uuid5(NAMESPACE, "evt-1"))
    assert first["id"] != other["id"]
    assert first["entry"][0]["fullUrl"] != other["entry"][0]["fullUrl"]
    # The Patient id depends on the patient key only.
    assert patient_of(first)["id"] == patient_of(other)["id"]
    assert patient_of(first)["id"] == uuid5_str("Patient|test1|PATID1234")
    assert patient_of(first)["id"] == patient_resource_id("test1|PATID1234")
    assert patient_of(first)["id"] == patient_resource_id(str(patient_key(msg)))


def test_same_patient_in_two_messages_gets_the_same_id() -> None:
    a = synthetic("PID|1||42^^^HOSP^MR||Doe^Jane")
    b = parse_message(
        "\r".join((MSH_251.replace("CTRL1", "CTRL2"), "PID|1||42^^^HOSP^MR||Doe^Jane")).encode()
    )
    assert patient_of(bundle_of(a, "e1"))["id"] == patient_of(bundle_of(b, "e2"))["id"]


def test_uuid5_str_matches_the_standard_library() -> None:
    for name in ["", "a", "Patient|HOSP|42", "Müller" * 40]:
        assert uuid5_str(name) == str(uuid.uuid5(NAMESPACE, name))


def test_message_without_pid_has_only_a_message_header() -> None:
    msg = synthetic("EVN|A01|20240101")
    bundle = bundle_of(msg)
    assert [e["resource"]["resourceType"] for e in bundle["entry"]] == ["MessageHeader"]
    assert "focus" not in bundle["entry"][0]["resource"]
    Bundle.model_validate(bundle)


def test_pid_without_identifier_still_gets_a_deterministic_patient() -> None:
    bundle = bundle_of(synthetic("PID|1||||Doe^Jane||19800101|F"), "evt-9")
    patient = patient_of(bundle)
    assert "identifier" not in patient
    assert patient["id"] == uuid5_str("evt-9/Patient")
    assert patient["gender"] == "female"
    Bundle.model_validate(bundle)


@pytest.mark.parametrize(
    ("dob", "birth_date"),
    [
        ("1980", "1980"),
        ("198002", "1980-02"),
        ("19800229", "1980-02-29"),
        ("198002291230", "1980-02-29"),
        ("19800229123015.123-0500", "1980-02-29"),
        ("19800229^D", "1980-02-29"),
    ],
)
def test_birth_date_keeps_its_precision(dob: str, birth_date: str) -> None:
    patient = patient_of(bundle_of(synthetic(f"PID|1||1^^^H||Doe||{dob}")))
    assert patient["birthDate"] == birth_date


@pytest.mark.parametrize("dob", ["19810229", "19801301", "0000", "abc", "1980-01-01"])
def test_impossible_birth_date_is_a_data_type_error(dob: str) -> None:
    with pytest.raises(DataTypeError) as info:
        bundle_of(synthetic(f"PID|1||1^^^H||Doe||{dob}"))
    assert info.value.location == "PID-7"
    assert dob not in str(info.value)


@pytest.mark.parametrize(
    ("code", "gender"),
    [("M", "male"), ("F", "female"), ("O", "other"), ("U", "unknown"), ("A", "other"),
     ("N", "other"), ("X", None), ("", None)],
)  # fmt: skip
def test_gender_from_table_0001(code: str, gender: str | None) -> None:
    patient = patient_of(bundle_of(synthetic(f"PID|1||1^^^H||Doe|||{code}")))
    assert patient.get("gender") == gender


@pytest.mark.parametrize(
    ("xpn7", "use"),
    [("L", "official"), ("D", "usual"), ("M", "maiden"), ("N", "nickname"),
     ("A", "anonymous"), ("S", "anonymous"), ("U", None), ("", None)],
)  # fmt: skip
def test_name_use_from_table_0200(xpn7: str, use: str | None) -> None:
    patient = patient_of(bundle_of(synthetic(f"PID|1||1^^^H||Doe^Jane^^^^^{xpn7}")))
    assert patient["name"][0].get("use") == use


@pytest.mark.parametrize(
    ("cx4", "system"),
    [
        ("HOSP", "urn:hl7bridge:authority:HOSP"),
        ("&2.16.840.1.113883.19&ISO", "urn:oid:2.16.840.1.113883.19"),
        ("NS&2.16.840.1.113883.19&ISO", "urn:oid:2.16.840.1.113883.19"),
        ("2.16.840.1.113883.19", "urn:oid:2.16.840.1.113883.19"),
        ("NS&1.Edu&ISO", "urn:hl7bridge:authority:NS"),
        (
            "&4B7D1A8C-0E2F-4C3B-9A1D-2E3F4A5B6C7D&UUID",
            "urn:uuid:4b7d1a8c-0e2f-4c3b-9a1d-2e3f4a5b6c7d",
        ),
        ("&http://example.org/mrn&URI", "http://example.org/mrn"),
        ("Good Hospital", "urn:hl7bridge:authority:Good%20Hospital"),
        ("", None),
    ],
)
def test_identifier_system_from_assigning_authority(cx4: str, system: str | None) -> None:
    bundle = bundle_of(synthetic(f"PID|1||42^^^{cx4}^MR"))
    identifier = patient_of(bundle)["identifier"][0]
    assert identifier.get("system") == system
    assert identifier["value"] == "42"
    Bundle.model_validate(bundle)


def test_escapes_and_latin1_are_decoded_in_the_patient() -> None:
    data = (
        b"MSH|^~\\&|APP|FAC|R|F|20240101120000+0100||ADT^A01|C1|P|2.5.1||||||8859/1\r"
        b"PID|1||A\\T\\1^^^H||M\xfcller\\T\\Sohn^J\\X00FC\\rgen||19800101|M|||"
        b"Hauptstra\xdfe 1^^K\xf6ln^^50667^DE^H\r"
    )
    bundle = bundle_of(parse_message(data))
    patient = patient_of(bundle)
    assert patient["identifier"][0]["value"] == "A&1"
    assert patient["name"][0]["family"] == "Müller&Sohn"
    assert patient["address"][0] == {
        "line": ["Hauptstraße 1"],
        "city": "Köln",
        "postalCode": "50667",
        "country": "DE",
        "use": "home",
    }
    Bundle.model_validate(bundle)


def test_telecom_forms() -> None:
    pid = (
        "PID|1||1^^^H||Doe||||||||"
        "^PRN^PH^^1^555^1234567^89~^NET^Internet^jane@example.org~5551111^^FX~^^^^^905|"
        "5552222^WPN^BP"
    )
    patient = patient_of(bundle_of(synthetic(pid)))
    assert patient["telecom"] == [
        {"system": "phone", "value": "+1 (555) 1234567 x89", "use": "home"},
        {"system": "email", "value": "jane@example.org", "use": "home"},
        {"system": "fax", "value": "5551111", "use": "home"},
        {"system": "pager", "value": "5552222", "use": "work"},
    ]


def test_timestamp_with_fraction_and_negative_offset() -> None:
    msh = MSH_251.replace("20240101120000+0100", "20240101120000.1234-0330")
    bundle = bundle_of(parse_message(msh.encode()))
    assert bundle["timestamp"] == "2024-01-01T12:00:00.1234-03:30"


@pytest.mark.parametrize("msh7", ["20240101120000", "202401011200+0100", "20241301120000+0100", ""])
def test_timestamp_without_seconds_and_offset_is_now(msh7: str) -> None:
    msh = MSH_251.replace("20240101120000+0100", msh7)
    bundle = bundle_of(parse_message(msh.encode()))
    assert bundle["timestamp"].endswith("Z")
    Bundle.model_validate(bundle)


def test_unmapped_lists_untouched_segments_and_unread_fields() -> None:
    # ZZZ^Z01 has no family mapper: everything but MSH and the first PID is reported.
    msh = MSH_251.replace("ADT^A01^ADT_A01", "ZZZ^Z01")
    pid = "PID|1||1||DOE^J" + "|" * 22 + "A123"  # PID-27: veterans military status
    msg = parse_message("\r".join((msh, "EVN|A17", pid, "ZPI|1|x", "PID|2||2")).encode())
    result = normalize(msg, event_id="e", source=SOURCE)
    assert result.unmapped == ("EVN", "PID-27", "ZPI", "PID")
    header = result.bundle["entry"][0]["resource"]
    assert [e["valueString"] for e in header["extension"]] == list(result.unmapped)


def test_bundle_is_plain_json_data() -> None:
    bundle = bundle_of(parse("ADT-A01-01.hl7"))
    assert orjson.loads(orjson.dumps(bundle)) == bundle


_pid_text = st.text(
    alphabet=st.one_of(
        st.sampled_from(list("^~\\&.-+ 0123456789ABCDEFHLMNPRSTXZ")),
        st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n|"),
    ),
    max_size=80,
)


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=150, deadline=None)
@given(pid3=_pid_text, pid5=_pid_text, pid7=_pid_text, pid8=_pid_text, pid11=_pid_text,
       pid13=_pid_text, msh3=_pid_text)  # fmt: skip
def test_any_pid_gives_a_valid_bundle_or_a_data_type_error(
    pid3: str, pid5: str, pid7: str, pid8: str, pid11: str, pid13: str, msh3: str
) -> None:
    msh = MSH_251.replace("SENDAPP", msh3)
    pid = f"PID|1||{pid3}||{pid5}||{pid7}|{pid8}|||{pid11}||{pid13}"
    try:
        msg = parse_message(f"{msh}\r{pid}".encode())
    except BridgeError:
        return
    try:
        bundle = bundle_of(msg)
    except DataTypeError as exc:
        assert exc.location == "PID-7"
        return
    Bundle.model_validate(bundle)
