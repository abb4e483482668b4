"""SIU (S12-S26) → Appointment, following the v2-to-FHIR IG's SIU_S12 message map
and its SCH, AIS, AIG, AIL, AIP and NTE[Appointment-Comment] segment maps.

One Appointment per message, its id a UUIDv5 of the filler appointment id
(SCH-2, else the placer's SCH-1) and its authority, so a reschedule, a
cancellation or a no-show lands on the same resource id as the booking.

SCH → Appointment
    SCH-1/SCH-2 → ``identifier`` (PLAC/FILL); SCH-6 event reason →
    ``cancelationReason`` when the appointment ends cancelled, no-show or
    deleted; SCH-7 appointment reason → ``reasonCode`` (table 0276 system for a
    bare code); SCH-8 appointment type → ``appointmentType`` (table 0277), else
    SCH-7 when its code is one of table 0276, the value set R4 binds to
    ``appointmentType``; SCH-9/SCH-10 duration → ``minutesDuration``; SCH-11
    (TQ, v2.3-2.5) start/end → ``start``/``end`` when no TQ1 follows the SCH;
    SCH-12 placer contact, SCH-16 filler contact, SCH-20 entered by →
    information-only participants (IG), their phone and address (SCH-13/14,
    SCH-17/18, SCH-21) on the Practitioner; SCH-25 filler status (0278) →
    ``status``; SCH-26/SCH-27 order numbers → ``basedOn`` (logical references to
    the ServiceRequest).
TQ1 after SCH (v2.6+) → ``start`` (TQ1-7), ``end`` (TQ1-8), duration (TQ1-13).
AIS → ``serviceType`` (AIS-3), and a ServiceRequest per AIS (IG AIS[ServiceRequest]:
    AIS-3 → ``code`` and ``identifier``, AIS-4 + duration → ``occurrencePeriod``)
    that ``basedOn`` references; the first AIS start (AIS-4) and duration
    (AIS-7/AIS-8) stand in when the SCH group gives no time; AIS-10 filler
    status when SCH-25 is empty; AIS-2 ``D`` (deleted) leaves the service out.
AIG/AIL/AIP → ``participant``: AIG-3 a Device, AIL-3 a Location (AIL-4 its
    type), AIP-3 a Practitioner; AIG-4/AIP-4 → ``participant.type``; start,
    start offset and duration → ``participant.period``; filler status (0278) →
    ``participant.status``; segment action ``D`` → ``declined``.
PID → the Patient participant. NTE (anywhere in the message) → ``comment``,
one line per note (R4 has one comment string).

Status: the cancel, discontinue, delete and no-show events (S15, S16, S17,
S26) decide it; otherwise SCH-25, else AIS-10, else the event (booked for
S12-S14 and S18-S22, proposed for the rest). Discontinued (``Dc``) has no R4
equivalent and maps to ``cancelled``: the appointment will not take place.

``start``/``end`` are instants in R4 and must come together: when the message
gives no time with a UTC offset, or only one end of it, the times go to each
participant's ``period`` instead (where the IG puts the resources' times). A
time without an offset gets the offset of the hl7_default_timezone setting.
Durations without units are minutes (the HL7 default); a duration in units
that are not time units is not carried.

Not carried (reported in ``unmapped`` when present): SCH-3/4/5, SCH-6 outside
cancellations, SCH-15/19/22 contact locations, SCH-23/24 parent appointment
ids, the other TQ1 fields (priority TQ1-9 has no R4 equivalent), RGS-2/3, AIx
resource groups, quantities and substitution codes, AIS-11/12 supplemental
information, NTE-2/4/5/6; the PATIENT group's PV1, PV2 and DG1 belong to
the shared encounter and condition maps. OBX → Observation (oru.observation_from_obx).
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Any, Final

from bridge.errors import DataTypeError, RequiredFieldMissing
from bridge.normalize import datatypes as dt
from bridge.normalize.bundle import register
from bridge.normalize.context import Components, MappingContext, Segment
from bridge.normalize.families.orders import subject_reference
from bridge.normalize.families.oru import observation_from_obx
from bridge.normalize.ids import uuid5_str

V2_0276: Final = "http://terminology.hl7.org/CodeSystem/v2-0276"
V2_0277: Final = "http://terminology.hl7.org/CodeSystem/v2-0277"
PROVENANCE_PARTICIPANT_TYPE: Final = (
    "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
)

#: HL7 table 0276 (appointment reason codes): also R4's appointmentType value set.
APPOINTMENT_REASON: Final[dict[str, str]] = {
    "CHECKUP": "A routine check-up, such as an annual physical",
    "EMERGENCY": "Emergency appointment",
    "FOLLOWUP": "A follow up visit from a previous appointment",
    "ROUTINE": "Routine appointment - default if not valued",
    "WALKIN": "A previously unscheduled walk-in visit",
}

#: HL7 table 0277 (appointment type codes).
APPOINTMENT_TYPE: Final[dict[str, str]] = {
    "Normal": "Routine schedule request type, default if not valued",
    "Tentative": "A request for a tentative (e.g., penciled in) appointment",
    "Complete": "A request to add a completed appointment",
}

#: HL7 table 0278 (filler status codes, lower case) → FHIR appointmentstatus (IG
#: FillerStatusCodes[Appointment]; Dc and Overbook added, Blocked has none).
FILLER_STATUS: Final[dict[str, str]] = {
    "pending": "pending",
    "waitlist": "waitlist",
    "booked": "booked",
    "overbook": "booked",
    "started": "checked-in",
    "complete": "fulfilled",
    "cancelled": "cancelled",
    "dc": "cancelled",
    "discontinued": "cancelled",
    "deleted": "entered-in-error",
    "noshow": "noshow",
}

#: HL7 table 0278 (lower case) → FHIR participationstatus of one resource.
PARTICIPANT_STATUS: Final[dict[str, str]] = {
    "booked": "accepted",
    "overbook": "accepted",
    "started": "accepted",
    "complete": "accepted",
    "noshow": "accepted",
    "pending": "tentative",
    "waitlist": "tentative",
    "cancelled": "declined",
    "dc": "declined",
    "discontinued": "declined",
    "deleted": "declined",
    "blocked": "declined",
}

#: Events that decide the appointment's status whatever SCH-25 says.
EVENT_STATUS: Final[dict[str, str]] = {
    "S15": "cancelled",
    "S16": "cancelled",
    "S17": "entered-in-error",
    "S26": "noshow",
}
#: Events about an appointment that exists (booked unless SCH-25/AIS-10 say otherwise).
_BOOKED_EVENTS: Final = frozenset({"S12", "S13", "S14", "S18", "S19", "S20", "S21", "S22"})
#: Appointment.status → the status of the ServiceRequest it is booked for: a cancelled
#: or missed appointment revokes the request, a deleted one was entered in error.
_REQUEST_STATUS: Final[dict[str, str]] = {
    "cancelled": "revoked",
    "noshow": "revoked",
    "entered-in-error": "entered-in-error",
    "fulfilled": "completed",
    "proposed": "draft",
    "pending": "draft",
    "waitlist": "draft",
}
_ENDED_STATUS: Final = frozenset({"cancelled", "noshow", "entered-in-error"})
_UNCONFIRMED_STATUS: Final = frozenset({"proposed", "pending", "waitlist"})

#: Duration unit (CNE-1, or its text, lower case) → seconds. HL7 defaults to minutes.
UNIT_SECONDS: Final[dict[str, int]] = {
    "s": 1,
    "sec": 1,
    "second": 1,
    "seconds": 1,
    "min": 60,
    "mins": 60,
    "minute": 60,
    "minutes": 60,
    "h": 3600,
    "hr": 3600,
    "hrs": 3600,
    "hour": 3600,
    "hours": 3600,
    "d": 86400,
    "day": 86400,
    "days": 86400,
    "wk": 604800,
    "week": 604800,
    "weeks": 604800,
}
#: Longest duration or offset accepted: nothing is scheduled a century ahead, and
#: datetime arithmetic must not overflow.
MAX_DURATION_S: Final = 100 * 366 * 86400
_NUMBER: Final = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")

#: (start, start offset, offset units, duration, duration units, filler status)
#: field numbers of the resource segments.
_RESOURCE_FIELDS: Final[dict[str, tuple[int, int, int, int, int, int]]] = {
    "AIG": (8, 9, 10, 11, 12, 14),
    "AIL": (6, 7, 8, 9, 10, 12),
    "AIP": (6, 7, 8, 9, 10, 12),
}


@register("SIU")
def map_siu(ctx: MappingContext) -> None:
    """Add the Appointment of an SIU message to the Bundle."""
    sch = ctx.first("SCH")
    if sch is None:
        raise RequiredFieldMissing("SIU message without an SCH segment", location="SCH")
    event = dt.code(ctx.msg.header.trigger_event).upper()

    appt: dict[str, Any] = {"resourceType": "Appointment"}
    placer = dt.entity_identifier(ctx, sch.comps(1), "PLAC")
    filler = dt.entity_identifier(ctx, sch.comps(2), "FILL")
    identifiers = [x for x in (placer, filler) if x is not None]
    key = filler or placer
    if key is not None:
        kind = "FILL" if key is filler else "PLAC"
        appt["id"] = uuid5_str(f"Appointment|{kind}|{key.get('system', '')}|{key['value']}")
    else:
        appt["id"] = ctx.resource_id("Appointment")
    if identifiers:
        appt["identifier"] = identifiers

    services, service_status, timing, ais_services = _services(ctx, sch)
    status = _status(sch, event, service_status)
    appt["status"] = status
    if status in _ENDED_STATUS:
        reason = dt.codeable_concept(ctx, sch.comps(6))
        if reason is not None:
            appt["cancelationReason"] = reason
    if services:
        appt["serviceType"] = services

    reason_cc = _table_cwe(ctx, sch.comps(7), V2_0276, APPOINTMENT_REASON)
    if reason_cc is not None:
        appt["reasonCode"] = [reason_cc]
    appointment_type = _table_cwe(ctx, sch.comps(8), V2_0277, APPOINTMENT_TYPE)
    if appointment_type is None and reason_cc is not None and _in_table(reason_cc, V2_0276):
        appointment_type = reason_cc
    if appointment_type is not None:
        appt["appointmentType"] = appointment_type

    start, end, seconds = timing
    if start is not None and end is None and seconds:
        end = _shift(start, seconds)
    both_instants = (
        start is not None and end is not None and dt.is_instant(start) and dt.is_instant(end)
    )
    if both_instants:
        appt["start"] = start
        appt["end"] = end
    minutes = _whole_minutes(seconds)
    if minutes is not None:
        appt["minutesDuration"] = minutes

    comment = _comment(ctx)
    if comment:
        appt["comment"] = comment

    participants = _participants(ctx, sch, start, status)
    if not both_instants and (start is not None or end is not None):
        period = {k: v for k, v in (("start", start), ("end", end)) if v is not None}
        for p in participants:
            if "period" not in p and p.get("required") != "information-only":
                p["period"] = dict(period)
    if not participants:
        raise RequiredFieldMissing("SIU message names no participant", location="PID")
    appt["participant"] = participants

    based_on = [
        {"type": "ServiceRequest", "identifier": ident}
        for ident in (
            *(dt.entity_identifier(ctx, c, "PLAC") for c in sch.each(26)),
            *(dt.entity_identifier(ctx, c, "FILL") for c in sch.each(27)),
        )
        if ident is not None
    ]
    based_on += [
        {"reference": _service_request(ctx, appt["id"], n, status, *found)}
        for n, found in enumerate(ais_services)
    ]
    if based_on:
        appt["basedOn"] = based_on
    for n, obx in enumerate(ctx.all("OBX")):
        observation_from_obx(ctx, obx, key_prefix=f"{ctx.event_id}|SIU|{n}")
    ctx.add(appt)


def _service_request(
    ctx: MappingContext,
    appointment_id: str,
    n: int,
    appointment_status: str,
    code: dict[str, Any],
    start: str | None,
    end: str | None,
) -> str:
    """AIS → ServiceRequest (IG AIS[ServiceRequest]): AIS-3 the service (``code``, and
    the identifier the IG's CWE[Identifier] makes of it), AIS-4 and its duration →
    ``occurrencePeriod``; the request the appointment is booked for, its status
    following the appointment's."""
    sr: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "id": uuid5_str(f"ServiceRequest|Appointment|{appointment_id}|{n}"),
        "status": _REQUEST_STATUS.get(appointment_status, "active"),
        "intent": "order",
        "code": code,
    }
    coding = code.get("coding", [{}])[0]
    if coding.get("code"):
        ident: dict[str, Any] = {"value": coding["code"]}
        if coding.get("system"):
            ident["system"] = coding["system"]
        sr["identifier"] = [ident]
    sr["subject"] = subject_reference(ctx)
    if ctx.encounter_ref:
        sr["encounter"] = {"reference": ctx.encounter_ref}
    period = {k: v for k, v in (("start", start), ("end", end)) if v is not None}
    if period:
        sr["occurrencePeriod"] = period
    return ctx.add(sr)


