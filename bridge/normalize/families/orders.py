"""ORM^O01 and OML^O21 → ServiceRequest (and its Specimen, Condition, Observation),
following the HL7 v2-to-FHIR IG (segment maps ORC[ServiceRequest], OBR[ServiceRequest],
TQ1[ServiceRequest], SPM[Specimen], OBR[Specimen], DG1[Condition]; concept maps
OrderControlCode[ServiceRequest.status], OrderStatus, Priority, OrderType).

Groups. One ServiceRequest per OBR; the ORC before it gives the order's control
fields (an OBR with no ORC of its own shares the previous one). An ORC with no
detail segment at all (a bare cancel or status change) gives a ServiceRequest of
its own. Orders whose detail is RXO/RXE/ODS/ODT/RQD/RQ1 are not ServiceRequests
(they are MedicationRequest, NutritionOrder, SupplyRequest): the group is left
to ``unmapped``, except its OBX (Observation) and DG1 (Condition, with no order
referring to it). TQ1 before the OBR belongs to every OBR of that ORC; NTE
after an OBX belongs to the OBX, otherwise to the order; DG1 → Condition
(``reasonReference``); SPM → Specimen (``specimen``); OBX → Observation
(``supportingInfo``, through the ORU family's ``observation_from_obx``).

Field map (v2 → ServiceRequest):

* OBR-2, else ORC-2 → identifier (PLAC); OBR-3, else ORC-3 → identifier (FILL) (an
  ORC number that differs from the OBR's stays in ``unmapped``). OBR-53, else
  ORC-33 → identifier (PLAC).
* ORC-4 → identifier (PGN; the IG's ORC map) and requisition (R4's element for the
  placer group number); in v2.8.2, where ORC-4 is an EIP, its filler part →
  identifier (FGN).
* ORC-5 → status (table 0038); ORC-1 → status when ORC-5 is empty or unmapped
  (table 0119); neither → ``unknown``. intent ``order``, ``reflex-order`` when
  OBR-11 is ``G``.
* ORC-8, OBR-29, OBR-54 (EIP) → basedOn (logical references by identifier).
* ORC-9 → authoredOn when ORC-1 is NW (IG condition; for other control codes
  ORC-9 is the date of that event and stays unmapped).
* ORC-12 (else OBR-16) → requester Practitioner, ORC-24 its address; with ORC-21
  (ORC-22, ORC-23) the requester is a PractitionerRole of that Organization.
* ORC-16 → extension request-statusReason. ORC-29 → locationCode (table 0482).
* TQ1 (v2.5+), else ORC-7, else OBR-27 (TQ) → occurrence (Period or dateTime from
  start/end; a Timing when there is a repeat pattern, explicit times, a duration or
  a count), priority (TQ1-9 / TQ-6, else OBR-5; table 0485), quantityQuantity,
  note (TQ1-11 / TQ-8). OBR-6 → occurrenceDateTime when no timing gave one.
* OBR-4 → code; OBR-31 → reasonCode; OBR-46/47 → orderDetail.
* OBR-7/8/9/10/14/15 → the order's Specimen (the first SPM's, or one of its own).
* NTE → note (NTE-3 text, NTE-5 author, NTE-6 time).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Final

from bridge.errors import DataTypeError
from bridge.normalize import datatypes as dt
from bridge.normalize.bundle import register
from bridge.normalize.context import Components, MappingContext, Segment
from bridge.normalize.families.oru import observation_from_obx, with_ordering_facility
from bridge.normalize.ids import uuid5_str

REQUEST_STATUS_EXTENSION: Final = "http://hl7.org/fhir/StructureDefinition/request-statusReason"
DATA_ABSENT_REASON: Final = "http://hl7.org/fhir/StructureDefinition/data-absent-reason"
ASSERTED_DATE: Final = "http://hl7.org/fhir/StructureDefinition/condition-assertedDate"
CONDITION_VER_STATUS: Final = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
V3_ROLE_CODE: Final = "http://terminology.hl7.org/CodeSystem/v3-RoleCode"
V2_0335: Final = "http://terminology.hl7.org/CodeSystem/v2-0335"
V2_0482: Final = "http://terminology.hl7.org/CodeSystem/v2-0482"

#: IG ConceptMap OrderControlCode[ServiceRequest.status] (table 0119 → request-status).
#: CA and HD are *requests* to cancel/hold: the order stays active until the filler
#: answers CR / HR (IG 1.0.0, table-hl70119-to-request-status).
ORDER_CONTROL_STATUS: Final[dict[str, str]] = {
    "AF": "active",
    "CA": "active",
    "CR": "revoked",
    "DC": "revoked",
    "DF": "revoked",
    "DR": "revoked",
    "FU": "completed",
    "HD": "active",
    "HR": "on-hold",
    "NW": "active",
    "OC": "revoked",
    "OD": "revoked",
    "OH": "on-hold",
    "OK": "active",
    "PR": "active",
    "PY": "active",
    "RL": "active",
    "RO": "active",
    "RQ": "active",
}

#: IG ConceptMap OrderStatus (table 0038 → request-status).
ORDER_STATUS: Final[dict[str, str]] = {
    "CA": "revoked",
    "CM": "completed",
    "DC": "revoked",
    "ER": "entered-in-error",
    "HD": "on-hold",
    "IP": "active",
    "RP": "revoked",
    "SC": "active",
}

#: IG ConceptMap Priority (table 0485 → request-priority); the spelled-out forms
#: are what v2.3 senders put in the free-text TQ-6.
PRIORITY: Final[dict[str, str]] = {
    "S": "stat",
    "STAT": "stat",
    "A": "asap",
    "ASAP": "asap",
    "R": "routine",
    "ROUTINE": "routine",
}

#: OBX-29 observation types of answers given with the order (table 0936), which the
#: IG maps to ServiceRequest.supportingInfo.
ORDER_ENTRY_OBSERVATION: Final = frozenset({"QST", "SCI"})

#: IG ConceptMap OrderType (table 0482 → v3-RoleCode).
ORDER_TYPE: Final[dict[str, tuple[str, str]]] = {
    "I": ("HOSP", "Hospital"),
    "O": ("OF", "Outpatient facility"),
}

#: Time units as senders write them (CQ units, RPT period units) → UCUM units-of-time.
TIME_UNITS: Final[dict[str, str]] = {
    "s": "s",
    "sec": "s",
    "second": "s",
    "seconds": "s",
    "min": "min",
    "minute": "min",
    "minutes": "min",
    "h": "h",
    "hr": "h",
    "hour": "h",
    "hours": "h",
    "d": "d",
    "day": "d",
    "days": "d",
    "wk": "wk",
    "week": "wk",
    "weeks": "wk",
    "mo": "mo",
    "month": "mo",
    "months": "mo",
    "a": "a",
    "yr": "a",
    "year": "a",
    "years": "a",
}
_MINUTES_PER: Final[dict[str, float]] = {
    "s": 1 / 60,
    "min": 1,
    "h": 60,
    "d": 1440,
    "wk": 10080,
    "mo": 43200,
    "a": 525600,
}

#: RPT-8 events that are FHIR event-timing codes as they stand.
EVENT_TIMING: Final = frozenset(
    {"HS", "WAKE", "C", "CM", "CD", "CV", "AC", "ACM", "ACD", "ACV", "PC", "PCM", "PCD", "PCV"}
)

#: TQ-3 duration (v2.3-2.4): S seconds, M minutes, H hours, D days, W weeks, L months,
#: X times (a count).
_TQ_DURATION: Final = re.compile(r"([SMHDWLX])(\d+(?:\.\d+)?)")
_TQ_DURATION_UNITS: Final[dict[str, str]] = {
    "S": "s",
    "M": "min",
    "H": "h",
    "D": "d",
    "W": "wk",
    "L": "mo",
}
_TM: Final = re.compile(r"(\d{2})(\d{2})?(\d{2})?(?:\.\d{1,4})?(?:[+-]\d{4})?")

_OCCURRENCE: Final = ("occurrenceDateTime", "occurrencePeriod", "occurrenceTiming")

#: Detail segments of orders that are not ServiceRequests.
_OTHER_DETAIL: Final = frozenset({"RXO", "RXE", "RXD", "RXG", "ODS", "ODT", "RQD", "RQ1"})
#: Segments that may sit between an OBX and its NTE (OML participation, test code detail).
_OBX_COMPANIONS: Final = frozenset({"PRT", "TCD"})


@dataclass(slots=True)
class OrderGroup:
    """The segments of one order: its ORC (shared by the OBRs that follow it), its OBR."""

    orc: Segment | None
    obr: Segment | None = None
    timing: list[Segment] = field(default_factory=list)
    notes: list[Segment] = field(default_factory=list)
    diagnoses: list[Segment] = field(default_factory=list)
    #: Each OBX with the NTE segments that follow it and the SPM it follows, if any.
    observations: list[tuple[Segment, list[Segment], Segment | None]] = field(default_factory=list)
    specimens: list[Segment] = field(default_factory=list)
    #: The order's detail is RXO, ODS, RQD...: not a ServiceRequest.
    other_detail: bool = False


def order_groups(ctx: MappingContext) -> list[OrderGroup]:
    """The ORM/OML order groups of the message, in message order."""
    groups: list[OrderGroup] = []
    current: OrderGroup | None = None
    orc: Segment | None = None
    orc_timing: list[Segment] = []
    obx_notes: list[Segment] | None = None
    for seg in ctx.segments:
        name = seg.name
        if name == "ORC":
            orc, orc_timing = seg, []
            current = OrderGroup(orc, timing=orc_timing)
            groups.append(current)
            obx_notes = None
        elif name == "OBR":
            if current is not None and current.orc is orc and current.obr is None:
                if current.other_detail:
                    current = OrderGroup(orc, obr=seg, timing=list(orc_timing))
                    groups.append(current)
                else:
                    current.obr = seg
                    current.timing = list(orc_timing)
            else:
                current = OrderGroup(orc, obr=seg, timing=list(orc_timing))
                groups.append(current)
            obx_notes = None
        elif name in _OTHER_DETAIL:
            if current is not None and current.orc is orc and current.obr is None:
                current.other_detail = True
            else:
                current = OrderGroup(orc, other_detail=True)
                groups.append(current)
            obx_notes = None
        elif current is None:
            continue
        elif name == "TQ1":
            current.timing.append(seg)
        elif name == "NTE":
            (obx_notes if obx_notes is not None else current.notes).append(seg)
        elif name == "OBX":
            obx_notes = []
            about = current.specimens[-1] if current.specimens else None
            current.observations.append((seg, obx_notes, about))
        elif name == "DG1":
            current.diagnoses.append(seg)
            obx_notes = None
        elif name == "SPM":
            current.specimens.append(seg)
            obx_notes = None
        elif name not in _OBX_COMPANIONS:
            obx_notes = None
    return groups


@register("ORM", "OML")
def map_orders(ctx: MappingContext) -> None:
    """Every OBR (or bare ORC) order of an ORM/OML message → ServiceRequest; the OBX
    and DG1 of an order whose detail is not a ServiceRequest (RXO, ODS...) →
    Observation and Condition."""
    for ordinal, group in enumerate(order_groups(ctx)):
        if not group.other_detail:
            service_request(ctx, group, ordinal)
        else:
            # DG1[Condition] holds whatever the order is: the IG's reference to it is
            # the MedicationRequest's (NutritionOrder's...) reasonReference, a resource
            # we do not make; the Condition stands on its own (subject, code, onset).
            for dg1 in group.diagnoses:
                condition_from_dg1(ctx, dg1)
            prefix = f"{ctx.event_id}|order/{ordinal}"
            for obx, notes, _spm in group.observations:
                observation_from_obx(ctx, obx, key_prefix=prefix, notes=notes)


def service_request(ctx: MappingContext, group: OrderGroup, ordinal: int) -> str:
    """Add the ServiceRequest of one order group (and what it refers to); its reference."""
    orc, obr = group.orc, group.obr
    sr: dict[str, Any] = {"resourceType": "ServiceRequest", "id": ""}
    if obr is not None:
        obr.consume(1)

    identifiers = paired_identifiers(ctx, orc, obr, 2, "PLAC") + paired_identifiers(
        ctx, orc, obr, 3, "FILL"
    )
    identifiers += _alternate_placer(ctx, obr, 53) or _alternate_placer(ctx, orc, 33)
    requisition = None
    if orc is not None and orc.present(4):
        # The IG's ORC map makes ORC-4 an identifier (PGN); R4's requisition is the
        # element for a placer group number: both carry it.
        requisition, filler_group = _placer_group(ctx, orc)
        identifiers += [dict(x) for x in (requisition, filler_group) if x is not None]
    if identifiers:
        sr["identifier"] = identifiers
    based_on = _based_on(ctx, orc, 8) + _based_on(ctx, obr, 29) + _based_on(ctx, obr, 54)
    if based_on:
        sr["basedOn"] = based_on
    if requisition is not None:
        sr["requisition"] = requisition

    sr["status"] = order_status(orc)
    sr["intent"] = "reflex-order" if obr is not None and obr.value(11).upper() == "G" else "order"

    if obr is not None:
        code = dt.codeable_concept(ctx, obr.comps(4))
        if code is not None:
            sr["code"] = code
        details = [x for c in obr.each(46) + obr.each(47) if (x := dt.codeable_concept(ctx, c))]
        if details:
            sr["orderDetail"] = details

    sr["subject"] = subject_reference(ctx)
    if ctx.encounter_ref:
        sr["encounter"] = {"reference": ctx.encounter_ref}

    notes: list[dict[str, Any]] = []
    _timing(ctx, group, sr, notes)
    if orc is not None and orc.present(9) and orc.value(1).upper() == "NW":
        authored = dt.date_time(orc.value(9), "ORC-9")
        if authored:
            sr["authoredOn"] = authored

    requester = _requester(ctx, orc, obr)
    if requester is not None:
        sr["requester"] = {"reference": requester}

    reasons = [{"reference": condition_from_dg1(ctx, dg1)} for dg1 in group.diagnoses]
    if obr is not None:
        codes = [x for c in obr.each(31) if (x := dt.codeable_concept(ctx, c))]
        if codes:
            sr["reasonCode"] = codes
    if reasons:
        sr["reasonReference"] = reasons

    by_spm = {spm.index: specimen_from_spm(ctx, spm) for spm in group.specimens}
    specimens = list(by_spm.values())
    if obr is not None:
        from_obr = _obr_specimen(ctx, obr, specimens)
        if from_obr is not None:
            specimens.append(from_obr)
    if specimens:
        sr["specimen"] = [{"reference": ref} for ref in specimens]

    notes += [a for nte in group.notes if (a := annotation_from_nte(ctx, nte))]
    if notes:
        sr["note"] = notes

    if orc is not None:
        _order_extras(ctx, orc, sr)

    sr["id"] = _service_request_id(ctx, sr, ordinal)
    reference = ctx.add(sr)

    supporting = _observations(ctx, group, reference, by_spm)
    if supporting:
        sr["supportingInfo"] = [{"reference": ref} for ref in supporting]
    return reference


# --- status, identifiers, people ------------------------------------------------------


def order_status(orc: Segment | None) -> str:
    """ServiceRequest.status from ORC-5 (table 0038), else ORC-1 (table 0119)."""
    if orc is None:
        return "unknown"
    by_status = ORDER_STATUS.get(orc.value(5).upper())
    by_control = ORDER_CONTROL_STATUS.get(orc.value(1).upper())
    return by_status or by_control or "unknown"


def subject_reference(ctx: MappingContext) -> dict[str, Any]:
    """The Patient reference; a data-absent-reason when the message has no PID
    (subject is required on ServiceRequest, Condition and Immunization)."""
    if ctx.patient_ref:
        return {"reference": ctx.patient_ref}
    return {"extension": [{"url": DATA_ABSENT_REASON, "valueCode": "unknown"}]}


def peek(seg: Segment, n: int) -> str:
    """Field ``n`` as it stands, without marking it read."""
    return seg.fields[n] if n < len(seg.fields) else ""


def paired_identifiers(
    ctx: MappingContext, orc: Segment | None, obr: Segment | None, n: int, type_code: str
) -> list[dict[str, Any]]:
    """OBR-n, else ORC-n (placer 2, filler 3) → Identifier (IG: ORC-2/3 only when OBR-2/3
    is empty). An ORC number that repeats the OBR's is carried; one that differs is not
    (it stays in ``unmapped``)."""
    for seg, other in ((obr, orc), (orc, None)):
        if seg is None or not seg.present(n):
            continue
        if other is not None and other.present(n) and peek(other, n) == peek(seg, n):
            other.consume(n)
        found = dt.entity_identifier(ctx, seg.comps(n), type_code)
        return [found] if found is not None else []
    return []


def _alternate_placer(ctx: MappingContext, seg: Segment | None, n: int) -> list[dict[str, Any]]:
    if seg is None or not seg.present(n):
        return []
    out = []
    for c in seg.each(n):
        found = dt.identifier(ctx, c)
        if found is not None:
            found.setdefault("type", {"coding": [{"system": dt.V2_0203, "code": "PLAC"}]})
            out.append(found)
    return out


def _placer_group(
    ctx: MappingContext, orc: Segment
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """ORC-4: EI in every version but 2.8.2, where it is an EIP (placer & filler)."""
    c = orc.comps(4)
    if ctx.msg.header.version_id.strip().startswith("2.8.2"):
        placer = dt.entity_identifier(ctx, c.subs(1), "PGN")
        filler = dt.entity_identifier(ctx, c.subs(2), "FGN")
        return placer, filler
    return dt.entity_identifier(ctx, c, "PGN"), None


def _based_on(ctx: MappingContext, seg: Segment | None, n: int) -> list[dict[str, Any]]:
    """A parent order (EIP) → logical ServiceRequest references by identifier."""
    if seg is None or not seg.present(n):
        return []
    out = []
    for c in seg.each(n):
        for part, type_code in ((1, "PLAC"), (2, "FILL")):
            found = dt.entity_identifier(ctx, c.subs(part), type_code)
            if found is not None:
                out.append({"type": "ServiceRequest", "identifier": found})
    return out


def _requester(ctx: MappingContext, orc: Segment | None, obr: Segment | None) -> str | None:
    practitioner = None
    if orc is not None and orc.present(12):
        practitioner = dt.practitioner(ctx, orc.comps(12))
        if obr is not None and obr.present(16) and peek(obr, 16) == peek(orc, 12):
            obr.consume(16)  # the same provider, already carried
    elif obr is not None and obr.present(16):
        practitioner = dt.practitioner(ctx, obr.comps(16))
    if practitioner is not None and orc is not None and orc.present(24):
        found = ctx.get(practitioner)
        addresses = [a for c in orc.each(24) if (a := dt.address(c))]
        if found is not None and addresses:
            found.setdefault("address", addresses)
    return with_ordering_facility(ctx, orc, practitioner) if orc is not None else practitioner


def _order_extras(ctx: MappingContext, orc: Segment, sr: dict[str, Any]) -> None:
    if orc.present(16):
        reason = dt.codeable_concept(ctx, orc.comps(16))
        if reason is not None:
            sr["extension"] = [{"url": REQUEST_STATUS_EXTENSION, "valueCodeableConcept": reason}]
    if orc.present(29):
        order_type = orc.comps(29)
        mapped = ORDER_TYPE.get(order_type.text(1).upper())
        if mapped is not None:
            sr["locationCode"] = [
                {"coding": [{"system": V3_ROLE_CODE, "code": mapped[0], "display": mapped[1]}]}
            ]
        else:
            concept = dt.codeable_concept(ctx, order_type)
            if concept is not None:
                for coding in concept.get("coding", ()):
                    coding.setdefault("system", V2_0482)  # a bare code is a table 0482 code
                sr["locationCode"] = [concept]


def _service_request_id(ctx: MappingContext, sr: dict[str, Any], ordinal: int) -> str:
    """Placer (else filler) order number and the service code: the order's identity
    across messages (one placer number can carry several OBR services)."""
    for type_code in ("PLAC", "FILL"):
        for ident in sr.get("identifier", ()):
            if ident["type"]["coding"][0]["code"] == type_code:
                scope = ident.get("system") or ctx.msg.header.sender_key
                coding = sr.get("code", {}).get("coding", [{}])[0]
                service = f"{coding.get('system', '')}|{coding.get('code', '')}"
                key = f"ServiceRequest|{scope}|{ident['value']}|{service}"
                rid = uuid5_str(key)
                # The same order twice in one message: two resources, not one merged.
                return rid if ctx.get(rid) is None else uuid5_str(f"{key}|@{ordinal}")
    return ctx.resource_id(f"ServiceRequest/{ordinal}")


# --- timing ---------------------------------------------------------------------------


@dataclass(slots=True)
class _Timing:
    start: str | None = None
    end: str | None = None
    code: dict[str, Any] | None = None
    repeat: dict[str, Any] = field(default_factory=dict)
    bounds_duration: dict[str, Any] | None = None


def _timing(
    ctx: MappingContext, group: OrderGroup, sr: dict[str, Any], notes: list[dict[str, Any]]
) -> None:
    """TQ1 (v2.5+), else ORC-7, else OBR-27 → occurrence, priority, quantity, note."""
    orc, obr = group.orc, group.obr
    timing: _Timing | None = None
    priority = ""
    if group.timing:
        tq1 = group.timing[0]
        timing, priority = _from_tq1(ctx, tq1, sr, notes)
    else:
        for seg, n, loc in ((orc, 7, "ORC-7"), (obr, 27, "OBR-27")):
            if seg is not None and seg.present(n):
                timing, priority = _from_tq(ctx, seg.comps(n), loc, sr, notes)
                break
    if timing is not None:
        _set_occurrence(sr, timing)
    no_occurrence = not any(k in sr for k in _OCCURRENCE)
    if no_occurrence and obr is not None and obr.present(6):
        requested = dt.date_time(obr.value(6), "OBR-6")
        if requested:
            sr["occurrenceDateTime"] = requested
    if not priority and obr is not None and obr.present(5):
        priority = obr.value(5)
    mapped = PRIORITY.get(priority.strip().upper())
    if mapped:
        sr["priority"] = mapped


def _set_occurrence(sr: dict[str, Any], t: _Timing) -> None:
    period: dict[str, str] = {}
    if t.start:
        period["start"] = t.start
    if t.end:
        period["end"] = t.end
    if t.code is None and not t.repeat:
        if t.start and not t.end:
            sr["occurrenceDateTime"] = t.start
        elif period:
            sr["occurrencePeriod"] = period
        elif t.bounds_duration is not None:
            sr["occurrenceTiming"] = {"repeat": {"boundsDuration": t.bounds_duration}}
        return
    timing: dict[str, Any] = {}
    repeat = dict(t.repeat)
    if period:
        repeat["boundsPeriod"] = period
    elif t.bounds_duration is not None:
        repeat["boundsDuration"] = t.bounds_duration
    if repeat:
        timing["repeat"] = repeat
    if t.code is not None:
        timing["code"] = t.code
    sr["occurrenceTiming"] = timing


def _from_tq1(
    ctx: MappingContext, tq1: Segment, sr: dict[str, Any], notes: list[dict[str, Any]]
) -> tuple[_Timing, str]:
    tq1.consume(1)
    t = _Timing()
    quantity = _cq_quantity(tq1.comps(2), "TQ1-2")
    if quantity is not None:
        sr["quantityQuantity"] = quantity
    rpt = tq1.comps(3)
    if rpt:
        t.code = _repeat_code(ctx, rpt.subs(1))
        _rpt_repeat(rpt, t.repeat)
    times = [x for c in tq1.each(4) if (x := _time_of_day(c.text(1), "TQ1-4"))]
    if times:
        t.repeat["timeOfDay"] = times
    t.start = dt.date_time(tq1.value(7), "TQ1-7")
    t.end = dt.date_time(tq1.value(8), "TQ1-8")
    duration = tq1.comps(13)
    if duration:
        unit = TIME_UNITS.get(duration.subs(2).text(1).lower())
        number = _decimal(duration.text(1), "TQ1-13")
        if unit and number is not None:
            t.repeat["duration"] = number
            t.repeat["durationUnit"] = unit
    count = _positive_int(tq1.value(14), "TQ1-14")
    if count is not None:
        t.repeat["count"] = count
    text = tq1.value(11)
    if text:
        notes.append({"text": text})
    return t, tq1.value(9)


def _from_tq(
    ctx: MappingContext,
    c: Components,
    loc: str,
    sr: dict[str, Any],
    notes: list[dict[str, Any]],
) -> tuple[_Timing, str]:
    """v2.3-2.4 TQ: quantity^interval^duration^start^end^priority^condition^text^..."""
    t = _Timing()
    q = c.subs(1)
    if q.text(1):
        sr["quantityQuantity"] = dt.quantity(
            q.text(1), Components.of_subcomponents(ctx, q.part(2)), f"{loc}.1"
        )
    interval = c.subs(2)
    if interval.text(1):
        t.code = _repeat_code(ctx, Components.of_subcomponents(ctx, interval.part(1)))
    explicit = _time_of_day(interval.text(2), f"{loc}.2")
    if explicit:
        t.repeat["timeOfDay"] = [explicit]
    t.start = dt.date_time(c.text(4), f"{loc}.4")
    t.end = dt.date_time(c.text(5), f"{loc}.5")
    duration = _TQ_DURATION.fullmatch(c.text(3).upper())
    if duration is not None:
        letter, number = duration.groups()
        if letter == "X":
            t.repeat["count"] = int(float(number))
        else:
            t.bounds_duration = _duration(number, _TQ_DURATION_UNITS[letter])
    total = _positive_int(c.text(12), f"{loc}.12")
    if total is not None:
        t.repeat["count"] = total
    if c.text(8):
        notes.append({"text": c.text(8)})
    return t, c.text(6)


def _repeat_code(ctx: MappingContext, c: Components) -> dict[str, Any] | None:
    """RPT-1 / RI-1 (table 0335) → Timing.code; a bare code is a table 0335 code."""
    concept = dt.codeable_concept(ctx, c)
    if concept is not None:
        for coding in concept.get("coding", ()):
            coding.setdefault("system", V2_0335)
    return concept


def _rpt_repeat(rpt: Components, repeat: dict[str, Any]) -> None:
    """RPT period (5, 6), event (8) and event offset (9, 10) → Timing.repeat."""
    unit = TIME_UNITS.get(rpt.subs(6).text(1).lower())
    period = _decimal(rpt.text(5), "TQ1-3.5")
    if unit and period is not None:
        repeat["period"] = period
        repeat["periodUnit"] = unit
    event = rpt.text(8).upper()
    if event in EVENT_TIMING:
        repeat["when"] = [event]
        offset_unit = TIME_UNITS.get(rpt.subs(10).text(1).lower())
        offset = _decimal(rpt.text(9), "TQ1-3.9")
        if offset_unit and offset is not None and offset >= 0:
            repeat["offset"] = round(offset * _MINUTES_PER[offset_unit])


def _time_of_day(value: str, location: str) -> str | None:
    """HL7 TM (``HHMM[SS]``; ``HH:MM:SS`` as some senders write it) → FHIR time."""
    value = value.replace(":", "").strip()
    if not value:
        return None
    m = _TM.fullmatch(value)
    if m is None:
        raise DataTypeError("not an HL7 time", location=location)
    hh, mm, ss = m.group(1), m.group(2) or "00", m.group(3) or "00"
    if int(hh) > 23 or int(mm) > 59 or int(ss) > 59:
        raise DataTypeError("not a valid time of day", location=location)
    return f"{hh}:{mm}:{ss}"


def _decimal(value: str, location: str) -> int | float | None:
    value = value.strip()
    if not value:
        return None
    return dt.number(value, location)


def _positive_int(value: str, location: str) -> int | None:
    value = value.strip()
    if not value:
        return None
    number = dt.number(value, location)
    return int(number) if number >= 1 else None


def _duration(number: str, unit: str) -> dict[str, Any]:
    value = dt.number(number, "TQ-3")
    return {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit}


def _cq_quantity(c: Components, location: str) -> dict[str, Any] | None:
    """CQ (quantity ^ units CWE in subcomponents) → Quantity."""
    if not c.text(1):
        return None
    return dt.quantity(c.text(1), c.subs(2), location)


# --- specimens, diagnoses, notes, observations ----------------------------------------


def specimen_from_spm(ctx: MappingContext, spm: Segment) -> str:
    """SPM → Specimen (IG SPM[Specimen]); its reference."""
    spm.consume(1)
    specimen: dict[str, Any] = {"resourceType": "Specimen"}
    identifiers = []
    if spm.present(2):
        eip = spm.comps(2)
        for part, type_code in ((1, "PLAC"), (2, "FILL")):
            found = dt.entity_identifier(ctx, eip.subs(part), type_code)
            if found is not None:
                identifiers.append(found)
    identifiers += [x for c in spm.each(31) if (x := dt.identifier(ctx, c))]
    if identifiers:
        specimen["identifier"] = identifiers
    if spm.present(30):
        accession = dt.identifier(ctx, spm.comps(30))
        if accession is not None:
            specimen["accessionIdentifier"] = accession
    availability = spm.value(20).upper()
    if availability in ("Y", "N"):
        specimen["status"] = "available" if availability == "Y" else "unavailable"
    kind = dt.codeable_concept(ctx, spm.comps(4))
    if kind is not None:
        specimen["type"] = kind
    if ctx.patient_ref:
        specimen["subject"] = {"reference": ctx.patient_ref}
    received = dt.date_time(spm.value(18), "SPM-18")
    if received:
        specimen["receivedTime"] = received

    collection: dict[str, Any] = {}
    if spm.present(17):
        dr = spm.comps(17)
        start = dt.date_time(dr.text(1), "SPM-17.1")
        end = dt.date_time(dr.text(2), "SPM-17.2")
        if end:
            collection["collectedPeriod"] = {k: v for k, v in (("start", start), ("end", end)) if v}
        elif start:
            collection["collectedDateTime"] = start
    amount = _cq_quantity(spm.comps(12), "SPM-12")
    if amount is not None:
        collection["quantity"] = amount
    method = dt.codeable_concept(ctx, spm.comps(7))
    if method is not None:
        collection["method"] = method
    site = dt.codeable_concept(ctx, spm.comps(8))
    if site is not None:
        collection["bodySite"] = site
    if collection:
        specimen["collection"] = collection

    container: dict[str, Any] = {}
    container_type = dt.codeable_concept(ctx, spm.comps(27))
    if container_type is not None:
        container["type"] = container_type
    additive = dt.codeable_concept(ctx, spm.comps(6))
    if additive is not None:
        container["additiveCodeableConcept"] = additive
    if container:
        specimen["container"] = [container]
    conditions = [x for c in spm.each(24) if (x := dt.codeable_concept(ctx, c))]
    if conditions:
        specimen["condition"] = conditions
    notes = [{"text": text} for rep in spm.reps(14) if (text := ctx.decode(rep).strip())]
    if notes:
        specimen["note"] = notes

    if identifiers:
        key = "|".join(
            f"{x.get('system', ctx.msg.header.sender_key)}|{x['value']}" for x in identifiers
        )
        specimen["id"] = uuid5_str(f"Specimen|{key}")
    else:
        specimen["id"] = ctx.resource_id(f"Specimen/{spm.index}")
    return ctx.add(specimen)


def _obr_specimen(ctx: MappingContext, obr: Segment, specimens: list[str]) -> str | None:
    """OBR-7/8/9/10/14/15 (IG OBR[Specimen]) → the first SPM Specimen where it has
    nothing of its own, else a Specimen of the OBR's own. Returns a new reference."""
    fields = [n for n in (7, 8, 9, 10, 14, 15) if obr.present(n)]
    if not fields:
        return None
    existing = ctx.get(specimens[0]) if specimens else None
    specimen: dict[str, Any] = existing if existing is not None else {"resourceType": "Specimen"}
    collection: dict[str, Any] = specimen.setdefault("collection", {})
    if 7 in fields or 8 in fields:
        # Peeked, not read: an SPM-17 that says otherwise wins and OBR-7/8 stay unmapped.
        start = dt.date_time(Components(ctx, peek(obr, 7)).text(1), "OBR-7")
        end = dt.date_time(Components(ctx, peek(obr, 8)).text(1), "OBR-8")
        collected: dict[str, Any] = {}
        if end:
            collected["collectedPeriod"] = {k: v for k, v in (("start", start), ("end", end)) if v}
        elif start:
            collected["collectedDateTime"] = start
        had = {
            k: collection[k] for k in ("collectedDateTime", "collectedPeriod") if k in collection
        }
        if not had:
            collection.update(collected)
        if not had or had == collected:
            obr.consume(7, 8)
    if 9 in fields and "quantity" not in collection:
        amount = _cq_quantity(obr.comps(9), "OBR-9")
        if amount is not None:
            collection["quantity"] = amount
    if 10 in fields and "collector" not in collection:
        collector = dt.practitioner(ctx, obr.comps(10))
        if collector is not None:
            collection["collector"] = {"reference": collector}
    if 14 in fields and "receivedTime" not in specimen:
        received = dt.date_time(obr.value(14), "OBR-14")
        if received:
            specimen["receivedTime"] = received
    if 15 in fields:
        source = obr.comps(15)
        kind = dt.codeable_concept(ctx, source.subs(1))
        if kind is not None and "type" not in specimen:
            specimen["type"] = kind
        site = dt.codeable_concept(ctx, source.subs(4))
        if site is not None and "bodySite" not in collection:
            collection["bodySite"] = site
    if not collection:
        del specimen["collection"]
    if existing is not None:
        return None
    if ctx.patient_ref:
        specimen["subject"] = {"reference": ctx.patient_ref}
    specimen["id"] = ctx.resource_id(f"Specimen/OBR/{obr.index}")
    return ctx.add(specimen)


