"""ADT (A01-A62) → Encounter, RelatedPerson, AllergyIntolerance, Condition, Procedure,
Coverage, Account (PID-18, GT1 guarantors), Observation and Provenance; patient merges
(A40 …) → ``Patient.link``.

Follows the v2-to-FHIR IG's segment maps (PV1/PV2[Encounter], NK1[RelatedPerson],
AL1[AllergyIntolerance], IAM[AllergyIntolerance], DG1[Condition], PR1[Procedure], IN1[Coverage],
EVN[Provenance]) and its ConceptMaps for tables 0004, 0063, 0127, 0128 and 0217.
The Patient itself (PID, PD1) is :mod:`bridge.normalize.patient`.

The message is walked in order: a PID starts a patient group (A40, A41 and A47
repeat PID/MRG, A45 repeats MRG/PV1), and the segments after it belong to that
patient and to the visit of the last PV1. ``ctx.encounter_ref`` is the first
visit's Encounter. The other families' messages carry the same patient-level
segments in their PATIENT group: :func:`map_patient_group` maps them there.

Encounter.status
    The trigger event says it where the event is a state change: A01, A02, A04,
    A06, A07, A09, A10, A12, A13, A15, A16, A22, A25, A26 ``in-progress``; A03
    ``finished``; A05, A14 ``planned``; A21 ``onleave``; A11 (cancel admit), A27
    (cancel pending admit), A38 (cancel pre-admit) ``cancelled`` (R4: "ended
    before it began"; HL7 cannot tell an erroneous admit from a decision not to
    admit, so not ``entered-in-error``). A12 and A13 undo a transfer or a
    discharge: the visit is ``in-progress`` again; the A12 prior location (the
    cancelled one) and the A13 discharge time (the cancelled discharge) are not
    carried and so are reported (A25, cancel pending discharge, likewise leaves
    PV1-45 out). Any other event (A08 and the person-level
    events) uses the IG's rule: ``finished`` when PV1-45 is valued, else the
    table 0004 → encounter-status ConceptMap.

Ids: an Encounter's id is a UUIDv5 of its visit number (PV1-19 with its
authority; without an authority, scoped by MSH-3/MSH-4), so every message about
one visit updates one Encounter. AllergyIntolerance: patient and allergen code.
Condition (DG1-20), Procedure (PR1-19): their identifiers. Coverage: patient,
payor and policy number. Otherwise ids are scoped to the event.

Not mapped (reported in ``unmapped``): ROL, ACC, ARV, DB1, PDA, RF1, UB1,
UB2, NTE, PRT; PV1-20…35, PV1-39…41, PV1-46…49, PV1-51, PV1-53/54; most of PV2, IN1,
IN2 and GT1 (a SEL guarantor's own fields; spouse, employer, financial details); MRG-3
(the prior account); MRG-1 of an event that is not a patient merge when it names
another patient than PID-3.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

from bridge.normalize import datatypes as dt
from bridge.normalize.bundle import register
from bridge.normalize.context import Components, MappingContext, Segment
from bridge.normalize.families.oru import observation_from_obx
from bridge.normalize.ids import patient_resource_id, uuid5_str
from bridge.normalize.patient import (
    GENDER,
    SSN_SYSTEM,
    key_from_cx_list,
    language_concept,
    map_patient,
    patient_key_of,
)

V2_0003: Final = "http://terminology.hl7.org/CodeSystem/v2-0003"
V2_0004: Final = "http://terminology.hl7.org/CodeSystem/v2-0004"
V3_ACT_CODE: Final = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
V3_ACT_PRIORITY: Final = "http://terminology.hl7.org/CodeSystem/v3-ActPriority"
V3_PARTICIPATION_TYPE: Final = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
V3_ROLE_CODE: Final = "http://terminology.hl7.org/CodeSystem/v3-RoleCode"
V2_0131: Final = "http://terminology.hl7.org/CodeSystem/v2-0131"
V2_0063: Final = "http://terminology.hl7.org/CodeSystem/v2-0063"
V2_0052: Final = "http://terminology.hl7.org/CodeSystem/v2-0052"
DIAGNOSIS_ROLE: Final = "http://terminology.hl7.org/CodeSystem/diagnosis-role"
CONDITION_CATEGORY: Final = "http://terminology.hl7.org/CodeSystem/condition-category"
CONDITION_VER_STATUS: Final = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
ALLERGY_CLINICAL: Final = "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical"
ALLERGY_VERIFICATION: Final = (
    "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification"
)
COVERAGE_CLASS: Final = "http://terminology.hl7.org/CodeSystem/coverage-class"
SUBSCRIBER_RELATIONSHIP: Final = "http://terminology.hl7.org/CodeSystem/subscriber-relationship"
PROVENANCE_AGENT_TYPE: Final = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
#: R5 Encounter.plannedStartDate / plannedEndDate as R4 extensions (PV2-8, PV2-9; IG).
EXT_PLANNED_START: Final = (
    "http://hl7.org/fhir/5.0/StructureDefinition/extension-Encounter.plannedStartDate"
)
EXT_PLANNED_END: Final = (
    "http://hl7.org/fhir/5.0/StructureDefinition/extension-Encounter.plannedEndDate"
)
DATA_ABSENT_REASON: Final = "http://hl7.org/fhir/StructureDefinition/data-absent-reason"
SNOMED: Final = "http://snomed.info/sct"
UCUM: Final = "http://unitsofmeasure.org"
#: FHIR integer / positiveInt upper bound (32-bit signed).
MAX_INT: Final = 2_147_483_647
_DIGITS: Final = re.compile(r"[0-9]+")

#: Table 0004 (patient class) → Encounter.class: the IG's ConceptMap
#: table-hl70004-to-v3-actcode (R, B, C, N, U stay v2-0004 codes).
ENCOUNTER_CLASS: Final[dict[str, tuple[str, str, str]]] = {
    "E": (V3_ACT_CODE, "EMER", "emergency"),
    "I": (V3_ACT_CODE, "IMP", "inpatient encounter"),
    "O": (V3_ACT_CODE, "AMB", "ambulatory"),
    "P": (V3_ACT_CODE, "PRENC", "pre-admission"),
    "R": (V2_0004, "R", "Recurring patient"),
    "B": (V2_0004, "B", "Obstetrics"),
    "C": (V2_0004, "C", "Commercial Account"),
    "N": (V2_0004, "N", "Not Applicable"),
    "U": (V2_0004, "U", "Unknown"),
}
#: Table 0004 → encounter-status (IG ConceptMap table-hl70004-to-encounter-status).
CLASS_STATUS: Final[dict[str, str]] = {
    "E": "in-progress",
    "I": "in-progress",
    "O": "in-progress",
    "P": "planned",
    "R": "in-progress",
    "B": "in-progress",
    "C": "in-progress",
    "N": "in-progress",
    "U": "unknown",
}
#: Trigger events that state the visit's status (see the module docstring).
EVENT_STATUS: Final[dict[str, str]] = {
    "A01": "in-progress",
    "A02": "in-progress",
    "A03": "finished",
    "A04": "in-progress",
    "A05": "planned",
    "A06": "in-progress",
    "A07": "in-progress",
    "A09": "in-progress",
    "A10": "in-progress",
    "A11": "cancelled",
    "A12": "in-progress",
    "A13": "in-progress",
    "A14": "planned",
    "A15": "in-progress",
    "A16": "in-progress",
    "A21": "onleave",
    "A22": "in-progress",
    "A25": "in-progress",
    "A26": "in-progress",
    "A27": "cancelled",
    "A38": "cancelled",
}
#: Events that cancel a discharge (A13) or a pending discharge (A25).
CANCELLED_DISCHARGE: Final = frozenset({"A13", "A25"})
#: Events whose MRG-1 retires a patient record (merge or identifier change).
PATIENT_MERGE_EVENTS: Final = frozenset({"A18", "A30", "A34", "A36", "A39", "A40", "A46", "A47"})

#: PV1 doctor fields → Encounter.participant.type (IG PV1[Encounter]).
PARTICIPANTS: Final = (
    (7, "ATND", "attender"),
    (8, "REF", "referrer"),
    (9, "CON", "consultant"),
    (17, "ADM", "admitter"),
    (52, "PART", "Participation"),
)

#: HL7-defined values of tables whose codes are sent without a CWE-3 system.
TABLE_0007: Final = frozenset("ACELNRU")  # admission type
TABLE_0009: Final = frozenset(
    {"A0", "A1", "A2", "A3", "A4", "A5", "A6", "A7", "A8", "A9", "B1", "B2", "B3", "B4", "B5", "B6"}
)  # ambulatory status
TABLE_0023: Final = frozenset("123456789")  # admit source
TABLE_0062: Final = frozenset({"01", "02", "03", "O", "U"})  # event reason
TABLE_0069: Final = frozenset({"CAR", "MED", "PUL", "SUR", "URO"})  # hospital service
TABLE_0092: Final = frozenset({"R"})  # re-admission indicator
TABLE_0112: Final = frozenset(
    {"01", "02", "03", "04", "05", "06", "07", "08", "09", "20", "30", "40", "41", "42"}
)  # discharge disposition

#: Table 0217 (visit priority) → v3-ActPriority.
VISIT_PRIORITY: Final[dict[str, tuple[str, str]]] = {
    "1": ("EM", "emergency"),
    "2": ("UR", "urgent"),
    "3": ("EL", "elective"),
}

#: Table 0063 → v3-RoleCode (IG ConceptMap table-hl70063-to-v3-rolecode, the rows
#: whose target is a RoleCode code).
ROLE_CODE: Final[dict[str, tuple[str, str]]] = {
    "SEL": ("ONESELF", "self"),
    "SPO": ("SPS", "spouse"),
    "DOM": ("SIGOTHR", "significant other"),
    "CHD": ("CHILD", "child"),
    "GCH": ("GRNDCHILD", "grandchild"),
    "NCH": ("NCHILD", "natural child"),
    "SCH": ("STPCHLD", "step child"),
    "FCH": ("CHLDFOST", "foster child"),
    "PAR": ("PRN", "parent"),
    "MTH": ("MTH", "mother"),
    "FTH": ("FTH", "father"),
    "GRP": ("GRPRN", "grandparent"),
    "EXF": ("EXT", "extended family member"),
    "SIB": ("SIB", "sibling"),
    "BRO": ("BRO", "brother"),
    "SIS": ("SIS", "sister"),
    "FND": ("FRND", "friend"),
}
#: Table 0131 (contact role), also the IG's target for some 0063 codes.
CONTACT_ROLE: Final[dict[str, str]] = {
    "C": "Emergency Contact",
    "E": "Employer",
    "F": "Federal Agency",
    "I": "Insurance Company",
    "N": "Next-of-Kin",
    "O": "Other",
    "S": "State Agency",
    "U": "Unknown",
}
_RELATIONSHIP_TO_0131: Final[dict[str, str]] = {"EMC": "C", "EMR": "E", "UNK": "U", "OTH": "O"}
#: Table 0063 codes with neither a RoleCode nor a 0131 equivalent: kept as v2-0063.
TABLE_0063_OTHER: Final = frozenset(
    {"DEP", "WRD", "CGV", "GRD", "OAD", "EME", "ASC", "OWN", "TRA", "MGR", "NON"}
)
#: Table 0063 → subscriber-relationship (Coverage.relationship). Codes not listed
#: (employer, friend, ...) are left out of the coding; their text is kept.
SUBSCRIBER: Final[dict[str, tuple[str, str]]] = {
    "SEL": ("self", "Self"),
    "SPO": ("spouse", "Spouse"),
    "DOM": ("common", "Common Law Spouse"),
    "CHD": ("child", "Child"),
    "NCH": ("child", "Child"),
    "SCH": ("child", "Child"),
    "FCH": ("child", "Child"),
    "PAR": ("parent", "Parent"),
    "MTH": ("parent", "Parent"),
    "FTH": ("parent", "Parent"),
    "OTH": ("other", "Other"),
}

#: Table 0127 (allergen type) → AllergyIntolerance.category (IG ConceptMap).
ALLERGY_CATEGORY: Final[dict[str, str]] = {
    "DA": "medication",
    "FA": "food",
    "EA": "environment",
    "AA": "biologic",
    "PA": "environment",
    "LA": "environment",
}
#: Table 0127 codes that are allergies (AllergyIntolerance.type); MC is not.
ALLERGY_TYPES: Final = frozenset({"DA", "FA", "MA", "EA", "AA", "PA", "LA"})
#: Table 0128 (allergy severity) → AllergyIntolerance.criticality. The IG maps SV
#: and MI only; MO → low and U → unable-to-assess are this project's choice.
ALLERGY_CRITICALITY: Final[dict[str, str]] = {
    "SV": "high",
    "MO": "low",
    "MI": "low",
    "U": "unable-to-assess",
}
#: Table 0438 (allergy clinical status) → (clinicalStatus, verificationStatus). The
#: IG maps IAM-17 to clinicalStatus as a CodeableConcept, but R4 binds clinicalStatus
#: (required) to allergyintolerance-clinical, which 0438's codes are not: they say
#: how certain the allergy is (verification), and I (inactive) its clinical status.
ALLERGY_STATUS_0438: Final[dict[str, tuple[str, str]]] = {
    "C": ("active", "confirmed"),
    "I": ("inactive", "confirmed"),
    "U": ("active", "unconfirmed"),
    "P": ("active", "unconfirmed"),
    "S": ("active", "unconfirmed"),
    "D": ("active", "unconfirmed"),
    "E": ("", "entered-in-error"),
}
#: Table 0128 → reaction.severity (IG ConceptMap table-hl70128-to-reaction-event-severity).
REACTION_SEVERITY: Final[dict[str, str]] = {"SV": "severe", "MO": "moderate", "MI": "mild"}

#: PR1 performer fields → Procedure.performer.function (IG PR1[Procedure]).
PROCEDURE_PERFORMERS: Final = (
    (8, "88189002", "Anesthesiologist"),
    (11, "304292004", "Surgeon"),
    (12, "", ""),
)


@dataclass(slots=True)
class _Group:
    """The patient group being walked: its Patient, its last visit, a pending MRG."""

    event: str
    patient_ref: str | None
    patient_key: str | None
    primary: bool
    encounter: dict[str, Any] | None = None
    encounter_ref: str | None = None
    mrg: Segment | None = None
    coverage: dict[str, Any] | None = None
    account: dict[str, Any] | None = None


@register("ADT")
def map_adt(ctx: MappingContext) -> None:
    """Map an ADT message (see the module docstring)."""
    event = _event_code(ctx)
    first_pid = ctx.first("PID")
    group = _Group(
        event=event,
        patient_ref=ctx.patient_ref,
        patient_key=patient_key_of(ctx, first_pid) if first_pid is not None else None,
        primary=True,
    )
    targets: list[str] = []
    for seg in ctx.segments:
        name = seg.name
        if name == "PID":
            if seg is not first_pid:
                group = _Group(
                    event=event,
                    patient_ref=map_patient(ctx, seg, primary=False),
                    patient_key=patient_key_of(ctx, seg),
                    primary=False,
                )
            if group.patient_ref:
                targets.append(group.patient_ref)
                if seg.present(18):
                    account(ctx, group, seg)
        elif name == "MRG":
            _merge(ctx, group, seg)
        elif name == "PV1":
            ref = _encounter(ctx, group, seg)
            targets.append(ref)
        elif name == "PV2":
            if group.encounter is not None:
                _visit_details(ctx, group.encounter, seg)
        elif group.patient_ref is None:
            continue  # the resources below all need a subject
        elif name in _PATIENT_LEVEL:
            _patient_segment(ctx, group, seg)
        elif name == "OBX" and group.primary:
            encounter = group.encounter["id"] if group.encounter else None
            observation_from_obx(
                ctx, seg, key_prefix=f"Encounter|{encounter}" if encounter else ctx.event_id
            )
    evn = ctx.first("EVN")
    if evn is not None:
        _provenance(ctx, evn, event, targets)


#: The patient-level segments (NK1, AL1, IAM, DG1, PR1, GT1, IN1/IN2) of a patient group.
_PATIENT_LEVEL: Final = frozenset({"NK1", "AL1", "IAM", "DG1", "PR1", "GT1", "IN1", "IN2"})
#: Segments that end the PATIENT group of a non-ADT message: the start of the
#: family's own part (orders, results, vaccinations, documents, schedules) or the
#: next patient.
_PATIENT_GROUP_END: Final = frozenset(
    {
        "PID", "ORC", "OBR", "RXA", "RXO", "RXE", "RXD", "RXG", "TXA", "SCH", "RGS",
        "AIS", "AIG", "AIL", "AIP", "SPM", "MRG",
    }
)  # fmt: skip


def _patient_segment(ctx: MappingContext, group: _Group, seg: Segment) -> None:
    """One patient-level segment (:data:`_PATIENT_LEVEL`) of ``group``."""
    name = seg.name
    if name == "NK1":
        _related_person(ctx, group, seg)
    elif name == "AL1":
        _allergy(ctx, group, seg)
    elif name == "IAM":
        _adverse_reaction(ctx, group, seg)
    elif name == "DG1":
        _condition(ctx, group, seg)
    elif name == "PR1":
        _procedure(ctx, group, seg)
    elif name == "GT1":
        _guarantor(ctx, group, seg)
    elif name == "IN1":
        _coverage(ctx, group, seg)
    elif name == "IN2" and group.coverage is not None:
        _coverage_details(ctx, group.coverage, seg)


def map_patient_group(ctx: MappingContext) -> None:
    """The PATIENT group of a non-ADT message (ORM/OML, ORU, VXU, MDM, SIU): the NK1,
    AL1, IAM, DG1, PR1 and IN1/IN2 after the first PID, up to the first segment of
    the family's own part (ORC, OBR, RXA, TXA, SCH, RGS/AIx ...), mapped as ADT maps
    them. A DG1 inside an order group is the order family's (a reason), not this.
    Called after the visit (PV1/PV2) is mapped, so a diagnosis joins its Encounter."""
    pid = ctx.first("PID")
    if pid is None or ctx.patient_ref is None:
        return
    encounter_ref = ctx.encounter_ref
    group = _Group(
        event="",
        patient_ref=ctx.patient_ref,
        patient_key=None,
        primary=True,
        encounter=ctx.get(encounter_ref) if encounter_ref else None,
        encounter_ref=encounter_ref,
    )
    if pid.present(18):
        account(ctx, group, pid)
    segments = ctx.segments
    for i in range(pid.index + 1, len(segments)):
        seg = segments[i]
        name = seg.name
        if name in _PATIENT_GROUP_END:
            break
        if name in _PATIENT_LEVEL:
            _patient_segment(ctx, group, seg)


def _event_code(ctx: MappingContext) -> str:
    """The trigger event: MSH-9.2, else EVN-1 (v2.3 senders that leave MSH-9.2 out)."""
    trigger = dt.code(ctx.decode(ctx.msg.header.trigger_event)).upper()
    evn = ctx.first("EVN")
    if evn is not None:
        # EVN-1 repeats MSH-9.2 (withdrawn in v2.5); it is carried as the event.
        from_evn = dt.code(evn.value(1)).upper()
        trigger = trigger or from_evn
    return trigger


# --- Encounter ------------------------------------------------------------------------


def encounter_from_pv1(ctx: MappingContext, pv1: Segment) -> str:
    """PV1 (and a PV2 right after it) → Encounter, for the families whose messages
    carry a visit (ORU, ORM/OML, VXU, MDM, SIU). No trigger event applies, so the
    status follows the IG's PV1 rule (finished when PV1-45 is valued, else by class)."""
    group = _Group(event="", patient_ref=ctx.patient_ref, patient_key=None, primary=True)
    reference = _encounter(ctx, group, pv1)
    following = ctx.segments[pv1.index + 1] if pv1.index + 1 < len(ctx.segments) else None
    if following is not None and following.name == "PV2" and group.encounter is not None:
        _visit_details(ctx, group.encounter, following)
    return reference


