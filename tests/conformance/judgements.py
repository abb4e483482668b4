"""Known disagreements with Microsoft's expected outputs, each with a verdict.

A :class:`Pattern` matches a :class:`Disagreement` by resource type, field and a
predicate; the first pattern that matches judges it. The verdicts:

* ``ours wrong``: a bug in our mapping, to be fixed (the report lists these first);
* ``theirs non-standard``: Microsoft's output departs from the HL7 v2-to-FHIR IG
  (or from FHIR itself); ``reference`` names the IG map that says so;
* ``undecidable``: the IG leaves the choice open, or the message is ambiguous;
  ``reason`` says why.

A disagreement no pattern matches is reported as ``unjudged``: someone has to
look at it and add a pattern here. Patterns are kept narrow on purpose (a
predicate on the values, not only the field), so a new kind of disagreement in
a known field is not silently absorbed by an old verdict.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

Verdict = Literal["ours wrong", "theirs non-standard", "undecidable"]
VERDICTS: Final[tuple[Verdict, ...]] = ("ours wrong", "theirs non-standard", "undecidable")
UNJUDGED: Final = "unjudged"

#: The IG's published maps (v1.0.0, STU1); each map is ``{IG}/ConceptMap-<name>.html``.
IG: Final = "https://hl7.org/fhir/uv/v2mappings/STU1"


def ig(name: str) -> str:
    """The IG page of a ConceptMap, e.g. ``ig("segment-pid-to-patient")``."""
    return f"{IG}/ConceptMap-{name}.html"


@dataclass(frozen=True, slots=True)
class Disagreement:
    """One compared field on which our Bundle and Microsoft's differ.

    ``ours`` / ``theirs`` are the compared values as the report shows them (None:
    the field is absent on that side, or the whole resource is). The resources
    themselves are kept for predicates that need context; they are not printed.
    """

    file: str
    message_type: str
    resource_type: str
    field: str
    ours: Any
    theirs: Any
    ours_resource: Mapping[str, Any] | None = dataclasses.field(
        default=None, compare=False, repr=False
    )
    theirs_resource: Mapping[str, Any] | None = dataclasses.field(
        default=None, compare=False, repr=False
    )

    @property
    def resource_missing(self) -> bool:
        """Microsoft has a resource we did not produce at all."""
        return self.ours_resource is None


def _always(d: Disagreement) -> bool:
    return True


@dataclass(frozen=True, slots=True)
class Pattern:
    id: str
    resource_type: str
    #: The compared field's name as in the report (``"*"``: any field).
    field: str
    verdict: Verdict
    reason: str
    reference: str = ""
    applies: Callable[[Disagreement], bool] = _always

    def matches(self, d: Disagreement) -> bool:
        return (
            self.resource_type in ("*", d.resource_type)
            and self.field in ("*", d.field)
            and self.applies(d)
        )


# --- what the source message says ---------------------------------------------------------------

SAMPLES: Final = (
    Path(__file__).resolve().parents[2].parent
    / "shared"
    / "corpus"
    / "microsoft-fhir-converter"
    / "data"
    / "SampleData"
    / "Hl7v2"
)


@functools.cache
def _segments(file: str) -> tuple[tuple[str, ...], ...]:
    """The corpus file's segments, split on ``|`` (MSH numbered like the others + 1)."""
    text = (SAMPLES / file).read_bytes().decode("utf-8", "replace").lstrip("\ufeff")
    lines = text.replace("\r\n", "\r").replace("\n", "\r").split("\r")
    return tuple(tuple(line.split("|")) for line in lines if len(line) > 3)


def source_values(file: str, *locations: str) -> frozenset[str]:
    """Every non-empty atom (component or subcomponent text, stripped) the message has at
    ``locations``: ``"GT1"`` (whole segment), ``"PID-19"`` (a field, every repetition),
    ``"PID-5.15"`` (one component of every repetition), ``"PID-3.4.3"`` (a subcomponent)."""
    found: set[str] = set()
    for location in locations:
        name, _, rest = location.partition("-")
        field_no, _, comp = rest.partition(".")
        comp, _, sub = comp.partition(".")
        for seg in _segments(file):
            if seg[0] != name:
                continue
            if not field_no:
                fields = list(seg[1:])
            else:
                n = int(field_no) - (1 if name == "MSH" else 0)
                fields = [seg[n]] if n < len(seg) else []
            for value in fields:
                for rep in value.split("~"):
                    parts = rep.split("^")
                    if comp:
                        c = int(comp)
                        parts = [parts[c - 1]] if c <= len(parts) else []
                    for part in parts:
                        subs = part.split("&")
                        if sub:
                            subs = [subs[int(sub) - 1]] if int(sub) <= len(subs) else []
                        found.update(x.strip() for x in subs if x.strip())
    return frozenset(found)


def _xtn_area_local(file: str, segment: str, *fields: int) -> set[str]:
    """XTN-6 + XTN-7 (area code and local number, joined) of the given fields."""
    found = set()
    for seg in _segments(file):
        if seg[0] != segment:
            continue
        for n in fields:
            for rep in (seg[n] if n < len(seg) else "").split("~"):
                parts = rep.split("^")
                if len(parts) >= 7 and parts[6].strip():
                    found.add(parts[5].strip() + parts[6].strip())
    return found


# --- predicates -------------------------------------------------------------------------------


def _as_set(value: Any) -> set[str]:
    if isinstance(value, (list, tuple, set, frozenset)):
        return {str(v) for v in value}
    return set() if value is None else {str(value)}


def theirs_extra_from(*locations: str) -> Callable[[Disagreement], bool]:
    """Microsoft has everything we have, plus values that come only from ``locations``."""

    def check(d: Disagreement) -> bool:
        ours, theirs = _as_set(d.ours), _as_set(d.theirs)
        extra = theirs - ours
        return bool(extra) and ours <= theirs and extra <= source_values(d.file, *locations)

    return check


def ours_lacks_from(*locations: str) -> Callable[[Disagreement], bool]:
    """Microsoft has a value the IG maps from ``locations`` and we do not."""

    def check(d: Disagreement) -> bool:
        missing = _as_set(d.theirs) - _as_set(d.ours)
        return bool(missing & source_values(d.file, *locations))

    return check


def ours_only_from(*locations: str) -> Callable[[Disagreement], bool]:
    """We have a value from ``locations`` Microsoft does not."""

    def check(d: Disagreement) -> bool:
        extra = _as_set(d.ours) - _as_set(d.theirs)
        return bool(extra & source_values(d.file, *locations))

    return check


def values_are(ours: Any, theirs: Any) -> Callable[[Disagreement], bool]:
    def check(d: Disagreement) -> bool:
        return bool(d.ours == ours and d.theirs == theirs)

    return check