# --- status ---------------------------------------------------------------------------


def _status(sch: Segment, event: str, service_status: list[str]) -> str:
    decided = EVENT_STATUS.get(event)
    filler = FILLER_STATUS.get(sch.value(25).lower())
    if decided is not None:
        return decided
    if filler is not None:
        return filler
    for code in service_status:
        found = FILLER_STATUS.get(code)
        if found is not None:
            return found
    return "booked" if event in _BOOKED_EVENTS else "proposed"


# --- codes ----------------------------------------------------------------------------


def _table_cwe(
    ctx: MappingContext, c: Components, system: str, table: dict[str, str]
) -> dict[str, Any] | None:
    """A CWE whose bare code (no coding system) is one of an HL7 table's codes gets
    that table's system and display."""
    code = dt.code(c.text(1))
    if code and not c.text(3):
        found = next((k for k in table if k.upper() == code.upper()), None)
        if found is not None:
            concept: dict[str, Any] = {
                "coding": [{"system": system, "code": found, "display": table[found]}]
            }
            text = c.text(9) or c.text(2)
            if text:
                concept["text"] = text
            return concept
    return dt.codeable_concept(ctx, c)


def _in_table(concept: dict[str, Any], system: str) -> bool:
    return any(x.get("system") == system for x in concept.get("coding", ()))


