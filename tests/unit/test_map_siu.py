"""SIU (S12-S26) → Appointment: hand-written messages, the corpus, and
Microsoft's expected output for SIU-S12-01."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from adapters.hl7v2.er7 import Hl7Message, parse_message
from bridge.errors import DataTypeError, RequiredFieldMissing
from tests.unit.mapping_support import (
    MS_SAMPLES,
    assert_references_resolve,
    expected_bundle,
    files_of_type,
    normalize_and_validate,
    resources,
)

pytestmark = pytest.mark.timeout(30)

SIU_FILES = files_of_type(MS_SAMPLES.glob("*.hl7"), "SIU")
SOURCE = "urn:hl7bridge:test:mllp"
PID = "PID|1||MRN123^^^HOSP^MR||Doe^Jane||19800101|F"
CORE_SEGMENTS = ("SCH", "TQ1", "NTE", "RGS", "AIS", "AIG", "AIL", "AIP")


def msh(event: str, version: str) -> str:
    return (
        f"MSH|^~\\&|SCHED|HOSP|EHR|HOSP|20240301080000+0100||SIU^{event}^SIU_S12|C{event}|P|"
        f"{version}"
    )


def sch(**fields: str) -> str:
    """An SCH; keyword ``f<n>`` sets SCH-n."""
    values = {1: "P100^PLACER", 2: "F200^FILLER", 6: "NEW^New booking"}
    for key, value in fields.items():
        values[int(key[1:])] = value
    return "SCH|" + "|".join(values.get(n, "") for n in range(1, max(values) + 1))


def message(*segments: str, event: str = "S12", version: str = "2.5.1") -> Hl7Message:
    return parse_message("\r".join((msh(event, version), *segments)).encode())


def run(msg: Hl7Message, event_id: str = "evt-1") -> tuple[dict[str, Any], tuple[str, ...]]:
    return normalize_and_validate(msg, event_id=event_id, source=SOURCE)


def by_ref(bundle: dict[str, Any], ref: dict[str, str]) -> dict[str, Any]:
    [found] = [e["resource"] for e in bundle["entry"] if e["fullUrl"] == ref["reference"]]
    return found


def appointment_of(msg: Hl7Message, event_id: str = "evt-1") -> dict[str, Any]:
    bundle, _ = run(msg, event_id)
    [appt] = resources(bundle, "Appointment")
    return appt


def timed(*segments: str, event: str = "S12", **sch_fields: str) -> Hl7Message:
    """An SIU with a v2.6+ TQ1 timing, the patient and one location."""
    return message(
        sch(**sch_fields),
        "TQ1|1||||||20240315090000+0100|20240315094500+0100",
        PID,
        "RGS|1",
        *segments,
        "AIL|1||CLINIC^101^A",
        event=event,
    )


# --- status ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "filler_status", "status"),
    [
        ("S12", "Booked", "booked"),
        ("S12", "", "booked"),
        ("S12", "Pending", "pending"),
        ("S12", "Waitlist", "waitlist"),
        ("S13", "Booked", "booked"),
        ("S14", "Started", "checked-in"),
        ("S14", "Complete", "fulfilled"),
        ("S14", "Overbook", "booked"),
        ("S15", "Booked", "cancelled"),
        ("S15", "Cancelled", "cancelled"),
        ("S16", "Dc", "cancelled"),
        ("S17", "Deleted", "entered-in-error"),
        ("S17", "", "entered-in-error"),
        ("S26", "Noshow", "noshow"),
        ("S26", "Booked", "noshow"),
        ("S23", "", "proposed"),
        ("S14", "Blocked", "booked"),
    ],
)
def test_status_from_event_and_filler_status(event: str, filler_status: str, status: str) -> None:
    appt = appointment_of(timed(event=event, f25=filler_status))
    assert appt["status"] == status


def test_service_filler_status_when_sch25_is_empty() -> None:
    appt = appointment_of(timed("AIS|1||CBC^Blood count^L|||||||Pending"))
    assert appt["status"] == "pending"


def test_cancellation_reason_from_the_event_reason() -> None:
    appt = appointment_of(timed(event="S15", f6="PATREQ^Patient request^L"))
    assert appt["cancelationReason"]["coding"][0]["code"] == "PATREQ"
    booked = appointment_of(timed(event="S12", f6="PATREQ^Patient request^L"))
    assert "cancelationReason" not in booked


def test_reschedule_and_cancel_update_the_same_appointment() -> None:
    booked = appointment_of(timed(event="S12", f25="Booked"), "evt-a")
    moved = appointment_of(timed(event="S13", f25="Booked"), "evt-b")
    cancelled = appointment_of(timed(event="S15"), "evt-c")
    assert booked["id"] == moved["id"] == cancelled["id"]
    assert booked["identifier"] == [
        {
            "type": {
                "coding": [
                    {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "PLAC"}
                ]
            },
            "system": "urn:hl7bridge:authority:PLACER",
            "value": "P100",
        },
        {
            "type": {
                "coding": [
                    {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "FILL"}
                ]
            },
            "system": "urn:hl7bridge:authority:FILLER",
            "value": "F200",
        },
    ]


# --- timing ---------------------------------------------------------------------------


def test_v23_tq_timing_and_duration() -> None:
    msg = message(
        sch(f7="ROUTINE", f9="50", f10="min", f11="^^M50^200403150900-0500^200403150950-0500^R"),
        PID,
        "RGS|1",
        "AIP|1||D100^Smith^John|D^Doctor",
        event="S12",
        version="2.3",
    )
    appt = appointment_of(msg)
    assert appt["start"] == "2004-03-15T09:00:00-05:00"
    assert appt["end"] == "2004-03-15T09:50:00-05:00"
    assert appt["minutesDuration"] == 50
    assert appt["reasonCode"][0]["coding"] == [
        {
            "system": "http://terminology.hl7.org/CodeSystem/v2-0276",
            "code": "ROUTINE",
            "display": "Routine appointment - default if not valued",
        }
    ]
    assert appt["appointmentType"] == appt["reasonCode"][0]


def test_tq1_takes_precedence_over_sch11() -> None:
    appt = appointment_of(timed(f11="^^^202001010900+0100^202001011000+0100"))
    assert (appt["start"], appt["end"]) == (
        "2024-03-15T09:00:00+01:00",
        "2024-03-15T09:45:00+01:00",
    )


@pytest.mark.parametrize(
    ("duration", "units", "end", "minutes"),
    [
        ("2", "h^hours^ISO+", "2024-03-15T11:00:00+01:00", 120),
        ("90", "min^Minutes^ISO", "2024-03-15T10:30:00+01:00", 90),
        ("45", "", "2024-03-15T09:45:00+01:00", 45),
        ("1800", "s^seconds", "2024-03-15T09:30:00+01:00", 30),
        ("1.5", "hr", "2024-03-15T10:30:00+01:00", 90),
    ],
)
def test_v25_ais_timing_with_duration_units(
    duration: str, units: str, end: str, minutes: int
) -> None:
    msg = message(
        sch(),
        PID,
        "RGS|1",
        f"AIS|1|A|CT^CT scan^L|20240315090000+0100|||{duration}|{units}||Booked",
        event="S12",
        version="2.5",
    )
    appt = appointment_of(msg)
    assert appt["start"] == "2024-03-15T09:00:00+01:00"
    assert appt["end"] == end
    assert appt["minutesDuration"] == minutes
    assert appt["serviceType"] == [
        {
            "coding": [
                {"system": "urn:hl7bridge:codesystem:L", "code": "CT", "display": "CT scan"}
            ],
            "text": "CT scan",
        }
    ]


def test_sch_duration_gives_the_end_when_only_the_start_is_known() -> None:
    msg = message(sch(f9="1", f10="h"), "TQ1|1||||||20240315090000+0100", PID, event="S12")
    appt = appointment_of(msg)
    assert (appt["start"], appt["end"]) == (
        "2024-03-15T09:00:00+01:00",
        "2024-03-15T10:00:00+01:00",
    )
    assert appt["minutesDuration"] == 60


def test_tq1_occurrence_duration() -> None:
    msg = message(
        sch(), "TQ1|1||||||20240315090000+0100||||||20^min", PID, "AIL|1||ROOM1", event="S12"
    )
    appt = appointment_of(msg)
    assert appt["end"] == "2024-03-15T09:20:00+01:00"
    assert appt["minutesDuration"] == 20


def test_non_minute_duration_has_no_minutes_duration() -> None:
    appt = appointment_of(timed(f9="90", f10="s"))
    assert "minutesDuration" not in appt


def test_times_without_offset_take_the_default_timezone() -> None:
    msg = message(
        sch(), "TQ1|1||||||20240315090000|20240315094500", PID, "RGS|1", "AIL|1||ROOM1", event="S12"
    )
    appt = appointment_of(msg)
    assert (appt["start"], appt["end"]) == (
        "2024-03-15T09:00:00+00:00",
        "2024-03-15T09:45:00+00:00",
    )


def test_start_alone_goes_to_the_participants() -> None:
    msg = message(sch(), "TQ1|1||||||20240315090000+0100", PID, event="S12")
    appt = appointment_of(msg)
    assert "start" not in appt
    assert appt["participant"][0]["period"] == {"start": "2024-03-15T09:00:00+01:00"}


def test_bad_duration_is_rejected_with_its_location() -> None:
    with pytest.raises(DataTypeError) as caught:
        run(timed(f9="ten", f10="min"))
    assert caught.value.location == "SCH-9"


@pytest.mark.parametrize(
    "fields",
    [{"f9": "-30", "f10": "min"}, {"f9": "99999999", "f10": "wk"}],
)
def test_out_of_range_duration_is_rejected(fields: dict[str, str]) -> None:
    with pytest.raises(DataTypeError) as caught:
        run(timed(**fields))
    assert caught.value.location == "SCH-9"


def test_negative_start_offset_is_allowed_and_v28_units() -> None:
    msg = message(
        sch(),
        "TQ1|1||||||20240315090000+0100|20240315100000+0100",
        PID,
        "RGS|1",
        "AIP|1||D1^Doc^Dan|D^Doctor|||-15|min^minutes^UCUM|20|min^minutes^UCUM",
        event="S12",
        version="2.8",
    )
    [_, doctor] = appointment_of(msg)["participant"]
    assert doctor["period"] == {
        "start": "2024-03-15T08:45:00+01:00",
        "end": "2024-03-15T09:05:00+01:00",
    }


def test_bad_time_is_rejected_with_its_location() -> None:
    with pytest.raises(DataTypeError) as caught:
        run(message(sch(), "TQ1|1||||||20241345090000+0100", PID, event="S12"))
    assert caught.value.location == "TQ1-7"


# --- participants ---------------------------------------------------------------------


def test_participants_from_aip_ail_aig() -> None:
    bundle, _ = run(
        message(
            sch(),
            "TQ1|1||||||20240315090000+0100|20240315100000+0100",
            PID,
            "RGS|1",
            "AIS|1|A|COLO^Colonoscopy^L|20240315090000+0100|||60|min",
            "AIG|1|A|5001^Video scope^L^5002^Scope 2^L|101^Equipment^L|||||15|min|30|min||Booked",
            "AIL|1|A|GI^Room 4^^Main Hospital|C^Clinic^HL70305||20240315090000+0100|||60|min"
            "||Pending",
            "AIP|1|A|D100^Gast^Greg^^^^^^HOSP|GAS^Gastroenterologist^L||"
            "20240315091500+0100|||45|min||Cancelled",
            "AIP|2|D|D200^Nurse^Nina|NUR^Nurse^L",
            "AIP|3|A|D300^Anes^Ann|ANE^Anesthetist^L",
        )
    )
    [appt] = resources(bundle, "Appointment")
    patient, device, location, doctor, nurse, anes = appt["participant"]

    assert patient["status"] == "accepted"
    assert by_ref(bundle, patient["actor"])["resourceType"] == "Patient"

    scope = by_ref(bundle, device["actor"])
    assert scope["resourceType"] == "Device"
    assert scope["identifier"] == [
        {"system": "urn:hl7bridge:codesystem:L", "value": "5001"},
        {"system": "urn:hl7bridge:codesystem:L", "value": "5002"},
    ]
    assert [n["name"] for n in scope["deviceName"]] == ["Video scope", "Scope 2"]
    assert device["type"][0]["coding"][0]["code"] == "101"
    assert device["status"] == "accepted"
    # AIG-8 empty: the appointment start plus the 15 min offset, then 30 min.
    assert device["period"] == {
        "start": "2024-03-15T09:15:00+01:00",
        "end": "2024-03-15T09:45:00+01:00",
    }

    room = by_ref(bundle, location["actor"])
    assert room["resourceType"] == "Location"
    assert room["name"] == "GI Room 4"
    assert room["type"][0]["coding"][0] == {
        "system": "http://terminology.hl7.org/CodeSystem/v2-0305",
        "code": "C",
        "display": "Clinic",
    }
    assert location["status"] == "tentative"
    assert location["period"]["end"] == "2024-03-15T10:00:00+01:00"

    gast = by_ref(bundle, doctor["actor"])
    assert gast["name"][0]["family"] == "Gast"
    assert doctor["type"][0]["coding"][0]["display"] == "Gastroenterologist"
    assert doctor["status"] == "declined"
    assert doctor["period"] == {
        "start": "2024-03-15T09:15:00+01:00",
        "end": "2024-03-15T10:00:00+01:00",
    }
    assert nurse["status"] == "declined"  # AIP-2 segment action D
    assert anes["status"] == "accepted"  # no filler status, appointment booked
    assert appt["serviceType"][0]["coding"][0]["code"] == "COLO"
    assert_references_resolve(bundle)


def test_unconfirmed_appointment_resources_need_action() -> None:
    appt = appointment_of(timed("AIP|1||D100^Smith^John", f25="Pending"))
    assert [p["status"] for p in appt["participant"]] == [
        "accepted",
        "needs-action",
        "needs-action",
    ]


def test_deleted_service_is_left_out() -> None:
    appt = appointment_of(
        timed("AIS|1|A|A1^First^L", "AIS|2|D|B2^Second^L", "AIS|3|A|A1^First^L", "AIP|1||D1^X^Y")
    )
    assert [s["coding"][0]["code"] for s in appt["serviceType"]] == ["A1"]


def test_sch_contacts_are_information_only_participants() -> None:
    bundle, _ = run(
        timed(
            f12="C1^Placer^Pat",
            f13="^WPN^PH^^^555^1234567",
            f14="1 Main St^^Town^ST^12345",
            f16="C2^Filler^Fay",
            f17="(555)765-4321",
            f20="C3^Clerk^Cal",
        )
    )
    [appt] = resources(bundle, "Appointment")
    contacts = [p for p in appt["participant"] if p.get("required") == "information-only"]
    assert [p["type"][0].get("text") for p in contacts] == [
        "Placer contact",
        "Filler contact",
        None,
    ]
    assert contacts[2]["type"][0]["coding"][0]["code"] == "enterer"
    assert all("period" not in p for p in contacts)
    placer = by_ref(bundle, contacts[0]["actor"])
    assert placer["telecom"] == [{"system": "phone", "value": "(555) 1234567", "use": "work"}]
    assert placer["address"][0]["city"] == "Town"
    assert by_ref(bundle, contacts[1]["actor"])["telecom"][0]["value"] == "(555)765-4321"


def test_no_participant_at_all_is_rejected() -> None:
    with pytest.raises(RequiredFieldMissing):
        run(message(sch(), event="S12"))


def test_without_sch_the_message_is_rejected() -> None:
    with pytest.raises(RequiredFieldMissing) as caught:
        run(message(PID, event="S12"))
    assert caught.value.location == "SCH"


# --- other elements -------------------------------------------------------------------


def test_comment_order_numbers_and_appointment_type() -> None:
    bundle, unmapped = run(
        timed(
            "AIS|1||X^Y^L",
            "NTE|1||Bring \\T\\ wear loose clothes",
            f8="Tentative",
            f26="ORD1^PLACER",
            f27="FIL1^LAB",
        )
    )
    [appt] = resources(bundle, "Appointment")
    assert appt["appointmentType"]["coding"][0] == {
        "system": "http://terminology.hl7.org/CodeSystem/v2-0277",
        "code": "Tentative",
        "display": "A request for a tentative (e.g., penciled in) appointment",
    }
    assert appt["comment"] == "Bring & wear loose clothes"
    logical, literal = appt["basedOn"][:2], appt["basedOn"][2:]
    assert [b["identifier"]["value"] for b in logical] == ["ORD1", "FIL1"]
    assert all(b["type"] == "ServiceRequest" for b in logical)
    # AIS → ServiceRequest (IG AIS[ServiceRequest]), referenced literally.
    [request] = resources(bundle, "ServiceRequest")
    assert literal == [{"reference": f"urn:uuid:{request['id']}"}]
    assert request["code"]["coding"][0]["code"] == "X"
    assert request["identifier"] == [
        {"value": "X", "system": request["code"]["coding"][0]["system"]}
    ]
    assert (request["status"], request["intent"]) == ("active", "order")
    assert not [u for u in unmapped if u in CORE_SEGMENTS]


def test_notes_in_every_group_join_the_comment() -> None:
    appt = appointment_of(
        message(
            sch(),
            "TQ1|1||||||20240315090000+0100|20240315094500+0100",
            "NTE|1||First line~second line",
            PID,
            "RGS|1",
            "AIP|1||D1^Doc^Dan",
            "NTE|1||About the doctor",
        )
    )
    assert appt["comment"] == "First line\nsecond line\nAbout the doctor"


# --- corpus ---------------------------------------------------------------------------


def test_corpus_has_siu_messages() -> None:
    siu = [p for p in SIU_FILES if parse_message(p.read_bytes()).header.message_code == "SIU"]
    assert len(siu) == 15


@pytest.mark.parametrize("path", SIU_FILES, ids=lambda p: p.name)
def test_every_siu_corpus_message_maps_and_validates(path: Path) -> None:
    msg = parse_message(path.read_bytes())
    bundle, unmapped = run(msg, f"{msg.header.sender_key}|{msg.header.control_id}")
    [appt] = resources(bundle, "Appointment")
    assert appt["participant"][0]["actor"]["reference"] == bundle["entry"][1]["fullUrl"]
    assert "start" in appt and "end" in appt
    assert not [u for u in unmapped if u in CORE_SEGMENTS]
    assert_references_resolve(bundle)


def test_siu_s12_01_agrees_with_microsoft() -> None:
    expected = expected_bundle("SIU-S12-01")
    [ms_appt] = resources(expected, "Appointment")
    bundle, _ = run(parse_message((MS_SAMPLES / "SIU-S12-01.hl7").read_bytes()))
    [appt] = resources(bundle, "Appointment")

    assert appt["status"] == ms_appt["status"] == "booked"
    for key in ("start", "end"):
        assert datetime.fromisoformat(appt[key]) == datetime.fromisoformat(ms_appt[key])
    assert appt["minutesDuration"] == ms_appt["minutesDuration"] == 1
    assert [i["value"] for i in appt["identifier"]] == [i["value"] for i in ms_appt["identifier"]]
    # SCH-7 EMERGENCY: Microsoft's appointmentType, our reasonCode (IG SCH-7 →
    # reasonCode; appointmentType is SCH-8 "Normal").
    assert ms_appt["appointmentType"]["coding"][0]["code"] == "EMERGENCY"
    assert appt["reasonCode"][0]["coding"][0]["code"] == "EMERGENCY"
    assert appt["comment"].startswith(ms_appt["comment"])

    ms_by_kind: dict[str, dict[str, Any]] = {}
    for p in ms_appt["participant"]:
        ms_by_kind[p["actor"]["reference"].split("/")[0]] = p
    ours: dict[str, dict[str, Any]] = {}
    for p in appt["participant"]:
        if p.get("required") != "information-only":
            ours[by_ref(bundle, p["actor"])["resourceType"]] = p
    assert set(ours) == set(ms_by_kind) == {"Patient", "Device", "Location", "Practitioner"}
    for kind, p in ours.items():
        assert p["status"] == ms_by_kind[kind]["status"] == "accepted"
        if "type" in ms_by_kind[kind]:
            assert (
                p["type"][0]["coding"][0]["code"]
                == ms_by_kind[kind]["type"][0]["coding"][0]["code"]
            )
        if "period" in ms_by_kind[kind]:
            assert datetime.fromisoformat(p["period"]["start"]) == datetime.fromisoformat(
                ms_by_kind[kind]["period"]["start"]
            )
    assert by_ref(bundle, ours["Practitioner"]["actor"])["identifier"][0]["value"] == "1210"
    assert by_ref(bundle, ours["Device"]["actor"])["identifier"][0]["value"] == "5001"
    assert by_ref(bundle, ours["Location"]["actor"])["name"].startswith("055")


@pytest.mark.parametrize(
    ("event", "request_status"),
    [("S12", "active"), ("S15", "revoked"), ("S17", "entered-in-error"), ("S26", "revoked")],
)
def test_ais_service_request_per_service_follows_the_appointment(
    event: str, request_status: str
) -> None:
    """AIS → ServiceRequest (IG AIS[ServiceRequest]): one per service, AIS-4 and its
    duration → occurrencePeriod, referenced by Appointment.basedOn; a deleted AIS has none."""
    bundle, _ = run(
        timed(
            "AIS|1|A|76164006^Biopsy of colon^SCT|20240315090000+0100|||45|min",
            "AIS|2|D|42272-5^XR chest^LN",
            "AIS|3||58410-2^CBC^LN",
            event=event,
        )
    )
    [appt] = resources(bundle, "Appointment")
    requests = resources(bundle, "ServiceRequest")
    assert [r["code"]["coding"][0]["code"] for r in requests] == ["76164006", "58410-2"]
    assert appt["basedOn"] == [{"reference": f"urn:uuid:{r['id']}"} for r in requests]
    biopsy = requests[0]
    assert biopsy["identifier"] == [{"value": "76164006", "system": "http://snomed.info/sct"}]
    assert biopsy["occurrencePeriod"] == {
        "start": "2024-03-15T09:00:00+01:00",
        "end": "2024-03-15T09:45:00+01:00",
    }
    assert {r["status"] for r in requests} == {request_status}
    assert {r["intent"] for r in requests} == {"order"}
    [patient] = resources(bundle, "Patient")
    assert {r["subject"]["reference"] for r in requests} == {f"urn:uuid:{patient['id']}"}
    assert_references_resolve(bundle)


def test_patient_group_obx_is_an_observation() -> None:
    bundle, unmapped = run(
        message(
            sch(),
            "TQ1|1||||||20240315090000+0100|20240315094500+0100",
            PID,
            "OBX|1|NM|8867-4^Heart rate^LN||72|/min^^UCUM|60-120||||F",
            "RGS|1",
            "AIL|1||CLINIC^101^A",
        )
    )
    [obs] = resources(bundle, "Observation")
    assert obs["code"]["coding"][0]["code"] == "8867-4"
    assert obs["valueQuantity"]["value"] == 72
    assert obs["subject"]["reference"].startswith("urn:uuid:")
    assert "OBX" not in unmapped
    assert_references_resolve(bundle)
