"""ORU (R01, and the R30-R32/R40-style variants with the same order/observation
groups) → DiagnosticReport, Observation, ServiceRequest and Specimen, following
the HL7 v2-to-FHIR IG (message map ORU_R01; segment maps OBR[DiagnosticReport],
OBR[ServiceRequest], OBR[Specimen], ORC[DiagnosticReport], OBX[Observation],
NTE[Observation], SPM[Specimen]; vocabulary maps 0078, 0085, 0123).

Groups, read in message order::

    PID [PV1] { [ORC] OBR {NTE} [{OBX {PRT} {NTE}}] {SPM [{OBX}]} }

* OBX before any OBR (PATIENT_OBSERVATION, and the v2.8 ORDER_DOCUMENT OBX
  between ORC and OBR) → an Observation of the patient, in no report.
* Each OBR → one DiagnosticReport and the ServiceRequest it is ``basedOn``
  (identifiers ORC-2/OBR-2 PLAC, ORC-3/OBR-3 FILL, ORC-4 PGN; OBR-53 alternate
  placer numbers PLAC on the ServiceRequest only; requester ORC-12/OBR-16, with
  ORC-21/22/23 the ordering facility: a PractitionerRole of both, or the
  Organization alone, per the IG's ORC map). Its OBX →
  ``result`` (OBX-29 QST/SCI → ``ServiceRequest.supportingInfo`` instead, per
  the IG); NTE right after the OBR → the R5 ``DiagnosticReport.note`` through
  the cross-version extension (R4 has no report note and the IG leaves this
  NTE unmapped; a comment on a report is neither its ``conclusion`` nor an
  Observation).
* SPM → Specimen (``DiagnosticReport.specimen``, ``ServiceRequest.specimen`` and
  the first one in ``Observation.specimen``); the OBX after an SPM → an
  Observation whose ``focus`` is that Specimen (IG: SPECIMEN_OBSERVATION, not a
  report result). Without SPM (v2.3), OBR-9/10/14/15/39 make the Specimen;
  with SPM they complete the first Specimen of the group where it is silent.
* OBX-5 by OBX-2 (:func:`observation_from_obx`): NM, CQ → valueQuantity; SN →
  valueQuantity with comparator, valueRange (``-``), valueRatio (``:`` ``/``),
  else valueString as written; ST, TX, FT → valueString (repetitions joined by
  line breaks); CE, CWE, CNE, CF, IS, ID → valueCodeableConcept; DT, DTM, TS →
  valueDateTime; TM → valueTime (an offset in the tz-offset extension); DR →
  valuePeriod; NR → valueRange; MO → valueQuantity in ISO 4217; ED, RP → an
  Attachment in the R5 ``Observation.value`` cross-version extension (IG; R4
  has no valueAttachment). A repeating OBX-5 → ``component`` (IG).
* Times without a UTC offset take the configured default zone's
  (:func:`dt.date_time`); OBR-22 becomes ``issued`` when it has a time.

Ids are business ids when the message has one, so a correction (OBX-11 ``C``)
updates the same resources: the DiagnosticReport from the filler order number
(ORC-3/OBR-3, else the placer number; the authority is the EI's, else the
sending application and facility), each Observation from that and OBX-1/OBX-4,
the ServiceRequest as the orders family keys it (placer number and service),
the Specimen from its identifiers (SPM-2, SPM-31). Without them, ids are scoped
to the event.

The visit (PV1/PV2) is mapped before this family runs (``bundle.normalize``
uses the ADT family's Encounter map) and referenced through ``ctx.encounter_ref``.

Left unmapped on purpose (they appear in ``unmapped``): PRT, TQ1/TQ2, CTD,
FT1, CTI, TXA, SFT, NTE after PID (no FHIR home in the IG),
OBX-5 of value types NA, MA, CP, EI, CX and the other composite types that have
no FHIR value[x], OBX-6 of a non-numeric value, OBX-9/12/13/22/26-28/30/31/33,
OBX-32 when there is a value, OBR-5/11, ORC-1/5 codes with no FHIR equivalent,
OBR-12/13/17-21/23/26-30/33/36-38/40-54, ORC-6-11/13-34, SPM-3/5/9-11/13/15/16/
19/21-23/25/26/28/29/32, NTE-2/4/7-9.
"""

from __future__ import annotations

import binascii
import re
from base64 import b64encode
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import tzinfo
from functools import lru_cache
from itertools import compress
from typing import Any, Final

from bridge.errors import DataTypeError, SegmentSequenceError, TableValueNotFound
from bridge.normalize import datatypes as dt
from bridge.normalize.bundle import register
from bridge.normalize.context import Components, MappingContext, Segment
from bridge.normalize.ids import uuid5_str

__all__ = [
    "DIAGNOSTIC_REPORT_STATUS",
    "INTERPRETATION_SYSTEM",
    "OBSERVATION_STATUS",
    "map_oru",
    "observation_from_obx",
]

_V2: Final = "http://terminology.hl7.org/CodeSystem/v2-"
V2_0085: Final = "http://terminology.hl7.org/CodeSystem/v2-0085"
V2_0123: Final = "http://terminology.hl7.org/CodeSystem/v2-0123"
V2_0203: Final = "http://terminology.hl7.org/CodeSystem/v2-0203"
INTERPRETATION_SYSTEM: Final = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
DATA_ABSENT_SYSTEM: Final = "http://terminology.hl7.org/CodeSystem/data-absent-reason"
DATA_ABSENT_EXT: Final = "http://hl7.org/fhir/StructureDefinition/data-absent-reason"
ALTERNATE_CODES_EXT: Final = "http://hl7.org/fhir/StructureDefinition/alternate-codes"
TZ_OFFSET_EXT: Final = "http://hl7.org/fhir/StructureDefinition/tz-offset"
ANALYSIS_TIME_EXT: Final = "http://hl7.org/fhir/StructureDefinition/observation-analysis-date-time"
NATURE_OF_ABNORMAL_EXT: Final = (
    "http://hl7.org/fhir/StructureDefinition/observation-nature-of-abnormal-test"
)
PERFORMER_FUNCTION_EXT: Final = "http://hl7.org/fhir/StructureDefinition/event-performerFunction"
#: R5 elements carried in R4 with the cross-version extensions (hl7.fhir.uv.xver-r5.r4).
#: The IG names ``.../extension-Observation.valueAttachment`` for ED/RP; the
#: published cross-version canonical is the element's, ``Observation.value``.
OBSERVATION_VALUE_EXT: Final = (
    "http://hl7.org/fhir/5.0/StructureDefinition/extension-Observation.value"
)
COMPONENT_VALUE_EXT: Final = (
    "http://hl7.org/fhir/5.0/StructureDefinition/extension-Observation.component.value"
)
REPORT_NOTE_EXT: Final = (
    "http://hl7.org/fhir/5.0/StructureDefinition/extension-DiagnosticReport.note"
)

#: HL7 table 0085 → ObservationStatus (IG ConceptMap table-hl70085-to-observation-status).
#: The IG leaves B, I, N, O, R, S, U, V unmapped; Observation.status is required,
#: so they get the nearest status and keep the v2 code (alternate-codes).
OBSERVATION_STATUS: Final[dict[str, str]] = {
    "A": "amended",
    "B": "amended",  # appended: R4 has no 'appended' for Observation; amended is its parent
    "C": "corrected",
    "D": "entered-in-error",
    "F": "final",
    "I": "registered",
    "N": "cancelled",  # not asked: with dataAbsentReason not-asked (IG)
    "O": "registered",
    "P": "preliminary",
    "R": "preliminary",
    "S": "preliminary",
    "U": "final",
    "V": "final",
    "W": "entered-in-error",
    "X": "cancelled",  # cannot be obtained: with dataAbsentReason not-performed
}
#: Codes the IG maps as equivalent; any other code is kept beside the status.
_OBSERVATION_STATUS_EQUIVALENT: Final = frozenset("ACDFPW")

#: HL7 table 0123 → DiagnosticReportStatus (IG ConceptMap ResultStatus[Non-Queries]).
#: A, M and N are unmapped in the IG: nearest status, v2 code kept.
DIAGNOSTIC_REPORT_STATUS: Final[dict[str, str]] = {
    "O": "registered",
    "I": "registered",
    "S": "registered",
    "A": "partial",
    "P": "preliminary",
    "C": "corrected",
    "R": "partial",
    "F": "final",
    "X": "cancelled",
    "M": "preliminary",  # corrected, not final
    "N": "registered",  # procedure completed, results pending
}
_REPORT_STATUS_EQUIVALENT: Final = frozenset("OISPCRFX")
#: The IG makes these an error: there is no report to speak of.
_REPORT_STATUS_ERRORS: Final = frozenset("YZ")

