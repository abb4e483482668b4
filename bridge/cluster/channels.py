"""Singleton channels: spread over the live members, run by exactly one of them.

Who runs what (DESIGN.md §4: the leader's duty):

* The **leader** assigns each configured channel to a live member by rendezvous
  (highest-random-weight) hashing, so a member joining or leaving moves only the
  channels it wins or held. It writes ``channels/<name>/assignment`` =
  ``{"instance": id, "epoch": leader epoch}`` in a transaction that checks the
  ``leader`` znode's version: a deposed leader's write fails.
* The **assigned member** takes the channel's ephemeral ``owner`` lock (waiting,
  with a watch, while a previous owner still holds it), bumps the channel's
  ``fence`` node (its version is the ownership token) and runs the channel.
  What the channel publishes is stamped with the assignment's leader epoch
  (``ce_leaderepoch``).
* It stops **at once** on SUSPENDED (it cannot know whether it still owns the
  channel), when the assignment moves away, or when a progress write fails
  because another owner bumped the fence. A kill -9 leaves the lock until the
  session expires; the next owner cannot start before that.

Exactly once: the directory channel saves its progress (``channels/<name>/
progress/<key>``) before and after each message, guarded by the fence version;
a message found "in flight" by a new owner is looked up on Kafka (its
deterministic event id on ``<prefix>.raw.hl7v2``) after the previous owner's
publish timeout has passed, and skipped if it is there.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from kazoo.exceptions import BadVersionError, NodeExistsError, NoNodeError

from bridge.cluster import layout
from bridge.cluster.election import LeaderElection
from bridge.coordination import Rerun, ZooKeeperSession, write_checked
from bridge.errors import CoordinationError, describe_failure
from bridge.kafka import KafkaAddress, kafka_options

log = logging.getLogger(__name__)


def rendezvous_owner(channel: str, members: Iterable[str]) -> str | None:
    """The member that wins ``channel`` by highest random weight (None: no member)."""

    def weight(member: str) -> bytes:
        return hashlib.blake2b(f"{channel}\x1f{member}".encode(), digest_size=8).digest()

    return max(members, key=weight, default=None)


@dataclass(frozen=True, slots=True)
class Assignment:
    instance: str
    epoch: int


def _channel_path(session: ZooKeeperSession, name: str, *parts: str) -> str:
    return session.path(layout.CHANNELS, name, *parts)


async def read_assignment(session: ZooKeeperSession, name: str) -> Assignment | None:
    try:
        data, _ = await session.call(
            session.client.get, _channel_path(session, name, layout.ASSIGNMENT)
        )
        value = orjson.loads(data)
        return Assignment(str(value["instance"]), int(value["epoch"]))
    except NoNodeError:
        return None
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


# --- the leader's side ------------------------------------------------------------------


class ChannelAssigner:
    """Run on the leader: keep every configured channel assigned to a live member."""

    def __init__(self, session: ZooKeeperSession, election: LeaderElection) -> None:
        self._session = session
        self._election = election

    async def reconcile(self, channels: Sequence[str]) -> dict[str, str]:
        """Assign each channel by rendezvous over the live members; reap the nodes of
        channels no longer configured. Returns channel → instance."""
        session, client = self._session, self._session.client
        fence = self._election.fence_version
        epoch = self._election.epoch
        if fence is None or epoch is None:
            return {}
        await session.call(client.ensure_path, session.path(layout.CHANNELS))
        members = await session.call(client.get_children, session.path(layout.MEMBERS))
        result: dict[str, str] = {}
        for name in channels:
            owner = rendezvous_owner(name, members)
            if owner is None:
                continue
            result[name] = owner
            current = await read_assignment(session, name)
            if current == Assignment(owner, epoch):
                continue
            await self._write(name, Assignment(owner, epoch), fence)
        await self._reap(set(channels))
        return result

    async def _write(self, name: str, assignment: Assignment, fence: int) -> None:
        session = self._session
        path = _channel_path(session, name, layout.ASSIGNMENT)
        data = orjson.dumps({"instance": assignment.instance, "epoch": assignment.epoch})
        results = await write_checked(
            session, path, data, check=(session.path(layout.LEADER), fence)
        )
        failures = [r for r in results if isinstance(r, Exception)]
        if failures:
            raise CoordinationError(
                f"channel assignment not written ({type(failures[0]).__name__}): "
                "no longer leader, or a concurrent change"
            )
        log.info(
            "channel %s assigned to %s (epoch %d)", name, assignment.instance, assignment.epoch
        )

    async def _reap(self, configured: set[str]) -> None:
        """Delete the state of channels that are no longer configured and not running."""
        session, client = self._session, self._session.client
        try:
            names = await session.call(client.get_children, session.path(layout.CHANNELS))
        except NoNodeError:
            return
        for name in names:
            if name in configured:
                continue
            owner = await session.call(client.exists, _channel_path(session, name, layout.OWNER))
            if owner is not None:
                continue  # still running somewhere: reaped on a later pass
            with contextlib.suppress(NoNodeError):
                await session.call(client.delete, _channel_path(session, name), recursive=True)
                log.info("reaped the state of removed channel %s", name)


# --- the member's side ------------------------------------------------------------------


class RunnableChannel(Protocol):
    async def run(self, stop: asyncio.Event) -> None: ...


@dataclass(slots=True)
class OwnedChannel:
    """A channel this member runs: its stop event, task and fence."""

    name: str
    epoch: int
    fence_version: int
    stop: asyncio.Event
    task: asyncio.Task[None] | None = None
    fenced: bool = False


ChannelFactory = Callable[[str, "ChannelContext"], RunnableChannel | None]


@dataclass(frozen=True, slots=True)
class ChannelContext:
    """What a channel gets from the cluster: its epoch, fencing and progress store."""

    name: str
    epoch: int
    still_owner: Callable[[], bool]
    progress: ZkProgressStore
    #: Seconds to wait, on taking over a file with a message in flight, before asking
    #: Kafka whether it was published (the previous owner's publish timeout).
    in_doubt_grace_s: float


class ChannelRunner:
    """Run on every member: run the channels assigned to this instance, one owner each."""

    def __init__(
        self,
        session: ZooKeeperSession,
        instance_id: str,
        factory: ChannelFactory,
        *,
        in_doubt_grace_s: float,
    ) -> None:
        self._session = session
        self.instance_id = instance_id
        self._factory = factory
        self._grace_s = in_doubt_grace_s
        self._configured: list[str] = []
        self.owned: dict[str, OwnedChannel] = {}
        self._running = False
        self._rerun = Rerun(
            self._reconcile,
            what="channel reconcile",
            enabled=lambda: self._running and self._session.connected,
        )
        session.add_listener(self._on_state)

    async def start(self) -> None:
        self._rerun.bind(asyncio.get_running_loop())
        self._running = True
        self.schedule()

    async def stop(self) -> None:
        """Stop every channel and release its lock (a graceful handover)."""
        self._running = False
        await self._rerun.cancel()
        for name in list(self.owned):
            await self._release(name)

    def configure(self, channels: Sequence[str]) -> None:
        self._configured = list(channels)
        self.schedule()

    def schedule(self) -> None:
        """Reconcile soon (ZooKeeper watches come through ``_poke``)."""
        self._rerun.request()

    def _poke(self, *_: Any) -> None:
        self._rerun.request_threadsafe()

    async def _reconcile(self) -> None:
        if not self._session.connected:
            return
        session = self._session
        for name in self._configured:
            # A one-shot watch, set again on every pass: simpler to reason about across
            # session losses than kazoo's long-lived DataWatch objects.
            assignment_path = _channel_path(session, name, layout.ASSIGNMENT)
            await session.call(session.client.ensure_path, _channel_path(session, name))
            exists = await session.call(session.client.exists, assignment_path, watch=self._poke)
            assignment = await read_assignment(session, name) if exists is not None else None
            mine = assignment is not None and assignment.instance == self.instance_id
            owned = self.owned.get(name)
            if owned is not None and (
                not mine or owned.fenced or owned.task is None or owned.task.done()
            ):
                await self._release(name)
                owned = None
            if mine and owned is None and assignment is not None:
                await self._acquire(name, assignment)
        for name in list(self.owned):
            if name not in self._configured:
                await self._release(name)

    async def _acquire(self, name: str, assignment: Assignment) -> None:
        session, client = self._session, self._session.client
        owner_path = _channel_path(session, name, layout.OWNER)
        data = orjson.dumps({"instance": self.instance_id, "since": _now()})
        try:
            await session.call(client.create, owner_path, data, ephemeral=True)
        except NodeExistsError:
            holder = await session.call(client.exists, owner_path, watch=self._poke)
            if holder is not None and holder.ephemeralOwner != client.client_id[0]:
                log.info("channel %s: waiting for the previous owner to let go", name)
                return  # the watch wakes us when the previous owner's lock goes
            # Else our own lock from before (same session): take it over.
        fence_path = _channel_path(session, name, layout.FENCE)
        await session.call(client.ensure_path, fence_path)
        stat = await session.call(
            client.set, fence_path, orjson.dumps({"instance": self.instance_id})
        )
        owned = OwnedChannel(name, assignment.epoch, stat.version, asyncio.Event())

        def still_owner() -> bool:
            return (
                self._running
                and self._session.connected
                and not owned.fenced
                and not owned.stop.is_set()
                and self.owned.get(name) is owned
            )

        context = ChannelContext(
            name=name,
            epoch=assignment.epoch,
            still_owner=still_owner,
            progress=ZkProgressStore(session, name, fence_path, owned),
            in_doubt_grace_s=self._grace_s,
        )
        channel = self._factory(name, context)
        if channel is None:
            with contextlib.suppress(NoNodeError, CoordinationError):
                await session.call(client.delete, owner_path)
            return
        self.owned[name] = owned
        owned.task = asyncio.get_running_loop().create_task(self._run(owned, channel))
        log.info("channel %s running here (epoch %d)", name, assignment.epoch)

    async def _run(self, owned: OwnedChannel, channel: RunnableChannel) -> None:
        try:
            await channel.run(owned.stop)
        except FencedError:
            owned.fenced = True
            log.warning("channel %s: another owner took over; stopped", owned.name)
        except Exception as exc:
            log.error("channel %s failed: %s", owned.name, describe_failure(exc))
        finally:
            if self._running:
                self.schedule()

    async def _release(self, name: str) -> None:
        owned = self.owned.pop(name, None)
        if owned is None:
            return
        owned.stop.set()
        if owned.task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(owned.task, timeout=30)
        if self._session.connected and not owned.fenced:
            session, client = self._session, self._session.client
            owner_path = _channel_path(session, name, layout.OWNER)
            with contextlib.suppress(NoNodeError, CoordinationError):
                stat = await session.call(client.exists, owner_path)
                if stat is not None and stat.ephemeralOwner == client.client_id[0]:
                    await session.call(client.delete, owner_path)
        log.info("channel %s released", name)

    def _on_state(self, state: str) -> None:
        if state in ("SUSPENDED", "LOST"):
            # Stop at once: this instance cannot know whether it still owns anything.
            for owned in self.owned.values():
                owned.fenced = state == "LOST" or owned.fenced
                owned.stop.set()
        elif state == "CONNECTED":
            self.schedule()


class FencedError(CoordinationError):
    """A progress write failed because another owner took the channel over."""


def _now() -> str:
    from bridge.envelope import now_rfc3339

    return now_rfc3339()


# --- progress and the in-doubt check ----------------------------------------------------


class ZkProgressStore:
    """A channel's per-file progress in ZooKeeper, written only while this instance
    still owns the channel (every write checks the fence version)."""

    def __init__(
        self, session: ZooKeeperSession, name: str, fence_path: str, owned: OwnedChannel
    ) -> None:
        self._session = session
        self._name = name
        self._fence_path = fence_path
        self._owned = owned

    def _path(self, key: str) -> str:
        return _channel_path(self._session, self._name, layout.PROGRESS, key)

    async def load_json(self, key: str) -> dict[str, Any] | None:
        try:
            data, _ = await self._session.call(self._session.client.get, self._path(key))
        except NoNodeError:
            return None
        value = orjson.loads(data)
        return value if isinstance(value, dict) else None

    async def save_json(self, key: str, value: Mapping[str, Any]) -> None:
        results = await write_checked(
            self._session,
            self._path(key),
            orjson.dumps(value),
            check=(self._fence_path, self._owned.fence_version),
        )
        self._check_results(results)

    async def clear(self, key: str) -> None:
        transaction = self._session.client.transaction()
        transaction.check(self._fence_path, self._owned.fence_version)
        transaction.delete(self._path(key))
        with contextlib.suppress(NoNodeError):
            await self._commit(transaction)

    async def _commit(self, transaction: Any) -> None:
        self._check_results(await self._session.call(transaction.commit))

    def _check_results(self, results: list[Any]) -> None:
        failures = [r for r in results if isinstance(r, Exception)]
        if any(isinstance(f, BadVersionError) for f in failures) or (
            failures and isinstance(failures[0], NoNodeError) and len(failures) == len(results)
        ):
            self._owned.fenced = True
            self._owned.stop.set()
            raise FencedError(f"channel {self._name}: no longer the owner")
        if failures:
            raise CoordinationError(f"progress not written: {type(failures[0]).__name__}")


class KafkaEventLookup:
    """Was the event with this id published? Looks for its ``ce_id`` on the raw topic
    among the records of the last ``lookback_s`` seconds (all of them when the broker
    cannot search by time)."""

    def __init__(self, bootstrap: KafkaAddress, topic: str, *, lookback_s: float = 600.0) -> None:
        self._bootstrap = bootstrap
        self._topic = topic
        self._lookback_s = lookback_s

    async def published(self, event_id: str) -> bool:
        wanted = event_id.encode()
        consumer = AIOKafkaConsumer(
            **kafka_options(self._bootstrap),
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        try:
            await consumer.start()  # inside: a failed start is stopped too (no leak)
            known = await consumer.topics()  # refreshes the metadata
            parts = consumer.partitions_for_topic(self._topic) if self._topic in known else None
            partitions = [TopicPartition(self._topic, p) for p in sorted(parts or ())]
            if not partitions:
                return False
            consumer.assign(partitions)
            ends: dict[TopicPartition, int] = await consumer.end_offsets(partitions)
            since_ms = int((time.time() - self._lookback_s) * 1000)
            try:
                found = await consumer.offsets_for_times({tp: since_ms for tp in partitions})
            except Exception:  # a broker without time search: read from the start
                found = {}
            for tp in partitions:
                start = found.get(tp)
                if start is None:
                    await consumer.seek_to_beginning(tp)
                else:
                    consumer.seek(tp, start.offset)
            deadline = time.monotonic() + 30.0
            while time.monotonic() < deadline:
                positions = {tp: await consumer.position(tp) for tp in partitions}
                if all(positions[tp] >= ends[tp] for tp in partitions):
                    return False
                batches = await consumer.getmany(*partitions, timeout_ms=200)
                for records in batches.values():
                    for record in records:
                        if any(k == "ce_id" and v == wanted for k, v in record.headers):
                            return True
            raise CoordinationError("in-doubt check: the raw topic could not be read in time")
        finally:
            await consumer.stop()


InDoubtLookup = Callable[[str], Awaitable[bool]]
