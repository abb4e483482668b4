"""MDM (T01-T11) → DocumentReference, following the v2-to-FHIR IG's TXA and
OBX[DocumentReference] segment maps and its MDM_T02 message map.

One DocumentReference per message, its id a UUIDv5 of the unique document
number (TXA-12 and its authority), so every event about a document (status
change, addendum, cancel) lands on the same resource id.

TXA → DocumentReference
    TXA-2 document type → ``type`` (table 0270 system when the code has none);
    TXA-3 content presentation → the content type of a notification without
    content; TXA-4 activity date/time → ``context.period.start``; TXA-5 primary
    activity provider and TXA-9 originator → ``author``; TXA-6 origination
    date/time → ``date`` (when it is an instant) and every attachment's
    ``creation``; TXA-10 authenticator (else TXA-22's first person) →
    ``authenticator``; TXA-12 → ``masterIdentifier``; TXA-13 parent document →
    ``relatesTo`` (``replaces`` for T07-T10 edits and replacements, else
    ``appends``: the parent is the document this one belongs to);
    TXA-14/TXA-15 placer/filler order numbers → ``context.related`` (logical
    references to the ServiceRequest, as the IG links the order); TXA-16 file
    name → ``identifier``; TXA-17 completion status (0271) → ``docStatus``;
    TXA-18 confidentiality (0272) → ``securityLabel``; TXA-19 availability
    (0273) and the event → ``status``; TXA-25 title → ``description``; TXA-28
    creating specialty → ``context.practiceSetting``.

OBX (+ NTE) → ``content``
    ED → one attachment per repetition (ED-2/ED-3 → ``contentType``, ED-5 →
    ``data``; ``A`` and ``Hex`` encodings converted to base64); RP → an
    attachment with ``url``; TX/ST/FT (and an OBX without a value type) → the
    lines of one text attachment per OBX-3 identifier (``text/plain;
    charset=utf-8``, escapes decoded, repetitions and segments joined with
    ``\\n``), because senders split one document into one OBX per line and
    OBX-3 names the document or its section; HD (an instance UID, e.g. a DICOM
    study) → ``context.related`` by identifier. NTE after the OBX → an
    attachment titled "Notes and comments" (IG NTE[DocumentReference]). Other
    value types are not document content and are left untouched, so they show
    in ``unmapped``.

R4 requires ``content``: a notification without content (T01, T03, T05, T07,
T09, T11) gets one attachment describing the document without its data: the
content type from TXA-3, the title from TXA-25 or the document type, and the
creation time.

Not carried (reported in ``unmapped`` when present): TXA-7 transcription time,
TXA-8 edit times, TXA-11 transcriptionist, TXA-20 storage status, TXA-21 change
reason, TXA-23 distributed copies, TXA-24 folder, TXA-26 due date, TXA-27
creating facility; OBX-11 result status and the other OBX fields the IG leaves
unmapped; PV1, EVN and CON, which belong to the shared encounter, provenance and
consent maps.

ORC/OBR (the order group, with its TQ1 and NTE) → ServiceRequest through the
orders family's ORC/OBR map (IG MDM_T02 message map); the DocumentReference's
``context.related`` references it.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any, Final
from urllib.parse import quote

from bridge.errors import DataTypeError, RequiredFieldMissing, TableValueNotFound
from bridge.normalize import datatypes as dt
from bridge.normalize.bundle import register
from bridge.normalize.context import Components, MappingContext, Segment
from bridge.normalize.families.orders import OrderGroup, service_request
from bridge.normalize.ids import uuid5_str

V2_0270: Final = "http://terminology.hl7.org/CodeSystem/v2-0270"
V2_0271: Final = "http://terminology.hl7.org/CodeSystem/v2-0271"
V2_0272: Final = "http://terminology.hl7.org/CodeSystem/v2-0272"
V2_0273: Final = "http://terminology.hl7.org/CodeSystem/v2-0273"
V3_CONFIDENTIALITY: Final = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
ALTERNATE_CODES: Final = "http://hl7.org/fhir/StructureDefinition/alternate-codes"
TEXT_CONTENT_TYPE: Final = "text/plain; charset=utf-8"
NOTES_TITLE: Final = "Notes and comments"

#: HL7 table 0270 (document type).
DOCUMENT_TYPE: Final[dict[str, str]] = {
    "AR": "Autopsy report",
    "CD": "Cardiodiagnostics",
    "CN": "Consultation",
    "DI": "Diagnostic imaging",
    "DS": "Discharge summary",
    "ED": "Emergency department report",
    "HP": "History and physical examination",
    "OP": "Operative report",
    "PC": "Psychiatric consultation",
    "PH": "Psychiatric history and physical examination",
    "PN": "Procedure note",
    "PR": "Progress note",
    "SP": "Surgical pathology",
    "TS": "Transfer summary",
}

#: HL7 table 0271 (document completion status) → FHIR composition-status.
#: Only an authenticated document is final; everything before is preliminary.
DOC_STATUS: Final[dict[str, str]] = {
    "AU": "final",
    "LA": "final",
    "DI": "preliminary",
    "DO": "preliminary",
    "IN": "preliminary",
    "IP": "preliminary",
    "PA": "preliminary",
}

#: HL7 table 0273 (document availability status) → FHIR document-reference-status.
AVAILABILITY_STATUS: Final[dict[str, str]] = {
    "AV": "current",
    "CA": "entered-in-error",
    "OB": "superseded",
    "UN": "current",
}

#: HL7 table 0272 (confidentiality) → display, and the v3 Confidentiality equivalent.
CONFIDENTIALITY: Final[dict[str, tuple[str, str, str]]] = {
    "V": ("Very restricted", "V", "very restricted"),
    "R": ("Restricted", "R", "restricted"),
    "U": ("Usual control", "N", "normal"),
}

#: Events whose document replaces its TXA-13 parent (edits and replacements); in
#: every other event the parent is the document "to which this document belongs"
#: (HL7 v2.5 9.6.1.13), which FHIR calls ``appends`` (addenda, T05/T06).
_REPLACE_EVENTS: Final = frozenset({"T07", "T08", "T09", "T10"})
#: The cancel event: the document was sent in error.
_CANCEL_EVENT: Final = "T11"

#: HL7 table 0191 (type of referenced data, ED-2 / RP-3) → MIME top-level type.
_MEDIA_TYPE: Final[dict[str, str]] = {
    "AP": "application",
    "AU": "audio",
    "FT": "text",
    "IM": "image",
    "MULTIPART": "multipart",
    "NS": "image",
    "SI": "image",
    "TEXT": "text",
    "TX": "text",
}
#: MIME top-level types, for senders that put them in ED-2 directly.
_MIME_TOP: Final = frozenset(
    {"application", "audio", "font", "image", "message", "model", "multipart", "text", "video"}
)
#: HL7 table 0291 (data subtype) → full MIME type where the subtype alone decides it.
_SUBTYPE_MEDIA: Final[dict[str, str]] = {
    "PDF": "application/pdf",
    "RTF": "application/rtf",
    "POSTSCRIPT": "application/postscript",
    "DICOM": "application/dicom",
    "OCTET-STREAM": "application/octet-stream",
    "X-HL7-CDA-LEVEL-ONE": "application/x-hl7-cda-level-one+xml",
    "XML": "application/xml",
    "HTML": "text/html",
    "SGML": "text/sgml",
    "JPEG": "image/jpeg",
    "JPG": "image/jpeg",
    "GIF": "image/gif",
    "PNG": "image/png",
    "TIFF": "image/tiff",
    "BMP": "image/bmp",
    "BASIC": "audio/basic",
}
#: TXA-3 (table 0191) → content type of a notification without content.
_PRESENTATION_TYPE: Final[dict[str, str]] = {
    "TX": TEXT_CONTENT_TYPE,
    "TEXT": TEXT_CONTENT_TYPE,
    "FT": TEXT_CONTENT_TYPE,
}
_TEXT_TYPES: Final = frozenset({"TX", "ST", "FT", ""})
_OID_RE: Final = re.compile(r"[0-2](?:\.(?:0|[1-9][0-9]*))+")


@register("MDM")
def map_mdm(ctx: MappingContext) -> None:
    """Add the DocumentReference of an MDM message to the Bundle."""
    txa = ctx.first("TXA")
    if txa is None:
        raise RequiredFieldMissing("MDM message without a TXA segment", location="TXA")
    event = dt.code(ctx.msg.header.trigger_event).upper()
    txa.consume(1)  # set id

    doc: dict[str, Any] = {"resourceType": "DocumentReference"}
    master = dt.entity_identifier(ctx, txa.comps(12))
    if master is not None:
        doc["id"] = uuid5_str(f"DocumentReference|{master.get('system', '')}|{master['value']}")
        doc["masterIdentifier"] = master
    else:
        doc["id"] = ctx.resource_id("DocumentReference")

    file_name = txa.value(16)
    if file_name:
        doc["identifier"] = [{"value": file_name}]

    _status(txa, event, doc)
    doc_type = _document_type(ctx, txa.comps(2))
    if doc_type is not None:
        doc["type"] = doc_type
    if ctx.patient_ref:
        doc["subject"] = {"reference": ctx.patient_ref}

    creation = dt.date_time(txa.value(6), "TXA-6")
    if creation is not None and dt.is_instant(creation):
        doc["date"] = creation

    authors: list[dict[str, str]] = []
    for n in (9, 5):
        for c in txa.each(n):
            ref = dt.practitioner(ctx, c)
            if ref is not None and {"reference": ref} not in authors:
                authors.append({"reference": ref})
    if authors:
        doc["author"] = authors
    authenticator = _authenticator(ctx, txa)
    if authenticator is not None:
        doc["authenticator"] = {"reference": authenticator}

    parent = dt.entity_identifier(ctx, txa.comps(13))
    if parent is not None:
        relation = "replaces" if event in _REPLACE_EVENTS else "appends"
        doc["relatesTo"] = [
            {
                "code": relation,
                "target": {"type": "DocumentReference", "identifier": parent},
            }
        ]

    title = txa.value(25)
    if title:
        doc["description"] = title
    label = _security_label(txa.value(18))
    if label is not None:
        doc["securityLabel"] = [label]

    orders = [service_request(ctx, g, n) for n, g in enumerate(_order_groups(ctx))]
    related: list[dict[str, Any]] = []
    doc["content"] = _content(ctx, txa, doc, creation, related)

    context = _context(ctx, txa, related, orders)
    if context:
        doc["context"] = context
    ctx.add(doc)


# --- TXA ------------------------------------------------------------------------------


def _status(txa: Segment, event: str, doc: dict[str, Any]) -> None:
    """``status`` from the event and TXA-19, ``docStatus`` from TXA-17; a code with no
    FHIR equivalent is kept as an alternate code on the element."""
    availability = dt.code(txa.value(19)).upper()
    status = AVAILABILITY_STATUS.get(availability, "current")
    if event == _CANCEL_EVENT:
        status = "entered-in-error"
    doc["status"] = status
    if availability and availability != "AV":
        doc["_status"] = _alternate_code(V2_0273, availability)

    completion = dt.code(txa.value(17)).upper()
    doc_status = DOC_STATUS.get(completion)
    if doc_status is not None:
        doc["docStatus"] = doc_status
    elif completion:
        doc["_docStatus"] = _alternate_code(V2_0271, completion)


def _alternate_code(system: str, value: str) -> dict[str, Any]:
    return {
        "extension": [
            {
                "url": ALTERNATE_CODES,
                "valueCodeableConcept": {"coding": [{"system": system, "code": value}]},
            }
        ]
    }


def _document_type(ctx: MappingContext, c: Components) -> dict[str, Any] | None:
    """TXA-2 (IS before v2.7, CWE after): a bare table 0270 code gets the table's system."""
    code = dt.code(c.text(1))
    if code and not c.text(3) and code.upper() in DOCUMENT_TYPE:
        coding = {"system": V2_0270, "code": code.upper(), "display": DOCUMENT_TYPE[code.upper()]}
        concept: dict[str, Any] = {"coding": [coding]}
        text = c.text(9) or c.text(2)
        if text:
            concept["text"] = text
        return concept
    return dt.codeable_concept(ctx, c)