#: HL7 table 0078 codes that v3-ObservationInterpretation has, with its display.
#: The codes are the same in both: HH, LL, AA stay exactly HH, LL, AA.
INTERPRETATION_DISPLAY: Final[dict[str, str]] = {
    "<": "Off scale low",
    ">": "Off scale high",
    "A": "Abnormal",
    "AA": "Critical abnormal",
    "B": "Better",
    "CAR": "Carrier",
    "D": "Significant change down",
    "DET": "Detected",
    "E": "Equivocal",
    "EX": "outside threshold",
    "EXP": "Expected",
    "H": "High",
    "HH": "Critical high",
    "HU": "Significantly high",
    "I": "Intermediate",
    "IE": "Insufficient evidence",
    "IND": "Indeterminate",
    "L": "Low",
    "LL": "Critical low",
    "LU": "Significantly low",
    "MS": "moderately susceptible",
    "N": "Normal",
    "NCL": "No CLSI defined breakpoint",
    "ND": "Not detected",
    "NEG": "Negative",
    "NR": "Non-reactive",
    "NS": "Non-susceptible",
    "POS": "Positive",
    "R": "Resistant",
    "RR": "Reactive",
    "S": "Susceptible",
    "SDD": "Susceptible-dose dependent",
    "SYN-R": "Synergy - resistant",
    "SYN-S": "Synergy - susceptible",
    "U": "Significant change up",
    "UNE": "Unexpected",
    "VS": "very susceptible",
    "W": "Worse",
    "WR": "Weakly reactive",
}

#: HL7 table 0038 (order status) → ServiceRequest.status.
_ORDER_STATUS: Final[dict[str, str]] = {
    "A": "active",
    "CA": "revoked",
    "CM": "completed",
    "DC": "revoked",
    "ER": "entered-in-error",
    "HD": "on-hold",
    "IP": "active",
    "RP": "revoked",
    "SC": "active",
}
#: HL7 table 0027 (priority, OBR-5 before v2.7) → request-priority.
_PRIORITY: Final[dict[str, str]] = {"S": "stat", "A": "asap", "R": "routine", "T": "urgent"}

_TEXT_TYPES: Final = frozenset({"ST", "TX", "FT"})
_CODED_TYPES: Final = frozenset({"CE", "CWE", "CNE", "CF"})
#: Value types whose OBX-6 units belong to the value (and to OBX-7).
_UNIT_TYPES: Final = frozenset({"NM", "SN", "NR", "CQ"})
_SUPPORTED_TYPES: Final = frozenset(
    {
        *_TEXT_TYPES,
        *_CODED_TYPES,
        *_UNIT_TYPES,
        "IS",
        "ID",
        "DT",
        "DTM",
        "TS",
        "TM",
        "DR",
        "MO",
        "ED",
        "RP",
    }
)
_SN_COMPARATORS: Final = frozenset({"<", ">", "<=", ">="})
#: OBX-29 observation types that are order information, not results (IG).
_ORDER_INFO_TYPES: Final = frozenset({"QST", "SCI"})

_NUM: Final = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)"
_RANGE_RE: Final = re.compile(rf"\s*({_NUM})\s*(?:-|\u2013|to|TO)\s*({_NUM})\s*")
_BOUND_RE: Final = re.compile(rf"\s*(<=|>=|<|>|\u2264|\u2265)\s*({_NUM})\s*")
_TM_RE: Final = re.compile(
    r"(\d{2})(?:(\d{2})(?:(\d{2})(?:\.(\d{1,4}))?)?)?(?:([+-])(\d{2})(\d{2}))?"
)
_MIME_TOKEN_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*")

#: ED/RP type of data (table 0191) → MIME top-level type.
_MIME_TYPE: Final[dict[str, str]] = {
    "AP": "application",
    "APPLICATION": "application",
    "AU": "audio",
    "AUDIO": "audio",
    "IM": "image",
    "IMAGE": "image",
    "SI": "image",
    "NS": "image",
    "SD": "image",
    "TEXT": "text",
    "TX": "text",
    "FT": "text",
    "VIDEO": "video",
    "MULTIPART": "multipart",
}
#: ED/RP data subtype (table 0291) → MIME type, where the subtype alone says it.
_MIME_SUBTYPE: Final[dict[str, str]] = {
    "PDF": "application/pdf",
    "RTF": "application/rtf",
    "POSTSCRIPT": "application/postscript",
    "MSWORD": "application/msword",
    "OCTET-STREAM": "application/octet-stream",
    "DICOM": "application/dicom",
    "XML": "application/xml",
    "HTML": "text/html",
    "SGML": "text/sgml",
    "PLAIN": "text/plain",
    "JPEG": "image/jpeg",
    "JPG": "image/jpeg",
    "PNG": "image/png",
    "GIF": "image/gif",
    "TIFF": "image/tiff",
    "BMP": "image/bmp",
    "PICT": "image/pict",
    "BASIC": "audio/basic",
}


def _unknown_code() -> dict[str, Any]:
    """CodeableConcept for a required code the message leaves empty."""
    return {"extension": [{"url": DATA_ABSENT_EXT, "valueCode": "unknown"}]}


def _alternate_code(system: str, value: str) -> dict[str, Any]:
    """The v2 code kept beside a FHIR status it maps to only approximately."""
    return {
        "extension": [
            {
                "url": ALTERNATE_CODES_EXT,
                "valueCodeableConcept": {"coding": [{"system": system, "code": value}]},
            }
        ]
    }


def _date_time(ctx: MappingContext, value: str, location: str) -> str | None:
    """TS/DTM → FHIR dateTime (:func:`dt.date_time`: precision kept; a time without
    an offset takes the configured default time zone's)."""
    if not value:
        return None
    try:
        return _cached_date_time(value, dt.DEFAULT_TIMEZONE.get())
    except DataTypeError as exc:
        raise DataTypeError(exc.message, location=location) from None


@lru_cache(maxsize=1024)
def _cached_date_time(value: str, zone: tzinfo) -> str | None:
    """:func:`dt.date_time` by value and zone: one message repeats the same few
    times on every OBX, and the calendar and zone checks are the costliest step.
    ``zone`` is the key only: ``dt.date_time`` reads the same zone from its
    context variable."""
    return dt.date_time(value, "")


# --- Observation -------------------------------------------------------------------------


