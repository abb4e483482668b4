"""The cluster config store and status against a real ZooKeeper (each test in its chroot)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
from kazoo.client import KazooClient

from bridge.cluster import layout
from bridge.cluster.cluster_config import ClusterConfig, parse_cluster_config
from bridge.cluster.config_store import ConfigStore, VersionedConfig, config_digest
from bridge.cluster.status import read_status
from bridge.coordination import ZooKeeperSession, wait_for
from bridge.devstack import EmbeddedZooKeeper
from bridge.errors import ConfigError

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

SessionFactory = Callable[[], Awaitable[ZooKeeperSession]]


@pytest.fixture
async def new_session(
    zookeeper: EmbeddedZooKeeper, zk_chroot: str
) -> AsyncIterator[SessionFactory]:
    """Sessions on the test's cluster base path ``<chroot>/hl7bridge/it``; stopped after."""
    started: list[ZooKeeperSession] = []

    async def make() -> ZooKeeperSession:
        session = ZooKeeperSession(
            zookeeper.hosts, f"{zk_chroot}/hl7bridge/it", session_timeout_s=4.0
        )
        await session.start()
        started.append(session)
        return session

    yield make
    for session in reversed(started):
        await session.stop()


def config(n: int, **extra: Any) -> ClusterConfig:
    """A distinct valid config per ``n``."""
    return parse_cluster_config(
        {"routes": [{"match": "ORU", "topic_suffix": f"results-{n}"}], **extra}, where=f"c{n}"
    )


# --- push, history, show, rollback -----------------------------------------------------------


async def test_push_history_show_and_rollback(new_session: SessionFactory) -> None:
    session = await new_session()
    store = ConfigStore(session)
    assert await store.current() is None
    assert await store.history() == []

    first, second = config(1), config(2, accept_message_types=["ADT"])
    assert await store.push(first, source="cli") == 1
    assert await store.push(second, source="test") == 2

    current = await store.current()
    assert current is not None
    assert current.version == 2
    assert current.config == second
    assert current.digest == config_digest(second)
    assert current.source == "test"
    assert current.rolled_back_to is None
    assert current.pushed_at.endswith("Z")
    assert current.pushed_at[:2] == "20" and current.pushed_at[10] == "T"

    history = await store.history()
    assert [v.version for v in history] == [1, 2]
    assert [v.config for v in history] == [first, second]
    assert history[1] == current
    assert (await store.get(1)).config == first

    # The nodes are where the layout says, as the JSON it says.
    raw, _ = await session.call(session.client.get, session.path(layout.CONFIG))
    record = orjson.loads(raw)
    assert set(record) == {"version", "pushed_at", "digest", "source", "config"}
    assert record["version"] == 2
    assert record["config"] == second.canonical()
    names = await session.call(session.client.get_children, session.path(layout.CONFIG_HISTORY))
    assert sorted(names) == ["v0000000001", "v0000000002"]

    assert await store.rollback(1) == 3
    rolled = await store.current()
    assert rolled is not None
    assert rolled.version == 3
    assert rolled.config == first
    assert rolled.digest == config_digest(first)
    assert rolled.rolled_back_to == 1
    assert [(v.version, v.rolled_back_to) for v in await store.history()] == [
        (1, None),
        (2, None),
        (3, 1),
    ]

    with pytest.raises(ConfigError, match="no cluster config version 9"):
        await store.get(9)
    with pytest.raises(ConfigError, match="no cluster config version 0"):
        await store.rollback(0)


async def test_pushing_the_current_content_again_writes_nothing(
    new_session: SessionFactory,
) -> None:
    store = ConfigStore(await new_session())
    assert await store.push(config(1), source="cli") == 1
    before = await store.current()
    # The same content written differently (order, defaults spelled out) is the same.
    same = parse_cluster_config(
        '{"accept_message_types": null, "routes": [{"topic_suffix": "results-1", "match": "ORU"}]}',
        where="same",
    )
    result = await store.commit(same, source="cli")
    assert (result.version, result.changed) == (1, False)
    assert await store.push(config(1), source="other") == 1
    assert await store.current() == before
    assert len(await store.history()) == 1
    # Rolling back to the version that is current also writes nothing.
    assert await store.rollback(1) == 1
    assert len(await store.history()) == 1
    # Content changed back to an older version is a new version, not a no-op.
    assert await store.push(config(2), source="cli") == 2
    assert await store.push(config(1), source="cli") == 3


