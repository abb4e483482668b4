"""The dashboard without servers: quantile estimate, escaping, the cluster cache and
what the page says when ZooKeeper cannot be read."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import math
import re
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from bridge.dashboard import (
    CONTENT_SECURITY_POLICY,
    ClusterView,
    Dashboard,
    DashboardSource,
    add_dashboard_routes,
    estimate_quantile,
    render_page,
    traffic,
)
from bridge.errors import CoordinationError
from bridge.metrics import BridgeMetrics

pytestmark = pytest.mark.timeout(30)

HOSTILE = '<script>alert("x")</script>'
HOSTILE_ATTR = '"><img src=x onerror=alert(1)>'

INF = math.inf


def _instance(instance_id: str = "a-1") -> dict[str, Any]:
    return {
        "id": instance_id,
        "cluster": "prod",
        "version": "0.1.0",
        "state": "running",
        "host": "box1",
        "pid": 42,
        "started": "2024-05-01T12:00:00+00:00",
        "uptime_s": 3725.0,
        "ports": {"mllp": 2575, "http": 8080},
        "ack_mode": "kafka",
        "role": "leader",
        "epoch": 4,
        "zookeeper_session": "CONNECTED",
        "config_version": 3,
        "ready": True,
        "checks": {"kafka": True, "zookeeper": True, "mllp": True},
    }


def _status(channel: str = "lab-drop", member: str = "a-1") -> dict[str, Any]:
    return {
        "cluster": "prod",
        "leader": member,
        "epoch": 4,
        "members": [
            {
                "instance": member,
                "host": "box1",
                "ports": {"mllp": 2575, "http": 8080},
                "version": "0.1.0",
                "started": "2024-05-01T12:00:00+00:00",
                "load": {"mllp_connections": 3},
                "session": "CONNECTED",
                "leader": True,
                "channels": [channel],
            }
        ],
        "channels": [{"name": channel, "owner": member}, {"name": "idle-drop", "owner": None}],
        "config_version": 3,
        "diagnosis": {
            "open_cases": {"critical-results": 2},
            "claimed": 1,
            "subscribers": [{"subscriber": "s-1", "rules": ["critical-results"], "host": "box2"}],
        },
    }


def _source(
    metrics: BridgeMetrics,
    read: Any,
    *,
    instance_id: str = "a-1",
) -> DashboardSource:
    return DashboardSource(
        metrics=metrics,
        instance=lambda: _instance(instance_id),
        mllp=lambda: {
            "open_connections": 1,
            "connections_total": 5,
            "connections_rejected": 0,
            "frames_received": 9,
        },
        read_cluster=read,
    )


# --- the quantile estimate ------------------------------------------------------------


def test_quantile_interpolates_inside_the_bucket_like_prometheus() -> None:
    buckets = [(0.001, 0.0), (0.005, 50.0), (0.01, 100.0), (INF, 100.0)]
    assert estimate_quantile(0.5, buckets) == pytest.approx(0.005)
    assert estimate_quantile(0.99, buckets) == pytest.approx(0.0099)
    assert estimate_quantile(0.25, buckets) == pytest.approx(0.003)
    # The first bucket starts at 0.
    assert estimate_quantile(0.5, [(0.01, 10.0), (INF, 10.0)]) == pytest.approx(0.005)


def test_quantile_of_nothing_is_none_and_the_inf_bucket_gives_the_highest_bound() -> None:
    assert estimate_quantile(0.5, []) is None
    assert estimate_quantile(0.5, [(0.01, 0.0), (INF, 0.0)]) is None
    # Everything slower than the highest bound: all we know is "at least 10 s".
    assert estimate_quantile(0.99, [(1.0, 0.0), (10.0, 0.0), (INF, 3.0)]) == 10.0
    assert estimate_quantile(0.5, [(INF, 3.0)]) is None
    with pytest.raises(ValueError):
        estimate_quantile(1.5, [(INF, 1.0)])


def test_latency_rows_come_from_the_registry_histogram() -> None:
    metrics = BridgeMetrics()
    for _ in range(90):
        metrics.ack_latency.labels("mllp").observe(0.003)  # bucket (0.0025, 0.005]
    for _ in range(10):
        metrics.ack_latency.labels("mllp").observe(0.2)  # bucket (0.1, 0.25]
    (row,) = traffic(metrics, {})["ack_latency"]
    assert row["channel"] == "mllp"
    assert row["count"] == 100
    assert 0.0025 < row["p50_s"] <= 0.005
    assert 0.1 < row["p99_s"] <= 0.25
    assert row["mean_s"] == pytest.approx((90 * 0.003 + 10 * 0.2) / 100)


def test_traffic_counts_by_ack_code_channel_and_reason() -> None:
    metrics = BridgeMetrics()
    metrics.messages.labels("mllp", "AA", "ADT^A01").inc(3)
    metrics.messages.labels("directory:lab", "AA", "ORU^R01").inc()
    metrics.messages.labels("mllp", "AR", "other").inc()
    metrics.rejections.labels("mllp", "unsupported_message_type", "200").inc()
    metrics.duplicates.labels("mllp").inc(2)
    metrics.fhir_requests.labels("create", "202").inc()
    found = traffic(metrics, {"open_connections": 0})
    assert found["messages_by_ack_code"] == {"AA": 4, "AR": 1}
    assert {"channel": "mllp", "ack_code": "AA", "message_type": "ADT^A01", "count": 3} in found[
        "messages"
    ]
    assert found["rejections"] == [
        {"channel": "mllp", "reason": "unsupported_message_type", "err_code": "200", "count": 1}
    ]
    assert found["duplicates"] == {"mllp": 2}
    assert found["fhir_requests"] == [{"interaction": "create", "status": "202", "count": 1}]
    assert found["spool"] == {"messages": 0, "bytes": 0}


# --- escaping -------------------------------------------------------------------------


def test_hostile_names_are_escaped_everywhere() -> None:
    status = _status(channel=HOSTILE, member=HOSTILE_ATTR)
    status["diagnosis"]["open_cases"] = {HOSTILE: 1}
    status["diagnosis"]["subscribers"] = [
        {"subscriber": HOSTILE_ATTR, "rules": [HOSTILE], "host": HOSTILE}
    ]
    status["members"][0]["load"] = {HOSTILE: HOSTILE_ATTR}
    metrics = BridgeMetrics()
    metrics.messages.labels(f"directory:{HOSTILE}", "AA", "ADT^A01").inc()
    data = {
        "generated_at": HOSTILE,
        "refresh_s": 5.0,
        "instance": _instance(HOSTILE_ATTR),
        "cluster": {
            "available": True,
            "read_at": "t",
            "error": None,
            "detail": None,
            "status": status,
        },
        "traffic": traffic(metrics, {}),
    }
    page = render_page(data)
    assert HOSTILE not in page
    assert HOSTILE_ATTR not in page
    assert "<img" not in page
    assert page.count("<script>") == 1  # ours only
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "&quot;&gt;&lt;img src=x onerror=alert(1)&gt;" in page

    unavailable = dict(data, cluster={"available": False, "error": HOSTILE, "detail": HOSTILE})
    page = render_page(unavailable)
    assert HOSTILE not in page
    assert page.count("<script>") == 1


def test_the_csp_allows_exactly_the_inline_script_and_style_of_the_page() -> None:
    page = render_page({"instance": _instance(), "cluster": {}, "traffic": {}})
    for tag, directive in (("script", "script-src"), ("style", "style-src")):
        (body,) = re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.S)
        digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
        assert f"{directive} 'sha256-{digest}'" in CONTENT_SECURITY_POLICY
    assert "default-src 'none'" in CONTENT_SECURITY_POLICY
    assert "http://" not in page and "https://" not in page  # nothing loaded from elsewhere


# --- the cluster part: cache, failure, timeout ----------------------------------------


async def test_one_zookeeper_read_serves_every_request_within_the_ttl() -> None:
    calls = 0

    async def read() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        return _status()

    view = ClusterView(read, ttl_s=0.3, timeout_s=5.0)
    results = await asyncio.gather(*(view.get() for _ in range(20)))
    assert calls == 1  # concurrent requests share the one read in flight
    assert all(r["available"] and r["status"]["leader"] == "a-1" for r in results)
    await view.get()
    assert calls == 1
    await asyncio.sleep(0.35)
    await view.get()
    assert calls == 2
    await view.close()


async def test_zookeeper_unavailable_page_still_renders_with_the_error_class() -> None:
    async def read() -> dict[str, Any]:
        raise CoordinationError("ZooKeeper session is SUSPENDED")

    dashboard = Dashboard(_source(BridgeMetrics(), read))
    data = await dashboard.snapshot()
    assert data["cluster"] == {
        "available": False,
        "read_at": data["cluster"]["read_at"],
        "error": "CoordinationError",
        "detail": "ZooKeeper session is SUSPENDED",
        "status": None,
    }
    page = render_page(data)
    assert "Cluster view unavailable" in page
    assert "CoordinationError" in page
    assert "Traceback" not in page
    assert "a-1" in page and "This instance" in page
    await dashboard.close()


async def test_other_errors_show_their_class_only() -> None:
    async def read() -> dict[str, Any]:
        raise RuntimeError("secret detail /var/lib/x")

    view = ClusterView(read)
    found = await view.get()
    assert (found["error"], found["detail"]) == ("RuntimeError", None)
    await view.close()


async def test_a_hanging_read_is_waited_for_at_most_the_timeout_and_not_repeated() -> None:
    release = asyncio.Event()
    calls = 0

    async def read() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        await release.wait()
        return _status()

    view = ClusterView(read, ttl_s=0.05, timeout_s=0.1)
    first = await view.get()
    assert (first["available"], first["error"]) == (False, "TimeoutError")
    await asyncio.sleep(0.1)  # past the TTL: the read still running is waited for again
    second = await view.get()
    assert second["error"] == "TimeoutError"
    assert calls == 1
    release.set()
    await asyncio.sleep(0.01)
    assert (await view.get())["available"] is True  # its result serves the next request
    await view.close()


async def test_routes_answer_html_and_json() -> None:
    metrics = BridgeMetrics()
    metrics.messages.labels("mllp", "AA", "ADT^A01").inc()

    async def read() -> dict[str, Any]:
        return _status()

    app = web.Application()
    add_dashboard_routes(app, Dashboard(_source(metrics, read)))
    async with TestClient(TestServer(app)) as client:
        page = await client.get("/dashboard")
        assert page.status == 200
        assert page.headers["Content-Type"].startswith("text/html")
        assert page.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
        assert page.headers["Cache-Control"] == "no-store"
        text = await page.text()
        assert "<h1>hl7bridge dashboard: instance a-1</h1>" in text
        assert 'id="content"' in text
        answer = await client.get("/dashboard.json")
        assert answer.status == 200
        data = await answer.json()
    assert data["instance"]["id"] == "a-1"
    assert data["cluster"]["status"]["leader"] == "a-1"
    assert data["traffic"]["messages_by_ack_code"] == {"AA": 1}
    assert data["traffic"]["mllp"]["connections_total"] == 5