def observation_from_obx(
    ctx: MappingContext,
    obx: Segment,
    *,
    key_prefix: str,
    based_on: list[str] | None = None,
    notes: Sequence[Segment] | None = None,
    specimen: str | None = None,
    focus: str | None = None,
    default_effective: str | None = None,
) -> str:
    """Map one OBX (and its NTEs) to an Observation in the Bundle; return its reference.

    ``key_prefix`` names the group the OBX belongs to and makes the id: the id is
    ``uuid5("Observation|{key_prefix}|{OBX-1}|{OBX-4}")``. Pass a business identity
    (a filler order number) to give corrections the same id, or something holding
    ``ctx.event_id`` for ids scoped to this message. ``notes`` are the NTE segments of
    this OBX; None finds them (the NTEs right after it, PRTs skipped). ``based_on``,
    ``specimen`` and ``focus`` are references; ``default_effective`` is the FHIR
    dateTime used when OBX-14 is empty (OBR-7 in a result group).
    """
    # The hot path of every result message: fields are read straight from the
    # segment and marked as carried with one ``|=`` on its bit mask, instead of
    # one accessor call per field; a field with no delimiter and no escape (set
    # ids, codes, numbers: nearly all of them) is taken as it is.
    f = obx.fields
    if len(f) < _OBX_FIELDS:
        f = f + [""] * (_OBX_FIELDS - len(f))
    obx.carried |= _OBX_STRUCTURE
    specials = _specials(ctx)
    v = f[1]
    set_id = (v.strip() if specials.isdisjoint(v) else _plain(ctx, v)) if v else ""
    v = f[4]
    sub_id = (v.strip() if specials.isdisjoint(v) else _plain(ctx, v)) if v else ""
    key = f"Observation|{key_prefix}|{set_id or '#' + str(obx.index)}|{sub_id}"
    rid = uuid5_str(key)
    if ctx.has_id(rid):  # a repeated set id: do not merge two results into one
        rid = uuid5_str(f"{key}|@{obx.index}")
    obs: dict[str, Any] = {"resourceType": "Observation", "id": rid}

    if f[21]:
        ident = dt.entity_identifier(ctx, obx.comps(21), "FILL")
        if ident:
            obs["identifier"] = [ident]
    if based_on:
        obs["basedOn"] = (
            [{"reference": based_on[0]}]  # one order, the common case: no comprehension
            if len(based_on) == 1
            else [{"reference": r} for r in based_on]
        )

    v = f[11]
    status_code = (v.strip() if specials.isdisjoint(v) else _plain(ctx, v)).upper() if v else ""
    obs["status"] = OBSERVATION_STATUS.get(status_code, "unknown")
    if status_code and status_code not in _OBSERVATION_STATUS_EQUIVALENT:
        obs["_status"] = _alternate_code(V2_0085, status_code)

    code = None
    v = f[3]
    if v:
        obx.carried |= 1 << 3
        code = _cwe_code(ctx, _rep1(ctx, v))
    if code is None:
        code = _unknown_code()
    obs["code"] = code
    if ctx.patient_ref:
        obs["subject"] = {"reference": ctx.patient_ref}
    if focus:
        obs["focus"] = [{"reference": focus}]
    if ctx.encounter_ref:
        obs["encounter"] = {"reference": ctx.encounter_ref}

    effective = default_effective
    v = f[14]
    if v:
        obx.carried |= 1 << 14
        when = v.strip() if specials.isdisjoint(v) else _plain(ctx, v)
        effective = _date_time(ctx, when, "OBX-14") or effective
    if effective:
        obs["effectiveDateTime"] = effective

    if f[15] or f[16] or f[23] or f[25]:
        performers = _performers_of(ctx, obx, f)
        if performers:
            obs["performer"] = [{"reference": r} for r in performers]

    extensions: list[dict[str, Any]] = []
    v = f[2]
    value_type = (v.strip() if specials.isdisjoint(v) else _plain(ctx, v)).upper() if v else ""
    # OBX-6, mapped once for the value and the reference range: units with no
    # repetition, escape or subcomponent (nearly all) by their cached map.
    v = f[6]
    unit_part: dict[str, str] | None = _NO_UNITS
    if v and value_type in _UNIT_TYPES:
        obx.carried |= 1 << 6
        if not (ctx.rep_sep in v or ctx.esc_char in v or ctx.sub_sep in v):
            unit_part = _unit_part(v, ctx.comp_sep)
        else:
            unit_part = None
    raw_value = f[5]
    if not raw_value or raw_value == '""':
        has_value = False
    elif value_type == "NM" and specials.isdisjoint(raw_value):
        obx.carried |= 1 << 5
        if unit_part is not None:
            obs["valueQuantity"] = {"value": dt.number(raw_value, "OBX-5"), **unit_part}
        else:
            obs["valueQuantity"] = dt.quantity(raw_value, _units(ctx, obx, value_type), "OBX-5")
        has_value = True
    else:
        units = _units(ctx, obx, value_type)
        has_value = _map_value(ctx, obx, value_type, units, code, obs, extensions)
    if not has_value:
        absent = _absent_reason(ctx, obx, status_code)
        if absent:
            obs["dataAbsentReason"] = absent

    v = f[8]
    if v:
        if ctx.rep_sep in v:
            interpretation = [x for r in obx.reps(8) if (x := _interpretation(ctx, r))]
        else:  # one interpretation code, the common case
            obx.carried |= 1 << 8
            found = _interpretation(ctx, v)
            interpretation = [found] if found else []
        if interpretation:
            obs["interpretation"] = interpretation

    if notes is None:
        notes = _notes_after(ctx, obx)
    if notes:
        annotations = [x for n in notes if (x := _note(ctx, n))]
        if annotations:
            obs["note"] = annotations

    if f[20]:
        body_site = _cwe(ctx, _first_rep(ctx, obx, 20))
        if body_site:
            obs["bodySite"] = body_site
    if f[17]:
        method = _cwe(ctx, _first_rep(ctx, obx, 17))
        if method:
            obs["method"] = method
    if specimen:
        obs["specimen"] = {"reference": specimen}
    if f[18]:
        device = _device(ctx, obx.comps(18))
        if device:
            obs["device"] = {"reference": device}
    v = f[7]
    if v:
        obx.carried |= 1 << 7
        reference_range = _reference_range(
            (ctx.decode(v) if ctx.esc_char in v else v).strip(),
            unit_part,
            ctx,
            obx,
            value_type,
        )
        if reference_range:
            obs["referenceRange"] = [reference_range]

    if f[10]:
        for r in obx.reps(10):
            nature = dt.table_concept(_plain(ctx, r), f"{_V2}0080")
            if nature:
                extensions.append({"url": NATURE_OF_ABNORMAL_EXT, "valueCodeableConcept": nature})
    v = f[19]
    if v:
        obx.carried |= 1 << 19
        analysis = _date_time(ctx, _plain(ctx, v), "OBX-19")
        if analysis:
            extensions.append({"url": ANALYSIS_TIME_EXT, "valueDateTime": analysis})
    if extensions:
        obs["extension"] = extensions
    return ctx.add(obs)


#: OBX fields read by index (up to OBX-25); shorter segments are padded.
_OBX_FIELDS: Final = 26
#: OBX-1, 2, 4, 11 (set id, value type, sub-id, status): always carried.
_OBX_STRUCTURE: Final = (1 << 1) | (1 << 2) | (1 << 4) | (1 << 11)
#: ``ctx.memo`` key of :func:`_specials`.
_SPECIALS: Final = "oru.specials"


def _specials(ctx: MappingContext) -> frozenset[str]:
    """The message's delimiters and escape character (a field with none of them is
    its own first component, already decoded), made once per message."""
    found: frozenset[str] | None = ctx.memo.get(_SPECIALS)
    if found is None:
        enc = ctx.enc
        found = ctx.memo[_SPECIALS] = frozenset(
            (enc.component, enc.repetition, enc.escape, enc.subcomponent)
        )
    return found


def _rep1(ctx: MappingContext, raw: str) -> str:
    """The first repetition of a raw field."""
    sep = ctx.enc.repetition
    return raw.split(sep, 1)[0] if sep in raw else raw


def _plain(ctx: MappingContext, raw: str) -> str:
    """First component (and subcomponent) of the first repetition, decoded, stripped."""
    if not raw:
        return ""
    enc = ctx.enc
    for sep in (enc.repetition, enc.component, enc.subcomponent):
        if sep in raw:
            raw = raw.split(sep, 1)[0]
    return ctx.decode(raw).strip() if enc.escape in raw else raw.strip()


def _first_rep(ctx: MappingContext, seg: Segment, n: int) -> str:
    """Field ``n``'s first repetition, raw (``""`` when empty, nothing marked)."""
    fields = seg.fields
    raw = fields[n] if n < len(fields) else ""
    if not raw:
        return ""
    seg.carried |= 1 << n
    sep = ctx.rep_sep
    return raw.split(sep, 1)[0] if sep in raw else raw


def _cwe(ctx: MappingContext, rep: str) -> dict[str, Any] | None:
    """CE/CWE/CNE → CodeableConcept, as :func:`dt.codeable_concept` maps it.

    On the hot path (every OBX-3 and OBR-4) the common case, no escapes and no
    subcomponents, is split once here; anything else goes to the shared map.
    """
    if not rep:
        return None
    enc = ctx.enc
    if enc.escape in rep or enc.subcomponent in rep:
        return dt.codeable_concept(ctx, Components(ctx, rep))
    return _split_cwe(rep, enc.component)


def _split_cwe(rep: str, comp: str) -> dict[str, Any] | None:
    """:func:`_cwe` of a non-empty repetition with no escape and no subcomponent."""
    parts = rep.split(comp)
    n = len(parts)
    codings = []
    for i in (0, 3) if n > 3 else (0,):
        value = parts[i].strip()
        if value:
            if " " in value or "\t" in value:
                value = dt.code(value)
            found: dict[str, Any] = {}
            system = dt.code_system(parts[i + 2]) if n > i + 2 else None
            if system:
                found["system"] = system
            found["code"] = value
            display = parts[i + 1].strip() if n > i + 1 else ""
            if display:
                found["display"] = display
            codings.append(found)
    text = parts[8].strip() if n > 8 else ""
    if not text:
        for x in codings:
            if "display" in x:
                text = x["display"]
                break
        else:
            if not codings:
                text = (parts[1].strip() if n > 1 else "") or parts[0].strip()
    return dt.concept(codings, text)


def _cwe_code(ctx: MappingContext, rep: str) -> dict[str, Any] | None:
    """:func:`_cwe` of an observation or order code (OBX-3, OBR-4), cached by value
    when it has no escape or subcomponent: a lab sends the same codes over and over.
    Returns a fresh copy (callers may change it)."""
    if not rep:
        return None
    if ctx.esc_char in rep or ctx.sub_sep in rep:
        return _cwe(ctx, rep)
    return _copy_concept(_cached_cwe(rep, ctx.comp_sep))


def _copy_concept(found: dict[str, Any] | None) -> dict[str, Any] | None:
    """A fresh copy of a cached CodeableConcept (``coding`` and ``text`` only)."""
    if found is None:
        return None
    out = found.copy()  # the cached maps hold "coding" and "text" only
    codings = out.get("coding")
    if codings is not None:
        # One coding, the common case: no comprehension (a frame of its own).
        out["coding"] = [codings[0].copy()] if len(codings) == 1 else [x.copy() for x in codings]
    return out


