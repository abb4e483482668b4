"""VXU^V04 → Immunization (and its Observations), following the HL7 v2-to-FHIR IG
(message map VXU_V04; segment maps ORC[Immunization], RXA[Immunization],
RXR[Immunization]; concept maps CompletionStatus, RouteOfAdministration) and, where
the IG leaves it to the realm, the CDC IIS implementation guide (RXA-9 NIP001,
OBX funding and VIS observations, table 0163 sites).

Groups, in message order: ``PID ... [{OBX {NTE}}] {[ORC] [{TQ1}] RXA [RXR] [{OBX {NTE}}]}``.
OBX before the first ORC/RXA are about the patient (PERSON_OBSERVATION): Observations
of the patient. Each RXA → one Immunization; its OBX → Observations ``partOf`` it.

Field map:

* ORC-2 → identifier (PLAC); ORC-3 → identifier (FILL); ORC-12 → performer with
  function OP (table 0443); ORC-9 → recorded when RXA-22 is empty.
* RXA-3 → occurrenceDateTime (required); RXA-4 only when it repeats RXA-3.
* RXA-5 → vaccineCode (CVX, NDC... and the alternate code).
* RXA-6 / RXA-7 → doseQuantity; 999 (the CDC's "amount unknown") → no doseQuantity.
* RXA-9 (NIP001) → primarySource (00 → true, 01-08 → false) and reportOrigin
  (historical sources, immunization-origin where one matches); other RXA-9 → note.
* RXA-10 → performer with function AP; RXA-27 (else RXA-11) → location, RXA-28 its
  address; RXA-15 → lotNumber; RXA-16 → expirationDate; RXA-17 (MVX) → manufacturer
  Organization (identifier system http://hl7.org/fhir/sid/mvx); RXA-18 → statusReason;
  RXA-19 → reasonCode; RXA-22 → recorded.
* RXA-20 (table 0322) → status: CP completed, PA completed with isSubpotent, RE and
  NA not-done, empty completed; RXA-21 D → entered-in-error.
* RXR-1 → route (table 0162 codes also as v3-RouteOfAdministration where the IG maps
  them); RXR-2 → site (table 0163 codes are v3-ActSite codes).
* OBX 64994-7 → programEligibility, 30963-3 → fundingSource, VIS document type /
  publication / presentation dates (69764-9, 29768-9, 29769-7, grouped by OBX-4) →
  education, besides the Observations themselves.

Left unmapped (``unmapped`` lists them): TQ1 (the IG maps it only to the optional
ServiceRequest, which is not made), ORC-4..8, ORC-10, ORC-11, ORC-13..34, RXA-8,
RXA-12..14, RXA-23..26, RXA-29, RXR-3..6, PRT.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

from bridge.errors import RequiredFieldMissing, TableValueNotFound
from bridge.normalize import datatypes as dt
from bridge.normalize.bundle import register
from bridge.normalize.context import Components, MappingContext, Segment
from bridge.normalize.families.orders import (
    annotation_from_nte,
    peek,
    subject_reference,
)
from bridge.normalize.families.oru import observation_from_obx
from bridge.normalize.ids import uuid5_str

MVX_SYSTEM: Final = "http://hl7.org/fhir/sid/mvx"
V2_0443: Final = "http://terminology.hl7.org/CodeSystem/v2-0443"
V2_0162: Final = "http://terminology.hl7.org/CodeSystem/v2-0162"
V2_0163: Final = "http://terminology.hl7.org/CodeSystem/v2-0163"
V3_ROUTE: Final = "http://terminology.hl7.org/CodeSystem/v3-RouteOfAdministration"
V3_ACT_SITE: Final = "http://terminology.hl7.org/CodeSystem/v3-ActSite"
IMMUNIZATION_ORIGIN: Final = "http://terminology.hl7.org/CodeSystem/immunization-origin"
LOINC: Final = "http://loinc.org"

#: IG ConceptMap CompletionStatus (table 0322 → event-status); "" is the IG's default.
COMPLETION_STATUS: Final[dict[str, str]] = {
    "": "completed",
    "CP": "completed",
    "PA": "completed",
    "RE": "not-done",
    "NA": "not-done",
}

#: IG ConceptMap RouteOfAdministration: the table 0162 codes it maps to
#: v3-RouteOfAdministration (the others stay table 0162 codes).
ROUTE_V3: Final[dict[str, tuple[str, str]]] = {
    "ID": ("IDINJ", "Injection, intradermal"),
    "IM": ("IM", "Injection, intramuscular"),
    "IV": ("IVINJ", "Injection, intravenous"),
    "PO": ("PO", "Swallow, oral"),
    "SC": ("SQ", "Injection, subcutaneous"),
    "TD": ("TRNSDERM", "Transdermal"),
}

#: Table 0163 (body site) codes, which v3-ActSite defines with the same meaning.
_SITES: Final = (
    "BE BN BU LA LACF LD LE LEJ LF LG LH LIJ LLAQ LLFA LMFA LN LPC LSC LT LUA LUAQ LUFA "
    "LVG LVL OD OS OU PA PERIN RA RACF RD RE REJ RF RG RH RIJ RLAQ RLFA RMFA RN RPC RSC "
    "RT RUA RUAQ RUFA RVG RVL"
)
ACT_SITE_CODES: Final = frozenset(_SITES.split())

#: CDC NIP001 (immunization information source): 00 is a new administration record,
#: 01-08 historical ones; those with an immunization-origin equivalent.
NIP001_CODES: Final = frozenset({"00", "01", "02", "03", "04", "05", "06", "07", "08"})
NIP001_ORIGIN: Final[dict[str, tuple[str, str]]] = {
    "02": ("provider", "Other Provider"),
    "03": ("record", "Written Record"),
    "04": ("recall", "Parent/Guardian/Patient Recall"),
    "07": ("school", "School Record"),
}

FUNDING_SOURCE_LOINC: Final = "30963-3"
ELIGIBILITY_LOINC: Final = "64994-7"
VIS_DOCUMENT_LOINC: Final = "69764-9"
VIS_PUBLISHED_LOINC: Final = "29768-9"
VIS_PRESENTED_LOINC: Final = "29769-7"

#: CDC: an administered amount of 999 means the amount is not known.
UNKNOWN_AMOUNT: Final = "999"


@dataclass(slots=True)
class AdministrationGroup:
    """One ORDER group: [ORC] [TQ1] RXA [RXR] {OBX {NTE}}."""

    orc: Segment | None
    rxa: Segment | None = None
    rxr: Segment | None = None
    notes: list[Segment] = field(default_factory=list)
    observations: list[tuple[Segment, list[Segment]]] = field(default_factory=list)


def administration_groups(
    ctx: MappingContext,
) -> tuple[list[tuple[Segment, list[Segment]]], list[AdministrationGroup]]:
    """The patient's OBX (before any order) and the order groups of a VXU."""
    person: list[tuple[Segment, list[Segment]]] = []
    groups: list[AdministrationGroup] = []
    current: AdministrationGroup | None = None
    obx_notes: list[Segment] | None = None
    for seg in ctx.segments:
        name = seg.name
        if name == "ORC":
            current = AdministrationGroup(seg)
            groups.append(current)
            obx_notes = None
        elif name == "RXA":
            if current is None or current.rxa is not None:
                current = AdministrationGroup(None)
                groups.append(current)
            current.rxa = seg
            obx_notes = None
        elif name == "RXR":
            if current is not None and current.rxr is None:
                current.rxr = seg
            obx_notes = None
        elif name == "OBX":
            obx_notes = []
            (person if current is None else current.observations).append((seg, obx_notes))
        elif name == "NTE":
            if obx_notes is not None:
                obx_notes.append(seg)
            elif current is not None:
                current.notes.append(seg)
        elif name != "PRT":
            obx_notes = None
    return person, groups


