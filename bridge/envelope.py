"""CloudEvents 1.0 envelope, Kafka protocol binding, binary content mode.

The event's attributes travel as ``ce_*`` record headers and the record value is
the FHIR R4 JSON itself, so a consumer that knows nothing of CloudEvents still
reads plain FHIR. ``schemas/event-envelope.schema.json`` documents each header;
this module is the one place that writes them.

Identity is deterministic: the same HL7 v2 message (same sender, same MSH-10,
same content after MSH) always yields the same ``ce_id``, so a consumer can drop a duplicate that an
at-least-once path let through.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from bridge.kafka import Headers

SPEC_VERSION = b"1.0"
FHIR_JSON = b"application/fhir+json"
HL7V2_ER7 = "x-application/hl7-v2+er7"

#: Namespace of every deterministic id the bridge derives (uuid5).
ID_NAMESPACE = uuid.UUID("6f1c2e8a-47a3-5d0b-9c7e-3b1f0d2a8e41")

TYPE_PREFIX = "org.hl7bridge"


def deterministic_id(*parts: str) -> str:
    """A stable UUID for an identity made of parts (joined unambiguously)."""
    return str(uuid.uuid5(ID_NAMESPACE, "\x1f".join(parts)))


def hl7v2_event_id(sender_key: str, control_id: str, fingerprint: bytes) -> str:
    """The same message resent gets the same id; a reused control id with other
    content (senders that reset their counters) gets another, so a consumer that
    drops duplicates by ``ce_id`` never drops a different message."""
    return deterministic_id("hl7v2", sender_key, control_id, fingerprint.hex())


def hl7v2_source(
    sending_application: str, sending_facility: str, component_separator: str = "^"
) -> str:
    """``ce_source``: the sending system, never the patient (MSH-3.1 and MSH-4.1)."""
    app = quote(sending_application.split(component_separator, 1)[0] or "-", safe="")
    facility = quote(sending_facility.split(component_separator, 1)[0] or "-", safe="")
    return f"urn:hl7v2:{app}:{facility}"


def hl7v2_event_type(message_type: str) -> str:
    """``ce_type`` for a normalized HL7 v2 message, e.g. ``org.hl7bridge.hl7v2.ORU_R01``."""
    return f"{TYPE_PREFIX}.hl7v2.{message_type.replace('^', '_')}"


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class EventAttributes:
    """What the bridge says about one event, besides its FHIR data."""

    id: str
    source: str
    type: str
    time: str
    subject: str | None = None
    content_type: bytes = FHIR_JSON
    hl7_control_id: str | None = None
    hl7_message_type: str | None = None
    hl7_version: str | None = None
    bridge_instance: str | None = None
    leader_epoch: int | None = None
    unmapped: tuple[str, ...] = ()
    #: FHIR REST ingest: create, update, transaction or message.
    fhir_interaction: str | None = None

    def structured(self, data: Any) -> dict[str, Any]:
        """The event in CloudEvents structured JSON form (``hl7bridge convert``):
        the same attributes as the Kafka headers, extensions as top-level members."""
        out: dict[str, Any] = {}
        for name, value in self.headers():
            if name == "content-type":
                out["datacontenttype"] = value.decode()
            else:
                out[name.removeprefix("ce_")] = value.decode()
        out["data"] = data
        return out

    def headers(self) -> Headers:
        """The Kafka record headers for this event (binary content mode)."""
        headers: Headers = [
            ("ce_specversion", SPEC_VERSION),
            ("ce_id", self.id.encode()),
            ("ce_source", self.source.encode()),
            ("ce_type", self.type.encode()),
            ("ce_time", self.time.encode()),
            ("content-type", self.content_type),
        ]
        if self.subject is not None:
            headers.append(("ce_subject", self.subject.encode()))
        optional = (
            ("ce_hl7controlid", self.hl7_control_id),
            ("ce_hl7messagetype", self.hl7_message_type),
            ("ce_hl7version", self.hl7_version),
            ("ce_bridgeinstance", self.bridge_instance),
            ("ce_leaderepoch", None if self.leader_epoch is None else str(self.leader_epoch)),
            ("ce_hl7unmapped", ",".join(self.unmapped) if self.unmapped else None),
            ("ce_fhirinteraction", self.fhir_interaction),
        )
        headers.extend((name, value.encode()) for name, value in optional if value is not None)
        return headers