def _encounter(ctx: MappingContext, group: _Group, pv1: Segment) -> str:
    pv1.consume(1)  # set id
    event = group.event
    identifiers: list[dict[str, Any]] = []
    visit = dt.identifier(ctx, pv1.comps(19))
    if visit is not None:
        if "type" not in visit:
            visit = {
                "type": {"coding": [{"system": dt.V2_0203, "code": "VN"}], "text": "visit number"},
                **visit,
            }
        identifiers.append(visit)
        scope = visit.get("system") or f"sender:{ctx.msg.header.sender_key}"
        enc_id = uuid5_str(f"Encounter|{scope}|{visit['value']}")
        if ctx.get(enc_id) is not None:  # the same visit twice in one message
            enc_id = ctx.resource_id(f"Encounter/{pv1.index}")
    else:
        enc_id = ctx.resource_id(f"Encounter/{pv1.index}")
    enc: dict[str, Any] = {"resourceType": "Encounter", "id": enc_id}
    reference = ctx.add(enc)
    if ctx.encounter_ref is None:
        ctx.encounter_ref = reference
    group.encounter, group.encounter_ref = enc, reference

    identifiers += [x for c in pv1.each(50) if (x := dt.identifier(ctx, c))]
    if group.mrg is not None:
        identifiers += _prior_visits(ctx, group.mrg, visit)
        group.mrg = None
    if identifiers:
        enc["identifier"] = identifiers

    class_code = dt.code(pv1.value(2)).upper()
    # A13 and A25 cancel a discharge: PV1-45 is a discharge that no longer holds.
    discharge = None if event in CANCELLED_DISCHARGE else dt.date_time(pv1.value(45), "PV1-45")
    status = EVENT_STATUS.get(event)
    if status is None:
        status = "finished" if discharge else CLASS_STATUS.get(class_code, "unknown")
    enc["status"] = status
    enc["class"] = _encounter_class(class_code)

    types = [
        x
        for x in (
            _table_concept(ctx, pv1.comps(4), "0007", TABLE_0007),
            _table_concept(ctx, pv1.comps(18), "0018", None),
        )
        if x
    ]
    if types:
        enc["type"] = types
    service = _table_concept(ctx, pv1.comps(10), "0069", TABLE_0069)
    if service:
        enc["serviceType"] = service
    if group.patient_ref:
        enc["subject"] = {"reference": group.patient_ref}

    participants = []
    for n, code, display in PARTICIPANTS:
        for c in pv1.each(n):
            who = dt.practitioner(ctx, c)
            if who:
                participants.append(_participant(who, code, display))
    if participants:
        enc["participant"] = participants

    start = dt.date_time(pv1.value(44), "PV1-44")
    if start or discharge:
        enc["period"] = {k: v for k, v in (("start", start), ("end", discharge)) if v}

    hospitalization = _hospitalization(ctx, pv1)
    if hospitalization:
        enc["hospitalization"] = hospitalization
    locations = _locations(ctx, pv1, event, status)
    if locations:
        enc["location"] = locations
    return reference