@register("VXU")
def map_vxu(ctx: MappingContext) -> None:
    """Each RXA of a VXU → Immunization; the patient's OBX → Observations."""
    person, groups = administration_groups(ctx)
    for obx, notes in person:
        observation_from_obx(ctx, obx, key_prefix=f"{ctx.event_id}|VXU", notes=notes)
    for group in groups:
        if group.rxa is not None:
            immunization(ctx, group)


def immunization(ctx: MappingContext, group: AdministrationGroup) -> str:
    """Add the Immunization of one RXA group (and its Observations); its reference."""
    rxa, orc, rxr = group.rxa, group.orc, group.rxr
    if rxa is None:
        raise RequiredFieldMissing("order group without RXA", location="RXA")
    rxa.consume(1, 2)  # give and administration sub-id counters: structure
    imm: dict[str, Any] = {"resourceType": "Immunization", "id": ""}

    identifiers = []
    performers = []
    if orc is not None:
        if Components(ctx, peek(orc, 1)).text(1).upper() == "RE":
            orc.consume(1)  # RE ("observations to follow"), as VXU requires: structure
        for n, type_code in ((2, "PLAC"), (3, "FILL")):
            found = dt.entity_identifier(ctx, orc.comps(n), type_code) if orc.present(n) else None
            if found is not None:
                identifiers.append(found)
        if orc.present(12):
            ordering = dt.practitioner(ctx, orc.comps(12))
            if ordering is not None:
                performers.append(_performer(ordering, "OP", "Ordering Provider"))
    if identifiers:
        imm["identifier"] = identifiers

    imm["status"] = _status(rxa, imm)
    if rxa.present(18):
        reason = dt.codeable_concept(ctx, rxa.comps(18))
        if reason is not None:
            imm["statusReason"] = reason

    vaccine = dt.codeable_concept(ctx, rxa.comps(5))
    if vaccine is None:
        raise RequiredFieldMissing("administered code is required", location="RXA-5")
    imm["vaccineCode"] = vaccine
    imm["patient"] = subject_reference(ctx)
    if ctx.encounter_ref:
        imm["encounter"] = {"reference": ctx.encounter_ref}

    occurred = dt.date_time(rxa.value(3), "RXA-3")
    if occurred is None:
        raise RequiredFieldMissing("administration date/time is required", location="RXA-3")
    imm["occurrenceDateTime"] = occurred
    if rxa.present(4) and Components(ctx, peek(rxa, 4)).text(1) == rxa.value(3):
        rxa.consume(4)  # the end of administration repeats its start

    recorded = dt.date_time(rxa.value(22), "RXA-22")
    if recorded is None and orc is not None and orc.present(9):
        recorded = dt.date_time(orc.value(9), "ORC-9")
    if recorded:
        imm["recorded"] = recorded

    notes = _information_source(ctx, rxa, imm)

    location = _location(ctx, rxa)
    if location is not None:
        imm["location"] = {"reference": location}
    manufacturer = manufacturer_organization(ctx, rxa.comps(17)) if rxa.present(17) else None
    if manufacturer is not None:
        imm["manufacturer"] = {"reference": manufacturer}
    lots = rxa.reps(15)
    if lots:
        lot = ctx.decode(lots[0]).strip()
        if lot:
            imm["lotNumber"] = lot
    if rxa.present(16):
        expires = dt.date_only(rxa.comps(16).text(1), "RXA-16")
        if expires:
            imm["expirationDate"] = expires

    if rxr is not None:
        site = _site(ctx, rxr.comps(2)) if rxr.present(2) else None
        if site is not None:
            imm["site"] = site
        route = _route(ctx, rxr.comps(1))
        if route is not None:
            imm["route"] = route

    dose = _dose(rxa)
    if dose is not None:
        imm["doseQuantity"] = dose

    if rxa.present(10):
        for c in rxa.each(10):
            administering = dt.practitioner(ctx, c)
            if administering is not None:
                performers.append(_performer(administering, "AP", "Administering Provider"))
    if performers:
        imm["performer"] = performers

    notes += [a for nte in group.notes if (a := annotation_from_nte(ctx, nte))]
    if notes:
        imm["note"] = notes
    reasons = [x for c in rxa.each(19) if (x := dt.codeable_concept(ctx, c))]
    if reasons:
        imm["reasonCode"] = reasons

    imm["id"] = _immunization_id(ctx, imm, rxa)
    reference = ctx.add(imm)
    _observations(ctx, group, imm, reference)
    return reference