@lru_cache(maxsize=1024)
def _cached_cwe(rep: str, comp: str) -> dict[str, Any] | None:
    """:func:`_split_cwe`, shared: never handed out without a copy."""
    return _split_cwe(rep, comp)


def _peek(ctx: MappingContext, seg: Segment, n: int) -> str:
    """:func:`_first` without marking the field as carried (to decide first)."""
    fields = seg.fields
    return _plain(ctx, fields[n]) if n < len(fields) and fields[n] else ""


def _first(ctx: MappingContext, seg: Segment, n: int) -> str:
    """Field ``n``'s first component of its first repetition, decoded and stripped
    (``""`` when empty; then nothing is marked, as there is nothing to carry)."""
    fields = seg.fields
    raw = fields[n] if n < len(fields) else ""
    if not raw:
        return ""
    seg.carried |= 1 << n
    return _plain(ctx, raw)


def _map_value(
    ctx: MappingContext,
    obx: Segment,
    value_type: str,
    units: Components,
    code: dict[str, Any],
    obs: dict[str, Any],
    extensions: list[dict[str, Any]],
) -> bool:
    """Put OBX-5 (non-empty) on ``obs`` as value[x] or components; False when none.

    OBX-5 of a type with no FHIR value is not read, so it shows as unmapped.
    """
    if value_type in _TEXT_TYPES or not value_type:
        # Without OBX-2 the value is carried as the text it is.
        text = _text_value(ctx, obx, value_type or "ST")
        if text is None:
            return False
        obs["valueString"] = text
        return True
    if value_type not in _SUPPORTED_TYPES:
        return False
    reps = obx.reps(5)
    if len(reps) == 1:
        fragment = _value_fragment(ctx, value_type, reps[0], units, component=False)
        if fragment is None:
            return False
        for key, val in fragment.items():
            if key == "extension":
                extensions.extend(val)
            else:
                obs[key] = val
        return True
    # IG: a repeating OBX-5 (other than NA) becomes components with the same code.
    components = []
    for rep in reps:
        fragment = _value_fragment(ctx, value_type, rep, units, component=True)
        if fragment is not None:
            components.append({"code": code, **fragment})
    if not components:
        return False
    obs["component"] = components
    return True


def _text_value(ctx: MappingContext, obx: Segment, value_type: str) -> str | None:
    """ST/TX/FT: repetitions joined with a line break, escapes decoded.

    ST is trimmed; TX and FT keep their leading spaces and blank lines (they
    are layout), only blank lines at the very start and end are dropped.
    """
    raw = obx.raw(5)
    sep = ctx.enc.repetition
    parts = raw.split(sep) if sep in raw else [raw]
    decode = ctx.decode
    if value_type == "ST":
        lines = [s for p in parts if p and (s := decode(p).strip())]
        text = "\n".join(lines)
    else:
        text = "\n".join(decode(p).rstrip() for p in parts).strip("\n")
    return text if text.strip() else None


def _value_fragment(
    ctx: MappingContext, value_type: str, rep: str, units: Components, *, component: bool
) -> dict[str, Any] | None:
    """One repetition of OBX-5 as ``{"valueX": ...}`` (or an extension for ED/RP)."""
    c = Components(ctx, rep)
    if value_type == "NM":
        return {"valueQuantity": dt.quantity(c.text(1), units, "OBX-5")}
    if value_type == "SN":
        return _structured_numeric(c, units)
    if value_type in _CODED_TYPES:
        concept = _cwe(ctx, rep)
        return {"valueCodeableConcept": concept} if concept else None
    if value_type in ("IS", "ID"):
        value = dt.code(c.text(1))
        return {"valueCodeableConcept": {"coding": [{"code": value}]}} if value else None
    if value_type in ("DT", "DTM", "TS"):
        when = _date_time(ctx, c.text(1), "OBX-5")
        return {"valueDateTime": when} if when else None
    if value_type == "TM":
        return _time_value(c.text(1))
    if value_type == "DR":
        period = {}
        start = _date_time(ctx, c.subs(1).text(1), "OBX-5.1")
        end = _date_time(ctx, c.subs(2).text(1), "OBX-5.2")
        if start:
            period["start"] = start
        if end:
            period["end"] = end
        return {"valuePeriod": period} if period else None
    if value_type == "NR":
        low, high = c.text(1), c.text(2)
        rng = {}
        if low:
            rng["low"] = dt.quantity(low, units, "OBX-5.1")
        if high:
            rng["high"] = dt.quantity(high, units, "OBX-5.2")
        return {"valueRange": rng} if rng else None
    if value_type == "CQ":
        cq_units = c.subs(2) if c.part(2) else units
        return {"valueQuantity": dt.quantity(c.text(1), cq_units, "OBX-5.1")}
    if value_type == "MO":
        money = dt.quantity(c.text(1), Components(ctx, ""), "OBX-5.1")
        currency = dt.code(c.text(2))
        if currency:
            money.update(unit=currency, system="urn:iso:std:iso:4217", code=currency)
        return {"valueQuantity": money}
    url = COMPONENT_VALUE_EXT if component else OBSERVATION_VALUE_EXT
    attachment = _ed_attachment(ctx, c) if value_type == "ED" else _rp_attachment(c)
    if attachment is None:
        return None
    return {"extension": [{"url": url, "valueAttachment": attachment}]}


def _structured_numeric(c: Components, units: Components) -> dict[str, Any]:
    """SN → Quantity (with comparator), Range (n1-n2), Ratio (n1:n2, n1/n2) or string."""
    comparator, num1, separator, num2 = c.text(1), c.text(2), c.text(3), c.text(4)
    if comparator != "<>":
        if not separator and not num2 and num1:
            quantity = dt.quantity(num1, units, "OBX-5.2")
            if comparator in _SN_COMPARATORS:
                quantity["comparator"] = comparator
            elif comparator not in ("", "="):
                raise DataTypeError(
                    "SN comparator is not one of < > <= >= = <>", location="OBX-5.1"
                )
            return {"valueQuantity": quantity}
        if separator in (":", "/") and num1 and num2:
            numerator = dt.quantity(num1, units, "OBX-5.2")
            if comparator in _SN_COMPARATORS:
                numerator["comparator"] = comparator
            return {
                "valueRatio": {
                    "numerator": numerator,
                    "denominator": dt.quantity(num2, units, "OBX-5.4"),
                }
            }
        if separator == "-" and num1 and num2 and comparator in ("", "="):
            return {
                "valueRange": {
                    "low": dt.quantity(num1, units, "OBX-5.2"),
                    "high": dt.quantity(num2, units, "OBX-5.4"),
                }
            }
    # "<>" (not equal), the "+" suffix ("2+"), and anything else: the value as written.
    text = f"{comparator}{num1}{separator}{num2}"
    unit = units.text(2) or units.text(1)
    if unit:
        text = f"{text} {unit}"
    if not text.strip():
        raise DataTypeError("SN value has no number", location="OBX-5")
    return {"valueString": text}


def _time_value(value: str) -> dict[str, Any] | None:
    """TM → FHIR time; a UTC offset (FHIR time has none) goes in the tz-offset extension."""
    value = value.strip()
    if not value:
        return None
    m = _TM_RE.fullmatch(value)
    if m is None:
        raise DataTypeError("not an HL7 time", location="OBX-5")
    hh, mi, ss, frac, sign, oh, om = m.groups()
    if int(hh) > 23 or int(mi or 0) > 59 or int(ss or 0) > 59:
        raise DataTypeError("not a valid time of day", location="OBX-5")
    time = f"{hh}:{mi or '00'}:{ss or '00'}"
    if frac:
        time += f".{frac}"
    out: dict[str, Any] = {"valueTime": time}
    if sign:
        out["_valueTime"] = {
            "extension": [{"url": TZ_OFFSET_EXT, "valueString": f"{sign}{oh}:{om}"}]
        }
    return out


def _mime_type(kind: str, subtype: str) -> str | None:
    known = _MIME_SUBTYPE.get(subtype.upper())
    if known:
        return known
    major = _MIME_TYPE.get(kind.upper())
    if major and subtype and _MIME_TOKEN_RE.fullmatch(subtype):
        return f"{major}/{subtype.lower()}"
    return None


def _ed_attachment(ctx: MappingContext, c: Components) -> dict[str, Any] | None:
    """ED (source^type^subtype^encoding^data) → Attachment; the data as base64."""
    attachment: dict[str, Any] = {}
    content_type = _mime_type(c.text(2), c.text(3))
    if content_type:
        attachment["contentType"] = content_type
    data = c.text(5)
    if data:
        encoding = c.text(4).upper()
        if encoding == "BASE64":
            data = "".join(data.split())
            try:
                binascii.a2b_base64(data, strict_mode=True)
            except binascii.Error:
                raise DataTypeError("ED data is not valid base64", location="OBX-5.5") from None
        elif encoding == "HEX":
            try:
                data = b64encode(bytes.fromhex(data)).decode("ascii")
            except ValueError:
                raise DataTypeError("ED data is not valid hex", location="OBX-5.5") from None
        elif encoding in ("A", ""):
            data = b64encode(data.encode(ctx.msg.codec, "replace")).decode("ascii")
        else:
            raise TableValueNotFound("ED encoding is not A, Hex or Base64", location="OBX-5.4")
        attachment["data"] = data
    return attachment or None


