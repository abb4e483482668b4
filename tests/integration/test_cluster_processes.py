"""The cluster as separate `hl7bridge serve` processes, for what only a real process
death shows: `kill -9` of the leader, and of a channel owner half-way through a
directory of batch files (each message must still be published exactly once)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from bridge.cluster import layout
from bridge.cluster.channels import rendezvous_owner
from bridge.cluster.cluster_config import ClusterConfig, DirectoryChannelConfig
from bridge.cluster.config_store import ConfigStore
from bridge.cluster.election import read_leader
from bridge.coordination import ZooKeeperSession
from tests.integration.test_cluster import batch_file, eventually
from tests.kafka_helpers import read_topic
from tests.processes import reap, reap_all, start_cli

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

SESSION_TIMEOUT_S = 3.0


class Cluster:
    """Three `hl7bridge serve` processes and a ZooKeeper session to look at them."""

    def __init__(self, session: ZooKeeperSession, procs: dict[str, subprocess.Popen[str]]):
        self.session = session
        self.procs = procs

    def kill(self, instance: str) -> None:
        proc = self.procs.pop(instance)
        os.kill(proc.pid, signal.SIGKILL)
        reap(proc)

    async def owners(self, names: list[str]) -> dict[str, str | None]:
        found: dict[str, str | None] = {}
        for name in names:
            path = self.session.path(layout.CHANNELS, name, layout.OWNER)
            try:
                data, _ = await self.session.call(self.session.client.get, path)
                found[name] = orjson.loads(data)["instance"]
            except Exception:
                found[name] = None
        return found


@pytest.fixture
async def cluster(
    zookeeper: Any, zk_chroot: str, broker: Any, topic_prefix: str
) -> AsyncIterator[Callable[..., Any]]:
    procs: dict[str, subprocess.Popen[str]] = {}
    sessions: list[ZooKeeperSession] = []

    async def start(n: int = 3) -> Cluster:
        hosts = f"{zookeeper.hosts}{zk_chroot}"
        for i in range(n):
            instance = f"proc-{i}"
            procs[instance] = await asyncio.to_thread(
                start_cli,
                [
                    "serve",
                    "--zookeeper", hosts, "--kafka", broker.bootstrap,
                    "--topic-prefix", topic_prefix, "--cluster", "c",
                    "--instance-id", instance, "--mllp-host", "127.0.0.1", "--mllp-port", "0",
                    "--http-host", "127.0.0.1", "--http-port", "0",
                    "--kafka-idempotence", "false", "--kafka-partitions", "3",
                    "--kafka-publish-timeout-s", "2",
                    "--zookeeper-session-timeout-s", str(SESSION_TIMEOUT_S),
                    "--mapping-workers", "0", "--log-level", "WARNING",
                ],
            )  # fmt: skip
        session = ZooKeeperSession(hosts, "/hl7bridge/c")
        await session.start()
        sessions.append(session)
        return Cluster(session, procs)

    yield start
    reap_all(procs.values())
    for session in sessions:
        await session.stop()


async def test_kill_9_of_the_leader_elects_a_new_one_and_moves_its_channels(
    cluster: Callable[..., Any], tmp_path: Path
) -> None:
    c: Cluster = await cluster(3)

    async def leader_known() -> bool:
        info = await read_leader(c.session)
        return info is not None and info.leader in c.procs

    await eventually(leader_known, 10)
    names = [f"ch-{i}" for i in range(6)]
    channels = []
    for name in names:
        (tmp_path / name).mkdir()
        channels.append(DirectoryChannelConfig(name=name, path=str(tmp_path / name)))
    await ConfigStore(c.session).push(ClusterConfig(channels=channels), source="test")

    async def all_owned() -> bool:
        return all((await c.owners(names)).values())

    await eventually(all_owned, 10)
    before = await read_leader(c.session)
    assert before is not None and before.leader is not None
    c.kill(before.leader)
    killed_at = time.monotonic()

    async def new_leader() -> bool:
        info = await read_leader(c.session)
        return info is not None and info.leader in c.procs and info.epoch > before.epoch

    await eventually(new_leader, SESSION_TIMEOUT_S + 2)
    survivors = sorted(c.procs)

    async def moved() -> bool:
        found = await c.owners(names)
        return found == {n: rendezvous_owner(n, survivors) for n in names}

    await eventually(moved, max(0.5, SESSION_TIMEOUT_S + 2 - (time.monotonic() - killed_at)))
    assert time.monotonic() - killed_at <= SESSION_TIMEOUT_S + 2
    members = await c.session.call(c.session.client.get_children, c.session.path(layout.MEMBERS))
    assert sorted(members) == survivors  # the dead member's node went with its session


async def test_500_messages_in_batch_files_published_exactly_once_despite_a_kill_9(
    cluster: Callable[..., Any], tmp_path: Path, broker: Any, topic_prefix: str
) -> None:
    c: Cluster = await cluster(3)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    config = ClusterConfig(
        channels=[
            DirectoryChannelConfig(name="inbox", path=str(inbox), poll_interval_s=0.1, settle_s=0.0)
        ]
    )
    await ConfigStore(c.session).push(config, source="test")

    async def owned() -> bool:
        return (await c.owners(["inbox"]))["inbox"] is not None

    await eventually(owned, 10)
    ids = [f"K{i:04d}" for i in range(500)]
    for start in range(0, 500, 25):
        (inbox / f"b-{start:04d}.hl7").write_bytes(batch_file(ids[start : start + 25]))

    async def some_published() -> bool:
        records = await read_topic(broker.bootstrap, f"{topic_prefix}.raw.hl7v2", timeout_s=1)
        return len(records) >= 100

    await eventually(some_published, 60, step_s=0.1)
    owner = (await c.owners(["inbox"]))["inbox"]
    assert owner is not None
    c.kill(owner)  # half-way through, with a file open

    async def all_done() -> bool:
        return len(list((inbox / "done").glob("*.hl7"))) == 20

    await eventually(all_done, 120, step_s=0.5)
    assert not list((inbox / "error").glob("*.hl7")) if (inbox / "error").exists() else True
    events = await read_topic(
        broker.bootstrap, f"{topic_prefix}.events", min_records=500, timeout_s=30
    )
    controls = sorted(dict(r.headers)["ce_hl7controlid"].decode() for r in events)
    assert len(controls) == 500 and controls == ids  # each message exactly once
