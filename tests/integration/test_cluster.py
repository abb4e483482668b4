"""The cluster against a real ZooKeeper and the real broker: election with epochs,
graceful handover, singleton directory channels spread over the members, a session
expiry forced on a channel owner, and cluster config applied without restart.

Instances run in this process (the kill -9 cases are in test_cluster_processes.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from kazoo.client import KazooClient

from bridge.cluster import layout
from bridge.cluster.channels import rendezvous_owner
from bridge.cluster.cluster_config import ClusterConfig, DirectoryChannelConfig
from bridge.cluster.config_store import ConfigStore
from bridge.cluster.election import read_leader
from bridge.service import BridgeInstance
from tests.integration.conftest import InstanceFactory
from tests.kafka_helpers import read_topic

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

SESSION_TIMEOUT_S = 3.0


async def eventually(
    check: Callable[[], Awaitable[bool]], timeout_s: float, step_s: float = 0.05
) -> float:
    """Seconds until ``check`` held; fails the test after ``timeout_s``."""
    started = time.monotonic()
    while True:
        if await check():
            return time.monotonic() - started
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(step_s)


def message(control_id: str, patient: str = "P1") -> str:
    return "\r".join(
        (
            f"MSH|^~\\&|LAB|HOSP|EHR|HOSP|20240101120000+0100||ORU^R01^ORU_R01|{control_id}|P|2.5.1",
            f"PID|1||{patient}^^^HOSP^MR||DOE^JANE||19800101|F",
            "OBR|1|||2823-3^Potassium^LN",
            "OBX|1|NM|2823-3^Potassium^LN||4.1|mmol/L|3.5-5.1|N|||F",
        )
    )


def batch_file(control_ids: list[str]) -> bytes:
    lines = ["FHS|^~\\&|LAB|HOSP", "BHS|^~\\&|LAB|HOSP"]
    lines += [message(c, patient=f"P{i % 7}") for i, c in enumerate(control_ids)]
    lines += [f"BTS|{len(control_ids)}", "FTS|1"]
    return ("\r".join(lines) + "\r").encode()


async def start_cluster(
    start_instance: InstanceFactory, broker: Any, n: int
) -> list[BridgeInstance]:
    return [
        await start_instance(
            broker.bootstrap,
            instance_id=f"node-{i}",
            cluster="c",
            zookeeper_session_timeout_s=SESSION_TIMEOUT_S,
        )
        for i in range(n)
    ]


def leaders(instances: list[BridgeInstance]) -> list[BridgeInstance]:
    return [i for i in instances if i.cluster.election.is_leader]


async def push(instance: BridgeInstance, config: ClusterConfig) -> int:
    return await ConfigStore(instance.zookeeper).push(config, source="test")


def channels_config(inbox_root: Path, names: list[str], **extra: Any) -> ClusterConfig:
    channels = []
    for name in names:
        (inbox_root / name).mkdir(parents=True, exist_ok=True)
        channels.append(
            DirectoryChannelConfig(
                name=name, path=str(inbox_root / name), poll_interval_s=0.1, settle_s=0.0
            )
        )
    return ClusterConfig(channels=channels, **extra)


async def owners(instance: BridgeInstance, names: list[str]) -> dict[str, str | None]:
    session = instance.zookeeper
    found: dict[str, str | None] = {}
    for name in names:
        path = session.path(layout.CHANNELS, name, layout.OWNER)
        stat = await session.call(session.client.exists, path)
        if stat is None:
            found[name] = None
            continue
        data, _ = await session.call(session.client.get, path)
        found[name] = orjson.loads(data)["instance"]
    return found


async def test_three_instances_one_leader_every_channel_owned_once(
    start_instance: InstanceFactory, broker: Any, tmp_path: Path
) -> None:
    instances = await start_cluster(start_instance, broker, 3)
    await eventually(lambda: _true(len(leaders(instances)) == 1), 5)
    (leader,) = leaders(instances)
    info = await read_leader(leader.zookeeper)
    assert info is not None and info.leader == leader.settings.instance_id
    assert info.epoch == leader.cluster.election.epoch and info.epoch >= 1
    members = await leader.zookeeper.call(
        leader.zookeeper.client.get_children, leader.zookeeper.path(layout.MEMBERS)
    )
    assert sorted(members) == ["node-0", "node-1", "node-2"]

    names = [f"ch-{i}" for i in range(6)]
    await push(leader, channels_config(tmp_path, names))

    async def all_owned() -> bool:
        found = await owners(leader, names)
        return all(found.values())

    await eventually(all_owned, 5)
    found = await owners(leader, names)
    assert found == {n: rendezvous_owner(n, members) for n in names}
    running = {
        name: [i.settings.instance_id for i in instances if name in i.cluster.channels.owned]
        for name in names
    }
    assert all(len(who) == 1 for who in running.values()), running


async def test_graceful_stop_of_the_leader_hands_over_within_a_second(
    start_instance: InstanceFactory, broker: Any, tmp_path: Path
) -> None:
    instances = await start_cluster(start_instance, broker, 3)
    await eventually(lambda: _true(len(leaders(instances)) == 1), 5)
    (old,) = leaders(instances)
    old_epoch = old.cluster.election.epoch
    assert old_epoch is not None
    names = [f"ch-{i}" for i in range(6)]
    await push(old, channels_config(tmp_path, names))
    await eventually(lambda: _all_owned(old, names), 5)
    held = [n for n in names if n in old.cluster.channels.owned]
    rest = [i for i in instances if i is not old]

    stopped_at = time.monotonic()
    await old.stop()
    await eventually(lambda: _true(len(leaders(rest)) == 1), 1.0, step_s=0.01)
    handover_s = time.monotonic() - stopped_at
    (new,) = leaders(rest)
    assert new.cluster.election.epoch is not None and new.cluster.election.epoch > old_epoch
    assert handover_s < 1.0

    async def moved() -> bool:
        found = await owners(new, names)
        return all(
            found[n] in ("node-0", "node-1", "node-2") and found[n] != old.settings.instance_id
            for n in names
        )

    await eventually(moved, 2.0)
    survivors = [i.settings.instance_id for i in rest]
    found = await owners(new, names)
    assert found == {n: rendezvous_owner(n, survivors) for n in names}
    assert held  # the old leader ran some channels, and they now run elsewhere


async def test_directory_channel_publishes_each_message_once_and_stamps_the_epoch(
    start_instance: InstanceFactory, broker: Any, tmp_path: Path, topic_prefix: str
) -> None:
    instances = await start_cluster(start_instance, broker, 2)
    await eventually(lambda: _true(len(leaders(instances)) == 1), 5)
    (leader,) = leaders(instances)
    await push(leader, channels_config(tmp_path, ["inbox"]))
    await eventually(lambda: _all_owned(leader, ["inbox"]), 5)
    ids = [f"F{i:03d}" for i in range(40)]
    for start in range(0, 40, 10):
        (tmp_path / "inbox" / f"batch-{start}.hl7").write_bytes(batch_file(ids[start : start + 10]))

    async def all_done() -> bool:
        return len(list((tmp_path / "inbox" / "done").glob("*.hl7"))) == 4

    await eventually(all_done, 30, step_s=0.2)
    events = await read_topic(broker.bootstrap, f"{topic_prefix}.events", min_records=40)
    controls = sorted(dict(r.headers)["ce_hl7controlid"].decode() for r in events)
    assert controls == ids  # each message exactly once
    epochs = {dict(r.headers)["ce_leaderepoch"].decode() for r in events}
    assert epochs == {str(leader.cluster.election.epoch)}
    report = orjson.loads((tmp_path / "inbox" / "done" / "batch-0.hl7.report.json").read_bytes())
    assert report["messages"] == 10 and report["accepted"] == 10


async def test_a_forced_session_expiry_stops_the_owner_before_another_starts(
    start_instance: InstanceFactory, broker: Any, tmp_path: Path, topic_prefix: str, zookeeper: Any
) -> None:
    instances = await start_cluster(start_instance, broker, 2)
    await eventually(lambda: _true(len(leaders(instances)) == 1), 5)
    (leader,) = leaders(instances)
    await push(leader, channels_config(tmp_path, ["inbox"]))
    await eventually(lambda: _all_owned(leader, ["inbox"]), 5)
    (owner,) = [i for i in instances if "inbox" in i.cluster.channels.owned]
    other = next(i for i in instances if i is not owner)
    ids = [f"X{i:03d}" for i in range(200)]
    for start in range(0, 200, 20):
        (tmp_path / "inbox" / f"b-{start:03d}.hl7").write_bytes(batch_file(ids[start : start + 20]))

    async def started() -> bool:
        events = await read_topic(broker.bootstrap, f"{topic_prefix}.raw.hl7v2", timeout_s=1)
        return len(events) >= 10

    await eventually(started, 30, step_s=0.2)
    old_run = owner.cluster.channels.owned["inbox"]
    # Expire the owner's session on the server, as kazoo's test harness does: a second
    # client joins the session with its id and password, then closes it.
    session_id, password = owner.zookeeper.client.client_id
    intruder = KazooClient(hosts=zookeeper.hosts, client_id=(session_id, password))
    await asyncio.to_thread(intruder.start, 10)
    await asyncio.to_thread(intruder.stop)
    await asyncio.to_thread(intruder.close)

    async def taken_over() -> bool:
        return "inbox" in other.cluster.channels.owned

    await eventually(taken_over, SESSION_TIMEOUT_S + 10)
    # When the other instance took the channel over, the old owner had been told to
    # stop (at SUSPENDED, before the expiry); its run ends without another message.
    assert old_run.stop.is_set()

    async def old_run_ended() -> bool:
        return old_run.task is not None and old_run.task.done()

    await eventually(old_run_ended, 15)

    async def all_done() -> bool:
        return len(list((tmp_path / "inbox" / "done").glob("*.hl7"))) == 10

    await eventually(all_done, 60, step_s=0.2)
    events = await read_topic(
        broker.bootstrap, f"{topic_prefix}.events", min_records=200, timeout_s=20
    )
    controls = sorted(dict(r.headers)["ce_hl7controlid"].decode() for r in events)
    assert controls == ids  # no message published twice, none lost


async def test_a_pushed_config_takes_effect_everywhere_within_two_seconds_and_rolls_back(
    start_instance: InstanceFactory, broker: Any
) -> None:
    from adapters.mllp.client import MLLPClient
    from bridge.sender import summarize_ack

    instances = await start_cluster(start_instance, broker, 3)
    store = ConfigStore(instances[0].zookeeper)
    v1 = await store.push(ClusterConfig(accept_message_types=["ORU", "ADT"]), source="test")
    pushed_at = time.monotonic()
    v2 = await store.push(ClusterConfig(accept_message_types=["ADT"]), source="test")
    assert v2 == v1 + 1

    async def everywhere(version: int) -> bool:
        return all(i.cluster.config_version == version for i in instances)

    await eventually(lambda: everywhere(v2), 2.0, step_s=0.01)
    assert time.monotonic() - pushed_at < 2.0
    for instance in instances:
        async with MLLPClient("127.0.0.1", instance.mllp.port) as client:
            ack = summarize_ack(
                "t",
                1,
                await client.send(
                    message(f"R{instance.settings.instance_id}").encode(), timeout_s=10
                ),
            )
        assert ack.ack_code == "AR"  # ORU is no longer accepted
    v3 = await store.rollback(v1)
    await eventually(lambda: everywhere(v3), 2.0, step_s=0.01)
    for instance in instances:
        async with MLLPClient("127.0.0.1", instance.mllp.port) as client:
            ack = summarize_ack(
                "t",
                1,
                await client.send(
                    message(f"S{instance.settings.instance_id}").encode(), timeout_s=10
                ),
            )
        assert ack.ack_code == "AA"


async def _all_owned(instance: BridgeInstance, names: list[str]) -> bool:
    found = await owners(instance, names)
    return all(found.values())


async def _true(value: bool) -> bool:
    return value


async def test_digest_acls_keep_other_clients_out(
    start_instance: InstanceFactory, broker: Any, zookeeper: Any, zk_chroot: str
) -> None:
    from kazoo.exceptions import NoAuthError

    from bridge.cluster.status import read_status
    from bridge.coordination import ZooKeeperSession

    instance = await start_instance(
        broker.bootstrap, instance_id="acl-1", cluster="secure", zookeeper_digest="bridge:s3cret"
    )
    await eventually(lambda: _true(instance.cluster.election.is_leader), 5)
    members = instance.zookeeper.path(layout.MEMBERS)
    outsider = KazooClient(hosts=zookeeper.hosts)  # paths below are absolute
    await asyncio.to_thread(outsider.start, 10)
    try:
        with pytest.raises(NoAuthError):
            await asyncio.to_thread(outsider.get_children, members)
        with pytest.raises(NoAuthError):
            await asyncio.to_thread(outsider.set, instance.zookeeper.path(layout.LEADER), b"{}")
    finally:
        await asyncio.to_thread(outsider.stop)
        await asyncio.to_thread(outsider.close)
    insider = ZooKeeperSession(
        zookeeper.hosts, instance.zookeeper.base_path, digest="bridge:s3cret"
    )
    await insider.start()
    try:
        status = await read_status(insider, cluster="secure")
    finally:
        await insider.stop()
    assert status["leader"] == "acl-1"
    assert [m["instance"] for m in status["members"]] == ["acl-1"]


async def test_topic_routing_from_the_cluster_config(
    start_instance: InstanceFactory, broker: Any, topic_prefix: str
) -> None:
    from adapters.mllp.client import MLLPClient
    from bridge.cluster.cluster_config import Route

    (instance,) = await start_cluster(start_instance, broker, 1)
    version = await push(instance, ClusterConfig(routes=[Route(match="ORU", topic_suffix="lab")]))
    await eventually(lambda: _true(instance.cluster.config_version == version), 2)
    async with MLLPClient("127.0.0.1", instance.mllp.port) as client:
        await client.send(message("ROUTE1").encode(), timeout_s=10)
    routed = await read_topic(broker.bootstrap, f"{topic_prefix}.events.lab", min_records=1)
    assert [dict(r.headers)["ce_hl7controlid"] for r in routed] == [b"ROUTE1"]
    default = await read_topic(broker.bootstrap, f"{topic_prefix}.events", timeout_s=2)
    assert default == []