def _rp_attachment(c: Components) -> dict[str, Any] | None:
    """RP (pointer^application^type^subtype) → Attachment.url (+ contentType)."""
    pointer = c.text(1)
    if not pointer:
        return None
    attachment: dict[str, Any] = {}
    content_type = _mime_type(c.text(3), c.text(4))
    if content_type:
        attachment["contentType"] = content_type
    attachment["url"] = pointer
    return attachment


def _interpretation(ctx: MappingContext, rep: str) -> dict[str, Any] | None:
    """OBX-8 (IS, or CWE from v2.7) → CodeableConcept; table 0078 codes unchanged."""
    comp = ctx.enc.component
    if comp in rep or ctx.enc.escape in rep:
        c = Components(ctx, rep)
        value, display_sent, system = dt.code(c.text(1)), c.text(2), c.text(3).upper()
    else:  # a bare code (IS), nearly always one of a few: mapped once, copied
        return _copy_concept(_cached_interpretation(rep, comp))
    return _interpretation_of(ctx, rep, value, display_sent, system)


@lru_cache(maxsize=256)
def _cached_interpretation(rep: str, comp: str) -> dict[str, Any] | None:
    """:func:`_interpretation` of a bare code (no component, no escape), shared:
    never handed out without a copy."""
    value = dt.code(rep)
    if value:
        return _interpretation_of(None, rep, value, "", "")
    return _split_cwe(rep, comp) if rep else None


#: OBX-8 coding system names that mean table 0078: none (the field's own table), its
#: table 0396 name, and ``HL7nnnn``, table 0396's pattern for "the HL7 table of this
#: field" that some senders copy literally.
_TABLE_0078_NAMES: Final = frozenset({"", "HL70078", "HL7NNNN"})


def _interpretation_of(
    ctx: MappingContext | None, rep: str, value: str, display_sent: str, system: str
) -> dict[str, Any] | None:
    """:func:`_interpretation` once OBX-8's code, display and system are read;
    ``ctx`` None when the code has a value and no system (no CWE map needed)."""
    if value and system in _TABLE_0078_NAMES:
        display = INTERPRETATION_DISPLAY.get(value)
        if display is not None:
            return {
                "coding": [{"system": INTERPRETATION_SYSTEM, "code": value, "display": display}]
            }
        # Not in the FHIR code system: keep what was sent, as text.
        return {"text": display_sent or value}
    assert ctx is not None  # only the uncached path (ctx given) gets here
    return _cwe(ctx, rep)


def _absent_reason(ctx: MappingContext, obx: Segment, status_code: str) -> dict[str, Any] | None:
    if status_code in ("X", "N"):
        reason = "not-performed" if status_code == "X" else "not-asked"
        return {"coding": [{"system": DATA_ABSENT_SYSTEM, "code": reason}]}
    return dt.codeable_concept(ctx, obx.comps(32)) if obx.present(32) else None


def _reference_range(
    text: str,
    unit_part: dict[str, str] | None,
    ctx: MappingContext,
    obx: Segment,
    value_type: str,
) -> dict[str, Any] | None:
    """OBX-7 → referenceRange: the text as sent, low/high when it reads as a range.

    ``unit_part`` is OBX-6 as :func:`_unit_part` maps it; None when it must be read
    through :func:`dt.quantity` (units with escapes, subcomponents, repetitions)."""
    if not text:
        return None
    out: dict[str, Any] = {}
    m = _RANGE_RE.fullmatch(text)
    if m is not None:
        if unit_part is not None:
            out["low"] = {"value": dt.number(m.group(1), "OBX-7"), **unit_part}
            out["high"] = {"value": dt.number(m.group(2), "OBX-7"), **unit_part}
        else:
            units = _units(ctx, obx, value_type)
            out["low"] = dt.quantity(m.group(1), units, "OBX-7")
            out["high"] = dt.quantity(m.group(2), units, "OBX-7")
    else:
        b = _BOUND_RE.fullmatch(text)
        if b is not None:
            side = "low" if b.group(1) in (">", ">=", "\u2265") else "high"
            if unit_part is not None:
                out[side] = {"value": dt.number(b.group(2), "OBX-7"), **unit_part}
            else:
                out[side] = dt.quantity(b.group(2), _units(ctx, obx, value_type), "OBX-7")
    out["text"] = text
    return out


#: OBX-6 of a value type with no units, or empty.
_NO_UNITS: Final[dict[str, str]] = {}


def _units(ctx: MappingContext, obx: Segment, value_type: str) -> Components:
    """OBX-6 as components (the general path; see :func:`_unit_part`)."""
    if obx.present(6) and value_type in _UNIT_TYPES:
        return obx.comps(6)
    return Components(ctx, "")


@lru_cache(maxsize=1024)
def _unit_part(raw: str, comp: str) -> dict[str, str]:
    """OBX-6 with no repetition, escape or subcomponent → the units of its
    quantities (:func:`dt.unit_fields`), by value: a lab sends a few units over and
    over. The dict is shared: callers copy it (``{"value": ..., **part}``)."""
    parts = [p.strip() for p in raw.split(comp)[:3]]
    parts += [""] * (3 - len(parts))
    return dt.unit_fields(parts[0], parts[1], parts[2])


#: OBX-15/16/23/24/25 already mapped in a message, by their content: the
#: performing lab and its director are the same on every OBX of a report. The
#: value is the performer references and the fields that carried them.
#: (Kept in ``ctx.memo``: a plain dict per message, cheaper than a weak mapping.)
_PERFORMERS: Final = "oru.performers"
_PERFORMER_FIELDS: Final = (15, 16, 23, 24, 25)


def _performers_of(ctx: MappingContext, obx: Segment, f: list[str]) -> list[str]:
    """:func:`_obx_performers` once per distinct content in a message."""
    content = (f[15], f[16], f[23], f[24], f[25])
    seen: dict[tuple[str, ...], tuple[list[str], tuple[int, ...]]] = ctx.memo.setdefault(
        _PERFORMERS, {}
    )
    found = seen.get(content)
    if found is not None:
        obx.consume(*found[1])
        return found[0]
    refs = _obx_performers(ctx, obx)
    unread = set(obx.unused())
    seen[content] = (refs, tuple(n for n in _PERFORMER_FIELDS if f[n] and n not in unread))
    return refs


def _obx_performers(ctx: MappingContext, obx: Segment) -> list[str]:
    """OBX-16 responsible observers, OBX-15 producer, OBX-23/24/25 performing lab."""
    performers = [r for x in obx.reps(16) if (r := _practitioner(ctx, x))]
    producer = obx.comps(15)
    if producer and producer.text(1):
        org: dict[str, Any] = {"resourceType": "Organization"}
        system = dt.code_system(producer.text(3))
        ident: dict[str, Any] = {"value": producer.text(1)}
        if system:
            ident["system"] = system
        org["identifier"] = [ident]
        if producer.text(2):
            org["name"] = producer.text(2)
        org["id"] = uuid5_str(f"Organization|{system or ''}|{producer.text(1)}|producer")
        performers.append(ctx.add(org))
    lab = dt.organization(ctx, obx.comps(23))
    if lab:
        address = dt.address(obx.comps(24))
        resource = ctx.get(lab)
        if address and resource is not None and "address" not in resource:
            resource["address"] = [address]
        director = _practitioner(ctx, _first_rep(ctx, obx, 25))
        if director:
            role = {
                "resourceType": "PractitionerRole",
                "id": uuid5_str(f"PractitionerRole|MDIR|{director}|{lab}"),
                "practitioner": {"reference": director},
                "organization": {"reference": lab},
                "code": [
                    {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/v2-0912",
                                "code": "MDIR",
                            }
                        ]
                    }
                ],
            }
            performers.append(ctx.add(role))
        else:
            performers.append(lab)
    return performers


def _device(ctx: MappingContext, c: Components) -> str | None:
    """OBX-18 equipment instance identifier (EI) → a Device with that identifier."""
    ident = dt.entity_identifier(ctx, c)
    if ident is None:
        return None
    device = {
        "resourceType": "Device",
        "id": uuid5_str(f"Device|{ident.get('system', '')}|{ident['value']}"),
        "identifier": [ident],
    }
    return ctx.add(device)


# --- NTE -------------------------------------------------------------------------------


#: Practitioners already mapped in a message, by their XCN as sent: one message
#: names the same ordering provider or collector on every OBR.
#: (The ``ctx.memo`` key: a plain dict per message, cheaper than a weak mapping.)
_PRACTITIONERS: Final = "oru.practitioners"


