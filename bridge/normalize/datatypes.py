"""HL7 v2 data types → FHIR R4 data types, following the v2-to-FHIR IG's
datatype maps (TS/DTM, CX, EI, XPN, XAD, XTN, CWE/CE/CNE, XCN, XON, PL, CQ).

Every function takes the :class:`~bridge.normalize.context.MappingContext` and
the :class:`~bridge.normalize.context.Components` of one field repetition, and
returns a plain dict (no pydantic on the hot path) or None when there is
nothing to carry. Values are escape-decoded and stripped. Codes with no FHIR
equivalent are left out of the coded element, never guessed.
"""

from __future__ import annotations

import re
from contextvars import ContextVar
from datetime import UTC, date, datetime, tzinfo
from functools import lru_cache
from typing import Any, Final
from urllib.parse import quote

from bridge.errors import DataTypeError

from .context import Components, MappingContext
from .ids import uuid5_str

V2_0203: Final = "http://terminology.hl7.org/CodeSystem/v2-0203"
AUTHORITY_PREFIX: Final = "urn:hl7bridge:authority:"
APPLICATION_PREFIX: Final = "urn:hl7bridge:application:"
CODE_SYSTEM_PREFIX: Final = "urn:hl7bridge:codesystem:"

#: HL7 table 0396 (coding system) → FHIR code system URI, for the systems
#: hospitals send. ``HL7nnnn`` maps to the v2 table code system generically.
CODE_SYSTEMS: Final[dict[str, str]] = {
    "LN": "http://loinc.org",
    "LOINC": "http://loinc.org",
    "SCT": "http://snomed.info/sct",
    "SNM": "http://snomed.info/sct",
    "SNOMED": "http://snomed.info/sct",
    "SNOMED-CT": "http://snomed.info/sct",
    "UCUM": "http://unitsofmeasure.org",
    "ANS+": "http://unitsofmeasure.org",
    "I10": "http://hl7.org/fhir/sid/icd-10",
    "I10C": "http://hl7.org/fhir/sid/icd-10-cm",
    "ICD10CM": "http://hl7.org/fhir/sid/icd-10-cm",
    "I10P": "http://www.cms.gov/Medicare/Coding/ICD10",
    "I9": "http://hl7.org/fhir/sid/icd-9-cm",
    "I9C": "http://hl7.org/fhir/sid/icd-9-cm",
    "I9CDX": "http://hl7.org/fhir/sid/icd-9-cm",
    "CVX": "http://hl7.org/fhir/sid/cvx",
    "MVX": "http://hl7.org/fhir/sid/mvx",
    "NDC": "http://hl7.org/fhir/sid/ndc",
    "RXNORM": "http://www.nlm.nih.gov/research/umls/rxnorm",
    "RXN": "http://www.nlm.nih.gov/research/umls/rxnorm",
    "C4": "http://www.ama-assn.org/go/cpt",
    "CPT": "http://www.ama-assn.org/go/cpt",
    "CPT4": "http://www.ama-assn.org/go/cpt",
    "HCPCS": "urn:oid:2.16.840.1.113883.6.285",
    "NCIT": "http://ncimeta.nci.nih.gov",
    "CDCREC": "urn:oid:2.16.840.1.113883.6.238",
    "NUCC": "http://nucc.org/provider-taxonomy",
    "NPI": "http://hl7.org/fhir/sid/us-npi",
    "FDDX": "http://www.fdbhealth.com/",
    "ISO3166": "urn:iso:std:iso:3166",
    "ISO+": "urn:iso:std:iso:11073:10101",
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
    "HL70078": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
}

_TABLE_RE: Final = re.compile(r"HL7(\d{4})")
_OID_RE: Final = re.compile(r"[0-2](?:\.(?:0|[1-9][0-9]*))+")
_UUID_RE: Final = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")
_URI_SAFE: Final = re.compile(r"[A-Za-z0-9._~-]+")
_TS_RE: Final = re.compile(
    r"(\d{4})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:\.(\d{1,9}))?)?)?)?)?)?"
    r"(?:([+-])(\d{2})(\d{2}))?"
)
_NUMBER_RE: Final = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)")


