"""The CLI as a user runs it: `hl7bridge dev`, `hl7bridge send`, `hl7bridge serve`."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

HL7BRIDGE = [sys.executable, "-m", "bridge.cli"]


class Running:
    def __init__(self, proc: subprocess.Popen[str], ready: dict[str, str]) -> None:
        self.proc = proc
        self.ready = ready


def _children_of(pid: int) -> set[int]:
    """Every descendant pid (read from /proc: no psutil needed)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents[int(entry.name)] = ppid
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _start(args: list[str], env: dict[str, str] | None = None, timeout_s: float = 60) -> Running:
    proc = subprocess.Popen(
        [*HL7BRIDGE, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        readable, _, _ = select.select([proc.stdout], [], [], 0.5)
        if readable:
            line = proc.stdout.readline()
            if line.startswith("ready "):
                fields = dict(part.split("=", 1) for part in line.split()[1:])
                return Running(proc, fields)
            if not line and proc.poll() is not None:
                break
    proc.kill()
    _, err = proc.communicate(timeout=10)
    raise AssertionError(f"no ready line; exit {proc.returncode}; stderr:\n{err[-3000:]}")


def _stop(running: Running, sig: int = signal.SIGTERM, timeout_s: float = 30) -> int:
    running.proc.send_signal(sig)
    try:
        return running.proc.wait(timeout=timeout_s)
    finally:
        if running.proc.poll() is None:
            running.proc.kill()
            running.proc.wait()
        for stream in (running.proc.stdout, running.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def dev(tmp_path: Path) -> Iterator[Running]:
    running = _start(["dev", "--mllp-port", "0", "--http-port", "0", "--data-dir", str(tmp_path)])
    yield running
    if running.proc.poll() is None:
        _stop(running)


def _send(
    address: str, *files: Path, extra: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*HL7BRIDGE, "send", address, *map(str, files), *extra],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_dev_send_and_clean_shutdown(dev: Running, corpus_dir: Path, tmp_path: Path) -> None:
    ready = dev.ready
    assert set(ready) >= {"mllp", "http", "zookeeper", "kafka"}
    assert ready["http"].startswith("http://127.0.0.1:")
    children = _children_of(dev.proc.pid)
    assert len(children) >= 2  # java (ZooKeeper) and tansu

    sample = corpus_dir / "microsoft-fhir-converter/data/SampleData/Hl7v2/ADT-A01-01.hl7"
    lab = corpus_dir / "microsoft-fhir-converter/data/SampleData/Hl7v2/LAB-ORU-1.hl7"
    result = _send(ready["mllp"], sample, lab)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if not line.startswith("  ")]
    assert len(lines) == 2
    assert lines[0].split()[1] == "AA"
    assert "2 accepted, 0 not accepted" in result.stderr

    # Several messages in one CRLF file, one of them of a type the bridge refuses.
    multi = tmp_path / "multi.hl7"
    adt = sample.read_bytes().lstrip(b"\xef\xbb\xbf").replace(b"\n", b"\r\n")
    bar = (
        corpus_dir / "microsoft-fhir-converter/data/SampleData/Hl7v2/BAR-P01-01.hl7"
    ).read_bytes()
    multi.write_bytes(adt + bar)
    result = _send(ready["mllp"], multi, extra=("--json",))
    assert result.returncode == 1
    import json

    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert [a["ack_code"] for a in answers] == ["AA", "AR"]
    assert answers[1]["errors"][0]["code"] == "200"

    code = _stop(dev)
    assert code == 0
    time.sleep(0.5)
    assert [pid for pid in children if _alive(pid)] == []


def test_send_reports_missing_file_and_bad_address(tmp_path: Path) -> None:
    result = _send("127.0.0.1:1", tmp_path / "nope.hl7")
    assert result.returncode == 2
    assert "nope.hl7" in result.stderr
    result = _send("no-port-here", tmp_path / "nope.hl7")
    assert result.returncode == 2
    assert "HOST:PORT" in result.stderr


def test_send_to_nothing_fails_with_a_clear_message(tmp_path: Path) -> None:
    message = tmp_path / "m.hl7"
    message.write_bytes(b"MSH|^~\\&|A|B|C|D|20240101||ADT^A01|X1|P|2.5\rPID|1||1\r")
    from bridge.devstack import free_port

    result = _send(f"127.0.0.1:{free_port()}", message, extra=("--timeout-s", "2"))
    assert result.returncode == 1
    assert "--" in result.stdout


def test_serve_against_external_servers(
    zookeeper: Any, broker: Any, zk_chroot: str, topic_prefix: str, tmp_path: Path
) -> None:
    config = tmp_path / "bridge.yaml"
    config.write_text("cluster: e2e\nkafka_idempotence: false\nmllp_port: 1\n")
    running = _start(
        [
            "serve",
            "--config",
            str(config),
            "--zookeeper",
            f"{zookeeper.hosts}{zk_chroot}",
            "--kafka",
            broker.bootstrap,
            "--topic-prefix",
            topic_prefix,
            "--instance-id",
            "e2e-1",
            "--mllp-host",
            "127.0.0.1",
            "--http-host",
            "127.0.0.1",
            "--mllp-port",
            "1",
            "--mllp-port",
            "0",  # a later occurrence wins
            "--http-port",
            "0",
        ],
        env={"HL7BRIDGE_CLUSTER": "from-env"},
    )
    try:
        assert running.ready["instance"] == "e2e-1"
        assert running.ready["cluster"] == "from-env"  # env beats the file
        assert running.ready["mllp"] != "127.0.0.1:1"
    finally:
        assert _stop(running) == 0


@pytest.mark.parametrize(
    ("config_text", "env", "named"),
    [
        ("mllp_prot: 2575\n", {}, "mllp_prot"),
        ("mllp_port: 99999\n", {}, "mllp_port"),
        ("", {"HL7BRIDGE_KAFKA_IDEMPOTENCE": "maybe"}, "kafka_idempotence"),
        ("", {"HL7BRIDGE_ZOOKEPER": "x:1"}, "HL7BRIDGE_ZOOKEPER"),
    ],
)
def test_serve_refuses_bad_config_naming_the_key(
    tmp_path: Path, config_text: str, env: dict[str, str], named: str
) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(config_text)
    result = subprocess.run(
        [*HL7BRIDGE, "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **env},
    )
    assert result.returncode == 2
    assert named in result.stderr


def test_send_over_tls_to_serve(
    zookeeper: Any,
    broker: Any,
    zk_chroot: str,
    topic_prefix: str,
    tls_cert: tuple[Path, Path],
    corpus_dir: Path,
) -> None:
    cert, key = tls_cert
    running = _start(
        [
            "serve",
            "--zookeeper",
            f"{zookeeper.hosts}{zk_chroot}",
            "--kafka",
            broker.bootstrap,
            "--kafka-idempotence",
            "false",
            "--topic-prefix",
            topic_prefix,
            "--mllp-host",
            "127.0.0.1",
            "--mllp-port",
            "0",
            "--http-port",
            "0",
            "--mllp-tls-cert-file",
            str(cert),
            "--mllp-tls-key-file",
            str(key),
        ]
    )
    sample = corpus_dir / "microsoft-fhir-converter/data/SampleData/Hl7v2/LAB-ORU-1.hl7"
    try:
        ok = _send(
            running.ready["mllp"],
            sample,
            extra=(
                "--tls-ca-file",
                str(cert),
                "--tls-server-name",
                "localhost",
                "--timeout-s",
                "10",
            ),
        )
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert ok.stdout.split()[1] == "AA"
        # An unknown server certificate is refused, never accepted blindly.
        refused = _send(running.ready["mllp"], sample, extra=("--tls", "--timeout-s", "5"))
        assert refused.returncode == 1
        assert "CERTIFICATE_VERIFY_FAILED" in refused.stdout or "certificate" in refused.stdout
    finally:
        assert _stop(running) == 0