async def test_concurrent_pushes_get_distinct_versions_and_no_gap(
    new_session: SessionFactory,
) -> None:
    stores = [ConfigStore(await new_session()), ConfigStore(await new_session())]
    configs = [config(n) for n in range(12)]
    versions = await asyncio.gather(
        *(stores[n % 2].push(c, source=f"s{n % 2}") for n, c in enumerate(configs))
    )
    assert sorted(versions) == list(range(1, 13))
    history = await stores[0].history()
    assert [v.version for v in history] == list(range(1, 13))
    # Each version holds what its pusher was told it holds.
    by_version = {v.version: v.config for v in history}
    for version, pushed in zip(versions, configs, strict=True):
        assert by_version[version] == pushed
    current = await stores[1].current()
    assert current is not None
    assert current.version == 12
    assert current == history[-1]


# --- watch ---------------------------------------------------------------------------------------


class Recorder:
    """Collects watch callbacks and checks each one runs on the test's event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.thread = threading.get_ident()
        self.values: list[VersionedConfig | None] = []
        self.off_loop = 0

    def __call__(self, value: VersionedConfig | None) -> None:
        if threading.get_ident() != self.thread or asyncio.get_running_loop() is not self.loop:
            self.off_loop += 1
        self.values.append(value)

    async def wait_count(self, count: int, timeout_s: float = 2.0) -> list[int | None]:
        async def enough() -> bool:
            return len(self.values) >= count

        assert await wait_for(enough, timeout_s), f"got {self.versions()}, wanted {count}"
        return self.versions()

    def versions(self) -> list[int | None]:
        return [None if v is None else v.version for v in self.values]


async def test_watch_fires_on_the_loop_for_the_initial_value_and_each_change(
    new_session: SessionFactory, caplog: pytest.LogCaptureFixture
) -> None:
    watcher, pusher = ConfigStore(await new_session()), ConfigStore(await new_session())
    seen = Recorder()
    await watcher.watch(seen)
    assert await seen.wait_count(1) == [None]

    await pusher.push(config(1), source="cli")
    assert await seen.wait_count(2) == [None, 1]
    await pusher.push(config(2), source="cli")
    assert await seen.wait_count(3) == [None, 1, 2]
    assert seen.values[-1] is not None
    assert seen.values[-1].config == config(2)

    # A value that does not parse is logged without its content and skipped.
    session = await new_session()
    secret = b'{"version": 3, "pushed_at": "t", "digest": "d", "config": {"MRN-4711": 1}}'
    caplog.set_level(logging.ERROR, logger="bridge.cluster.config_store")
    await session.call(session.client.set, session.path(layout.CONFIG), secret)

    async def logged() -> bool:
        return any("keeping the previous one" in r.getMessage() for r in caplog.records)

    assert await wait_for(logged, 2.0)
    assert "MRN-4711" not in caplog.text
    await asyncio.sleep(0.2)
    assert seen.versions() == [None, 1, 2]

    # The next good push is seen. It never reuses a version number claimed anywhere,
    # not even by the bad node.
    assert await pusher.push(config(3), source="cli") == 4
    assert await seen.wait_count(4) == [None, 1, 2, 4]

    # Deleting the node is seen as "no config".
    await session.call(session.client.delete, session.path(layout.CONFIG))
    assert await seen.wait_count(5) == [None, 1, 2, 4, None]
    assert seen.off_loop == 0

    watcher.unwatch()
    await pusher.push(config(4), source="cli")
    await asyncio.sleep(0.5)
    assert len(seen.values) == 5


async def test_watch_survives_the_loss_of_its_session(
    new_session: SessionFactory, zookeeper: EmbeddedZooKeeper
) -> None:
    watched = await new_session()
    watcher, pusher = ConfigStore(watched), ConfigStore(await new_session())
    await pusher.push(config(1), source="cli")
    seen = Recorder()
    await watcher.watch(seen)
    assert await seen.wait_count(1) == [1]

    states: list[str] = []
    watched.add_listener(states.append)
    # Expire the session for real: a second client takes it over and closes it.
    thief = KazooClient(hosts=zookeeper.hosts, client_id=watched.client.client_id, timeout=4.0)
    await asyncio.to_thread(thief.start, 10.0)
    await asyncio.to_thread(thief.stop)
    await asyncio.to_thread(thief.close)

    async def lost() -> bool:
        return "LOST" in states

    assert await wait_for(lost, 20.0), states
    # A change made while the session was gone is seen once a new session connects ...
    await pusher.push(config(2), source="cli")

    async def reconnected() -> bool:
        return states[-1:] == ["CONNECTED"]

    assert await wait_for(reconnected, 20.0), states
    assert await seen.wait_count(2, timeout_s=5.0) == [1, 2]
    # ... and the watch is set again on the new session.
    await pusher.push(config(3), source="cli")
    assert await seen.wait_count(3) == [1, 2, 3]
    assert seen.off_loop == 0


# --- status --------------------------------------------------------------------------------------


async def _write(
    session: ZooKeeperSession, data: Any, *parts: str, ephemeral: bool = False
) -> None:
    raw = data if isinstance(data, bytes) else orjson.dumps(data)
    await session.call(
        session.client.create, session.path(*parts), raw, ephemeral=ephemeral, makepath=True
    )


async def test_status_reads_members_leader_channels_and_config(
    new_session: SessionFactory,
) -> None:
    reader = await new_session()
    assert await read_status(reader, cluster="it") == {
        "cluster": "it",
        "leader": None,
        "epoch": None,
        "members": [],
        "channels": [],
        "config_version": None,
        "diagnosis": {"open_cases": {}, "claimed": 0, "subscribers": []},
    }

    member = await new_session()
    # As the layout describes a member node ...
    await _write(
        member,
        {
            "instance": "b-2",
            "host": "host-b",
            "ports": {"mllp": 2575, "http": 8080},
            "version": "0.1.0",
            "started": "2024-05-01T10:00:00+00:00",
            "load": {"mllp_connections": 2, "frames_received": 10},
            "session": "CONNECTED",
        },
        layout.MEMBERS,
        "b-2",
        ephemeral=True,
    )
    # ... and as BridgeInstance._describe() writes it today (ports as <name>_port).
    await _write(
        member,
        {
            "instance_id": "a-1",
            "host": "host-a",
            "pid": 42,
            "mllp_port": 2576,
            "http_port": 8081,
            "version": "0.1.0",
            "started": "2024-05-01T09:00:00+00:00",
            "load": {"mllp_connections": 0, "frames_received": 0},
        },
        layout.MEMBERS,
        "a-1",
        ephemeral=True,
    )
    await _write(member, b"not json", layout.MEMBERS, "c-3", ephemeral=True)
    await _write(member, {"leader": "b-2", "epoch": 4, "since": "t"}, layout.LEADER)
    await _write(
        member,
        {"instance": "b-2", "since": "t"},
        layout.CHANNELS,
        "lab",
        layout.OWNER,
        ephemeral=True,
    )
    await _write(
        member,
        {"instance": "a-1", "since": "t"},
        layout.CHANNELS,
        "adt",
        layout.OWNER,
        ephemeral=True,
    )
    await _write(member, b"", layout.CHANNELS, "idle")  # a channel node with no owner now
    await ConfigStore(member).push(
        parse_cluster_config(
            {
                "channels": [
                    {"name": "lab", "path": "/in/lab"},
                    {"name": "new-one", "path": "/in/new"},
                ]
            },
            where="t",
        ),
        source="test",
    )

    status = await read_status(reader, cluster="it")
    assert status == {
        "cluster": "it",
        "leader": "b-2",
        "epoch": 4,
        "members": [
            {
                "instance": "a-1",
                "host": "host-a",
                "ports": {"mllp": 2576, "http": 8081},
                "version": "0.1.0",
                "started": "2024-05-01T09:00:00+00:00",
                "load": {"mllp_connections": 0, "frames_received": 0},
                "session": None,
                "leader": False,
                "channels": ["adt"],
            },
            {
                "instance": "b-2",
                "host": "host-b",
                "ports": {"mllp": 2575, "http": 8080},
                "version": "0.1.0",
                "started": "2024-05-01T10:00:00+00:00",
                "load": {"mllp_connections": 2, "frames_received": 10},
                "session": "CONNECTED",
                "leader": True,
                "channels": ["lab"],
            },
            {
                "instance": "c-3",
                "host": None,
                "ports": {},
                "version": None,
                "started": None,
                "load": None,
                "session": None,
                "leader": False,
                "channels": [],
            },
        ],
        "channels": [
            {"name": "adt", "owner": "a-1"},
            {"name": "idle", "owner": None},
            {"name": "lab", "owner": "b-2"},
            {"name": "new-one", "owner": None},
        ],
        "config_version": 1,
        "diagnosis": {"open_cases": {}, "claimed": 0, "subscribers": []},
    }
    # Without a name, the cluster is the last part of the base path.
    assert (await read_status(reader))["cluster"] == "it"

    # Ephemeral nodes go with their session: the members and owners are gone.
    await member.stop()
    after = await read_status(reader, cluster="it")
    assert after["members"] == []
    assert after["leader"] == "b-2"  # the persistent node names the last leader
    assert after["channels"] == [
        {"name": "adt", "owner": None},
        {"name": "idle", "owner": None},
        {"name": "lab", "owner": None},
        {"name": "new-one", "owner": None},
    ]
    assert after["config_version"] == 1