def _practitioner(ctx: MappingContext, rep: str) -> str | None:
    """XCN (one repetition, raw) → :func:`dt.practitioner`, once per message."""
    if not rep:
        return None
    seen: dict[str, str | None] | None = ctx.memo.get(_PRACTITIONERS)
    if seen is None:
        seen = ctx.memo[_PRACTITIONERS] = {}
    elif rep in seen:
        return seen[rep]
    ref = seen[rep] = dt.practitioner(ctx, Components(ctx, rep))
    return ref


def _notes_after(ctx: MappingContext, anchor: Segment) -> list[Segment]:
    """The NTE segments that follow ``anchor`` (PRT segments between them skipped)."""
    out = []
    for seg in ctx.segments[anchor.index + 1 :]:
        if seg.name == "NTE":
            out.append(seg)
        elif seg.name != "PRT":
            break
    return out


def _note(ctx: MappingContext, nte: Segment) -> dict[str, Any] | None:
    """NTE → Annotation (NTE-3 lines joined, NTE-5 author, NTE-6 time)."""
    nte.consume(1)
    decode = ctx.decode
    text = "\n".join(decode(r).rstrip() for r in nte.reps(3)).strip("\n")
    if not text.strip():
        return None
    note: dict[str, Any] = {}
    author = _practitioner(ctx, _first_rep(ctx, nte, 5))
    if author:
        note["authorReference"] = {"reference": author}
    when = _date_time(ctx, nte.comps(6).text(1), "NTE-6")
    if when:
        note["time"] = when
    note["text"] = text
    return note


# --- groups ----------------------------------------------------------------------------


@dataclass(slots=True)
class _SpecimenGroup:
    spm: Segment
    observations: list[tuple[Segment, list[Segment]]] = field(default_factory=list)


@dataclass(slots=True)
class _OrderGroup:
    orc: Segment | None
    obr: Segment
    notes: list[Segment] = field(default_factory=list)
    observations: list[tuple[Segment, list[Segment]]] = field(default_factory=list)
    specimens: list[_SpecimenGroup] = field(default_factory=list)


@dataclass(slots=True)
class _Groups:
    patient_observations: list[tuple[Segment, list[Segment]]] = field(default_factory=list)
    orders: list[_OrderGroup] = field(default_factory=list)
    orphan_specimens: list[Segment] = field(default_factory=list)


def _groups(ctx: MappingContext) -> _Groups:
    out = _Groups()
    first_pid: Segment | None = None
    pending_orc: Segment | None = None
    order: _OrderGroup | None = None
    specimen: _SpecimenGroup | None = None
    notes: list[Segment] | None = None  # where the next NTE belongs
    for seg in ctx.segments:
        name = seg.name
        if name == "OBX":
            entry: tuple[Segment, list[Segment]] = (seg, [])
            if order is None:
                out.patient_observations.append(entry)
            elif specimen is not None:
                specimen.observations.append(entry)
            else:
                order.observations.append(entry)
            notes = entry[1]
        elif name == "NTE":
            if notes is not None:
                notes.append(seg)
        elif name == "PRT":
            continue  # participations sit between an OBX and its NTEs
        elif name == "OBR":
            order = _OrderGroup(pending_orc, seg)
            out.orders.append(order)
            pending_orc, specimen, notes = None, None, order.notes
        elif name == "ORC":
            pending_orc, order, specimen, notes = seg, None, None, None
        elif name == "SPM":
            notes = None
            if order is None:
                out.orphan_specimens.append(seg)
            else:
                specimen = _SpecimenGroup(seg)
                order.specimens.append(specimen)
        else:
            notes = None
            if name == "PID":
                if first_pid is None:
                    first_pid = seg
                else:
                    _check_same_patient(first_pid, seg)
    return out


def _check_same_patient(first: Segment, again: Segment) -> None:
    """One event is about one patient: a second PATIENT_RESULT group must repeat it."""
    if again.fields == first.fields:
        again.consume_all()  # carried by the Patient of the first
        return
    if again.fields[3:4] != first.fields[3:4]:
        raise SegmentSequenceError(
            "ORU with results for more than one patient: send one patient per message",
            location=f"PID#{again.index}",
        )


# --- the message -----------------------------------------------------------------------


@register("ORU")
def map_oru(ctx: MappingContext) -> None:
    """Map an ORU message's results (the Patient is already mapped)."""
    groups = _groups(ctx)
    for i, (obx, notes) in enumerate(groups.patient_observations):
        observation_from_obx(ctx, obx, key_prefix=f"{ctx.event_id}/patient/{i}", notes=notes)
    for spm in groups.orphan_specimens:
        _specimen_from_spm(ctx, spm, f"{ctx.event_id}/specimen/{spm.index}")
    for n, order in enumerate(groups.orders):
        _map_order(ctx, order, n)


#: The ADT family's PV1 → Encounter map, when it offers one by this name.


def _map_order(ctx: MappingContext, group: _OrderGroup, n: int) -> None:
    orc, obr = group.orc, group.obr
    obr.carried |= 1 << 1  # set id
    if orc is not None and _plain(ctx, orc.fields[1] if len(orc.fields) > 1 else "") == "RE":
        orc.consume(1)  # order control RE, "observations to follow": the message itself

    placer = _order_number(ctx, orc, obr, 2, "PLAC")
    filler = _order_number(ctx, orc, obr, 3, "FILL")
    identifiers = [x for x in (*placer, *filler) if x]
    if orc is not None and orc.present(4):
        group_number = dt.entity_identifier(ctx, orc.comps(4).subs(1), "PGN")
        if group_number:
            identifiers.append(group_number)

    key = _business_key(ctx, filler[0] if filler else None) or _business_key(
        ctx, placer[0] if placer else None
    )
    group_key = f"FILL|{key}" if filler and key else (f"PLAC|{key}" if key else None)
    if group_key is None:
        group_key = f"{ctx.event_id}/order/{n}"

    code = _cwe_code(ctx, _first_rep(ctx, obr, 4)) or _unknown_code()
    subject = {"reference": ctx.patient_ref} if ctx.patient_ref else None
    encounter = {"reference": ctx.encounter_ref} if ctx.encounter_ref else None

    report_id = _unique_id(ctx, f"DiagnosticReport|{group_key}", f"DiagnosticReport/{n}")
    report: dict[str, Any] = {"resourceType": "DiagnosticReport", "id": report_id}
    request_id = _unique_id(
        ctx, _service_request_key(ctx, placer, filler, code, n), f"ServiceRequest/{n}"
    )
    request: dict[str, Any] = {"resourceType": "ServiceRequest", "id": request_id}
    ctx.add(report)
    request_ref = ctx.add(request)

    # Specimens first: the Observations and the report reference them.
    specimen_refs: list[str] = []
    for s, spec in enumerate(group.specimens):
        specimen_refs.append(_specimen_from_spm(ctx, spec.spm, f"{group_key}|SPM|{s}"))
    obr_specimen = _specimen_from_obr(ctx, obr, group_key, specimen_refs)
    if obr_specimen:
        specimen_refs.append(obr_specimen)
    first_specimen = specimen_refs[0] if specimen_refs else None

    effective, period = _obr_effective(ctx, obr)
    results: list[dict[str, str]] = []
    supporting: list[dict[str, str]] = []
    based_on = [request_ref]  # read, never kept, by observation_from_obx: one list
    for obx, notes in group.observations:
        ref = observation_from_obx(
            ctx,
            obx,
            key_prefix=group_key,
            based_on=based_on,
            notes=notes,
            specimen=first_specimen,
            default_effective=effective,
        )
        kind = _first(ctx, obx, 29).upper()
        (supporting if kind in _ORDER_INFO_TYPES else results).append({"reference": ref})
    for s, spec in enumerate(group.specimens):
        for obx, notes in spec.observations:
            observation_from_obx(
                ctx,
                obx,
                key_prefix=f"{group_key}|SPM|{s}",
                based_on=based_on,
                notes=notes,
                specimen=specimen_refs[s],
                focus=specimen_refs[s],
            )

    # --- DiagnosticReport ---
    if identifiers:
        report["identifier"] = identifiers
    report["basedOn"] = [{"reference": request_ref}]
    status_code = _first(ctx, obr, 25).upper()
    if status_code in _REPORT_STATUS_ERRORS:
        raise TableValueNotFound(
            "OBR-25 says there is no order or no patient for this result", location="OBR-25"
        )
    report["status"] = DIAGNOSTIC_REPORT_STATUS.get(status_code, "unknown")
    if status_code and status_code not in _REPORT_STATUS_EQUIVALENT:
        report["_status"] = _alternate_code(V2_0123, status_code)
    section = dt.table_concept(
        _first(ctx, obr, 24), "http://terminology.hl7.org/CodeSystem/v2-0074"
    )
    if section:
        report["category"] = [section]
    report["code"] = code
    if subject:
        report["subject"] = subject
    if encounter:
        report["encounter"] = encounter
    if period:
        report["effectivePeriod"] = period
    elif effective:
        report["effectiveDateTime"] = effective
    issued = _issued(ctx, obr)
    if issued:
        report["issued"] = issued
    if obr.present(34) or obr.present(35):
        performers = [
            _with_function(r, "SPRF") for c in obr.each(34) if (r := _ndl_practitioner(ctx, c))
        ] + [_with_function(r, "TRANS") for c in obr.each(35) if (r := _ndl_practitioner(ctx, c))]
        if performers:
            report["performer"] = performers
    if obr.present(32):
        interpreters = [{"reference": r} for c in obr.each(32) if (r := _ndl_practitioner(ctx, c))]
        if interpreters:
            report["resultsInterpreter"] = interpreters
    if specimen_refs:
        report["specimen"] = [{"reference": r} for r in specimen_refs]
    if results:
        report["result"] = results
    report_notes = [x for nte in group.notes if (x := _note(ctx, nte))]
    if report_notes:
        report["extension"] = [{"url": REPORT_NOTE_EXT, "valueAnnotation": x} for x in report_notes]

    # --- ServiceRequest (the order the report answers) ---
    # OBR-53 alternate placer order numbers (CX): identifiers of the order only.
    alternates = (
        [x for c in obr.each(53) if (x := dt.identifier(ctx, c))] if obr.present(53) else []
    )
    for x in alternates:
        x.setdefault("type", {"coding": [{"system": dt.V2_0203, "code": "PLAC"}]})
    if identifiers or alternates:
        request["identifier"] = identifiers + alternates
    # Codes with no FHIR equivalent are left unread, so ``unmapped`` reports them.
    order_status = _ORDER_STATUS.get(_peek(ctx, orc, 5).upper()) if orc is not None else None
    if order_status and orc is not None:
        orc.consume(5)
    request["status"] = order_status or "unknown"
    request["intent"] = "order"
    if _peek(ctx, obr, 11).upper() == "G":
        obr.consume(11)
        request["intent"] = "reflex-order"
    priority = _PRIORITY.get(_peek(ctx, obr, 5).upper())
    if priority:
        obr.consume(5)
        request["priority"] = priority
    request["code"] = code
    if subject:
        request["subject"] = subject
    if encounter:
        request["encounter"] = encounter
    requested = _date_time(ctx, _first(ctx, obr, 6), "OBR-6")
    if requested:
        request["occurrenceDateTime"] = requested
    requester = _requester(ctx, orc, obr)
    if requester:
        request["requester"] = {"reference": requester}
    reasons = [x for r in obr.reps(31) if (x := _cwe(ctx, r))] if obr.present(31) else []
    if reasons:
        request["reasonCode"] = reasons
    if supporting:
        request["supportingInfo"] = supporting
    if specimen_refs:
        request["specimen"] = [{"reference": r} for r in specimen_refs]