def _authenticator(ctx: MappingContext, txa: Segment) -> str | None:
    """TXA-10 (first person; R4 has one authenticator), else TXA-22 (PPN: an XCN whose
    authentication time, PPN-15, R4 has no element for)."""
    for n in (10, 22):
        for c in txa.each(n):
            ref = dt.practitioner(ctx, c)
            if ref is not None:
                return ref
    return None


def _security_label(value: str) -> dict[str, Any] | None:
    code = dt.code(value).upper()
    if not code:
        return None
    known = CONFIDENTIALITY.get(code)
    if known is None:
        return {"coding": [{"system": V2_0272, "code": code}]}
    display, v3_code, v3_display = known
    return {
        "coding": [
            {"system": V2_0272, "code": code, "display": display},
            {"system": V3_CONFIDENTIALITY, "code": v3_code, "display": v3_display},
        ]
    }


def _order_groups(ctx: MappingContext) -> list[OrderGroup]:
    """The MDM order group(s) before the TXA: ORC [{TQ1}] [OBR [{NTE}]]."""
    groups: list[OrderGroup] = []
    current: OrderGroup | None = None
    for seg in ctx.segments:
        name = seg.name
        if name == "TXA":
            break
        if name == "ORC":
            current = OrderGroup(seg)
            groups.append(current)
        elif name == "OBR":
            if current is not None and current.obr is None:
                current.obr = seg
            else:
                current = OrderGroup(None, obr=seg)
                groups.append(current)
        elif current is None:
            continue
        elif name == "TQ1":
            current.timing.append(seg)
        elif name == "NTE":
            current.notes.append(seg)
    return groups