# --- dates and times ------------------------------------------------------------------


def _parse_ts(value: str, location: str) -> tuple[str | None, ...]:
    """The parts of an HL7 TS/DTM, checked as a real calendar date and time."""
    m = _TS_RE.fullmatch(value)
    if m is None:
        raise DataTypeError("not an HL7 date/time", location=location)
    y, mo, d, hh, mi, ss, frac, sign, oh, om = m.groups()
    try:
        if int(y) < 1:
            raise ValueError
        if mo is not None and not 1 <= int(mo) <= 12:
            raise ValueError
        if d is not None:
            date(int(y), int(mo or 1), int(d))
        # Plain comparisons, not datetime/timedelta objects (hot path: every TS).
        # Second 60 is a leap second, which FHIR allows too.
        if hh is not None and (
            int(hh) > 23 or (mi is not None and int(mi) > 59) or (ss is not None and int(ss) > 60)
        ):
            raise ValueError
        if sign is not None and (int(om) > 59 or int(oh) * 60 + int(om) > 14 * 60):
            raise ValueError
    except ValueError:
        raise DataTypeError("not a valid calendar date or time", location=location) from None
    return y, mo, d, hh, mi, ss, frac, sign, oh, om


def date_time(value: str, location: str) -> str | None:
    """HL7 TS/DTM → FHIR dateTime, keeping the precision and the UTC offset.

    ``2024`` → ``2024``; ``202403`` → ``2024-03``; ``20240315`` → ``2024-03-15``;
    ``202403151230-0500`` → ``2024-03-15T12:30:00-05:00`` (FHIR has no minute
    precision: seconds are filled with 00); fractional seconds are kept. A time
    without an offset is the sender's local time; FHIR requires an offset with a
    time, so the offset of the ``hl7_default_timezone`` setting (an IANA zone,
    daylight saving applied for that date) is added.
    """
    value = value.strip()
    if not value:
        return None
    y, mo, d, hh, mi, ss, frac, sign, oh, om = _parse_ts(value, location)
    if mo is None:
        return y
    if d is None:
        return f"{y}-{mo}"
    if hh is None:
        return f"{y}-{mo}-{d}"
    text = f"{y}-{mo}-{d}T{hh}:{mi or '00'}:{ss or '00'}"
    if frac:
        text += f".{frac}"
    if sign is not None:
        return f"{text}{sign}{oh}:{om}"
    return text + _local_offset(int(y or 0), int(mo), int(d), int(hh), int(mi or 0), int(ss or 0))


def _local_offset(y: int, mo: int, d: int, hh: int, mi: int, ss: int) -> str:
    """``+hh:mm`` of the default time zone at that local time."""
    zone = DEFAULT_TIMEZONE.get()
    offset = datetime(y, mo, d, hh, mi, min(ss, 59), tzinfo=zone).utcoffset()
    if not offset:
        return "+00:00"
    minutes = int(offset.total_seconds()) // 60
    sign = "+" if minutes >= 0 else "-"
    hours, minutes = divmod(abs(minutes), 60)
    return f"{sign}{hours:02d}:{minutes:02d}"


#: The time zone of timestamps that carry no offset, for the mapping under way.
#: ``normalize()`` sets it from MappingOptions for the duration of one message.
DEFAULT_TIMEZONE: Final[ContextVar[tzinfo]] = ContextVar("hl7_default_timezone", default=UTC)


def is_instant(text: str) -> bool:
    """Whether a FHIR dateTime from :func:`date_time` has a time (and so an offset)."""
    return "T" in text


def date_only(value: str, location: str) -> str | None:
    """HL7 DT/TS → FHIR date (birth dates): the date part, its precision kept."""
    value = value.strip()
    if not value:
        return None
    if len(value) == 8 and value.isascii() and value.isdigit():  # YYYYMMDD, the common case
        try:
            if int(value[:4]) < 1:
                raise ValueError
            date(int(value[:4]), int(value[4:6]), int(value[6:]))
        except ValueError:
            raise DataTypeError("not a valid calendar date or time", location=location) from None
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    y, mo, d, *_ = _parse_ts(value, location)
    if mo is None:
        return y
    if d is None:
        return f"{y}-{mo}"
    return f"{y}-{mo}-{d}"


