"""Fixtures shared by every test layer.

The server fixtures start real processes (ZooKeeper, the Tansu broker) only when a
test asks for them, and stop them at teardown whether the test passed or not.
Names handed out per test (ZooKeeper chroot, topic prefix) are unique, so tests
sharing the session servers never see each other's data.
"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kazoo.client import KazooClient

from bridge.devstack import EmbeddedBroker, EmbeddedEnsemble, EmbeddedZooKeeper

REPO_ROOT = Path(__file__).resolve().parents[1]
#: Public corpora kept beside the repository, never copied into it.
CORPUS_DIR = REPO_ROOT.parent / "shared" / "corpus"


@pytest.fixture(scope="session")
def zookeeper(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedZooKeeper]:
    """One ZooKeeper for the whole session; tests keep to their own ``zk_chroot``."""
    with EmbeddedZooKeeper(tmp_path_factory.mktemp("zookeeper")) as server:
        yield server


@pytest.fixture
def zk_chroot(zookeeper: EmbeddedZooKeeper) -> str:
    """A chroot path of this test's own, e.g. ``/t-1a2b3c4d``, already created."""
    chroot = f"/t-{uuid.uuid4().hex[:8]}"
    client = KazooClient(hosts=zookeeper.hosts, timeout=10.0)
    client.start(timeout=10.0)
    try:
        client.ensure_path(chroot)
    finally:
        client.stop()
        client.close()
    return chroot


@pytest.fixture
def zk_hosts_chrooted(zookeeper: EmbeddedZooKeeper, zk_chroot: str) -> str:
    """The kazoo hosts string rooted at this test's chroot: ``127.0.0.1:PORT/t-...``."""
    return f"{zookeeper.hosts}{zk_chroot}"


@pytest.fixture
def zk_ensemble(tmp_path: Path) -> Iterator[EmbeddedEnsemble]:
    """A three-member ZooKeeper ensemble of this test's own (tickTime 500 ms), for
    fault tests: stop and start members freely; all are stopped after the test."""
    with EmbeddedEnsemble(tmp_path / "zk-ensemble") as ensemble:
        yield ensemble


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    """One broker for the whole session; tests keep to their own ``topic_prefix``.

    Never stop it in a test: use ``own_broker`` for that.
    """
    log_path = tmp_path_factory.mktemp("broker") / "broker.log"
    with EmbeddedBroker(log_path=log_path) as server:
        yield server


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    """A broker for this test alone, free to be stopped and started again (same port)."""
    with EmbeddedBroker(log_path=tmp_path / "broker.log") as server:
        yield server


@pytest.fixture
def topic_prefix() -> str:
    """A prefix of this test's own for topic names, e.g. ``t1a2b3c4d``."""
    return f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    """The shared message corpus. Missing is a failure, never a skip."""
    if not CORPUS_DIR.is_dir():
        pytest.fail(
            f"the test corpus is missing: expected a directory at {CORPUS_DIR} "
            "(../shared/corpus next to the repository root)"
        )
    return CORPUS_DIR


@pytest.fixture(scope="session")
def tls_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for localhost/127.0.0.1 and its key (PEM files).

    Made with the openssl command, which deploy/local.sh installs: missing, the
    TLS tests fail rather than skip.
    """
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("the openssl command is needed to make a test certificate (apt: openssl)")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key
