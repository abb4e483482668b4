"""What the mapping tests (tests/unit/test_map_*.py) share: where the corpus and
Microsoft's samples and expected outputs are, mapping a message with the Bundle
validated, and finding resources in a Bundle."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fhir.resources.R4B.bundle import Bundle

from adapters.hl7v2.er7 import Hl7Message, parse_message
from bridge.normalize import MappingOptions, Normalized, normalize

CORPUS = Path(__file__).resolve().parents[2].parent / "shared" / "corpus"
MS = CORPUS / "microsoft-fhir-converter"
#: Microsoft's HL7 v2 sample messages.
MS_SAMPLES = MS / "data" / "SampleData" / "Hl7v2"
#: Microsoft's expected FHIR output, one folder per message type and event (``ADT_A01``).
MS_EXPECTED = (
    MS / "src" / "Microsoft.Health.Fhir.Liquid.Converter.FunctionalTests" / "TestData"
    / "Expected" / "Hl7v2"
)  # fmt: skip


def files_of_type(paths: Iterable[Path], *codes: str) -> list[Path]:
    """The files whose MSH-9 message code is one of ``codes``, sorted. Files are
    chosen by MSH-9, not by name: MS's MDM_01.hl7 / SIU_12.hl7 hold ADT messages."""
    return sorted(p for p in paths if parse_message(p.read_bytes()).header.message_code in codes)


def expected_bundle(name: str, folder: str | None = None) -> dict[str, Any]:
    """Microsoft's expected Bundle for sample ``name``; the folder defaults to the
    name's first two parts (``MDM-T02-01`` → ``MDM_T02``)."""
    folder = folder or "_".join(name.split("-")[:2])
    data: dict[str, Any] = json.loads(
        (MS_EXPECTED / folder / f"{name}-expected.json").read_text(encoding="utf-8")
    )
    return data


def seg(name: str, fields: dict[int, str]) -> str:
    """A segment from its non-empty fields, by HL7 field number."""
    return "|".join([name] + [fields.get(n, "") for n in range(1, max(fields) + 1)])


def message(*segments: str) -> Hl7Message:
    """Parse segments (MSH first) joined with carriage returns."""
    return parse_message("\r".join(segments).encode())


def validated(
    msg: Hl7Message,
    *,
    event_id: str = "evt-1",
    source: str = "urn:test",
    options: MappingOptions | None = None,
) -> Normalized:
    """Normalize ``msg`` and validate the Bundle against FHIR R4B."""
    result = normalize(msg, event_id=event_id, source=source, options=options)
    Bundle.model_validate(result.bundle)
    return result


def normalize_and_validate(
    msg: Hl7Message,
    *,
    event_id: str = "evt-1",
    source: str = "urn:test",
    options: MappingOptions | None = None,
) -> tuple[dict[str, Any], tuple[str, ...]]:
    """Normalize ``msg``, validate the Bundle; return the Bundle and the unmapped list."""
    result = validated(msg, event_id=event_id, source=source, options=options)
    return result.bundle, result.unmapped


def references(bundle: dict[str, Any]) -> list[str]:
    """Every ``reference`` string anywhere in the Bundle."""
    found: list[str] = []
    stack: list[Any] = [bundle]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            ref = node.get("reference")
            if isinstance(ref, str):
                found.append(ref)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return found


def assert_references_resolve(bundle: dict[str, Any]) -> None:
    """The Bundle has references, and each resolves to an entry's fullUrl."""
    full_urls = {e["fullUrl"] for e in bundle["entry"]}
    found = references(bundle)
    assert found
    assert all(ref in full_urls for ref in found), set(found) - full_urls


def resources(bundle: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == kind]


def one(bundle: dict[str, Any], kind: str) -> dict[str, Any]:
    found = resources(bundle, kind)
    assert len(found) == 1, f"{len(found)} {kind}"
    return found[0]


def resolve(bundle: dict[str, Any], reference: str) -> dict[str, Any]:
    """The resource whose fullUrl is ``reference``."""
    for entry in bundle["entry"]:
        if entry["fullUrl"] == reference:
            resource: dict[str, Any] = entry["resource"]
            return resource
    raise AssertionError(f"unresolved reference {reference}")
