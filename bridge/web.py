"""The instance's HTTP side: ``/healthz``, ``/readyz``, ``/metrics``.

FHIR REST ingest (``/fhir``, :mod:`adapters.fhir.server`) mounts on the same
application.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from bridge.metrics import BridgeMetrics

ReadinessCheck = Callable[[], dict[str, bool]]

METRICS_KEY = web.AppKey("metrics", BridgeMetrics)
READINESS_KEY: web.AppKey[ReadinessCheck] = web.AppKey("readiness")


async def _healthz(request: web.Request) -> web.Response:
    # Alive means the event loop answers; readiness is /readyz.
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    checks = request.app[READINESS_KEY]()
    ready = all(checks.values())
    request.app[METRICS_KEY].ready.set(1 if ready else 0)
    return web.json_response(
        {"status": "ready" if ready else "not ready", "checks": checks},
        status=200 if ready else 503,
    )


async def _metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS_KEY].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def build_app(
    metrics: BridgeMetrics, readiness: ReadinessCheck, *, client_max_size: int = 1024**2
) -> web.Application:
    app = web.Application(client_max_size=client_max_size)
    app[METRICS_KEY] = metrics
    app[READINESS_KEY] = readiness
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    return app
