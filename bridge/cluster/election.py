"""Leader election with an epoch (fencing token), on ZooKeeper, seen from asyncio.

The recipe is ZooKeeper's classic one (the one kazoo's ``Election`` wraps): each
instance creates an ephemeral sequential node under ``election/``; the lowest is
the leader; every other watches only its predecessor, so a leader change wakes
one instance, not all. We write it out rather than use ``kazoo.recipe.election``
because that recipe blocks a thread for the whole term and has no notion of
SUSPENDED, and fencing needs both.

Epoch: the new leader increments ``leader``'s epoch with a compare-and-set on
the znode version, so epochs are strictly increasing across leaders and a
stale leader can never write one. Work that only the leader may do is stamped
with the epoch (``ce_leaderepoch``) and guarded by ZooKeeper transactions that
check the ``leader`` node's version (:meth:`LeaderElection.fence_version`).

Session states, as DESIGN.md §4 asks:

* SUSPENDED: leadership pauses at once (listeners hear ``paused``); the leader
  may still be leader, but cannot know, so it does no singleton work.
* CONNECTED again with the same session: the candidate node survived; if it is
  still the lowest, leadership resumes with the same epoch.
* LOST: the candidate node is gone with the session; leadership is dropped
  (``follower``), and a new candidate is created once a new session connects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
from kazoo.exceptions import BadVersionError, NodeExistsError, NoNodeError
from kazoo.protocol.states import ZnodeStat

from bridge.cluster import layout
from bridge.coordination import Rerun, ZooKeeperSession
from bridge.errors import CoordinationError, describe_failure

log = logging.getLogger(__name__)

Role = Literal["leader", "follower", "paused"]
RoleListener = Callable[[Role, int | None], None]


@dataclass(frozen=True, slots=True)
class LeaderInfo:
    """What ``leader`` says: who leads and under which epoch."""

    leader: str | None
    epoch: int
    version: int


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class LeaderElection:
    """This instance's candidacy; :attr:`role` is ``leader``, ``follower`` or ``paused``."""

    def __init__(self, session: ZooKeeperSession, instance_id: str) -> None:
        self._session = session
        self.instance_id = instance_id
        self.role: Role = "follower"
        #: The epoch of this instance's current (or last) term as leader.
        self.epoch: int | None = None
        #: The version of the ``leader`` znode this instance wrote (its fence).
        self._leader_version: int | None = None
        self._node: str | None = None
        self._listeners: list[RoleListener] = []
        self._running = False
        self._rerun = Rerun(self._evaluate, what="leader election", enabled=lambda: self._running)
        session.add_listener(self._on_state)

    # --- public -----------------------------------------------------------------------

    @property
    def is_leader(self) -> bool:
        return self.role == "leader"

    @property
    def fence_version(self) -> int | None:
        """The ``leader`` znode version of this term: a transaction that checks it fails
        once another instance has become leader."""
        return self._leader_version if self.is_leader else None

    def add_listener(self, listener: RoleListener) -> None:
        """``listener(role, epoch)`` on the event loop at every change of role."""
        self._listeners.append(listener)

    async def start(self) -> None:
        self._rerun.bind(asyncio.get_running_loop())
        self._running = True
        await self._session.call(self._session.client.ensure_path, self._path())
        await self._candidate()
        await self._evaluate()

    async def stop(self) -> None:
        """Withdraw: delete the candidate node so the next candidate takes over now."""
        self._running = False
        await self._rerun.cancel()
        node, self._node = self._node, None
        self._set_role("follower")
        if node is not None and self._session.connected:
            with contextlib.suppress(NoNodeError, CoordinationError):
                await self._session.call(self._session.client.delete, node)

    async def leader_info(self) -> LeaderInfo | None:
        return await read_leader(self._session)

    # --- the recipe ---------------------------------------------------------------------

    def _path(self, *parts: str) -> str:
        return self._session.path(layout.ELECTION, *parts)

    async def _candidate(self) -> None:
        client = self._session.client
        self._node = await self._session.call(
            client.create,
            self._path(layout.ELECTION_PREFIX),
            self.instance_id.encode(),
            ephemeral=True,
            sequence=True,
        )

    async def _evaluate(self) -> None:
        """Am I the lowest candidate? Lead; else watch my predecessor."""
        if not self._running or self._node is None or not self._session.connected:
            return
        client = self._session.client
        children = await self._session.call(client.get_children, self._path())
        candidates = sorted(c for c in children if c.startswith(layout.ELECTION_PREFIX))
        mine = self._node.rsplit("/", 1)[-1]
        if mine not in candidates:  # our node went with an old session
            await self._candidate()
            await self._evaluate()
            return
        position = candidates.index(mine)
        if position == 0:
            if self.role != "leader":
                await self._take_office()
            return
        self._set_role("follower")
        predecessor = self._path(candidates[position - 1])
        exists = await self._session.call(
            client.exists, predecessor, watch=self._rerun.request_threadsafe
        )
        if exists is None:  # gone between listing and watching
            await self._evaluate()

    async def _take_office(self) -> None:
        """Become leader: the epoch is the previous one plus one (compare-and-set), or
        stays when this instance is resuming its own term after a SUSPENDED."""
        client = self._session.client
        path = self._session.path(layout.LEADER)
        while True:
            current = await read_leader(self._session)
            if (
                current is not None
                and current.leader == self.instance_id
                and self._leader_version == current.version
            ):
                epoch, version = current.epoch, current.version  # the same term resumes
                break
            epoch = (current.epoch if current else 0) + 1
            data = orjson.dumps({"leader": self.instance_id, "epoch": epoch, "since": _now()})
            try:
                if current is None:
                    await self._session.call(client.create, path, data, makepath=True)
                    version = 0
                else:
                    stat: ZnodeStat = await self._session.call(
                        client.set, path, data, version=current.version
                    )
                    version = stat.version
                break
            except (NodeExistsError, BadVersionError):
                continue  # another write raced ours: read again
        self.epoch, self._leader_version = epoch, version
        log.info("instance %s is leader, epoch %d", self.instance_id, epoch)
        self._set_role("leader")

    # --- callbacks ----------------------------------------------------------------------

    def _on_state(self, state: str) -> None:
        if not self._running:
            return
        if state == "SUSPENDED":
            if self.role == "leader":
                self._set_role("paused")
        elif state == "LOST":
            self._node = None
            self._leader_version = None
            self._set_role("follower")
        elif state == "CONNECTED":
            self._reconnected()

    def _reconnected(self) -> None:
        async def rejoin() -> None:
            if self._node is None:
                await self._candidate()
            await self._evaluate()

        async def safely() -> None:
            try:
                await rejoin()
            except CoordinationError as exc:
                log.warning("leader election after reconnect: %s", describe_failure(exc))
                self._rerun.request()

        # A paused leader is re-evaluated: leader again (same epoch) only if its node
        # survived and is still the lowest, else it hears "follower".
        asyncio.get_running_loop().create_task(safely())

    def _set_role(self, role: Role) -> None:
        if role == self.role:
            return
        self.role = role
        if role == "follower":
            self._leader_version = None if self._node is None else self._leader_version
        epoch = self.epoch if role != "follower" else None
        for listener in list(self._listeners):
            try:
                listener(role, epoch)
            except Exception as exc:  # a listener's defect must not stop the others
                log.error("leader election listener failed: %s", describe_failure(exc))


async def read_leader(session: ZooKeeperSession) -> LeaderInfo | None:
    """The ``leader`` znode: who leads, under which epoch (None before any election)."""
    try:
        data, stat = await session.call(session.client.get, session.path(layout.LEADER))
    except NoNodeError:
        return None
    try:
        value: dict[str, Any] = orjson.loads(data)
        return LeaderInfo(
            leader=value.get("leader"), epoch=int(value.get("epoch", 0)), version=stat.version
        )
    except (orjson.JSONDecodeError, TypeError, ValueError):
        return LeaderInfo(leader=None, epoch=0, version=stat.version)
