"""Conformance of the HL7 v2 → FHIR mapping: every corpus message of the mapped
families converted, every resource validated, and compared field by field with
Microsoft's FHIR-Converter expected outputs (:mod:`tests.conformance.report`);
known disagreements judged against the HL7 v2-to-FHIR IG
(:mod:`tests.conformance.judgements`). Not collected by pytest: run it as a
module (see ``docs/conformance.md``)."""