def _order_number(
    ctx: MappingContext, orc: Segment | None, obr: Segment, n: int, type_code: str
) -> list[dict[str, Any]]:
    """ORC-n / OBR-n (placer 2, filler 3): ORC's first (IG), OBR's when it differs."""
    out = []
    if orc is not None and orc.present(n):
        ident = _entity_identifier(ctx, _first_rep(ctx, orc, n), type_code)
        if ident:
            out.append(ident)
    if obr.present(n):
        ident = _entity_identifier(ctx, _first_rep(ctx, obr, n), type_code)
        if ident and ident not in out:
            out.append(ident)
    return out


def _service_request_key(
    ctx: MappingContext,
    placer: list[dict[str, Any]],
    filler: list[dict[str, Any]],
    code: dict[str, Any],
    n: int,
) -> str:
    """The order's identity as the orders family keys it (placer, else filler, order
    number and the service code), so the ORM and the ORU of one order share the
    ServiceRequest id; event-scoped when the order has no number."""
    ident = placer[0] if placer else (filler[0] if filler else None)
    if ident is None:
        return f"{ctx.event_id}/ServiceRequest/{n}"
    scope = ident.get("system") or ctx.msg.header.sender_key
    coding = code.get("coding", [{}])[0]
    service = f"{coding.get('system', '')}|{coding.get('code', '')}"
    return f"ServiceRequest|{scope}|{ident['value']}|{service}"


def _entity_identifier(ctx: MappingContext, rep: str, type_code: str) -> dict[str, Any] | None:
    """EI (one repetition, raw) → :func:`dt.entity_identifier`; a bare number, the
    common case, without splitting it into components."""
    enc = ctx.enc
    if enc.component in rep or enc.escape in rep or enc.subcomponent in rep:
        return dt.entity_identifier(ctx, Components(ctx, rep), type_code)
    value = rep.strip()
    if not value:
        return None
    return {"type": {"coding": [{"system": V2_0203, "code": type_code}]}, "value": value}


def _business_key(ctx: MappingContext, ident: dict[str, Any] | None) -> str | None:
    """``system|value`` of an order number; without an authority, the sender's."""
    if ident is None:
        return None
    return f"{ident.get('system') or ctx.msg.header.sender_key}|{ident['value']}"


def _unique_id(ctx: MappingContext, business_key: str, event_key: str) -> str:
    rid = uuid5_str(business_key)
    if ctx.get(rid) is None:
        return rid
    return ctx.resource_id(event_key)  # the same order number twice in one message


def _obr_effective(ctx: MappingContext, obr: Segment) -> tuple[str | None, dict[str, str] | None]:
    start = _date_time(ctx, _first(ctx, obr, 7), "OBR-7")
    end = _date_time(ctx, _first(ctx, obr, 8), "OBR-8")
    if end:
        period = {"start": start, "end": end} if start else {"end": end}
        return start, period
    return start, None


def _issued(ctx: MappingContext, obr: Segment) -> str | None:
    """OBR-22 → instant, when it has a time: seconds default to 00 as in every HL7
    TS of minute precision, and a time without an offset is in the configured
    default zone (as every dateTime). A date alone is no instant: OBR-22 is then
    left unread, so ``unmapped`` reports it."""
    if not obr.present(22):
        return None
    when = _date_time(ctx, _plain(ctx, obr.fields[22]), "OBR-22")
    if when is None or "T" not in when:
        return None
    obr.consume(22)
    return when


def _with_function(reference: str, function: str) -> dict[str, Any]:
    return {
        "extension": [
            {
                "url": PERFORMER_FUNCTION_EXT,
                "valueCodeableConcept": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                            "code": function,
                        }
                    ]
                },
            }
        ],
        "reference": reference,
    }


def _ndl_practitioner(ctx: MappingContext, c: Components) -> str | None:
    """NDL (OBR-32..35): its CNN name (id&family&given&...&authority) → Practitioner."""
    subs = c.part(1).split(ctx.enc.subcomponent)
    if not any(subs):
        return None
    # CNN is XCN 1-8 with the authority's HD spread over 9-11: rebuild an XCN.
    xcn = ctx.enc.component.join([*subs[:8], ctx.enc.subcomponent.join(subs[8:11])])
    return _practitioner(ctx, xcn)


def _requester(ctx: MappingContext, orc: Segment | None, obr: Segment) -> str | None:
    """ORC-12 ordering provider, else OBR-16 (IG OBR[ServiceRequest]); with ORC-21
    ordering facility (ORC-22 address, ORC-23 phone) the requester is the
    PractitionerRole joining both, or the Organization alone (IG ORC[ServiceRequest])."""
    if orc is not None and orc.present(12):
        if obr.present(16) and obr.fields[16] == orc.fields[12]:
            obr.consume(16)  # the same provider, carried by ORC-12
        practitioner = _practitioner(ctx, _first_rep(ctx, orc, 12))
    else:
        practitioner = _practitioner(ctx, _first_rep(ctx, obr, 16))
    return with_ordering_facility(ctx, orc, practitioner) if orc is not None else practitioner


def with_ordering_facility(
    ctx: MappingContext, orc: Segment, practitioner: str | None
) -> str | None:
    """The requester once ORC-21 (ordering facility; ORC-22 address, ORC-23 phone) is
    known: a PractitionerRole joining the provider and the Organization, the
    Organization alone, or the provider alone (IG ORC[ServiceRequest])."""
    if not orc.present(21):
        return practitioner
    organization = dt.organization(ctx, orc.comps(21))
    found = ctx.get(organization) if organization else None
    if found is not None:
        addresses = [a for c in orc.each(22) if (a := dt.address(c))]
        telecom = [t for c in orc.each(23) if (t := dt.contact_point(c, "work"))]
        if addresses:
            found.setdefault("address", addresses)
        if telecom:
            found.setdefault("telecom", telecom)
    if organization is None or practitioner is None:
        return practitioner or organization
    role_id = uuid5_str(
        f"PractitionerRole|{practitioner.removeprefix('urn:uuid:')}|"
        f"{organization.removeprefix('urn:uuid:')}"
    )
    return ctx.add(
        {
            "resourceType": "PractitionerRole",
            "id": role_id,
            "practitioner": {"reference": practitioner},
            "organization": {"reference": organization},
        }
    )