def instant(value: str, location: str) -> str | None:
    """HL7 TS → FHIR instant, only when the value has seconds and an offset."""
    value = value.strip()
    if not value:
        return None
    y, mo, d, hh, mi, ss, frac, sign, oh, om = _parse_ts(value, location)
    if ss is None or sign is None:
        return None  # an instant needs seconds and an offset; _parse_ts checked the rest
    fraction = f".{frac}" if frac else ""
    return f"{y}-{mo}-{d}T{hh}:{mi}:{ss}{fraction}{sign}{oh}:{om}"


# --- codes ----------------------------------------------------------------------------


def code(value: str) -> str:
    """A FHIR code: no leading, trailing or repeated whitespace (any Unicode space)."""
    if value.isalnum():  # the common case, nothing to fold
        return value
    return " ".join(value.split())


def code_system(name: str) -> str | None:
    """FHIR system URI for a table 0396 coding system name; local ones get a URN."""
    name = name.strip()
    if not name:
        return None
    known = CODE_SYSTEMS.get(name) or CODE_SYSTEMS.get(name.upper())
    if known:
        return known
    table = _TABLE_RE.fullmatch(name.upper())
    if table:
        return f"http://terminology.hl7.org/CodeSystem/v2-{table.group(1)}"
    if _OID_RE.fullmatch(name):
        return f"urn:oid:{name}"
    return CODE_SYSTEM_PREFIX + (name if _URI_SAFE.fullmatch(name) else quote(name, safe=""))


def coding(code_value: str, display: str = "", system: str | None = None) -> dict[str, Any] | None:
    code_value = code(code_value)
    if not code_value and not display:
        return None
    out: dict[str, Any] = {}
    if system:
        out["system"] = system
    if code_value:
        out["code"] = code_value
    if display:
        out["display"] = display
    return out


def codeable_concept(ctx: MappingContext, c: Components) -> dict[str, Any] | None:
    """CE/CWE/CNE → CodeableConcept: the primary (1-3) and alternate (4-6) codings;
    text from CWE-9 (original text), else the first display."""
    if not c:
        return None
    t = c.texts(9)
    codings = []
    for first in (0, 3):
        found = coding(t[first], t[first + 1], code_system(t[first + 2]))
        if found is not None and "code" in found:
            codings.append(found)
    text = t[8]
    if not text:
        for x in codings:  # a loop, not next(genexpr): cheaper on this hot path
            if "display" in x:
                text = x["display"]
                break
    if not text and not codings:
        text = t[1] or t[0]
    return concept(codings, text)


def concept(codings: list[dict[str, Any]], text: str) -> dict[str, Any] | None:
    """A CodeableConcept of the codings and text that exist; None when neither does."""
    if not codings and not text:
        return None
    out: dict[str, Any] = {}
    if codings:
        out["coding"] = codings
    if text:
        out["text"] = text
    return out


def table_concept(
    value: str, system: str, display: dict[str, str] | None = None
) -> dict[str, Any] | None:
    """A CodeableConcept for a code from a known HL7 table."""
    value = code(value)
    if not value:
        return None
    found: dict[str, Any] = {"system": system, "code": value}
    if display and value in display:
        found["display"] = display[value]
    return {"coding": [found]}


# --- identifiers ----------------------------------------------------------------------


def authority_system(
    ctx: MappingContext, namespace: str, universal_id: str = "", id_type: str = ""
) -> str | None:
    """Identifier.system for an assigning authority (HD).

    Order: ``identifier_systems`` from the configuration (by namespace); an OID
    (``urn:oid:``), UUID or URI universal id; an OID namespace; otherwise
    ``urn:hl7bridge:authority:<namespace>``. None when the authority is empty.
    """
    ns = namespace.strip()
    if ns:
        configured = ctx.options.identifier_systems.get(ns)
        if configured:
            return configured
    return _default_authority(ns, universal_id, id_type)


