"""The HL7 v2 pipeline: parse ▸ validate ▸ dedupe ▸ normalize ▸ publish ▸ ACK.

No sockets here: the MLLP server hands a frame in and writes back the bytes this
returns. The ACK contract (DESIGN.md §5) is kept in one place, ``handle_frame``:

* AA (CA in enhanced mode) only after the raw message and its event are
  acknowledged by Kafka (acks=all);
* AE + ERR for content errors, AR + ERR 200/201/202/203 for what the channel
  does not take; those messages go to the DLQ with the reason in headers;
* AR + ERR 207 when Kafka cannot take it (or the DLQ write fails): the sender
  keeps the message and retries, so nothing the bridge answered is lost;
* a resend of an accepted message is answered like the original, not published.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Final, Protocol

from adapters.hl7v2.ack import (
    AckError,
    ack_error_from,
    build_ack,
    header_for_unparseable,
    map_ack_code,
)
from adapters.hl7v2.er7 import (
    Hl7Message,
    MessageHeader,
    parse_message,
    validate_header,
)
from adapters.mllp.server import RejectReason
from bridge.dedupe import DuplicateFilter, content_fingerprint
from bridge.envelope import (
    now_rfc3339,
)
from bridge.errors import (
    BridgeError,
    MessageError,
    MessageTooLarge,
    OverloadedError,
    UnavailableError,
    UnsupportedMessageType,
    describe_failure,
)
from bridge.events import DescribedRecords, records_for
from bridge.kafka import Delivered, Headers, OutRecord, Topics
from bridge.metrics import BridgeMetrics
from bridge.normalize import MappingOptions

log = logging.getLogger(__name__)

CHANNEL = "mllp"


@dataclass(frozen=True, slots=True)
class _Call:
    """Who handed the pipeline this frame: the metrics and DLQ channel label, the
    headers singleton work stamps on what it publishes (``ce_leaderepoch``), and the
    peer the frame came from (``127.0.0.1:53412``; the channel label for a directory
    channel), recorded with a rejected message in the DLQ."""

    channel: str = CHANNEL
    stamp: tuple[tuple[str, bytes], ...] = ()
    peer: str = ""


_MLLP_CALL: Final = _Call()
_CALL_VAR: ContextVar[_Call | None] = ContextVar("hl7bridge_pipeline_call", default=None)


def _call() -> _Call:
    return _CALL_VAR.get() or _MLLP_CALL


_TYPE_LABEL = re.compile(r"^[A-Z][A-Z0-9]{2}\^[A-Z0-9]{3}$")


class Publisher(Protocol):
    async def publish(self, records: Sequence[OutRecord]) -> list[Delivered]: ...


class Mapper(Protocol):
    """Maps off the event loop (bridge.mapworker.MappingPool)."""

    async def describe(self, payload: bytes, fingerprint: bytes) -> DescribedRecords: ...


@dataclass(frozen=True, slots=True)
class PipelineSettings:
    topics: Topics
    instance_id: str
    accept_message_types: tuple[str, ...]
    max_frame_bytes: int = 1024 * 1024
    mapping: MappingOptions = field(default_factory=MappingOptions)
    #: Refuse (AE, to the DLQ) a message with content the mapping does not carry.
    strict_mapping: bool = False


@dataclass(slots=True)
class _AcceptList:
    """``*``, families (``ADT``) and exact types (``ADT^A01``), checked in O(1)."""

    everything: bool = False
    families: frozenset[str] = field(default_factory=frozenset)
    exact: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def parse(cls, entries: Sequence[str]) -> _AcceptList:
        return cls(
            everything="*" in entries,
            families=frozenset(e for e in entries if "^" not in e and e != "*"),
            exact=frozenset(e for e in entries if "^" in e),
        )

    def accepts(self, header: MessageHeader) -> bool:
        return (
            self.everything
            or header.message_code in self.families
            or f"{header.message_code}^{header.trigger_event}" in self.exact
        )


class Hl7v2Pipeline:
    """Turns one HL7 v2 frame into Kafka records and the ACK to answer with."""

    def __init__(
        self,
        settings: PipelineSettings,
        publisher: Publisher,
        dedupe: DuplicateFilter,
        metrics: BridgeMetrics,
        mapper: Mapper | None = None,
    ) -> None:
        self._settings = settings
        self._mapper = mapper
        self._publisher = publisher
        self._dedupe = dedupe
        self._metrics = metrics
        self._accept = _AcceptList.parse(settings.accept_message_types)
        # ACK control ids: unique per instance run, short enough for MSH-10 (ST 20).
        self._ack_prefix = uuid.uuid4().hex[:8]
        self._ack_counter = 0
        self._routes: dict[str, str] = {}

    # --- FrameHandler (adapters.mllp.server) --------------------------------------

    async def handle_frame(
        self, payload: bytes, peer: str, *, channel: str = CHANNEL, epoch: int | None = None
    ) -> bytes:
        """Process one message and return its ACK. ``peer`` (the connection's address,
        or the channel label for a directory channel) goes into a DLQ record as
        ``dlq_peer``; ``channel`` labels metrics and DLQ records (``mllp``,
        ``directory:<name>``); ``epoch`` is stamped as ``ce_leaderepoch`` on every
        record (singleton channels)."""
        started = time.perf_counter()
        stamp = () if epoch is None else (("ce_leaderepoch", str(epoch).encode()),)
        token = _CALL_VAR.set(_Call(channel, stamp, peer))
        try:
            ack = await self._process(payload)
        finally:
            _CALL_VAR.reset(token)
        self._metrics.ack_latency.labels(channel).observe(time.perf_counter() - started)
        return ack

    def set_accept_message_types(self, entries: Sequence[str]) -> None:
        """Apply a new accept list (cluster config) to the messages that follow."""
        self._accept = _AcceptList.parse(entries)

    def reject_frame(self, head: bytes, reason: RejectReason) -> bytes:
        """Answer a frame without processing it: too large, overloaded, shutting down."""
        header = header_for_unparseable(head)
        error: BridgeError
        if reason is RejectReason.TOO_LARGE:
            error = MessageTooLarge(
                f"message exceeds max_frame_bytes ({self._settings.max_frame_bytes} bytes)"
            )
        elif reason is RejectReason.TOO_MANY_CONNECTIONS:
            error = OverloadedError("too many connections (max_connections); retry later")
        elif reason is RejectReason.SHUTTING_DOWN:
            error = UnavailableError("the bridge instance is shutting down; retry later")
        else:
            error = UnavailableError("application internal error; retry later")
        self._count_rejection(error, header)
        return self._ack(header, error.ack_code, [ack_error_from(error)])

    # --- the contract ---------------------------------------------------------------

    async def _process(self, payload: bytes) -> bytes:
        try:
            message = parse_message(payload)
        except MessageError as exc:
            return await self._reject(payload, header_for_unparseable(payload), exc)
        header = message.header
        try:
            validate_header(header)
            if not self._accept.accepts(header):
                raise UnsupportedMessageType(
                    "message type not accepted by this channel (accept_message_types)",
                    location="MSH-9",
                )
        except MessageError as exc:
            return await self._reject(payload, header, exc)

        key = (header.sender_key, header.control_id)
        fingerprint = content_fingerprint(message.text)
        # A resend of a message still in flight waits for that attempt; if the
        # attempt failed, look again: another resend may have started meanwhile.
        while (earlier := self._dedupe.lookup(key, fingerprint)) is None:
            in_flight = self._dedupe.pending(key, fingerprint)
            if in_flight is None:
                break
            await asyncio.shield(in_flight)
        if earlier is not None:
            self._metrics.duplicates.labels(_call().channel).inc()
            self._count(earlier, header)
            return self._ack(header, earlier)

        if self._dedupe.reused(key, fingerprint):
            log.warning("control id reused with different content by a sender; publishing it")
            self._metrics.control_id_reuse.labels(_call().channel).inc()
        self._dedupe.begin(key, fingerprint)
        accepted: str | None = None
        try:
            try:
                records = await self._records(message, payload, fingerprint)
            except UnavailableError as exc:  # no mapping worker could answer: retry later
                self._count_rejection(exc, header)
                return self._ack(header, exc.ack_code, [ack_error_from(exc)])
            except BridgeError as exc:
                return await self._reject(payload, header, exc)
            except Exception as exc:  # a mapping defect must not lose the message
                log.error(
                    "normalization failed for a %s message: %s",
                    header.message_type,
                    describe_failure(exc),
                )
                internal = MessageError("message could not be normalized to FHIR")
                internal.__cause__ = exc
                return await self._reject(payload, header, internal)
            try:
                await self._publisher.publish(records)
            except UnavailableError as exc:
                self._count_rejection(exc, header)
                return self._ack(header, exc.ack_code, [ack_error_from(exc)])
            accepted = "AA"
            self._count(accepted, header)
            return self._ack(header, accepted)
        finally:
            self._dedupe.finish(key, fingerprint, accepted)

    async def _reject(
        self, payload: bytes, header: MessageHeader | None, error: BridgeError
    ) -> bytes:
        """Record a rejected message in the DLQ, then answer AE/AR with ERR.

        The ACK is built first so that the DLQ record carries the very bytes the
        sender gets back (``dlq_ack``). If the DLQ cannot take the record, answer
        AR 207 instead so the sender keeps the message: the bridge never answers
        without having recorded the outcome.
        """
        ack = self._ack(header, error.ack_code, [ack_error_from(error)])
        record = OutRecord(
            topic=self._settings.topics.dlq,
            value=payload,
            key=None,
            headers=self._dlq_headers(header, error, ack),
        )
        try:
            await self._publisher.publish([record])
        except UnavailableError as exc:
            self._metrics.dlq_failures.labels(_call().channel).inc()
            self._count_rejection(exc, header)
            return self._ack(header, exc.ack_code, [ack_error_from(exc)])
        self._count_rejection(error, header)
        return ack

    # --- records ------------------------------------------------------------------------

    async def _records(
        self, message: Hl7Message, payload: bytes, fingerprint: bytes
    ) -> list[OutRecord]:
        settings = self._settings
        if self._mapper is not None:
            described = await self._mapper.describe(payload, fingerprint)
        else:
            described = records_for(
                message,
                fingerprint,
                instance_id=settings.instance_id,
                mapping=settings.mapping,
                strict_mapping=settings.strict_mapping,
            )
        key = described.record_key
        stamp = _call().stamp
        raw_headers, event_headers = described.raw_headers, described.event_headers
        if stamp:
            raw_headers, event_headers = [*raw_headers, *stamp], [*event_headers, *stamp]
        events = self._route(message.header) or settings.topics.events
        return [
            OutRecord(settings.topics.raw_hl7v2, payload, key, raw_headers),
            OutRecord(events, described.data, key, event_headers),
        ]

    def set_routes(self, routes: Mapping[str, str]) -> None:
        """Topic routing (cluster config): message family (``ORU``) or exact type
        (``ADT^A01``) → the events topic its events go to instead of ``.events``."""
        self._routes = dict(routes)

    def _route(self, header: MessageHeader) -> str | None:
        routes = self._routes
        if not routes:
            return None
        exact = f"{header.message_code}^{header.trigger_event}"
        return routes.get(exact) or routes.get(header.message_code)

    def _dlq_headers(self, header: MessageHeader | None, error: BridgeError, ack: bytes) -> Headers:
        """The lineage of a rejected message (schemas/dlq-headers.schema.json): why
        (``dlq_reason`` ... ``dlq_location``), what the sender was answered
        (``dlq_ack``, byte for byte), where it came from (``dlq_channel``,
        ``dlq_peer``, ``ce_hl7sender``) and when (``dlq_time``)."""
        call = _call()
        headers: Headers = [
            ("dlq_reason", error.reason.encode()),
            ("dlq_ack_code", error.ack_code.encode()),
            ("dlq_err_code", error.err_code.encode()),
            ("dlq_message", error.message.encode()),
            ("dlq_ack", ack),
            ("dlq_channel", call.channel.encode()),
            ("dlq_time", now_rfc3339().encode()),
            ("ce_bridgeinstance", self._settings.instance_id.encode()),
            *call.stamp,
        ]
        if call.peer:
            headers.append(("dlq_peer", call.peer.encode()))
        if error.location:
            headers.append(("dlq_location", error.location.encode()))
        if header is not None:
            if header.sending_application or header.sending_facility:
                headers.append(("ce_hl7sender", header.sender_key.encode()))
            if header.control_id:
                headers.append(("ce_hl7controlid", header.control_id.encode()))
            if header.message_code:
                headers.append(("ce_hl7messagetype", header.message_type.encode()))
        return headers

    # --- answers and counts -----------------------------------------------------------

    def _ack(
        self, header: MessageHeader | None, ack_code: str, errors: Sequence[AckError] = ()
    ) -> bytes:
        self._ack_counter += 1
        return build_ack(
            header,
            map_ack_code(ack_code, header),
            errors=errors,
            control_id=f"{self._ack_prefix}{self._ack_counter:012d}",
        )

    def _count(self, ack_code: str, header: MessageHeader) -> None:
        # Only well-formed type names become label values, so a sender cannot
        # grow the label set without bound (accept_message_types may be '*').
        label = header.message_type if _TYPE_LABEL.match(header.message_type) else "other"
        self._metrics.messages.labels(_call().channel, ack_code, label).inc()

    def _count_rejection(self, error: BridgeError, header: MessageHeader | None) -> None:
        channel = _call().channel
        self._metrics.messages.labels(channel, error.ack_code, "other").inc()
        self._metrics.rejections.labels(channel, error.reason, error.err_code).inc()
