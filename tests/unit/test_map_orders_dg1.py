"""DG1 inside ORM/OML order groups → Condition (bridge.normalize.families.orders):
orders whose detail is not a ServiceRequest (RXO, ODS, RQD) and the same DG1-20 in two
order groups. Hand-written v2.3, v2.5.1 and v2.8 messages and the corpus."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from fhir.resources.R4B.bundle import Bundle

from adapters.hl7v2.er7 import parse_message
from bridge.normalize import normalize

pytestmark = pytest.mark.timeout(30)

CORPUS = Path(__file__).resolve().parents[2].parent / "shared" / "corpus"
MS = CORPUS / "microsoft-fhir-converter"
SAMPLES = MS / "data" / "SampleData" / "Hl7v2"
EXPECTED = (
    MS
    / "src"
    / "Microsoft.Health.Fhir.Liquid.Converter.FunctionalTests"
    / "TestData"
    / "Expected"
    / "Hl7v2"
)

ICD10 = "http://hl7.org/fhir/sid/icd-10"
MSH_23 = "MSH|^~\\&|CPOE|GENHOSP|PHARM|GENHOSP|20240301083000-0500||ORM^O01|D1|P|2.3"
MSH_251 = "MSH|^~\\&|CPOE|GENHOSP|LAB|GENHOSP|20240301083000-0500||OML^O21^OML_O21|D2|P|2.5.1"
MSH_28 = "MSH|^~\\&|CPOE|GENHOSP|DIET|GENHOSP|20240301083000-0500||ORM^O01^ORM_O01|D3|P|2.8"
PID = "PID|1||12345^^^GENHOSP^MR||Doe^Jane||19800101|F"
PV1 = "PV1|1|O|CLIN^101^A"


def convert(*segments: str) -> tuple[dict[str, Any], tuple[str, ...]]:
    msg = parse_message("\r".join(segments).encode())
    result = normalize(msg, event_id="evt-dg1", source="urn:test")
    Bundle.model_validate(result.bundle)
    urls = {e["fullUrl"] for e in result.bundle["entry"]}
    text = orjson.dumps(result.bundle).decode()
    for part in text.split('"reference":"')[1:]:
        ref = part.split('"', 1)[0]
        if ref.startswith("urn:uuid:"):
            assert ref in urls
    return result.bundle, result.unmapped


def resources(bundle: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == kind]


def test_dg1_of_pharmacy_order_v23_becomes_condition() -> None:
    bundle, unmapped = convert(
        MSH_23,
        PID,
        PV1,
        "ORC|NW|RX100^CPOE",
        "RXO|00047040230^Ampicillin 250 mg caps^NDC|2||caps^capsule",
        "DG1|1||J18.9^Pneumonia, unspecified^I10|Pneumonia \\T\\ cough|20240228|A",
    )
    assert not resources(bundle, "ServiceRequest")
    (condition,) = resources(bundle, "Condition")
    assert condition["code"] == {
        "coding": [{"system": ICD10, "code": "J18.9", "display": "Pneumonia, unspecified"}],
        "text": "Pneumonia & cough",
    }
    assert condition["onsetDateTime"] == "2024-02-28"
    patient = resources(bundle, "Patient")[0]
    assert condition["subject"]["reference"] == f"urn:uuid:{patient['id']}"
    # The order itself (ORC, RXO) stays unmapped; the DG1 is carried, except DG1-6.
    assert {"ORC", "RXO"} <= set(unmapped)
    assert "DG1" not in unmapped
    assert not {"DG1-3", "DG1-4", "DG1-5"} & set(unmapped)
    assert "DG1-6" in unmapped
    focus = {f["reference"] for f in resources(bundle, "MessageHeader")[0]["focus"]}
    assert f"urn:uuid:{condition['id']}" in focus


def test_dg1_of_diet_order_v28_with_identifier_asserter_and_timezone() -> None:
    bundle, unmapped = convert(
        MSH_28,
        PID,
        PV1,
        "ORC|NW|D200^CPOE",
        "ODS|D||LOWSALT^Low salt diet^L",
        "DG1|1||I10^Essential hypertension^I10|Hypertension|202402281030+0530|F"
        "|||||||||1|900^Heart^Hal^^^Dr.|||202402281100+0530|DX-77^CPOE",
    )
    (condition,) = resources(bundle, "Condition")
    assert condition["code"]["coding"] == [
        {"system": ICD10, "code": "I10", "display": "Essential hypertension"}
    ]
    assert condition["onsetDateTime"] == "2024-02-28T10:30:00+05:30"
    assert condition["recordedDate"] == "2024-02-28T11:00:00+05:30"
    assert condition["identifier"][0]["value"] == "DX-77"
    asserter = resources(bundle, "Practitioner")
    assert condition["asserter"]["reference"] in {f"urn:uuid:{p['id']}" for p in asserter}
    assert "ODS" in unmapped
    assert not {"DG1-16", "DG1-19", "DG1-20"} & set(unmapped)


def test_same_dg1_identifier_in_two_orders_v251() -> None:
    """Two order groups carry DG1-20 = DX-1: identical content → one Condition both
    ServiceRequests give as reason; another onset → a Condition of its own."""
    dg1 = "DG1|1||E10.9^Diabetes mellitus type 1^I10|Diabetes|{onset}|F" + "|" * 14 + "DX-1"
    orders = [
        "ORC|NW|P1^CPOE",
        "OBR|1|P1^CPOE||57698-3^Lipid panel^LN",
        dg1.format(onset="20200501"),
        "ORC|NW|P2^CPOE",
        "OBR|1|P2^CPOE||4548-4^HbA1c^LN",
        dg1.format(onset="20200501"),
    ]
    bundle, _ = convert(MSH_251, PID, PV1, *orders)
    (condition,) = resources(bundle, "Condition")
    reasons = [sr["reasonReference"] for sr in resources(bundle, "ServiceRequest")]
    assert reasons == [[{"reference": f"urn:uuid:{condition['id']}"}]] * 2

    orders[-1] = dg1.format(onset="20180501")
    bundle, _ = convert(MSH_251, PID, PV1, *orders)
    conditions = resources(bundle, "Condition")
    assert [c["onsetDateTime"] for c in conditions] == ["2020-05-01", "2018-05-01"]
    assert {c["identifier"][0]["value"] for c in conditions} == {"DX-1"}
    first, second = resources(bundle, "ServiceRequest")
    assert first["reasonReference"] == [{"reference": f"urn:uuid:{conditions[0]['id']}"}]
    assert second["reasonReference"] == [{"reference": f"urn:uuid:{conditions[1]['id']}"}]


@pytest.mark.parametrize(
    ("name", "detail"),
    [("ORM-O01-04", "ODS"), ("ORM-O01-05", "RQD"), ("ORM-O01-06", "RXO")],
)
def test_corpus_dg1_of_non_service_request_orders(name: str, detail: str) -> None:
    msg = parse_message((SAMPLES / f"{name}.hl7").read_bytes())
    result = normalize(msg, event_id="evt-corpus", source="urn:test")
    Bundle.model_validate(result.bundle)
    assert detail in result.unmapped
    assert "DG1" not in result.unmapped
    (ours,) = resources(result.bundle, "Condition")
    data = orjson.loads((EXPECTED / "ORM_O01" / f"{name}-expected.json").read_bytes())
    (theirs,) = [
        e["resource"] for e in data["entry"] if e["resource"]["resourceType"] == "Condition"
    ]
    assert ours["code"]["coding"][0]["code"] == theirs["code"]["coding"][0]["code"] == "S06.9"
    assert ours["code"]["coding"][0]["system"] == ICD10
    assert ours["code"]["text"] == theirs["code"]["text"]
    assert ours["identifier"][0]["value"] == "DG1002"


def test_corpus_oml_o21_03_two_conditions_like_microsoft() -> None:
    msg = parse_message((SAMPLES / "OML-O21-03.hl7").read_bytes())
    result = normalize(msg, event_id="evt-corpus", source="urn:test")
    Bundle.model_validate(result.bundle)
    ours = sorted(c["onsetDateTime"] for c in resources(result.bundle, "Condition"))
    data = orjson.loads((EXPECTED / "OML_O21" / "OML-O21-03-expected.json").read_bytes())
    theirs = sorted(
        e["resource"]["onsetDateTime"]
        for e in data["entry"]
        if e["resource"]["resourceType"] == "Condition"
    )
    assert [o[:10] for o in ours] == [t[:10] for t in theirs] == ["2018-05-01", "2020-05-01"]