@lru_cache(maxsize=4096)
def _default_authority(ns: str, universal_id: str, id_type: str) -> str | None:
    """:func:`authority_system` without the configured systems (a pure function of
    the HD, cached: the same few authorities come in every message)."""
    kind = id_type.strip().upper()
    uid = universal_id.strip()
    if uid:
        if (kind == "ISO" or not kind) and _OID_RE.fullmatch(uid):
            return f"urn:oid:{uid}"
        if kind == "UUID" and _UUID_RE.fullmatch(uid):
            return f"urn:uuid:{uid.lower()}"
        if kind == "URI" and uid.split() == [uid]:
            return uid
    if ns:
        if _OID_RE.fullmatch(ns):
            return f"urn:oid:{ns}"
        return AUTHORITY_PREFIX + (ns if _URI_SAFE.fullmatch(ns) else quote(ns, safe=""))
    if uid:
        return AUTHORITY_PREFIX + (uid if _URI_SAFE.fullmatch(uid) else quote(uid, safe=""))
    return None


def identifier(ctx: MappingContext, c: Components) -> dict[str, Any] | None:
    """CX → Identifier (value CX-1, system from CX-4, type from CX-5 table 0203)."""
    t = c.texts(5)
    value = t[0]
    if not value:
        return None
    out: dict[str, Any] = {}
    type_code = t[4]
    if type_code:
        out["type"] = {"coding": [{"system": V2_0203, "code": code(type_code)}]}
    hd = c.part(4)
    if not hd:
        system = None
    elif ctx.sub_sep in hd:
        namespace, universal_id, id_type = c.subs(4).texts(3)[:3]
        system = authority_system(ctx, namespace, universal_id, id_type)
    else:  # a namespace alone, the common case: t[3] is it, decoded and stripped
        system = authority_system(ctx, t[3])
    if system:
        out["system"] = system
    out["value"] = value
    return out


def entity_identifier(
    ctx: MappingContext, c: Components, type_code: str | None = None
) -> dict[str, Any] | None:
    """EI (placer/filler numbers) → Identifier; ``type_code`` from table 0203 (PLAC, FILL)."""
    t = c.texts(4)
    value = t[0]
    if not value:
        return None
    out: dict[str, Any] = {}
    if type_code:
        out["type"] = {"coding": [{"system": V2_0203, "code": type_code}]}
    system = authority_system(ctx, t[1], t[2], t[3])
    if system:
        out["system"] = system
    out["value"] = value
    return out


# --- people, places, contacts ---------------------------------------------------------

#: HL7 table 0200 (name type) → FHIR name-use.
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

#: HL7 table 0190 (address type) → FHIR address-use.
ADDRESS_USE: Final[dict[str, str]] = {
    "H": "home",
    "B": "work",
    "O": "work",
    "C": "temp",
    "BA": "old",
    "BI": "billing",
}

#: HL7 table 0201 (telecommunication use) → FHIR contact-point-use.
TELECOM_USE: Final[dict[str, str]] = {"PRN": "home", "ORN": "home", "VHN": "temp", "WPN": "work"}

#: HL7 table 0202 (telecommunication equipment) → FHIR contact-point-system.
TELECOM_SYSTEM: Final[dict[str, str]] = {
    "PH": "phone",
    "CP": "phone",
    "FX": "fax",
    "BP": "pager",
    "INTERNET": "email",
    "X.400": "email",
    "MD": "other",
    "TDD": "other",
    "TTY": "other",
}


def human_name(c: Components, *, offset: int = 0) -> dict[str, Any] | None:
    """XPN → HumanName. ``offset`` 1 reads the XCN layout (name starts at XCN-2)."""
    o = offset
    t = c.texts(14)  # t[i - 1] is component i
    name: dict[str, Any] = {}
    family = t[o]
    if family:
        name["family"] = family
    # Plain tests, not comprehensions (each a frame of its own): every name and
    # practitioner of a message comes here (hot path).
    first, middle = t[1 + o], t[2 + o]
    if first:
        name["given"] = [first, middle] if middle else [first]
    elif middle:
        name["given"] = [middle]
    prefix = t[4 + o]
    if prefix:
        name["prefix"] = [prefix]
    suffix, degree = t[3 + o], t[5 + o]
    professional = t[13] if offset == 0 else ""
    if suffix or degree or professional:
        name["suffix"] = [x for x in (suffix, degree, professional) if x]
    if not name:
        return None
    use = NAME_USE.get(t[6 if offset == 0 else 9].upper())
    if use:
        name["use"] = use
    return name


