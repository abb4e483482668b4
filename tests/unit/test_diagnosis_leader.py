"""The case opener's cheap pre-check: it must never skip an event a rule matches."""

from __future__ import annotations

import orjson
import pytest

from adapters.hl7v2.er7 import parse_message
from bridge.cluster.cluster_config import ClusterConfig, DiagnosisRule, RuleMatch, effective_rules
from bridge.diagnosis.leader import _might_match
from bridge.diagnosis.rules import EventFacts, matching_rules
from bridge.events import hl7v2_event
from bridge.normalize import MappingOptions

pytestmark = pytest.mark.timeout(30)


def event(flag: str) -> bytes:
    message = "\r".join(
        (
            "MSH|^~\\&|LAB|HOSP|EHR|HOSP|20240101120000+0100||ORU^R01^ORU_R01|C1|P|2.5.1",
            "PID|1||P1^^^HOSP^MR||DOE^JANE||19800101|F",
            "OBR|1|||10839-9^Troponin I.cardiac^LN",
            f"OBX|1|NM|10839-9^Troponin I.cardiac^LN||2.5|ng/mL|0.00-0.04|{flag}|||F",
        )
    )
    described = hl7v2_event(
        parse_message(message.encode()), instance_id="i", mapping=MappingOptions()
    )
    return orjson.dumps(described.data)


@pytest.mark.parametrize("flag", ["HH", "LL", "AA", "N", "H", ""])
def test_the_precheck_agrees_with_the_rules(flag: str) -> None:
    rules = effective_rules(ClusterConfig())
    raw = event(flag)
    matched = bool(matching_rules(rules, orjson.loads(raw), EventFacts("ORU^R01", "s")))
    assert _might_match(rules, raw) or not matched
    assert _might_match(rules, raw) == (flag in ("HH", "LL", "AA"))


def test_a_rule_without_codes_always_looks() -> None:
    rule = DiagnosisRule(name="all-oru", match=RuleMatch(message_type=["ORU"]))
    assert _might_match([rule], event("N"))


def test_codes_with_a_system_are_looked_for_by_their_code() -> None:
    rule = DiagnosisRule(name="trop", match=RuleMatch(codes=["http://loinc.org|10839-9"]))
    assert _might_match([rule], event("N"))
    other = DiagnosisRule(name="k", match=RuleMatch(codes=["http://loinc.org|2823-3"]))
    assert not _might_match([other], event("N"))
