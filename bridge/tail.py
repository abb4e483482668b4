"""``hl7bridge tail``: follow the bridge's topics, or trace one message through them.

An integration analyst asks "where is MSG00042?": ``tail --all --no-follow
--control-id MSG00042`` reads every topic once, in pipeline order (``raw.hl7v2``,
``raw.fhir``, ``events``, ``dlq``, ``diagnosis``), and prints each record of that
message: the raw record, its event, a DLQ record with the reason and the ACK the
sender got, and the remote-diagnosis case records that point at its event (they
carry ``ce_eventid``, linked through the events found first). Without
``--no-follow`` it then keeps printing new records as they arrive, like ``tail -f``.

A line shows the coordinates and the headers the bridge writes (ids, codes,
sender, message type, DLQ reason): never the record's content or key, which may
hold patient data; ``--data`` adds both, for a terminal the operator controls.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import unquote

import orjson

from bridge.envelope import TYPE_PREFIX
from bridge.errors import ConfigError, UnavailableError
from bridge.kafka import KafkaAddress, Topics, kafka_options
from bridge.replay import (
    HL7V2,
    RecordLike,
    Selection,
    describe_record,
    parse_time,
    read_until,
    sender_matches,
)

#: The topics by their short names, in the order a message passes through them.
TOPIC_NAMES: Final = ("raw.hl7v2", "raw.fhir", "events", "dlq", "diagnosis")

#: Header → the name a text line shows it under, in that order.
_SHOWN: Final = (
    ("ce_hl7controlid", "ctl"),
    ("ce_hl7sender", "from"),
    ("ce_hl7messagetype", "type"),
    ("ce_id", "id"),
    ("ce_subject", "subject"),
    ("ce_caseid", "case"),
    ("ce_rule", "rule"),
    ("ce_eventid", "event"),
    ("dlq_reason", "reason"),
    ("dlq_err_code", "err"),
    ("dlq_ack_code", "ack"),
    ("dlq_channel", "channel"),
)
_FETCH_WAIT_MS: Final = 200
_HL7V2_SOURCE: Final = "urn:hl7v2:"


def topic_name(topics: Topics, short: str) -> str:
    """``events`` → ``<prefix>.events``: one of :data:`TOPIC_NAMES`, or the suffix of a
    topic the cluster config routes events to."""
    if not short or short.strip(".") != short or any(c.isspace() for c in short):
        raise ConfigError(
            f"{short!r} is not a topic name: one of {', '.join(TOPIC_NAMES)} or a routed "
            "topic's suffix",
            key="topic",
        )
    return f"{topics.prefix}.{short}"


@dataclass
class Trace:
    """Which records to show. Every criterion given must hold, except that a record
    pointing at an event already shown (``ce_eventid``: diagnosis cases and results)
    is shown too: that is how a control id leads to its remote-diagnosis case."""

    since_ms: int | None = None
    until_ms: int | None = None
    sender: str | None = None
    control_id: str | None = None
    event_id: str | None = None
    #: ``ce_id`` of every record shown so far.
    shown: set[str] = field(default_factory=set)

    @classmethod
    def build(
        cls,
        *,
        since: str | None = None,
        until: str | None = None,
        sender: str | None = None,
        control_id: str | None = None,
        event_id: str | None = None,
    ) -> Trace:
        """Validate the criteria as a user gives them; ConfigError names the bad one."""
        selection = Selection.build(since=since, until=until, sender=sender, control_id=control_id)
        if event_id is not None and not event_id:
            raise ConfigError("the event id is empty", key="event_id")
        return cls(selection.since_ms, selection.until_ms, sender, control_id, event_id)

    @property
    def narrowed(self) -> bool:
        """True when the trace looks for particular messages (not just a time range)."""
        return any(c is not None for c in (self.sender, self.control_id, self.event_id))

    def matches(self, record: RecordLike) -> bool:
        """Whether to show ``record``; remembers the ``ce_id`` of what it shows."""
        if self.since_ms is not None and record.timestamp < self.since_ms:
            return False
        if self.until_ms is not None and record.timestamp > self.until_ms:
            return False
        headers = _text_headers(record)
        if self.narrowed:
            linked = headers.get("ce_eventid")
            if not ((linked is not None and linked in self.shown) or self._identifies(record)):
                return False
        if "ce_id" in headers:
            self.shown.add(headers["ce_id"])
        return True

    def _identifies(self, record: RecordLike) -> bool:
        headers = _identity_headers(record)
        if self.event_id is not None and self.event_id not in (
            headers.get("ce_id"),
            headers.get("ce_eventid"),
        ):
            return False
        if self.control_id is not None and headers.get("ce_hl7controlid") != self.control_id:
            return False
        return self.sender is None or sender_matches(self.sender, headers.get("ce_hl7sender", ""))


def _text_headers(record: RecordLike) -> dict[str, str]:
    return {name: value.decode("utf-8", "replace") for name, value in record.headers or ()}


# --- what a record looks like --------------------------------------------------------------


def _time(timestamp_ms: int) -> str:
    moment = datetime.fromtimestamp(timestamp_ms / 1000, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _short_type(ce_type: str) -> str:
    return ce_type.removeprefix(TYPE_PREFIX + ".") or "-"


def _identity_headers(record: RecordLike) -> dict[str, str]:
    """The record's headers, with control id, sender and type read from the MSH of an
    HL7 v2 record that does not carry them in headers (a DLQ record of a message that
    could not be parsed far enough), and the sender of an event from its ``ce_source``
    (``urn:hl7v2:APP:FAC``: MSH-3.1 and MSH-4.1)."""
    headers = _text_headers(record)
    source = headers.get("ce_source", "")
    if "ce_hl7sender" not in headers and source.startswith(_HL7V2_SOURCE):
        app, _, facility = source.removeprefix(_HL7V2_SOURCE).partition(":")
        headers["ce_hl7sender"] = "|".join(
            "" if part == "-" else unquote(part) for part in (app, facility)
        )
    info = describe_record(record)
    if info.kind == HL7V2:
        for name, value in (
            ("ce_hl7controlid", info.control_id),
            ("ce_hl7sender", info.sender),
            ("ce_hl7messagetype", info.message_type),
        ):
            if value and name not in headers:
                headers[name] = value
    return headers


def text_line(record: RecordLike, prefix: str, *, data: bool = False) -> str:
    """``TIME TOPIC PARTITION@OFFSET TYPE name=value ...`` (then key and value with
    ``data``)."""
    headers = _identity_headers(record)
    topic = record.topic.removeprefix(prefix + ".")
    parts = [
        _time(record.timestamp),
        topic,
        f"{record.partition}@{record.offset}",
        _short_type(headers.get("ce_type", "")),
    ]
    parts += [f"{label}={headers[name]}" for name, label in _SHOWN if headers.get(name)]
    line = " ".join(parts)
    if data:
        key = getattr(record, "key", None)
        line += f"\n  key: {_text(key)}\n  value: {_text(record.value)}"
    return line


def json_line(record: RecordLike, *, data: bool = False) -> str:
    """One JSON object: coordinates, time and every header as text (``data`` adds the
    key, and the value: parsed JSON, or text)."""
    out: dict[str, Any] = {
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "timestamp": _time(record.timestamp),
        "headers": _identity_headers(record),
    }
    if data:
        out["key"] = _text(getattr(record, "key", None))
        value = record.value
        try:
            out["value"] = None if value is None else orjson.loads(value)
        except orjson.JSONDecodeError:
            out["value"] = _text(value)
    return orjson.dumps(out).decode()


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8", "replace")


# --- reading -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Start:
    """Where reading starts in each partition: ``beginning``, ``end``, ``since`` (the
    first record at or after ``since_ms``) or ``last`` (``last`` records before the end)."""

    where: str = "end"
    since_ms: int | None = None
    last: int = 0


async def tail(
    bootstrap: KafkaAddress,
    topics: Sequence[str],
    trace: Trace,
    show: Callable[[Any], None],
    *,
    start: Start,
    follow: bool,
    stop: asyncio.Event | None = None,
    timeout_s: float = 30.0,
) -> int:
    """Show the matching records of ``topics`` (full names); the number shown.

    Each topic is read in turn, in the order given, from ``start`` to the end offsets
    seen when reading began; with ``follow`` all of them are then read together as
    records arrive, until ``stop`` is set. ConfigError for an unknown topic;
    UnavailableError if Kafka does not answer within ``timeout_s`` (while reading up
    to the end, for each step).
    """
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.errors import KafkaError

    consumer = AIOKafkaConsumer(
        **kafka_options(bootstrap),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        request_timeout_ms=max(1000, int(timeout_s * 1000)),
    )
    shown = 0

    def consider(record: Any) -> None:
        nonlocal shown
        if trace.matches(record):
            shown += 1
            show(record)

    try:
        async with asyncio.timeout(timeout_s) as deadline:
            await consumer.start()  # inside: a failed start is stopped too (no leak)
            known = await consumer.topics()  # refreshes the metadata
            by_topic: dict[str, list[Any]] = {}
            for topic in topics:
                if topic not in known:
                    raise ConfigError(
                        f"topic {topic!r} does not exist on {bootstrap} (topics are "
                        f"<prefix>.{{{','.join(TOPIC_NAMES)}}} and routed ones)",
                        key="topic_prefix",
                    )
                numbers = sorted(consumer.partitions_for_topic(topic) or ())
                by_topic[topic] = [TopicPartition(topic, p) for p in numbers]
            every = [tp for tps in by_topic.values() for tp in tps]
            consumer.assign(every)
            ends: dict[Any, int] = await consumer.end_offsets(every)
            await _seek(consumer, every, ends, start)
            for tps in by_topic.values():  # in pipeline order, each up to its end
                until = {tp: ends[tp] for tp in tps}
                await read_until(consumer, until, consider, deadline=deadline, timeout_s=timeout_s)
                # Records past the end seen at the start wait for the follow phase: seek
                # back, so that none is lost or shown twice.
                for tp in tps:
                    if await consumer.position(tp) > ends[tp]:
                        consumer.seek(tp, ends[tp])
            deadline.reschedule(None)
        while follow and not (stop is not None and stop.is_set()):
            batches = await consumer.getmany(timeout_ms=_FETCH_WAIT_MS)
            for batch in batches.values():
                for record in batch:
                    consider(record)
    except TimeoutError as exc:
        raise UnavailableError(f"Kafka at {bootstrap}: no answer within {timeout_s:g} s") from exc
    except KafkaError as exc:
        raise UnavailableError(
            f"cannot read from Kafka at {bootstrap}: {type(exc).__name__}"
        ) from exc
    finally:
        with contextlib.suppress(Exception):
            await consumer.stop()
    return shown


async def _seek(consumer: Any, tps: list[Any], ends: dict[Any, int], start: Start) -> None:
    if start.where == "beginning":
        await consumer.seek_to_beginning(*tps)
    elif start.where == "since" and start.since_ms is not None:
        found = await consumer.offsets_for_times({tp: start.since_ms for tp in tps})
        for tp in tps:
            at = found.get(tp)
            consumer.seek(tp, ends[tp] if at is None else at.offset)
    elif start.where == "last":
        begins: dict[Any, int] = await consumer.beginning_offsets(tps)
        for tp in tps:
            consumer.seek(tp, max(begins[tp], ends[tp] - start.last))
    else:
        for tp in tps:
            consumer.seek(tp, ends[tp])


def start_of(*, from_beginning: bool, since: str | None, last: int | None, follow: bool) -> Start:
    """Where to start from the options: ``--since``, ``--last``, ``--from-beginning``;
    none of them: the end when following, else the beginning (a trace)."""
    if last is not None and last < 1:
        raise ConfigError("--last needs at least 1", key="last")
    if since is not None:
        return Start("since", since_ms=parse_time(since, key="since"))
    if last is not None:
        return Start("last", last=last)
    if from_beginning or not follow:
        return Start("beginning")
    return Start("end")
