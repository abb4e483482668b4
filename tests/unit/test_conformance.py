"""The conformance report's own logic: canonical values, pairing, comparison, judging."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conformance import judgements, report
from tests.conformance.judgements import Disagreement, Pattern, judge
from tests.conformance.report import (
    canon_datetime,
    canon_number,
    canon_system,
    compare_bundles,
)

pytestmark = pytest.mark.timeout(60)


def bundle(*resources: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "entry": [{"resource": r} for r in resources]}


def patient(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "resourceType": "Patient",
        "identifier": [{"system": "urn:oid:1.2.3", "value": "MRN1"}],
        "name": [{"family": "DOE", "given": ["JANE", "Q"]}],
        "birthDate": "1980-02-03",
        "gender": "female",
    }
    base.update(fields)
    return {k: v for k, v in base.items() if v is not None}


def observation(
    code: str, value: float | str, unit: str = "mg/dL", **fields: Any
) -> dict[str, Any]:
    found: dict[str, Any] = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
    }
    if isinstance(value, str):
        found["valueString"] = value
    else:
        found["valueQuantity"] = {"value": value, "unit": unit}
    found.update(fields)
    return found


# --- canonical values ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "equal"),
    [
        ("2011-01-04T04:04:28+05:30", "2011-01-03T22:34:28Z", True),
        ("2011-01-04T04:04:28+05:30", "2011-01-04T04:04:28+05:30", True),
        ("2011-01-04T04:04:28.4Z", "2011-01-04T04:04:28.400Z", True),
        ("2011-01-04T04:04:28+05:30", "2011-01-04T04:04:28", False),  # offset vs none
        ("2011-01-04", "2011-01-04T00:00:00Z", False),  # precision differs
        ("2011-01", "2011-01-01", False),
        ("2011-01-04T04:04", "2011-01-04T04:04:00", True),  # minutes carry :00 in FHIR
        ("2011-01-04", "2011-01-04", True),
    ],
)
def test_datetimes_are_equal_at_the_same_precision_and_instant(a: str, b: str, equal: bool) -> None:
    assert (canon_datetime(a) == canon_datetime(b)) is equal


def test_numbers_compare_by_value() -> None:
    assert canon_number(4.40) == canon_number("4.4") == canon_number(4.4)
    assert canon_number(100) == canon_number(100.0) == "100"
    assert canon_number(4.41) != canon_number(4.4)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("urn:oid:2.16.840.1.113883.6.1", "http://loinc.org"),
        ("http://unitsofmeasure.org/", "http://unitsofmeasure.org"),
        ("urn:oid:2.16.840.1.113883.12.203", "http://terminology.hl7.org/CodeSystem/v2-0203"),
        ("http://example.com/v2-to-fhir-converter/CodeSystem/CVX", "http://hl7.org/fhir/sid/cvx"),
        ("http://example.com/v2-to-fhir-converter/CodeSystem/L", "urn:hl7bridge:codesystem:L"),
        ("http://example.com/v2-to-fhir-converter/Identifier/MRN", "urn:hl7bridge:authority:MRN"),
        (
            "http://example.com/v2-to-fhir-converter/Identifier/NIST-MPI",
            "urn:hl7bridge:authority:NIST%20MPI",
        ),
    ],
)
def test_system_aliases_are_one_system(a: str, b: str) -> None:
    assert canon_system(a) == canon_system(b)


def test_different_systems_stay_different() -> None:
    assert canon_system("http://loinc.org") != canon_system("http://snomed.info/sct")
    assert canon_system("urn:hl7bridge:authority:A") != canon_system("urn:hl7bridge:codesystem:A")


# --- comparing bundles -----------------------------------------------------------------------


def test_equal_bundles_agree_on_every_compared_field() -> None:
    ours = bundle(patient(), observation("1-1", 4.40))
    theirs = bundle(patient(), observation("1-1", 4.4))
    result = compare_bundles(ours, theirs, file="a.hl7")
    assert result.disagreements == []
    # Patient: identifier value and system, family, given, birthDate, gender.
    assert result.tallies["Patient"].compared == 6
    assert result.tallies["Patient"].agreeing == 6
    # Observation: code, value, unit, status.
    assert result.tallies["Observation"].compared == 4
    assert result.tallies["Observation"].agreeing == 4


def test_a_different_value_is_one_disagreement_with_both_values() -> None:
    ours = bundle(patient(gender="male"))
    theirs = bundle(patient())
    result = compare_bundles(ours, theirs, file="a.hl7", message_type="ADT^A01")
    [d] = result.disagreements
    assert (d.file, d.message_type, d.resource_type, d.field) == (
        "a.hl7",
        "ADT^A01",
        "Patient",
        "gender",
    )
    assert (d.ours, d.theirs) == ("male", "female")
    assert result.tallies["Patient"].compared == 6
    assert result.tallies["Patient"].agreeing == 5


def test_a_field_missing_on_one_side_is_a_disagreement_and_absent_on_both_is_not_compared() -> None:
    ours = bundle(patient(birthDate=None))
    theirs = bundle(patient())
    [d] = compare_bundles(ours, theirs).disagreements
    assert (d.field, d.ours, d.theirs) == ("birthDate", None, "1980-02-03")
    both_absent = compare_bundles(bundle(patient(gender=None)), bundle(patient(gender=None)))
    assert both_absent.disagreements == []
    assert both_absent.tallies["Patient"].compared == 5


def test_dates_of_different_precision_disagree() -> None:
    result = compare_bundles(
        bundle(patient(birthDate="1980-02")), bundle(patient(birthDate="1980-02-03"))
    )
    assert [d.field for d in result.disagreements] == ["birthDate"]


def test_observations_pair_by_code_and_then_by_similarity() -> None:
    ours = bundle(observation("B", 2), observation("A", 1), observation("A", 5))
    theirs = bundle(observation("A", 5), observation("A", 1), observation("B", 2))
    result = compare_bundles(ours, theirs)
    assert result.disagreements == []
    assert result.tallies["Observation"].paired == 3


def test_a_resource_only_microsoft_has_counts_its_fields_as_disagreements() -> None:
    ours = bundle(observation("A", 1))
    theirs = bundle(observation("A", 1), observation("B", 2))
    result = compare_bundles(ours, theirs)
    tally = result.tallies["Observation"]
    assert tally.theirs_only == 1
    assert tally.ours_only == 0
    missing = result.disagreements
    assert {d.field for d in missing} == {"code", "value", "unit", "status"}
    assert all(d.ours is None and d.resource_missing for d in missing)
    assert tally.compared == 4 + 4
    assert tally.agreeing == 4


def test_a_resource_only_we_have_is_counted_but_not_compared() -> None:
    result = compare_bundles(
        bundle(observation("A", 1), observation("C", 3)), bundle(observation("A", 1))
    )
    tally = result.tallies["Observation"]
    assert (tally.ours_only, tally.compared, tally.agreeing) == (1, 4, 4)
    assert result.disagreements == []


def test_units_agree_when_unit_or_code_match() -> None:
    ours = observation("A", 1)
    ours["valueQuantity"] = {"value": 1, "unit": "milligram per deciliter", "code": "mg/dL"}
    result = compare_bundles(bundle(ours), bundle(observation("A", 1, unit="mg/dL")))
    assert result.disagreements == []


def test_identifier_systems_are_compared_on_values_both_have() -> None:
    ours = patient(identifier=[{"system": "urn:hl7bridge:authority:MR", "value": "1"}])
    theirs = patient(
        identifier=[
            {"system": "http://example.com/v2-to-fhir-converter/Identifier/MR", "value": "1"},
            {"system": "http://hl7.org/fhir/sid/us-ssn", "value": "2"},
        ]
    )
    result = compare_bundles(bundle(ours), bundle(theirs))
    assert [(d.field, d.ours, d.theirs) for d in result.disagreements] == [
        ("identifier.value", ["1"], ["1", "2"])
    ]


# --- judging -----------------------------------------------------------------------------------


def test_judge_takes_the_first_matching_pattern_and_leaves_others_unjudged() -> None:
    d = Disagreement("a.hl7", "ADT^A01", "Patient", "gender", "male", "female")
    patterns = (
        Pattern("other-field", "Patient", "birthDate", "undecidable", "x"),
        Pattern("narrow", "Patient", "gender", "ours wrong", "y", applies=lambda d: d.ours == "x"),
        Pattern("wide", "Patient", "*", "theirs non-standard", "z"),
    )
    found = judge(d, patterns)
    assert found is not None
    assert found.id == "wide"
    assert judge(d, patterns[:2]) is None


def test_summary_counts_agreement_and_verdicts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(judgements, "PATTERNS", ())
    result = report.MessageResult("a.hl7", 1, "ADT^A01", converted=True, resources=3)
    result.comparison = compare_bundles(
        bundle(patient(gender="male")), bundle(patient()), file="a.hl7"
    )
    summary = report.summarize([result])
    assert summary["agreement"]["overall"]["agreeing"] == 5
    assert summary["agreement"]["overall"]["compared"] == 6
    assert summary["agreement"]["by_type"]["Patient"]["percent"] == pytest.approx(83.33)
    assert sum(summary["verdicts"].values()) == 1
    markdown = report.render_markdown(summary)
    assert "| Patient | 5 / 6 | 83.3 % |" in markdown


def test_summary_separates_paired_agreement_unpaired_resources_and_overall(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """(a) agreement over paired resources, (b) unpaired resources per type with their
    verdicts, (c) the overall figure counting Microsoft-only fields as disagreements."""
    theirs_only = Pattern("ms-extra", "Observation", "*", "undecidable", "why")
    ours_only = Pattern("ours-extra", "Observation", "(resource)", "theirs non-standard", "ig")
    monkeypatch.setattr(judgements, "PATTERNS", (theirs_only,))
    monkeypatch.setattr(judgements, "OURS_ONLY_PATTERNS", (ours_only,))
    result = report.MessageResult("a.hl7", 1, "ORU^R01", converted=True, resources=3)
    result.comparison = compare_bundles(
        bundle(observation("A", 1), observation("C", 3)),
        bundle(observation("A", 2), observation("B", 2)),
        file="a.hl7",
    )
    summary = report.summarize([result])
    overall = summary["agreement"]["overall"]
    # (a): the paired A/A has 4 fields, the value differs.
    assert (overall["paired_agreeing"], overall["paired_compared"]) == (3, 4)
    assert overall["paired_percent"] == pytest.approx(75.0)
    # (c): B's 4 fields count as disagreements too.
    assert (overall["agreeing"], overall["compared"]) == (3, 8)
    # (b): one resource on each side, each judged.
    unpaired = summary["unpaired"]
    assert unpaired["by_type"]["Observation"] == {
        "only_theirs": {"undecidable": 1},
        "only_ours": {"theirs non-standard": 1},
    }
    assert {(p["side"], p["pattern"]) for p in unpaired["patterns"]} == {
        ("theirs", "ms-extra"),
        ("ours", "ours-extra"),
    }
    text = report.render_text(summary)
    assert "(a) paired-resource field agreement: 3/4 = 75.0 %" in text
    assert "(c) overall field agreement" in text
    markdown = report.render_markdown(summary)
    assert "## Resources on one side only" in markdown
    assert "(a) is 75.0 %, (c) is 37.5 %; neither reaches it;" in markdown
    assert "| only ours | Observation | 1 | `ours-extra` | theirs non-standard |" in markdown


def test_an_unpaired_resource_no_pattern_explains_is_unjudged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(judgements, "PATTERNS", ())
    monkeypatch.setattr(judgements, "OURS_ONLY_PATTERNS", ())
    result = report.MessageResult("a.hl7", 1, "ORU^R01", converted=True, resources=1)
    result.comparison = compare_bundles(bundle(observation("C", 3)), bundle(), file="a.hl7")
    summary = report.summarize([result])
    assert summary["unpaired"]["by_type"]["Observation"]["only_ours"] == {"unjudged": 1}


def test_persons_pair_by_an_identifier_when_one_side_has_no_name() -> None:
    ours = {"resourceType": "RelatedPerson", "identifier": [{"value": "M-1"}]}
    theirs = {
        "resourceType": "RelatedPerson",
        "identifier": [{"value": "M-1"}],
        "name": [{"family": "DOE"}],
    }
    result = compare_bundles(bundle(ours), bundle(theirs))
    assert result.tallies["RelatedPerson"].paired == 1


def test_write_doc_keeps_the_hand_written_intro(tmp_path: Path) -> None:
    doc = tmp_path / "conformance.md"
    doc.write_text("# My intro\n\nkept\n\n" + report.GENERATED_MARK + "\nold numbers\n")
    result = report.MessageResult("a.hl7", 1, "ADT^A01", converted=True, resources=3)
    result.comparison = compare_bundles(bundle(patient()), bundle(patient()))
    report.write_doc(doc, report.summarize([result]))
    text = doc.read_text()
    assert text.startswith("# My intro\n\nkept\n")
    assert "old numbers" not in text
    assert "**6 / 6 = 100.0 %**" in text


def test_source_values_read_fields_components_and_subcomponents() -> None:
    values = judgements.source_values
    assert values("ADT-A01-01.hl7", "MSH-10") == {"MSG00001"}
    assert values("ADT-A01-01.hl7", "PID-5.15") == {"Addsm"}
    assert values("ADT-A01-01.hl7", "PID-3.4.3") == {"HCD"}
    assert "PATID1234" in values("ADT-A01-01.hl7", "PID")


def test_predicates_look_at_where_a_value_comes_from() -> None:
    extra = Disagreement(
        "ADT-A01-01.hl7", "ADT^A01", "Patient", "name.given", ["ADAM", "A"], ["ADAM", "A", "Addsm"]
    )
    assert judgements.theirs_extra_from("PID-5.15")(extra)
    assert not judgements.theirs_extra_from("PID-5.2")(extra)
    lacking = Disagreement(
        "ADT-A01-01.hl7", "ADT^A01", "Patient", "telecom.value", ["78788788"], ["2222"]
    )
    assert judgements.ours_lacks_from("PID-13.12")(lacking)
    assert not judgements.ours_lacks_from("PID-14")(lacking)