# --- RXA fields -----------------------------------------------------------------------


def _status(rxa: Segment, imm: dict[str, Any]) -> str:
    """RXA-21 D → entered-in-error; else RXA-20 through table 0322."""
    completion = rxa.value(20).strip().upper()
    action = rxa.value(21).strip().upper()
    if action == "D":
        return "entered-in-error"
    status = COMPLETION_STATUS.get(completion)
    if status is None:
        raise TableValueNotFound("completion status not in table 0322", location="RXA-20")
    if completion == "PA":
        imm["isSubpotent"] = True
    return status


def _information_source(
    ctx: MappingContext, rxa: Segment, imm: dict[str, Any]
) -> list[dict[str, Any]]:
    """RXA-9: NIP001 → primarySource / reportOrigin; other notes → Annotations."""
    notes: list[dict[str, Any]] = []
    if not rxa.present(9):
        return notes
    for c in rxa.each(9):
        code, system = c.text(1), c.text(3).upper()
        if system == "NIP001" or (not system and code in NIP001_CODES):
            if code not in NIP001_CODES:
                raise TableValueNotFound("information source not in NIP001", location="RXA-9")
            imm["primarySource"] = code == "00"
            if code != "00":
                imm["reportOrigin"] = _report_origin(code, c.text(2))
        else:
            text = c.text(9) or c.text(2) or code
            if text:
                notes.append({"text": text})
    return notes