def all_of(*checks: Callable[[Disagreement], bool]) -> Callable[[Disagreement], bool]:
    def check(d: Disagreement) -> bool:
        return all(c(d) for c in checks)

    return check


#: HL7 table 0085 → Observation.status, as the IG's table-hl70085-to-observation-status map.
OBSERVATION_STATUS_0085: Final = {
    "A": "amended",
    "C": "corrected",
    "D": "entered-in-error",
    "F": "final",
    "I": "registered",
    "P": "preliminary",
    "S": "preliminary",
    "W": "entered-in-error",
    "X": "cancelled",
}


def _status_from_0085(location: str) -> Callable[[Disagreement], bool]:
    """Ours is what the IG's 0085 map gives for a code at ``location``; theirs is 'unknown'."""

    def check(d: Disagreement) -> bool:
        mapped = {OBSERVATION_STATUS_0085.get(c) for c in source_values(d.file, location)}
        return d.theirs == "unknown" and d.ours in mapped

    return check


def has_segment(*names: str) -> Callable[[Disagreement], bool]:
    def check(d: Disagreement) -> bool:
        return any(seg[0] in names for seg in _segments(d.file))

    return check


def family(*codes: str) -> Callable[[Disagreement], bool]:
    """The message's MSH-9.1 is one of ``codes``."""

    def check(d: Disagreement) -> bool:
        return d.message_type.split("^", 1)[0] in codes

    return check


def missing(d: Disagreement) -> bool:
    """Microsoft has the resource, we produced none that pairs with it."""
    return d.resource_missing


def _their_codes(d: Disagreement, element: str) -> set[str]:
    concept = (d.theirs_resource or {}).get(element)
    if not isinstance(concept, Mapping):
        return set()
    codes = {str(c.get("code", "")).strip() for c in concept.get("coding") or []}
    if concept.get("text"):
        codes.add(str(concept["text"]).strip())
    return codes - {""}


def their_code_from(element: str, *locations: str) -> Callable[[Disagreement], bool]:
    """Microsoft's resource's ``element`` codes come from ``locations`` of the message."""

    def check(d: Disagreement) -> bool:
        return bool(_their_codes(d, element) & source_values(d.file, *locations))

    return check


def their_identifier_from(*locations: str) -> Callable[[Disagreement], bool]:
    def check(d: Disagreement) -> bool:
        values = {
            str(i.get("value", "")).strip()
            for i in (d.theirs_resource or {}).get("identifier") or []
            if isinstance(i, Mapping)
        }
        return bool(values & source_values(d.file, *locations))

    return check


def their_family_name_from(*locations: str) -> Callable[[Disagreement], bool]:
    def check(d: Disagreement) -> bool:
        names = (d.theirs_resource or {}).get("name") or []
        families = {str(n.get("family", "")).strip() for n in names if isinstance(n, Mapping)}
        return bool(families & source_values(d.file, *locations))

    return check


def their_person_from(segment: str, field_no: int) -> Callable[[Disagreement], bool]:
    """Microsoft's resource has a name whose family AND first given name are those of an
    XPN repetition of ``segment``-``field_no`` (a family name alone is too weak: NK1 and
    GT1 often share the patient's family name)."""

    def check(d: Disagreement) -> bool:
        theirs: set[tuple[str, str]] = set()
        for n in (d.theirs_resource or {}).get("name") or []:
            if isinstance(n, Mapping):
                given = n.get("given") or [""]
                theirs.add((str(n.get("family", "")).strip(), str(given[0]).strip()))
        source: set[tuple[str, str]] = set()
        for seg in _segments(d.file):
            if seg[0] == segment and field_no < len(seg):
                for rep in seg[field_no].split("~"):
                    parts = [*rep.split("^"), ""]
                    source.add((parts[0].split("&")[0].strip(), parts[1].strip()))
        return bool(theirs & source)

    return check


def their_code_system_is(system: str) -> Callable[[Disagreement], bool]:
    def check(d: Disagreement) -> bool:
        concept = (d.theirs_resource or {}).get("code")
        if not isinstance(concept, Mapping):
            return False
        return any(str(c.get("system", "")).endswith(system) for c in concept.get("coding") or [])

    return check


def hd3_as_system(d: Disagreement) -> bool:
    """Every identifier whose system differs has Microsoft's system named after an HD-3
    (universal ID type: ISO, HCD, DNS...) of the message's CX-4 authorities."""
    ours, theirs = _as_set(d.ours), _as_set(d.theirs)
    types = source_values(d.file, "PID-3.4.3", "PID-2.4.3", "PID-4.4.3")
    differing = theirs - ours
    return (
        bool(differing)
        and all(t.rsplit(" → name:", 1)[-1] in types for t in differing if " → name:" in t)
        and all(" → name:" in t for t in differing)
    )


def codes_without_system(d: Disagreement) -> bool:
    """Same codes; Microsoft gives no system where we name the HL7 table's."""
    ours, theirs = _as_set(d.ours), _as_set(d.theirs)
    if not ours or not theirs or not all(t.startswith("|") for t in theirs - ours):
        return False
    return {o.split("|", 1)[-1] for o in ours} == {t.split("|", 1)[-1] for t in theirs}


def _digits(value: str) -> str:
    """The digits of a date/time, to compare a FHIR dateTime with the DTM it came from."""
    return re.sub(r"\D", "", value)


def _count_fields(file: str, *locations: str) -> int:
    """How many of the fields at ``locations`` (``"PV1-3"``) are valued, per segment."""
    found = 0
    for location in locations:
        name, _, number = location.partition("-")
        for seg in _segments(file):
            n = int(number)
            if seg[0] == name and n < len(seg) and seg[n].strip() not in ("", '""'):
                found += 1
    return found


#: Encounter.location comes from these (IG: PV1[Encounter] and PV2[Encounter] maps).
ENCOUNTER_LOCATIONS: Final = ("PV1-3", "PV1-6", "PV1-11", "PV1-42", "PV1-43", "PV2-1")


def _location_count_is(side: str) -> Callable[[Disagreement], bool]:
    """``side`` (ours/theirs) has as many Encounter.location as the IG's maps give."""

    def check(d: Disagreement) -> bool:
        expected = _count_fields(d.file, *ENCOUNTER_LOCATIONS)
        mine, other = (d.ours, d.theirs) if side == "ours" else (d.theirs, d.ours)
        return bool(mine == expected and other != expected)

    return check


def _sch_participants(d: Disagreement) -> bool:
    """We have exactly the SCH-12/16/20 persons more than Microsoft."""
    if not isinstance(d.ours, int) or not isinstance(d.theirs, int):
        return False
    extra = _count_fields(d.file, "SCH-12", "SCH-16", "SCH-20")
    return extra > 0 and d.ours - d.theirs == extra


