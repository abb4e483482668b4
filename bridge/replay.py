"""``hl7bridge replay``: send DLQ or raw HL7 v2 records through the pipeline again.

Typical use: a message type was not accepted, or a mapping defect sent messages
to ``<prefix>.dlq``; once the configuration or the code is fixed, the selected
records are re-sent over MLLP to a bridge instance, exactly as a sender would
send them. Two steps, each usable on its own:

* :func:`select_records` reads a topic (``<prefix>.dlq`` or ``<prefix>.raw.hl7v2``)
  once, from the beginning of each selected partition (or ``from_offset``) up to
  the end offsets seen when it started (or ``to_offset``), and keeps the records
  that match a :class:`Selection` (:meth:`Selection.matches` is a pure function);
* :func:`replay` sends them over one MLLP connection, one at a time, waiting for
  each ACK; or, with ``dry_run``, only lists what it would send.

Only HL7 v2 records are replayed. FHIR records (on the DLQ, or a raw FHIR body)
are out of scope: they are skipped and counted.

Nothing here prints or logs a record's content: lines carry the coordinates,
the control id, the sender (application and facility) and the DLQ reason.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal, Protocol, TypeVar

from adapters.hl7v2.er7 import header_for_unparseable
from adapters.mllp.client import MLLPClient
from bridge.errors import BridgeError, ConfigError, UnavailableError
from bridge.kafka import KafkaAddress, kafka_options
from bridge.sender import ACCEPTED, parse_address, summarize_ack

HL7V2: Final = "hl7v2"
FHIR: Final = "fhir"

#: How long one fetch waits for records before the loop looks at its positions again.
_FETCH_WAIT_MS: Final = 200
_BOM: Final = b"\xef\xbb\xbf"
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


class RecordLike(Protocol):
    """What replay reads of a Kafka record (aiokafka's ``ConsumerRecord`` has it)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def timestamp(self) -> int: ...
    @property
    def headers(self) -> Sequence[tuple[str, bytes]]: ...
    @property
    def value(self) -> bytes | None: ...


_R = TypeVar("_R", bound=RecordLike)


# --- what a record is --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RecordInfo:
    """The lineage of one record as replay shows it: no patient data."""

    kind: Literal["hl7v2", "fhir"]
    control_id: str
    #: ``MSH-3|MSH-4`` as sent (raw ER7), "" when unknown.
    sender: str
    message_type: str
    #: ``dlq_reason`` of a DLQ record; None for a raw record.
    reason: str | None


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8", "replace")


def _headers(record: RecordLike) -> dict[str, bytes]:
    return dict(record.headers or ())


def record_kind(headers: dict[str, bytes], value: bytes | None) -> Literal["hl7v2", "fhir"]:
    """HL7 v2 or FHIR, by ``content-type`` (raw records), then ``dlq_channel`` (DLQ
    records: ``mllp`` and ``directory:*`` are HL7 v2), then the first byte."""
    content_type = headers.get("content-type", b"").lower()
    if b"fhir" in content_type:
        return FHIR
    if b"hl7-v2" in content_type:
        return HL7V2
    channel = headers.get("dlq_channel")
    if channel is not None:
        return FHIR if channel.startswith((b"fhir", b"http")) else HL7V2
    head = (value or b"").removeprefix(_BOM).lstrip()[:1]
    return FHIR if head in (b"{", b"<") else HL7V2


def describe_record(record: RecordLike) -> RecordInfo:
    """Control id, sender and type from the headers the bridge wrote (``ce_hl7controlid``,
    ``ce_hl7sender``, ``ce_hl7messagetype``), else from the MSH segment of the value."""
    headers = _headers(record)
    kind = record_kind(headers, record.value)
    control_id = _text(headers.get("ce_hl7controlid"))
    sender = _text(headers.get("ce_hl7sender"))
    message_type = _text(headers.get("ce_hl7messagetype"))
    if kind == HL7V2 and (control_id is None or sender is None or message_type is None):
        header = header_for_unparseable(record.value or b"")
        if header is not None:
            if control_id is None:
                control_id = header.control_id
            if sender is None and (header.sending_application or header.sending_facility):
                sender = header.sender_key
            if message_type is None:
                message_type = header.message_type
    return RecordInfo(
        kind=kind,
        control_id=control_id or "",
        sender=sender or "",
        message_type=message_type or "",
        reason=_text(headers.get("dlq_reason")),
    )


# --- selection ------------------------------------------------------------------------------


def parse_time(text: str, *, key: str = "since") -> int:
    """An RFC 3339 date-time (``2024-05-01T12:00:00Z``, ``...+02:00``) as epoch ms."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        raise ConfigError(
            f"{text!r} is not an RFC 3339 date-time with an offset "
            "(e.g. 2024-05-01T12:00:00Z or 2024-05-01T14:00:00+02:00)",
            key=key,
        )
    return (moment - _EPOCH) // timedelta(milliseconds=1)  # exact: no float rounding


def sender_matches(wanted: str, sender: str) -> bool:
    """``APP|FAC`` must equal MSH-3|MSH-4 exactly; ``APP`` (no ``|``) matches MSH-3
    whatever the facility."""
    if "|" in wanted:
        return sender == wanted
    return sender.partition("|")[0] == wanted


@dataclass(frozen=True, slots=True)
class Selection:
    """Which records to replay. Every criterion given must hold; bounds are included.

    ``from_offset``/``to_offset`` need exactly one partition (offsets are per
    partition); ``since``/``until`` compare the record timestamp (epoch ms);
    ``sender`` is ``APP|FAC`` (or ``APP`` for any facility), ``control_id`` MSH-10.
    """

    partitions: frozenset[int] | None = None
    from_offset: int | None = None
    to_offset: int | None = None
    since_ms: int | None = None
    until_ms: int | None = None
    sender: str | None = None
    control_id: str | None = None

    @classmethod
    def build(
        cls,
        *,
        partitions: Iterable[int] | None = None,
        from_offset: int | None = None,
        to_offset: int | None = None,
        since: str | None = None,
        until: str | None = None,
        sender: str | None = None,
        control_id: str | None = None,
    ) -> Selection:
        """Validate the criteria as a user gives them; raise ConfigError naming the one."""
        parts = None if partitions is None else frozenset(partitions)
        if parts is not None and any(p < 0 for p in parts):
            raise ConfigError("partitions are numbered from 0", key="partition")
        for key, offset in (("from_offset", from_offset), ("to_offset", to_offset)):
            if offset is not None and offset < 0:
                raise ConfigError("offsets start at 0", key=key)
        if (from_offset is not None or to_offset is not None) and (
            parts is None or len(parts) != 1
        ):
            raise ConfigError(
                "an offset range needs exactly one partition (offsets are per partition)",
                key="partition",
            )
        if from_offset is not None and to_offset is not None and from_offset > to_offset:
            raise ConfigError("from_offset is after to_offset", key="from_offset")
        since_ms = None if since is None else parse_time(since, key="since")
        until_ms = None if until is None else parse_time(until, key="until")
        if since_ms is not None and until_ms is not None and since_ms > until_ms:
            raise ConfigError("since is after until", key="since")
        if sender is not None and not sender.strip("|"):
            raise ConfigError("the sender is empty (APP|FAC or APP)", key="sender")
        if control_id is not None and not control_id:
            raise ConfigError("the control id is empty", key="control_id")
        return cls(parts, from_offset, to_offset, since_ms, until_ms, sender, control_id)

    def matches(self, record: RecordLike) -> bool:
        if self.partitions is not None and record.partition not in self.partitions:
            return False
        if self.from_offset is not None and record.offset < self.from_offset:
            return False
        if self.to_offset is not None and record.offset > self.to_offset:
            return False
        if self.since_ms is not None and record.timestamp < self.since_ms:
            return False
        if self.until_ms is not None and record.timestamp > self.until_ms:
            return False
        if self.sender is None and self.control_id is None:
            return True
        info = describe_record(record)
        if self.sender is not None and not sender_matches(self.sender, info.sender):
            return False
        return self.control_id is None or info.control_id == self.control_id


def filter_records(records: Iterable[_R], selection: Selection) -> list[_R]:
    """The records that match, in replay order: record timestamp, then partition and
    offset (DLQ records have no key, so one sender's messages spread over partitions;
    time order replays them in the order they arrived)."""
    chosen = [r for r in records if selection.matches(r)]
    chosen.sort(key=lambda r: (r.timestamp, r.partition, r.offset))
    return chosen


async def select_records(
    bootstrap: KafkaAddress,
    topic: str,
    *,
    partitions: Sequence[int] | None = None,
    from_offset: int | None = None,
    to_offset: int | None = None,
    since: str | None = None,
    until: str | None = None,
    sender: str | None = None,
    control_id: str | None = None,
    timeout_s: float = 30.0,
) -> AsyncIterator[Any]:
    """The records of ``topic`` that match, as aiokafka ``ConsumerRecord``s, in replay
    order (see :func:`filter_records`).

    Reads each selected partition once, from its beginning (or ``from_offset``) up to
    the end offset seen at the start (or ``to_offset``, included): records written
    meanwhile are not picked up. The matching records are held in memory before the
    first is yielded, to order them by time. Raises ConfigError for bad criteria, an
    unknown topic or partition; UnavailableError if Kafka cannot be reached within
    ``timeout_s``, or reading brings nothing new for that long.
    """
    selection = Selection.build(
        partitions=partitions,
        from_offset=from_offset,
        to_offset=to_offset,
        since=since,
        until=until,
        sender=sender,
        control_id=control_id,
    )
    records = await _read_topic(bootstrap, topic, selection, timeout_s=timeout_s)
    for record in records:
        yield record


async def read_until(
    consumer: Any,
    stop: dict[Any, int],
    on_record: Callable[[Any], None],
    *,
    deadline: asyncio.Timeout,
    timeout_s: float,
) -> None:
    """Read each partition in ``stop`` from the consumer's position up to its stop
    offset (excluded), in offset order, handing each record to ``on_record``. Every
    batch read moves ``deadline`` to ``timeout_s`` from now: reading may take long
    in all, but never stalls that long."""
    loop = asyncio.get_running_loop()
    pending = {tp for tp in stop if await consumer.position(tp) < stop[tp]}
    while pending:
        batches = await consumer.getmany(*pending, timeout_ms=_FETCH_WAIT_MS)
        if batches:
            deadline.reschedule(loop.time() + timeout_s)
        for tp, batch in batches.items():
            for record in batch:
                if record.offset < stop[tp]:
                    on_record(record)
        for tp in list(pending):
            if await consumer.position(tp) >= stop[tp]:
                pending.discard(tp)


async def _read_topic(
    bootstrap: KafkaAddress, topic: str, selection: Selection, *, timeout_s: float
) -> list[Any]:
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.errors import KafkaError

    request_timeout_ms = max(1000, int(timeout_s * 1000))
    consumer = AIOKafkaConsumer(
        **kafka_options(bootstrap),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        request_timeout_ms=request_timeout_ms,
    )
    matched: list[Any] = []
    try:
        # Connecting must succeed within timeout_s; reading then has timeout_s per step
        # (a large topic may take longer in all, but never stalls that long).
        async with asyncio.timeout(timeout_s) as deadline:
            await consumer.start()  # inside: a failed start is stopped too (no leak)
            known = await consumer.topics()  # refreshes the metadata
            if topic not in known:
                raise ConfigError(
                    f"topic {topic!r} does not exist on {bootstrap}", key="topic_prefix"
                )
            numbers = sorted(consumer.partitions_for_topic(topic) or ())
            wanted = numbers if selection.partitions is None else sorted(selection.partitions)
            missing = [p for p in wanted if p not in numbers]
            if missing:
                raise ConfigError(
                    f"topic {topic!r} has no partition {missing[0]} "
                    f"(it has {len(numbers)}: 0..{len(numbers) - 1})",
                    key="partition",
                )
            tps = [TopicPartition(topic, p) for p in wanted]
            consumer.assign(tps)
            ends: dict[Any, int] = await consumer.end_offsets(tps)
            last = selection.to_offset
            stop = {tp: ends[tp] if last is None else min(ends[tp], last + 1) for tp in tps}
            for tp in tps:
                if selection.from_offset is None:
                    await consumer.seek_to_beginning(tp)
                else:
                    consumer.seek(tp, selection.from_offset)

            def keep(record: Any) -> None:
                if selection.matches(record):
                    matched.append(record)

            await read_until(consumer, stop, keep, deadline=deadline, timeout_s=timeout_s)
    except TimeoutError as exc:
        raise UnavailableError(
            f"Kafka at {bootstrap}: no answer reading {topic!r} within {timeout_s:g} s"
        ) from exc
    except KafkaError as exc:
        raise UnavailableError(
            f"cannot read {topic!r} from Kafka at {bootstrap}: {type(exc).__name__}"
        ) from exc
    finally:
        await consumer.stop()
    return filter_records(matched, selection)


# --- replay ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReplayTarget:
    """The MLLP listener of a bridge instance the records are sent to."""

    host: str
    port: int
    #: How long to wait for each ACK (and for the connection).
    timeout_s: float = 30.0

    @classmethod
    def parse(cls, address: str, *, timeout_s: float = 30.0) -> ReplayTarget:
        host, port = parse_address(address)
        return cls(host, port, timeout_s)

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


Status = Literal["accepted", "not_accepted", "not_sent", "would_send", "skipped"]


@dataclass(slots=True)
class ReplayItem:
    """One selected record and what became of it."""

    topic: str
    partition: int
    offset: int
    #: The record timestamp, RFC 3339 UTC.
    time: str
    kind: str
    control_id: str
    sender: str
    message_type: str
    reason: str | None
    status: Status
    #: MSA-1 and MSA-2 of the answer (sent records only).
    ack_code: str | None = None
    ack_control_id: str | None = None
    errors: list[dict[str, str]] = field(default_factory=list)
    #: Why it was not sent or not answered (timeout, connection, FHIR record, ...).
    problem: str | None = None

    @property
    def where(self) -> str:
        return f"{self.partition}:{self.offset}"

    def line(self) -> str:
        control = self.control_id or "-"
        if self.status == "would_send":
            text = f"would send {self.where} {control}"
            text += f" sender={self.sender or '-'} type={self.message_type or '-'}"
            return text + (f" reason={self.reason}" if self.reason else "")
        if self.status == "skipped":
            return f"skipped {self.where} {control} ({self.problem})"
        if self.status == "not_sent":
            return f"not sent {self.where} {control} ({self.problem})"
        text = f"{self.where} {control} → {self.ack_code}"
        if self.problem:
            text += f" ({self.problem})"
        for err in self.errors:
            parts = [err.get("code", ""), err.get("location", ""), err.get("text", "")]
            text += "\n  ERR " + " ".join(p for p in parts if p)
        return text

    def to_json(self) -> dict[str, Any]:
        return {
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "time": self.time,
            "kind": self.kind,
            "control_id": self.control_id,
            "sender": self.sender,
            "message_type": self.message_type,
            "reason": self.reason,
            "status": self.status,
            "ack_code": self.ack_code,
            "ack_control_id": self.ack_control_id,
            "errors": self.errors,
            "problem": self.problem,
        }


@dataclass(slots=True)
class ReplayReport:
    dry_run: bool
    items: list[ReplayItem] = field(default_factory=list)

    def _count(self, status: Status) -> int:
        return sum(1 for item in self.items if item.status == status)

    @property
    def selected(self) -> int:
        return len(self.items)

    @property
    def accepted(self) -> int:
        return self._count("accepted")

    @property
    def not_accepted(self) -> int:
        return self._count("not_accepted")

    @property
    def not_sent(self) -> int:
        return self._count("not_sent")

    @property
    def would_send(self) -> int:
        return self._count("would_send")

    @property
    def skipped_fhir(self) -> int:
        return sum(1 for i in self.items if i.status == "skipped" and i.kind == FHIR)

    @property
    def skipped(self) -> int:
        return self._count("skipped")

    @property
    def ok(self) -> bool:
        """Every replayed message was answered AA/CA (a dry run is always ok)."""
        return self.not_accepted == 0 and self.not_sent == 0

    def summary(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "selected": self.selected,
            "sent": self.accepted + self.not_accepted,
            "accepted": self.accepted,
            "not_accepted": self.not_accepted,
            "not_sent": self.not_sent,
            "would_send": self.would_send,
            "skipped_fhir": self.skipped_fhir,
            "skipped_other": self.skipped - self.skipped_fhir,
        }

    def summary_line(self) -> str:
        skipped = f", {self.skipped_fhir} FHIR skipped"
        if self.skipped > self.skipped_fhir:
            skipped += f", {self.skipped - self.skipped_fhir} empty skipped"
        if self.dry_run:
            return (
                f"dry run: {self.selected} selected, {self.would_send} would be sent"
                f"{skipped}; nothing sent"
            )
        text = (
            f"{self.selected} selected: {self.accepted} accepted, {self.not_accepted} not accepted"
        )
        if self.not_sent:
            text += f", {self.not_sent} not sent"
        return text + skipped


def _item(record: RecordLike, status: Status, info: RecordInfo) -> ReplayItem:
    moment = datetime.fromtimestamp(record.timestamp / 1000, UTC)
    return ReplayItem(
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        time=moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        kind=info.kind,
        control_id=info.control_id,
        sender=info.sender,
        message_type=info.message_type,
        reason=info.reason,
        status=status,
    )


async def _iterate(
    records: AsyncIterable[RecordLike] | Iterable[RecordLike],
) -> AsyncIterator[RecordLike]:
    if isinstance(records, AsyncIterable):
        async for record in records:
            yield record
    else:
        for record in records:
            yield record


async def replay(
    records: AsyncIterable[RecordLike] | Iterable[RecordLike],
    target: ReplayTarget | None,
    *,
    dry_run: bool,
    on_item: Callable[[ReplayItem], None] | None = None,
) -> ReplayReport:
    """Send each HL7 v2 record's value to ``target`` over MLLP and note its ACK.

    One connection, one message at a time, each waiting for its ACK (summarized
    like ``hl7bridge send`` does). After a timeout or a dropped connection the next
    message gets a fresh connection; if the target cannot be reached at all, the
    remaining records are reported ``not_sent``.

    The records go through the target's normal pipeline, so its usual rules apply:
    its ``accept_message_types``, validation, mapping, and dedupe. A message the
    bridge accepted before (a raw record, say) is answered as a duplicate (like the
    original, AA) and published nothing if it comes back within ``dedupe_window_s``
    of that acceptance on the same instance (the window is in memory: a restarted
    instance has forgotten it). DLQ records were never accepted, so the dedupe
    never holds them back: accepted now, they publish normally (raw and event); one
    rejected again goes to the DLQ again, with the replaying connection as its peer.

    With ``dry_run`` nothing is sent and no connection is opened: every HL7 v2
    record is reported ``would_send``. FHIR records are skipped and counted.
    ``on_item`` sees each item once it is settled (for printing as it goes).
    """
    if not dry_run and target is None:
        raise ConfigError("a replay needs a target (HOST:PORT) unless it is a dry run", key="to")
    report = ReplayReport(dry_run=dry_run)
    client: MLLPClient | None = None
    unreachable: str | None = None

    def settle(item: ReplayItem) -> None:
        report.items.append(item)
        if on_item is not None:
            on_item(item)

    try:
        async for record in _iterate(records):
            info = describe_record(record)
            if info.kind == FHIR:
                item = _item(record, "skipped", info)
                item.problem = "a FHIR record: replay takes HL7 v2 only"
                settle(item)
                continue
            if not record.value:
                item = _item(record, "skipped", info)
                item.problem = "an empty record"
                settle(item)
                continue
            if dry_run:
                settle(_item(record, "would_send", info))
                continue
            assert target is not None
            if unreachable is not None:
                item = _item(record, "not_sent", info)
                item.problem = unreachable
                settle(item)
                continue
            if client is None:
                try:
                    client = await MLLPClient.connect(
                        target.host, target.port, timeout_s=target.timeout_s
                    )
                except (TimeoutError, OSError) as exc:
                    unreachable = f"cannot connect to {target.address}: {exc}"
                    item = _item(record, "not_sent", info)
                    item.problem = unreachable
                    settle(item)
                    continue
            try:
                ack = await client.send(record.value, timeout_s=target.timeout_s)
            except (TimeoutError, OSError, BridgeError) as exc:  # ConnectionError is OSError
                problem = "timed out" if isinstance(exc, TimeoutError) else str(exc)
                item = _item(record, "not_accepted", info)
                item.ack_code = "--"
                item.problem = problem
                await client.close()
                client = None
                settle(item)
                continue
            summary = summarize_ack(record.topic, record.offset, ack)
            accepted = summary.ack_code in ACCEPTED
            item = _item(record, "accepted" if accepted else "not_accepted", info)
            item.ack_code = summary.ack_code
            item.ack_control_id = summary.control_id
            item.errors = summary.errors
            item.problem = summary.problem
            settle(item)
    finally:
        if client is not None:
            await client.close()
    return report
