"""One HL7 v2 message → its CloudEvent (attributes + FHIR data) and raw record.

The single place that decides what an event says, used by the MLLP pipeline
(binary mode on Kafka) and by ``hl7bridge convert`` (structured JSON), so the
two can never disagree on id, type, subject or data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from adapters.hl7v2.er7 import Hl7Message, parse_message
from bridge.dedupe import content_fingerprint
from bridge.envelope import (
    HL7V2_ER7,
    EventAttributes,
    hl7v2_event_id,
    hl7v2_event_type,
    hl7v2_source,
    now_rfc3339,
)
from bridge.errors import UnmappedContent
from bridge.kafka import Headers
from bridge.normalize import MappingOptions, normalize

RAW_TYPE = "org.hl7bridge.hl7v2.raw"


@dataclass(frozen=True, slots=True)
class Hl7v2Event:
    event: EventAttributes
    raw: EventAttributes
    data: dict[str, Any]
    #: The Kafka record key: the patient key, or the sender for patient-less messages.
    record_key: bytes


def hl7v2_event(
    message: Hl7Message,
    *,
    instance_id: str | None,
    mapping: MappingOptions,
    strict_mapping: bool = False,
    fingerprint: bytes | None = None,
) -> Hl7v2Event:
    """Normalize ``message`` and describe it as a CloudEvent.

    Raises :class:`~bridge.errors.MessageError` subclasses for content that
    cannot be mapped, and :class:`UnmappedContent` under ``strict_mapping``.
    """
    header = message.header
    if fingerprint is None:
        fingerprint = content_fingerprint(message.text)
    event_id = hl7v2_event_id(header.sender_key, header.control_id, fingerprint)
    source = hl7v2_source(
        header.sending_application, header.sending_facility, header.encoding.component
    )
    normalized = normalize(message, event_id=event_id, source=source, options=mapping)
    if strict_mapping and normalized.unmapped:
        raise UnmappedContent(
            "content the mapping does not carry (strict_mapping): "
            + ", ".join(normalized.unmapped[:20])
        )
    subject = None if normalized.patient_id is None else f"Patient/{normalized.patient_id}"
    key_text = normalized.patient_key  # computed once, while mapping the Patient
    # Without a patient, order per sender instead of per patient.
    record_key = (key_text if key_text is not None else f"sender|{header.sender_key}").encode()
    received = now_rfc3339()
    event = EventAttributes(
        id=event_id,
        source=source,
        type=hl7v2_event_type(header.message_type),
        time=received,
        subject=subject,
        hl7_control_id=header.control_id,
        hl7_message_type=header.message_type,
        hl7_version=header.version_id,
        bridge_instance=instance_id,
        unmapped=normalized.unmapped,
    )
    raw = EventAttributes(
        id=event_id,
        source=source,
        type=RAW_TYPE,
        time=received,
        subject=subject,
        # The codec actually used: an unlabelled latin-1 message says so.
        content_type=f"{HL7V2_ER7}; charset={header.codec}".encode(),
        hl7_control_id=header.control_id,
        hl7_message_type=header.message_type,
        hl7_version=header.version_id,
        bridge_instance=instance_id,
    )
    return Hl7v2Event(event=event, raw=raw, data=normalized.bundle, record_key=record_key)


@dataclass(frozen=True, slots=True)
class DescribedRecords:
    """What the pipeline publishes for an accepted message, ready for Kafka:
    the headers of the raw and the event record, their key, the event's FHIR JSON."""

    event_headers: Headers
    raw_headers: Headers
    record_key: bytes
    data: bytes


def records_for(
    message: Hl7Message,
    fingerprint: bytes,
    *,
    instance_id: str | None,
    mapping: MappingOptions,
    strict_mapping: bool,
) -> DescribedRecords:
    """Map a parsed message and encode its event (the pipeline's in-process path)."""
    described = hl7v2_event(
        message,
        instance_id=instance_id,
        mapping=mapping,
        strict_mapping=strict_mapping,
        fingerprint=fingerprint,
    )
    return DescribedRecords(
        event_headers=described.event.headers(),
        raw_headers=described.raw.headers(),
        record_key=described.record_key,
        data=orjson.dumps(described.data),
    )


def describe_records(
    payload: bytes,
    fingerprint: bytes,
    *,
    instance_id: str | None,
    mapping: MappingOptions,
    strict_mapping: bool,
) -> DescribedRecords:
    """The same from the message bytes (what a mapping worker process receives)."""
    return records_for(
        parse_message(payload),
        fingerprint,
        instance_id=instance_id,
        mapping=mapping,
        strict_mapping=strict_mapping,
    )