def _from_later_pv1(d: Disagreement) -> bool:
    """Microsoft's Encounter carries the visit number (PV1-19) of a PV1 that is not the
    message's first: in OML^O21 that is a PRIOR_RESULT visit."""
    pv1s = [seg for seg in _segments(d.file) if seg[0] == "PV1"]
    later = {
        x.strip() for seg in pv1s[1:] if len(seg) > 19 for x in seg[19].split("^")[:1] if x.strip()
    }
    values = {
        str(i.get("value", "")).strip()
        for i in (d.theirs_resource or {}).get("identifier") or []
        if isinstance(i, Mapping)
    }
    return bool(values & later)


#: Segments the IG (STU1) has no map for, or only one "under construction" (its segment
#: inventory): what Microsoft takes from them is its own choice.
NOT_IN_IG: Final = ("GT1", "IN2", "DB1", "ACC", "IN3")

# --- the table -----------------------------------------------------------------------------------

#: Ordered: the first match wins, so narrow patterns come before broad ones ("ours wrong"
#: mostly first; a "theirs" pattern that carves an exception out of one precedes it).
PATTERNS: tuple[Pattern, ...] = (
    # --- ours wrong ---------------------------------------------------------------------------
    Pattern(
        "xtn-12-is-the-value",
        "Patient",
        "telecom.value",
        "ours wrong",
        "XTN-12 (unformatted telephone number) is ContactPoint.value when valued; XTN-1 is "
        "used only when XTN-7 and XTN-12 are empty. We put XTN-1 (fix in datatypes.contact_point).",
        ig("datatype-xtn-to-contactpoint"),
        ours_lacks_from("PID-13.12", "PID-14.12", "PID-40.12"),
    ),
    Pattern(
        "pid-40-telecom",
        "Patient",
        "telecom.value",
        "ours wrong",
        "PID-40 (Patient Telecommunication Information, v2.7+) maps to Patient.telecom; we "
        "do not read it.",
        ig("segment-pid-to-patient"),
        ours_lacks_from("PID-40"),
    ),
    # Whole resources Microsoft makes from segments our family mapper does not read.
    Pattern(
        "oml-prior-result-visit",
        "Encounter",
        "*",
        "theirs non-standard",
        "Microsoft makes an Encounter of each PV1 of the OML^O21 PRIOR_RESULT groups (visits "
        "of earlier results); the IG's OML_O21 map gives those PV1 no target: only the "
        "PATIENT_VISIT PV1 is the order's Encounter.",
        ig("message-oml-o21-to-bundle"),
        all_of(missing, family("OML"), _from_later_pv1),
    ),
    Pattern(
        "pv1-encounter-not-mapped",
        "Encounter",
        "*",
        "ours wrong",
        "The message has a PV1 and we made no Encounter. The IG's message maps (ORU_R01, "
        "ORM_O01, OML_O21, ADT_A01/A04/A08) create an Encounter from PV1 in every family "
        "that carries the segment (VXU_V04: optional, judged apart).",
        ig("segment-pv1-to-encounter"),
        all_of(missing, has_segment("PV1"), lambda d: not family("VXU")(d)),
    ),
    Pattern(
        "nk1-related-person-not-mapped",
        "RelatedPerson",
        "*",
        "ours wrong",
        "Microsoft's RelatedPerson is an NK1 (next of kin) we did not map; the message maps "
        "create a RelatedPerson per NK1 (OML_O21, VXU_V04, ADT_A01...).",
        ig("segment-nk1-to-relatedperson"),
        all_of(missing, their_person_from("NK1", 2)),
    ),
    Pattern(
        "al1-allergy-not-mapped",
        "AllergyIntolerance",
        "*",
        "ours wrong",
        "The message has an AL1 we did not map; the IG maps AL1 to AllergyIntolerance in "
        "every message structure that carries it (ADT_A01, OML_O21, ORM_O01...).",
        ig("segment-al1-to-allergyintolerance"),
        all_of(missing, has_segment("AL1")),
    ),
    Pattern(
        "dg1-condition-not-mapped",
        "Condition",
        "*",
        "ours wrong",
        "Microsoft's Condition is a DG1 diagnosis we did not map (DG1 → Condition).",
        ig("segment-dg1-to-condition"),
        all_of(missing, their_code_from("code", "DG1-3")),
    ),
    Pattern(
        "in1-coverage-not-mapped",
        "Coverage",
        "*",
        "ours wrong",
        "The message has an IN1 we did not map (IN1 → Coverage; OML_O21 and ADT maps).",
        ig("segment-in1-to-coverage"),
        all_of(missing, has_segment("IN1")),
    ),
    Pattern(
        "obx-observation-not-mapped",
        "Observation",
        "*",
        "ours wrong",
        "Microsoft's Observation is an OBX (code from OBX-3) we made no Observation of; the "
        "message maps (ADT_A01, ORM/OML order detail, SIU) map OBX to Observation.",
        ig("segment-obx-to-observation"),
        all_of(missing, their_code_from("code", "OBX-3"), lambda d: not family("MDM")(d)),
    ),
    Pattern(
        "obr-orc-service-request-not-mapped",
        "ServiceRequest",
        "*",
        "ours wrong",
        "Microsoft's ServiceRequest is an ORC/OBR order (placer/filler number or OBR-4 code) "
        "that we made no ServiceRequest of (ORC/OBR → ServiceRequest).",
        ig("segment-obr-to-servicerequest"),
        all_of(
            missing,
            lambda d: not family("VXU")(d),
            lambda d: (
                their_identifier_from("ORC-2", "ORC-3", "OBR-2", "OBR-3")(d)
                or their_code_from("code", "OBR-4")(d)
            ),
        ),
    ),
    Pattern(
        "ais-service-request-not-mapped",
        "ServiceRequest",
        "*",
        "ours wrong",
        "Microsoft's ServiceRequest is an SIU AIS service (AIS-3) we made none of; the IG "
        "has an AIS → ServiceRequest map beside AIS → Appointment.",
        ig("segment-ais-to-servicerequest"),
        all_of(missing, family("SIU"), their_code_from("code", "AIS-3")),
    ),
    Pattern(
        "oru-obr-report-not-mapped",
        "DiagnosticReport",
        "*",
        "ours wrong",
        "An ORU OBR with no DiagnosticReport of ours (ORU_R01: OBR → DiagnosticReport).",
        ig("segment-obr-to-diagnosticreport"),
        all_of(missing, family("ORU"), their_code_from("code", "OBR-4")),
    ),
    Pattern(
        "in1-16-insured-not-mapped",
        "RelatedPerson",
        "*",
        "ours wrong",
        "Microsoft's RelatedPerson is the IN1-16 insured (IN1-17 not self); the IG's IN1 map "
        "makes it the Coverage.subscriber RelatedPerson, which we do not create.",
        ig("segment-in1-to-coverage"),
        all_of(missing, their_family_name_from("IN1-16")),
    ),
    Pattern(
        "pid-21-mother-not-mapped",
        "RelatedPerson",
        "*",
        "ours wrong",
        "Microsoft's RelatedPerson (relationship MTH) carries PID-21 (mother's identifier); "
        "the IG's PID map sends PID-21 to a mother RelatedPerson (CX[RelatedPerson-Mother]). "
        "PID-21 is read by nobody on our side (it is in hl7unmapped).",
        ig("segment-pid-to-patient"),
        all_of(missing, their_identifier_from("PID-21")),
    ),
    Pattern(
        "encounter-locations",
        "Encounter",
        "location.count",
        "ours wrong",
        "Encounter.location should hold one entry per valued PV1-3 (assigned), PV1-6 "
        "(prior), PV1-11 (temporary), PV1-42 (pending), PV1-43 (prior temporary) and PV2-1 "
        "(prior pending); we have a different number.",
        ig("segment-pv1-to-encounter"),
        lambda d: isinstance(d.ours, int) and d.ours != _count_fields(d.file, *ENCOUNTER_LOCATIONS),
    ),
    Pattern(
        "order-identifiers",
        "ServiceRequest",
        "identifier.value",
        "ours wrong",
        "ORC-4 (placer group number, type PGN) and OBR-53 (alternate placer order number) "
        "are ServiceRequest identifiers in the IG's ORC and OBR maps; we do not carry them.",
        ig("segment-orc-to-servicerequest"),
        all_of(lambda d: not d.resource_missing, ours_lacks_from("ORC-4", "OBR-53")),
    ),
    Pattern(
        "pid-21-mother-merged-into-nk1",
        "RelatedPerson",
        "relationship",
        "theirs non-standard",
        "Microsoft merges the PID-21 mother (identifier PID-21, relationship MTH) into the "
        "NK1 RelatedPerson (same resource id; in these messages the NK1 is the patient's "
        "child, NK1-3 CHD, so the merged person is both child and mother). The IG's PID map "
        "sends PID-21 to a RelatedPerson of its own (CX[RelatedPerson-Mother], relationship "
        "MTH) and the NK1 map makes the NK1 person; we keep the two apart, so our NK1 "
        "RelatedPerson lacks MTH and the mother is one of our RelatedPersons that pairs "
        "with nothing of theirs.",
        ig("segment-pid-to-patient"),
        lambda d: (
            not d.resource_missing
            and _as_set(d.theirs) - _as_set(d.ours)
            == {"http://terminology.hl7.org/CodeSystem/v3-RoleCode|MTH"}
            and _as_set(d.ours) <= _as_set(d.theirs)
            and their_identifier_from("PID-21")(d)
            and their_person_from("NK1", 2)(d)
            and "MTH" not in source_values(d.file, "NK1-3")
        ),
    ),
    Pattern(
        "nk1-3-relationship-not-translated",
        "RelatedPerson",
        "relationship",
        "ours wrong",
        "NK1-3 (table 0063) goes through the IG's Relationship concept map to "
        "v3-RoleCode (CHD → CHILD, ...); we keep the v2 code untranslated.",
        ig("segment-nk1-to-relatedperson"),
        lambda d: (
            not d.resource_missing
            and any("v3-RoleCode|" in t for t in _as_set(d.theirs) - _as_set(d.ours))
        ),
    ),
    Pattern(
        "iam-allergy-not-mapped",
        "AllergyIntolerance",
        "*",
        "ours wrong",
        "The message has an IAM (ADT^A60 adverse reaction) we did not map; the IG maps IAM "
        "to AllergyIntolerance.",
        ig("segment-iam-to-allergyintolerance"),
        all_of(missing, has_segment("IAM")),
    ),
    Pattern(
        "iam-reporter-not-mapped",
        "RelatedPerson",
        "*",
        "ours wrong",
        "Microsoft's RelatedPerson is the IAM-14 'reported by' person (relationship IAM-15); "
        "the IG's IAM map makes it the allergy's asserter. We do not map IAM.",
        ig("segment-iam-to-allergyintolerance"),
        all_of(missing, their_family_name_from("IAM-14")),
    ),
    Pattern(
        "orc-21-ordering-facility",
        "ServiceRequest",
        "requester",
        "ours wrong",
        "ORC-21/22/23 (ordering facility name, address, phone) make the requester's "
        "PractitionerRole.organization in the IG's ORC map; we leave ORC-21 unread and the "
        "ServiceRequest without a requester.",
        ig("segment-orc-to-servicerequest"),
        lambda d: d.ours is None and d.theirs is True and bool(source_values(d.file, "ORC-21")),
    ),
    # --- theirs non-standard -----------------------------------------------------------------
    Pattern(
        "pv1-44-is-period-start",
        "Encounter",
        "period.start",
        "theirs non-standard",
        "PV1-44 (admit date/time) is Encounter.period.start; Microsoft prefers PV2-8 "
        "(expected admit date/time) when both are valued.",
        ig("segment-pv1-to-encounter"),
        lambda d: (
            isinstance(d.ours, str)
            and _digits(d.ours) in {_digits(v) for v in source_values(d.file, "PV1-44")}
        ),
    ),
    Pattern(
        "obx-dt-value-dropped",
        "Observation",
        "value",
        "theirs non-standard",
        "OBX-2 = DT/DTM/TS: the IG maps OBX-5 to valueDateTime; Microsoft drops the value.",
        ig("segment-obx-to-observation"),
        lambda d: (
            d.theirs is None
            and isinstance(d.ours, Mapping)
            and "DateTime" in d.ours
            and bool(source_values(d.file, "OBX-2") & {"DT", "DTM", "TS"})
        ),
    ),
    Pattern(
        "obx-14-dropped",
        "Observation",
        "effective",
        "theirs non-standard",
        "OBX-14 (date/time of the observation) is effectiveDateTime; Microsoft drops it.",
        ig("segment-obx-to-observation"),
        lambda d: (
            d.theirs is None
            and isinstance(d.ours, str)
            and re.sub(r"\D", "", d.ours)[:8]
            in {re.sub(r"\D", "", v)[:8] for v in source_values(d.file, "OBX-14")}
        ),
    ),
    Pattern(
        "icdo-not-a-tho-system",
        "AllergyIntolerance",
        "code",
        "theirs non-standard",
        "AL1-3 names the coding system ICDO; Microsoft writes "
        "http://terminology.hl7.org/CodeSystem/icd-o, which HL7 Terminology does not define "
        "(it has icd-o-3 only, for ICDO3). We keep it as a local system named ICDO.",
        "https://terminology.hl7.org/CodeSystem-icd-o-3.html",
        lambda d: (
            any("CodeSystem/icd-o|" in t for t in _as_set(d.theirs))
            and any(o.startswith("local:ICDO|") for o in _as_set(d.ours))
        ),
    ),
    Pattern(
        "encounter-locations-theirs",
        "Encounter",
        "location.count",
        "theirs non-standard",
        "We have one Encounter.location per valued PV1-3, PV1-6, PV1-11, PV1-42, PV1-43 and "
        "PV2-1 (the IG's PV1/PV2 maps); Microsoft has a different number (it adds or drops "
        "locations, e.g. PV1-37 discharged-to, which the IG sends to hospitalization).",
        ig("segment-pv1-to-encounter"),
        _location_count_is("ours"),
    ),
    Pattern(
        "pv2-8-9-planned-dates",
        "Encounter",
        "*",
        "theirs non-standard",
        "Microsoft fills Encounter.period from PV2-8/PV2-9 (expected admit/discharge) when "
        "PV1-44/45 are empty; the IG maps PV2-8/9 to the plannedStartDate/"
        "plannedDischargeDate extensions, never to period.",
        ig("segment-pv2-to-encounter"),
        lambda d: (
            d.field in ("period.start", "period.end")
            and d.ours is None
            and not d.resource_missing
            and bool(source_values(d.file, "PV2-8", "PV2-9"))
            and not source_values(d.file, "PV1-44" if d.field == "period.start" else "PV1-45")
        ),
    ),
    Pattern(
        "sch-contacts-are-participants",
        "Appointment",
        "participant.count",
        "theirs non-standard",
        "The IG's SCH map makes SCH-12 (placer contact), SCH-16 (filler contact) and SCH-20 "
        "(entered by) Appointment participants; Microsoft leaves them out, we have them.",
        ig("segment-sch-to-appointment"),
        _sch_participants,
    ),
    Pattern(
        "obx-7-dropped",
        "Observation",
        "referenceRange.text",
        "theirs non-standard",
        "OBX-7 maps to referenceRange.text; Microsoft drops it (its ADT/SIU OBX template).",
        ig("segment-obx-to-observation"),
        lambda d: d.theirs is None and d.ours in source_values(d.file, "OBX-7"),
    ),
    Pattern(
        "pid-13-dropped",
        "Patient",
        "telecom.value",
        "theirs non-standard",
        "Microsoft's Patient has no telecom although PID-13/PID-14 are valued (numbers in "
        "XTN-6/7, or with an XTN-2 outside table 0201); the IG maps PID-13/14 to telecom.",
        ig("segment-pid-to-patient"),
        lambda d: d.theirs is None and bool(source_values(d.file, "PID-13", "PID-14")),
    ),
    Pattern(
        "xtn-6-7-number-dropped",
        "Patient",
        "telecom.value",
        "theirs non-standard",
        "A PID-13/PID-14 number given as XTN-6 area code + XTN-7 local number (no XTN-1/12): "
        "the IG's XTN map makes it ContactPoint.value; Microsoft drops it and keeps the "
        "other numbers.",
        ig("datatype-xtn-to-contactpoint"),
        lambda d: (
            bool(_as_set(d.ours) - _as_set(d.theirs))
            and _as_set(d.theirs) <= _as_set(d.ours)
            and (_as_set(d.ours) - _as_set(d.theirs)) <= _xtn_area_local(d.file, "PID", 13, 14)
        ),
    ),
    Pattern(
        "hd-3-as-identifier-system",
        "Patient",
        "identifier.system",
        "theirs non-standard",
        "Microsoft names the identifier system after CX-4.3 (HD-3, the universal ID *type*, "
        "e.g. HCD or ISO) instead of the assigning authority (HD-1 namespace, or HD-2 when it "
        "is an OID). The IG's CX map takes Identifier.system from CX-4 as an authority, never "
        "from its type code.",
        ig("datatype-cx-to-identifier"),
        hd3_as_system,
    ),
    Pattern(
        "siu-request-intent",
        "ServiceRequest",
        "intent",
        "undecidable",
        "SIU: the IG's AIS[ServiceRequest] map assigns no intent; we write 'order' (the "
        "request the appointment is booked for), Microsoft 'filler-order'.",
        ig("segment-ais-to-servicerequest"),
        all_of(family("SIU"), values_are("order", "filler-order")),
    ),
    Pattern(
        "orc-intent-is-order",
        "ServiceRequest",
        "intent",
        "theirs non-standard",
        "The IG's ORC map assigns ServiceRequest.intent = 'order'; Microsoft writes "
        "'filler-order' for ORU orders.",
        ig("segment-orc-to-servicerequest"),
        values_are("order", "filler-order"),
    ),
    Pattern(
        "orc-1-nw-is-active",
        "ServiceRequest",
        "status",
        "theirs non-standard",
        "ORC-5 empty, ORC-1 = NW (new order): the IG's order control map gives 'active'; "
        "Microsoft writes 'unknown'.",
        ig("table-hl70119-to-servicerequest-status"),
        all_of(
            values_are("active", "unknown"),
            lambda d: (
                source_values(d.file, "ORC-1") == {"NW"} and not source_values(d.file, "ORC-5")
            ),
        ),
    ),
    Pattern(
        "rp-obx-as-report",
        "DiagnosticReport",
        "*",
        "theirs non-standard",
        "Microsoft makes a DiagnosticReport of an OBX whose value is a reference pointer (RP); "
        "the IG's OBX map keeps an RP value on the Observation (valueAttachment extension).",
        ig("segment-obx-to-observation"),
        all_of(
            missing,
            family("ORU"),
            their_code_from("code", "OBX-3"),
            lambda d: not their_code_from("code", "OBR-4")(d),
        ),
    ),
    Pattern(
        "document-without-content",
        "DocumentReference",
        "content.contentType",
        "theirs non-standard",
        "Microsoft's DocumentReference has no content data and no contentType: the document "
        "body (OBX-5 of the MDM message) is not carried. The IG's OBX[DocumentReference] map "
        "puts it into content.attachment (data and contentType).",
        ig("segment-obx-to-documentreference"),
        lambda d: d.theirs is None and d.ours is not None,
    ),
    Pattern(
        "order-obr-as-report",
        "DiagnosticReport",
        "*",
        "theirs non-standard",
        "Microsoft makes a DiagnosticReport of each OBR of an order message (ORM/OML); the "
        "IG's OML_O21 and ORM_O01 maps make OBR a ServiceRequest only: no result exists yet.",
        ig("message-oml-o21-to-bundle"),
        all_of(missing, family("ORM", "OML")),
    ),
    Pattern(
        "xpn-15-called-by",
        "Patient",
        "name.given",
        "theirs non-standard",
        "XPN-15 (Called By) is a second HumanName with use=nickname, not one more given name "
        "of the first name; Microsoft appends it to name[0].given.",
        ig("datatype-xpn-to-humanname"),
        theirs_extra_from("PID-5.15"),
    ),
    Pattern(
        "hl70085-status",
        "Observation",
        "status",
        "theirs non-standard",
        "OBX-11 maps through the IG's table 0085 map (F final, P preliminary, I registered, "
        "C corrected, ...); Microsoft writes 'unknown' and keeps the v2 code in an extension.",
        ig("table-hl70085-to-observation-status"),
        _status_from_0085("OBX-11"),
    ),
    Pattern(
        "ais-3-is-the-request-identifier",
        "ServiceRequest",
        "identifier.value",
        "theirs non-standard",
        "SIU: the IG's AIS[ServiceRequest] map sends AIS-3 (universal service identifier) to "
        "ServiceRequest.identifier (CWE[Identifier]) as well as being the service; Microsoft "
        "gives the AIS ServiceRequest no identifier.",
        ig("segment-ais-to-servicerequest"),
        all_of(
            family("SIU"),
            lambda d: d.theirs is None and bool(ours_only_from("AIS-3.1")(d)),
        ),
    ),
    Pattern(
        "orc-1-ca-is-active",
        "ServiceRequest",
        "status",
        "theirs non-standard",
        "ORC-5 is empty, so ORC-1 decides (IG ORC map: ORC-1 → status IF ORC-5 NOT VALUED); "
        "the IG's OrderControlCode map sends CA (cancel order request: the placer asks, the "
        "order is not cancelled yet) to 'active'; only CR/OC (cancelled) are 'revoked'.",
        ig("table-hl70119-to-servicerequest-status"),
        all_of(
            values_are("active", "revoked"),
            lambda d: (
                "CA" in source_values(d.file, "ORC-1")
                and not source_values(d.file, "ORC-5") - {"CM", "SC", "IP", "A"}
            ),
        ),
    ),
    Pattern(
        "icd-9-is-icd-9-cm",
        "Condition",
        "code",
        "theirs non-standard",
        "DG1-3 coding system I9 (table 0396): 'http://hl7.org/fhir/sid/icd-9' is not a FHIR "
        "code system URI; FHIR R4's registry names http://hl7.org/fhir/sid/icd-9-cm for ICD-9 "
        "(and the 5-digit code, e.g. 71596, exists only in ICD-9-CM).",
        "https://hl7.org/fhir/R4/terminologies-systems.html",
        lambda d: (
            any("sid/icd-9|" in t for t in _as_set(d.theirs))
            and {t.split("|", 1)[-1] for t in _as_set(d.theirs)}
            == {o.split("|", 1)[-1] for o in _as_set(d.ours) if "sid/icd-9-cm|" in o}
        ),
    ),
    Pattern(
        "unnamed-coverage-related-person",
        "RelatedPerson",
        "*",
        "theirs non-standard",
        "Microsoft makes Coverage RelatedPersons that name nobody: a subscriber from IN1-17 "
        "alone (IN1-16 insured's name empty: the insured is not given) and an 'Employer' "
        "(v2-0131 E) policy holder from guarantor fields without the guarantor's name. The "
        "IG's IN1 map makes the subscriber RelatedPerson of the insured (IN1-16..19) only, "
        "and no v2 field makes the employer a related person.",
        ig("segment-in1-to-coverage"),
        lambda d: (
            d.resource_missing
            and isinstance(d.theirs_resource, Mapping)
            and not d.theirs_resource.get("name")
        ),
    ),
    # --- undecidable -----------------------------------------------------------------------------
    Pattern(
        "dg1-22-parent-diagnosis-condition",
        "Condition",
        "*",
        "undecidable",
        "Microsoft makes a second Condition with no code, only an identifier from DG1-22 "
        "(parent diagnosis, EI): a pointer to another diagnosis. The IG's DG1 map does not "
        "make a resource of DG1-22 (R4 Condition has no parent element); we leave it unread.",
        ig("segment-dg1-to-condition"),
        lambda d: (
            d.resource_missing
            and isinstance(d.theirs_resource, Mapping)
            and not d.theirs_resource.get("code")
            and has_segment("DG1")(d)
        ),
    ),
    Pattern(
        "siu-request-status",
        "ServiceRequest",
        "status",
        "undecidable",
        "SIU: the IG's AIS[ServiceRequest] map assigns no status; ours follows the "
        "appointment's (a cancelled or missed appointment revokes its request, a deleted one "
        "is entered in error, a booked one is active). Microsoft differs on some messages.",
        ig("segment-ais-to-servicerequest"),
        family("SIU"),
    ),
    Pattern(
        "snm3-is-not-snomed-ct",
        "AllergyIntolerance",
        "code",
        "undecidable",
        "Coding system SNM3 (table 0396) is SNOMED International (SNOMED 3), not SNOMED CT "
        "(SCT); the IG gives SNM3 no FHIR URI, we keep it as a local system, Microsoft puts "
        "the code under SNOMED CT (http://snomed.info/sct).",
        ig("segment-iam-to-allergyintolerance"),
        lambda d: (
            any("snomed.info/sct|" in t for t in _as_set(d.theirs))
            and any("SNM3|" in o for o in _as_set(d.ours))
        ),
    ),
    Pattern(
        "patient-data-from-unmapped-segments",
        "*",
        "*",
        "undecidable",
        "Microsoft adds to the Patient identifiers, phones and addresses found in GT1 (a "
        "guarantor who is the patient), IN2 (Medicare, Medicaid, military ids) and DB1. The IG "
        "STU1 has no map for these segments (GT1 and IN2 are 'under construction' in its "
        "segment inventory). We make a self guarantor the Account's guarantor party (the "
        "Patient) and keep PID as the Patient's only source: GT1's copy of the patient's "
        "details, DB1 and the rest of IN2 are listed in hl7unmapped.",
        ig("segment-pid-to-patient"),
        theirs_extra_from(*NOT_IN_IG),
    ),
    Pattern(
        "pda-acc-observations",
        "Observation",
        "*",
        "undecidable",
        "Microsoft makes Observations (death certificate, autopsy, coroner, injury incident) "
        "of PDA and ACC; the IG STU1 has no PDA map and its ACC map is 'under construction'.",
        ig("segment-obx-to-observation"),
        all_of(missing, their_code_system_is("observation-code"), has_segment("PDA", "ACC")),
    ),
    Pattern(
        "pda-death-cause-condition",
        "Condition",
        "*",
        "undecidable",
        "Microsoft makes a Condition of PDA-1 (death cause code); the IG STU1 has no PDA map.",
        ig("segment-dg1-to-condition"),
        all_of(missing, their_code_from("code", "PDA-1")),
    ),
    Pattern(
        "blg-billing-account",
        "Account",
        "*",
        "undecidable",
        "Microsoft makes an Account of BLG-3 (the account an order is to be charged to); the "
        "IG STU1 has no BLG map (its Account maps are PID[Account] and MRG[Account]). We "
        "leave BLG to hl7unmapped.",
        ig("segment-pid-to-account"),
        all_of(missing, their_identifier_from("BLG-3.1")),
    ),
    Pattern(
        "rf1-referral-request",
        "ServiceRequest",
        "*",
        "undecidable",
        "Microsoft makes a ServiceRequest of the RF1 referral; the IG STU1 has no RF1 map.",
        ig("segment-obr-to-servicerequest"),
        all_of(missing, their_identifier_from("RF1")),
    ),
    Pattern(
        "vxu-optional-order-and-visit",
        "*",
        "*",
        "undecidable",
        "VXU_V04: the IG creates the ServiceRequest (ORC) and the Encounter (PV1) 'only if "
        "the system wants to know about' the order or the encounter: optional.",
        ig("message-vxu-v04-to-bundle"),
        all_of(missing, family("VXU")),
    ),
    Pattern(
        "mdm-obx-as-observation",
        "Observation",
        "*",
        "undecidable",
        "MDM: Microsoft makes an Observation of each OBX of the document body; the IG has no "
        "MDM message map, and its OBX[DocumentReference] map carries such OBX as the "
        "document's content, which is what we do.",
        ig("segment-obx-to-documentreference"),
        all_of(missing, family("MDM")),
    ),
    Pattern(
        "mdm-obr-as-report",
        "DiagnosticReport",
        "*",
        "undecidable",
        "MDM: Microsoft makes a DiagnosticReport of the OBR; the IG has no MDM message map.",
        ig("segment-obr-to-diagnosticreport"),
        all_of(missing, family("MDM")),
    ),
    Pattern(
        "table-code-system-named",
        "*",
        "*",
        "undecidable",
        "Same code; the message gives no coding system (CWE-3 empty) for a field bound to an "
        "HL7 table: we name that table's code system, Microsoft leaves the system out. The "
        "IG's CWE map takes the system from CWE-3 only, so a code without it is what it says; "
        "a code without a system is, however, not interpretable.",
        ig("datatype-cwe-to-codeableconcept"),
        codes_without_system,
    ),
    Pattern(
        "no-orc-status",
        "ServiceRequest",
        "status",
        "undecidable",
        "The order has no ORC-5 and no ORC-1 (an ORU without ORC): the IG maps "
        "ServiceRequest.status from those only. We say 'unknown', Microsoft 'active'.",
        ig("segment-orc-to-servicerequest"),
        all_of(
            values_are("unknown", "active"),
            lambda d: not source_values(d.file, "ORC-1") and not source_values(d.file, "ORC-5"),
        ),
    ),
    Pattern(
        "rxa-6-999-unknown-amount",
        "Immunization",
        "doseQuantity.value",
        "undecidable",
        "RXA-6 = 999: the IG maps RXA-6 to doseQuantity.value as it stands; the CDC IIS guide "
        "defines 999 as 'amount unknown', which we leave out rather than record 999 mL.",
        ig("segment-rxa-to-immunization"),
        lambda d: d.ours is None and str(d.theirs) in ("999", "999.0"),
    ),
    Pattern(
        "obx-8-unknown-coding-system",
        "Observation",
        "interpretation",
        "undecidable",
        "OBX-8 names a coding system that is not table 0078 (HL7nnnn, HL): Microsoft maps the "
        "code through table 0078 anyway, we keep it as a local code. The IG's interpretation "
        "map applies to table 0078 codes; whether an unknown system means 0078 is the "
        "sender's to say.",
        ig("segment-obx-to-observation"),
        lambda d: any(str(o).startswith("local:") for o in _as_set(d.ours)),
    ),
    Pattern(
        "obx-11-o-order-detail",
        "Observation",
        "status",
        "undecidable",
        "OBX-11 = O (order detail, no result) has no Observation.status in the IG's table "
        "0085 map; we write 'registered', Microsoft 'unknown'.",
        ig("table-hl70085-to-observation-status"),
        lambda d: source_values(d.file, "OBX-11") == {"O"},
    ),
    Pattern(
        "parent-order-as-request",
        "ServiceRequest",
        "*",
        "undecidable",
        "Microsoft makes a ServiceRequest of the parent order (ORC-8 / OBR-29); the IG "
        "carries the parent's placer/filler numbers as an extension on basedOn, without "
        "saying whether a parent ServiceRequest resource is made.",
        ig("segment-orc-to-servicerequest"),
        all_of(missing, their_identifier_from("ORC-8", "OBR-29")),
    ),
    Pattern(
        "in1-36-policy-number",
        "Coverage",
        "subscriberId",
        "undecidable",
        "We put IN1-36 (policy number) into Coverage.subscriberId; the IG STU1 maps neither "
        "IN1-36 nor Coverage.subscriberId (IN1-49 goes to an R5 subscriberId extension).",
        ig("segment-in1-to-coverage"),
        lambda d: d.theirs is None and d.ours in source_values(d.file, "IN1-36"),
    ),
    Pattern(
        "obr-7-as-observation-time",
        "Observation",
        "effective",
        "undecidable",
        "OBX-14 is empty: we give the Observation the OBR-7 observation date/time of its "
        "order (as lab guides such as LRI do); the IG maps effective from OBX-14 only, and "
        "Microsoft leaves it out.",
        ig("segment-obx-to-observation"),
        lambda d: (
            d.theirs is None
            and isinstance(d.ours, str)
            and re.sub(r"\D", "", d.ours)[:12]
            in {re.sub(r"\D", "", v)[:12] for v in source_values(d.file, "OBR-7")}
        ),
    ),
    Pattern(
        "emc-contact-role",
        "RelatedPerson",
        "relationship",
        "undecidable",
        "EMC is neither a table 0063 nor a table 0131 code; Microsoft translates it to 0131 "
        "C (emergency contact), we keep it as sent.",
        ig("segment-nk1-to-relatedperson"),
        lambda d: (
            any(o.endswith("|EMC") for o in _as_set(d.ours))
            and "http://terminology.hl7.org/CodeSystem/v2-0131|C" in _as_set(d.theirs)
        ),
    ),
    Pattern(
        "oru-txa-document",
        "DocumentReference",
        "*",
        "undecidable",
        "Microsoft makes a DocumentReference of a TXA inside an ORU^R01; ORU_R01 has no TXA "
        "in the standard structure nor in the IG's message map.",
        ig("message-oru-r01-to-bundle"),
        all_of(missing, family("ORU"), has_segment("TXA")),
    ),
    Pattern(
        "obx-7-parsed-limits",
        "Observation",
        "referenceRange.low-high",
        "undecidable",
        "OBX-7 maps to referenceRange.text; the IG adds 'if OBX-7 is sufficiently parseable, "
        "low and high may be used'. We parse 'a-b' / 'a to b' into low/high as well; Microsoft "
        "keeps only the text. Both conform.",
        ig("segment-obx-to-observation"),
        lambda d: d.theirs is None and d.ours is not None,
    ),
)


