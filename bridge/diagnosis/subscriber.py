"""A remote-diagnosis subscriber: woken by ZooKeeper watches, takes one case at a
time with an ephemeral claim, runs its handler, publishes the result.

Use it as a library::

    subscriber = Subscriber(SubscriberSettings(zookeeper=..., kafka=..., cluster=...,
                            rules=["critical-results"]), handler=ExecHandler("./review.sh"))
    await subscriber.run(stop_event)

or as ``hl7bridge subscribe``. The protocol, for every case of its rules:

1. a watch on ``diagnosis/cases/<rule>`` wakes the subscriber when a case opens (no
   polling); a case claimed by another gets a watch on that claim, so its release
   (done, failed for a retry, or the claimer's death) wakes this one;
2. **claim**: create the ephemeral ``diagnosis/claims/<case>``; exactly one wins. The
   winner then reads the case again: if it is gone (finished a moment ago), it lets
   go without doing anything, so nothing is handled twice after completion;
3. fetch the event from Kafka by the case's coordinates; publish ``claimed``;
4. run the handler; on success publish the result and ``completed`` in one batch,
   then, in one transaction, write the ``closed`` marker and delete the case; then
   drop the claim;
5. on failure the case's ``attempts`` rise and the claim is dropped, so a
   subscriber (this one or another) retries it; at ``max_attempts`` the case is
   published ``failed`` and closed.

If the subscriber dies, its claim vanishes with its ZooKeeper session and another
subscriber takes the case. A death between publishing the result and closing the
case lets the next subscriber handle it again: at least once, and the result's
``ce_id`` is the same both times (a consumer drops the duplicate).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from kazoo.exceptions import NodeExistsError, NoNodeError

from bridge.coordination import Rerun, ZooKeeperSession, ZooKeeperTls
from bridge.diagnosis import cases as c
from bridge.diagnosis.handlers import CaseInfo, Handler, HandlerError
from bridge.diagnosis.leader import fetch_record
from bridge.envelope import now_rfc3339
from bridge.errors import BridgeError, CoordinationError, describe_failure
from bridge.kafka import KafkaAddress, KafkaPublisher, Topics

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SubscriberSettings:
    zookeeper: str
    base_path: str
    #: Bootstrap servers, or a full client config (TLS, SASL).
    kafka: KafkaAddress
    topic_prefix: str
    rules: tuple[str, ...]
    subscriber_id: str = field(
        default_factory=lambda: f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
    )
    max_attempts: int = 3
    session_timeout_s: float = 6.0
    digest: str | None = None
    zookeeper_tls: ZooKeeperTls | None = None
    kafka_idempotence: bool = False
    kafka_publish_timeout_s: float = 10.0


class Subscriber:
    def __init__(self, settings: SubscriberSettings, handler: Handler) -> None:
        self.settings = settings
        self._handler = handler
        self.session = ZooKeeperSession(
            settings.zookeeper,
            settings.base_path,
            session_timeout_s=settings.session_timeout_s,
            digest=settings.digest,
            tls=settings.zookeeper_tls,
        )
        self._topics = Topics(settings.topic_prefix)
        self._publisher = KafkaPublisher(
            settings.kafka,
            client_id=f"hl7bridge-subscriber-{settings.subscriber_id}",
            idempotence=settings.kafka_idempotence,
            publish_timeout_s=settings.kafka_publish_timeout_s,
        )
        self._running = False
        self._scan = Rerun(self._work, what="diagnosis subscriber", enabled=lambda: self._running)
        #: Cases this subscriber handled (completed or failed): for tests and status.
        self.handled: list[str] = []
        self.session.add_listener(self._on_state)

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        await self.session.start()
        await self._publisher.start()
        self._scan.bind(asyncio.get_running_loop())
        await self._register()
        self._running = True
        self._scan.request()

    async def stop(self) -> None:
        self._running = False
        await self._scan.cancel()
        aclose = getattr(self._handler, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()
        await self._publisher.stop()
        await self.session.stop()

    async def run(self, stop: asyncio.Event) -> None:
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.stop()

    async def _register(self) -> None:
        """The ephemeral registration, and the paths the work needs (once, not per scan)."""
        session, client = self.session, self.session.client
        for parts in ((c.SUBSCRIBERS,), (c.CLAIMS,), *((c.CASES, r) for r in self.settings.rules)):
            await session.call(client.ensure_path, c.path(session, *parts))
        data = orjson.dumps(
            {"subscriber": self.settings.subscriber_id, "rules": list(self.settings.rules),
             "host": socket.gethostname(), "pid": os.getpid(), "started": now_rfc3339()}
        )  # fmt: skip
        node = c.path(session, c.SUBSCRIBERS, self.settings.subscriber_id)
        with contextlib.suppress(NodeExistsError):
            await session.call(client.create, node, data, ephemeral=True)

    def _on_state(self, state: str) -> None:
        if state == "CONNECTED" and self._running:
            asyncio.get_running_loop().create_task(self._reregister())

    async def _reregister(self) -> None:
        try:
            await self._register()
        except BridgeError as exc:
            log.warning("subscriber registration: %s", describe_failure(exc))
        self._scan.request()

    # --- the work -------------------------------------------------------------------------

    async def _work(self) -> None:
        """Take every claimable case of our rules, highest priority and oldest first."""
        session, client = self.session, self.session.client
        pending: list[tuple[int, str, str, str]] = []
        for rule in self.settings.rules:
            rule_path = c.path(session, c.CASES, rule)
            names = await session.call(
                client.get_children, rule_path, watch=self._scan.request_threadsafe
            )
            for name in names:
                try:
                    data, _ = await session.call(client.get, f"{rule_path}/{name}")
                except NoNodeError:
                    continue
                case = c.Case.from_bytes(data)
                pending.append((case.priority, case.opened, rule, name))
        for _, _, rule, name in sorted(pending):
            if not self._running:
                return
            await self._try(rule, name)

    async def _try(self, rule: str, name: str) -> None:
        session, client = self.session, self.session.client
        claim = c.path(session, c.CLAIMS, name)
        claim_data = orjson.dumps(
            {"subscriber": self.settings.subscriber_id, "since": now_rfc3339()}
        )
        try:
            await session.call(client.create, claim, claim_data, ephemeral=True)
        except NodeExistsError:
            # Another has it: its release (or death) wakes us.
            await session.call(client.exists, claim, watch=self._scan.request_threadsafe)
            return
        try:
            node = c.path(session, c.CASES, rule, name)
            try:
                data, stat = await session.call(client.get, node)
            except NoNodeError:
                return  # finished a moment ago: nothing to do
            await self._handle(node, c.Case.from_bytes(data), stat.version)
        finally:
            with contextlib.suppress(NoNodeError, CoordinationError):
                await session.call(client.delete, claim)

    async def _handle(self, node: str, case: c.Case, version: int) -> None:
        session, client = self.session, self.session.client
        diagnosis = self._topics.diagnosis
        me = self.settings.subscriber_id
        record = await fetch_record(self.settings.kafka, case.topic, case.partition, case.offset)
        key = None if record is None else record.key
        attempt = case.attempts + 1
        await self._publisher.publish(
            [c.lifecycle_record(diagnosis, "claimed", case, key, instance=me,
                                extra={"subscriber": me, "attempt": attempt}, sequence=attempt)]
        )  # fmt: skip
        info = CaseInfo(
            case_id=case.case, rule=case.rule, priority=case.priority, event_id=case.event_id,
            topic=case.topic, partition=case.partition, offset=case.offset,
            opened=case.opened, attempt=attempt,
            resource_type=case.resource_type, resource_id=case.resource_id,
        )  # fmt: skip
        result: dict[str, Any] | None = None
        problem = "the event is no longer on Kafka"
        if record is not None:
            try:
                result = await self._handler(info, _structured(record))
            except HandlerError as exc:
                problem = str(exc)
            except Exception as exc:  # a handler defect is a failed attempt, not a crash
                problem = f"handler failed: {type(exc).__name__}"
        case.attempts = attempt
        if result is not None:
            await self._publisher.publish(
                [c.result_record(diagnosis, case, key, result, instance=me),
                 c.lifecycle_record(diagnosis, "completed", case, key, instance=me,
                                    extra={"subscriber": me,
                                           "result_type": str(result.get("resourceType"))})]
            )  # fmt: skip
            await self._close(node, case, "completed")
            log.info("case %s completed by %s", case.case, me)
            return
        log.warning("case %s attempt %d failed: %s", case.case, attempt, problem)
        if attempt >= self.settings.max_attempts:
            await self._publisher.publish(
                [c.lifecycle_record(diagnosis, "failed", case, key, instance=me,
                                    extra={"subscriber": me, "reason": problem})]
            )  # fmt: skip
            await self._close(node, case, "failed")
            return
        with contextlib.suppress(Exception):
            await session.call(client.set, node, case.to_bytes(), version=version)
        await asyncio.sleep(0.2)  # a moment before the retry (by whoever claims it)
        self._scan.request()

    async def _close(self, node: str, case: c.Case, outcome: str) -> None:
        session, client = self.session, self.session.client
        await session.call(client.ensure_path, c.path(session, c.CLOSED))
        transaction = client.transaction()
        transaction.create(
            c.path(session, c.CLOSED, case.case),
            orjson.dumps({"outcome": outcome, "closed": now_rfc3339()}),
        )
        transaction.delete(node)
        results = await session.call(transaction.commit)
        if any(isinstance(r, Exception) for r in results):
            with contextlib.suppress(NoNodeError):
                await session.call(client.delete, node)
        self.handled.append(case.case)


def _structured(record: Any) -> dict[str, Any]:
    """The event as a CloudEvent in structured JSON form (attributes + data)."""
    out: dict[str, Any] = {}
    for name, value in record.headers:
        text = value.decode("utf-8", "replace")
        if name == "content-type":
            out["datacontenttype"] = text
        elif name.startswith("ce_"):
            out[name.removeprefix("ce_")] = text
    out["data"] = orjson.loads(record.value) if record.value else None
    return out


def structured_event(record: Any) -> Mapping[str, Any]:
    return _structured(record)
