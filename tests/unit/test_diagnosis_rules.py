"""bridge.diagnosis.rules: which diagnosis rules an event matches, on HL7 v2 events
mapped by the bridge (the corpus' LAB-ORU-1 and hand-written ORU^R01), FHIR-ingest
style message Bundles and single resources."""

from __future__ import annotations

from typing import Any

import pytest

from adapters.hl7v2.er7 import parse_message
from bridge.cluster.cluster_config import (
    CRITICAL_RESULTS,
    ClusterConfig,
    DiagnosisRule,
    RuleMatch,
    effective_rules,
)
from bridge.diagnosis.rules import EventFacts, Match, matching_rules
from bridge.events import hl7v2_event
from bridge.normalize import MappingOptions
from tests.unit.mapping_support import MS_SAMPLES

pytestmark = pytest.mark.timeout(30)

V3 = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
V2_0078 = "http://terminology.hl7.org/CodeSystem/v2-0078"
LOINC = "http://loinc.org"
TROPONIN = "10839-9"
LAB_ORU_1 = MS_SAMPLES / "LAB-ORU-1.hl7"

MSH = "MSH|^~\\&|LIS|LAB|EHR|HOSP|20240315083000-0500||ORU^R01^ORU_R01|C1|P|2.5.1"
PID = "PID|1||12345^^^HOSP^MR||Doe^Jane||19800101|F"
OBR = (
    "OBR|1|PL100^EHR|FL200^LIS|10839-9^Troponin I^LN|||20240315071500-0500"
    "||||||||||||||20240315090000-0500|||F"
)


def rule(name: str, priority: int = 5, **match: Any) -> DiagnosisRule:
    return DiagnosisRule(name=name, priority=priority, match=RuleMatch(**match))


def oru(flag: str, *, pv1: str | None = None) -> tuple[dict[str, Any], EventFacts]:
    """A hand-written ORU^R01 with one troponin OBX flagged ``flag``, mapped by the
    bridge: its data and the facts its attributes give."""
    segments = [MSH, PID, *([pv1] if pv1 else []), OBR]
    segments.append(f"OBX|1|NM|{TROPONIN}^Troponin I^LN||2.5|ng/mL|0.00-0.04|{flag}|||F")
    return mapped("\r".join(segments).encode())


def mapped(text: bytes) -> tuple[dict[str, Any], EventFacts]:
    event = hl7v2_event(parse_message(text), instance_id=None, mapping=MappingOptions())
    facts = EventFacts(message_type=event.event.hl7_message_type, source=event.event.source)
    return event.data, facts


def resources_of(data: dict[str, Any], resource_type: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in data["entry"] if e["resource"]["resourceType"] == resource_type]


def observation(
    rid: str | None,
    *,
    code: tuple[str | None, str] = (LOINC, TROPONIN),
    interpretation: tuple[str | None, str] | None = None,
) -> dict[str, Any]:
    coding = {"code": code[1]} | ({"system": code[0]} if code[0] else {})
    out: dict[str, Any] = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [coding]},
    }
    if rid is not None:
        out["id"] = rid
    if interpretation is not None:
        system, value = interpretation
        out["interpretation"] = [
            {"coding": [{"code": value} | ({"system": system} if system else {})]}
        ]
    return out


def fhir_message(*resources: dict[str, Any]) -> dict[str, Any]:
    """A FHIR-ingest style event: a message Bundle, MessageHeader then the resources."""
    entries = [
        {
            "fullUrl": f"http://fhir.example/fhir/{r['resourceType']}/{r.get('id', i)}",
            "resource": r,
        }
        for i, r in enumerate(resources)
    ]
    header = {
        "resourceType": "MessageHeader",
        "id": "mh-1",
        "eventCoding": {"system": "http://hl7.org/fhir/restful-interaction", "code": "create"},
        "source": {"endpoint": "urn:client"},
        "focus": [{"reference": e["fullUrl"]} for e in entries],
    }
    return {
        "resourceType": "Bundle",
        "id": "evt-1",
        "type": "message",
        "entry": [
            {"fullUrl": "urn:uuid:6d7f0c50-0000-4000-8000-000000000001", "resource": header},
            *entries,
        ],
    }


FHIR_FACTS = EventFacts(message_type=None, source="urn:client")


# --- the default rule -------------------------------------------------------------------