def condition_from_dg1(ctx: MappingContext, dg1: Segment) -> str:
    """DG1 → Condition (IG DG1[Condition]); its reference."""
    dg1.consume(1)
    condition: dict[str, Any] = {"resourceType": "Condition"}
    identifier = dt.entity_identifier(ctx, dg1.comps(20)) if dg1.present(20) else None
    if identifier is not None:
        condition["identifier"] = [identifier]
    if dg1.value(21).upper() == "D":
        condition["verificationStatus"] = {
            "coding": [{"system": CONDITION_VER_STATUS, "code": "entered-in-error"}]
        }
    code = dt.codeable_concept(ctx, dg1.comps(3))
    description = dg1.value(4)
    if description:
        code = {**(code or {}), "text": description}
    if code is not None:
        condition["code"] = code
    condition["subject"] = subject_reference(ctx)
    onset = dt.date_time(dg1.value(5), "DG1-5")
    if onset:
        condition["onsetDateTime"] = onset
    attested = dt.date_time(dg1.value(19), "DG1-19")
    if attested:
        condition["recordedDate"] = attested
        condition["extension"] = [{"url": ASSERTED_DATE, "valueDateTime": attested}]
    if dg1.present(16):
        asserter = dt.practitioner(ctx, dg1.comps(16))
        if asserter is not None:
            condition["asserter"] = {"reference": asserter}
    rid = ""
    if identifier is not None:
        scope = identifier.get("system") or ctx.msg.header.sender_key
        rid = uuid5_str(f"Condition|{scope}|{identifier['value']}")
        existing = ctx.get(rid)
        if existing is not None and _conflicts(existing, condition):
            # The same DG1-20 with other content (another onset, say) in a second order
            # group: a Condition of its own, so that nothing read is dropped.
            rid = ""
    condition["id"] = rid or ctx.resource_id(f"Condition/{dg1.index}")
    return ctx.add(condition)