# --- time -----------------------------------------------------------------------------


def _services(
    ctx: MappingContext, sch: Segment
) -> tuple[
    list[dict[str, Any]],
    list[str],
    tuple[str | None, str | None, float | None],
    list[tuple[dict[str, Any], str | None, str | None]],
]:
    """Service types, AIS filler statuses, and the appointment's (start, end, duration
    in seconds) from TQ1, SCH-11 and SCH-9/10, with the first timed AIS standing in."""
    start = end = None
    seconds: float | None = None
    tq1 = next(ctx.after(sch, ("TQ1",), ("PID", "RGS")), None)
    if tq1 is not None:
        tq1.consume(1)
        start = dt.date_time(tq1.value(7), "TQ1-7")
        end = dt.date_time(tq1.value(8), "TQ1-8")
        cq = tq1.comps(13)
        if cq:
            seconds = _seconds(cq.text(1), cq.subs(2), "TQ1-13")
    if start is None and end is None and sch.present(11):
        tq = sch.comps(11)
        start = dt.date_time(tq.text(4), "SCH-11.4")
        end = dt.date_time(tq.text(5), "SCH-11.5")
    if sch.present(9):
        seconds = _seconds(sch.value(9), sch.comps(10), "SCH-9") or seconds

    services: list[dict[str, Any]] = []
    statuses: list[str] = []
    requests: list[tuple[dict[str, Any], str | None, str | None]] = []
    for ais in ctx.all("AIS"):
        ais.consume(1)
        deleted = ais.value(2).upper() == "D"
        service = dt.codeable_concept(ctx, ais.comps(3))
        if service is not None and not deleted and service not in services:
            services.append(service)
        status = ais.value(10).lower()
        if status and not deleted:
            statuses.append(status)
        ais_start, ais_end, ais_seconds = _period(ais, "AIS", (4, 5, 6, 7, 8), start)
        if service is not None and not deleted:
            requests.append((service, ais_start, ais_end))
        if start is None and end is None and ais_start is not None:
            start, end = ais_start, ais_end
        if seconds is None:
            seconds = ais_seconds
    return services, statuses, (start, end, seconds), requests