def judge(d: Disagreement, patterns: tuple[Pattern, ...] | None = None) -> Pattern | None:
    """The first pattern that matches ``d``; None when it is unjudged."""
    for pattern in PATTERNS if patterns is None else patterns:
        if pattern.matches(d):
            return pattern
    return None


# --- resources only we produce ------------------------------------------------------------------
# Judged as a whole (``field`` "(resource)", ``ours_resource`` set, ``theirs_resource`` None):
# Microsoft has no resource of the type that pairs with ours.


def _ours_code(d: Disagreement) -> set[str]:
    concept = (d.ours_resource or {}).get("code")
    if not isinstance(concept, Mapping):
        return set()
    return {str(c.get("code", "")).strip() for c in concept.get("coding") or []} - {""}


def _obx_value_types(file: str, codes: set[str]) -> set[str]:
    """OBX-2 of the message's OBX segments whose OBX-3.1 is one of ``codes``."""
    return {
        seg[2]
        for seg in _segments(file)
        if seg[0] == "OBX" and len(seg) > 3 and seg[3].split("^", 1)[0] in codes
    }


def _ours_from_obx_of_type(*value_types: str) -> Callable[[Disagreement], bool]:
    def check(d: Disagreement) -> bool:
        found = _obx_value_types(d.file, _ours_code(d))
        return bool(found) and found <= set(value_types)

    return check