def _conflicts(existing: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether ``new`` has an element ``existing`` holds with another value."""
    return any(k != "id" and k in existing and existing[k] != v for k, v in new.items())


def annotation_from_nte(ctx: MappingContext, nte: Segment) -> dict[str, Any] | None:
    """NTE → Annotation: NTE-3 (every repetition, one line each), NTE-5 author, NTE-6 time."""
    nte.consume(1)
    text = "\n".join(ctx.decode(rep) for rep in nte.reps(3)).strip()
    if not text:
        return None
    note: dict[str, Any] = {}
    if nte.present(5):
        author = dt.practitioner(ctx, nte.comps(5))
        if author is not None:
            note["authorReference"] = {"reference": author}
    when = dt.date_time(nte.value(6), "NTE-6")
    if when:
        note["time"] = when
    note["text"] = text
    return note


def _observations(
    ctx: MappingContext, group: OrderGroup, reference: str, specimens: dict[int, str]
) -> list[str]:
    """OBX of the order → Observations ``basedOn`` it; returns those that support the
    order (IG: ServiceRequest.supportingInfo). An OBX after an SPM is about that
    specimen (SPECIMEN_OBSERVATION): its Observation's focus is the Specimen."""
    if not group.observations:
        return []
    supporting = []
    prefix = f"ServiceRequest|{reference}"
    for obx, notes, spm in group.observations:
        about = specimens.get(spm.index) if spm is not None else None
        ref = observation_from_obx(
            ctx, obx, key_prefix=prefix, based_on=[reference], notes=notes, focus=about
        )
        if about is None:
            supporting.append(ref)
            # OBX-29 QST/SCI (asked at order entry) is what supportingInfo says.
            if Components(ctx, peek(obx, 29)).text(1).upper() in ORDER_ENTRY_OBSERVATION:
                obx.consume(29)
    return supporting