def _report_origin(code: str, display: str) -> dict[str, Any]:
    codings: list[dict[str, Any]] = []
    origin = NIP001_ORIGIN.get(code)
    if origin is not None:
        codings.append({"system": IMMUNIZATION_ORIGIN, "code": origin[0], "display": origin[1]})
    local = dt.coding(code, display, dt.code_system("NIP001"))
    if local is not None:
        codings.append(local)
    concept: dict[str, Any] = {"coding": codings}
    if display:
        concept["text"] = display
    return concept


def _dose(rxa: Segment) -> dict[str, Any] | None:
    """RXA-6 with RXA-7 units; the CDC's 999 (amount unknown) gives none."""
    amount = rxa.value(6).strip()
    units = rxa.comps(7)
    if not amount or amount == UNKNOWN_AMOUNT:
        return None
    return dt.quantity(amount, units, "RXA-6")


def _location(ctx: MappingContext, rxa: Segment) -> str | None:
    """RXA-27 (PL, v2.6+) else RXA-11 (LA2: point of care, room, bed, facility); RXA-28
    is the address of that place."""
    place = None
    if rxa.present(27):
        place = dt.location(ctx, rxa.comps(27))
    elif rxa.present(11):
        place = dt.location(ctx, rxa.comps(11))
    if place is not None and rxa.present(28):
        found = ctx.get(place)
        address = dt.address(rxa.comps(28))
        if found is not None and address is not None:
            found.setdefault("address", address)
    return place


