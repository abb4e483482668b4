"""PID (and PD1) → Patient, shared by every message family.

Follows the v2-to-FHIR IG's PID[Patient] and PD1[Patient] maps. The Patient id
is derived from the patient key (first PID-3 identifier with its authority), so
every message about one patient yields the same Patient id; :func:`patient_key_of`
gives that key for any PID, and :func:`key_from_cx_list` for any CX list (MRG-1
names the Patient a merge retires, with the same id derivation).

What PID carries and where it goes:

========  =========================================================================
PID-2/3/4 ``identifier`` (CX; PID-3 first)
PID-5/9   ``name`` (PID-9, the alias, after the names of PID-5)
PID-6     extension ``patient-mothersMaidenName`` (the family name of XPN-1)
PID-7     ``birthDate``; with a time of day also ``_birthDate`` extension
          ``patient-birthTime`` (dateTime; offset kept, else the default time zone's)
PID-8     ``gender`` (table 0001)
PID-10    extension ``us-core-race`` (OMB category / detailed CDC code, and text)
PID-11    ``address``
PID-13/14 ``telecom`` (home / work); PID-40 ``telecom`` (v2.7+)
PID-15    ``communication[].language`` (BCP-47 where the code is a language tag
          or an ISO 639-2 code with a 639-1 equivalent), ``preferred`` true
PID-16    ``maritalStatus`` (table 0002 → v3-MaritalStatus, the IG's ConceptMap;
          an unmapped value keeps its own coding and text)
PID-17    extension ``patient-religion``
PID-19    ``identifier`` type SS, system ``http://hl7.org/fhir/sid/us-ssn``
PID-20    ``identifier`` type DL (DLN: number, issuing state, expiry → period.end)
PID-21    a RelatedPerson (relationship MTH, identifier; the IG's CX[RelatedPerson-Mother])
PID-22    extension ``us-core-ethnicity`` (table 0189 H/N or CDC codes, and text)
PID-23    extension ``patient-birthPlace`` (address text)
PID-24/25 ``multipleBirthInteger`` (PID-25) else ``multipleBirthBoolean`` (PID-24)
PID-29/30 ``deceasedDateTime`` (PID-29) else ``deceasedBoolean`` (PID-30 Y/N)
PID-33    ``meta.lastUpdated`` when it is an instant (seconds and offset)
PD1-3/4   ``generalPractitioner`` (Organization / Practitioner)
PD1-14    extension ``patient-congregation``
========  =========================================================================

Fields not in this table stay unread and are reported by ``ctx.unmapped()``;
a PID-30, PID-33 or PD1 value this module cannot carry is left unread too.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from itertools import compress
from typing import Any, Final, cast

import orjson

from adapters.hl7v2.er7 import Hl7Message, patient_identifiers, patient_key_from
from bridge.errors import DataTypeError

from . import datatypes as dt
from .context import Components, MappingContext, Segment
from .ids import patient_resource_id, uuid5_str

#: HL7 table 0001 (administrative sex) → FHIR administrative-gender.
GENDER: Final[dict[str, str]] = {
    "M": "male",
    "F": "female",
    "O": "other",
    "U": "unknown",
    "A": "other",
    "N": "other",
}

V3_MARITAL_STATUS: Final = "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus"
V3_NULL_FLAVOR: Final = "http://terminology.hl7.org/CodeSystem/v3-NullFlavor"
V3_ROLE_CODE: Final = "http://terminology.hl7.org/CodeSystem/v3-RoleCode"

#: Table 0002 → v3-MaritalStatus (or v3-NullFlavor), the IG's ConceptMap
#: table-hl70002-to-v3-maritalstatus: (system, code, display).
MARITAL_STATUS: Final[dict[str, tuple[str, str, str]]] = {
    "A": (V3_MARITAL_STATUS, "L", "Legally Separated"),
    "E": (V3_MARITAL_STATUS, "L", "Legally Separated"),
    "D": (V3_MARITAL_STATUS, "D", "Divorced"),
    "M": (V3_MARITAL_STATUS, "M", "Married"),
    "S": (V3_MARITAL_STATUS, "S", "Never Married"),
    "W": (V3_MARITAL_STATUS, "W", "Widowed"),
    "C": (V3_MARITAL_STATUS, "C", "Common Law"),
    "G": (V3_MARITAL_STATUS, "T", "Domestic partner"),
    "P": (V3_MARITAL_STATUS, "T", "Domestic partner"),
    "R": (V3_MARITAL_STATUS, "T", "Domestic partner"),
    "N": (V3_MARITAL_STATUS, "A", "Annulled"),
    "I": (V3_MARITAL_STATUS, "I", "Interlocutory"),
    "B": (V3_MARITAL_STATUS, "U", "unmarried"),
    "U": (V3_NULL_FLAVOR, "UNK", "unknown"),
    "O": (V3_NULL_FLAVOR, "OTH", "other"),
    "T": (V3_NULL_FLAVOR, "NAVU", "Not available"),
}

EXT_BIRTH_TIME: Final = "http://hl7.org/fhir/StructureDefinition/patient-birthTime"
EXT_MOTHERS_MAIDEN_NAME: Final = "http://hl7.org/fhir/StructureDefinition/patient-mothersMaidenName"
EXT_RELIGION: Final = "http://hl7.org/fhir/StructureDefinition/patient-religion"
EXT_BIRTH_PLACE: Final = "http://hl7.org/fhir/StructureDefinition/patient-birthPlace"
EXT_CONGREGATION: Final = "http://hl7.org/fhir/StructureDefinition/patient-congregation"
US_CORE_RACE: Final = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race"
US_CORE_ETHNICITY: Final = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-ethnicity"
#: CDC Race & Ethnicity code system (PHIN VADS), used by US Core.
CDC_RACE_ETHNICITY: Final = "urn:oid:2.16.840.1.113883.6.238"
SSN_SYSTEM: Final = "http://hl7.org/fhir/sid/us-ssn"
BCP47: Final = "urn:ietf:bcp:47"

#: The five OMB race categories (US Core ``ombCategory``).
OMB_RACE: Final[dict[str, str]] = {
    "1002-5": "American Indian or Alaska Native",
    "2028-9": "Asian",
    "2054-5": "Black or African American",
    "2076-8": "Native Hawaiian or Other Pacific Islander",
    "2106-3": "White",
}
#: The two OMB ethnicity categories, and table 0189 (ethnic group) codes for them.
OMB_ETHNICITY: Final[dict[str, str]] = {
    "2135-2": "Hispanic or Latino",
    "2186-5": "Not Hispanic or Latino",
}
ETHNIC_GROUP_0189: Final[dict[str, str]] = {"H": "2135-2", "N": "2186-5"}
#: Coding systems (CWE-3) under which a race/ethnicity code is read as a CDC code.
_CDC_SYSTEMS: Final = frozenset(
    {"", "HL70005", "HL70189", "CDCREC", "2.16.840.1.113883.6.238", CDC_RACE_ETHNICITY}
)
_CDC_CODE: Final = re.compile(r"\d{4}-\d")

#: ISO 639-2 (and table 0296 upper-case) language codes → the ISO 639-1 code
#: BCP-47 requires when one exists ("eng" is not a valid language tag, "en" is).
ISO639_2_TO_1: Final[dict[str, str]] = {
    "ara": "ar", "chi": "zh", "zho": "zh", "cze": "cs", "ces": "cs", "dan": "da",
    "dut": "nl", "nld": "nl", "eng": "en", "fin": "fi", "fre": "fr", "fra": "fr",
    "ger": "de", "deu": "de", "gre": "el", "ell": "el", "heb": "he", "hin": "hi",
    "hun": "hu", "ind": "id", "ita": "it", "jpn": "ja", "kor": "ko", "nor": "no",
    "per": "fa", "fas": "fa", "pol": "pl", "por": "pt", "rum": "ro", "ron": "ro",
    "rus": "ru", "spa": "es", "swe": "sv", "tha": "th", "tur": "tr", "ukr": "uk",
    "urd": "ur", "vie": "vi", "tgl": "tl", "som": "so", "amh": "am", "ben": "bn",
    "pan": "pa", "guj": "gu", "tam": "ta", "tel": "te", "hmn": "hmn", "haw": "haw",
}  # fmt: skip
_DIGITS: Final = re.compile(r"[0-9]+")
_MAX_INT: Final = 2_147_483_647  # FHIR integer: 32-bit signed
_LANGUAGE_TAG: Final = re.compile(r"[A-Za-z]{2,3}(?:-[A-Za-z0-9]{1,8})*")
#: Code systems (CWE-3) under which a PID-15 code is read as a language code.
_LANGUAGE_SYSTEMS: Final = frozenset({"", "HL70296", "ISO639", "ISO+", "ISO639-1", "ISO639-2"})

_PD1_STOP: Final = frozenset({"PID", "MRG", "PV1", "NK1", "ORC", "OBR", "RXA", "SCH", "TXA"})


def map_patient(ctx: MappingContext, pid: Segment, *, primary: bool = True) -> str:
    """Add the Patient of ``pid`` to the Bundle; return its reference.

    ``primary`` (the first PID, mapped by the framework) also sets
    ``ctx.patient_ref``; a later PID (the repeating groups of A40, A41, A47)
    is mapped with ``primary=False`` and leaves it alone.
    """
    key = patient_key_of(ctx, pid)
    if key:
        patient_id = patient_resource_id(key)
    else:
        patient_id = ctx.resource_id("Patient" if primary else f"Patient/{pid.index}")
    patient: dict[str, Any] = {"resourceType": "Patient", "id": patient_id}
    # Added first so it is the Bundle's first entry after the MessageHeader, ahead of
    # the practitioners and organizations it references; filled in below.
    reference = ctx.add(patient)
    pid.consume(1)  # set id

    # Most PID fields are empty in most messages: find the valued ones in one pass
    # (C-speed) and call the mappers of those only (hot path).
    fields = pid.fields
    has = frozenset(compress(range(len(fields)), fields)).__contains__
    found = _identifiers(ctx, pid, has)
    if found:
        patient["identifier"] = found

    names = [x for c in pid.each(5) if (x := dt.human_name(c))] if has(5) else []
    if has(9):
        names += [x for c in pid.each(9) if (x := dt.human_name(c))]
    if names:
        patient["name"] = names

    if has(13) or has(14) or has(40):
        telecom = [x for c in pid.each(13) if (x := dt.contact_point(c, "home"))]
        telecom += [x for c in pid.each(14) if (x := dt.contact_point(c, "work"))]
        # PID-40 (v2.7+, patient telecommunication information) carries its own use.
        if has(40):
            telecom += [x for c in pid.each(40) if (x := dt.contact_point(c)) and x not in telecom]
        if telecom:
            patient["telecom"] = telecom

    if has(8):
        gender = GENDER.get(pid.value(8).upper())
        if gender:
            patient["gender"] = gender

    if has(7):
        _birth(ctx, pid, patient)

    if has(11):
        addresses = [x for c in pid.each(11) if (x := dt.address(c))]
        if addresses:
            patient["address"] = addresses

    if has(16):
        marital = _coded(_marital_status, ctx, pid.comps(16))
        if marital:
            patient["maritalStatus"] = marital

    if has(15):
        languages = [x for c in pid.each(15) if (x := _coded(language_concept, ctx, c))]
        if languages:
            patient["communication"] = [{"language": x, "preferred": True} for x in languages]

    if has(29) or has(30):
        _deceased(ctx, pid, patient)
    if has(24) or has(25):
        _multiple_birth(pid, patient)
    if has(6) or has(10) or has(17) or has(22) or has(23):
        extensions = _extensions(ctx, pid, has)
        if extensions:
            patient["extension"] = extensions
    if has(33):
        _last_updated(ctx, pid, patient)

    pd1 = _pd1_of(ctx, pid)
    if pd1 is not None:
        _primary_care(ctx, pd1, patient)

    if has(21):
        _mother(ctx, pid, reference)

    if primary:
        ctx.patient_ref = reference
    return reference


def _mother(ctx: MappingContext, pid: Segment, patient_ref: str) -> None:
    """PID-21 (mother's identifier) → a RelatedPerson with relationship MTH (the IG's
    PID map, CX[RelatedPerson-Mother]); its id follows the patient and the first id."""
    identifiers = [x for c in pid.each(21) if (x := dt.identifier(ctx, c))]
    if not identifiers:
        return
    first = identifiers[0]
    patient_id = patient_ref.removeprefix("urn:uuid:")
    key = f"RelatedPerson|{patient_id}|MTH|{first.get('system', '')}|{first.get('value', '')}"
    ctx.add(
        {
            "resourceType": "RelatedPerson",
            "id": uuid5_str(key),
            "identifier": identifiers,
            "patient": {"reference": patient_ref},
            "relationship": [
                {"coding": [{"system": V3_ROLE_CODE, "code": "MTH", "display": "mother"}]}
            ],
        }
    )


# --- identity -------------------------------------------------------------------------


#: ``ctx.memo`` key of the first PID's patient key.
_FIRST_KEY: Final = "patient.first_key"


def patient_key_of(ctx: MappingContext, pid: Segment) -> str | None:
    """The patient key (``authority|id`` of the first PID-3 id) of any PID.

    For the first PID this is exactly :func:`adapters.hl7v2.er7.patient_key`
    (the Kafka record key); later PIDs use the same rules.
    """
    if pid is ctx.first("PID"):
        # Computed once per message (the framework's Patient, then the ADT groups).
        memo = ctx.memo
        if _FIRST_KEY in memo:
            key: str | None = memo[_FIRST_KEY]
            return key
        key = memo[_FIRST_KEY] = _first_key(ctx, pid)
        return key
    return key_from_cx_list(ctx, pid.fields[3] if len(pid.fields) > 3 else "")


def _first_key(ctx: MappingContext, pid: Segment) -> str | None:
    """:func:`adapters.hl7v2.er7.patient_key` of the message (``pid`` is its first
    PID); a first PID-3 id with no escape and no subcomponent, nearly all of them,
    is read here without decoding the other repetitions."""
    fields = pid.fields
    raw = fields[3] if len(fields) > 3 else ""
    if not raw:
        return None
    first = raw.split(ctx.rep_sep, 1)[0]
    if ctx.esc_char not in first and ctx.sub_sep not in first:
        comps = first.split(ctx.comp_sep)
        ident = comps[0]
        if ident.strip():
            return f"{comps[3] if len(comps) > 3 else ''}|{ident}"
    return patient_key_from(patient_identifiers(ctx.msg))


def key_from_cx_list(ctx: MappingContext, raw: str) -> str | None:
    """The patient key of a raw CX list (PID-3 rules), without marking anything read."""
    if not raw:
        return None
    probe = Hl7Message(b"", "", ctx.enc, ctx.msg.codec, [["PID", "", "", raw]], ctx.msg.header)
    return patient_key_from(patient_identifiers(probe))


def _identifiers(
    ctx: MappingContext, pid: Segment, has: Callable[[int], bool]
) -> list[dict[str, Any]]:
    """PID-3, 2, 4, 19, 20 → identifiers (``has(n)``: whether PID-n is valued)."""
    found = [x for c in pid.each(3) if (x := dt.identifier(ctx, c))] if has(3) else []
    # PID-2 (external id) and PID-4 (alternate id) are retained in v2.3-2.5 messages.
    if has(2):
        found += [x for c in pid.each(2) if (x := dt.identifier(ctx, c))]
    if has(4):
        found += [x for c in pid.each(4) if (x := dt.identifier(ctx, c))]
    ssn = pid.value(19) if has(19) else ""
    if ssn:
        found.append(
            {
                "type": {"coding": [{"system": dt.V2_0203, "code": "SS"}]},
                "system": SSN_SYSTEM,
                "value": ssn,
            }
        )
    licence = pid.comps(20) if has(20) else None
    if licence is not None and licence.text(1):
        ident: dict[str, Any] = {"type": {"coding": [{"system": dt.V2_0203, "code": "DL"}]}}
        system = dt.authority_system(ctx, licence.text(2))
        if system:
            ident["system"] = system
        ident["value"] = licence.text(1)
        expiry = dt.date_time(licence.text(3), "PID-20")
        if expiry:
            ident["period"] = {"end": expiry}
        found.append(ident)
    return found


# --- birth, death ---------------------------------------------------------------------


def _birth(ctx: MappingContext, pid: Segment, patient: dict[str, Any]) -> None:
    value = pid.value(7)
    birth = dt.date_only(value, "PID-7")
    if not birth:
        return
    patient["birthDate"] = birth
    digits = value.strip()
    if len(digits) > 8 and digits[8].isdigit():  # a time of day: keep it (IG: LENGTH > 8)
        birth_time = dt.date_time(digits, "PID-7")  # no offset: the default time zone
        if birth_time:
            patient["_birthDate"] = {
                "extension": [{"url": EXT_BIRTH_TIME, "valueDateTime": birth_time}]
            }


def _deceased(ctx: MappingContext, pid: Segment, patient: dict[str, Any]) -> None:
    when = dt.date_time(pid.value(29), "PID-29") if pid.present(29) else None
    if when:
        patient["deceasedDateTime"] = when
        if pid.present(30):
            pid.consume(30)  # the indicator agrees with (or is implied by) the date
        return
    flag = _yes_no(_peek(pid, 30))
    if flag is not None:
        pid.consume(30)
        patient["deceasedBoolean"] = flag


def _multiple_birth(pid: Segment, patient: dict[str, Any]) -> None:
    raw = _peek(pid, 25).strip()
    if raw and raw != '""':
        if not _DIGITS.fullmatch(raw) or int(raw) > _MAX_INT:
            raise DataTypeError("not an integer", location="PID-25")
        number = int(raw)
        if number > 0:  # a birth order of 0 orders nothing: left unread, so reported
            pid.consume(25)
            patient["multipleBirthInteger"] = number
            if pid.present(24):
                pid.consume(24)  # a birth order says the birth was multiple
            return
    flag = _yes_no(_peek(pid, 24))
    if flag is not None:
        pid.consume(24)
        patient["multipleBirthBoolean"] = flag


def _last_updated(ctx: MappingContext, pid: Segment, patient: dict[str, Any]) -> None:
    raw = _peek(pid, 33)
    if not raw:
        return
    try:
        when = dt.instant(raw.split(ctx.enc.component, 1)[0], "PID-33")
    except DataTypeError:
        return  # left unread: reported as unmapped, the message is still good
    if when:
        pid.consume(33)
        patient["meta"] = {"lastUpdated": when}


# --- coded demographics ---------------------------------------------------------------


def _marital_status(ctx: MappingContext, c: Components) -> dict[str, Any] | None:
    if not c:
        return None
    mapped = MARITAL_STATUS.get(c.text(1).upper()) if c.text(3).upper() in ("", "HL70002") else None
    if mapped is None:
        return dt.codeable_concept(ctx, c)
    system, code, display = mapped
    out: dict[str, Any] = {"coding": [{"system": system, "code": code, "display": display}]}
    text = c.text(9) or c.text(2)
    if text:
        out["text"] = text
    return out


def language_concept(ctx: MappingContext, c: Components) -> dict[str, Any] | None:
    """A language CWE (PID-15, NK1-20) → CodeableConcept, BCP-47 where possible."""
    if not c:
        return None
    codings: list[dict[str, Any]] = []
    for first in (1, 4):
        code = c.text(first)
        if not code:
            continue
        display = c.text(first + 1)
        system_name = c.text(first + 2)
        tag = bcp47_tag(code) if system_name.upper() in _LANGUAGE_SYSTEMS else None
        found = (
            dt.coding(tag, display, BCP47)
            if tag
            else dt.coding(code, display, dt.code_system(system_name))
        )
        if found:
            codings.append(found)
    text = c.text(9) or next((x["display"] for x in codings if "display" in x), "")
    return dt.concept(codings, text)


def bcp47_tag(code: str) -> str | None:
    """A BCP-47 language tag for a language code, or None when it is not one."""
    value = code.strip()
    if not _LANGUAGE_TAG.fullmatch(value):
        return None
    parts = value.split("-")
    primary = parts[0].lower()
    if len(primary) == 3:
        mapped = ISO639_2_TO_1.get(primary)
        if mapped is None:
            return None
        primary = mapped
    rest = [p.upper() if len(p) == 2 and p.isalpha() else p for p in parts[1:]]
    return "-".join([primary, *rest])


def _extensions(
    ctx: MappingContext, pid: Segment, has: Callable[[int], bool]
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    maiden = pid.comps(6).text(1) if has(6) else ""
    if maiden:
        out.append({"url": EXT_MOTHERS_MAIDEN_NAME, "valueString": maiden})
    race = _coded(_race, ctx, Components(ctx, pid.raw(10))) if has(10) else None
    if race:
        out.append(race)
    if has(22):
        ethnicity = _coded(_ethnicity, ctx, Components(ctx, pid.raw(22)))
        if ethnicity:
            out.append(ethnicity)
    religion = dt.codeable_concept(ctx, pid.comps(17)) if has(17) else None
    if religion:
        out.append({"url": EXT_RELIGION, "valueCodeableConcept": religion})
    birth_place = pid.value(23) if has(23) else ""
    if birth_place:
        out.append({"url": EXT_BIRTH_PLACE, "valueAddress": {"text": birth_place}})
    return out


def _race(ctx: MappingContext, c: Components) -> dict[str, Any] | None:
    """PID-10 (all repetitions: ``c`` is the whole field) → US Core race."""
    reps = [Components(ctx, r) for r in c.raw.split(ctx.rep_sep) if r]
    return _omb_extension(reps, US_CORE_RACE, OMB_RACE, {})


def _ethnicity(ctx: MappingContext, c: Components) -> dict[str, Any] | None:
    """PID-22 (all repetitions: ``c`` is the whole field) → US Core ethnicity."""
    reps = [Components(ctx, r) for r in c.raw.split(ctx.rep_sep) if r]
    return _omb_extension(reps, US_CORE_ETHNICITY, OMB_ETHNICITY, ETHNIC_GROUP_0189)


def _omb_extension(
    reps: list[Components], url: str, categories: dict[str, str], table_codes: dict[str, str]
) -> dict[str, Any] | None:
    """US Core race / ethnicity: OMB categories, detailed CDC codes, and the text."""
    parts: list[dict[str, Any]] = []
    texts: list[str] = []
    for c in reps:
        code, display = c.text(1), c.text(2)
        if c.text(3).upper() in _CDC_SYSTEMS and code:
            cdc = table_codes.get(code.upper(), code)
            if cdc in categories:
                parts.append(
                    {
                        "url": "ombCategory",
                        "valueCoding": {
                            "system": CDC_RACE_ETHNICITY,
                            "code": cdc,
                            "display": categories[cdc],
                        },
                    }
                )
            elif _CDC_CODE.fullmatch(cdc):
                coding: dict[str, Any] = {"system": CDC_RACE_ETHNICITY, "code": cdc}
                if display:
                    coding["display"] = display
                parts.append({"url": "detailed", "valueCoding": coding})
        text = c.text(9) or display or code
        if text:
            texts.append(text)
    if not texts:
        return None
    parts.append({"url": "text", "valueString": ", ".join(texts)})
    return {"url": url, "extension": parts}


# --- PD1 ------------------------------------------------------------------------------


def _pd1_of(ctx: MappingContext, pid: Segment) -> Segment | None:
    """The PD1 of this PID's group (it follows the PID, before any visit or order)."""
    segments = ctx.segments
    for i in range(pid.index + 1, len(segments)):
        name = segments[i].name
        if name == "PD1":
            return segments[i]
        if name in _PD1_STOP:
            return None
    return None