def _ours_family_in(*locations: str) -> Callable[[Disagreement], bool]:
    def check(d: Disagreement) -> bool:
        names = (d.ours_resource or {}).get("name") or [{}]
        family = str(names[0].get("family") or "").strip()
        return bool(family) and family in source_values(d.file, *locations)

    return check


def _ours_identifier_in(*locations: str) -> Callable[[Disagreement], bool]:
    def check(d: Disagreement) -> bool:
        values = {str(i.get("value", "")) for i in (d.ours_resource or {}).get("identifier") or []}
        return bool(values & source_values(d.file, *locations))

    return check


OURS_ONLY_PATTERNS: tuple[Pattern, ...] = (
    Pattern(
        "merge-prior-patient",
        "Patient",
        "(resource)",
        "theirs non-standard",
        "Merge/move messages (ADT A40, A41, A45, A47): we make the prior (non-surviving) "
        "Patient of each MRG and link it (replaced-by) as the IG's MRG segment map does; "
        "Microsoft keeps only the surviving Patient.",
        ig("segment-mrg-to-patient"),
        has_segment("MRG"),
    ),
    Pattern(
        "merge-prior-encounter",
        "Encounter",
        "(resource)",
        "undecidable",
        "Merge/move messages: we make an Encounter for the prior visit or account of MRG "
        "(MRG-3/5/6) besides the PV1 visit; Microsoft makes only the PV1 one. The IG's MRG "
        "map carries the prior identifiers but does not say whether a second Encounter is made.",
        ig("segment-mrg-to-patient"),
        has_segment("MRG"),
    ),
    Pattern(
        "merge-group-account",
        "Account",
        "(resource)",
        "undecidable",
        "A message with several patient groups (merges A40, A41, A45, A47): we make the "
        "Account of each group's PID-18 (the IG's PID[Account] map, applied to every PID); "
        "Microsoft makes the first group's only. The IG's merge message maps do not say.",
        ig("segment-pid-to-account"),
        has_segment("MRG"),
    ),
    Pattern(
        "attachment-obx-observation",
        "Observation",
        "(resource)",
        "theirs non-standard",
        "An OBX with an ED or RP value: the IG's OBX[Observation] map makes an Observation of "
        "every OBX of the order/result group (value as an attachment); Microsoft makes a "
        "DiagnosticReport (RP) or nothing (ED) of it.",
        ig("segment-obx-to-observation"),
        _ours_from_obx_of_type("ED", "RP"),
    ),
    Pattern(
        "obx-observation-microsoft-lacks",
        "Observation",
        "(resource)",
        "theirs non-standard",
        "An OBX the IG maps to Observation (OBX[Observation]; the OML_O21, ORU_R01 and "
        "VXU_V04 message maps map every OBX of their observation groups) for which "
        "Microsoft has no Observation with its OBX-3 code left to pair.",
        ig("segment-obx-to-observation"),
        lambda d: bool(_obx_value_types(d.file, _ours_code(d))) or not _ours_code(d),
    ),
    Pattern(
        "obr-request-microsoft-lacks",
        "ServiceRequest",
        "(resource)",
        "theirs non-standard",
        "An ORC/OBR order: the IG's OML_O21 message map makes a ServiceRequest of every "
        "OBR; Microsoft has none with its placer/filler number or OBR-4 code left to pair.",
        ig("segment-obr-to-servicerequest"),
        has_segment("OBR", "ORC"),
    ),
    Pattern(
        "dg1-condition-microsoft-lacks",
        "Condition",
        "(resource)",
        "theirs non-standard",
        "A DG1 of the order group: the IG's OML_O21 message map makes a Condition of it "
        "(ServiceRequest.reasonReference); Microsoft has none.",
        ig("segment-dg1-to-condition"),
        has_segment("DG1"),
    ),
    Pattern(
        "pid-21-mother-unnamed",
        "RelatedPerson",
        "(resource)",
        "theirs non-standard",
        "The mother's RelatedPerson from PID-21 (mother's identifier), as the IG's PID map "
        "makes it; Microsoft has no RelatedPerson carrying that identifier in this message.",
        ig("segment-pid-to-patient"),
        _ours_identifier_in("PID-21.1"),
    ),
    Pattern(
        "nk1-or-insured-microsoft-lacks",
        "RelatedPerson",
        "(resource)",
        "undecidable",
        "A RelatedPerson of an NK1 or of an IN1 insured (IN1-16): Microsoft has no "
        "RelatedPerson of that name left to pair (it makes one per distinct person where we "
        "make one per segment, or none).",
        ig("segment-nk1-to-relatedperson"),
        _ours_family_in("NK1-2.1", "IN1-16.1"),
    ),
)


def judge_ours_only(d: Disagreement) -> Pattern | None:
    """The verdict on a resource only we produce (see :data:`OURS_ONLY_PATTERNS`)."""
    return judge(d, OURS_ONLY_PATTERNS)
