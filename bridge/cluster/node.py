"""One instance's part in the cluster: candidacy, leader duties, channels, config.

Put together here so :mod:`bridge.service` only says what the instance does
with them (apply a config, provision topics, build a channel):

* the **election** (:mod:`bridge.cluster.election`); while leader, the **duties**:
  provision the Kafka topics (the fixed ones and those the config routes to),
  assign the configured channels to live members (re-run when members come or
  go, or the config changes) and reap the state of removed channels;
* the **channel runner** (:mod:`bridge.cluster.channels`) on every member;
* the **cluster config** watch: every version is applied on the event loop as it
  arrives; one that does not parse is skipped (the previous one stays).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

from bridge.cluster import layout
from bridge.cluster.channels import ChannelAssigner, ChannelFactory, ChannelRunner
from bridge.cluster.cluster_config import ClusterConfig
from bridge.cluster.config_store import ConfigStore, VersionedConfig
from bridge.cluster.election import LeaderElection, Role
from bridge.coordination import Rerun, ZooKeeperSession
from bridge.errors import describe_failure

log = logging.getLogger(__name__)

#: How long stop() lets a pass of the leader duties finish before it is cancelled.
STOP_GRACE_S = 2.0

ConfigApplier = Callable[[ClusterConfig | None], None]
Provisioner = Callable[[ClusterConfig | None], Awaitable[None]]


class ClusterNode:
    def __init__(
        self,
        session: ZooKeeperSession,
        instance_id: str,
        *,
        apply_config: ConfigApplier,
        provision: Provisioner,
        make_channel: ChannelFactory,
        in_doubt_grace_s: float,
    ) -> None:
        self._session = session
        self.instance_id = instance_id
        self._apply_config = apply_config
        self._provision = provision
        self.election = LeaderElection(session, instance_id)
        self.assigner = ChannelAssigner(session, self.election)
        self.channels = ChannelRunner(
            session, instance_id, make_channel, in_doubt_grace_s=in_doubt_grace_s
        )
        self.config_store = ConfigStore(session)
        self.config: ClusterConfig | None = None
        self.config_version: int | None = None
        self._running = False
        self._duties = Rerun(
            self._duties_once,
            what="leader duties",
            enabled=lambda: self._running and self.election.is_leader,
        )
        self._provisioned_epoch: int | None = None
        self.election.add_listener(self._on_role)

    @property
    def channel_names(self) -> list[str]:
        if self.config is None:
            return []
        return [c.name for c in self.config.channels if c.enabled]

    async def start(self) -> None:
        self._duties.bind(asyncio.get_running_loop())
        self._running = True
        await self.config_store.watch(self._on_config)
        await self.channels.start()
        await self.election.start()
        if self.election.is_leader:
            await self._duties_once()  # a lone instance is ready with its topics

    async def stop(self) -> None:
        """Hand over: channels released, candidacy withdrawn (the next leader is
        elected at once, not after a session timeout)."""
        self._running = False
        await self._duties.cancel(grace_s=STOP_GRACE_S)  # its Kafka admin client closes
        await self.channels.stop()
        await self.election.stop()

    # --- config -------------------------------------------------------------------------

    def _on_config(self, versioned: VersionedConfig | None) -> None:
        self.config = None if versioned is None else versioned.config
        self.config_version = None if versioned is None else versioned.version
        try:
            self._apply_config(self.config)
        except Exception as exc:  # the previous behaviour stays; say so
            log.error(
                "cluster config %s not applied: %s", self.config_version, describe_failure(exc)
            )
        self.channels.configure(self.channel_names)
        log.info("cluster config version %s applied", self.config_version)
        self._provisioned_epoch = None  # the config may route to new topics
        self._schedule_duties()

    # --- leader duties ------------------------------------------------------------------

    def _on_role(self, role: Role, epoch: int | None) -> None:
        if role == "leader":
            self._schedule_duties()

    def _schedule_duties(self) -> None:
        self._duties.request()

    async def _duties_once(self) -> None:
        session = self._session
        epoch = self.election.epoch
        if self._provisioned_epoch != epoch:
            await self._provision(self.config)
            self._provisioned_epoch = epoch
        # Watch the members (one-shot, set again on every pass).
        await session.call(session.client.ensure_path, session.path(layout.MEMBERS))
        await session.call(
            session.client.get_children,
            session.path(layout.MEMBERS),
            watch=self._duties.request_threadsafe,
        )
        await self.assigner.reconcile(self.channel_names)


def routed_topics(prefix: str, config: ClusterConfig | None) -> Sequence[str]:
    """The events topics the config routes to (``<prefix>.events.<suffix>``)."""
    if config is None:
        return []
    return sorted({f"{prefix}.events.{route.topic_suffix}" for route in config.routes})