def _primary_care(ctx: MappingContext, pd1: Segment, patient: dict[str, Any]) -> None:
    refs = [{"reference": r} for c in pd1.each(3) if (r := dt.organization(ctx, c))]
    refs += [{"reference": r} for c in pd1.each(4) if (r := dt.practitioner(ctx, c))]
    if refs:
        patient["generalPractitioner"] = refs
    worship = pd1.comps(14).text(1)
    if worship:
        patient.setdefault("extension", []).append(
            {"url": EXT_CONGREGATION, "valueString": worship}
        )


# --- helpers --------------------------------------------------------------------------

#: :func:`_coded` results (as JSON) by (mapper, raw value, component and
#: subcomponent separators): the same few coded values (language, race) come in
#: message after message. Bounded: cleared when full.
_CODED: Final[dict[tuple[object, str, str, str], bytes | None]] = {}
_CODED_MAX: Final = 4096


def _coded(
    mapper: Callable[[MappingContext, Components], dict[str, Any] | None],
    ctx: MappingContext,
    c: Components,
) -> dict[str, Any] | None:
    """``mapper(ctx, c)`` for a coded value, cached by the raw value (when it has no
    escape, the result depends on nothing else); a fresh copy every time."""
    raw = c.raw
    if ctx.esc_char in raw:
        return mapper(ctx, c)
    key = (mapper, raw, ctx.comp_sep, ctx.sub_sep)
    if key in _CODED:
        found = _CODED[key]
    else:
        if len(_CODED) >= _CODED_MAX:
            _CODED.clear()
        value = mapper(ctx, c)
        # Kept as JSON: loading it is a fresh copy in one C call.
        found = _CODED[key] = None if value is None else orjson.dumps(value)
    return None if found is None else cast(dict[str, Any], orjson.loads(found))


def _peek(seg: Segment, n: int) -> str:
    """Field ``n`` raw, without marking it read (for fields read only when usable)."""
    return seg.fields[n] if n < len(seg.fields) else ""


def _yes_no(raw: str) -> bool | None:
    value = raw.strip().upper()
    if value in ("Y", "YES"):
        return True
    if value in ("N", "NO"):
        return False
    return None