def _context(
    ctx: MappingContext, txa: Segment, related: list[dict[str, Any]], orders: list[str]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if ctx.encounter_ref:
        out["encounter"] = [{"reference": ctx.encounter_ref}]
    activity = dt.date_time(txa.value(4), "TXA-4")
    if activity is not None:
        out["period"] = {"start": activity}
    setting = dt.codeable_concept(ctx, txa.comps(28))
    if setting is not None:
        out["practiceSetting"] = setting
    # The order group's ServiceRequests (literal references); TXA-14/15 numbers that
    # none of them carries stay logical references by identifier.
    known = {
        (i.get("system"), i["value"])
        for ref in orders
        if (sr := ctx.get(ref)) is not None
        for i in sr.get("identifier", ())
    }
    links: list[dict[str, Any]] = [{"reference": ref} for ref in orders]
    numbers = [dt.entity_identifier(ctx, c, "PLAC") for c in txa.each(14)]
    numbers.append(dt.entity_identifier(ctx, txa.comps(15), "FILL"))
    for ident in numbers:
        if ident is not None and (ident.get("system"), ident["value"]) not in known:
            links.append({"type": "ServiceRequest", "identifier": ident})
    related = links + related
    if related:
        out["related"] = related
    return out


# --- OBX / NTE → content --------------------------------------------------------------


def _content(
    ctx: MappingContext,
    txa: Segment,
    doc: dict[str, Any],
    creation: str | None,
    related: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """The attachments of the document, in OBX order; never empty (R4 needs one).

    TXA-3 (how the document is presented) says what the OBX value types say in
    detail; it only decides the content type when there is no content.

    Text OBX segments with the same OBX-3 are the lines of one text (one section,
    or the whole document when the sender uses one identifier for every line).
    """
    presentation = dt.code(txa.value(3)).upper()
    attachments: list[dict[str, Any]] = []
    texts: dict[str, tuple[dict[str, Any], list[str]]] = {}
    notes: list[str] = []
    for seg in ctx.after(txa, ("OBX", "NTE"), ()):
        if seg.name == "NTE":
            seg.consume(1)
            notes.append("\n".join(_text_reps(ctx, seg, 3)))
            continue
        kind = ctx.decode(seg.fields[2]).strip().upper() if len(seg.fields) > 2 else ""
        if kind in _TEXT_TYPES:
            seg.consume(1, 2, 4)
            key = seg.raw(3)
            if key not in texts:
                texts[key] = (_titled({"contentType": TEXT_CONTENT_TYPE}, ctx, seg), [])
                attachments.append(texts[key][0])
            texts[key][1].extend(_text_reps(ctx, seg, 5))
        elif kind == "ED":
            seg.consume(1, 2, 4)
            attachments += [_titled(_ed(ctx, c), ctx, seg) for c in seg.each(5)]
        elif kind == "RP":
            seg.consume(1, 2, 4)
            attachments += [_titled(_rp(ctx, c), ctx, seg) for c in seg.each(5)]
        elif kind == "HD":
            seg.consume(1, 2, 4)
            related.extend(_instance_reference(ctx, seg, c) for c in seg.each(5) if c)
        # Other value types are results, not document content: left for `unmapped`.

    for text, lines in texts.values():
        text["data"] = _base64_text("\n".join(lines))
    if notes:
        attachments.append(
            {
                "contentType": TEXT_CONTENT_TYPE,
                "data": _base64_text("\n".join(notes)),
                "title": NOTES_TITLE,
            }
        )
    if not attachments:
        attachments.append(_without_content(presentation, doc))
    if creation is not None:
        for attachment in attachments:
            attachment["creation"] = creation
    return [{"attachment": a} for a in attachments]


def _text_reps(ctx: MappingContext, seg: Segment, n: int) -> list[str]:
    """Every repetition of a text field, empty ones too (blank lines of a document)."""
    raw = seg.raw(n)
    if not raw:
        return [""]
    return [ctx.decode(r) for r in raw.split(ctx.enc.repetition)]


def _titled(attachment: dict[str, Any], ctx: MappingContext, obx: Segment) -> dict[str, Any]:
    """OBX-3 (what the content is) as the attachment's title."""
    c = obx.comps(3)
    title = c.text(9) or c.text(2) or c.text(1)
    if title and "title" not in attachment:
        attachment["title"] = title
    return attachment


def _ed(ctx: MappingContext, c: Components) -> dict[str, Any]:
    """ED → Attachment: ED-2/ED-3 content type, ED-5 data converted to base64 per ED-4."""
    out: dict[str, Any] = {}
    content_type = _media_type(c.text(2), c.text(3))
    payload = ctx.decode(c.part(5))
    if payload.strip():
        encoding = c.text(4).upper()
        out["data"] = _to_base64(payload, encoding)
        content_type = content_type or "application/octet-stream"
    if content_type:
        out["contentType"] = content_type
    return out


def _to_base64(payload: str, encoding: str) -> str:
    if encoding in ("A", "NONE", ""):
        return base64.b64encode(payload.encode("utf-8")).decode("ascii")
    # Senders wrap long payloads (\.br\, \X0D0A\): whitespace carries nothing here.
    compact = "".join(payload.split())
    if encoding == "BASE64":
        try:
            binascii.a2b_base64(compact, strict_mode=True)
        except binascii.Error:
            raise DataTypeError("ED data is not valid base64", location="OBX-5.5") from None
        return compact
    if encoding == "HEX":
        try:
            return base64.b64encode(bytes.fromhex(compact)).decode("ascii")
        except ValueError:
            raise DataTypeError("ED data is not valid hex", location="OBX-5.5") from None
    raise TableValueNotFound("ED encoding is not A, Hex or Base64", location="OBX-5.4")


def _rp(ctx: MappingContext, c: Components) -> dict[str, Any]:
    """RP → Attachment: RP-1 pointer as the url, RP-3/RP-4 as the content type."""
    out: dict[str, Any] = {}
    pointer = c.text(1)
    if pointer:
        out["url"] = quote(pointer, safe=":/?#[]@!$&'()*+,;=%~")
    content_type = _media_type(c.text(3), c.text(4))
    if content_type:
        out["contentType"] = content_type
    return out


def _media_type(kind: str, subtype: str) -> str | None:
    """ED-2/ED-3 (RP-3/RP-4) → MIME type; None when they do not say."""
    kind, subtype = kind.strip(), subtype.strip()
    if "/" in subtype:
        return dt.code(subtype.lower())
    if "/" in kind:
        return dt.code(kind.lower())
    if kind.lower() in _MIME_TOP and subtype:
        return dt.code(f"{kind.lower()}/{subtype.lower()}")
    full = _SUBTYPE_MEDIA.get(subtype.upper())
    if full is not None:
        return full
    top = _MEDIA_TYPE.get(kind.upper())
    if top is None:
        return None
    if subtype:
        return dt.code(f"{top}/{subtype.lower()}")
    return "text/plain" if top == "text" else None


def _base64_text(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def _instance_reference(ctx: MappingContext, obx: Segment, c: Components) -> dict[str, Any]:
    """An HD value (an instance UID such as a DICOM study's) → a logical reference."""
    uid = c.text(2) or c.text(1)
    ident: dict[str, str]
    if _OID_RE.fullmatch(uid):
        ident = {"system": "urn:ietf:rfc:3986", "value": f"urn:oid:{uid}"}
    else:
        ident = {"value": uid}
    out: dict[str, Any] = {"identifier": ident}
    what = obx.comps(3)
    display = what.text(2) or what.text(1)
    if display:
        out["display"] = display
    return out


def _without_content(presentation: str, doc: dict[str, Any]) -> dict[str, Any]:
    """The attachment of a notification that carries no content: what the document is,
    without its data (R4 requires ``content``)."""
    out: dict[str, Any] = {}
    content_type = _PRESENTATION_TYPE.get(presentation)
    if content_type:
        out["contentType"] = content_type
    title = doc.get("description")
    if not title:
        kind = doc.get("type", {})
        codings = kind.get("coding") or [{}]
        title = kind.get("text") or codings[0].get("display") or codings[0].get("code")
    out["title"] = title or "Document notification without content"
    return out


# --- dates ----------------------------------------------------------------------------
