"""The dashboard of a real instance (real ZooKeeper, real Tansu broker): what it shows
after one HL7 v2 message, that it carries nothing from that message, and that it
still renders when ZooKeeper is away."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from adapters.mllp.client import MLLPClient
from bridge.devstack import EmbeddedZooKeeper
from bridge.service import BridgeInstance
from tests.integration.conftest import InstanceFactory, instance_settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

PATIENT_NAME = "ZEBEDEE"
GIVEN_NAME = "QUINTILLA"
MRN = "MRN7731905"
ADT = (
    "MSH|^~\\&|EHR|GENHOSP|HL7BRIDGE|HUB|20240101120000||ADT^A01^ADT_A01|DASH1|P|2.5.1\r"
    "EVN|A01|20240101120000\r"
    f"PID|1||{MRN}^^^GENHOSP^MR||{PATIENT_NAME}^{GIVEN_NAME}||19800101|F\r"
    "PV1|1|I|WARD1^101^A\r"
).encode()
PHI = (PATIENT_NAME, GIVEN_NAME, MRN, "19800101")


async def _get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        return response.status, await response.text()


async def _get_json(url: str) -> tuple[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        assert response.status == 200
        return await response.text(), await response.json()


async def test_dashboard_shows_instance_cluster_and_traffic_without_phi(
    start_instance: InstanceFactory, broker: Any
) -> None:
    instance = await start_instance(broker.bootstrap)
    second = await start_instance(broker.bootstrap, instance_id="it-2")
    async with MLLPClient("127.0.0.1", instance.mllp.port) as client:
        ack = await client.send(ADT, timeout_s=15)
    assert b"MSA|AA|DASH1" in ack

    text, data = await _get_json(f"{instance.http_url}/dashboard.json")
    me = data["instance"]
    assert me["id"] == "it-1"
    assert me["state"] == "running"
    assert me["role"] == "leader" and me["epoch"] >= 1
    http_port = int(instance.http_url.rsplit(":", 1)[1])
    assert me["ports"] == {"mllp": instance.mllp.port, "http": http_port}
    assert me["ack_mode"] == "kafka"
    assert me["ready"] is True

    cluster = data["cluster"]
    assert cluster["available"] is True, cluster
    status = cluster["status"]
    assert status["leader"] == "it-1"
    assert status["epoch"] >= 1
    members = {m["instance"]: m for m in status["members"]}
    assert set(members) == {"it-1", "it-2"}
    assert members["it-1"]["leader"] is True and members["it-2"]["leader"] is False
    assert members["it-2"]["ports"]["mllp"] == second.mllp.port
    assert status["diagnosis"] == {"open_cases": {}, "claimed": 0, "subscribers": []}

    counts = data["traffic"]
    assert counts["messages_by_ack_code"] == {"AA": 1}
    assert counts["messages"] == [
        {"channel": "mllp", "ack_code": "AA", "message_type": "ADT^A01", "count": 1}
    ]
    assert counts["dedupe_entries"]["hl7v2"] == 1
    assert counts["mllp"]["frames_received"] == 1
    latency = {row["channel"]: row for row in counts["ack_latency"]}["mllp"]
    assert latency["count"] == 1
    assert 0 < latency["p50_s"] <= latency["p99_s"]

    status_code, page = await _get(f"{instance.http_url}/dashboard")
    assert status_code == 200
    assert "it-1" in page and "it-2" in page
    assert "Cluster view unavailable" not in page
    for response in (text, page):
        for value in PHI:
            assert value not in response

    # The other instance's page names it, and it as a member that does not lead.
    _, other = await _get_json(f"{second.http_url}/dashboard.json")
    assert other["instance"]["id"] == "it-2"
    assert other["instance"]["role"] == "follower"
    assert other["cluster"]["status"]["leader"] == "it-1"


async def test_dashboard_renders_while_zookeeper_is_away(
    broker: Any, topic_prefix: str, tmp_path: Path
) -> None:
    zk = EmbeddedZooKeeper(tmp_path / "zk")
    await asyncio.to_thread(zk.start)
    instance = BridgeInstance(
        instance_settings(zk.hosts, broker.bootstrap, topic_prefix, zookeeper_session_timeout_s=4.0)
    )
    await instance.start()
    try:
        _, data = await _get_json(f"{instance.http_url}/dashboard.json")
        assert data["cluster"]["available"] is True
        await asyncio.to_thread(zk.stop)

        deadline = time.monotonic() + 15
        while True:
            started = time.monotonic()
            _, data = await _get_json(f"{instance.http_url}/dashboard.json")
            assert time.monotonic() - started < 5  # never stuck on ZooKeeper
            if not data["cluster"]["available"] or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        cluster = data["cluster"]
        assert cluster["available"] is False
        assert cluster["error"] in ("CoordinationError", "TimeoutError")
        assert data["instance"]["id"] == "it-1"

        status_code, page = await _get(f"{instance.http_url}/dashboard")
        assert status_code == 200
        assert "Cluster view unavailable" in page
        assert cluster["error"] in page
        assert "Traceback" not in page
        assert "This instance" in page and "it-1" in page

        await asyncio.to_thread(zk.start)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            _, data = await _get_json(f"{instance.http_url}/dashboard.json")
            if data["cluster"]["available"]:
                break
            await asyncio.sleep(0.3)
        assert data["cluster"]["available"] is True  # back once the session is
    finally:
        await instance.stop()
        await asyncio.to_thread(zk.stop)