def _encounter_class(code: str) -> dict[str, Any]:
    mapped = ENCOUNTER_CLASS.get(code)
    if mapped is not None:
        system, value, display = mapped
        return {"system": system, "code": value, "display": display}
    if code:  # not a table 0004 code: kept as sent, with no system to claim
        return {"code": code}
    # Encounter.class is required; PV1-2 is too, but senders leave it empty.
    return {"extension": [{"url": DATA_ABSENT_REASON, "valueCode": "unknown"}]}


def _participant(who: str, code: str, display: str) -> dict[str, Any]:
    return {
        "type": [{"coding": [{"system": V3_PARTICIPATION_TYPE, "code": code, "display": display}]}],
        "individual": {"reference": who},
    }


def _hospitalization(ctx: MappingContext, pv1: Segment) -> dict[str, Any]:
    out: dict[str, Any] = {}
    pre_admission = dt.identifier(ctx, pv1.comps(5))
    if pre_admission:
        out["preAdmissionIdentifier"] = pre_admission
    admit_source = _table_concept(ctx, pv1.comps(14), "0023", TABLE_0023)
    if admit_source:
        out["admitSource"] = admit_source
    readmission = _table_concept(ctx, pv1.comps(13), "0092", TABLE_0092)
    if readmission:
        out["reAdmission"] = readmission
    diet = [x for c in pv1.each(38) if (x := dt.codeable_concept(ctx, c))]
    if diet:
        out["dietPreference"] = diet
    courtesy = [x for c in pv1.each(16) if (x := dt.codeable_concept(ctx, c))]
    if courtesy:
        out["specialCourtesy"] = courtesy
    arrangements = [x for c in pv1.each(15) if (x := _table_concept(ctx, c, "0009", TABLE_0009))]
    if arrangements:
        out["specialArrangement"] = arrangements
    disposition = _table_concept(ctx, pv1.comps(36), "0112", TABLE_0112)
    if disposition:
        out["dischargeDisposition"] = disposition
    destination = _discharge_location(ctx, pv1.comps(37))
    if destination:
        out["destination"] = {"reference": destination}
    return out