# --- Specimen --------------------------------------------------------------------------


def _concept(ctx: MappingContext, rep: str, default_system: str) -> dict[str, Any] | None:
    """CWE → CodeableConcept; a code sent without a coding system is from the v2
    table the field is bound to (``default_system``). A fresh copy of the cached
    map (:func:`_cwe_code`): specimen types and the like repeat in every message."""
    concept = _cwe_code(ctx, rep)
    if concept is None or "coding" not in concept:
        return concept
    first = concept["coding"][0]
    if "system" not in first and rep.split(ctx.enc.component, 1)[0].strip():
        first["system"] = default_system
    return concept


#: SPM segments already mapped in a message, by content: the same specimen (same
#: identifiers) is often repeated under every OBR it was used for. The value is
#: the Specimen reference and the fields the first one carried (its bit mask).
#: Kept in ``ctx.memo``, so it lives as long as the message.
_SPECIMENS: Final = "oru.specimens"


def _specimen_from_spm(ctx: MappingContext, spm: Segment, event_key: str) -> str:
    """SPM → Specimen (IG SPM[Specimen]); id from its identifiers when it has them."""
    if not (spm.present(2) or spm.present(31)):
        return _map_spm(ctx, spm, event_key)
    seen: dict[tuple[str, ...], tuple[str, int]] = ctx.memo.setdefault(_SPECIMENS, {})
    content = tuple(spm.fields)
    if content in seen:
        ref, carried = seen[content]
        # Carried by the Specimen of the identical first one, field for field.
        spm.carried |= carried
        return ref
    ref = _map_spm(ctx, spm, event_key)
    seen[content] = (ref, spm.carried)
    return ref


def _map_spm(ctx: MappingContext, spm: Segment, event_key: str) -> str:
    fields = spm.fields
    # The valued fields, found in one pass (C-speed): most SPM fields are empty.
    has = frozenset(compress(range(len(fields)), fields)).__contains__
    spm.carried |= 1 << 1
    specimen: dict[str, Any] = {"resourceType": "Specimen"}
    identifiers = []
    if has(2):
        eip = spm.comps(2)
        sub = ctx.sub_sep
        for part, type_code in ((1, "PLAC"), (2, "FILL")):
            raw = eip.part(part)
            if not raw:
                continue
            found = (
                dt.entity_identifier(ctx, eip.subs(part), type_code)
                if sub in raw
                else _entity_identifier(ctx, raw, type_code)  # a bare number
            )
            if found:
                identifiers.append(found)
    if has(31):
        identifiers += [x for c in spm.each(31) if (x := dt.identifier(ctx, c))]
    # The same key as the orders family's: one specimen, one id, whatever message.
    if len(identifiers) == 1:  # the common case: no generator
        x = identifiers[0]
        key = f"{x.get('system', ctx.msg.header.sender_key)}|{x['value']}"
    else:
        key = "|".join(
            f"{x.get('system', ctx.msg.header.sender_key)}|{x['value']}" for x in identifiers
        )
    specimen["id"] = uuid5_str(f"Specimen|{key or event_key}")
    if identifiers:
        specimen["identifier"] = identifiers
    if has(30):
        accession = dt.identifier(ctx, spm.comps(30))
        if accession:
            specimen["accessionIdentifier"] = accession
    if has(20):
        available = _first(ctx, spm, 20).upper()
        if available in ("Y", "N"):
            specimen["status"] = "available" if available == "Y" else "unavailable"
    if has(4):
        kind = _concept(ctx, _first_rep(ctx, spm, 4), f"{_V2}0487")
        if kind:
            specimen["type"] = kind
    if ctx.patient_ref:
        specimen["subject"] = {"reference": ctx.patient_ref}
    if has(18):
        received = _date_time(ctx, _first(ctx, spm, 18), "SPM-18")
        if received:
            specimen["receivedTime"] = received

    collection: dict[str, Any] = {}
    if has(17):
        collected = spm.comps(17)
        # text(i) is the first subcomponent of component i (DR: TS^TS, TS = DTM&...).
        start = _date_time(ctx, collected.text(1), "SPM-17.1")
        end = _date_time(ctx, collected.text(2), "SPM-17.2")
        if end:
            collection["collectedPeriod"] = {"start": start, "end": end} if start else {"end": end}
        elif start:
            collection["collectedDateTime"] = start
    if has(12):
        amount = spm.comps(12)
        if amount.text(1):
            collection["quantity"] = dt.quantity(amount.text(1), amount.subs(2), "SPM-12")
    if has(7):
        method = _concept(ctx, _first_rep(ctx, spm, 7), f"{_V2}0488")
        if method:
            collection["method"] = method
    if has(8):
        site = _cwe(ctx, _first_rep(ctx, spm, 8))
        if site:
            collection["bodySite"] = site
    if collection:
        specimen["collection"] = collection

    if has(27) or has(6):
        container: dict[str, Any] = {}
        container_type = _cwe(ctx, _first_rep(ctx, spm, 27))
        if container_type:
            container["type"] = container_type
        additive = _concept(ctx, _first_rep(ctx, spm, 6), f"{_V2}0371")
        if additive:
            container["additiveCodeableConcept"] = additive
        if container:
            specimen["container"] = [container]
    if has(24):
        conditions = [x for r in spm.reps(24) if (x := _concept(ctx, r, f"{_V2}0493"))]
        if conditions:
            specimen["condition"] = conditions
    if has(14):
        notes = [{"text": t} for r in spm.reps(14) if (t := ctx.decode(r).strip())]
        if notes:
            specimen["note"] = notes
    return ctx.add(specimen)


def _subs_as_components(ctx: MappingContext, raw: str) -> str:
    """A CWE held in subcomponents (SPS-1 ``BLD&Blood&HL70070``) as a CWE of its own."""
    return raw.replace(ctx.enc.subcomponent, ctx.enc.component)


def _specimen_from_obr(
    ctx: MappingContext, obr: Segment, group_key: str, spm_refs: list[str]
) -> str | None:
    """OBR-9/10/14/15/39 (IG OBR[Specimen]): a Specimen of their own when the group
    has no SPM (v2.3); otherwise what they add to the first SPM's Specimen."""
    fields = obr.fields
    has = frozenset(compress(range(len(fields)), fields)).__contains__
    if not (has(9) or has(10) or has(14) or has(15) or has(39)):
        return None
    target: dict[str, Any]
    found = ctx.get(spm_refs[0]) if spm_refs else None
    if found is not None:
        target = found
    else:
        target = {"resourceType": "Specimen", "id": uuid5_str(f"Specimen|{group_key}|OBR")}
        if ctx.patient_ref:
            target["subject"] = {"reference": ctx.patient_ref}
    collection: dict[str, Any] = target.setdefault("collection", {})
    if has(15):
        # SPS (v2.5) / CM (v2.3): source^additives^collection method^body site^...
        source = obr.comps(15)
        kind = _concept(ctx, _subs_as_components(ctx, source.part(1)), f"{_V2}0070")
        if kind:
            target.setdefault("type", kind)
        additive = _concept(ctx, _subs_as_components(ctx, source.part(2)), f"{_V2}0371")
        if additive and "container" not in target:
            target["container"] = [{"additiveCodeableConcept": additive}]
        if source.text(3):
            collection.setdefault("method", {"text": source.text(3)})
        site = _cwe(ctx, _subs_as_components(ctx, source.part(4)))
        if site:
            collection.setdefault("bodySite", site)
    if has(14):
        received = _date_time(ctx, _first(ctx, obr, 14), "OBR-14")
        if received:
            target.setdefault("receivedTime", received)
    if has(9):
        volume = obr.comps(9)
        if volume.text(1):
            collection.setdefault("quantity", dt.quantity(volume.text(1), volume.subs(2), "OBR-9"))
    if has(10):
        collector = _practitioner(ctx, _first_rep(ctx, obr, 10))
        if collector:
            collection.setdefault("collector", {"reference": collector})
    if found is None and "collectedDateTime" not in collection:
        start, period = _obr_effective(ctx, obr)
        if period:
            collection["collectedPeriod"] = period
        elif start:
            collection["collectedDateTime"] = start
    if not collection:
        del target["collection"]
    if has(39):
        comments = [{"text": t} for c in obr.each(39) if (t := c.text(9) or c.text(2) or c.text(1))]
        if comments:
            target.setdefault("note", []).extend(comments)
    if found is not None:
        return None
    return ctx.add(target)
