"""The CapabilityStatement of ``GET [base]/metadata``: what the relay really does.

Every R4B resource type (the types fhir.resources validates) takes ``create``
(POST) and ``update`` (PUT); the base takes ``transaction`` and ``batch`` Bundles
and FHIR messages (``$process-message``). Nothing can be read, searched, patched
or deleted: the bridge stores nothing. ``tests/integration/test_fhir_ingest.py``
drives every interaction listed here against a running bridge.
"""

from __future__ import annotations

from typing import Any, Final

from adapters.fhir.resource_types import RESOURCE_TYPES

FHIR_VERSION: Final = "4.0.1"
PROCESS_MESSAGE: Final = "http://hl7.org/fhir/OperationDefinition/MessageHeader-process-message"
#: The date this statement's content last changed (it is generated, not stored).
STATEMENT_DATE: Final = "2026-11-26"


def capability_statement(base: str, version: str) -> dict[str, Any]:
    resources = [
        {
            "type": name,
            "interaction": [{"code": "create"}, {"code": "update"}],
            "versioning": "no-version",
            "readHistory": False,
            "updateCreate": True,
            "conditionalCreate": False,
            "conditionalUpdate": False,
            "conditionalDelete": "not-supported",
        }
        for name in sorted(RESOURCE_TYPES)
    ]
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": STATEMENT_DATE,
        "publisher": "hl7bridge",
        "kind": "instance",
        "software": {"name": "hl7bridge", "version": version},
        "implementation": {
            "description": "hl7bridge FHIR relay: validates R4 resources and publishes them to "
            "Kafka; it stores nothing, so writes are answered 202 Accepted and there are no "
            "reads.",
            "url": base,
        },
        "fhirVersion": FHIR_VERSION,
        "format": ["application/fhir+json", "json"],
        "rest": [
            {
                "mode": "server",
                "documentation": "Writes are accepted once Kafka acknowledged them (acks=all). "
                "X-Request-Id makes a retry idempotent. A transaction is published as one "
                "event (all or nothing); a batch entry by entry.",
                "resource": resources,
                "interaction": [{"code": "transaction"}, {"code": "batch"}],
                "operation": [{"name": "process-message", "definition": PROCESS_MESSAGE}],
            }
        ],
        "messaging": [
            {
                "documentation": "A message Bundle POSTed to [base] or [base]/$process-message "
                "is published as one event and answered synchronously with a response "
                "message (MessageHeader.response.code ok).",
            }
        ],
    }