def test_the_default_rule_is_critical_results() -> None:
    assert effective_rules(ClusterConfig()) == [CRITICAL_RESULTS]
    assert CRITICAL_RESULTS.match.resource_type == "Observation"
    assert CRITICAL_RESULTS.match.interpretation == ["HH", "LL", "AA"]


def test_the_converted_lab_oru_1_has_no_critical_result() -> None:
    data, facts = mapped(LAB_ORU_1.read_bytes())
    assert facts == EventFacts("ORU^R01", "urn:hl7v2:SomeSystem:-")
    assert len(resources_of(data, "Observation")) == 10
    assert matching_rules([CRITICAL_RESULTS], data, facts) == []


def test_the_converted_lab_oru_1_with_a_result_flagged_ll_matches_that_observation() -> None:
    text = LAB_ORU_1.read_bytes()
    flagged = text.replace(b"4.06|tera.l-1||N|", b"4.06|tera.l-1||LL|")
    assert flagged != text
    data, facts = mapped(flagged)
    erythrocytes = next(
        o for o in resources_of(data, "Observation") if o["code"]["coding"][0]["code"] == "11273-0"
    )
    assert matching_rules([CRITICAL_RESULTS], data, facts) == [
        Match(CRITICAL_RESULTS, "Observation", erythrocytes["id"])
    ]


@pytest.mark.parametrize("flag", ["HH", "LL", "AA"])
def test_a_troponin_flagged_critical_matches(flag: str) -> None:
    data, facts = oru(flag)
    (troponin,) = resources_of(data, "Observation")
    assert troponin["interpretation"][0]["coding"][0] == {
        "system": V3,
        "code": flag,
        "display": troponin["interpretation"][0]["coding"][0]["display"],
    }
    assert matching_rules([CRITICAL_RESULTS], data, facts) == [
        Match(CRITICAL_RESULTS, "Observation", troponin["id"])
    ]


@pytest.mark.parametrize("flag", ["N", "H", "L", "A", ""])
def test_a_troponin_not_flagged_critical_does_not_match(flag: str) -> None:
    data, facts = oru(flag)
    assert matching_rules([CRITICAL_RESULTS], data, facts) == []


@pytest.mark.parametrize("system", [V3, V2_0078, None])
def test_a_fhir_ingest_observation_interpreted_ll_matches_in_any_system(
    system: str | None,
) -> None:
    data = fhir_message(observation("obs-1", interpretation=(system, "LL")))
    assert matching_rules([CRITICAL_RESULTS], data, FHIR_FACTS) == [
        Match(CRITICAL_RESULTS, "Observation", "obs-1")
    ]


def test_interpretation_codes_are_case_sensitive() -> None:
    data = fhir_message(observation("obs-1", interpretation=(V3, "ll")))
    assert matching_rules([CRITICAL_RESULTS], data, FHIR_FACTS) == []


def test_interpretation_is_read_on_observations_only() -> None:
    report = {
        "resourceType": "DiagnosticReport",
        "id": "dr-1",
        "interpretation": [{"coding": [{"code": "HH"}]}],
    }
    assert matching_rules([rule("r", interpretation=["HH"])], report, FHIR_FACTS) == []


# --- codes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (f"{LOINC}|{TROPONIN}", True),
        (TROPONIN, True),
        (f"http://other.example|{TROPONIN}", False),
        (f"{LOINC}|2160-0", False),
        ("2160-0", False),
    ],
)
def test_codes_with_and_without_a_system(entry: str, expected: bool) -> None:
    r = rule("troponin", resource_type="Observation", codes=[entry])
    data, facts = oru("N")
    (troponin,) = resources_of(data, "Observation")
    assert matching_rules([r], data, facts) == (
        [Match(r, "Observation", troponin["id"])] if expected else []
    )


def test_a_coding_without_a_system_matches_a_bare_code_only() -> None:
    data = fhir_message(observation("obs-1", code=(None, TROPONIN)))
    bare = rule("bare", codes=[TROPONIN])
    with_system = rule("with-system", codes=[f"{LOINC}|{TROPONIN}"])
    assert matching_rules([bare, with_system], data, FHIR_FACTS) == [
        Match(bare, "Observation", "obs-1")
    ]


