"""The three-member ZooKeeper ensemble of the fault tests, against real quorum peers.

What a kazoo client (session timeout 4 s, the bridge's connection retry) sees:
losing one member of three leaves its session and its ephemeral nodes alone (at
most a blink of SUSPENDED while it moves to another member or a new leader is
elected); losing two suspends it and holds its writes back until a majority runs
again, however long that takes: without a leader no session expires.

Timings on loopback at tickTime 500 ms: three members serve ~1.2 s after start; a
member stops in ~0.4 s and rejoins in ~0.7 s; a new leader is elected ~0.6 s after
the old one went. A surviving follower drops its clients at once when the quorum
goes, a surviving leader only at its next quorum check (up to tickTime / 2).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kazoo.client import KazooClient, KazooState
from kazoo.handlers.threading import KazooTimeoutError
from kazoo.retry import KazooRetry

from bridge.devstack import EmbeddedEnsemble
from bridge.errors import CoordinationError, LifecycleError

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

SESSION_TIMEOUT_S = 4.0
#: How long the ensemble gets to elect a leader and the client to find it again.
RECOVERY_S = 10.0


class StateLog:
    """The kazoo state transitions of one client, in order, as a listener records them."""

    def __init__(self) -> None:
        self._states: list[str] = []
        self._changed = threading.Condition()

    def __call__(self, state: str) -> None:
        with self._changed:
            self._states.append(state)
            self._changed.notify_all()

    @property
    def states(self) -> list[str]:
        with self._changed:
            return list(self._states)

    def mark(self) -> int:
        """A position to look for transitions after."""
        return len(self.states)

    def since(self, mark: int) -> list[str]:
        return self.states[mark:]

    def wait_for(self, state: str, since: int, timeout_s: float) -> bool:
        """True once ``state`` is recorded after position ``since``."""
        with self._changed:
            return self._changed.wait_for(lambda: state in self._states[since:], timeout_s)

    def wait_last(self, state: str, timeout_s: float) -> bool:
        """True once ``state`` is the latest transition."""
        with self._changed:
            return self._changed.wait_for(
                lambda: bool(self._states) and self._states[-1] == state, timeout_s
            )


@contextlib.contextmanager
def kazoo_client(hosts: str) -> Iterator[tuple[KazooClient, StateLog]]:
    # The connection retry of bridge.coordination: reconnects within ~2.8 s at worst.
    client = KazooClient(
        hosts=hosts,
        timeout=SESSION_TIMEOUT_S,
        connection_retry=KazooRetry(max_tries=-1, delay=0.2, max_delay=2.0),
    )
    log = StateLog()
    client.add_listener(log)
    client.start(timeout=10.0)
    try:
        yield client, log
    finally:
        client.stop()
        client.close()


def wait_until(predicate: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def assert_process_gone(pid: int) -> None:
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not Path(f"/proc/{pid}").exists()


def session_of(client: KazooClient) -> int:
    session_id: int = client.client_id[0]
    return session_id


# The ensemble itself


def test_three_members_elect_one_leader_and_all_serve_the_same_data(
    zk_ensemble: EmbeddedEnsemble,
) -> None:
    modes = sorted(node.mode or "none" for node in zk_ensemble.nodes)
    assert modes == ["follower", "follower", "leader"]
    assert zk_ensemble.leader() in (0, 1, 2)
    assert zk_ensemble.running == [0, 1, 2]
    assert zk_ensemble.quorum == 2
    members = [zk_ensemble.node_hosts(i) for i in range(3)]
    assert zk_ensemble.hosts == ",".join(members)
    ports = [port for node in zk_ensemble.nodes for port in node.ports]
    assert len(set(ports)) == 9
    assert [(node.data_dir / "data" / "myid").read_text() for node in zk_ensemble.nodes] == [
        "1\n",
        "2\n",
        "3\n",
    ]

    with kazoo_client(members[0]) as (writer, _):
        writer.create("/written", b"on member 1")
    for hosts in members[1:]:
        with kazoo_client(hosts) as (reader, _):
            reader.sync("/written")
            assert reader.get("/written")[0] == b"on member 1"


# One member of three lost


@pytest.mark.parametrize("victim", ["the client's member", "the leader", "another follower"])
def test_losing_one_member_keeps_the_session_and_its_ephemeral_node(
    zk_ensemble: EmbeddedEnsemble, victim: str
) -> None:
    with kazoo_client(zk_ensemble.hosts) as (client, log):
        session = session_of(client)
        client.create("/lock", b"owner", ephemeral=True)
        connected_to = zk_ensemble.node_of_session(session)
        leader = zk_ensemble.leader()
        assert connected_to is not None
        assert leader is not None
        if victim == "the client's member":
            stopped = connected_to
        elif victim == "the leader":
            stopped = leader
        else:
            stopped = ({0, 1, 2} - {connected_to, leader}).pop()
        mark = log.mark()

        zk_ensemble.stop_node(stopped)

        assert zk_ensemble.running == sorted({0, 1, 2} - {stopped})
        started = time.monotonic()
        client.create_async("/after", b"written").get(timeout=RECOVERY_S)
        assert client.get_async("/after").get(timeout=RECOVERY_S)[0] == b"written"
        assert time.monotonic() - started < RECOVERY_S
        assert client.get("/lock")[0] == b"owner"
        assert client.get("/lock")[1].ephemeralOwner == session
        assert session_of(client) == session
        assert zk_ensemble.node_of_session(session) not in (None, stopped)
        assert client.state == KazooState.CONNECTED
        transitions = log.since(mark)
        assert KazooState.LOST not in transitions
        if victim == "another follower":
            # Neither its member nor the leader went: the client notices nothing.
            assert transitions == []
        else:
            # Its connection broke: suspended until it reached a serving member.
            assert transitions[0] == KazooState.SUSPENDED
            assert transitions[-1] == KazooState.CONNECTED
        modes = sorted(zk_ensemble.nodes[i].mode or "none" for i in zk_ensemble.running)
        assert modes == ["follower", "leader"]


# Two members of three lost


def test_losing_two_members_suspends_the_client_and_holds_its_writes_until_one_returns(
    zk_ensemble: EmbeddedEnsemble,
) -> None:
    with kazoo_client(zk_ensemble.hosts) as (client, log):
        session = session_of(client)
        client.create("/lock", b"owner", ephemeral=True)
        survivor = zk_ensemble.node_of_session(session)
        assert survivor is not None
        first, second = sorted({0, 1, 2} - {survivor})
        zk_ensemble.stop_node(first)
        # One lost, not the client's member: at most a new leader to wait for.
        assert client.exists_async("/lock").get(timeout=RECOVERY_S) is not None
        mark = log.mark()

        zk_ensemble.stop_node(second)
        lost_quorum = time.monotonic()

        # The survivor stops serving and drops its clients as soon as it sees its
        # peers go: no tick-based wait.
        assert log.wait_for(KazooState.SUSPENDED, mark, timeout_s=5.0)
        assert time.monotonic() - lost_quorum < 5.0
        assert zk_ensemble.nodes[survivor].mode is None
        assert zk_ensemble.leader() is None
        assert client.state == KazooState.SUSPENDED

        # A write does not complete: kazoo queues it until a member serves again.
        pending = client.create_async("/during", b"queued")
        with pytest.raises(KazooTimeoutError):
            pending.get(timeout=2.0)

        reconnect_mark = log.mark()
        zk_ensemble.start_node(first)

        assert log.wait_for(KazooState.CONNECTED, reconnect_mark, timeout_s=RECOVERY_S)
        # The queued write went through once the quorum was back.
        assert pending.get(timeout=RECOVERY_S) == "/during"
        assert client.get("/during")[0] == b"queued"
        client.create("/after", b"written")
        assert client.get("/after")[0] == b"written"
        assert session_of(client) == session
        assert client.get("/lock")[1].ephemeralOwner == session
        assert log.since(mark) == [KazooState.SUSPENDED, KazooState.CONNECTED]
        assert sorted(zk_ensemble.nodes[i].mode or "none" for i in (survivor, first)) == [
            "follower",
            "leader",
        ]


def test_a_session_outlives_a_quorum_outage_longer_than_its_timeout(
    zk_ensemble: EmbeddedEnsemble,
) -> None:
    # Only a leader expires sessions, and a new one gives each a full timeout again:
    # an ephemeral lock outlives any outage its client outlives.
    with kazoo_client(zk_ensemble.hosts) as (client, log):
        session = session_of(client)
        client.create("/lock", b"owner", ephemeral=True)
        connected_to = zk_ensemble.node_of_session(session)
        assert connected_to is not None
        first, survivor = sorted({0, 1, 2} - {connected_to})
        zk_ensemble.stop_node(first)
        # Settled on the two left (at most a new leader to wait for).
        assert client.exists_async("/lock").get(timeout=RECOVERY_S) is not None
        mark = log.mark()

        zk_ensemble.stop_node(connected_to)

        # The client moves to the survivor. A surviving leader notices the lost
        # quorum only at its next check (every tickTime / 2), so the client may be
        # CONNECTED to it for a moment before it is SUSPENDED for good.
        assert wait_until(lambda: zk_ensemble.nodes[survivor].mode is None, timeout_s=5.0)
        assert log.wait_last(KazooState.SUSPENDED, timeout_s=5.0)
        outage = log.since(mark)
        assert outage[0] == KazooState.SUSPENDED
        assert set(outage) == {KazooState.SUSPENDED} or set(outage) == {
            KazooState.SUSPENDED,
            KazooState.CONNECTED,
        }

        time.sleep(1.5 * SESSION_TIMEOUT_S)
        assert log.since(mark) == outage
        restart_mark = log.mark()
        zk_ensemble.start_node(first)

        assert log.wait_for(KazooState.CONNECTED, restart_mark, timeout_s=RECOVERY_S)
        assert log.since(restart_mark) == [KazooState.CONNECTED]
        assert session_of(client) == session
        data, stat = client.get("/lock")
        assert (data, stat.ephemeralOwner) == (b"owner", session)


# Stopping and starting members


def test_a_restarted_member_rejoins_with_what_was_written_while_it_was_down(
    zk_ensemble: EmbeddedEnsemble,
) -> None:
    with kazoo_client(zk_ensemble.hosts) as (client, _):
        client.create("/before", b"1")
        node = zk_ensemble.nodes[0]
        old_pid, hosts = node.pid, zk_ensemble.node_hosts(0)
        assert old_pid is not None

        zk_ensemble.stop_node(0)
        assert_process_gone(old_pid)
        assert node.pid is None
        assert node.mode is None
        zk_ensemble.stop_node(0)  # idempotent
        client.create("/while-down", b"2")

        zk_ensemble.start_node(0)

        assert node.pid not in (None, old_pid)
        assert zk_ensemble.node_hosts(0) == hosts
        assert node.mode in ("leader", "follower")
        with pytest.raises(LifecycleError):
            zk_ensemble.start_node(0)
    with kazoo_client(hosts) as (alone, _):
        assert alone.get("/before")[0] == b"1"
        assert alone.get("/while-down")[0] == b"2"
        alone.create("/via-restarted", b"3")
    with kazoo_client(zk_ensemble.node_hosts(2)) as (other, _):
        other.sync("/via-restarted")
        assert other.get("/via-restarted")[0] == b"3"


def test_members_restarted_from_no_quorum_serve_once_a_majority_runs(
    zk_ensemble: EmbeddedEnsemble,
) -> None:
    with kazoo_client(zk_ensemble.hosts) as (client, _):
        client.create("/kept", b"on disk")
    for i in range(3):
        zk_ensemble.stop_node(i)
    assert zk_ensemble.running == []

    # Alone it cannot serve: start_node returns once the process answers.
    zk_ensemble.start_node(2)
    assert zk_ensemble.running == [2]
    assert zk_ensemble.nodes[2].mode is None
    # With a second, a quorum forms: start_node waits until its member serves.
    zk_ensemble.start_node(0)
    assert zk_ensemble.nodes[0].mode in ("leader", "follower")
    assert wait_until(lambda: zk_ensemble.nodes[2].mode is not None, timeout_s=RECOVERY_S)
    with kazoo_client(zk_ensemble.node_hosts(2)) as (client, _):
        assert client.get("/kept")[0] == b"on disk"


def test_stop_leaves_no_java_process_and_start_comes_back_on_the_same_ports(
    tmp_path: Path,
) -> None:
    ensemble = EmbeddedEnsemble(tmp_path)
    assert ensemble.size == 3
    ensemble.start()
    try:
        pids = [node.pid for node in ensemble.nodes]
        hosts = ensemble.hosts
        with pytest.raises(LifecycleError, match="start_node"):
            ensemble.start()
        with kazoo_client(hosts) as (client, _):
            client.create("/kept", b"on disk")

        ensemble.stop()
        for pid in pids:
            assert pid is not None
            assert_process_gone(pid)
        assert [node.pid for node in ensemble.nodes] == [None, None, None]
        assert ensemble.running == []
        ensemble.stop()

        ensemble.start()
        assert ensemble.hosts == hosts
        with kazoo_client(hosts) as (client, _):
            assert client.get("/kept")[0] == b"on disk"
        for i in range(3):
            log = tmp_path / f"node{i + 1}" / "zookeeper.log"
            assert "QuorumPeer" in log.read_text()
    finally:
        ensemble.stop()


def test_an_ensemble_without_java_names_it(tmp_path: Path) -> None:
    ensemble = EmbeddedEnsemble(tmp_path, java="/nonexistent/java")
    with pytest.raises(CoordinationError) as caught:
        ensemble.start()
    assert "/nonexistent/java" in str(caught.value)
    assert "`zookeeper`" in str(caught.value)
    assert [node.pid for node in ensemble.nodes] == [None, None, None]


def test_a_member_that_dies_at_start_shows_its_log(tmp_path: Path) -> None:
    not_a_jar = tmp_path / "zookeeper.jar"
    not_a_jar.write_bytes(b"not a jar")
    ensemble = EmbeddedEnsemble(tmp_path / "ensemble", zookeeper_jar=not_a_jar)
    with pytest.raises(CoordinationError, match="QuorumPeerMain") as caught:
        ensemble.start()
    assert "ZooKeeper ensemble member" in str(caught.value)
    assert "exited with status" in str(caught.value)
    assert ensemble.running == []


def test_bad_sizes_and_member_indexes_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one member"):
        EmbeddedEnsemble(tmp_path, size=0)
    ensemble = EmbeddedEnsemble(tmp_path)
    with pytest.raises(IndexError, match="0-2"):
        ensemble.node_hosts(3)
    with pytest.raises(IndexError, match="0-2"):
        ensemble.stop_node(-1)


async def test_blocking_start_on_the_event_loop_is_refused(tmp_path: Path) -> None:
    ensemble = EmbeddedEnsemble(tmp_path)
    with pytest.raises(LifecycleError, match="to_thread"):
        ensemble.start()
    with pytest.raises(LifecycleError, match="to_thread"):
        ensemble.start_node(0)
