"""One bridge instance: its parts, started in order and stopped in reverse.

The shutdown order is written here once (DESIGN.md, STYLE.md habit 4):

1. stop accepting (MLLP listener closed; frames already received are finished
   and answered, bounded by ``drain_timeout_s``);
2. stop the HTTP side and the mapping worker processes;
3. flush Kafka (everything answered AA has been acknowledged already; this
   only drains what is still in the producer);
4. leave the cluster (member node deleted) and close the ZooKeeper session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from aiohttp import web

from adapters.directory.channel import DirectoryChannel, DirectorySettings
from adapters.fhir.server import FhirHttpSettings, add_fhir_routes
from adapters.mllp.server import MLLPServer, MLLPServerSettings
from bridge import __version__
from bridge.cluster.channels import ChannelContext, KafkaEventLookup
from bridge.cluster.cluster_config import ClusterConfig, effective_rules
from bridge.cluster.election import Role
from bridge.cluster.node import ClusterNode, routed_topics
from bridge.cluster.progress import DirectoryProgress
from bridge.config import Settings
from bridge.coordination import Membership, ZooKeeperSession
from bridge.dashboard import Dashboard, add_dashboard_routes, instance_source
from bridge.dedupe import DuplicateFilter
from bridge.diagnosis.leader import DiagnosisDuties
from bridge.errors import BridgeError, LifecycleError
from bridge.fhir_ingest import FhirIngest, FhirIngestSettings, ProcessValidator
from bridge.kafka import KafkaPublisher, Topics, ensure_topics
from bridge.mapworker import MappingPool, WorkerConfig
from bridge.metrics import BridgeMetrics
from bridge.pipeline import Hl7v2Pipeline, PipelineSettings
from bridge.spool import Spool, SpoolingPublisher
from bridge.web import build_app

log = logging.getLogger(__name__)

#: How often the member node's load figures are refreshed.
MEMBER_REFRESH_S = 10.0


def _display_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "") else host


class BridgeInstance:
    """A running bridge: ZooKeeper member, Kafka publisher, MLLP and HTTP listeners."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topics = Topics(settings.topic_prefix)
        self.metrics = BridgeMetrics()
        self.started_at = datetime.now(UTC)
        self.zookeeper = ZooKeeperSession(
            settings.zookeeper_servers,
            settings.zookeeper_base_path,
            session_timeout_s=settings.zookeeper_session_timeout_s,
            digest=settings.zookeeper_digest_value,
            tls=settings.zookeeper_tls_options(),
        )
        self.kafka = settings.kafka_client()
        self.publisher = KafkaPublisher(
            self.kafka,
            client_id=f"hl7bridge-{settings.instance_id}",
            idempotence=settings.kafka_idempotence,
            compression=settings.kafka_compression,
            linger_ms=settings.kafka_linger_ms,
            publish_timeout_s=settings.kafka_publish_timeout_s,
        )
        self.mapping_pool = (
            MappingPool(
                settings.mapping_workers,
                WorkerConfig(
                    instance_id=settings.instance_id,
                    identifier_systems=dict(settings.identifier_systems),
                    default_timezone=settings.hl7_default_timezone,
                    strict_mapping=settings.strict_mapping,
                ),
            )
            if settings.mapping_workers
            else None
        )
        self.spool: SpoolingPublisher | None = None
        if settings.ack_mode == "spool":
            path = settings.spool_path or Path("hl7bridge-spool") / f"{settings.instance_id}.db"
            spool = Spool(path, max_bytes=settings.spool_max_bytes)
            self.spool = SpoolingPublisher(spool, self.publisher)
            self.metrics.spool_messages.set_function(lambda: spool.count)
            self.metrics.spool_bytes.set_function(lambda: spool.size_bytes)
        self.pipeline = Hl7v2Pipeline(
            PipelineSettings(
                topics=self.topics,
                instance_id=settings.instance_id,
                accept_message_types=settings.accept_message_types,
                max_frame_bytes=settings.max_frame_bytes,
                mapping=settings.mapping_options(),
                strict_mapping=settings.strict_mapping,
            ),
            self.spool if self.spool is not None else self.publisher,
            self._duplicate_filter("hl7v2"),
            self.metrics,
            mapper=self.mapping_pool,
        )
        self.mllp = MLLPServer(
            MLLPServerSettings(
                host=settings.mllp_host,
                port=settings.mllp_port,
                max_frame_bytes=settings.max_frame_bytes,
                idle_timeout_s=settings.idle_timeout_s,
                max_connections=settings.max_connections,
                max_queued_bytes=settings.max_queued_bytes,
                drain_timeout_s=settings.drain_timeout_s,
                ssl=settings.mllp_ssl_context(),
                proxy_protocol=settings.mllp_proxy_protocol,
            ),
            self.pipeline,
        )
        self.metrics.connections.set_function(lambda: self.mllp.connection_count)
        self._fhir_validator = ProcessValidator()
        self.fhir = FhirIngest(
            FhirIngestSettings(
                topics=self.topics,
                instance_id=settings.instance_id,
                retry_after_s=settings.fhir_retry_after_s,
            ),
            self.publisher,
            self._duplicate_filter("fhir"),
            self.metrics,
            offload=self._fhir_validator,
        )
        self.membership = Membership(self.zookeeper, settings.instance_id, self._describe)
        self.cluster = ClusterNode(
            self.zookeeper,
            settings.instance_id,
            apply_config=self._apply_cluster_config,
            provision=self._provision_topics,
            make_channel=self._make_channel,
            # A previous owner's publish may land until its timeout has passed.
            in_doubt_grace_s=settings.kafka_publish_timeout_s + 2.0,
        )
        self._in_doubt = KafkaEventLookup(self.kafka, self.topics.raw_hl7v2)
        self.diagnosis = DiagnosisDuties(
            self.zookeeper,
            self.cluster.election,
            bootstrap=self.kafka,
            diagnosis_topic=self.topics.diagnosis,
            topics=lambda: [
                self.topics.events,
                *routed_topics(settings.topic_prefix, self.cluster.config),
            ],
            rules=lambda: effective_rules(self.cluster.config or ClusterConfig()),
            publish=self.publisher.publish,
            instance_id=settings.instance_id,
            closed_retention_s=settings.diagnosis_closed_retention_s,
        )
        self.cluster.election.add_listener(self._on_role)
        self._runner: web.AppRunner | None = None
        self._http_port = 0
        self._refresh: asyncio.Task[None] | None = None
        self._state = "new"

    def _duplicate_filter(self, ingest: str) -> DuplicateFilter:
        dedupe = DuplicateFilter(
            window_s=self.settings.dedupe_window_s,
            max_entries=self.settings.dedupe_max_entries,
        )
        self.metrics.dedupe_entries.labels(ingest).set_function(lambda: len(dedupe))
        return dedupe

    # --- addresses --------------------------------------------------------------------

    @property
    def state(self) -> str:
        """``new``, ``starting``, ``running``, ``stopping`` or ``stopped``."""
        return self._state

    @property
    def http_port(self) -> int:
        """The HTTP listener's port (0 until it listens)."""
        return self._http_port

    @property
    def mllp_address(self) -> str:
        return f"{_display_host(self.settings.mllp_host)}:{self.mllp.port}"

    @property
    def http_url(self) -> str:
        scheme = "http" if self.settings.http_tls_cert_file is None else "https"
        return f"{scheme}://{_display_host(self.settings.http_host)}:{self._http_port}"

    def ready_line(self) -> str:
        """The one stdout line scripts wait for."""
        return (
            f"ready mllp={self.mllp_address} http={self.http_url} "
            f"zookeeper={self.settings.zookeeper} kafka={self.settings.kafka} "
            f"instance={self.settings.instance_id} cluster={self.settings.cluster}"
        )

    def readiness(self) -> dict[str, bool]:
        return {
            "kafka": self.publisher.started,
            "zookeeper": self.zookeeper.connected,
            "mllp": self._state == "running",
        }

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        if self._state != "new":
            raise LifecycleError("BridgeInstance.start() called twice")
        self._state = "starting"
        try:
            await self.zookeeper.start()
            await self.publisher.start()
            if self.spool is not None:
                self.spool.start()  # drains what a previous run left, first
            if self.mapping_pool is not None:
                await self.mapping_pool.start()
            await self.mllp.start()
            await self._start_http()
            await self.membership.join()
            await self.cluster.start()
        except BaseException:
            await self.stop()
            raise
        self._refresh = asyncio.get_running_loop().create_task(self._refresh_member())
        self._state = "running"
        self.metrics.ready.set(1)
        log.info(
            "instance %s running: mllp port %d, http port %d",
            self.settings.instance_id,
            self.mllp.port,
            self._http_port,
        )

    async def stop(self) -> None:
        """Stop in the written order. Idempotent; safe after a failed start()."""
        if self._state in ("stopping", "stopped"):
            return
        self._state = "stopping"
        self.metrics.ready.set(0)
        if self._refresh is not None:
            self._refresh.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresh
        steps = (
            ("diagnosis duties", self.diagnosis.stop),
            ("cluster roles", self.cluster.stop),
            ("mllp", self.mllp.stop),
            ("http", self._stop_http),
            ("mapping workers", self._stop_mapping),
            ("spool", self._stop_spool),
            ("kafka", self.publisher.stop),
            ("membership", self.membership.leave),
            ("zookeeper", self.zookeeper.stop),
        )
        for name, step in steps:
            try:
                await step()
            except (BridgeError, OSError) as exc:
                log.warning("stopping %s failed: %s", name, type(exc).__name__)
        self._state = "stopped"

    async def __aenter__(self) -> BridgeInstance:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # --- parts ----------------------------------------------------------------------------

    async def _start_http(self) -> None:
        settings = self.settings
        app = build_app(self.metrics, self.readiness, client_max_size=settings.fhir_max_body_bytes)
        latency = self.metrics.ack_latency.labels("fhir")
        add_fhir_routes(
            app,
            self.fhir,
            FhirHttpSettings(
                max_body_bytes=settings.fhir_max_body_bytes,
                request_timeout_s=settings.fhir_request_timeout_s,
                max_in_flight=settings.fhir_max_in_flight,
                retry_after_s=settings.fhir_retry_after_s,
                version=__version__,
                observe=lambda seconds, _status: latency.observe(seconds),
            ),
        )
        add_dashboard_routes(app, Dashboard(instance_source(self)))
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        self._runner = runner
        site = web.TCPSite(
            runner,
            self.settings.http_host,
            self.settings.http_port,
            ssl_context=self.settings.http_ssl_context(),
        )
        await site.start()
        server = site._server  # aiohttp exposes no public accessor for the bound port
        sockets = getattr(server, "sockets", None) or []
        self._http_port = sockets[0].getsockname()[1] if sockets else self.settings.http_port

    async def _stop_spool(self) -> None:
        if self.spool is not None:
            await self.spool.stop(drain_timeout_s=self.settings.drain_timeout_s)

    async def _stop_mapping(self) -> None:
        if self.mapping_pool is not None:
            await self.mapping_pool.stop()

    async def _stop_http(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self._fhir_validator.close()

    # --- the cluster's calls --------------------------------------------------------------

    def _on_role(self, role: Role, epoch: int | None) -> None:
        """The leader opens and escalates diagnosis cases; nobody else does."""
        if role == "leader" and self._state in ("starting", "running"):
            self.diagnosis.start()
        elif role != "leader":
            asyncio.get_running_loop().create_task(self.diagnosis.stop())

    def _apply_cluster_config(self, config: ClusterConfig | None) -> None:
        """A new cluster config version, applied without restart: the accepted message
        types and the topic routing (channels are the cluster node's)."""
        settings = self.settings
        accept = settings.accept_message_types
        if config is not None and config.accept_message_types is not None:
            accept = tuple(config.accept_message_types)
        self.pipeline.set_accept_message_types(accept)
        routes = {} if config is None else {r.match: r.topic_suffix for r in config.routes}
        prefix = f"{self.topics.events}."
        self.pipeline.set_routes(
            {m: prefix + suffix for m, suffix in routes.items() if not m.startswith("fhir:")}
        )
        self.fhir.set_routes(
            {
                m.removeprefix("fhir:"): prefix + suffix
                for m, suffix in routes.items()
                if m.startswith("fhir:")
            }
        )
        if self._state == "running":  # the member node shows the applied version
            asyncio.get_running_loop().create_task(self.membership.update())

    async def _provision_topics(self, config: ClusterConfig | None) -> None:
        """The leader's duty: create the topics (and those the config routes to)."""
        if not self.settings.kafka_provision_topics:
            return
        await ensure_topics(
            self.kafka,
            [*self.topics.all(), *routed_topics(self.settings.topic_prefix, config)],
            partitions=self.settings.kafka_partitions,
            replication_factor=self.settings.kafka_replication_factor,
        )

    def _make_channel(self, name: str, context: ChannelContext) -> DirectoryChannel | None:
        config = self.cluster.config
        found = None
        if config is not None:
            found = next((c for c in config.channels if c.name == name), None)
        if found is None:
            return None
        label = f"directory:{name}"

        async def process(payload: bytes) -> bytes:
            return await self.pipeline.handle_frame(
                payload, label, channel=label, epoch=context.epoch
            )

        grace_until = asyncio.get_running_loop().time() + context.in_doubt_grace_s

        async def already_published(event_id: str) -> bool:
            # The previous owner's last publish may still land until its timeout.
            await asyncio.sleep(max(0.0, grace_until - asyncio.get_running_loop().time()))
            return await self._in_doubt.published(event_id)

        return DirectoryChannel(
            DirectorySettings(
                name=name,
                path=Path(found.path),
                pattern=found.pattern,
                done_dir=Path(found.done_path),
                error_dir=Path(found.error_path),
                poll_interval_s=found.poll_interval_s,
                settle_s=found.settle_s,
            ),
            process=process,
            progress=DirectoryProgress(context.progress),
            still_owner=context.still_owner,
            already_published=already_published,
        )

    def _describe(self) -> dict[str, Any]:
        return {
            "instance_id": self.settings.instance_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "mllp_port": self.mllp.port if self._state != "new" else None,
            "http_port": self._http_port,
            "version": __version__,
            "started": self.started_at.isoformat(),
            "session": self.zookeeper.state,
            "config_version": self.cluster.config_version,
            "load": {
                "mllp_connections": self.mllp.connection_count,
                "frames_received": self.mllp.frames_received,
            },
        }

    async def _refresh_member(self) -> None:
        while True:
            await asyncio.sleep(MEMBER_REFRESH_S)
            try:
                await self.membership.update()
            except BridgeError as exc:
                log.warning("member refresh failed: %s", type(exc).__name__)