def _locations(ctx: MappingContext, pv1: Segment, event: str, status: str) -> list[dict[str, Any]]:
    """PV1-3 (current), PV1-6 (prior), PV1-11 (temporary), PV1-42 (pending), PV1-43
    (prior temporary); PV2-1 (prior pending) is added by :func:`_visit_details`."""
    if status == "planned" or dt.code(pv1.value(2)).upper() == "P":
        current = "planned"
    elif status in ("finished", "cancelled"):
        current = "completed"
    else:
        current = "active"
    fields = [(3, current), (11, "active"), (42, "planned"), (43, "completed")]
    if event != "A12":  # A12's prior location is the transfer being cancelled
        fields.insert(1, (6, "completed"))
    out = []
    for n, location_status in fields:
        where = dt.location(ctx, pv1.comps(n))
        if where:
            out.append({"location": {"reference": where}, "status": location_status})
    return out


def _discharge_location(ctx: MappingContext, c: Components) -> str | None:
    """DLD (PV1-37) → a Location named by DLD-1. DLD-2 (effective date) has no place
    on a Location and is not kept; the discharge time is PV1-45."""
    place = c.subs(1)
    name = place.text(2) or place.text(1)
    if not name:
        return None
    resource: dict[str, Any] = {"resourceType": "Location", "name": name, "mode": "kind"}
    code = dt.codeable_concept(ctx, place)
    if code:
        resource["type"] = [code]
    resource["id"] = uuid5_str(f"Location|discharge|{place.text(3)}|{place.text(1)}|{name}")
    return ctx.add(resource)


def _visit_details(ctx: MappingContext, enc: dict[str, Any], pv2: Segment) -> None:
    """PV2 → the Encounter of the PV1 before it."""
    prior_pending = dt.location(ctx, pv2.comps(1))
    if prior_pending:  # IG PV2[Encounter]: PV2-1 → location, status "planned"
        enc.setdefault("location", []).append(
            {"location": {"reference": prior_pending}, "status": "planned"}
        )
    reason = dt.codeable_concept(ctx, pv2.comps(3))
    if reason:
        enc["reasonCode"] = [reason]
    planned = []
    for n, url in ((8, EXT_PLANNED_START), (9, EXT_PLANNED_END)):
        when = dt.date_time(pv2.value(n), f"PV2-{n}")
        if when:
            planned.append({"url": url, "valueDateTime": when})
    if planned:
        enc.setdefault("extension", []).extend(planned)
    days = pv2.value(11)
    if days:
        enc["length"] = {
            "value": dt.number(days, "PV2-11"),
            "unit": "d",
            "system": UCUM,
            "code": "d",
        }
    referrers = [
        _participant(who, "REF", "referrer")
        for c in pv2.each(13)
        if (who := dt.practitioner(ctx, c))
    ]
    if referrers:
        enc.setdefault("participant", []).extend(referrers)
    priority = pv2.comps(25)
    if priority:
        codings = []
        for first in (1, 4):
            code = priority.text(first)
            mapped = VISIT_PRIORITY.get(code)
            if mapped and priority.text(first + 2).upper() in ("", "HL70217"):
                codings.append({"system": V3_ACT_PRIORITY, "code": mapped[0], "display": mapped[1]})
        enc["priority"] = {"coding": codings} if codings else dt.codeable_concept(ctx, priority)


