"""Which diagnosis rules an event matches (pure, no I/O: it runs on every event).

:func:`matching_rules` takes the rules (:func:`bridge.cluster.cluster_config.
effective_rules`), the event's FHIR data and the :class:`EventFacts` taken from its
attributes, and returns one :class:`Match` per matching rule, in the rules' order.

What the event is made of: when ``data`` is a Bundle (every event of the bridge is
a ``message`` Bundle: MessageHeader, then the resources), its resources are those
of ``entry[*].resource``; an entry that is itself a Bundle (a document or
collection a FHIR client created) adds its own entries' resources too, one level
deep only. The top-level Bundle itself is the container, not one of the resources.
Any other resource given as ``data`` is the event's only resource. Data without a
``resourceType`` matches nothing. Malformed elements never raise: they just do not
match.

A rule matches when every criterion it gives holds (AND); within one criterion's
list any entry may hold (OR):

* resource-level criteria, which must all hold on ONE resource (an Observation
  with the code and another Observation with the interpretation do not match):

  - ``resource_type``: the resource's ``resourceType`` equals it;
  - ``codes``: some coding of the resource's ``code`` CodeableConcept (any
    resource that has one: Observation, DiagnosticReport, Condition,
    ServiceRequest, ...) has the code of an entry: ``system|code`` needs that
    system and code, a bare ``code`` matches in any system (or none);
  - ``interpretation``: some coding of some ``Observation.interpretation``
    CodeableConcept has one of the codes, in any system (v3-ObservationInterpretation
    and the older v2-0078 share HH, LL, AA, ...); codes are case-sensitive;

* ``encounter_class``: some Encounter of the event has ``class.code`` in the list
  (R4's Coding; an R5-style list of CodeableConcepts is read too);
* ``message_type``: :attr:`EventFacts.message_type` (``ce_hl7messagetype``) equals
  an entry (``ORU^R01``) or its family does (``ORU``); an event without one (FHIR
  ingest) never matches a rule that asks for a message type;
* ``source``: :attr:`EventFacts.source` (``ce_source``) is one of the entries.

Each :class:`Match` names a resource by type and id only (never a value): the
first resource, in Bundle order, that satisfied the resource-level criteria; for a
rule without any, the first Encounter whose class matched, else the event data
itself (the Bundle, or the single resource).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bridge.cluster.cluster_config import DiagnosisRule

__all__ = ["EventFacts", "Match", "matching_rules"]


@dataclass(frozen=True, slots=True)
class EventFacts:
    """What a rule can look at besides the data (from the event's attributes)."""

    #: ``ce_hl7messagetype``, e.g. ``ORU^R01``; None for FHIR-ingest events.
    message_type: str | None = None
    #: ``ce_source``, e.g. ``urn:hl7v2:LIS:LAB``.
    source: str | None = None


@dataclass(frozen=True, slots=True)
class Match:
    """A rule the event matched, and the resource that satisfied it (ids only)."""

    rule: DiagnosisRule
    resource_type: str
    resource_id: str | None


@dataclass(frozen=True, slots=True)
class _Compiled:
    """A rule's criteria as sets, built once per rule object."""

    rule: DiagnosisRule
    resource_type: str | None
    #: Codes of bare ``code`` entries (any system).
    bare_codes: frozenset[str]
    #: (system, code) of ``system|code`` entries.
    system_codes: frozenset[tuple[str, str]]
    interpretation: frozenset[str]
    encounter_class: frozenset[str]
    message_type: frozenset[str]
    source: frozenset[str]

    @property
    def resource_level(self) -> bool:
        return bool(
            self.resource_type is not None
            or self.bare_codes
            or self.system_codes
            or self.interpretation
        )


#: id(rule) → (rule, compiled); the rule is kept so its id cannot be reused meanwhile.
_COMPILED: dict[int, tuple[DiagnosisRule, _Compiled]] = {}
_COMPILED_MAX = 1024


def _compiled(rule: DiagnosisRule) -> _Compiled:
    found = _COMPILED.get(id(rule))
    if found is not None and found[0] is rule:
        return found[1]
    match = rule.match
    bare: set[str] = set()
    pairs: set[tuple[str, str]] = set()
    for entry in match.codes:
        system, bar, code = entry.partition("|")
        if bar:
            pairs.add((system, code))
        else:
            bare.add(entry)
    compiled = _Compiled(
        rule=rule,
        resource_type=match.resource_type,
        bare_codes=frozenset(bare),
        system_codes=frozenset(pairs),
        interpretation=frozenset(match.interpretation),
        encounter_class=frozenset(match.encounter_class),
        message_type=frozenset(match.message_type),
        source=frozenset(match.source),
    )
    if len(_COMPILED) >= _COMPILED_MAX:  # configurations replaced many times over
        _COMPILED.clear()
    _COMPILED[id(rule)] = (rule, compiled)
    return compiled


def matching_rules(
    rules: Sequence[DiagnosisRule], data: Mapping[str, Any], facts: EventFacts
) -> list[Match]:
    """The rules ``data`` matches, one :class:`Match` each, in the rules' order
    (semantics: the module docstring)."""
    if not isinstance(data, Mapping) or not isinstance(data.get("resourceType"), str):
        return []
    resources: list[Mapping[str, Any]] | None = None  # walked once, when a rule needs them
    out: list[Match] = []
    for rule in rules:
        criteria = _compiled(rule)
        if not _event_level_holds(criteria, facts):
            continue
        if resources is None:
            resources = list(_resources(data))
        found = _resource_matching(criteria, resources, data)
        if found is not None:
            out.append(Match(rule, str(found["resourceType"]), _id_of(found)))
    return out


def _event_level_holds(criteria: _Compiled, facts: EventFacts) -> bool:
    if criteria.source and facts.source not in criteria.source:
        return False
    if criteria.message_type:
        message_type = facts.message_type
        if message_type is None:
            return False
        if (
            message_type not in criteria.message_type
            and message_type.split("^", 1)[0] not in criteria.message_type
        ):
            return False
    return True


def _resource_matching(
    criteria: _Compiled, resources: Sequence[Mapping[str, Any]], data: Mapping[str, Any]
) -> Mapping[str, Any] | None:
    """The resource the match names, or None when the rule does not match."""
    encounter: Mapping[str, Any] | None = None
    if criteria.encounter_class:
        encounter = next(
            (
                r
                for r in resources
                if r["resourceType"] == "Encounter"
                and _encounter_class_in(r, criteria.encounter_class)
            ),
            None,
        )
        if encounter is None:
            return None
    if criteria.resource_level:
        return next((r for r in resources if _resource_holds(criteria, r)), None)
    return encounter if encounter is not None else data


def _resource_holds(criteria: _Compiled, resource: Mapping[str, Any]) -> bool:
    if criteria.resource_type is not None and resource["resourceType"] != criteria.resource_type:
        return False
    if (criteria.bare_codes or criteria.system_codes) and not _code_in(resource, criteria):
        return False
    return not criteria.interpretation or _interpretation_in(resource, criteria.interpretation)


def _code_in(resource: Mapping[str, Any], criteria: _Compiled) -> bool:
    for coding in _codings(resource.get("code")):
        code = coding.get("code")
        if not isinstance(code, str):
            continue
        if code in criteria.bare_codes:
            return True
        system = coding.get("system")
        if isinstance(system, str) and (system, code) in criteria.system_codes:
            return True
    return False


def _interpretation_in(resource: Mapping[str, Any], codes: frozenset[str]) -> bool:
    if resource["resourceType"] != "Observation":
        return False
    concepts = resource.get("interpretation")
    if not isinstance(concepts, list):
        return False
    return any(coding.get("code") in codes for c in concepts for coding in _codings(c))


def _encounter_class_in(encounter: Mapping[str, Any], codes: frozenset[str]) -> bool:
    value = encounter.get("class")
    if isinstance(value, Mapping):  # R4: a Coding
        return value.get("code") in codes
    if isinstance(value, list):  # R5: CodeableConcepts
        return any(coding.get("code") in codes for c in value for coding in _codings(c))
    return False


def _codings(concept: Any) -> Iterator[Mapping[str, Any]]:
    """The codings of a CodeableConcept (nothing for anything else)."""
    if not isinstance(concept, Mapping):
        return
    codings = concept.get("coding")
    if isinstance(codings, list):
        for coding in codings:
            if isinstance(coding, Mapping):
                yield coding


def _resources(data: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    """The event's resources (see the module docstring); each has a str resourceType."""
    if data["resourceType"] != "Bundle":
        yield data
        return
    for resource in _entry_resources(data):
        yield resource
        if resource["resourceType"] == "Bundle":
            yield from _entry_resources(resource)


def _entry_resources(bundle: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    entries = bundle.get("entry")
    if not isinstance(entries, list):
        return
    for entry in entries:
        if not isinstance(entry, Mapping):
            continue
        resource = entry.get("resource")
        if isinstance(resource, Mapping) and isinstance(resource.get("resourceType"), str):
            yield resource


def _id_of(resource: Mapping[str, Any]) -> str | None:
    rid = resource.get("id")
    return rid if isinstance(rid, str) else None
