"""The operators' dashboard: ``GET /dashboard`` (one self-contained HTML page) and
``GET /dashboard.json`` (the same data, for scripts).

It shows this instance (id, version, state, uptime, ports, ack mode, role,
readiness checks), the cluster as :func:`bridge.cluster.status.read_status` reads
it (leader and epoch, members, channel owners, remote diagnosis: open cases per
rule, claims, subscribers) and the traffic since start from the instance's
metrics registry (messages by channel and ACK code, rejections, duplicates, DLQ
failures, FHIR requests, MLLP connections, spool, dedupe window, ACK latency
p50/p99 estimated from the histogram buckets).

PHI: ids, counts, codes and names only, never anything read from a message. The
metric labels are closed sets (:mod:`bridge.metrics`); the cluster part holds
what ``hl7bridge status`` shows. Every string put into the page goes through
:func:`html.escape` in one place (:func:`_cell_html`, :func:`_esc`); the page also
carries a Content-Security-Policy allowing only its own inline style and script
(by hash), so a missed escape still could not run code.

The page needs no external asset. With JavaScript it refreshes itself every
``refresh_s`` (pause-able): it fetches the page again and swaps its ``<main>``,
so the HTML is rendered in one place only (here), never in the browser. Without
JavaScript, reloading does the same.

ZooKeeper is read at most once per ``cluster_ttl_s`` however many dashboards are
open, one read at a time, off the event loop (``read_status`` runs kazoo in a
worker thread), and a page waits at most ``cluster_timeout_s`` for it. If the
read fails the page still renders, saying the cluster view is unavailable and
naming the error class.

The JSON (``GET /dashboard.json``)::

    {"generated_at": "2024-05-01T12:00:00.000Z", "refresh_s": 5.0,
     "instance": {"id": "a-1", "cluster": "prod", "version": "0.1.0",
                  "state": "running", "host": "box1", "pid": 4242,
                  "started": "...", "uptime_s": 3600.0,
                  "ports": {"mllp": 2575, "http": 8080}, "ack_mode": "kafka",
                  "role": "leader", "epoch": 4, "zookeeper_session": "CONNECTED",
                  "config_version": 3, "ready": true,
                  "checks": {"kafka": true, "zookeeper": true, "mllp": true}},
     "cluster": {"available": true, "read_at": "...", "error": null, "detail": null,
                 "status": {...what `hl7bridge status --json` prints...}},
     "traffic": {
        "messages": [{"channel": "mllp", "ack_code": "AA",
                      "message_type": "ADT^A01", "count": 1}],
        "messages_by_ack_code": {"AA": 1},
        "rejections": [{"channel": "mllp", "reason": "unsupported_message_type",
                        "err_code": "200", "count": 1}],
        "duplicates": {"mllp": 0}, "control_id_reuse": {}, "dlq_failures": {},
        "fhir_requests": [{"interaction": "create", "status": "202", "count": 1}],
        "mllp": {"open_connections": 0, "connections_total": 1,
                 "connections_rejected": 0, "frames_received": 1},
        "spool": {"messages": 0, "bytes": 0},
        "dedupe_entries": {"fhir": 0, "hl7v2": 1},
        "ack_latency": [{"channel": "mllp", "count": 1, "mean_s": 0.004,
                         "p50_s": 0.0035, "p99_s": 0.0049}]}}

When ZooKeeper cannot be read: ``"cluster": {"available": false, "read_at": ...,
"error": "CoordinationError", "detail": "ZooKeeper session is SUSPENDED",
"status": null}`` (``detail`` only for the bridge's own errors, whose messages
carry no PHI by contract; never a stack trace).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import html
import logging
import math
import os
import socket
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web
from prometheus_client.metrics import MetricWrapperBase

from bridge import __version__
from bridge.cluster.status import read_status
from bridge.errors import BridgeError, CoordinationError, LifecycleError, describe_failure
from bridge.metrics import BridgeMetrics

if TYPE_CHECKING:
    from bridge.service import BridgeInstance

log = logging.getLogger(__name__)

ClusterReader = Callable[[], Awaitable[dict[str, Any]]]

#: How often the page refreshes itself, in seconds.
REFRESH_S: Final = 5.0
#: How long one ZooKeeper read serves every dashboard, in seconds.
CLUSTER_TTL_S: Final = 1.0
#: How long a page waits for the cluster read before saying it is unavailable.
CLUSTER_TIMEOUT_S: Final = 3.0


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- what the dashboard reads ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DashboardSource:
    """Where the data comes from. :func:`instance_source` builds one for a
    :class:`~bridge.service.BridgeInstance`; tests build their own."""

    metrics: BridgeMetrics
    #: This instance's part of the JSON (``instance``).
    instance: Callable[[], dict[str, Any]]
    #: Live MLLP listener counts (``traffic.mllp``).
    mllp: Callable[[], dict[str, int]]
    #: The cluster as ``read_status`` returns it; may raise.
    read_cluster: ClusterReader


def instance_source(instance: BridgeInstance) -> DashboardSource:
    """The dashboard's view of a running instance (read only)."""
    settings = instance.settings
    host = socket.gethostname()
    pid = os.getpid()

    def mllp_port() -> int | None:
        try:
            return instance.mllp.port
        except LifecycleError:  # not listening yet, or any more
            return None

    def describe() -> dict[str, Any]:
        election = instance.cluster.election
        checks = instance.readiness()
        uptime = (datetime.now(UTC) - instance.started_at).total_seconds()
        return {
            "id": settings.instance_id,
            "cluster": settings.cluster,
            "version": __version__,
            "state": instance.state,
            "host": host,
            "pid": pid,
            "started": instance.started_at.isoformat(),
            "uptime_s": round(uptime, 1),
            "ports": {"mllp": mllp_port(), "http": instance.http_port},
            "ack_mode": settings.ack_mode,
            "role": election.role,
            "epoch": election.epoch if election.is_leader else None,
            "zookeeper_session": instance.zookeeper.state,
            "config_version": instance.cluster.config_version,
            "ready": all(checks.values()),
            "checks": checks,
        }

    def mllp() -> dict[str, int]:
        server = instance.mllp
        return {
            "open_connections": server.connection_count,
            "connections_total": server.connections_total,
            "connections_rejected": server.connections_rejected,
            "frames_received": server.frames_received,
        }

    async def read_cluster() -> dict[str, Any]:
        session = instance.zookeeper
        if not session.connected:  # do not queue reads on a session that is away
            raise CoordinationError(f"ZooKeeper session is {session.state}")
        return await read_status(session, cluster=settings.cluster)

    return DashboardSource(
        metrics=instance.metrics, instance=describe, mllp=mllp, read_cluster=read_cluster
    )


