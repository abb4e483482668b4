"""The cluster on a three-node ZooKeeper ensemble of the test's own: losing one node
changes nothing visible; losing two pauses singleton work while MLLP keeps
answering with its ACK rules; the quorum back, the work resumes."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from adapters.mllp.client import MLLPClient
from bridge.cluster.config_store import ConfigStore
from bridge.cluster.election import Role
from bridge.sender import summarize_ack
from bridge.service import BridgeInstance
from tests.integration.conftest import instance_settings
from tests.integration.test_cluster import channels_config, eventually, message

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


async def _ack_code(instance: BridgeInstance, control_id: str) -> str:
    async with MLLPClient("127.0.0.1", instance.mllp.port) as client:
        ack = await client.send(message(control_id).encode(), timeout_s=15)
    return summarize_ack("t", 1, ack).ack_code


async def test_one_node_lost_changes_nothing_two_lost_pause_singleton_work(
    zk_ensemble: Any, broker: Any, topic_prefix: str, tmp_path: Path
) -> None:
    settings = instance_settings(
        f"{zk_ensemble.hosts}/ens",
        broker.bootstrap,
        topic_prefix,
        instance_id="e-1",
        cluster="ens",
        zookeeper_session_timeout_s=8.0,
    )
    instance = BridgeInstance(settings)
    await instance.start()
    roles: list[Role] = []
    instance.cluster.election.add_listener(lambda role, _epoch: roles.append(role))
    try:
        await eventually(lambda: _is(instance.cluster.election.is_leader), 10)
        epoch = instance.cluster.election.epoch
        await ConfigStore(instance.zookeeper).push(
            channels_config(tmp_path, ["inbox"]), source="test"
        )
        await eventually(lambda: _is("inbox" in instance.cluster.channels.owned), 10)
        run = instance.cluster.channels.owned["inbox"]

        # One node down, a follower this instance does not talk to: nothing changes,
        # not even for a moment.
        connected = zk_ensemble.node_of_session(instance.zookeeper.client.client_id[0])
        zk_leader = zk_ensemble.leader()
        other = next(i for i in range(3) if i not in (connected, zk_leader))
        await asyncio.to_thread(zk_ensemble.stop_node, other)
        await asyncio.sleep(3.0)
        assert roles == []
        assert instance.cluster.election.is_leader and instance.cluster.election.epoch == epoch
        assert instance.cluster.channels.owned.get("inbox") is run and not run.stop.is_set()
        assert instance.zookeeper.state == "CONNECTED"
        assert await _ack_code(instance, "ENS-1") == "AA"
        await asyncio.to_thread(zk_ensemble.start_node, other)

        # The ensemble's own leader down: ZooKeeper elects another in well under a
        # second; the session survives, so from outside nothing changes either: the
        # same bridge leader and epoch, the same channel owner (a pause of that
        # moment is allowed: SUSPENDED stops singleton work at once).
        zk_leader = zk_ensemble.leader()
        assert zk_leader is not None
        await asyncio.to_thread(zk_ensemble.stop_node, zk_leader)
        await eventually(lambda: _is(instance.zookeeper.state == "CONNECTED"), 5)
        await eventually(lambda: _is(instance.cluster.election.is_leader), 5)
        assert instance.cluster.election.epoch == epoch
        await eventually(lambda: _is("inbox" in instance.cluster.channels.owned), 5)
        assert await _ack_code(instance, "ENS-1b") == "AA"
        await asyncio.to_thread(zk_ensemble.start_node, zk_leader)
        roles.clear()
        run = instance.cluster.channels.owned["inbox"]
        connected = zk_ensemble.node_of_session(instance.zookeeper.client.client_id[0])

        # Two nodes down: no quorum. Singleton work pauses; MLLP keeps answering.
        others = [i for i in range(3) if i != connected]
        await asyncio.to_thread(zk_ensemble.stop_node, others[0])
        await asyncio.to_thread(zk_ensemble.stop_node, connected)
        await eventually(lambda: _is(instance.zookeeper.state != "CONNECTED"), 10)
        await eventually(lambda: _is(run.stop.is_set()), 2)
        assert not instance.cluster.election.is_leader
        assert roles[0] == "paused"
        assert await _ack_code(instance, "ENS-2") == "AA"  # Kafka took it: ACK rules hold

        # The quorum back (within the session timeout): leadership and the channel resume.
        await asyncio.to_thread(zk_ensemble.start_node, connected)
        await asyncio.to_thread(zk_ensemble.start_node, others[0])
        await eventually(lambda: _is(instance.cluster.election.is_leader), 15)
        assert instance.cluster.election.epoch == epoch  # the same term: nobody else led
        await eventually(lambda: _is("inbox" in instance.cluster.channels.owned), 10)
        assert await _ack_code(instance, "ENS-3") == "AA"
    finally:
        await instance.stop()


async def _is(value: bool) -> bool:
    return value