def manufacturer_organization(ctx: MappingContext, c: Components) -> str | None:
    """RXA-17 (CWE, MVX codes) → an Organization, one per manufacturer code."""
    code, name, system_name = c.text(1), c.text(2), c.text(3)
    if not code and not name:
        return None
    organization: dict[str, Any] = {"resourceType": "Organization", "id": ""}
    key = f"|{name}"
    if code:
        is_mvx = system_name.upper() in ("", "MVX")
        system = MVX_SYSTEM if is_mvx else dt.code_system(system_name)
        organization["identifier"] = [{"system": system, "value": code}]
        key = f"{system}|{code}"
    if name:
        organization["name"] = name
    organization["id"] = uuid5_str(f"Organization|{key}")
    return ctx.add(organization)


def _route(ctx: MappingContext, c: Components) -> dict[str, Any] | None:
    concept = dt.codeable_concept(ctx, c)
    if concept is None:
        return None
    codings = concept.get("coding", [])
    for coding in list(codings):
        if coding.get("system") == V2_0162 and coding.get("code") in ROUTE_V3:
            code, display = ROUTE_V3[coding["code"]]
            codings.insert(0, {"system": V3_ROUTE, "code": code, "display": display})
            break
    return concept


def _site(ctx: MappingContext, c: Components) -> dict[str, Any] | None:
    concept = dt.codeable_concept(ctx, c)
    for coding in concept.get("coding", []) if concept else []:
        if coding.get("system") == V2_0163 and coding.get("code") in ACT_SITE_CODES:
            coding["system"] = V3_ACT_SITE
    return concept


def _performer(reference: str, function: str, display: str) -> dict[str, Any]:
    return {
        "function": {"coding": [{"system": V2_0443, "code": function, "display": display}]},
        "actor": {"reference": reference},
    }


def _immunization_id(ctx: MappingContext, imm: dict[str, Any], rxa: Segment) -> str:
    """The filler (else placer) order number: the administration's identity in the IIS."""
    for type_code in ("FILL", "PLAC"):
        for ident in imm.get("identifier", ()):
            if ident["type"]["coding"][0]["code"] == type_code:
                scope = ident.get("system") or ctx.msg.header.sender_key
                return uuid5_str(f"Immunization|{scope}|{ident['value']}")
    return ctx.resource_id(f"Immunization/{rxa.index}")


# --- OBX ------------------------------------------------------------------------------


def _observations(
    ctx: MappingContext, group: AdministrationGroup, imm: dict[str, Any], reference: str
) -> None:
    """OBX of the administration → Observations ``partOf`` it; funding, eligibility
    and VIS observations also fill the Immunization's own elements."""
    education: dict[str, dict[str, Any]] = {}
    prefix = f"Immunization|{imm['id']}"
    for obx, notes in group.observations:
        ref = observation_from_obx(ctx, obx, key_prefix=prefix, notes=notes)
        obs = ctx.get(ref)
        if obs is None:
            continue
        obs["partOf"] = [{"reference": reference}]
        loinc = next(
            (c.get("code") for c in obs["code"].get("coding", ()) if c.get("system") == LOINC),
            None,
        )
        concept = obs.get("valueCodeableConcept")
        when = obs.get("valueDateTime")
        if loinc == ELIGIBILITY_LOINC and concept is not None:
            imm.setdefault("programEligibility", []).append(dict(concept))
        elif loinc == FUNDING_SOURCE_LOINC and concept is not None:
            imm.setdefault("fundingSource", dict(concept))
        elif loinc in (VIS_DOCUMENT_LOINC, VIS_PUBLISHED_LOINC, VIS_PRESENTED_LOINC):
            entry = education.setdefault(obx.value(4), {})
            if loinc == VIS_DOCUMENT_LOINC and concept is not None:
                document = next((c["code"] for c in concept.get("coding", ()) if "code" in c), "")
                if document:
                    entry["documentType"] = document
            elif loinc == VIS_PUBLISHED_LOINC and when:
                entry["publicationDate"] = when
            elif loinc == VIS_PRESENTED_LOINC and when:
                entry["presentationDate"] = when
    # imm-1: an education entry names its document (the IG's documentType or reference).
    taught = [e for e in education.values() if "documentType" in e]
    if taught:
        imm["education"] = taught
