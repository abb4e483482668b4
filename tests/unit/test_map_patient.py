"""PID/PD1 → Patient: every element beyond the basics, with hand-written v2.3,
v2.5.1 and v2.8 messages; the FHIR values are asserted and every Bundle validated."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B.bundle import Bundle

from adapters.hl7v2.er7 import Hl7Message, parse_message, patient_key
from bridge.errors import DataTypeError
from bridge.normalize import normalize, patient_resource_id
from bridge.normalize.context import MappingContext, MappingOptions
from bridge.normalize.patient import (
    CDC_RACE_ETHNICITY,
    EXT_BIRTH_PLACE,
    EXT_BIRTH_TIME,
    EXT_CONGREGATION,
    EXT_MOTHERS_MAIDEN_NAME,
    EXT_RELIGION,
    SSN_SYSTEM,
    US_CORE_ETHNICITY,
    US_CORE_RACE,
    V3_MARITAL_STATUS,
    V3_NULL_FLAVOR,
    bcp47_tag,
    key_from_cx_list,
    patient_key_of,
)
from tests.unit.mapping_support import MS_SAMPLES, message, normalize_and_validate, resources

pytestmark = pytest.mark.timeout(30)

V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
BCP47 = "urn:ietf:bcp:47"

MSH = {
    "2.3": "MSH|^~\\&|REG|HOSP|EHR|HOSP|200501101200+0100||ADT^A28|C23|P|2.3",
    "2.5.1": "MSH|^~\\&|REG|HOSP|EHR|HOSP|20240101120000-0500||ADT^A28^ADT_A05|C251|P|2.5.1",
    "2.8": "MSH|^~\\&|REG|HOSP|EHR|HOSP|20240101120000+0200||ADT^A28^ADT_A05|C28|P|2.8",
}
VERSIONS = list(MSH)


def pid(**fields: str) -> str:
    """A PID with PID-3 and PID-5 set and ``f<n>=...`` fields filled in."""
    values = {3: "4711^^^HOSP^MR", 5: "DOE^JANE"}
    values.update({int(k[1:]): v for k, v in fields.items()})
    return "PID|" + "|".join(values.get(n, "") for n in range(1, max(values) + 1))


def run(*segments: str, version: str = "2.8") -> tuple[dict[str, Any], tuple[str, ...]]:
    """Map MSH + segments; return the Patient and the unmapped list (Bundle validated)."""
    bundle, unmapped = normalize_and_validate(message(MSH[version], *segments), event_id="evt")
    return resources(bundle, "Patient")[0], unmapped


def bundle_of(*segments: str, version: str = "2.8") -> dict[str, Any]:
    bundle, _ = normalize_and_validate(message(MSH[version], *segments), event_id="evt")
    return bundle


def extension(patient: dict[str, Any], url: str) -> dict[str, Any] | None:
    return next((x for x in patient.get("extension", []) if x["url"] == url), None)


# --- marital status (PID-16) ------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(
    ("pid16", "system", "code"),
    [
        ("M", V3_MARITAL_STATUS, "M"),
        ("S^Single^HL70002", V3_MARITAL_STATUS, "S"),
        ("D", V3_MARITAL_STATUS, "D"),
        ("W", V3_MARITAL_STATUS, "W"),
        ("A^Separated", V3_MARITAL_STATUS, "L"),
        ("P", V3_MARITAL_STATUS, "T"),
        ("N", V3_MARITAL_STATUS, "A"),
        ("B", V3_MARITAL_STATUS, "U"),
        ("U", V3_NULL_FLAVOR, "UNK"),
        ("O", V3_NULL_FLAVOR, "OTH"),
    ],
)
def test_marital_status_from_table_0002(version: str, pid16: str, system: str, code: str) -> None:
    patient, unmapped = run(pid(f16=pid16), version=version)
    assert patient["maritalStatus"]["coding"][0]["system"] == system
    assert patient["maritalStatus"]["coding"][0]["code"] == code
    assert "PID-16" not in unmapped


def test_marital_status_keeps_text_and_an_unmapped_code_as_sent() -> None:
    patient, _ = run(pid(f16="M^Married^HL70002^^^^^^Verheiratet"))
    assert patient["maritalStatus"]["text"] == "Verheiratet"
    patient, _ = run(pid(f16="Married"))  # free text in PID-16 (a real sender)
    assert patient["maritalStatus"] == {"coding": [{"code": "Married"}]}
    patient, _ = run(pid(f16="M^Married^L"))  # a local code system: not table 0002
    assert patient["maritalStatus"]["coding"][0]["system"] == "urn:hl7bridge:codesystem:L"


# --- language (PID-15) ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pid15", "expected"),
    [
        ("eng^English^HL70296", [{"system": BCP47, "code": "en", "display": "English"}]),
        ("EN", [{"system": BCP47, "code": "en"}]),
        ("spa", [{"system": BCP47, "code": "es"}]),
        ("es-mx^Spanish (Mexico)^ISO639", [
            {"system": BCP47, "code": "es-MX", "display": "Spanish (Mexico)"}
        ]),
        ("ara^^HL70296^eng^English^HL70296", [
            {"system": BCP47, "code": "ar"}, {"system": BCP47, "code": "en", "display": "English"}
        ]),
        ("xyz^Klingon^HL70296", [{"system": "http://terminology.hl7.org/CodeSystem/v2-0296",
                                  "code": "xyz", "display": "Klingon"}]),
        ("1", [{"code": "1"}]),
    ],
)  # fmt: skip
def test_language_as_bcp47_when_it_is_one(pid15: str, expected: list[dict[str, str]]) -> None:
    patient, unmapped = run(pid(f15=pid15))
    [communication] = patient["communication"]
    assert communication["preferred"] is True
    assert communication["language"]["coding"] == expected
    assert "PID-15" not in unmapped


@pytest.mark.parametrize(
    ("code", "tag"),
    [("en", "en"), ("EN-us", "en-US"), ("eng", "en"), ("ger", "de"), ("haw", "haw"),
     ("zh-Hant-TW", "zh-Hant-TW"), ("klingon", None), ("e", None), ("x1", None), ("", None)],
)  # fmt: skip
def test_bcp47_tag(code: str, tag: str | None) -> None:
    assert bcp47_tag(code) == tag


# --- race and ethnicity (PID-10, PID-22) ------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_race_as_us_core_extension(version: str) -> None:
    pid10 = "2106-3^White^HL70005~2028-9^Asian^CDCREC~2131-1^Other Race^HL70005~W^White^L"
    patient, unmapped = run(pid(f10=pid10), version=version)
    race = extension(patient, US_CORE_RACE)
    assert race is not None
    assert race["extension"] == [
        {"url": "ombCategory", "valueCoding": {"system": CDC_RACE_ETHNICITY, "code": "2106-3",
                                               "display": "White"}},
        {"url": "ombCategory", "valueCoding": {"system": CDC_RACE_ETHNICITY, "code": "2028-9",
                                               "display": "Asian"}},
        {"url": "detailed", "valueCoding": {"system": CDC_RACE_ETHNICITY, "code": "2131-1",
                                            "display": "Other Race"}},
        {"url": "text", "valueString": "White, Asian, Other Race, White"},
    ]  # fmt: skip
    assert "PID-10" not in unmapped


def test_race_that_is_not_a_cdc_code_is_kept_as_text() -> None:
    patient, _ = run(pid(f10="W"), version="2.3")
    assert extension(patient, US_CORE_RACE) == {
        "url": US_CORE_RACE,
        "extension": [{"url": "text", "valueString": "W"}],
    }


@pytest.mark.parametrize(
    ("pid22", "code", "text"),
    [
        ("H^Hispanic or Latino^HL70189", "2135-2", "Hispanic or Latino"),
        ("N^NOT HISPANIC OR LATINO^HL70189", "2186-5", "NOT HISPANIC OR LATINO"),
        ("2135-2^Hispanic^CDCREC", "2135-2", "Hispanic"),
        ("N", "2186-5", "N"),
        ("U^Unknown^HL70189", None, "Unknown"),
    ],
)
def test_ethnicity_as_us_core_extension(pid22: str, code: str | None, text: str) -> None:
    patient, unmapped = run(pid(f22=pid22))
    ethnicity = extension(patient, US_CORE_ETHNICITY)
    assert ethnicity is not None
    parts = {x["url"]: x for x in ethnicity["extension"]}
    assert parts["text"]["valueString"] == text
    if code is None:
        assert "ombCategory" not in parts
    else:
        assert parts["ombCategory"]["valueCoding"]["code"] == code
        assert parts["ombCategory"]["valueCoding"]["system"] == CDC_RACE_ETHNICITY
    assert "PID-22" not in unmapped


# --- birth time, death, multiple birth --------------------------------------------------


@pytest.mark.parametrize(
    ("version", "pid7", "birth_time"),
    [
        ("2.8", "198808181126+0215", "1988-08-18T11:26:00+02:15"),
        ("2.8", "19880818112630.25-0330", "1988-08-18T11:26:30.25-03:30"),
        # No offset on PID-7: the default time zone (UTC unless configured).
        ("2.8", "198808181126", "1988-08-18T11:26:00+00:00"),
        ("2.5.1", "198808181126", "1988-08-18T11:26:00+00:00"),
        ("2.3", "19880818112600", "1988-08-18T11:26:00+00:00"),
        ("2.8", "19880818", None),
    ],
)
def test_birth_time_extension(version: str, pid7: str, birth_time: str | None) -> None:
    patient, _ = run(pid(f7=pid7), version=version)
    assert patient["birthDate"] == "1988-08-18"
    if birth_time is None:
        assert "_birthDate" not in patient
    else:
        assert patient["_birthDate"] == {
            "extension": [{"url": EXT_BIRTH_TIME, "valueDateTime": birth_time}]
        }


@pytest.mark.parametrize(
    ("zone", "pid7", "birth_time"),
    [
        ("America/New_York", "198808181126", "1988-08-18T11:26:00-04:00"),  # daylight saving
        ("America/New_York", "198801181126", "1988-01-18T11:26:00-05:00"),
        ("Europe/Berlin", "198801181126", "1988-01-18T11:26:00+01:00"),
        ("Europe/Berlin", "198801181126-0300", "1988-01-18T11:26:00-03:00"),  # sent wins
    ],
)
def test_birth_time_without_offset_is_in_the_configured_zone(
    zone: str, pid7: str, birth_time: str
) -> None:
    msg = parse_message(f"{MSH['2.8']}\r{pid(f7=pid7)}".encode())
    options = MappingOptions(default_timezone=zone)
    bundle = normalize(msg, event_id="e", source="urn:test", options=options).bundle
    Bundle.model_validate(bundle)
    patient = bundle["entry"][1]["resource"]
    assert patient["_birthDate"]["extension"][0]["valueDateTime"] == birth_time


@pytest.mark.parametrize("version", VERSIONS)
def test_deceased_date_time(version: str) -> None:
    patient, unmapped = run(pid(f29="20080825111630+0115", f30="Y"), version=version)
    assert patient["deceasedDateTime"] == "2008-08-25T11:16:30+01:15"
    assert "deceasedBoolean" not in patient
    assert "PID-29" not in unmapped
    assert "PID-30" not in unmapped


@pytest.mark.parametrize(
    ("pid30", "deceased"), [("Y", True), ("N", False), ("YES", True), ("NO", False)]
)
def test_deceased_indicator(pid30: str, deceased: bool) -> None:
    patient, unmapped = run(pid(f30=pid30))
    assert patient["deceasedBoolean"] is deceased
    assert "PID-30" not in unmapped


def test_unknown_deceased_indicator_is_reported_not_guessed() -> None:
    patient, unmapped = run(pid(f30="X"))
    assert "deceasedBoolean" not in patient
    assert "PID-30" in unmapped


def test_deceased_date_without_offset_is_in_the_default_zone() -> None:
    patient, _ = run(pid(f29="200808251116"), version="2.5.1")
    assert patient["deceasedDateTime"] == "2008-08-25T11:16:00+00:00"
    patient, _ = run(pid(f29="20080825"), version="2.5.1")
    assert patient["deceasedDateTime"] == "2008-08-25"


def test_bad_death_date_is_a_data_type_error() -> None:
    with pytest.raises(DataTypeError) as info:
        run(pid(f29="20081325"))
    assert info.value.location == "PID-29"


@pytest.mark.parametrize(
    ("f24", "f25", "expected", "unread"),
    [
        ("Y", "", {"multipleBirthBoolean": True}, []),
        ("N", "", {"multipleBirthBoolean": False}, []),
        ("Y", "2", {"multipleBirthInteger": 2}, []),
        ("N", "2", {"multipleBirthInteger": 2}, []),
        ("", "3", {"multipleBirthInteger": 3}, []),
        ("", "0", {}, ["PID-25"]),
        ("maybe", "", {}, ["PID-24"]),
    ],
)
def test_multiple_birth(f24: str, f25: str, expected: dict[str, Any], unread: list[str]) -> None:
    patient, unmapped = run(pid(f24=f24, f25=f25))
    got = {k: v for k, v in patient.items() if k.startswith("multipleBirth")}
    assert got == expected
    assert [u for u in unmapped if u in ("PID-24", "PID-25")] == unread


def test_bad_birth_order_is_a_data_type_error() -> None:
    with pytest.raises(DataTypeError) as info:
        run(pid(f25="second"))
    assert info.value.location == "PID-25"
    assert "second" not in str(info.value)


# --- identifiers: SSN, driver's licence ---------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_ssn_identifier(version: str) -> None:
    patient, unmapped = run(pid(f19="123-45-6789"), version=version)
    assert patient["identifier"][-1] == {
        "type": {"coding": [{"system": V2_0203, "code": "SS"}]},
        "system": SSN_SYSTEM,
        "value": "123-45-6789",
    }
    assert patient["identifier"][0]["value"] == "4711"  # PID-3 stays first
    assert "PID-19" not in unmapped


def test_drivers_licence_identifier() -> None:
    patient, unmapped = run(pid(f20="DLN-123^NC^20290123"), version="2.5.1")
    assert patient["identifier"][-1] == {
        "type": {"coding": [{"system": V2_0203, "code": "DL"}]},
        "system": "urn:hl7bridge:authority:NC",
        "value": "DLN-123",
        "period": {"end": "2029-01-23"},
    }
    assert "PID-20" not in unmapped


# --- extensions: mother's maiden name, religion, birth place ------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_mothers_maiden_name(version: str) -> None:
    patient, unmapped = run(pid(f6="O\\T\\BRIEN^Mary"), version=version)
    assert extension(patient, EXT_MOTHERS_MAIDEN_NAME) == {
        "url": EXT_MOTHERS_MAIDEN_NAME,
        "valueString": "O&BRIEN",
    }
    assert all(n.get("use") != "maiden" for n in patient["name"])
    assert "PID-6" not in unmapped


def test_religion_and_birth_place() -> None:
    patient, unmapped = run(pid(f17="CAT^Catholic^HL70006", f23="St. Mary\\S\\s Hospital"))
    assert extension(patient, EXT_RELIGION) == {
        "url": EXT_RELIGION,
        "valueCodeableConcept": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/v2-0006",
                    "code": "CAT",
                    "display": "Catholic",
                }
            ],
            "text": "Catholic",
        },
    }
    assert extension(patient, EXT_BIRTH_PLACE) == {
        "url": EXT_BIRTH_PLACE,
        "valueAddress": {"text": "St. Mary^s Hospital"},
    }
    assert "PID-17" not in unmapped
    assert "PID-23" not in unmapped


def test_alias_is_an_extra_name() -> None:
    patient, _ = run(pid(f9="SMITH^JANE^^^^^A"))
    assert patient["name"] == [
        {"family": "DOE", "given": ["JANE"]},
        {"family": "SMITH", "given": ["JANE"], "use": "anonymous"},
    ]


def test_last_update_is_meta_last_updated_only_when_an_instant() -> None:
    patient, unmapped = run(pid(f33="20240102030405+0100"))
    assert patient["meta"] == {"lastUpdated": "2024-01-02T03:04:05+01:00"}
    assert "PID-33" not in unmapped
    patient, unmapped = run(pid(f33="202401020304"))
    assert "meta" not in patient
    assert "PID-33" in unmapped


# --- PD1 --------------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_primary_care_from_pd1(version: str) -> None:
    pd1 = "PD1|||GOOD PRACTICE^^^^^^^^^GP1|88^Hippo^Harold^^^Dr^^^NPI||||||||||St. Mark"
    bundle = bundle_of(pid(), pd1, version=version)
    resources = {e["fullUrl"]: e["resource"] for e in bundle["entry"]}
    patient = bundle["entry"][1]["resource"]
    assert patient["resourceType"] == "Patient"  # before the GP it references
    gps = [resources[g["reference"]] for g in patient["generalPractitioner"]]
    assert gps[0]["resourceType"] == "Organization"
    assert gps[0]["name"] == "GOOD PRACTICE"
    assert gps[1]["resourceType"] == "Practitioner"
    assert gps[1]["identifier"][0]["value"] == "88"
    assert gps[1]["name"][0]["family"] == "Hippo"
    assert extension(patient, EXT_CONGREGATION) == {
        "url": EXT_CONGREGATION,
        "valueString": "St. Mark",
    }


def test_pd1_fields_not_carried_are_reported() -> None:
    msg = parse_message(f"{MSH['2.8']}\r{pid()}\rPD1|S^^ACR||||||||||||||||20150202".encode())
    result = normalize(msg, event_id="e", source="urn:test")
    assert "PD1-1" in result.unmapped
    assert "PD1-17" in result.unmapped
    assert "PD1" not in result.unmapped


# --- everything together; escapes and charsets ----------------------------------------------


def test_v23_pid_with_every_element_and_latin1() -> None:
    data = (
        b"MSH|^~\\&|REG|HOSP|EHR|HOSP|200501101200+0100||ADT^A28|C1|P|2.3||||||8859/1\r"
        b"PID|1|EXT1^^^HOSP|4711^^^HOSP^MR||M\xdcLLER^J\xfcRGEN^^^Dr.||19700401|M||2106-3|"
        b"Hauptstr. 1^^K\xf6ln^^50667^DE^H||0221-123^PRN^PH|0221-456^WPN^PH|ger|M|CAT|"
        b"A-9|123-45-6789|||N|K\xf6ln|Y|2|||||N\r"
    )
    result = normalize(parse_message(data), event_id="e", source="urn:test")
    Bundle.model_validate(result.bundle)
    patient = result.bundle["entry"][1]["resource"]
    assert patient["name"][0] == {"family": "MÜLLER", "given": ["JüRGEN"], "prefix": ["Dr."]}
    assert [i["value"] for i in patient["identifier"]] == ["4711", "EXT1", "123-45-6789"]
    assert patient["communication"][0]["language"]["coding"] == [{"system": BCP47, "code": "de"}]
    assert patient["maritalStatus"]["coding"][0]["code"] == "M"
    assert patient["multipleBirthInteger"] == 2
    assert patient["deceasedBoolean"] is False
    assert extension(patient, EXT_BIRTH_PLACE) == {
        "url": EXT_BIRTH_PLACE,
        "valueAddress": {"text": "Köln"},
    }
    # The account number is not a Patient element: it is the Account's identifier.
    [account] = [e["resource"] for e in result.bundle["entry"]
                 if e["resource"]["resourceType"] == "Account"]  # fmt: skip
    assert account["subject"] == [{"reference": f"urn:uuid:{patient['id']}"}]
    assert [i["value"] for i in account["identifier"]] == ["A-9"]
    for n in (10, 15, 16, 17, 18, 19, 22, 23, 24, 25, 30):
        assert f"PID-{n}" not in result.unmapped


def test_corpus_a01_patient_elements() -> None:
    msg = parse_message((MS_SAMPLES / "ADT-A01-01.hl7").read_bytes())
    result = normalize(msg, event_id="e", source="urn:test")
    patient = result.bundle["entry"][1]["resource"]
    # Microsoft's expected output agrees on these.
    assert patient["maritalStatus"]["coding"][0]["code"] == "M"
    assert patient["multipleBirthInteger"] == 2
    assert patient["_birthDate"]["extension"][0]["valueDateTime"] == "1988-08-18T11:26:00+02:15"
    assert patient["communication"][0]["language"]["coding"][0] == {"system": BCP47, "code": "ar"}
    race = extension(patient, US_CORE_RACE)
    assert race is not None
    assert [x["valueCoding"]["code"] for x in race["extension"][:2]] == ["2106-3", "2028-9"]
    ethnicity = extension(patient, US_CORE_ETHNICITY)
    assert ethnicity is not None
    assert ethnicity["extension"][0]["valueCoding"]["code"] == "2186-5"
    assert patient["deceasedDateTime"] == "2008-08-25T11:16:30+01:15"


# --- identity ---------------------------------------------------------------------------


WITH_PID = [p for p in sorted(MS_SAMPLES.glob("*.hl7")) if b"\nPID|" in p.read_bytes()]


@pytest.mark.parametrize("path", WITH_PID, ids=lambda p: p.name)
def test_patient_key_of_first_pid_is_the_kafka_key(path: Path) -> None:
    msg = parse_message(path.read_bytes())
    ctx = MappingContext(msg, "e", MappingOptions())
    first = ctx.first("PID")
    assert first is not None
    assert patient_key_of(ctx, first) == patient_key(msg)
    raw = first.fields[3] if len(first.fields) > 3 else ""
    assert key_from_cx_list(ctx, raw) == patient_key(msg)


def test_key_from_cx_list_rules() -> None:
    msg: Hl7Message = parse_message(f"{MSH['2.8']}\r{pid()}".encode())
    ctx = MappingContext(msg, "e", MappingOptions())
    assert key_from_cx_list(ctx, "56789^^^BCBS^MR") == "BCBS|56789"
    assert key_from_cx_list(ctx, "^^^X~77^^^&1.2.3&ISO") == "1.2.3|77"
    assert key_from_cx_list(ctx, "A\\T\\1") == "|A&1"
    assert key_from_cx_list(ctx, "") is None
    assert patient_resource_id("BCBS|56789") != patient_resource_id("BCBS|56788")


# --- telecom (PID-13/14/40, the IG's XTN[ContactPoint]) --------------------------------


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(
    ("pid13", "expected"),
    [
        # XTN-12 (unformatted number) is the value when valued, over XTN-1 and XTN-7.
        ("78788788^^CP^^^^1111^^^^^5552222", {"system": "phone", "value": "5552222",
                                             "use": "mobile"}),
        # No XTN-12: the parts 5-8 when XTN-7 (local number) is valued, before XTN-1.
        ("(270)600-9800^PRN^PH^^1^270^6009800^12",
         {"system": "phone", "value": "+1 (270) 6009800 x12", "use": "home"}),
        ("^PRN^PH^^^270^6009800", {"system": "phone", "value": "(270) 6009800",
                                   "use": "home"}),
        # Neither XTN-7 nor XTN-12: XTN-1.
        ("(555)555-1234^WPN^PH", {"system": "phone", "value": "(555)555-1234", "use": "work"}),
        ("555\\T\\1234", {"system": "phone", "value": "555&1234", "use": "home"}),
        # An e-mail is XTN-4 (XTN-12 does not apply), else XTN-1.
        ("^NET^Internet^jane@example.org^^^^^^^^5550000",
         {"system": "email", "value": "jane@example.org", "use": "home"}),
        ("89898989^WPN^Internet", {"system": "email", "value": "89898989", "use": "work"}),
    ],
)  # fmt: skip
def test_xtn_value_follows_the_ig(version: str, pid13: str, expected: dict[str, str]) -> None:
    patient, unmapped = run(pid(f13=pid13), version=version)
    assert patient["telecom"] == [expected]
    assert "PID-13" not in unmapped


def test_pid40_telecom_v28() -> None:
    patient, unmapped = run(
        pid(
            f13="^PRN^PH^^^270^6009800",
            f40="^NET^Internet^jane@example.org~^PRN^CP^^^^^^^^^5551234",
        )
    )
    assert patient["telecom"] == [
        {"system": "phone", "value": "(270) 6009800", "use": "home"},
        {"system": "email", "value": "jane@example.org"},  # NET says no use
        {"system": "phone", "value": "5551234", "use": "mobile"},
    ]
    assert "PID-40" not in unmapped


def test_pid40_repeating_pid13_is_not_duplicated() -> None:
    patient, _ = run(pid(f13="^PRN^PH^^^^^^^^^5551234", f40="^PRN^PH^^^^^^^^^5551234"))
    assert patient["telecom"] == [{"system": "phone", "value": "5551234", "use": "home"}]


# --- PID-21 → mother RelatedPerson ----------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_pid21_mother_related_person(version: str) -> None:
    bundle = bundle_of(pid(f21="M-778^^^HOSP^MR~123-45-6789^^^SSA^SS"), version=version)
    resources = [e["resource"] for e in bundle["entry"]]
    [patient] = [r for r in resources if r["resourceType"] == "Patient"]
    [mother] = [r for r in resources if r["resourceType"] == "RelatedPerson"]
    assert mother["patient"] == {"reference": f"urn:uuid:{patient['id']}"}
    assert mother["relationship"] == [
        {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/v3-RoleCode",
                    "code": "MTH",
                    "display": "mother",
                }
            ]
        }
    ]
    assert [(x["value"], x["type"]["coding"][0]["code"]) for x in mother["identifier"]] == [
        ("M-778", "MR"),
        ("123-45-6789", "SS"),
    ]
    assert mother["identifier"][0]["system"] == "urn:hl7bridge:authority:HOSP"
    # The mother of one patient keeps one id across messages.
    again = bundle_of(pid(f21="M-778^^^HOSP^MR"), version=version)
    [same] = [
        e["resource"] for e in again["entry"] if e["resource"]["resourceType"] == "RelatedPerson"
    ]
    assert same["id"] == mother["id"]
    header = bundle["entry"][0]["resource"]
    assert {"reference": f"urn:uuid:{mother['id']}"} in header["focus"]
    assert not [x for x in header.get("extension", []) if x["valueString"] == "PID-21"]


def test_pid21_without_an_id_number_makes_no_related_person() -> None:
    bundle = bundle_of(pid(f21="^^^HOSP^MR"))
    assert not [e for e in bundle["entry"] if e["resource"]["resourceType"] == "RelatedPerson"]
