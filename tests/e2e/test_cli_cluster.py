"""`hl7bridge config ...` and `hl7bridge status` as an operator runs them."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from kazoo.client import KazooClient

from bridge.cluster.cluster_config import parse_cluster_config
from bridge.cluster.config_store import config_digest
from bridge.devstack import EmbeddedZooKeeper, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

HL7BRIDGE = [sys.executable, "-m", "bridge.cli"]
EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "config" / "cluster.example.yaml"


def hl7bridge(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HL7BRIDGE_")}
    return subprocess.run(
        [*HL7BRIDGE, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, **(env or {})},
    )


@pytest.fixture
def cluster(zookeeper: EmbeddedZooKeeper, zk_chroot: str) -> tuple[str, ...]:
    """The options that point a command at this test's cluster."""
    return ("--zookeeper", f"{zookeeper.hosts}{zk_chroot}", "--cluster", "e2e")


@contextlib.contextmanager
def kazoo(hosts: str) -> Iterator[KazooClient]:
    client = KazooClient(hosts=hosts, timeout=10.0)
    client.start(timeout=10.0)
    try:
        yield client
    finally:
        client.stop()
        client.close()


def test_push_refuses_a_bad_file_naming_the_key_and_writes_nothing(
    cluster: tuple[str, ...], tmp_path: Path
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("channels:\n  - name: lab\n    path: /in\n    poll_interval_s: -1\n")
    result = hl7bridge("config", "push", str(bad), *cluster)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert "channels[0].poll_interval_s" in result.stderr
    assert str(bad) in result.stderr
    assert "Traceback" not in result.stderr

    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("routes: [{match: ORU, topic_suffix: r, topic: x}]\n")
    result = hl7bridge("config", "push", str(unknown), *cluster)
    assert result.returncode == 2
    assert "routes[0].topic: unknown key" in result.stderr

    missing = hl7bridge("config", "push", str(tmp_path / "nope.yaml"), *cluster)
    assert missing.returncode == 2
    assert "nope.yaml" in missing.stderr

    shown = hl7bridge("config", "show", *cluster)
    assert shown.returncode == 1
    assert "no cluster config has been pushed" in shown.stderr
    status = hl7bridge("status", "--json", *cluster)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["config_version"] is None


def test_push_show_history_and_rollback(cluster: tuple[str, ...], tmp_path: Path) -> None:
    result = hl7bridge("config", "push", str(EXAMPLE), *cluster)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "pushed version 1\n"
    again = hl7bridge("config", "push", str(EXAMPLE), *cluster)
    assert again.returncode == 0
    assert again.stdout == "unchanged: version 1\n"

    expected = parse_cluster_config(EXAMPLE.read_bytes(), where="example")
    shown = hl7bridge("config", "show", "--json", *cluster)
    assert shown.returncode == 0, shown.stderr
    document = json.loads(shown.stdout)
    assert document["version"] == 1
    assert document["digest"] == config_digest(expected)
    assert document["source"] == "cli"
    assert document["pushed_at"].endswith("Z")
    assert document["config"] == expected.canonical()
    assert "rolled_back_to" not in document

    # The YAML form is a valid input to push, with the same content.
    as_yaml = hl7bridge("config", "show", *cluster)
    assert as_yaml.returncode == 0
    assert as_yaml.stdout.startswith("# cluster config version 1, pushed ")
    assert f"# digest sha256:{config_digest(expected)}" in as_yaml.stdout
    assert parse_cluster_config(as_yaml.stdout, where="shown") == expected

    changed = tmp_path / "v2.json"
    changed.write_text(json.dumps({"accept_message_types": ["ADT^A01"]}))
    assert hl7bridge("config", "push", str(changed), *cluster).stdout == "pushed version 2\n"

    rolled = hl7bridge("config", "rollback", "1", *cluster)
    assert rolled.returncode == 0, rolled.stderr
    assert rolled.stdout == "pushed version 3 (rollback to version 1)\n"
    current = json.loads(hl7bridge("config", "show", "--json", *cluster).stdout)
    assert current["version"] == 3
    assert current["rolled_back_to"] == 1
    assert current["config"] == expected.canonical()
    older = json.loads(hl7bridge("config", "show", "--version", "2", "--json", *cluster).stdout)
    assert older["config"]["accept_message_types"] == ["ADT^A01"]

    history = hl7bridge("config", "history", "--json", *cluster)
    assert history.returncode == 0
    versions = json.loads(history.stdout)
    assert [(v["version"], v.get("rolled_back_to")) for v in versions] == [
        (1, None),
        (2, None),
        (3, 1),
    ]
    assert all("config" not in v for v in versions)
    assert versions[0]["digest"] == versions[2]["digest"]
    lines = hl7bridge("config", "history", *cluster).stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["1", "2", "3"]
    assert lines[2].endswith("rollback to 1")
    assert lines[0].split()[2] == config_digest(expected)[:12]

    no_such = hl7bridge("config", "show", "--version", "9", *cluster)
    assert no_such.returncode == 2
    assert "no cluster config version 9" in no_such.stderr
    zero = hl7bridge("config", "rollback", "0", *cluster)
    assert zero.returncode == 2
    assert "versions start at 1" in zero.stderr


def test_status_json_with_one_member(
    zookeeper: EmbeddedZooKeeper, zk_chroot: str, cluster: tuple[str, ...], tmp_path: Path
) -> None:
    base = f"{zk_chroot}/hl7bridge/e2e"
    member = {
        "instance": "m-1",
        "host": "host-1",
        "ports": {"mllp": 2575, "http": 8080},
        "version": "0.1.0",
        "started": "2024-05-01T10:00:00+00:00",
        "load": {"mllp_connections": 1, "frames_received": 5},
        "session": "CONNECTED",
    }
    with kazoo(zookeeper.hosts) as client:
        client.create(f"{base}/members/m-1", orjson.dumps(member), ephemeral=True, makepath=True)
        client.create(f"{base}/leader", orjson.dumps({"leader": "m-1", "epoch": 1, "since": "t"}))
        client.create(
            f"{base}/channels/lab/owner",
            orjson.dumps({"instance": "m-1", "since": "t"}),
            ephemeral=True,
            makepath=True,
        )
        result = hl7bridge("status", "--json", *cluster)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == {
            "cluster": "e2e",
            "leader": "m-1",
            "epoch": 1,
            "members": [
                {
                    **{k: v for k, v in member.items() if k != "instance"},
                    "instance": "m-1",
                    "leader": True,
                    "channels": ["lab"],
                }
            ],
            "channels": [{"name": "lab", "owner": "m-1"}],
            "config_version": None,
            "diagnosis": {"open_cases": {}, "claimed": 0, "subscribers": []},
        }

        # The human form, with the settings from the environment and a settings file.
        settings = tmp_path / "bridge.yaml"
        settings.write_text("cluster: e2e\nkafka: 127.0.0.1:1\n")
        human = hl7bridge(
            "status",
            "--config",
            str(settings),
            env={"HL7BRIDGE_ZOOKEEPER": f"{zookeeper.hosts}{zk_chroot}"},
        )
        assert human.returncode == 0, human.stderr
        lines = human.stdout.splitlines()
        assert lines[0] == "cluster e2e: 1 member(s), leader m-1 (epoch 1), config not pushed"
        assert lines[2].split()[0] == "INSTANCE"
        assert lines[3].split()[:4] == ["m-1", "*", "host-1", "mllp=2575,http=8080"]
        assert ["lab", "m-1"] in [line.split() for line in lines[4:]]


def test_zookeeper_unreachable_exits_3(tmp_path: Path) -> None:
    hosts = f"127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    result = hl7bridge("status", "--zookeeper", hosts, "--connect-timeout-s", "2")
    assert result.returncode == 3
    assert f"cannot connect to ZooKeeper at {hosts}" in result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 30

    good = tmp_path / "c.yaml"
    good.write_text("accept_message_types: ['*']\n")
    pushed = hl7bridge(
        "config", "push", str(good), "--connect-timeout-s", "2", env={"HL7BRIDGE_ZOOKEEPER": hosts}
    )
    assert pushed.returncode == 3
    assert "cannot connect to ZooKeeper" in pushed.stderr


def test_bad_settings_are_usage_errors_naming_the_key() -> None:
    result = hl7bridge("status", "--zookeeper-session-timeout-s", "0")
    assert result.returncode == 2
    assert "zookeeper_session_timeout_s" in result.stderr
    result = hl7bridge("config", "show", env={"HL7BRIDGE_CLUSTR": "x"})
    assert result.returncode == 2
    assert "HL7BRIDGE_CLUSTR" in result.stderr
    result = hl7bridge("config", "history", "--cluster", "no/slash")
    assert result.returncode == 2
    assert "cluster" in result.stderr
