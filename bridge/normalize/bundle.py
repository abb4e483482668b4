"""HL7 v2 message → FHIR R4 ``message`` Bundle: the event payload on ``<prefix>.events``.

Entry 0 is the MessageHeader (event, source, destination, focus); then the
Patient, then what the message family's mapper adds. Every reference is a
``urn:uuid:`` fullUrl of an entry in the same Bundle.

What the mapping did not carry is returned beside the Bundle
(:attr:`Normalized.unmapped`) and travels in the ``ce_hl7unmapped`` header and
as an extension on the MessageHeader
(``urn:hl7bridge:StructureDefinition:unmapped``, one valueString per item),
so a consumer reading only the FHIR data still sees it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from typing import Any, Final
from urllib.parse import quote
from zoneinfo import ZoneInfo

from adapters.hl7v2.er7 import Hl7Message

from . import datatypes as dt
from .context import MappingContext, MappingOptions
from .ids import uuid5_str
from .patient import map_patient, patient_key_of

V2_0003: Final = "http://terminology.hl7.org/CodeSystem/v2-0003"
V2_0076: Final = "http://terminology.hl7.org/CodeSystem/v2-0076"
TAG_MESSAGE_TYPE: Final = "urn:hl7bridge:hl7v2:message-type"
TAG_VERSION: Final = "urn:hl7bridge:hl7v2:version"
CONTROL_ID_SYSTEM: Final = "urn:hl7bridge:hl7v2:control-id"
UNMAPPED_EXTENSION: Final = "urn:hl7bridge:StructureDefinition:unmapped"
#: MessageHeader.source.endpoint when neither MSH-3 nor ``source`` names one.
UNKNOWN_SOURCE: Final = "urn:hl7bridge:application:unknown"

#: MSH fields the MessageHeader and Bundle carry.
_MSH_CARRIED: Final = (1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 15, 16, 18)

FamilyMapper = Callable[[MappingContext], None]

#: Message code (MSH-9.1) → the mapper of that family. Families register here.
MAPPERS: dict[str, FamilyMapper] = {}


def register(*message_codes: str) -> Callable[[FamilyMapper], FamilyMapper]:
    def decorate(mapper: FamilyMapper) -> FamilyMapper:
        for message_code in message_codes:
            MAPPERS[message_code] = mapper
        return mapper

    return decorate


@dataclass(frozen=True, slots=True)
class Normalized:
    """A mapped message: the Bundle, what was not carried, and the Patient id."""

    bundle: dict[str, Any]
    unmapped: tuple[str, ...]
    patient_id: str | None
    #: The patient key (``authority|id`` of the first PID-3 id): the Kafka record key.
    patient_key: str | None = None


def normalize(
    msg: Hl7Message,
    *,
    event_id: str,
    source: str,
    options: MappingOptions | None = None,
) -> Normalized:
    """Map one parsed HL7 v2 message. Raises :class:`~bridge.errors.MessageError`
    subclasses (with the HL7 location) for content that cannot be mapped."""
    _load_families()
    options = options or _DEFAULT_OPTIONS
    token = dt.DEFAULT_TIMEZONE.set(_zone(options.default_timezone))
    try:
        return _normalize(msg, event_id, source, options)
    finally:
        dt.DEFAULT_TIMEZONE.reset(token)


@functools.cache
def _zone(name: str) -> tzinfo:
    return UTC if name == "UTC" else ZoneInfo(name)


def _normalize(msg: Hl7Message, event_id: str, source: str, options: MappingOptions) -> Normalized:
    ctx = MappingContext(msg, event_id, options)
    header = _message_header(ctx, source)
    entries_header = {"fullUrl": f"urn:uuid:{header['id']}", "resource": header}

    pid = ctx.first("PID")
    if pid is not None:
        map_patient(ctx, pid)
    if msg.header.message_code != "ADT":  # ADT walks its visits itself
        pv1 = ctx.first("PV1")
        if pv1 is not None:
            from .families.adt import encounter_from_pv1

            encounter_from_pv1(ctx, pv1)
        if pid is not None:  # NK1, AL1, IAM, DG1, PR1, IN1 of the PATIENT group
            from .families.adt import map_patient_group

            map_patient_group(ctx)
    mapper = MAPPERS.get(msg.header.message_code)
    if mapper is not None:
        mapper(ctx)

    patient_ref = ctx.patient_ref
    focus = [{"reference": patient_ref}] if patient_ref else []
    for e in ctx.entries:  # a loop, not a comprehension: one frame less per entry test
        url = e["fullUrl"]
        if e["resource"]["resourceType"] not in _NOT_FOCUS and url != patient_ref:
            focus.append({"reference": url})
    if focus:
        header["focus"] = focus
    unmapped = tuple(ctx.unmapped())
    if unmapped:
        header["extension"] = [{"url": UNMAPPED_EXTENSION, "valueString": u} for u in unmapped]

    bundle = _bundle(ctx, source)
    bundle["entry"] = [entries_header, *ctx.entries]
    patient = ctx.get(ctx.patient_ref) if ctx.patient_ref else None
    key = patient_key_of(ctx, pid) if pid is not None else None
    return Normalized(bundle, unmapped, patient["id"] if patient else None, key)


def to_fhir_bundle(
    msg: Hl7Message, *, event_id: str, source: str, options: MappingOptions | None = None
) -> dict[str, Any]:
    """The FHIR R4 message Bundle (a plain dict) for ``msg``."""
    return normalize(msg, event_id=event_id, source=source, options=options).bundle


_DEFAULT_OPTIONS: Final = MappingOptions()
#: Supporting resources that are referenced, not the subject of the message.
_NOT_FOCUS: Final = frozenset({"Practitioner", "Organization", "Location", "PractitionerRole"})


def _load_families() -> None:
    """Import the family mappers once (they register themselves)."""
    if MAPPERS:
        return
    from . import families  # noqa: F401


def _bundle(ctx: MappingContext, source: str) -> dict[str, Any]:
    h = ctx.msg.header
    bundle: dict[str, Any] = {"resourceType": "Bundle", "id": uuid5_str(ctx.event_id)}
    tags = []
    if h.message_code:
        tags.append({"system": TAG_MESSAGE_TYPE, "code": dt.code(h.message_type)})
    version = dt.code(h.version_id)
    if version:
        tags.append({"system": TAG_VERSION, "code": version})
    meta: dict[str, Any] = {}
    if source:
        meta["source"] = source
    if tags:
        meta["tag"] = tags
    if meta:
        bundle["meta"] = meta
    control_id = ctx.decode(h.control_id).strip()
    if control_id:
        bundle["identifier"] = {"system": CONTROL_ID_SYSTEM, "value": control_id}
    bundle["type"] = "message"
    try:
        timestamp = dt.instant(h.message_datetime, "MSH-7")
    except Exception:  # MSH-7 is not ours to reject: the message was valid enough
        timestamp = None
    bundle["timestamp"] = timestamp or (
        datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )
    return bundle


def _message_header(ctx: MappingContext, source: str) -> dict[str, Any]:
    h = ctx.msg.header
    msh = ctx.first("MSH")
    if msh is not None:
        msh.consume(*_MSH_CARRIED)
    header: dict[str, Any] = {
        "resourceType": "MessageHeader",
        "id": uuid5_str(f"{ctx.event_id}/MessageHeader"),
    }
    trigger = dt.code(h.trigger_event)
    message_code = dt.code(h.message_code)
    if trigger:
        header["eventCoding"] = {"system": V2_0003, "code": trigger}
    elif message_code:
        header["eventCoding"] = {"system": V2_0076, "code": message_code}
    else:
        header["eventUri"] = "urn:hl7bridge:hl7v2:event:unknown"

    source_name, source_endpoint = _hd_endpoint(ctx, h.sending_application)
    src: dict[str, Any] = {"endpoint": source_endpoint or source or UNKNOWN_SOURCE}
    if source_name:
        src["name"] = source_name
    header["source"] = src
    facility = _hd_name(ctx, h.sending_facility)
    if facility:
        header["sender"] = {"display": facility}

    dest_name, dest_endpoint = _hd_endpoint(ctx, h.receiving_application)
    receiver = _hd_name(ctx, h.receiving_facility)
    if not dest_endpoint:
        dest_name, dest_endpoint = _hd_endpoint(ctx, h.receiving_facility)
    if dest_endpoint:
        dest: dict[str, Any] = {"endpoint": dest_endpoint}
        if dest_name:
            dest["name"] = dest_name
        if receiver:
            dest["receiver"] = {"display": receiver}
        header["destination"] = [dest]
    return header


def _hd_parts(ctx: MappingContext, raw: str) -> tuple[str, str, str]:
    parts = raw.split(ctx.enc.component)
    dec = ctx.decode
    ns = dec(parts[0]).strip()
    uid = dec(parts[1]).strip() if len(parts) > 1 else ""
    kind = dec(parts[2]).strip() if len(parts) > 2 else ""
    return ns, uid, kind


def _hd_name(ctx: MappingContext, raw: str) -> str:
    if not raw:
        return ""
    ns, uid, _ = _hd_parts(ctx, raw)
    return ns or uid


def _hd_endpoint(ctx: MappingContext, raw: str) -> tuple[str, str]:
    """(name, endpoint URI) of an application HD such as MSH-3; ("", "") when empty."""
    if not raw:
        return "", ""
    ns, uid, kind = _hd_parts(ctx, raw)
    name = ns or uid
    if not name:
        return "", ""
    system = dt.authority_system(ctx, "", uid, kind) if uid else None
    if system is None or system.startswith(dt.AUTHORITY_PREFIX):
        safe = name if dt._URI_SAFE.fullmatch(name) else quote(name, safe="")
        system = dt.APPLICATION_PREFIX + safe
    return name, system