def address(c: Components) -> dict[str, Any] | None:
    """XAD → Address (lines from XAD-1 subcomponents and XAD-2)."""
    out: dict[str, Any] = {}
    t = c.texts(9)  # t[i - 1] is component i
    street = c.part(1)
    if c._ctx.sub_sep in street:
        lines = [s for s in c.subs(1).texts(3)[:3] if s]
    else:  # no subcomponents, the common case: t[0] is XAD-1.1
        lines = [t[0]] if t[0] else []
    if t[1]:
        lines.append(t[1])
    if lines:
        out["line"] = lines
    for key, i in (("city", 2), ("state", 3), ("postalCode", 4), ("country", 5)):
        v = t[i]
        if v:
            out[key] = v
    district = t[8]
    if district:
        out["district"] = district
    if not out:
        return None
    kind = t[6].upper()
    use = ADDRESS_USE.get(kind)
    if use:
        out["use"] = use
    elif kind == "M":
        out["type"] = "postal"
    return out


def contact_point(c: Components, default_use: str | None = None) -> dict[str, Any] | None:
    """XTN → ContactPoint, the IG's XTN[ContactPoint] map: the value is XTN-12
    (unformatted number) when valued, else the parts 5-8 when XTN-7 (local number)
    is valued, else XTN-1; an e-mail (XTN-2 NET, XTN-3 Internet) is XTN-4, else XTN-1."""
    t = c.texts(12)  # t[i - 1] is component i
    use_code = t[1].upper()
    equipment = t[2].upper()
    system = TELECOM_SYSTEM.get(equipment)
    if use_code == "NET":
        system = "email"
    if system == "email":
        value = t[3] or t[0]
    elif t[11]:
        value = t[11]
    elif t[6]:
        parts = (
            f"+{t[4]}" if t[4] else "",
            f"({t[5]})" if t[5] else "",
            t[6],
            f"x{t[7]}" if t[7] else "",
        )
        value = " ".join(p for p in parts if p)
    else:
        value = t[0]
    if not value:
        return None
    point: dict[str, Any] = {"system": system or "phone", "value": value}
    use = "mobile" if equipment == "CP" else TELECOM_USE.get(use_code, default_use or "")
    if use:
        point["use"] = use
    return point


def practitioner(ctx: MappingContext, c: Components) -> str | None:
    """XCN → a Practitioner in the Bundle (once per identity); its reference.

    The id comes from XCN-1 and its authority (XCN-9) when present, so one
    practitioner keeps one id across messages; otherwise from the name within
    this event.
    """
    if not c:
        return None
    ident = c.text(1)
    name = human_name(c, offset=1)
    if not ident and name is None:
        return None
    resource: dict[str, Any] = {"resourceType": "Practitioner"}
    if ident:
        namespace, universal_id, id_type = c.subs(9).texts(3)[:3]
        system = authority_system(ctx, namespace, universal_id, id_type)
        found: dict[str, Any] = {"value": ident}
        if system:
            found["system"] = system
        type_code = c.text(13)
        if type_code:
            found["type"] = {"coding": [{"system": V2_0203, "code": code(type_code)}]}
        resource["identifier"] = [found]
        key = f"Practitioner|{system or ''}|{ident}"
        resource["id"] = _global_id(key)
    else:
        resource["id"] = ctx.resource_id(f"Practitioner/{c.raw}")
    if name is not None:
        resource["name"] = [name]
    return ctx.add(resource)


def organization(ctx: MappingContext, c: Components) -> str | None:
    """XON (or an HD facility) → an Organization in the Bundle; its reference."""
    if not c:
        return None
    name = c.text(1)
    ident = c.text(10) or c.text(3)
    if not name and not ident:
        return None
    resource: dict[str, Any] = {"resourceType": "Organization"}
    if name:
        resource["name"] = name
    if ident:
        authority = c.subs(6)
        system = authority_system(ctx, authority.text(1), authority.text(2), authority.text(3))
        found: dict[str, Any] = {"value": ident}
        if system:
            found["system"] = system
        resource["identifier"] = [found]
    resource["id"] = _global_id(f"Organization|{ident}|{name}")
    return ctx.add(resource)


