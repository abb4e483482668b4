"""The embedded dev stack against the real servers: ZooKeeper (Java) and Tansu."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from kazoo.client import KazooClient

import bridge.devstack
from bridge.devstack import DevStack, EmbeddedBroker, EmbeddedZooKeeper
from bridge.errors import CoordinationError, LifecycleError, PublishError, UnavailableError
from bridge.kafka import ensure_topics
from tests.kafka_helpers import read_topic

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def assert_process_gone(pid: int) -> None:
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not Path(f"/proc/{pid}").exists()


@contextlib.contextmanager
def kazoo_client(hosts: str) -> Iterator[KazooClient]:
    client = KazooClient(hosts=hosts, timeout=10.0)
    client.start(timeout=10.0)
    try:
        yield client
    finally:
        client.stop()
        client.close()


# ZooKeeper


def test_zookeeper_serves_a_chroot(zookeeper: EmbeddedZooKeeper, zk_chroot: str) -> None:
    with kazoo_client(f"{zookeeper.hosts}{zk_chroot}") as client:
        client.create("/members/one", b"host=a", makepath=True)
        assert client.get("/members/one")[0] == b"host=a"
    with kazoo_client(zookeeper.hosts) as client:
        assert client.get(f"{zk_chroot}/members/one")[0] == b"host=a"


def test_zookeeper_stop_leaves_no_process_and_restarts_on_its_port(tmp_path: Path) -> None:
    server = EmbeddedZooKeeper(tmp_path)
    server.start()
    try:
        pid, hosts = server.pid, server.hosts
        assert pid is not None
        with pytest.raises(LifecycleError):
            server.start()
        server.stop()
        assert_process_gone(pid)
        assert server.pid is None
        server.stop()

        server.start()
        assert server.hosts == hosts
        with kazoo_client(server.hosts) as client:
            assert client.exists("/")
        assert (tmp_path / "zookeeper.log").stat().st_size > 0
    finally:
        server.stop()


def test_zookeeper_without_java_names_the_package(tmp_path: Path) -> None:
    server = EmbeddedZooKeeper(tmp_path, java="/nonexistent/java")
    with pytest.raises(CoordinationError) as caught:
        server.start()
    message = str(caught.value)
    assert "/nonexistent/java" in message
    assert "`zookeeper`" in message
    assert server.pid is None


def test_zookeeper_without_its_jar_names_the_path(tmp_path: Path) -> None:
    jar = tmp_path / "missing" / "zookeeper.jar"
    with pytest.raises(CoordinationError, match="`zookeeper`") as caught:
        EmbeddedZooKeeper(tmp_path, zookeeper_jar=jar).start()
    assert str(jar) in str(caught.value)


def test_zookeeper_that_dies_at_start_shows_its_log(tmp_path: Path) -> None:
    not_a_jar = tmp_path / "zookeeper.jar"
    not_a_jar.write_bytes(b"not a jar")
    with pytest.raises(CoordinationError, match="ZooKeeperServerMain") as caught:
        EmbeddedZooKeeper(tmp_path / "zk", zookeeper_jar=not_a_jar).start()
    assert "exited with status" in str(caught.value)


# The broker


async def test_ensure_topics_creates_the_missing_ones(
    broker: EmbeddedBroker, topic_prefix: str
) -> None:
    topics = [f"{topic_prefix}.{name}" for name in ("raw", "fhir", "dlq", "diagnosis")]
    await ensure_topics(broker.bootstrap, topics[:1], partitions=3)
    await ensure_topics(broker.bootstrap, topics, partitions=3)
    await ensure_topics(broker.bootstrap, topics, partitions=3)  # all exist: nothing to do

    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics(topics)
    finally:
        await admin.close()
    assert sorted(t["topic"] for t in described) == sorted(topics)
    assert all(t["error_code"] == 0 for t in described)
    assert [len(t["partitions"]) for t in described] == [3, 3, 3, 3]


async def test_a_record_produced_with_acks_all_reads_back_exactly(
    broker: EmbeddedBroker, topic_prefix: str
) -> None:
    topic = f"{topic_prefix}.fhir"
    await ensure_topics(broker.bootstrap, [topic])
    headers = [("ce_id", b"sender-1:MSG00001"), ("content-type", b"application/fhir+json")]
    producer = AIOKafkaProducer(
        bootstrap_servers=broker.bootstrap, acks="all", enable_idempotence=False
    )
    await producer.start()
    try:
        sent = await producer.send_and_wait(
            topic, b'{"resourceType":"Patient"}', key=b"patient-1", headers=headers
        )
    finally:
        await producer.stop()

    records = await read_topic(broker.bootstrap, topic, min_records=1)

    assert len(records) == 1
    record = records[0]
    assert (record.partition, record.offset) == (sent.partition, sent.offset)
    assert record.key == b"patient-1"
    assert record.value == b'{"resourceType":"Patient"}'
    assert list(record.headers) == headers


async def test_read_topic_of_a_missing_topic_is_empty(
    broker: EmbeddedBroker, topic_prefix: str
) -> None:
    assert await read_topic(broker.bootstrap, f"{topic_prefix}.none", timeout_s=0.5) == []


async def test_broker_stops_and_starts_again_on_the_same_port(
    own_broker: EmbeddedBroker, topic_prefix: str
) -> None:
    topic = f"{topic_prefix}.raw"
    bootstrap, pid = own_broker.bootstrap, own_broker.pid
    assert pid is not None
    await ensure_topics(bootstrap, [topic])

    await asyncio.to_thread(own_broker.stop)
    assert_process_gone(pid)
    with pytest.raises(PublishError) as caught:
        await ensure_topics(bootstrap, [topic], timeout_s=2)
    assert caught.value.__cause__ is not None
    assert caught.value.retriable

    await asyncio.to_thread(own_broker.start)
    assert own_broker.bootstrap == bootstrap
    assert own_broker.pid != pid
    # Memory storage: the topic went with the old process.
    assert await read_topic(bootstrap, topic, timeout_s=0.5) == []
    await ensure_topics(bootstrap, [topic])
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"after restart")
    finally:
        await producer.stop()
    assert [r.value for r in await read_topic(bootstrap, topic, min_records=1)] == [
        b"after restart"
    ]


def test_start_twice_is_a_lifecycle_error(broker: EmbeddedBroker) -> None:
    with pytest.raises(LifecycleError):
        broker.start()


async def test_blocking_start_on_the_event_loop_is_refused() -> None:
    with pytest.raises(LifecycleError, match="to_thread"):
        EmbeddedBroker().start()


def test_a_fixed_port_in_use_is_unavailable(broker: EmbeddedBroker) -> None:
    with pytest.raises(UnavailableError, match=f"port 127.0.0.1:{broker.port} is in use"):
        EmbeddedBroker(port=broker.port).start()


def test_a_chosen_port_taken_before_bind_is_replaced(
    broker: EmbeddedBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another process takes the chosen port between choosing and binding: the
    # broker fails to bind, and start() tries again on a fresh port.
    ports = iter([broker.port])
    real_free_port = bridge.devstack.free_port
    monkeypatch.setattr(
        bridge.devstack, "free_port", lambda host: next(ports, None) or real_free_port(host)
    )
    monkeypatch.setattr(bridge.devstack, "_port_is_free", lambda host, port: True)

    with EmbeddedBroker() as second:
        assert second.port != broker.port
        assert second.running


# Both


def test_devstack_starts_both_and_removes_its_temporary_dir() -> None:
    stack = DevStack()
    with stack:
        data_dir = stack.data_dir
        pids = [stack.zookeeper.pid, stack.broker.pid]
        assert data_dir.is_dir()
        with kazoo_client(stack.zk_hosts) as client:
            assert client.exists("/")
        asyncio.run(ensure_topics(stack.bootstrap, ["hl7bridge.smoke"]))
    assert not data_dir.exists()
    for pid in pids:
        assert pid is not None
        assert_process_gone(pid)
    with pytest.raises(LifecycleError):
        _ = stack.bootstrap