def test_codes_of_any_resource_with_a_code_match() -> None:
    """The mapped ORU has the troponin code on the DiagnosticReport and ServiceRequest
    too: without resource_type, the first in Bundle order is named."""
    data, facts = oru("N")
    (report,) = resources_of(data, "DiagnosticReport")
    any_type = rule("any", codes=[TROPONIN])
    requests = rule("requests", resource_type="ServiceRequest", codes=[TROPONIN])
    (request,) = resources_of(data, "ServiceRequest")
    assert matching_rules([any_type, requests], data, facts) == [
        Match(any_type, "DiagnosticReport", report["id"]),
        Match(requests, "ServiceRequest", request["id"]),
    ]


def test_one_of_several_codes_suffices() -> None:
    r = rule("r", codes=["2160-0", f"{LOINC}|{TROPONIN}"])
    data = fhir_message(observation("obs-1"))
    assert matching_rules([r], data, FHIR_FACTS) == [Match(r, "Observation", "obs-1")]


# --- encounter class, message type, source -------------------------------------------------


def test_encounter_class() -> None:
    data, facts = oru("N", pv1="PV1|1|E|ER^1^1")
    (encounter,) = resources_of(data, "Encounter")
    assert encounter["class"]["code"] == "EMER"
    emergency = rule("emergency", encounter_class=["EMER", "IMP"])
    inpatient = rule("inpatient", encounter_class=["IMP"])
    assert matching_rules([emergency, inpatient], data, facts) == [
        Match(emergency, "Encounter", encounter["id"])
    ]


def test_encounter_class_needs_an_encounter() -> None:
    data, facts = oru("HH")
    assert resources_of(data, "Encounter") == []
    assert matching_rules([rule("r", encounter_class=["EMER"])], data, facts) == []


def test_encounter_class_with_resource_criteria_names_the_resource() -> None:
    data, facts = oru("HH", pv1="PV1|1|E|ER^1^1")
    (troponin,) = resources_of(data, "Observation")
    critical_in_er = rule("critical-er", interpretation=["HH"], encounter_class=["EMER"])
    assert matching_rules([critical_in_er], data, facts) == [
        Match(critical_in_er, "Observation", troponin["id"])
    ]
    data, facts = oru("HH", pv1="PV1|1|I|W^1^1")
    assert matching_rules([critical_in_er], data, facts) == []


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        (["ORU^R01"], True),
        (["ORU"], True),
        (["ADT", "ORU"], True),
        (["ORU^R30"], False),
        (["ADT^A01"], False),
        (["ORM"], False),
    ],
)
def test_message_type_exact_and_family(entries: list[str], expected: bool) -> None:
    r = rule("r", message_type=entries)
    data, facts = oru("N")
    assert facts.message_type == "ORU^R01"
    assert matching_rules([r], data, facts) == (
        [Match(r, "Bundle", data["id"])] if expected else []
    )


def test_message_type_never_matches_a_fhir_ingest_event() -> None:
    data = fhir_message(observation("obs-1", interpretation=(V3, "HH")))
    assert matching_rules([rule("r", message_type=["ORU"])], data, FHIR_FACTS) == []


def test_source() -> None:
    data, facts = oru("N")
    lab = rule("lab", source=["urn:other", "urn:hl7v2:LIS:LAB"])
    other = rule("other", source=["urn:hl7v2:LIS:OTHER"])
    assert matching_rules([lab, other], data, facts) == [Match(lab, "Bundle", data["id"])]
    assert matching_rules([lab], data, EventFacts("ORU^R01", None)) == []


# --- combining criteria -------------------------------------------------------------------


def test_every_criterion_given_must_hold() -> None:
    data, facts = oru("HH")
    (troponin,) = resources_of(data, "Observation")
    base: dict[str, Any] = {
        "resource_type": "Observation",
        "codes": [TROPONIN],
        "interpretation": ["HH"],
    }
    everything = rule("everything", **base, message_type=["ORU"], source=["urn:hl7v2:LIS:LAB"])
    assert matching_rules([everything], data, facts) == [
        Match(everything, "Observation", troponin["id"])
    ]
    one_offs: list[tuple[str, dict[str, Any]]] = [
        ("wrong-type", {"resource_type": "DiagnosticReport"}),
        ("wrong-code", {"codes": ["2160-0"]}),
        ("wrong-interpretation", {"interpretation": ["LL"]}),
        ("wrong-message", {"message_type": ["ADT"]}),
        ("wrong-source", {"source": ["urn:elsewhere"]}),
    ]
    for name, extra in one_offs:
        one_off = rule(name, **(base | {"message_type": ["ORU"]} | extra))
        assert matching_rules([one_off], data, facts) == [], name