# --- the cluster part, cached ---------------------------------------------------------


class ClusterView:
    """The cluster as last read, shared by every request for ``ttl_s`` seconds.

    At most one read runs at a time; a request waits for it at most
    ``timeout_s`` (the read goes on and its result serves the next requests).
    """

    def __init__(
        self,
        read: ClusterReader,
        *,
        ttl_s: float = CLUSTER_TTL_S,
        timeout_s: float = CLUSTER_TIMEOUT_S,
    ) -> None:
        self._read_status = read
        self._ttl_s = ttl_s
        self._timeout_s = timeout_s
        self._view: dict[str, Any] | None = None
        self._at = 0.0
        self._reading: asyncio.Task[dict[str, Any]] | None = None
        self._last_error: str | None = None

    async def get(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        if self._view is not None and loop.time() - self._at < self._ttl_s:
            return self._view
        if self._reading is None or self._reading.done():
            self._reading = loop.create_task(self._read())
        reading = self._reading
        try:
            return await asyncio.wait_for(asyncio.shield(reading), self._timeout_s)
        except TimeoutError:
            view = _unavailable(
                "TimeoutError", f"no answer from ZooKeeper within {self._timeout_s:g} s"
            )
            if not reading.done():  # else the read's own result is newer
                self._store(view)
            return view

    async def close(self) -> None:
        reading, self._reading = self._reading, None
        if reading is not None and not reading.done():
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reading

    async def _read(self) -> dict[str, Any]:
        try:
            status = await self._read_status()
        except Exception as exc:  # any failure: the page says so and renders the rest
            name = type(exc).__name__
            if name != self._last_error:
                log.warning("dashboard: cluster view unavailable: %s", describe_failure(exc))
            self._last_error = name
            view = _unavailable(name, exc.message if isinstance(exc, BridgeError) else None)
        else:
            if self._last_error is not None:
                log.info("dashboard: cluster view available again")
            self._last_error = None
            view = {
                "available": True,
                "read_at": _now(),
                "error": None,
                "detail": None,
                "status": status,
            }
        self._store(view)
        return view

    def _store(self, view: dict[str, Any]) -> None:
        self._view = view
        self._at = asyncio.get_running_loop().time()


def _unavailable(error: str, detail: str | None) -> dict[str, Any]:
    return {"available": False, "read_at": _now(), "error": error, "detail": detail, "status": None}


# --- traffic, from the metrics registry -----------------------------------------------


def _samples(metric: MetricWrapperBase, suffix: str = "") -> Iterator[tuple[dict[str, str], float]]:
    """The (labels, value) of one metric's samples named ``<family><suffix>``."""
    for family in metric.collect():
        name = family.name + suffix
        for sample in family.samples:
            if sample.name == name:
                yield sample.labels, sample.value


def _by_label(metric: MetricWrapperBase, label: str, suffix: str = "") -> dict[str, int]:
    found: dict[str, int] = {}
    for labels, value in _samples(metric, suffix):
        found[labels[label]] = found.get(labels[label], 0) + int(value)
    return dict(sorted(found.items()))


def _rows(metric: MetricWrapperBase, names: Sequence[str]) -> list[dict[str, Any]]:
    rows = [
        {**{n: labels[n] for n in names}, "count": int(value)}
        for labels, value in _samples(metric, "_total")
    ]
    return sorted(rows, key=lambda row: tuple(row[n] for n in names))


def estimate_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """The ``q`` quantile of a histogram, estimated as Prometheus'
    ``histogram_quantile`` does: linear interpolation inside the bucket the rank
    falls in, the first bucket starting at 0.

    ``buckets`` are ``(upper bound, cumulative count)`` sorted by bound, the last
    one ``+Inf``. ``None`` when nothing was observed. A rank in the ``+Inf``
    bucket gives the highest finite bound (all that is known: "at least that").
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be between 0 and 1, not {q}")
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank and count > lower_count:
            if math.isinf(bound):
                finite = [b for b, _ in buckets if not math.isinf(b)]
                return finite[-1] if finite else None
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                count - lower_count
            )
        lower_bound, lower_count = bound, count
    return None  # not reached with a well-formed histogram


def _latency(metric: MetricWrapperBase) -> list[dict[str, Any]]:
    buckets: dict[str, list[tuple[float, float]]] = {}
    for labels, value in _samples(metric, "_bucket"):
        buckets.setdefault(labels["channel"], []).append((float(labels["le"]), value))
    counts = {labels["channel"]: value for labels, value in _samples(metric, "_count")}
    sums = {labels["channel"]: value for labels, value in _samples(metric, "_sum")}
    rows = []
    for channel in sorted(buckets):
        series = sorted(buckets[channel])
        count = int(counts.get(channel, series[-1][1] if series else 0))
        rows.append(
            {
                "channel": channel,
                "count": count,
                "mean_s": sums.get(channel, 0.0) / count if count else None,
                "p50_s": estimate_quantile(0.5, series),
                "p99_s": estimate_quantile(0.99, series),
            }
        )
    return rows


def _gauge(metric: MetricWrapperBase) -> int:
    return int(sum(value for _, value in _samples(metric)))


def traffic(metrics: BridgeMetrics, mllp: Mapping[str, int]) -> dict[str, Any]:
    """Counts since start from the registry (``traffic`` in the JSON).

    ``mllp`` comes from the listener itself: the ``hl7bridge_mllp_connections``
    gauge is not fed by the listener.
    """
    messages = _rows(metrics.messages, ("channel", "ack_code", "message_type"))
    by_ack: dict[str, int] = {}
    for row in messages:
        by_ack[row["ack_code"]] = by_ack.get(row["ack_code"], 0) + row["count"]
    return {
        "messages": messages,
        "messages_by_ack_code": dict(sorted(by_ack.items())),
        "rejections": _rows(metrics.rejections, ("channel", "reason", "err_code")),
        "duplicates": _by_label(metrics.duplicates, "channel", "_total"),
        "control_id_reuse": _by_label(metrics.control_id_reuse, "channel", "_total"),
        "dlq_failures": _by_label(metrics.dlq_failures, "channel", "_total"),
        "fhir_requests": _rows(metrics.fhir_requests, ("interaction", "status")),
        "mllp": dict(mllp),
        "spool": {"messages": _gauge(metrics.spool_messages), "bytes": _gauge(metrics.spool_bytes)},
        "dedupe_entries": _by_label(metrics.dedupe_entries, "ingest"),
        "ack_latency": _latency(metrics.ack_latency),
    }


# --- the dashboard --------------------------------------------------------------------


class Dashboard:
    """The data behind both routes, and the cached cluster view."""

    def __init__(
        self,
        source: DashboardSource,
        *,
        refresh_s: float = REFRESH_S,
        cluster_ttl_s: float = CLUSTER_TTL_S,
        cluster_timeout_s: float = CLUSTER_TIMEOUT_S,
    ) -> None:
        self.source = source
        self.refresh_s = refresh_s
        self.cluster = ClusterView(
            source.read_cluster, ttl_s=cluster_ttl_s, timeout_s=cluster_timeout_s
        )

    async def snapshot(self) -> dict[str, Any]:
        """The JSON of ``/dashboard.json``, which ``/dashboard`` renders."""
        cluster = await self.cluster.get()
        return {
            "generated_at": _now(),
            "refresh_s": self.refresh_s,
            "instance": self.source.instance(),
            "cluster": cluster,
            "traffic": traffic(self.source.metrics, self.source.mllp()),
        }

    async def close(self) -> None:
        await self.cluster.close()


DASHBOARD_KEY = web.AppKey("dashboard", Dashboard)

_COMMON_HEADERS: Final = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


async def _page(request: web.Request) -> web.Response:
    data = await request.app[DASHBOARD_KEY].snapshot()
    return web.Response(
        text=render_page(data),
        content_type="text/html",
        charset="utf-8",
        headers={**_COMMON_HEADERS, "Content-Security-Policy": CONTENT_SECURITY_POLICY},
    )


async def _json(request: web.Request) -> web.Response:
    data = await request.app[DASHBOARD_KEY].snapshot()
    return web.json_response(data, headers=_COMMON_HEADERS)


def add_dashboard_routes(app: web.Application, dashboard: Dashboard) -> None:
    """``GET /dashboard`` and ``GET /dashboard.json``; the cached cluster read is
    cancelled when the application is cleaned up."""
    app[DASHBOARD_KEY] = dashboard
    app.router.add_get("/dashboard", _page)
    app.router.add_get("/dashboard.json", _json)

    async def close(_app: web.Application) -> None:
        await dashboard.close()

    app.on_cleanup.append(close)


# --- the page -------------------------------------------------------------------------

_STYLE: Final = """
:root { color-scheme: light dark; --fg: #1b1b1b; --bg: #fff; --muted: #555;
  --line: #c8c8c8; --head: #f0f0f0; --ok: #0b6b2b; --bad: #a4001d; --warn-bg: #fff4d6; }
@media (prefers-color-scheme: dark) {
  :root { --fg: #e8e8e8; --bg: #161616; --muted: #b0b0b0; --line: #4a4a4a;
    --head: #262626; --ok: #6fd08c; --bad: #ff8a8a; --warn-bg: #3a2f10; } }
* { box-sizing: border-box; }
body { margin: 0 auto; max-width: 80rem; padding: 0.75rem; color: var(--fg);
  background: var(--bg); font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto,
  "Helvetica Neue", Arial, sans-serif; }
h1 { font-size: 1.35rem; margin: 0.25rem 0; overflow-wrap: anywhere; }
h2 { font-size: 1.15rem; margin: 1.5rem 0 0.5rem; border-bottom: 2px solid var(--line); }
p { margin: 0.35rem 0; }
.muted { color: var(--muted); }
.controls { display: flex; flex-wrap: wrap; gap: 0.5rem; align-items: center; margin: 0.5rem 0; }
button { font: inherit; padding: 0.3rem 0.8rem; border: 1px solid var(--line);
  border-radius: 4px; background: var(--head); color: var(--fg); cursor: pointer; }
button[aria-pressed="true"] { border-color: var(--fg); font-weight: 600; }
:focus-visible { outline: 3px solid #1a73e8; outline-offset: 2px; }
a { color: inherit; }
.grid { display: grid; gap: 0 1.5rem; grid-template-columns: repeat(auto-fit, minmax(20rem, 1fr)); }
.scroll { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; margin: 0.25rem 0 0.75rem; min-width: 50%; }
caption { text-align: left; font-weight: 600; padding: 0.2rem 0; }
th, td { border: 1px solid var(--line); padding: 0.25rem 0.5rem; text-align: left;
  vertical-align: top; overflow-wrap: anywhere; }
thead th { background: var(--head); }
tbody th { font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.ok { color: var(--ok); font-weight: 600; }
.bad { color: var(--bad); font-weight: 700; }
.notice { border: 2px solid var(--bad); background: var(--warn-bg); padding: 0.5rem 0.75rem;
  border-radius: 4px; }
@media (max-width: 40rem) { body { font-size: 14px; padding: 0.5rem; }
  th, td { padding: 0.2rem 0.35rem; } .grid { grid-template-columns: 1fr; } }
"""

_SCRIPT: Final = """
(function () {
  "use strict";
  var every = Math.max(1, Number(document.body.getAttribute("data-refresh-s")) || 5) * 1000;
  var pause = document.getElementById("pause");
  var now = document.getElementById("refresh-now");
  var state = document.getElementById("refresh-state");
  var timer = 0, busy = false, failing = false, paused = false;
  function say(text) { if (state.textContent !== text) { state.textContent = text; } }
  function idle() {
    return paused ? "Auto-refresh paused." : "Refreshes every " + every / 1000 + " s.";
  }
  function refresh() {
    if (busy) { return; }
    busy = true;
    fetch(window.location.href, { cache: "no-store", headers: { "Accept": "text/html" } })
      .then(function (response) {
        if (!response.ok) { throw new Error("HTTP " + response.status); }
        return response.text();
      })
      .then(function (text) {
        var fresh = new DOMParser().parseFromString(text, "text/html").getElementById("content");
        var old = document.getElementById("content");
        if (!fresh || !old) { throw new Error("unexpected answer"); }
        var focused = document.activeElement;
        var keep = focused && old.contains(focused) ? focused.id : "";
        old.replaceWith(document.adoptNode(fresh));
        if (keep && document.getElementById(keep)) {
          document.getElementById(keep).focus({ preventScroll: true });
        }
        if (failing) { failing = false; say(idle()); }
      })
      .catch(function (error) {
        failing = true;
        say("Refresh failed (" + error.message + "): the figures below may be old.");
      })
      .then(function () { busy = false; });
  }
  function schedule() {
    window.clearInterval(timer);
    timer = paused ? 0 : window.setInterval(function () {
      if (!document.hidden) { refresh(); }
    }, every);
  }
  pause.addEventListener("click", function () {
    paused = !paused;
    pause.setAttribute("aria-pressed", paused ? "true" : "false");
    pause.textContent = paused ? "Resume auto-refresh" : "Pause auto-refresh";
    failing = false;
    say(idle());
    schedule();
  });
  now.addEventListener("click", refresh);
  pause.hidden = false;
  now.hidden = false;
  say(idle());
  schedule();
})();
"""


def _csp_hash(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode() + "'"


#: Only this page's own inline style and script run; nothing is loaded from elsewhere.
CONTENT_SECURITY_POLICY: Final = (
    f"default-src 'none'; style-src {_csp_hash(_STYLE)}; script-src {_csp_hash(_SCRIPT)}; "
    "connect-src 'self'; img-src 'none'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)

_ACK_MEANINGS: Final = {
    "AA": "accepted",
    "AE": "error (sender must fix)",
    "AR": "rejected (may be resent)",
    "CA": "commit accept",
    "CE": "commit error",
    "CR": "commit reject",
}


@dataclass(frozen=True, slots=True)
class Cell:
    """A table cell: its text (escaped when rendered) and how it looks."""

    text: str
    css: str = ""


CellValue = str | int | float | None | Cell


def _text(value: Any) -> str:
    """Plain text for a value of the JSON (not yet escaped)."""
    if value is None or value == "" or value == {} or value == []:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, dict):
        return ", ".join(f"{_text(k)}={_text(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(_text(v) for v in value)
    return str(value)


def _esc(value: Any) -> str:
    return html.escape(_text(value), quote=True)


def _cell_html(tag: str, value: CellValue, *, scope: str = "") -> str:
    css = ""
    if isinstance(value, Cell):
        css, value = value.css, value.text
    elif isinstance(value, int | float) and not isinstance(value, bool):
        css = "num"
    attributes = f' scope="{scope}"' if scope else ""
    if css:
        attributes += f' class="{html.escape(css, quote=True)}"'
    return f"<{tag}{attributes}>{_esc(value)}</{tag}>"


def _table(
    table_id: str,
    caption: str,
    headers: Sequence[str],
    rows: Iterable[Sequence[CellValue]],
    *,
    empty: str = "None yet.",
) -> str:
    """A table whose first column heads its row; ``empty`` stands in for no rows."""
    body = [
        "<tr>"
        + _cell_html("th", row[0], scope="row")
        + "".join(_cell_html("td", cell) for cell in row[1:])
        + "</tr>"
        for row in rows
    ]
    if not body:
        return f"<p><strong>{_esc(caption)}</strong>: {_esc(empty)}</p>"
    head = "".join(_cell_html("th", h, scope="col") for h in headers)
    return (
        f'<div class="scroll" id="{table_id}" role="region" tabindex="0" '
        f'aria-label="{_esc(caption)}"><table><caption>{_esc(caption)}</caption>'
        f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"
    )


def _pairs(table_id: str, caption: str, pairs: Sequence[tuple[str, CellValue]]) -> str:
    return _table(table_id, caption, ("Item", "Value"), pairs)


def _check(ok: Any) -> Cell:
    return Cell("OK", "ok") if ok is True else Cell("FAILING", "bad")


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return "-"
    total = int(seconds)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h {minutes} min"
    if hours:
        return f"{hours} h {minutes} min {secs} s"
    if minutes:
        return f"{minutes} min {secs} s"
    return f"{secs} s"


def _ms(seconds: Any) -> Cell:
    if not isinstance(seconds, int | float):
        return Cell("-", "num")
    return Cell(f"{seconds * 1000:.1f}", "num")


def _section(key: str, title: str, parts: Iterable[str]) -> str:
    return (
        f'<section aria-labelledby="h-{key}"><h2 id="h-{key}">{_esc(title)}</h2>'
        + "".join(parts)
        + "</section>"
    )


def _instance_section(instance: Mapping[str, Any]) -> str:
    ports = instance.get("ports") or {}
    role = instance.get("role")
    epoch = instance.get("epoch")
    role_text = f"{_text(role)} (epoch {epoch})" if epoch is not None else _text(role)
    about = _pairs(
        "t-instance",
        "Instance",
        [
            ("Instance id", instance.get("id")),
            ("Cluster", instance.get("cluster")),
            ("Version", instance.get("version")),
            ("State", instance.get("state")),
            ("Role", role_text),
            ("Host", instance.get("host")),
            ("Process id", instance.get("pid")),
            ("Started", instance.get("started")),
            ("Uptime", _duration(instance.get("uptime_s"))),
            ("MLLP port", ports.get("mllp")),
            ("HTTP port", ports.get("http")),
            ("ACK mode", instance.get("ack_mode")),
            ("ZooKeeper session", instance.get("zookeeper_session")),
            ("Cluster config version applied", instance.get("config_version")),
        ],
    )
    checks = instance.get("checks") or {}
    ready = _table(
        "t-readiness",
        "Readiness checks",
        ("Check", "Status"),
        [("ready (all checks)", _check(instance.get("ready")))]
        + [(name, _check(ok)) for name, ok in checks.items()],
    )
    return _section("instance", "This instance", [f'<div class="grid">{about}{ready}</div>'])


def _unavailable_notice(cluster: Mapping[str, Any], what: str) -> str:
    detail = cluster.get("detail")
    text = f"{what} unavailable: ZooKeeper could not be read ({_text(cluster.get('error'))}"
    text += f": {detail})." if detail else ")."
    attempt = f"Last attempt {_text(cluster.get('read_at'))}."
    return f'<p class="notice"><strong>{_esc(text)}</strong> {_esc(attempt)}</p>'


def _cluster_section(cluster: Mapping[str, Any]) -> str:
    status = cluster.get("status")
    if not cluster.get("available") or not isinstance(status, dict):
        return _section(
            "cluster",
            "Cluster",
            [
                _unavailable_notice(cluster, "Cluster view"),
                "<p>The instance part above is this instance's own view.</p>",
            ],
        )
    members = status.get("members") or []
    live = {m.get("instance") for m in members}
    leader = status.get("leader")
    if leader is None:
        leader_text = "none"
    else:
        leader_text = str(leader) + ("" if leader in live else " (not a live member)")
    summary = _pairs(
        "t-cluster",
        "Cluster",
        [
            ("Cluster", status.get("cluster")),
            ("Leader", leader_text),
            ("Leader epoch", status.get("epoch")),
            ("Members", len(members)),
            ("Cluster config version", status.get("config_version") or "not pushed"),
            ("Read from ZooKeeper at", cluster.get("read_at")),
        ],
    )
    member_rows: list[Sequence[CellValue]] = []
    for member in members:
        ports = member.get("ports") if isinstance(member.get("ports"), dict) else {}
        extra = {k: v for k, v in ports.items() if k not in ("mllp", "http")}
        member_rows.append(
            (
                member.get("instance"),
                "leader" if member.get("leader") else "member",
                member.get("host"),
                ports.get("mllp"),
                ports.get("http"),
                _text(extra),
                member.get("version"),
                member.get("session"),
                member.get("started"),
                _text(member.get("load")),
                _text(member.get("channels")),
            )
        )
    member_table = _table(
        "t-members",
        "Members",
        (
            "Instance",
            "Role",
            "Host",
            "MLLP port",
            "HTTP port",
            "Other ports",
            "Version",
            "ZooKeeper session",
            "Started",
            "Load",
            "Channels owned",
        ),
        member_rows,
        empty="No live members.",
    )
    channels = _table(
        "t-channels",
        "Channels and their owners",
        ("Channel", "Owner"),
        [(c.get("name"), c.get("owner") or "none") for c in status.get("channels") or []],
        empty="No channels configured.",
    )
    return _section(
        "cluster", "Cluster", [f'<div class="grid">{summary}{channels}</div>', member_table]
    )


def _diagnosis_section(cluster: Mapping[str, Any]) -> str:
    status = cluster.get("status")
    if not cluster.get("available") or not isinstance(status, dict):
        return _section(
            "diagnosis", "Remote diagnosis", [_unavailable_notice(cluster, "Diagnosis view")]
        )
    diagnosis = status.get("diagnosis") or {}
    open_cases = diagnosis.get("open_cases") or {}
    subscribers = diagnosis.get("subscribers") or []
    total = sum(n for n in open_cases.values() if isinstance(n, int))
    summary = _pairs(
        "t-diagnosis",
        "Cases",
        [
            ("Open cases", total),
            ("Claimed (in progress)", diagnosis.get("claimed", 0)),
            ("Subscribers", len(subscribers)),
        ],
    )
    per_rule = _table(
        "t-cases",
        "Open cases per rule",
        ("Rule", "Open cases"),
        [(rule, n) for rule, n in open_cases.items()],
        empty="No open cases.",
    )
    subscriber_table = _table(
        "t-subscribers",
        "Subscribers",
        ("Subscriber", "Rules", "Host"),
        [(s.get("subscriber"), _text(s.get("rules")), s.get("host")) for s in subscribers],
        empty="No subscribers connected.",
    )
    return _section(
        "diagnosis",
        "Remote diagnosis",
        [f'<div class="grid">{summary}{per_rule}</div>', subscriber_table],
    )


def _traffic_section(traffic_data: Mapping[str, Any]) -> str:
    by_ack = traffic_data.get("messages_by_ack_code") or {}
    ack_table = _table(
        "t-ack-codes",
        "Messages by ACK code",
        ("ACK code", "Meaning", "Count"),
        [(code, _ACK_MEANINGS.get(code, "-"), n) for code, n in by_ack.items()],
        empty="No HL7 v2 messages answered yet.",
    )
    messages = _table(
        "t-messages",
        "Messages by channel, ACK code and message type",
        ("Channel", "ACK code", "Message type", "Count"),
        [
            (m["channel"], m["ack_code"], m["message_type"], m["count"])
            for m in traffic_data.get("messages") or []
        ],
        empty="No HL7 v2 messages answered yet.",
    )
    rejections = _table(
        "t-rejections",
        "Rejections by reason",
        ("Channel", "Reason", "Error code (table 0357)", "Count"),
        [
            (r["channel"], r["reason"], r["err_code"], r["count"])
            for r in traffic_data.get("rejections") or []
        ],
        empty="No rejections.",
    )
    duplicates = traffic_data.get("duplicates") or {}
    reuse = traffic_data.get("control_id_reuse") or {}
    dlq = traffic_data.get("dlq_failures") or {}
    channels = sorted({*duplicates, *reuse, *dlq})
    per_channel = _table(
        "t-per-channel",
        "Duplicates and DLQ failures by channel",
        ("Channel", "Duplicates (resends)", "Control id reused", "DLQ failures"),
        [(c, duplicates.get(c, 0), reuse.get(c, 0), dlq.get(c, 0)) for c in channels],
        empty="No duplicates, reused control ids or DLQ failures.",
    )
    fhir = _table(
        "t-fhir",
        "FHIR requests by interaction and HTTP status",
        ("Interaction", "HTTP status", "Count"),
        [
            (r["interaction"], r["status"], r["count"])
            for r in traffic_data.get("fhir_requests") or []
        ],
        empty="No FHIR requests yet.",
    )
    mllp = traffic_data.get("mllp") or {}
    spool = traffic_data.get("spool") or {}
    dedupe = traffic_data.get("dedupe_entries") or {}
    state = _pairs(
        "t-state",
        "Connections, spool and dedupe window",
        [
            ("Open MLLP connections", mllp.get("open_connections")),
            ("MLLP connections since start", mllp.get("connections_total")),
            ("MLLP connections refused (over the limit)", mllp.get("connections_rejected")),
            ("MLLP frames received", mllp.get("frames_received")),
            ("Spool backlog (messages)", spool.get("messages")),
            ("Spool size (bytes)", spool.get("bytes")),
            *((f"Dedupe window entries ({name})", n) for name, n in dedupe.items()),
        ],
    )
    latency = _table(
        "t-latency",
        "ACK latency (ms)",
        ("Channel", "Answered", "p50", "p99", "Mean"),
        [
            (r["channel"], r["count"], _ms(r["p50_s"]), _ms(r["p99_s"]), _ms(r["mean_s"]))
            for r in traffic_data.get("ack_latency") or []
        ],
        empty="Nothing answered yet.",
    )
    note = (
        '<p class="muted">p50 and p99 are estimated from the histogram buckets '
        "(linear interpolation inside a bucket, as Prometheus' histogram_quantile); "
        "a value equal to the highest bucket bound (10000 ms) means at least that.</p>"
    )
    return _section(
        "traffic",
        "Traffic since start",
        [
            f'<div class="grid">{ack_table}{state}</div>',
            messages,
            rejections,
            per_channel,
            fhir,
            latency,
            note,
        ],
    )


def render_page(data: Mapping[str, Any]) -> str:
    """The HTML page for :meth:`Dashboard.snapshot`'s data. Every value is escaped."""
    instance = data.get("instance") or {}
    cluster = data.get("cluster") or {}
    instance_id = _esc(instance.get("id"))
    refresh_s = data.get("refresh_s")
    refresh = _esc(refresh_s if isinstance(refresh_s, int | float) else REFRESH_S)
    content = "".join(
        (
            f'<p class="muted">Data as of {_esc(data.get("generated_at"))} (UTC).</p>',
            _instance_section(instance),
            _cluster_section(cluster),
            _diagnosis_section(cluster),
            _traffic_section(data.get("traffic") or {}),
        )
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>hl7bridge {instance_id}: dashboard</title>"
        f"<style>{_STYLE}</style></head>"
        f'<body data-refresh-s="{refresh}"><header>'
        f"<h1>hl7bridge dashboard: instance {instance_id}</h1>"
        f'<p class="muted">Cluster {_esc(instance.get("cluster"))}, '
        f"version {_esc(instance.get('version'))}. Ids, counts and codes only: "
        "no message content, no patient data.</p>"
        '<div class="controls">'
        '<button type="button" id="pause" aria-pressed="false" hidden>'
        "Pause auto-refresh</button>"
        '<button type="button" id="refresh-now" hidden>Refresh now</button>'
        '<span id="refresh-state" role="status"></span>'
        "<noscript>Auto-refresh needs JavaScript: reload the page to update it.</noscript>"
        "</div>"
        '<nav aria-label="Raw data"><a href="dashboard.json">This data as JSON</a> · '
        '<a href="metrics">Prometheus metrics</a></nav></header>'
        f'<main id="content">{content}</main>'
        f"<script>{_SCRIPT}</script></body></html>\n"
    )