def _prior_visits(
    ctx: MappingContext, mrg: Segment, visit: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """MRG-5 (prior visit number) and MRG-6 (prior alternate visit id) of the MRG
    before this PV1, as ``old`` identifiers when they differ from PV1-19."""
    out = []
    for n in (5, 6):
        prior = dt.identifier(ctx, mrg.comps(n))
        if prior is None:
            continue
        if visit is not None and (prior["value"], prior.get("system")) == (
            visit["value"],
            visit.get("system"),
        ):
            continue  # the visit kept its number: PV1-19 carries it
        out.append({"use": "old", **prior})
    return out


# --- merges ---------------------------------------------------------------------------


def _merge(ctx: MappingContext, group: _Group, mrg: Segment) -> None:
    """MRG: a merged-away patient (MRG-1) and, for the next PV1, prior visit numbers."""
    group.mrg = mrg
    raw = mrg.fields[1] if len(mrg.fields) > 1 else ""
    old_key = key_from_cx_list(ctx, raw)
    if old_key is None or old_key == group.patient_key:
        mrg.consume(1)  # empty, or it names the surviving patient: nothing more to carry
        return
    if group.event not in PATIENT_MERGE_EVENTS or group.patient_ref is None:
        return  # another patient in a non-merge event: left unread, so reported
    survivor = ctx.get(group.patient_ref)
    if survivor is None:
        return
    retired: dict[str, Any] = {"resourceType": "Patient", "id": patient_resource_id(old_key)}
    identifiers = [x for c in mrg.each(1) if (x := dt.identifier(ctx, c))]
    identifiers += [x for c in mrg.each(2) if (x := dt.identifier(ctx, c))]
    identifiers += [x for c in mrg.each(4) if (x := dt.identifier(ctx, c))]
    if identifiers:
        retired["identifier"] = identifiers
    retired["active"] = False
    names = [x for c in mrg.each(7) if (x := dt.human_name(c))]
    if names:
        retired["name"] = names
    retired["link"] = [{"other": {"reference": group.patient_ref}, "type": "replaced-by"}]
    retired_ref = ctx.add(retired)
    survivor.setdefault("link", []).append(
        {"other": {"reference": retired_ref}, "type": "replaces"}
    )


# --- NK1 → RelatedPerson --------------------------------------------------------------


def _related_person(ctx: MappingContext, group: _Group, nk1: Segment) -> None:
    nk1.consume(1)  # set id
    person: dict[str, Any] = {
        "resourceType": "RelatedPerson",
        "id": ctx.resource_id(f"RelatedPerson/{nk1.index}"),
    }
    identifiers = [x for c in nk1.each(12) if (x := dt.identifier(ctx, c))]
    identifiers += [x for c in nk1.each(33) if (x := dt.identifier(ctx, c))]
    ssn = nk1.value(37)
    if ssn:
        identifiers.append({"system": SSN_SYSTEM, "value": ssn})
    if identifiers:
        person["identifier"] = identifiers
    person["patient"] = {"reference": group.patient_ref}
    relationships = [x for c in nk1.each(3) if (x := _relationship(ctx, c))]
    relationships += [x for c in nk1.each(7) if (x := _contact_role(ctx, c))]
    if relationships:
        person["relationship"] = relationships
    names = [x for n in (2, 30) for c in nk1.each(n) if (x := dt.human_name(c))]
    if names:
        person["name"] = names
    telecom = [x for c in nk1.each(5) if (x := dt.contact_point(c, "home"))]
    telecom += [x for c in nk1.each(6) if (x := dt.contact_point(c, "work"))]
    telecom += [x for n in (31, 40, 41) for c in nk1.each(n) if (x := dt.contact_point(c))]
    if telecom:
        person["telecom"] = telecom
    gender = GENDER.get(nk1.value(15).upper())
    if gender:
        person["gender"] = gender
    birth = dt.date_only(nk1.value(16), "NK1-16")
    if birth:
        person["birthDate"] = birth
    addresses = [x for n in (4, 32) for c in nk1.each(n) if (x := dt.address(c))]
    if addresses:
        person["address"] = addresses
    period = _period(ctx, nk1, 8, 9)
    if period:
        person["period"] = period
    languages = [x for c in nk1.each(20) if (x := language_concept(ctx, c))]
    if languages:
        person["communication"] = [{"language": x, "preferred": True} for x in languages]
    ctx.add(person)


def _relationship(ctx: MappingContext, c: Components) -> dict[str, Any] | None:
    """Table 0063 (NK1-3, IN1-17) → RoleCode / v2-0131 / v2-0063 (the IG's ConceptMap
    table-hl70063-to-v3-rolecode), for the primary (1-3) and the alternate (4-6) code.

    A code of a local coding system (not a standard one of table 0396) is still a
    table 0063 value, the field's table, and is translated when the map has it."""
    t = c.texts(9)
    codings: list[dict[str, Any]] = []
    for first in (0, 3):
        value = t[first]
        if not value:
            continue
        system_name = t[first + 2].upper()
        coding = None
        if system_name in ("", "HL70063") or system_name not in dt.CODE_SYSTEMS:
            coding = _relationship_coding(value.upper())
        if coding is None:
            coding = dt.coding(value, t[first + 1], dt.code_system(t[first + 2]))
        if coding is not None and "code" in coding and coding not in codings:
            codings.append(coding)
    text = t[8] or t[1]
    return dt.concept(codings, text)


def _relationship_coding(code: str) -> dict[str, Any] | None:
    if code in ROLE_CODE:
        value, display = ROLE_CODE[code]
        return {"system": V3_ROLE_CODE, "code": value, "display": display}
    if code in CONTACT_ROLE or code in _RELATIONSHIP_TO_0131:
        value = _RELATIONSHIP_TO_0131.get(code, code)
        return {"system": V2_0131, "code": value, "display": CONTACT_ROLE[value]}
    if code in TABLE_0063_OTHER:
        return {"system": V2_0063, "code": code}
    return None


def _contact_role(ctx: MappingContext, c: Components) -> dict[str, Any] | None:
    """NK1-7 (table 0131) → relationship."""
    code = c.text(1).upper()
    if code in CONTACT_ROLE and c.text(3).upper() in ("", "HL70131"):
        out: dict[str, Any] = {
            "coding": [{"system": V2_0131, "code": code, "display": CONTACT_ROLE[code]}]
        }
        text = c.text(9) or c.text(2)
        if text:
            out["text"] = text
        return out
    return dt.codeable_concept(ctx, c)


# --- AL1 → AllergyIntolerance ---------------------------------------------------------


def _allergy(ctx: MappingContext, group: _Group, al1: Segment) -> None:
    al1.consume(1)  # set id
    allergen = dt.codeable_concept(ctx, al1.comps(3))
    first = (allergen or {}).get("coding", [{}])[0]
    if first.get("code"):
        patient_id = group.patient_ref.removeprefix("urn:uuid:") if group.patient_ref else ""
        key = f"AllergyIntolerance|{patient_id}|{first.get('system', '')}|{first['code']}"
        allergy_id = uuid5_str(key)
        if ctx.get(allergy_id) is not None:
            allergy_id = ctx.resource_id(f"AllergyIntolerance/{al1.index}")
    else:
        allergy_id = ctx.resource_id(f"AllergyIntolerance/{al1.index}")
    allergy: dict[str, Any] = {
        "resourceType": "AllergyIntolerance",
        "id": allergy_id,
        "clinicalStatus": {"coding": [{"system": ALLERGY_CLINICAL, "code": "active"}]},
    }
    kind = dt.code(al1.value(2)).upper()
    if kind in ALLERGY_TYPES:
        allergy["type"] = "allergy"
    if kind in ALLERGY_CATEGORY:
        allergy["category"] = [ALLERGY_CATEGORY[kind]]
    severity = dt.code(al1.value(4)).upper()
    if severity in ALLERGY_CRITICALITY:
        allergy["criticality"] = ALLERGY_CRITICALITY[severity]
    if allergen:
        allergy["code"] = allergen
    allergy["patient"] = {"reference": group.patient_ref}
    onset = dt.date_time(al1.value(6), "AL1-6")
    if onset:
        allergy["onsetDateTime"] = onset
    manifestations = [{"text": t} for c in al1.each(5) if (t := _plain_text(c))]
    if manifestations:
        reaction: dict[str, Any] = {"manifestation": manifestations}
        if severity in REACTION_SEVERITY:
            reaction["severity"] = REACTION_SEVERITY[severity]
        allergy["reaction"] = [reaction]
    ctx.add(allergy)


def _adverse_reaction(ctx: MappingContext, group: _Group, iam: Segment) -> None:
    """IAM → AllergyIntolerance (the IG's IAM[AllergyIntolerance] map).

    IAM-2 type/category and IAM-3 code as AL1; IAM-27 (clinician identified code)
    adds codings; IAM-4 severity → reaction.severity and IAM-5 → manifestation;
    IAM-7 → identifier (and the id); IAM-11 onset, else IAM-12 onsetString;
    IAM-13 → recordedDate; IAM-14/15 reported by → recorder (a RelatedPerson
    when IAM-15 is valued and not SEL, the Patient for SEL, else a Practitioner);
    IAM-17 (table 0438) → verificationStatus/clinicalStatus. IAM-6 (action code),
    IAM-8/9/10/16 and IAM-18…26 have no IG target and are left unread.
    """
    iam.consume(1)  # set id
    ident = dt.entity_identifier(ctx, iam.comps(7))
    allergen = dt.codeable_concept(ctx, iam.comps(3))
    clinician = dt.codeable_concept(ctx, iam.comps(27)) if iam.present(27) else None
    if ident is not None:
        allergy_id = uuid5_str(f"AllergyIntolerance|{ident.get('system', '')}|{ident['value']}")
        if ctx.has_id(allergy_id):
            allergy_id = ctx.resource_id(f"AllergyIntolerance/{iam.index}")
    else:
        allergy_id = ctx.resource_id(f"AllergyIntolerance/{iam.index}")
    allergy: dict[str, Any] = {"resourceType": "AllergyIntolerance", "id": allergy_id}
    if ident is not None:
        allergy["identifier"] = [ident]
    status = dt.code(iam.comps(17).text(1)).upper() if iam.present(17) else ""
    clinical, verification = ALLERGY_STATUS_0438.get(status, ("active", ""))
    if clinical:
        allergy["clinicalStatus"] = {"coding": [{"system": ALLERGY_CLINICAL, "code": clinical}]}
    if verification:
        allergy["verificationStatus"] = {
            "coding": [{"system": ALLERGY_VERIFICATION, "code": verification}]
        }
    kind = dt.code(iam.comps(2).text(1)).upper()
    if kind in ALLERGY_TYPES:
        allergy["type"] = "allergy"
    if kind in ALLERGY_CATEGORY:
        allergy["category"] = [ALLERGY_CATEGORY[kind]]
    if clinician:
        if allergen is None:
            allergen = clinician
        else:
            extra = [x for x in clinician.get("coding", []) if x not in allergen.get("coding", [])]
            if extra:
                allergen.setdefault("coding", []).extend(extra)
    if allergen:
        allergy["code"] = allergen
    allergy["patient"] = {"reference": group.patient_ref}
    onset = dt.date_time(iam.value(11), "IAM-11")
    if onset:
        allergy["onsetDateTime"] = onset
    elif iam.present(12):
        allergy["onsetString"] = iam.value(12)
    recorded = dt.date_time(iam.value(13), "IAM-13")
    if recorded:
        allergy["recordedDate"] = recorded
    recorder = _reported_by(ctx, group, iam)
    if recorder:
        allergy["recorder"] = {"reference": recorder}
    manifestations = [{"text": t} for c in iam.each(5) if (t := _plain_text(c))]
    if manifestations:
        reaction: dict[str, Any] = {"manifestation": manifestations}
        severity = dt.code(iam.comps(4).text(1)).upper()
        if severity in REACTION_SEVERITY:
            reaction["severity"] = REACTION_SEVERITY[severity]
        allergy["reaction"] = [reaction]
    ctx.add(allergy)


def _reported_by(ctx: MappingContext, group: _Group, iam: Segment) -> str | None:
    """IAM-14 (XPN) with IAM-15 (table 0063) → the allergy's recorder (IG IAM map)."""
    if not iam.present(14):
        return None
    name = dt.human_name(iam.comps(14))
    relation = iam.comps(15)
    code = relation.text(1).upper()
    if code == "SEL":
        return group.patient_ref
    if name is None:
        return None
    if not code:
        return ctx.add(
            {
                "resourceType": "Practitioner",
                "id": ctx.resource_id(f"Practitioner/IAM/{iam.index}"),
                "name": [name],
            }
        )
    person: dict[str, Any] = {
        "resourceType": "RelatedPerson",
        "id": ctx.resource_id(f"RelatedPerson/IAM/{iam.index}"),
        "patient": {"reference": group.patient_ref},
    }
    relationship = _relationship(ctx, relation)
    if relationship:
        person["relationship"] = [relationship]
    person["name"] = [name]
    return ctx.add(person)


def _plain_text(c: Components) -> str:
    """A reaction (ST in v2.3-2.5, CWE later): its text, else its code."""
    return c.text(9) or c.text(2) or c.text(1)


# --- DG1 → Condition ------------------------------------------------------------------


def _condition(ctx: MappingContext, group: _Group, dg1: Segment) -> None:
    dg1.consume(1)  # set id
    ident = dt.entity_identifier(ctx, dg1.comps(20))
    if ident is not None:
        cond_id = uuid5_str(f"Condition|{ident.get('system', '')}|{ident['value']}")
    else:
        cond_id = ctx.resource_id(f"Condition/{dg1.index}")
    cond: dict[str, Any] = {"resourceType": "Condition", "id": cond_id}
    if ident is not None:
        cond["identifier"] = [ident]
    action = dt.code(dg1.value(21)).upper()
    if action == "D":
        cond["verificationStatus"] = {
            "coding": [{"system": CONDITION_VER_STATUS, "code": "entered-in-error"}]
        }
    # A (add) and U (update) are what every message does to its resources.
    cond["category"] = [
        {
            "coding": [
                {
                    "system": CONDITION_CATEGORY,
                    "code": "encounter-diagnosis",
                    "display": "Encounter Diagnosis",
                }
            ]
        }
    ]
    code = dt.codeable_concept(ctx, dg1.comps(3))
    method = dg1.value(2)  # DG1-2 (coding method, withdrawn): the system DG1-3 did not name
    if code is not None:
        system = dt.code_system(method)
        for coding in code.get("coding", []):
            if "system" not in coding and system:
                coding["system"] = system
    description = dg1.value(4)
    if description:
        code = code or {}
        code["text"] = description
    if code:
        cond["code"] = code
    cond["subject"] = {"reference": group.patient_ref}
    if group.encounter_ref:
        cond["encounter"] = {"reference": group.encounter_ref}
    onset = dt.date_time(dg1.value(5), "DG1-5")
    if onset:
        cond["onsetDateTime"] = onset
    recorded = dt.date_time(dg1.value(19), "DG1-19")
    if recorded:
        cond["recordedDate"] = recorded
    clinicians = dg1.each(16)
    if clinicians:
        asserter = dt.practitioner(ctx, clinicians[0])
        if asserter:
            cond["asserter"] = {"reference": asserter}
    reference = ctx.add(cond)
    if group.encounter is not None:
        diagnosis: dict[str, Any] = {"condition": {"reference": reference}}
        use = _diagnosis_use(dg1.comps(6))
        if use:
            diagnosis["use"] = use
        rank = positive_int(_peek(dg1, 15))
        if rank is not None:  # a rank that is not a positive integer is left unread
            dg1.consume(15)
            diagnosis["rank"] = rank
        group.encounter.setdefault("diagnosis", []).append(diagnosis)


def _diagnosis_use(c: Components) -> dict[str, Any] | None:
    """DG1-6 (table 0052) → Encounter.diagnosis.use; A → diagnosis-role AD (IG)."""
    code = c.text(1).upper()
    if not code:
        return None
    codings = [{"system": V2_0052, "code": code}]
    if code == "A":
        codings.insert(
            0, {"system": DIAGNOSIS_ROLE, "code": "AD", "display": "Admission diagnosis"}
        )
    out: dict[str, Any] = {"coding": codings}
    if c.text(2):
        out["text"] = c.text(2)
    return out


# --- PR1 → Procedure ------------------------------------------------------------------


def _procedure(ctx: MappingContext, group: _Group, pr1: Segment) -> None:
    pr1.consume(1)  # set id
    ident = dt.entity_identifier(ctx, pr1.comps(19))
    if ident is not None:
        proc_id = uuid5_str(f"Procedure|{ident.get('system', '')}|{ident['value']}")
    else:
        proc_id = ctx.resource_id(f"Procedure/{pr1.index}")
    # PR1 says nothing about the procedure's state.
    proc: dict[str, Any] = {"resourceType": "Procedure", "id": proc_id, "status": "unknown"}
    if ident is not None:
        proc["identifier"] = [ident]
    code = dt.codeable_concept(ctx, pr1.comps(3))
    method = pr1.value(2)  # PR1-2 (coding method, withdrawn): the system PR1-3 did not name
    if code is not None:
        system = dt.code_system(method)
        for coding in code.get("coding", []):
            if "system" not in coding and system:
                coding["system"] = system
    description = pr1.value(4)
    if description and not pr1.comps(3).text(9):
        code = code or {}
        code["text"] = description
    if code:
        proc["code"] = code
    category = dt.codeable_concept(ctx, pr1.comps(6))
    if category:
        proc["category"] = category
    proc["subject"] = {"reference": group.patient_ref}
    if group.encounter_ref:
        proc["encounter"] = {"reference": group.encounter_ref}
    performed = dt.date_time(pr1.value(5), "PR1-5")
    if performed:
        proc["performedDateTime"] = performed
    performers = []
    for n, function, display in PROCEDURE_PERFORMERS:
        for c in pr1.each(n):
            who = dt.practitioner(ctx, c)
            if not who:
                continue
            performer: dict[str, Any] = {"actor": {"reference": who}}
            if function:
                performer["function"] = {
                    "coding": [{"system": SNOMED, "code": function, "display": display}]
                }
            performers.append(performer)
    if performers:
        proc["performer"] = performers
    reason = dt.codeable_concept(ctx, pr1.comps(15))
    if reason:
        proc["reasonCode"] = [reason]
    ctx.add(proc)


# --- PID-18 / GT1 → Account, guarantors ------------------------------------------------


def account(ctx: MappingContext, group: _Group, pid: Segment | None = None) -> dict[str, Any]:
    """The patient group's Account: the IG's PID[Account] map (status ``active``,
    identifier PID-18), the Patient its subject; a GT1 guarantor joins it.

    Its id is a UUIDv5 of the account number (with its authority, else scoped by the
    sender), so every message about one account updates one Account; a group with
    guarantors but no PID-18 gets an Account scoped to the event."""
    if group.account is not None:
        return group.account
    identifiers = [x for c in pid.each(18) if (x := dt.identifier(ctx, c))] if pid else []
    if identifiers:
        first = identifiers[0]
        scope = first.get("system") or f"sender:{ctx.msg.header.sender_key}"
        account_id = uuid5_str(f"Account|{scope}|{first['value']}")
    else:
        account_id = ctx.resource_id(f"Account|{group.patient_ref}")
    acct: dict[str, Any] = {"resourceType": "Account", "id": account_id}
    if identifiers:
        acct["identifier"] = identifiers
    acct["status"] = "active"
    if group.patient_ref:
        acct["subject"] = [{"reference": group.patient_ref}]
    ctx.add(acct)
    group.account = acct
    return acct


def _guarantor(ctx: MappingContext, group: _Group, gt1: Segment) -> None:
    """GT1 → ``Account.guarantor``: the party is the Patient when GT1-11 is SEL (the
    patient is their own guarantor), else a RelatedPerson of the guarantor's own
    fields (GT1-2, 3, 5…9, 11, 12), else the guarantor organization (GT1-21).

    The IG STU1 has no GT1 map ('under construction'); this follows FHIR's Account
    (guarantor.party, onHold, period). For a SEL guarantor the person fields repeat
    the patient's and are left to PID (reported as unmapped when valued)."""
    relation = _peek(gt1, 11).split(ctx.comp_sep, 1)[0].upper()
    if relation == "SEL":
        gt1.consume(11)
        party = group.patient_ref
    elif gt1.present(3):
        party = _guarantor_person(ctx, group, gt1)
    elif gt1.present(21):
        party = dt.organization(ctx, gt1.comps(21))
    else:
        return  # nothing names the guarantor: the segment is reported as unmapped
    if party is None:
        return
    gt1.consume(1)  # set id
    entry: dict[str, Any] = {"party": {"reference": party}}
    hold = gt1.value(22).upper()
    if hold in ("Y", "N"):
        entry["onHold"] = hold == "Y"
    period = _period(ctx, gt1, 13, 14)
    if period:
        entry["period"] = period
    account(ctx, group).setdefault("guarantor", []).append(entry)


def _guarantor_person(ctx: MappingContext, group: _Group, gt1: Segment) -> str | None:
    names = [x for c in gt1.each(3) if (x := dt.human_name(c))]
    if not names:
        return None
    person: dict[str, Any] = {
        "resourceType": "RelatedPerson",
        "id": ctx.resource_id(f"RelatedPerson/GT1/{gt1.index}"),
    }
    identifiers = [x for c in gt1.each(2) if (x := dt.identifier(ctx, c))]
    ssn = gt1.value(12)
    if ssn:
        identifiers.append({"system": SSN_SYSTEM, "value": ssn})
    if identifiers:
        person["identifier"] = identifiers
    person["patient"] = {"reference": group.patient_ref}
    relationship = _relationship(ctx, gt1.comps(11))
    if relationship:
        person["relationship"] = [relationship]
    person["name"] = names
    telecom = [x for c in gt1.each(6) if (x := dt.contact_point(c, "home"))]
    telecom += [x for c in gt1.each(7) if (x := dt.contact_point(c, "work"))]
    if telecom:
        person["telecom"] = telecom
    _person_details(person, gt1, gender=9, birth=8, address=5)
    return ctx.add(person)


def _person_details(
    person: dict[str, Any], seg: Segment, *, gender: int, birth: int, address: int
) -> None:
    """A RelatedPerson's gender (table 0001), birth date and addresses from ``seg``."""
    code = GENDER.get(seg.value(gender).upper())
    if code:
        person["gender"] = code
    born = dt.date_only(seg.value(birth), f"{seg.name}-{birth}")
    if born:
        person["birthDate"] = born
    addresses = [x for c in seg.each(address) if (x := dt.address(c))]
    if addresses:
        person["address"] = addresses


# --- IN1/IN2 → Coverage ---------------------------------------------------------------


def _coverage(ctx: MappingContext, group: _Group, in1: Segment) -> None:
    # IN1-1, the set id, is the coverage's order (1 primary, 2 secondary, ...).
    order = positive_int(in1.value(1))
    payor = _payor(ctx, in1)
    policy = in1.value(36)
    patient_id = group.patient_ref.removeprefix("urn:uuid:") if group.patient_ref else ""
    if policy:
        coverage_id = uuid5_str(f"Coverage|{patient_id}|{payor or ''}|{policy}")
        if ctx.get(coverage_id) is not None:
            coverage_id = ctx.resource_id(f"Coverage/{in1.index}")
    else:
        coverage_id = ctx.resource_id(f"Coverage/{in1.index}")
    cov: dict[str, Any] = {"resourceType": "Coverage", "id": coverage_id}
    if policy:
        cov["identifier"] = [{"value": policy}]
    cov["status"] = "active"
    plan_type = dt.codeable_concept(ctx, in1.comps(15))
    if plan_type:
        cov["type"] = plan_type
    holder = dt.organization(ctx, in1.comps(11))
    if holder:
        cov["policyHolder"] = {"reference": holder}
    subscriber_id = in1.comps(49).text(1) or policy
    relationship_code = in1.comps(17).text(1).upper()
    subscriber = _subscriber(ctx, group, in1, relationship_code)
    if subscriber:
        cov["subscriber"] = {"reference": subscriber}
    if subscriber_id:
        cov["subscriberId"] = subscriber_id
    cov["beneficiary"] = {"reference": group.patient_ref}
    relationship = _subscriber_relationship(in1.comps(17))
    if relationship:
        cov["relationship"] = relationship
    start = dt.date_time(in1.value(12), "IN1-12")
    end = dt.date_time(in1.value(13), "IN1-13")
    if start or end:
        cov["period"] = {k: v for k, v in (("start", start), ("end", end)) if v}
    if payor:
        cov["payor"] = [{"reference": payor}]
    else:  # required in R4; IN1-3/IN1-4 (required in HL7 too) are empty
        cov["payor"] = [{"extension": [{"url": DATA_ABSENT_REASON, "valueCode": "unknown"}]}]
    classes = []
    plan = in1.comps(2)
    if plan.text(1):
        classes.append(_coverage_class("plan", "Plan", plan.text(1), plan.text(2)))
    group_number = in1.value(8)
    group_name = in1.comps(9).text(1)
    if group_number:
        classes.append(_coverage_class("group", "Group", group_number, group_name))
    if classes:
        cov["class"] = classes
    if order is not None:
        cov["order"] = order
    group.coverage = cov
    ctx.add(cov)


def _payor(ctx: MappingContext, in1: Segment) -> str | None:
    """IN1-3 (ids), IN1-4 (name), IN1-5 (address), IN1-6 (contact), IN1-7 (phone)."""
    identifiers = [x for c in in1.each(3) if (x := dt.identifier(ctx, c))]
    name = in1.comps(4).text(1)
    if not identifiers and not name:
        return None
    org: dict[str, Any] = {"resourceType": "Organization"}
    if identifiers:
        org["identifier"] = identifiers
    if name:
        org["name"] = name
    telecom = [x for c in in1.each(7) if (x := dt.contact_point(c, "work"))]
    if telecom:
        org["telecom"] = telecom
    addresses = [x for c in in1.each(5) if (x := dt.address(c))]
    if addresses:
        org["address"] = addresses
    contacts = [{"name": x} for c in in1.each(6) if (x := dt.human_name(c))]
    if contacts:
        org["contact"] = contacts
    first = identifiers[0] if identifiers else {}
    org["id"] = uuid5_str(f"Organization|{first.get('system', '')}|{first.get('value', '')}|{name}")
    return ctx.add(org)


def _subscriber(ctx: MappingContext, group: _Group, in1: Segment, relation: str) -> str | None:
    """The insured: the Patient when IN1-17 is SEL, else a RelatedPerson (IN1-16…19, 43)."""
    if relation == "SEL":
        return group.patient_ref
    names = [x for c in in1.each(16) if (x := dt.human_name(c))]
    if not names:
        return None
    person: dict[str, Any] = {
        "resourceType": "RelatedPerson",
        "id": ctx.resource_id(f"RelatedPerson/IN1/{in1.index}"),
        "patient": {"reference": group.patient_ref},
    }
    relationship = _relationship(ctx, in1.comps(17))
    if relationship:
        person["relationship"] = [relationship]
    person["name"] = names
    _person_details(person, in1, gender=43, birth=18, address=19)
    return ctx.add(person)


def _subscriber_relationship(c: Components) -> dict[str, Any] | None:
    code = c.text(1).upper()
    if not code:
        return None
    out: dict[str, Any] = {}
    mapped = SUBSCRIBER.get(code) if c.text(3).upper() in ("", "HL70063") else None
    if mapped:
        out["coding"] = [
            {"system": SUBSCRIBER_RELATIONSHIP, "code": mapped[0], "display": mapped[1]}
        ]
    text = c.text(9) or c.text(2) or (None if mapped else c.text(1))
    if text:
        out["text"] = text
    return out


def _coverage_class(kind: str, display: str, value: str, name: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        "type": {"coding": [{"system": COVERAGE_CLASS, "code": kind, "display": display}]},
        "value": value,
    }
    if name:
        out["name"] = name
    return out


def _coverage_details(ctx: MappingContext, cov: dict[str, Any], in2: Segment) -> None:
    """IN2-6 (Medicare card number) and IN2-8 (Medicaid case number) → identifiers."""
    found = []
    for n, type_code in ((6, "MC"), (8, "MA")):
        value = in2.value(n)
        if value:
            found.append(
                {"type": {"coding": [{"system": dt.V2_0203, "code": type_code}]}, "value": value}
            )
    if found:
        cov.setdefault("identifier", []).extend(found)


# --- EVN → Provenance -----------------------------------------------------------------


def _provenance(ctx: MappingContext, evn: Segment, event: str, targets: list[str]) -> None:
    """EVN → Provenance (IG EVN[Provenance]), when EVN-2 can be a FHIR instant.

    Provenance.recorded is an instant: an EVN-2 of less than minute precision cannot
    be one; then EVN is not carried (it is reported). A time without an offset is
    in the default time zone, as everywhere.
    """
    if not targets:
        return
    stamp = _peek(evn, 2).split(ctx.enc.component, 1)[0]
    recorded = dt.date_time(stamp, "EVN-2") if stamp else None
    if not recorded or "T" not in recorded:
        return
    operators = [who for c in _peek_each(ctx, evn, 5) if (who := dt.practitioner(ctx, c))]
    agents = [
        {"type": _agent_type("enterer", "Enterer"), "who": {"reference": who}} for who in operators
    ]
    if not agents:
        facility = _hd_organization(ctx, ctx.msg.header.sending_facility)
        if facility is None:
            return
        agents = [{"type": _agent_type("author", "Author"), "who": {"reference": facility}}]
    evn.consume(2, 5)
    prov: dict[str, Any] = {
        "resourceType": "Provenance",
        "id": ctx.resource_id("Provenance/EVN"),
        "target": [{"reference": t} for t in dict.fromkeys(targets)],
    }
    occurred = dt.date_time(evn.value(6), "EVN-6")
    if occurred:
        prov["occurredDateTime"] = occurred
    prov["recorded"] = recorded
    reason = _table_concept(ctx, evn.comps(4), "0062", TABLE_0062)
    if reason:
        prov["reason"] = [reason]
    if event:
        prov["activity"] = {"coding": [{"system": V2_0003, "code": event}]}
    place = _hd_location(ctx, evn.comps(7))
    if place:
        prov["location"] = {"reference": place}
    prov["agent"] = agents
    ctx.add(prov)


def _agent_type(code: str, display: str) -> dict[str, Any]:
    return {"coding": [{"system": PROVENANCE_AGENT_TYPE, "code": code, "display": display}]}


def _hd_organization(ctx: MappingContext, raw: str) -> str | None:
    """An HD (MSH-4, read by the MessageHeader) → an Organization; its reference."""
    c = Components(ctx, raw)
    name, uid, kind = c.text(1), c.text(2), c.text(3)
    if not name and not uid:
        return None
    org: dict[str, Any] = {
        "resourceType": "Organization",
        "id": uuid5_str(f"Organization|{uid}|{name}"),
    }
    system = dt.authority_system(ctx, "", uid, kind) if uid else None
    if uid and system and not system.startswith(dt.AUTHORITY_PREFIX):
        org["identifier"] = [{"system": "urn:ietf:rfc:3986", "value": system}]
    org["name"] = name or uid
    return ctx.add(org)


def _hd_location(ctx: MappingContext, c: Components) -> str | None:
    """EVN-7 (HD, the event facility) → a Location."""
    name, uid, kind = c.text(1), c.text(2), c.text(3)
    if not name and not uid:
        return None
    place: dict[str, Any] = {
        "resourceType": "Location",
        "id": uuid5_str(f"Location|facility|{uid}|{name}"),
        "name": name or uid,
        "mode": "instance",
    }
    system = dt.authority_system(ctx, "", uid, kind) if uid else None
    if uid and system and not system.startswith(dt.AUTHORITY_PREFIX):
        place["identifier"] = [{"system": "urn:ietf:rfc:3986", "value": system}]
    return ctx.add(place)


# --- helpers --------------------------------------------------------------------------


def _table_concept(
    ctx: MappingContext, c: Components, table: str, codes: frozenset[str] | None
) -> dict[str, Any] | None:
    """A CWE from an HL7 table: a coding sent without CWE-3 gets the table's system
    when its code is one of the table's (``codes``; None: any code, for tables
    HL7 defines no values of, it then keeps no system)."""
    out = dt.codeable_concept(ctx, c)
    if out is None or codes is None:
        return out
    for coding in out.get("coding", []):
        if "system" not in coding and coding.get("code", "").upper() in codes:
            coding["system"] = f"http://terminology.hl7.org/CodeSystem/v2-{table}"
            coding["code"] = coding["code"].upper()
    return out


def _period(ctx: MappingContext, seg: Segment, start_n: int, end_n: int) -> dict[str, str]:
    start = dt.date_time(seg.value(start_n), f"{seg.name}-{start_n}")
    end = dt.date_time(seg.value(end_n), f"{seg.name}-{end_n}")
    return {k: v for k, v in (("start", start), ("end", end)) if v}


def positive_int(text: str) -> int | None:
    """A FHIR positiveInt from an NM/SI (``"1"``), None when it is not one."""
    value = text.strip()
    if not _DIGITS.fullmatch(value):
        return None
    number = int(value)
    return number if 0 < number <= MAX_INT else None


def _peek(seg: Segment, n: int) -> str:
    """Field ``n`` raw, without marking it read (for fields carried only when usable)."""
    return seg.fields[n] if n < len(seg.fields) else ""


def _peek_each(ctx: MappingContext, seg: Segment, n: int) -> list[Components]:
    raw = _peek(seg, n)
    return [Components(ctx, r) for r in raw.split(ctx.enc.repetition) if r] if raw else []
