"""A minimal HL7 v2 -> FHIR R4 message Bundle: MessageHeader and Patient only.

This is the event payload until the full mapping (DESIGN §6) lands. It runs on
the hot path, so it builds plain dicts (no pydantic) straight from the ER7
fields of :class:`~adapters.hl7v2.er7.Hl7Message`; the unit tests validate its
output with ``fhir.resources.R4B``.

Choices
-------
* Ids are deterministic UUIDv5 under one project namespace (:data:`NAMESPACE`):
  Bundle.id from ``event_id``, MessageHeader from ``event_id``, Patient from the
  patient key (:func:`~adapters.hl7v2.er7.patient_key`), so every message about
  one patient yields the same Patient id; when PID-3 has no id the Patient id
  comes from ``event_id``. ``fullUrl`` is ``urn:uuid:<that uuid>`` and the
  resource id is the same uuid, so references and ids agree. A UUIDv5 of a
  medical record number can be found again by trying every number: treat the
  Patient id as patient data too (never in a log line or a znode).
* Identifier.system from the assigning authority (CX-4): ``urn:oid:<id>`` when
  CX-4.2 is an OID (type ISO, or no type and OID syntax) or when the namespace
  CX-4.1 itself is an OID; ``urn:uuid:<id>`` for type UUID; CX-4.2 as-is for
  type URI; otherwise ``urn:hl7bridge:authority:<namespace>`` (percent-encoded).
  No system when CX-4 is empty.
* MessageHeader.source / destination endpoints are built from MSH-3 / MSH-5
  the same way (``urn:hl7bridge:application:<namespace>`` by default); MSH-4
  and MSH-6 become ``sender`` / ``destination.receiver`` display-only
  references. Without MSH-3 the endpoint is the ``source`` argument, which is
  also Bundle.meta.source (it must be a URI).
* Bundle.identifier carries MSH-10 (system ``urn:hl7bridge:hl7v2:control-id``),
  Bundle.meta.tag the message type (``ORU^R01``) and HL7 version.
* Bundle.timestamp is MSH-7 when it has seconds and a UTC offset (kept with
  its fractional seconds); otherwise, since an instant needs both, the time of
  conversion in UTC.
* PID-7 keeps its precision (YYYY, YYYY-MM, YYYY-MM-DD); a date that does not
  exist raises :class:`~bridge.errors.DataTypeError` (``PID-7``). Codes that
  have no FHIR equivalent (gender, name type, address type) are left out.
* Address.line: XAD-1.1 (street), XAD-1.2 (street name), XAD-1.3 (dwelling
  number), XAD-2 (other designation), in that order, each when present.
* Telecom (PID-13 home, PID-14 work): XTN-4 for e-mail (equipment Internet or
  X.400, or use NET), else XTN-1, else XTN-12, else ``+country (area) local
  xext`` from XTN-5..8; equipment CP gives use ``mobile``. Repetitions with no
  number are left out.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, date, datetime, timedelta, timezone
from hashlib import sha1
from typing import Any, Final
from urllib.parse import quote

from adapters.hl7v2.er7 import (
    Hl7Message,
    PatientIdentifier,
    patient_identifiers,
    patient_key_from,
)
from bridge.errors import DataTypeError

__all__ = [
    "NAMESPACE",
    "patient_resource_id",
    "to_fhir_bundle",
    "unmapped_segments",
    "uuid5_str",
]

#: The UUIDv5 namespace of every id this module makes.
NAMESPACE: Final = uuid.uuid5(uuid.NAMESPACE_URL, "urn:hl7bridge")
_NAMESPACE_BYTES: Final = NAMESPACE.bytes


def uuid5_str(name: str) -> str:
    """``str(uuid.uuid5(NAMESPACE, name))``, in a third of the time (hot path)."""
    digest = bytearray(sha1(_NAMESPACE_BYTES + name.encode("utf-8")).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50
    digest[8] = (digest[8] & 0x3F) | 0x80
    x = digest.hex()
    return f"{x[:8]}-{x[8:12]}-{x[12:16]}-{x[16:20]}-{x[20:]}"


V2_0003: Final = "http://terminology.hl7.org/CodeSystem/v2-0003"
V2_0076: Final = "http://terminology.hl7.org/CodeSystem/v2-0076"
V2_0203: Final = "http://terminology.hl7.org/CodeSystem/v2-0203"
TAG_MESSAGE_TYPE: Final = "urn:hl7bridge:hl7v2:message-type"
TAG_VERSION: Final = "urn:hl7bridge:hl7v2:version"
CONTROL_ID_SYSTEM: Final = "urn:hl7bridge:hl7v2:control-id"
AUTHORITY_PREFIX: Final = "urn:hl7bridge:authority:"
APPLICATION_PREFIX: Final = "urn:hl7bridge:application:"
#: MessageHeader.source.endpoint when neither MSH-3 nor ``source`` names one.
UNKNOWN_SOURCE: Final = "urn:hl7bridge:application:unknown"

#: HL7 table 0001 (administrative sex) -> FHIR administrative-gender.
GENDER: Final[dict[str, str]] = {
    "M": "male",
    "F": "female",
    "O": "other",
    "U": "unknown",
    "A": "other",
    "N": "other",
}

#: HL7 table 0200 (name type) -> FHIR name-use.
NAME_USE: Final[dict[str, str]] = {
    "L": "official",
    "D": "usual",
    "M": "maiden",
    "N": "nickname",
    "A": "anonymous",
    "S": "anonymous",
    "MSK": "anonymous",
    "C": "official",
    "R": "official",
    "T": "usual",
    "TEMP": "temp",
    "NAV": "temp",
    "BAD": "old",
    "NOUSE": "old",
}

#: HL7 table 0190 (address type) -> FHIR address-use.
ADDRESS_USE: Final[dict[str, str]] = {
    "H": "home",
    "B": "work",
    "O": "work",
    "C": "temp",
    "BA": "old",
    "BI": "billing",
}

#: HL7 table 0201 (telecommunication use code) -> FHIR contact-point-use.
TELECOM_USE: Final[dict[str, str]] = {
    "PRN": "home",
    "ORN": "home",
    "VHN": "temp",
    "WPN": "work",
}

#: HL7 table 0202 (telecommunication equipment type) -> FHIR contact-point-system.
TELECOM_SYSTEM: Final[dict[str, str]] = {
    "PH": "phone",
    "CP": "phone",
    "FX": "fax",
    "BP": "pager",
    "Internet": "email",
    "X.400": "email",
    "MD": "other",
    "TDD": "other",
    "TTY": "other",
}

_OID_RE: Final = re.compile(r"[0-2](?:\.(?:0|[1-9][0-9]*))+")
_UUID_RE: Final = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")
_DTM_RE: Final = re.compile(
    r"(\d{4})(\d{2})(\d{2})(\d{2})(\d{2})(\d{2})(?:\.(\d{1,4}))?([+-])(\d{2})(\d{2})"
)
_DATE_RE: Final = re.compile(r"(\d{4})(?:(\d{2})(?:(\d{2}))?)?(?:\d*(?:\.\d*)?(?:[+-]\d{4})?)?")
_URI_SAFE: Final = re.compile(r"[A-Za-z0-9._~-]+")


def patient_resource_id(patient_key: str) -> str:
    """The Patient resource id (a UUIDv5) for a patient key from :func:`patient_key`.

    Patient data in disguise: see the module notes.
    """
    return uuid5_str(f"Patient|{patient_key}")


def unmapped_segments(msg: Hl7Message) -> list[str]:
    """Names of the segments this minimal mapping does not carry, in first-seen order.

    Everything but the first MSH and the first PID (a second PID, as in a
    merge or link message, is not carried either).
    """
    seen_msh = seen_pid = False
    out: list[str] = []
    for seg in msg.segments:
        name = seg[0]
        if name == "MSH" and not seen_msh:
            seen_msh = True
        elif name == "PID" and not seen_pid:
            seen_pid = True
        elif name not in out:
            out.append(name)
    return out


def to_fhir_bundle(msg: Hl7Message, *, event_id: str, source: str) -> dict[str, Any]:
    """The FHIR R4 message Bundle (plain dict) for ``msg``.

    ``event_id`` is the event's deterministic id (Bundle.id derives from it);
    ``source`` is a URI naming where the bridge received the message.
    """
    h = msg.header
    dec = msg.decode_escapes

    header_uuid = uuid5_str(f"{event_id}/MessageHeader")
    message_header: dict[str, Any] = {"resourceType": "MessageHeader", "id": header_uuid}
    trigger = _code(h.trigger_event)
    message_code = _code(h.message_code)
    if trigger:
        message_header["eventCoding"] = {"system": V2_0003, "code": trigger}
    elif message_code:
        message_header["eventCoding"] = {"system": V2_0076, "code": message_code}
    else:
        message_header["eventUri"] = "urn:hl7bridge:hl7v2:event:unknown"

    source_name, source_endpoint = _hd_endpoint(h.sending_application, msg)
    src: dict[str, Any] = {"endpoint": source_endpoint or source or UNKNOWN_SOURCE}
    if source_name:
        src["name"] = source_name
    message_header["source"] = src
    facility = _hd_name(h.sending_facility, msg)
    if facility:
        message_header["sender"] = {"display": facility}

    dest_name, dest_endpoint = _hd_endpoint(h.receiving_application, msg)
    receiver = _hd_name(h.receiving_facility, msg)
    if not dest_endpoint:
        dest_name, dest_endpoint = _hd_endpoint(h.receiving_facility, msg)
    if dest_endpoint:
        dest: dict[str, Any] = {"endpoint": dest_endpoint}
        if dest_name:
            dest["name"] = dest_name
        if receiver:
            dest["receiver"] = {"display": receiver}
        message_header["destination"] = [dest]

    entries: list[dict[str, Any]] = [
        {"fullUrl": f"urn:uuid:{header_uuid}", "resource": message_header}
    ]

    pid = msg.segment("PID")
    if pid is not None:
        identifiers = patient_identifiers(msg)
        key = patient_key_from(identifiers)
        patient_uuid = patient_resource_id(key) if key else uuid5_str(f"{event_id}/Patient")
        patient = _patient(msg, pid, identifiers, patient_uuid)
        full_url = f"urn:uuid:{patient_uuid}"
        message_header["focus"] = [{"reference": full_url}]
        entries.append({"fullUrl": full_url, "resource": patient})

    tags = []
    if message_code:
        tags.append({"system": TAG_MESSAGE_TYPE, "code": _code(h.message_type)})
    version = _code(h.version_id)
    if version:
        tags.append({"system": TAG_VERSION, "code": version})
    meta: dict[str, Any] = {}
    if source:
        meta["source"] = source
    if tags:
        meta["tag"] = tags

    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "id": uuid5_str(event_id),
    }
    if meta:
        bundle["meta"] = meta
    control_id = dec(h.control_id).strip()
    if control_id:
        bundle["identifier"] = {"system": CONTROL_ID_SYSTEM, "value": control_id}
    bundle["type"] = "message"
    bundle["timestamp"] = _instant(h.message_datetime)
    bundle["entry"] = entries
    return bundle


# ------------------------------------------------------------------------- helpers


def _code(value: str) -> str:
    """A FHIR code: no leading, trailing or repeated whitespace."""
    if " " in value or "\t" in value or value != value.strip():
        return " ".join(value.split())
    return value


def _instant(dtm: str) -> str:
    m = _DTM_RE.fullmatch(dtm.strip())
    if m is not None:
        y, mo, d, hh, mi, ss, frac, sign, oh, om = m.groups()
        try:
            offset = timedelta(hours=int(oh), minutes=int(om))
            if int(om) < 60 and offset <= timedelta(hours=14):
                datetime(
                    int(y),
                    int(mo),
                    int(d),
                    int(hh),
                    int(mi),
                    int(ss),
                    tzinfo=timezone(-offset if sign == "-" else offset),
                )
                fraction = f".{frac}" if frac else ""
                return f"{y}-{mo}-{d}T{hh}:{mi}:{ss}{fraction}{sign}{oh}:{om}"
        except ValueError:
            pass
    now = datetime.now(UTC).isoformat(timespec="milliseconds")
    return now.replace("+00:00", "Z")


def _fhir_date(value: str, location: str) -> str | None:
    value = value.strip()
    if not value:
        return None
    m = _DATE_RE.fullmatch(value)
    if m is None:
        raise DataTypeError("not an HL7 date/time", location=location)
    y, mo, d = m.groups()
    try:
        if int(y) < 1:
            raise ValueError
        if d is not None and mo is not None:
            date(int(y), int(mo), int(d))
            return f"{y}-{mo}-{d}"
        if mo is not None:
            if not 1 <= int(mo) <= 12:
                raise ValueError
            return f"{y}-{mo}"
    except ValueError:
        raise DataTypeError("not a valid calendar date", location=location) from None
    return y


def _authority_system(namespace: str, universal_id: str, id_type: str) -> str | None:
    """Identifier.system (or endpoint) for an HD assigning authority."""
    kind = id_type.strip().upper()
    uid = universal_id.strip()
    if uid:
        if (kind == "ISO" or not kind) and _OID_RE.fullmatch(uid):
            return f"urn:oid:{uid}"
        if kind == "UUID" and _UUID_RE.fullmatch(uid):
            return f"urn:uuid:{uid.lower()}"
        if kind == "URI" and uid.split() == [uid]:
            return uid
    ns = namespace.strip()
    if ns:
        if _OID_RE.fullmatch(ns):
            return f"urn:oid:{ns}"
        return AUTHORITY_PREFIX + (ns if _URI_SAFE.fullmatch(ns) else quote(ns, safe=""))
    if uid:
        return AUTHORITY_PREFIX + (uid if _URI_SAFE.fullmatch(uid) else quote(uid, safe=""))
    return None


def _hd_parts(raw: str, msg: Hl7Message) -> tuple[str, str, str]:
    enc = msg.encoding
    if enc.component not in raw:
        return msg.decode_escapes(raw).strip(), "", ""
    parts = raw.split(enc.component)
    dec = msg.decode_escapes
    ns = dec(parts[0]).strip()
    uid = dec(parts[1]).strip() if len(parts) > 1 else ""
    kind = dec(parts[2]).strip() if len(parts) > 2 else ""
    return ns, uid, kind


def _hd_name(raw: str, msg: Hl7Message) -> str:
    if not raw:
        return ""
    ns, uid, _ = _hd_parts(raw, msg)
    return ns or uid


def _hd_endpoint(raw: str, msg: Hl7Message) -> tuple[str, str]:
    """(name, endpoint URI) of an application HD such as MSH-3; ("", "") when empty."""
    if not raw:
        return "", ""
    ns, uid, kind = _hd_parts(raw, msg)
    name = ns or uid
    if not name:
        return "", ""
    system = _authority_system("", uid, kind) if uid else None
    if system is None or system.startswith(AUTHORITY_PREFIX):
        system = APPLICATION_PREFIX + (name if _URI_SAFE.fullmatch(name) else quote(name, safe=""))
    return name, system


def _field(seg: list[str], n: int) -> str:
    return seg[n] if n < len(seg) else ""


def _patient(
    msg: Hl7Message, pid: list[str], identifiers: list[PatientIdentifier], patient_uuid: str
) -> dict[str, Any]:
    enc = msg.encoding
    dec = msg.decode_escapes
    patient: dict[str, Any] = {"resourceType": "Patient", "id": patient_uuid}

    cx_list: list[dict[str, Any]] = []
    for ident in identifiers:
        entry: dict[str, Any] = {}
        if ident.type_code.strip():
            entry["type"] = {"coding": [{"system": V2_0203, "code": _code(ident.type_code)}]}
        system = _authority_system(
            ident.authority, ident.authority_universal_id, ident.authority_universal_id_type
        )
        if system:
            entry["system"] = system
        entry["value"] = ident.id.strip()
        cx_list.append(entry)
    if cx_list:
        patient["identifier"] = cx_list

    names = _names(_field(pid, 5), msg)
    if names:
        patient["name"] = names

    telecom = _telecoms(_field(pid, 13), "home", msg) + _telecoms(_field(pid, 14), "work", msg)
    if telecom:
        patient["telecom"] = telecom

    sex = _field(pid, 8)
    if sex:
        gender = GENDER.get(dec(sex.split(enc.component, 1)[0]).strip().upper())
        if gender:
            patient["gender"] = gender

    dob = _field(pid, 7)
    if dob:
        birth = _fhir_date(dec(dob.split(enc.component, 1)[0]), "PID-7")
        if birth:
            patient["birthDate"] = birth

    addresses = _addresses(_field(pid, 11), msg)
    if addresses:
        patient["address"] = addresses
    return patient


def _subs(value: str, msg: Hl7Message) -> list[str]:
    """Decoded, stripped subcomponents of one component."""
    dec = msg.decode_escapes
    sep = msg.encoding.subcomponent
    if sep not in value:
        return [dec(value).strip()]
    return [dec(v).strip() for v in value.split(sep)]


def _first_sub(value: str, msg: Hl7Message) -> str:
    sep = msg.encoding.subcomponent
    if sep in value:
        value = value.split(sep, 1)[0]
    return msg.decode_escapes(value).strip()


def _names(field: str, msg: Hl7Message) -> list[dict[str, Any]]:
    if not field:
        return []
    enc = msg.encoding
    out: list[dict[str, Any]] = []
    for rep in field.split(enc.repetition):
        c = rep.split(enc.component)
        n = len(c)

        def comp(i: int, c: list[str] = c, n: int = n) -> str:
            return _first_sub(c[i - 1], msg) if i <= n else ""

        name: dict[str, Any] = {}
        family = comp(1)
        if family:
            name["family"] = family
        given = [g for g in (comp(2), comp(3)) if g]
        if given:
            name["given"] = given
        prefix = comp(5)
        if prefix:
            name["prefix"] = [prefix]
        suffix = [s for s in (comp(4), comp(6), comp(14)) if s]
        if suffix:
            name["suffix"] = suffix
        if not name:
            continue
        use = NAME_USE.get(comp(7).upper())
        if use:
            name["use"] = use
        out.append(name)
    return out


def _addresses(field: str, msg: Hl7Message) -> list[dict[str, Any]]:
    if not field:
        return []
    enc = msg.encoding
    out: list[dict[str, Any]] = []
    for rep in field.split(enc.repetition):
        c = rep.split(enc.component)
        n = len(c)

        def comp(i: int, c: list[str] = c, n: int = n) -> str:
            return _first_sub(c[i - 1], msg) if i <= n else ""

        address: dict[str, Any] = {}
        lines = [s for s in _subs(c[0], msg)[:3] if s]
        other = comp(2)
        if other:
            lines.append(other)
        if lines:
            address["line"] = lines
        for key, i in (("city", 3), ("state", 4), ("postalCode", 5), ("country", 6)):
            v = comp(i)
            if v:
                address[key] = v
        if not address:
            continue
        kind = comp(7).upper()
        use = ADDRESS_USE.get(kind)
        if use:
            address["use"] = use
        elif kind == "M":
            address["type"] = "postal"
        out.append(address)
    return out


def _telecoms(field: str, default_use: str, msg: Hl7Message) -> list[dict[str, Any]]:
    if not field:
        return []
    enc = msg.encoding
    out: list[dict[str, Any]] = []
    for rep in field.split(enc.repetition):
        c = rep.split(enc.component)
        n = len(c)

        def comp(i: int, c: list[str] = c, n: int = n) -> str:
            return _first_sub(c[i - 1], msg) if i <= n else ""

        use_code = comp(2).upper()
        equipment = comp(3)
        system = TELECOM_SYSTEM.get(equipment)
        if system is None:
            system = TELECOM_SYSTEM.get(equipment.upper())
        if use_code == "NET":
            system = "email"
        if system == "email":
            value = comp(4) or comp(1)
        else:
            value = comp(1) or comp(12)
            if not value:
                local = comp(7)
                if local:
                    area, country, ext = comp(6), comp(5), comp(8)
                    value = " ".join(
                        p
                        for p in (
                            f"+{country}" if country else "",
                            f"({area})" if area else "",
                            local,
                            f"x{ext}" if ext else "",
                        )
                        if p
                    )
        if not value:
            continue
        point: dict[str, Any] = {"system": system or "phone", "value": value}
        if equipment.upper() == "CP":
            point["use"] = "mobile"
        else:
            point["use"] = TELECOM_USE.get(use_code, default_use)
        out.append(point)
    return out