def location(ctx: MappingContext, c: Components) -> str | None:
    """PL → a Location in the Bundle (point of care / room / bed as one name)."""
    if not c:
        return None
    parts = [c.text(i) for i in (1, 2, 3)]
    facility = c.text(4)
    name = " ".join(p for p in parts if p) or facility
    if not name:
        return None
    resource: dict[str, Any] = {"resourceType": "Location", "name": name, "mode": "instance"}
    description = c.text(9)
    if description:
        resource["description"] = description
    resource["id"] = _global_id(f"Location|{facility}|{'|'.join(parts)}")
    return ctx.add(resource)


def quantity(value: str, units: Components, location: str) -> dict[str, Any]:
    """A number and its units (CWE) → Quantity; UCUM system only when the units say so."""
    out: dict[str, Any] = {"value": number(value, location)}
    if not units:
        return out
    unit_code, unit_name, system = units.texts(3)[:3]
    out.update(unit_fields(unit_code, unit_name, system))
    return out


def unit_fields(unit_code: str, unit_name: str, system: str) -> dict[str, str]:
    """The units part of :func:`quantity` (``unit``, ``system``, ``code``) from CWE-1/2/3
    (decoded, stripped): for a mapper that gives one set of units to several
    quantities (an OBX value and its reference range) and maps them once."""
    out: dict[str, str] = {}
    unit_text = unit_name or unit_code
    if unit_text:
        out["unit"] = unit_text
    system = system.upper()
    if unit_code and (system in ("UCUM", "ANS+") or (not system and _looks_ucum(unit_code))):
        out["system"] = "http://unitsofmeasure.org"
        out["code"] = unit_code
    return out


def number(text: str, location: str) -> int | float:
    """An HL7 NM as a JSON number: decimal notation only (no exponent, NaN or inf);
    ``12`` stays an int, ``4.40`` the float 4.4; integers past 64 bits are refused."""
    value = text.strip()
    # Unsigned ASCII digits with at most one point, nearly every result: no regex.
    digits = value.replace(".", "", 1)
    if digits.isdigit() and digits.isascii():
        if len(digits) != len(value):
            return float(value)
        if len(value) < 19:  # below 10**18: within 64 bits
            return int(value)
    if not _NUMBER_RE.fullmatch(value):
        raise DataTypeError("not a number", location=location)
    if "." in value:
        return float(value)
    result = int(value)
    if not -(2**63) <= result < 2**63:  # beyond what JSON encoders carry exactly
        raise DataTypeError("number out of range", location=location)
    return result


#: Unit strings that are valid UCUM as they stand and are common in lab results.
_UCUM_COMMON: Final = frozenset(
    {
        "%",
        "g/dL",
        "mg/dL",
        "mmol/L",
        "umol/L",
        "mEq/L",
        "U/L",
        "IU/L",
        "fL",
        "pg",
        "g/L",
        "mg/L",
        "ng/mL",
        "pg/mL",
        "10*3/uL",
        "10*6/uL",
        "10*9/L",
        "10*12/L",
        "mm[Hg]",
        "kg",
        "g",
        "cm",
        "m",
        "/min",
        "Cel",
        "[degF]",
        "s",
        "min",
        "h",
        "d",
        "wk",
        "mo",
        "a",
        "L",
        "mL",
        "uL",
        "mg",
        "ug",
        "ng",
        "mmol/mol",
        "mL/min",
        "mL/min/{1.73_m2}",
        "kg/m2",
        "[in_i]",
        "[lb_av]",
        "{ratio}",
        "1",
        "/uL",
        "/hpf",
    }
)


def _looks_ucum(unit: str) -> bool:
    return unit in _UCUM_COMMON


def _global_id(key: str) -> str:
    """An id shared by every message that names the same thing (not event-scoped)."""
    return uuid5_str(key)