def test_resource_criteria_must_hold_on_the_same_resource() -> None:
    data = fhir_message(
        observation("trop", code=(LOINC, TROPONIN), interpretation=(V3, "N")),
        observation("k", code=(LOINC, "2823-3"), interpretation=(V3, "HH")),
    )
    critical_troponin = rule("critical-troponin", codes=[TROPONIN], interpretation=["HH"])
    critical_potassium = rule("critical-potassium", codes=["2823-3"], interpretation=["HH"])
    assert matching_rules([critical_troponin, critical_potassium], data, FHIR_FACTS) == [
        Match(critical_potassium, "Observation", "k")
    ]


# --- shapes of data -------------------------------------------------------------------------


def test_a_single_resource_as_data() -> None:
    assert matching_rules(
        [CRITICAL_RESULTS], observation("obs-9", interpretation=(V3, "AA")), FHIR_FACTS
    ) == [Match(CRITICAL_RESULTS, "Observation", "obs-9")]
    assert matching_rules(
        [CRITICAL_RESULTS], observation(None, interpretation=(V3, "AA")), FHIR_FACTS
    ) == [Match(CRITICAL_RESULTS, "Observation", None)]
    assert matching_rules([CRITICAL_RESULTS], observation("obs-9"), FHIR_FACTS) == []


def test_a_bundle_inside_the_message_is_walked_one_level_deep() -> None:
    inner = {
        "resourceType": "Bundle",
        "id": "doc",
        "type": "collection",
        "entry": [{"resource": observation("inner-obs", interpretation=(V3, "LL"))}],
    }
    assert matching_rules([CRITICAL_RESULTS], fhir_message(inner), FHIR_FACTS) == [
        Match(CRITICAL_RESULTS, "Observation", "inner-obs")
    ]
    deeper = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": inner}]}
    assert matching_rules([CRITICAL_RESULTS], fhir_message(deeper), FHIR_FACTS) == []


def test_matches_follow_the_rules_order_one_per_rule() -> None:
    data = fhir_message(
        observation("a", interpretation=(V3, "HH")),
        observation("b", interpretation=(V3, "LL")),
    )
    low = rule("low", interpretation=["LL"])
    high = rule("high", interpretation=["HH"])
    none = rule("none", interpretation=["AA"])
    critical = rule("critical", interpretation=["LL", "HH"])
    assert matching_rules([low, none, critical, high], data, FHIR_FACTS) == [
        Match(low, "Observation", "b"),
        Match(critical, "Observation", "a"),
        Match(high, "Observation", "a"),
    ]
    assert [m.rule.name for m in matching_rules([high, low], data, FHIR_FACTS)] == [
        "high",
        "low",
    ]


def test_no_rules_no_matches() -> None:
    data, facts = oru("HH")
    assert matching_rules([], data, facts) == []


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"resourceType": 7},
        {"resourceType": "Bundle"},
        {"resourceType": "Bundle", "entry": "x"},
        {"resourceType": "Bundle", "entry": [None, 3, {"resource": "x"}, {"resource": {}}]},
        {
            "resourceType": "Bundle",
            "entry": [
                {"resource": {"resourceType": "Observation", "interpretation": "HH"}},
                {"resource": {"resourceType": "Observation", "interpretation": [None, {}]}},
                {"resource": {"resourceType": "Observation", "interpretation": [{"coding": 1}]}},
                {"resource": {"resourceType": "Observation", "code": ["HH"]}},
                {"resource": {"resourceType": "Encounter", "class": "EMER"}},
            ],
        },
    ],
)
def test_malformed_data_matches_nothing_and_never_raises(data: dict[str, Any]) -> None:
    rules = [
        CRITICAL_RESULTS,
        rule("codes", codes=["HH"]),
        rule("er", encounter_class=["EMER"]),
    ]
    assert matching_rules(rules, data, FHIR_FACTS) == []


def test_the_rules_of_a_new_configuration_are_read_afresh() -> None:
    """Rules are compiled once per object; a new configuration's rules are new objects."""
    data = fhir_message(observation("obs-1", interpretation=(V3, "HH")))
    assert matching_rules([rule("r", interpretation=["LL"])], data, FHIR_FACTS) == []
    again = rule("r", interpretation=["HH"])
    assert matching_rules([again], data, FHIR_FACTS) == [Match(again, "Observation", "obs-1")]