def _period(
    seg: Segment, name: str, fields: tuple[int, int, int, int, int], anchor: str | None
) -> tuple[str | None, str | None, float | None]:
    """(start, end, duration in seconds) of a resource segment: the start, else the
    appointment start plus the start offset; the end is the start plus the duration."""
    f_start, f_offset, f_offset_units, f_duration, f_duration_units = fields
    start = dt.date_time(seg.value(f_start), f"{name}-{f_start}")
    if start is None and anchor is not None and seg.present(f_offset):
        offset = _seconds(
            seg.value(f_offset), seg.comps(f_offset_units), f"{name}-{f_offset}", offset=True
        )
        if offset is not None:
            start = _shift(anchor, offset)
    seconds = None
    if seg.present(f_duration):
        seconds = _seconds(
            seg.value(f_duration), seg.comps(f_duration_units), f"{name}-{f_duration}"
        )
    end = _shift(start, seconds) if start is not None and seconds else None
    return start, end, seconds


def _seconds(value: str, units: Components, location: str, *, offset: bool = False) -> float | None:
    """A duration (NM and CNE units) in seconds; None when the units are not a time
    unit. Only an offset may be negative."""
    number = value.strip()
    if not number:
        return None
    if not _NUMBER.fullmatch(number):
        raise DataTypeError("not a number", location=location)
    unit = units.text(1).lower()
    factor = UNIT_SECONDS.get(unit) or UNIT_SECONDS.get(units.text(2).lower())
    if factor is None:
        if unit or units.text(2):
            return None
        factor = 60  # HL7: the duration units default to minutes
    seconds = float(number) * factor
    if (seconds < 0 and not offset) or abs(seconds) > MAX_DURATION_S:
        raise DataTypeError("duration out of range", location=location)
    return seconds


