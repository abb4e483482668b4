"""ZooKeeper over TLS with client certificates (``secureClientPort``, Netty), against
a real ZooKeeper: an instance joins, leads and registers over TLS; ``hl7bridge
status`` reads the cluster over TLS, and cannot without TLS or without a client
certificate."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bridge.devstack import EmbeddedZooKeeper
from bridge.service import BridgeInstance
from tests.conftest import REPO_ROOT
from tests.integration.conftest import instance_settings
from tests.integration.test_cluster import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture
async def tls_zookeeper(
    tmp_path: Path, tls_cert: tuple[Path, Path]
) -> AsyncIterator[EmbeddedZooKeeper]:
    zk = EmbeddedZooKeeper(tmp_path / "zk", tls=tls_cert)
    await asyncio.to_thread(zk.start)
    try:
        yield zk
    finally:
        await asyncio.to_thread(zk.stop)


def tls_options(cert: Path, key: Path, *, client_cert: bool = True) -> dict[str, Any]:
    options: dict[str, Any] = {"zookeeper_tls": True, "zookeeper_tls_ca_file": cert}
    if client_cert:
        options |= {"zookeeper_tls_cert_file": cert, "zookeeper_tls_key_file": key}
    return options


async def status(zk_hosts: str, options: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    flags = [
        f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}")
        for k, v in options.items()
        if k != "zookeeper_tls"
    ]
    if options.get("zookeeper_tls"):
        flags.append("--zookeeper-tls=true")
    return await asyncio.to_thread(
        subprocess.run,
        [
            *(sys.executable, "-m", "bridge.cli", "status", "--json"),
            *("--zookeeper", zk_hosts, "--cluster", "zk-tls", "--connect-timeout-s", "5"),
            *flags,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )


async def test_an_instance_coordinates_over_tls_and_status_reads_it(
    tls_zookeeper: EmbeddedZooKeeper, broker: Any, topic_prefix: str, tls_cert: tuple[Path, Path]
) -> None:
    cert, key = tls_cert
    options = tls_options(cert, key)
    instance = BridgeInstance(
        instance_settings(
            tls_zookeeper.secure_hosts,
            broker.bootstrap,
            topic_prefix,
            cluster="zk-tls",
            instance_id="tls-1",
            **options,
        )
    )
    await instance.start()
    try:
        await eventually(lambda: _is(instance.cluster.election.is_leader), 10)
        done = await status(tls_zookeeper.secure_hosts, options)
        assert done.returncode == 0, done.stderr
        found = json.loads(done.stdout)
        assert [m["instance"] for m in found["members"]] == ["tls-1"]
        assert found["leader"] == "tls-1"
    finally:
        await instance.stop()


async def test_without_tls_or_without_a_client_certificate_zookeeper_is_unreachable(
    tls_zookeeper: EmbeddedZooKeeper, tls_cert: tuple[Path, Path]
) -> None:
    cert, key = tls_cert
    for options in ({}, tls_options(cert, key, client_cert=False)):
        done = await status(tls_zookeeper.secure_hosts, options)
        assert done.returncode == 3, (options, done.stdout, done.stderr)


async def _is(value: bool) -> bool:
    return value
