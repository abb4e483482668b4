"""The leader's diagnosis duties: open cases from the events topics, escalate cases
nobody claimed, reap finished ones.

**Opening.** The leader reads the events topics (the default one and those the
config routes to) from the offsets kept in ``diagnosis/offsets`` (the start of
each partition the first time), matches every event against the rules, and
creates a case per match in a transaction that checks the leader's epoch: a
deposed leader opens nothing. Case ids are deterministic and a finished case
leaves a ``closed`` marker, so re-reading an event (after a leader change) or a
resent duplicate never opens a case twice. Offsets are saved (fenced too) at most
every ``OFFSET_SAVE_S`` and when the opener stops, not after every batch: a new
leader then re-reads at most that much, which opens nothing twice, and ZooKeeper
is not written to at the message rate. Reading Kafka, rather than opening cases on
the ingest path, means no accepted message can miss its case: the event is in Kafka
before its ACK.

**Escalation.** A case with no claim ``escalation_s`` after it opened (and again
after each further ``escalation_s``) is published as ``escalated`` (the
re-announcement) and its ``escalations`` count raised.

**Reaping.** ``closed`` markers older than the retention are deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from kazoo.exceptions import NodeExistsError, NoNodeError

from bridge.cluster import layout
from bridge.cluster.cluster_config import DiagnosisRule
from bridge.cluster.election import LeaderElection
from bridge.coordination import ZooKeeperSession, write_checked
from bridge.diagnosis import cases as c
from bridge.diagnosis.rules import EventFacts, matching_rules
from bridge.errors import CoordinationError, describe_failure
from bridge.kafka import KafkaAddress, OutRecord, kafka_options

log = logging.getLogger(__name__)

Publish = Callable[[Sequence[OutRecord]], Any]

#: How long stop() lets the duties finish on their own before it cancels them.
STOP_GRACE_S = 2.0

#: How often the case opener saves its read positions in ZooKeeper, at most.
OFFSET_SAVE_S = 1.0

#: How often the leader looks for closed-case markers past their retention (not on
#: every escalation pass: that runs at every case change).
REAP_INTERVAL_S = 60.0


def _headers(record: ConsumerRecord[bytes, bytes]) -> dict[str, str]:
    return {k: v.decode("utf-8", "replace") for k, v in record.headers}


def _might_match(rules: Sequence[DiagnosisRule], value: bytes) -> bool:
    """A cheap look before parsing the event (the leader reads every event): a rule
    that names interpretation codes or codes can only match if one of them occurs
    in the JSON as a ``"code"`` value. Events are compact JSON written by the bridge
    (orjson), so the needle is exact; a rule with neither criterion always looks."""
    for rule in rules:
        wanted = [*rule.match.interpretation, *(c.rpartition("|")[2] for c in rule.match.codes)]
        if not wanted:
            return True
        for code in wanted:
            if b'"code":' + orjson.dumps(code) in value:
                return True
    return False


def _age_s(opened: str) -> float:
    try:
        then = datetime.fromisoformat(opened.replace("Z", "+00:00"))
    except ValueError:
        return 0.0
    return (datetime.now(UTC) - then).total_seconds()


class DiagnosisDuties:
    """Runs while this instance leads (started and stopped by its leader role)."""

    def __init__(
        self,
        session: ZooKeeperSession,
        election: LeaderElection,
        *,
        bootstrap: KafkaAddress,
        diagnosis_topic: str,
        topics: Callable[[], list[str]],
        rules: Callable[[], list[DiagnosisRule]],
        publish: Publish,
        instance_id: str,
        closed_retention_s: float,
    ) -> None:
        self._session = session
        self._election = election
        self._bootstrap = bootstrap
        self._diagnosis_topic = diagnosis_topic
        self._topics = topics
        self._rules = rules
        self._publish = publish
        self._instance = instance_id
        self._retention_s = closed_retention_s
        self._tasks: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        #: True while the case opener reads the events topics (tests, status).
        self.reading = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reaped_at = 0.0

    @property
    def running(self) -> bool:
        return any(not t.done() for t in self._tasks)

    def start(self) -> None:
        if self.running:
            return
        self._stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._tasks = [
            loop.create_task(self._guard("case opener", self._open_cases)),
            loop.create_task(self._guard("escalation", self._escalate)),
        ]

    async def stop(self) -> None:
        """Let the duties end on their own (each looks at the stop flag at least every
        200 ms), cancelling only what still runs after ``STOP_GRACE_S``: a Kafka client
        cancelled while it connects can leave its connection open."""
        self._stop.set()
        self._wake.set()
        tasks, self._tasks = self._tasks, []
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=STOP_GRACE_S)
            for task in pending:
                task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _leading(self) -> bool:
        return not self._stop.is_set() and self._election.is_leader

    async def _guard(self, what: str, work: Callable[[], Any]) -> None:
        while self._leading():
            try:
                await work()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep leading; say why
                log.warning("diagnosis %s: %s; restarting", what, describe_failure(exc))
                await asyncio.sleep(0.5)

    # --- opening --------------------------------------------------------------------

    async def _open_cases(self) -> None:
        consumer = AIOKafkaConsumer(
            **kafka_options(self._bootstrap),
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=10,
        )
        try:
            await consumer.start()  # inside: a failed start is stopped too (no leak)
            partitions = await topic_partitions(consumer, self._topics())
            if not partitions:  # not provisioned yet
                await asyncio.sleep(0.2)
                return
            consumer.assign(partitions)
            log.info("case opener reading %d partitions", len(partitions))
            for tp in partitions:
                stored = await self._stored_offset(tp)
                if stored is None:
                    await consumer.seek_to_beginning(tp)
                else:
                    consumer.seek(tp, stored)
            topics_seen = set(self._topics())
            self.reading = True
            read: dict[TopicPartition, int] = {}  # read through, not saved yet
            saved_at = time.monotonic()
            try:
                while self._leading() and set(self._topics()) == topics_seen:
                    batches = await consumer.getmany(*partitions, timeout_ms=200, max_records=500)
                    rules = self._rules()
                    for tp, records in batches.items():
                        for record in records:
                            await self._open_for(record, rules)
                        read[tp] = records[-1].offset + 1
                    if read and time.monotonic() - saved_at >= OFFSET_SAVE_S:
                        await self._save_offsets(read)
                        saved_at = time.monotonic()
            finally:
                if read and self._election.fence_version is not None:
                    with contextlib.suppress(CoordinationError):
                        await self._save_offsets(read)
        finally:
            self.reading = False
            await consumer.stop()

    async def _open_for(
        self, record: ConsumerRecord[bytes, bytes], rules: list[DiagnosisRule]
    ) -> None:
        headers = _headers(record)
        event_id = headers.get("ce_id")
        if not event_id or record.value is None or not rules:
            return
        if not _might_match(rules, record.value):
            return
        try:
            data = orjson.loads(record.value)
        except orjson.JSONDecodeError:
            return
        facts = EventFacts(
            message_type=headers.get("ce_hl7messagetype"), source=headers.get("ce_source")
        )
        for match in matching_rules(rules, data, facts):
            rule = match.rule
            case = c.Case(
                case=c.case_id(event_id, rule.name),
                rule=rule.name,
                priority=rule.priority,
                event_id=event_id,
                topic=record.topic,
                partition=record.partition,
                offset=record.offset,
                opened=datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                escalation_s=rule.escalation_s,
                epoch=self._election.epoch,
                resource_type=match.resource_type,
                resource_id=match.resource_id,
            )
            if await self._create(case):
                self._wake.set()
                await self._publish(
                    [
                        c.lifecycle_record(
                            self._diagnosis_topic, "opened", case, record.key,
                            instance=self._instance, epoch=self._election.epoch,
                        )
                    ]
                )  # fmt: skip

    async def _create(self, case: c.Case) -> bool:
        """Create the case node (fenced); False if it exists or was closed before."""
        session, client = self._session, self._session.client
        closed = await session.call(client.exists, c.path(session, c.CLOSED, case.case))
        if closed is not None:
            return False
        await session.call(client.ensure_path, c.path(session, c.CASES, case.rule))
        fence = self._election.fence_version
        if fence is None:
            raise CoordinationError("no longer leader: cases are not opened")
        transaction = client.transaction()
        transaction.check(session.path(layout.LEADER), fence)
        transaction.create(c.path(session, c.CASES, case.rule, case.case), case.to_bytes())
        results = await session.call(transaction.commit)
        if isinstance(results[-1], NodeExistsError):
            return False
        failures = [r for r in results if isinstance(r, Exception)]
        if failures:
            raise CoordinationError(f"case not opened: {type(failures[0]).__name__}")
        log.info("case %s opened (rule %s)", case.case, case.rule)
        return True

    async def _stored_offset(self, tp: TopicPartition) -> int | None:
        session = self._session
        try:
            data, _ = await session.call(
                session.client.get, c.path(session, c.OFFSETS, tp.topic, str(tp.partition))
            )
        except NoNodeError:
            return None
        return int(orjson.loads(data)["offset"])

    async def _save_offsets(self, read: dict[TopicPartition, int]) -> None:
        """Save and forget the positions read through (fenced: a deposed leader saves
        nothing)."""
        for tp, offset in list(read.items()):
            await self._save_offset(tp, offset)
            del read[tp]

    async def _save_offset(self, tp: TopicPartition, offset: int) -> None:
        session = self._session
        fence = self._election.fence_version
        if fence is None:
            raise CoordinationError("no longer leader: offsets are not saved")
        results = await write_checked(
            session,
            c.path(session, c.OFFSETS, tp.topic, str(tp.partition)),
            orjson.dumps({"offset": offset}),
            check=(session.path(layout.LEADER), fence),
        )
        failures = [r for r in results if isinstance(r, Exception)]
        if failures:
            raise CoordinationError(f"offsets not saved: {type(failures[0]).__name__}")

    # --- escalation and reaping -----------------------------------------------------------

    async def _escalate(self) -> None:
        session, client = self._session, self._session.client
        await session.call(client.ensure_path, c.path(session, c.CASES))
        while self._leading():
            self._wake.clear()
            next_due = 60.0
            for rule in await session.call(client.get_children, c.path(session, c.CASES)):
                rule_path = c.path(session, c.CASES, rule)
                try:
                    names = await session.call(
                        client.get_children, rule_path, watch=self._wake_threadsafe
                    )
                except NoNodeError:
                    continue
                for name in names:
                    due = await self._escalate_one(rule, name)
                    if due is not None:
                        next_due = min(next_due, due)
            if time.monotonic() - self._reaped_at >= REAP_INTERVAL_S:
                await self._reap_closed()
                self._reaped_at = time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=max(0.05, next_due))

    def _wake_threadsafe(self, _event: Any = None) -> None:
        """A watch callback (kazoo's thread). One bound method, registered again and
        again: kazoo keeps watchers in a set, so they do not pile up."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._wake.set)

    async def _escalate_one(self, rule: str, name: str) -> float | None:
        """Escalate the case if it is due; the seconds until it is due otherwise."""
        session, client = self._session, self._session.client
        node = c.path(session, c.CASES, rule, name)
        try:
            data, stat = await session.call(client.get, node)
        except NoNodeError:
            return None
        case = c.Case.from_bytes(data)
        claimed = await session.call(client.exists, c.path(session, c.CLAIMS, case.case))
        if claimed is not None:
            return None
        due_in = case.escalation_s * (case.escalations + 1) - _age_s(case.opened)
        if due_in > 0:
            return due_in
        case.escalations += 1
        fence = self._election.fence_version
        if fence is None:
            return None
        transaction = client.transaction()
        transaction.check(session.path(layout.LEADER), fence)
        transaction.set_data(node, case.to_bytes(), version=stat.version)
        results = await session.call(transaction.commit)
        if any(isinstance(r, Exception) for r in results):
            return 0.1  # changed meanwhile (claimed, finished): look again
        key = await fetch_key(self._bootstrap, case)
        await self._publish(
            [
                c.lifecycle_record(
                    self._diagnosis_topic, "escalated", case, key, instance=self._instance,
                    epoch=self._election.epoch, sequence=case.escalations,
                )
            ]
        )  # fmt: skip
        log.info("case %s escalated (%d)", case.case, case.escalations)
        return case.escalation_s

    async def _reap_closed(self) -> None:
        session, client = self._session, self._session.client
        closed = c.path(session, c.CLOSED)
        try:
            names = await session.call(client.get_children, closed)
        except NoNodeError:
            return
        now_ms = time.time() * 1000
        for name in names:
            with contextlib.suppress(NoNodeError):
                stat = await session.call(client.exists, f"{closed}/{name}")
                if stat is not None and now_ms - stat.ctime > self._retention_s * 1000:
                    await session.call(client.delete, f"{closed}/{name}")


async def topic_partitions(
    consumer: AIOKafkaConsumer, topics: Sequence[str]
) -> list[TopicPartition]:
    """The partitions of the topics that exist (``topics()`` refreshes the metadata;
    ``partitions_for_topic`` alone only reads a cache that knows assigned topics)."""
    known = await consumer.topics()
    found: list[TopicPartition] = []
    for topic in topics:
        if topic in known:
            numbers = consumer.partitions_for_topic(topic) or set()
            found += [TopicPartition(topic, n) for n in sorted(numbers)]
    return found


async def fetch_record(
    bootstrap: KafkaAddress, topic: str, partition: int, offset: int
) -> ConsumerRecord[bytes, bytes] | None:
    """The record at a Kafka coordinate (None if it is gone: retention)."""
    consumer = AIOKafkaConsumer(**kafka_options(bootstrap), group_id=None, enable_auto_commit=False)
    try:
        await consumer.start()  # inside: a failed start is stopped too (no leak)
        tp = TopicPartition(topic, partition)
        consumer.assign([tp])
        consumer.seek(tp, offset)
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            batches = await consumer.getmany(tp, timeout_ms=200, max_records=1)
            for record in batches.get(tp, []):
                if record.offset == offset:
                    return record
                if record.offset > offset:
                    return None
        return None
    finally:
        await consumer.stop()


async def fetch_key(bootstrap: KafkaAddress, case: c.Case) -> bytes | None:
    record = await fetch_record(bootstrap, case.topic, case.partition, case.offset)
    return None if record is None else record.key