def _whole_minutes(seconds: float | None) -> int | None:
    if seconds is None or seconds <= 0 or seconds % 60:
        return None
    return int(seconds // 60)


def _shift(value: str, seconds: float) -> str | None:
    """A FHIR dateTime with a time, moved by ``seconds``; None for a date only."""
    if "T" not in value:
        return None
    try:
        moved = datetime.fromisoformat(value) + timedelta(seconds=seconds)
    except OverflowError:  # past year 9999: no such time to carry
        return None
    return moved.isoformat()


# --- participants ---------------------------------------------------------------------


def _participants(
    ctx: MappingContext, sch: Segment, start: str | None, status: str
) -> list[dict[str, Any]]:
    """The patient, then AIG/AIL/AIP resources in message order, then the SCH contacts."""
    default_status = "needs-action" if status in _UNCONFIRMED_STATUS else "accepted"
    out: list[dict[str, Any]] = []
    if ctx.patient_ref:
        out.append({"actor": {"reference": ctx.patient_ref}, "status": "accepted"})
    for seg in ctx.segments:
        if seg.name == "RGS":
            seg.consume(1)  # set id; RGS-2/RGS-3 are reported when present
            continue
        fields = _RESOURCE_FIELDS.get(seg.name)
        if fields is None:
            continue
        seg.consume(1)
        participant = _resource(ctx, seg, fields, start, default_status)
        if participant is not None:
            out.append(participant)
    out += _contacts(ctx, sch)
    return out


def _resource(
    ctx: MappingContext,
    seg: Segment,
    fields: tuple[int, int, int, int, int, int],
    anchor: str | None,
    default_status: str,
) -> dict[str, Any] | None:
    name = seg.name
    actor: str | None
    kind: dict[str, Any] | None = None
    if name == "AIG":
        actor = _device(ctx, seg.comps(3))
        kind = dt.codeable_concept(ctx, seg.comps(4))
    elif name == "AIL":
        actor = dt.location(ctx, seg.comps(3))
        location_type = dt.codeable_concept(ctx, seg.comps(4))
        if actor is not None and location_type is not None:
            _set_missing(ctx, actor, "type", [location_type])
    else:
        actor = dt.practitioner(ctx, seg.comps(3))
        kind = dt.codeable_concept(ctx, seg.comps(4))
    if actor is None and kind is None:
        return None

    participant: dict[str, Any] = {}
    if kind is not None:
        participant["type"] = [kind]
    if actor is not None:
        participant["actor"] = {"reference": actor}
    if seg.value(2).upper() == "D":
        participant["status"] = "declined"
    else:
        filler = seg.value(fields[5]).lower()
        participant["status"] = PARTICIPANT_STATUS.get(filler, default_status)
    start, end, _ = _period(seg, name, fields[:5], anchor)
    period = {k: v for k, v in (("start", start), ("end", end)) if v is not None}
    if period:
        participant["period"] = period
    return participant


def _device(ctx: MappingContext, c: Components) -> str | None:
    """AIG-3 (CWE) → a Device in the Bundle: the code (and alternate code) as its
    identifiers, the texts as its names; one id per code and coding system."""
    code, name = c.text(1), c.text(2)
    if not code and not name:
        return None
    system = dt.code_system(c.text(3))
    device: dict[str, Any] = {"resourceType": "Device"}
    identifiers: list[dict[str, str]] = []
    for value, ident_system in ((code, system), (c.text(4), dt.code_system(c.text(6)))):
        if value:
            ident = {"system": ident_system, "value": value} if ident_system else {"value": value}
            identifiers.append(ident)
    if code:
        device["id"] = uuid5_str(f"Device|{system or ''}|{code}")
    else:
        device["id"] = ctx.resource_id(f"Device/{c.raw}")
    if identifiers:
        device["identifier"] = identifiers
    names = [n for n in dict.fromkeys((name, c.text(5))) if n]
    if names:
        device["deviceName"] = [{"name": n, "type": "user-friendly-name"} for n in names]
    return ctx.add(device)


def _contacts(ctx: MappingContext, sch: Segment) -> list[dict[str, Any]]:
    """SCH-12 placer contact, SCH-16 filler contact and SCH-20 entered-by person:
    participants for information (IG), with their phone and address."""
    out: list[dict[str, Any]] = []
    roles: tuple[tuple[int, int, int | None, dict[str, Any]], ...] = (
        (12, 13, 14, {"text": "Placer contact"}),
        (16, 17, 18, {"text": "Filler contact"}),
        (
            20,
            21,
            None,
            {
                "coding": [
                    {"system": PROVENANCE_PARTICIPANT_TYPE, "code": "enterer", "display": "Enterer"}
                ]
            },
        ),
    )
    for person, phone, address, kind in roles:
        for i, c in enumerate(sch.each(person)):
            ref = dt.practitioner(ctx, c)
            if ref is None:
                continue
            if i == 0:
                telecom = [x for p in sch.each(phone) if (x := dt.contact_point(p, "work"))]
                if telecom:
                    _set_missing(ctx, ref, "telecom", telecom)
                if address is not None:
                    addresses = [x for a in sch.each(address) if (x := dt.address(a))]
                    if addresses:
                        _set_missing(ctx, ref, "address", addresses)
            out.append(
                {
                    "type": [kind],
                    "actor": {"reference": ref},
                    "required": "information-only",
                    "status": "accepted",
                }
            )
    return out


def _set_missing(ctx: MappingContext, reference: str, key: str, value: Any) -> None:
    """Give a supporting resource an element it does not have yet."""
    resource = ctx.get(reference)
    if resource is not None and key not in resource:
        resource[key] = value


def _comment(ctx: MappingContext) -> str:
    lines: list[str] = []
    for nte in ctx.all("NTE"):
        nte.consume(1)
        raw = nte.raw(3)
        if raw:
            lines.append("\n".join(ctx.decode(r) for r in raw.split(ctx.enc.repetition)))
    return "\n".join(lines).strip()
