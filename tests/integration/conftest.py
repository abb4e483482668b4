"""Integration fixtures: a bridge instance on the session's servers (or a test's own
broker), with the test's topic prefix and ZooKeeper chroot; stopped after the test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from bridge.config import Settings
from bridge.service import BridgeInstance

InstanceFactory = Callable[..., Any]


def instance_settings(zk_hosts: str, bootstrap: str, prefix: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "zookeeper": zk_hosts,
        "kafka": bootstrap,
        "topic_prefix": prefix,
        "kafka_idempotence": False,
        "kafka_partitions": 3,
        "kafka_publish_timeout_s": 3.0,
        "mllp_host": "127.0.0.1",
        "mllp_port": 0,
        "http_host": "127.0.0.1",
        "http_port": 0,
        "cluster": "it",
        "instance_id": "it-1",
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
async def start_instance(
    zookeeper: Any, zk_chroot: str, topic_prefix: str
) -> AsyncIterator[Callable[..., Any]]:
    started: list[BridgeInstance] = []

    async def start(bootstrap: str, **overrides: Any) -> BridgeInstance:
        zk_hosts = f"{zookeeper.hosts}{zk_chroot}"
        settings = instance_settings(zk_hosts, bootstrap, topic_prefix, **overrides)
        instance = BridgeInstance(settings)
        await instance.start()
        started.append(instance)
        return instance

    yield start
    for instance in reversed(started):
        await instance.stop()
