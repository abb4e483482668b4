"""Diagnosis cases in ZooKeeper, and their lifecycle on ``<prefix>.diagnosis``.

Layout under the cluster's base path (DESIGN.md §4), pointers and counts only,
never patient data:

==========================================  =================================================
``diagnosis/cases/<rule>/<case>``           persistent; :class:`Case` as JSON: event id, Kafka
                                            coordinates, rule, priority, opened, attempts,
                                            escalations
``diagnosis/claims/<case>``                 ephemeral; the subscriber working on the case
``diagnosis/subscribers/<id>``              ephemeral; a subscriber's rules, host and pid
``diagnosis/closed/<case>``                 persistent; a finished case (``completed`` or
                                            ``failed``), so a resent event never reopens it;
                                            reaped by the leader after a retention time
``diagnosis/offsets/<topic>/<partition>``   persistent; how far the leader's case opener read
==========================================  =================================================

A case's id is a UUIDv5 of the event id and the rule: one event opens one case per
rule, however often it is resent. Lifecycle events (``opened``, ``claimed``,
``completed``, ``escalated``, ``failed``) and the handler's result go to
``<prefix>.diagnosis``, keyed like the event that opened the case (by patient).
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass
from typing import Any, Final

import orjson

from bridge.coordination import ZooKeeperSession
from bridge.envelope import ID_NAMESPACE, TYPE_PREFIX, EventAttributes, now_rfc3339
from bridge.kafka import Headers, OutRecord

DIAGNOSIS: Final = "diagnosis"
CASES: Final = "cases"
CLAIMS: Final = "claims"
SUBSCRIBERS: Final = "subscribers"
CLOSED: Final = "closed"
OFFSETS: Final = "offsets"
SOURCE: Final = "urn:hl7bridge:diagnosis"
LIFECYCLE_JSON: Final = b"application/json"


def case_id(event_id: str, rule: str) -> str:
    return str(uuid.uuid5(ID_NAMESPACE, f"diagnosis\x1f{event_id}\x1f{rule}"))


def path(session: ZooKeeperSession, *parts: str) -> str:
    return session.path(DIAGNOSIS, *parts)


@dataclass(slots=True)
class Case:
    """What a case znode holds: pointers and metadata."""

    case: str
    rule: str
    priority: int
    event_id: str
    topic: str
    partition: int
    offset: int
    opened: str
    escalation_s: float
    attempts: int = 0
    escalations: int = 0
    epoch: int | None = None
    #: The resource the rule matched (type and id: ids, never values).
    resource_type: str | None = None
    resource_id: str | None = None

    def to_bytes(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def from_bytes(cls, data: bytes) -> Case:
        value = orjson.loads(data)
        return cls(**{k: value[k] for k in cls.__dataclass_fields__ if k in value})


def lifecycle_record(
    topic: str,
    kind: str,
    case: Case,
    key: bytes | None,
    *,
    instance: str,
    epoch: int | None = None,
    extra: dict[str, Any] | None = None,
    sequence: int = 0,
) -> OutRecord:
    """A case lifecycle event (``opened``, ``claimed``, ``completed``, ``escalated``,
    ``failed``): JSON of the case's pointers, never patient data."""
    data = {"case": case.case, "rule": case.rule, "priority": case.priority,
            "event_id": case.event_id, "topic": case.topic, "partition": case.partition,
            "offset": case.offset, "opened": case.opened, "attempts": case.attempts,
            "escalations": case.escalations, "kind": kind, **(extra or {})}  # fmt: skip
    attributes = EventAttributes(
        id=str(uuid.uuid5(ID_NAMESPACE, f"{case.case}/{kind}/{sequence}")),
        source=SOURCE,
        type=f"{TYPE_PREFIX}.diagnosis.case.{kind}",
        time=now_rfc3339(),
        subject=f"case/{case.case}",
        content_type=LIFECYCLE_JSON,
        bridge_instance=instance,
        leader_epoch=epoch,
    )
    return OutRecord(topic, orjson.dumps(data), key, _with_case(attributes.headers(), case))


def result_record(
    topic: str, case: Case, key: bytes | None, resource: dict[str, Any], *, instance: str
) -> OutRecord:
    """The handler's result (a FHIR resource), with a deterministic id per case."""
    attributes = EventAttributes(
        id=str(uuid.uuid5(ID_NAMESPACE, f"{case.case}/result")),
        source=SOURCE,
        type=f"{TYPE_PREFIX}.diagnosis.result",
        time=now_rfc3339(),
        subject=f"case/{case.case}",
        bridge_instance=instance,
    )
    return OutRecord(topic, orjson.dumps(resource), key, _with_case(attributes.headers(), case))


def _with_case(headers: Headers, case: Case) -> Headers:
    return [
        *headers,
        ("ce_caseid", case.case.encode()),
        ("ce_rule", case.rule.encode()),
        ("ce_eventid", case.event_id.encode()),
    ]
