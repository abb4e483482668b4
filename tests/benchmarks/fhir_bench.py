"""FHIR REST ingest benchmark: concurrent clients POSTing Observations to ``hl7bridge dev``.

Starts ``hl7bridge dev`` (embedded ZooKeeper + Tansu, one bridge instance) as a
subprocess, as :mod:`tests.benchmarks.mllp_bench` does, and drives its
``POST /fhir/Observation`` from this process (aiohttp's ``ClientSession`` on
uvloop, one ``TCPConnector`` with ``limit`` = the number of clients):

* phase 1, throughput: closed loop, each of ``--clients`` clients posts the next
  Observation as soon as the answer to its previous one is back; accepted/s and
  latency (request start to the answer's body read);
* phase 2, latency at a fixed offered rate: open loop, ``--rate`` requests/s
  spread over the clients on a fixed time grid; latency is measured from the
  *scheduled* send time, so a slow answer that delays the next request is charged
  to that next request too (no coordinated omission).

Every request body is the template Observation (``Observation-f001.json`` of the
FHIR R4 examples, compact JSON) with its own ``identifier[0].value`` (unique in
the run), a ``valueQuantity.value`` and one of ``PATIENTS`` ``subject`` references
(the Kafka key): the bridge answers identical content from its duplicate filter
without publishing it, which is not what is measured here. Every answer is
checked: status 202 and an ``X-Event-Id`` no earlier answer carried (a repeated
id means the duplicate path answered); the first answer of each phase also has
its body read as an OperationOutcome naming that event. Each accepted request
publishes two records (the body on ``health.raw.fhir``, the event on
``health.events``, acks=all); after the run the records written to each topic
are counted against the 202 answers. The CPU time of the bridge, the broker,
ZooKeeper, the (idle) HL7 v2 mapping worker and this load generator is read from
``/proc`` over each measured window, with what other processes on the machine used
meanwhile (``/proc/stat``): a run where they used more than a little is disturbed.

Run from the repository root::

    .venv/bin/python -m tests.benchmarks.fhir_bench [--clients 32] [--duration-s 20]
        [--warmup-s 3] [--rate 300] [--resource PATH] [--json] [--keep-logs]

Exit status 0; 1 if any request was not answered 202 with a new event id or the
Kafka counts do not match (the report says so loudly); 2 if the bridge could not
be started.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiohttp
import orjson

from bridge.kafka import Topics
from tests.benchmarks.mllp_bench import (
    ACK_TIMEOUT_S,
    OPEN_LOOP_MAX_OVERRUN_S,
    REPO_ROOT,
    TOPIC_PREFIX,
    Child,
    Mode,
    PhaseResult,
    _ms,
    add_run_options,
    cpu_rows,
    emit,
    errors_text,
    kafka_check,
    kafka_end_offsets,
    log,
    open_loop_rows,
    percentiles,
    process_cpu_s,
    report_head,
    run_bench,
    run_cancellable,
    run_meta,
    stack_pids,
    start_dev_only,
    topic_rows,
)

DEFAULT_RESOURCE: Final = (
    REPO_ROOT.parent / "shared/corpus/hl7-fhir-r4-examples/package/Observation-f001.json"
)
#: Distinct subject references cycled through, so Kafka keys spread over the partitions.
PATIENTS: Final = 1000
#: The issue's targets (issue 4): accepted/s in phase 1, and p99 at 300/s offered.
TARGET_ACCEPTED_PER_S: Final = 1500.0
TARGET_P99_MS: Final = 30.0
TARGET_RATE: Final = 300.0

_HEADERS: Final = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
_ID_MARK: Final = "@@BENCH-IDENTIFIER@@"
_PATIENT_MARK: Final = "@@BENCH-PATIENT@@"
_VALUE_MARK: Final = "@@BENCH-VALUE@@"
_CLK_TCK: Final = os.sysconf("SC_CLK_TCK")
Log = Callable[[str], None]


# --- the request bodies ------------------------------------------------------------------------


class ObservationFactory:
    """Bodies of one template Observation with a unique identifier, a varying value and
    a cycling subject.

    The template is serialized once (compact JSON) with markers in those three places
    and cut around them, so making a body is one ``bytes.join``. The sequence numbers
    are shared by both phases, and the run tag keeps runs apart: no content is ever
    sent twice.
    """

    def __init__(self, resource: dict[str, Any], *, run_tag: str) -> None:
        if resource.get("resourceType") != "Observation":
            raise ValueError("the template is not an Observation")
        template = dict(resource)
        template.pop("id", None)  # a create's id is the server's to assign
        identifiers: list[dict[str, Any]] = [dict(i) for i in template.get("identifier") or [{}]]
        identifiers[0].setdefault("system", "urn:hl7bridge:bench")
        identifiers[0]["value"] = _ID_MARK
        template["identifier"] = identifiers
        template["subject"] = {**(template.get("subject") or {}), "reference": _PATIENT_MARK}
        quantity = template.get("valueQuantity")
        if not isinstance(quantity, dict):
            raise ValueError("the template Observation has no valueQuantity")
        template["valueQuantity"] = {**quantity, "value": _VALUE_MARK}
        text = orjson.dumps(template)
        marks = {
            "id": f'"{_ID_MARK}"'.encode(),
            "patient": f'"{_PATIENT_MARK}"'.encode(),
            "value": f'"{_VALUE_MARK}"'.encode(),
        }
        found = sorted((text.index(mark), name, mark) for name, mark in marks.items())
        self._pieces: list[bytes] = []
        self._order: list[str] = []
        at = 0
        for pos, name, mark in found:
            self._pieces.append(text[at:pos])
            self._order.append(name)
            at = pos + len(mark)
        self._pieces.append(text[at:])
        self._tag = run_tag
        self._patients = [f'"Patient/bench-{i:04d}"'.encode() for i in range(PATIENTS)]
        self._values = [f"{1 + i / 100:.2f}".encode() for i in range(1000)]
        self._seq = 0
        self.size = len(self.next_body()[0])
        self._seq = 0

    def next_body(self) -> tuple[bytes, str]:
        """One request body and its identifier value."""
        self._seq += 1
        seq = self._seq
        ident = f"{self._tag}-{seq}"
        fill = {
            "id": f'"{ident}"'.encode(),
            "patient": self._patients[seq % PATIENTS],
            "value": self._values[seq % len(self._values)],
        }
        parts = [self._pieces[0]]
        for name, piece in zip(self._order, self._pieces[1:], strict=True):
            parts += (fill[name], piece)
        return b"".join(parts), ident

    @classmethod
    def from_file(cls, path: Path) -> ObservationFactory:
        return cls(orjson.loads(path.read_bytes()), run_tag=f"bench-{os.urandom(4).hex()}")


# --- the load generator --------------------------------------------------------------------


@dataclass
class FhirPhaseResult(PhaseResult):
    """:class:`PhaseResult` of mllp_bench, read for HTTP: ``connections`` are clients,
    ``msgs_per_s`` accepted resources/s, ``ok_*`` 202 answers with a new event id."""

    #: Every HTTP status received in the phase (warm-up and drain included).
    statuses: dict[str, int] = field(default_factory=dict)
    #: Accepted answers per second of the window, to see a rate that drifts.
    per_second: list[int] = field(default_factory=list)
    #: The whole machine over the window (``/proc/stat``): cpu-s of all processes, of
    #: interrupts and steal, and what processes other than those in ``cpu_s`` used.
    host_cpu_s: dict[str, float] = field(default_factory=dict)


def host_cpu_s() -> dict[str, float]:
    """The machine's cpu-s so far: processes (user, nice, system), interrupts (irq and
    softirq, charged to no process) and steal."""
    with open("/proc/stat", "rb") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return {
        "processes": (user + nice + system) / _CLK_TCK,
        "interrupts": (irq + softirq) / _CLK_TCK,
        "steal": steal / _CLK_TCK,
    }


class FhirPhase:
    """One measured run of ``clients`` coroutines sharing one aiohttp session.

    The measured window is ``[warm_end, end)``; the CPU of ``processes`` is read at
    both of its edges (timer callbacks, not tied to any request).
    """

    def __init__(
        self,
        *,
        session: aiohttp.ClientSession,
        url: str,
        mode: Mode,
        clients: int,
        factory: ObservationFactory,
        warmup_s: float,
        duration_s: float,
        rate: float,
        processes: dict[str, int],
        event_ids: set[str],
    ) -> None:
        self.session = session
        self.url = url
        self.mode = mode
        self.clients = clients
        self.factory = factory
        self.rate = rate
        self.processes = processes
        self.event_ids = event_ids
        self.t0 = time.perf_counter() + 0.05
        self.warm_end = self.t0 + warmup_s
        self.end = self.warm_end + duration_s
        overrun = OPEN_LOOP_MAX_OVERRUN_S if mode == "open" else 0.0
        self.send_until = self.end + overrun  # open loop: late slots of the window
        self.hard_end = self.send_until + ACK_TIMEOUT_S + 5.0
        self.latencies: list[float] = []
        self.service: list[float] = []
        self.lags: list[float] = []
        self.ok_in_window = 0
        self.ok_total = 0
        self.sent = 0
        self.sent_in_window = 0
        self.answered = 0
        self.statuses: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.error_samples: list[str] = []
        self.cpu_start: dict[str, float] = {}
        self.cpu_end: dict[str, float] = {}
        self.host_start: dict[str, float] = {}
        self.host_end: dict[str, float] = {}
        self.per_second = [0] * math.ceil(duration_s)
        self._checked_first = False

    # -- driving --------------------------------------------------------------------------

    async def run(self) -> FhirPhaseResult:
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        timers = [
            loop.call_later(self.warm_end - now, self._snapshot, self.cpu_start, self.host_start),
            loop.call_later(self.end - now, self._snapshot, self.cpu_end, self.host_end),
        ]
        worker = self._closed_client if self.mode == "closed" else self._open_client
        tasks = [asyncio.create_task(worker(i)) for i in range(self.clients)]
        try:
            _, pending = await asyncio.wait(tasks, timeout=self.hard_end - time.perf_counter())
            for task in pending:
                task.cancel()
                self._error("client still busy at the phase's hard end", "")
            if pending:
                await asyncio.wait(pending)
            for task in tasks:
                if not task.cancelled() and task.exception() is not None:
                    self._error("client crashed", repr(task.exception())[:200])
            # The open loop's last answers may come before the window's end: let the
            # CPU snapshot at the end fire before the result is taken.
            await asyncio.sleep(max(0.0, self.end - time.perf_counter()) + 0.01)
        finally:
            for timer in timers:
                timer.cancel()
            for task in tasks:
                task.cancel()
        return self._result()

    async def _closed_client(self, index: int) -> None:
        await asyncio.sleep(max(0.0, self.t0 - time.perf_counter()))
        while (now := time.perf_counter()) < self.end:
            ok, sent_at, done_at = await self._request(now)
            if ok and self.warm_end <= done_at < self.end:
                self.ok_in_window += 1
                self.per_second[int(done_at - self.warm_end)] += 1
                self.latencies.append(done_at - sent_at)
            elif not ok:
                await asyncio.sleep(0.01)  # a refusing or absent server: do not spin

    async def _open_client(self, index: int) -> None:
        n = self.clients
        slot = 0
        while True:
            slot_at = self.t0 + (index + slot * n) / self.rate
            now = time.perf_counter()
            if slot_at >= self.end or now >= self.send_until:
                return
            if slot_at > now:
                await asyncio.sleep(slot_at - now)
            ok, sent_at, done_at = await self._request(slot_at)
            if ok and self.warm_end <= done_at < self.end:
                self.ok_in_window += 1
                self.per_second[int(done_at - self.warm_end)] += 1
            if ok and self.warm_end <= slot_at < self.end:
                # A timer may fire a little early: the clock starts at whichever came first.
                self.latencies.append(done_at - min(slot_at, sent_at))
                self.service.append(done_at - sent_at)
                self.lags.append(max(0.0, sent_at - slot_at))
            slot += 1

    async def _request(self, scheduled_at: float) -> tuple[bool, float, float]:
        """POST one Observation; (answered 202 with a new event id, sent at, answered at)."""
        body, ident = self.factory.next_body()
        self.sent += 1
        if self.warm_end <= scheduled_at < self.end:
            self.sent_in_window += 1
        sent_at = time.perf_counter()
        try:
            async with self.session.post(self.url, data=body) as response:
                payload = await response.read()
                status = response.status
                event_id = response.headers.get("X-Event-Id", "")
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._error(f"no answer: {type(exc).__name__}", str(exc)[:200])
            return False, sent_at, time.perf_counter()
        done_at = time.perf_counter()
        self.answered += 1
        self.statuses[str(status)] += 1
        return self._check(status, event_id, payload, ident), sent_at, done_at

    def _check(self, status: int, event_id: str, payload: bytes, ident: str) -> bool:
        if status != 202:
            self._error(f"HTTP {status}", f"{ident}: {payload[:300]!r}")
            return False
        if not event_id:
            self._error("202 without X-Event-Id", ident)
            return False
        if event_id in self.event_ids:
            self._error("X-Event-Id seen before (the duplicate path answered)", event_id)
            return False
        self.event_ids.add(event_id)
        if not self._checked_first:
            self._checked_first = True
            try:
                outcome = orjson.loads(payload)
            except orjson.JSONDecodeError:
                outcome = None
            if not (
                isinstance(outcome, dict)
                and outcome.get("resourceType") == "OperationOutcome"
                and event_id in payload.decode("utf-8", errors="replace")
            ):
                self._error("the 202 body is not an OperationOutcome naming the event", "")
                return False
        self.ok_total += 1
        return True

    def _error(self, kind: str, sample: str) -> None:
        self.errors[kind] += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(f"{kind}: {sample}")

    def _snapshot(self, into: dict[str, float], host: dict[str, float]) -> None:
        into["wall"] = time.perf_counter()
        for name, pid in self.processes.items():
            cpu = process_cpu_s(pid)
            if cpu is not None:
                into[name] = cpu
        host.update(host_cpu_s())

    # -- results --------------------------------------------------------------------------

    def _expected_in_window(self) -> int:
        """Open loop: how many slots of all clients fall inside the window."""
        n, total = self.clients, 0
        period = n / self.rate
        for index in range(n):
            first = self.t0 + index / self.rate
            lo = max(0, math.ceil((self.warm_end - first) / period - 1e-9))
            hi = max(0, math.ceil((self.end - first) / period - 1e-9))
            total += hi - lo
        return total

    def _result(self) -> FhirPhaseResult:
        window = self.cpu_end.get("wall", self.end) - self.cpu_start.get("wall", self.warm_end)
        cpu = {
            name: self.cpu_end[name] - self.cpu_start[name]
            for name in self.processes
            if name in self.cpu_start and name in self.cpu_end
        }
        result = FhirPhaseResult(
            target="bridge",
            mode=self.mode,
            connections=self.clients,
            window_s=window,
            ok_in_window=self.ok_in_window,
            ok_total=self.ok_total,
            msgs_per_s=self.ok_in_window / window if window > 0 else 0.0,
            latency_ms=percentiles(self.latencies),
            sent=self.sent,
            answered=self.answered,
            errors=dict(self.errors),
            error_samples=self.error_samples,
            cpu_s=cpu,
            statuses=dict(self.statuses),
            per_second=self.per_second,
        )
        if self.host_start and self.host_end:
            host = {k: self.host_end[k] - self.host_start[k] for k in self.host_start}
            host["other processes"] = max(0.0, host["processes"] - sum(cpu.values()))
            result.host_cpu_s = host
        if self.mode == "open":
            result.offered_rate = self.rate
            result.service_latency_ms = percentiles(self.service)
            result.send_lag_ms = percentiles(self.lags)
            result.backlog = max(0, self._expected_in_window() - self.sent_in_window)
        return result


async def bench_bridge(
    url: str,
    factory: ObservationFactory,
    args: argparse.Namespace,
    processes: dict[str, int],
    log: Log,
) -> list[FhirPhaseResult]:
    """Both phases over one session: ``clients`` keep-alive connections at most."""
    connector = aiohttp.TCPConnector(limit=args.clients)
    session = aiohttp.ClientSession(
        connector=connector,
        headers=_HEADERS,
        timeout=aiohttp.ClientTimeout(total=ACK_TIMEOUT_S),
        cookie_jar=aiohttp.DummyCookieJar(),
    )
    event_ids: set[str] = set()
    results: list[FhirPhaseResult] = []
    modes: tuple[Mode, ...] = ("closed", "open")
    async with session:
        for mode in modes:
            what = "throughput (closed loop)" if mode == "closed" else f"{args.rate:g} requests/s"
            log(f"  bridge: {what}, {args.warmup_s:g} s warm-up + {args.duration_s:g} s")
            phase = FhirPhase(
                session=session,
                url=url,
                mode=mode,
                clients=args.clients,
                factory=factory,
                warmup_s=args.warmup_s,
                duration_s=args.duration_s,
                rate=args.rate,
                processes=processes,
                event_ids=event_ids,
            )
            results.append(await phase.run())
    return results


def fhir_kafka_check(
    before: dict[str, list[int]],
    after: dict[str, list[int]],
    answers_202: int,
    new_events: int,
    topics: Topics,
) -> dict[str, Any]:
    """Records written per topic during the run against the 202 answers: each 202 is
    one record on ``raw.fhir`` and one on ``events``. ``new_events`` are the 202s with
    an event id not seen before (the rest came from the duplicate filter)."""
    counted = kafka_check(before, after, answers_202, topics.raw_fhir)
    mismatches = []
    for topic in (topics.raw_fhir, topics.events):
        records = counted["topics"].get(topic, {"records": 0})["records"]
        if records < new_events:
            missing = new_events - records
            mismatches.append(f"LOST: {missing} new events answered 202 have no record in {topic}")
        elif records < answers_202:
            mismatches.append(
                f"{answers_202 - records} answers 202 in excess of the records in {topic} "
                "(answered by the duplicate filter, not published)"
            )
        elif records > answers_202:
            mismatches.append(f"{records - answers_202} more records in {topic} than 202 answers")
    return {
        "answers_202": answers_202,
        "new_events": new_events,
        "topics": counted["topics"],
        "verdict": "; ".join(mismatches) if mismatches else "ok",
    }


# --- report -------------------------------------------------------------------------------------


def targets(results: Sequence[FhirPhaseResult], rate: float) -> dict[str, Any]:
    closed = next(r for r in results if r.mode == "closed")
    opened = next(r for r in results if r.mode == "open")
    p99 = opened.latency_ms.get("p99")
    return {
        "accepted_per_s": closed.msgs_per_s,
        "accepted_per_s_reached": closed.msgs_per_s >= TARGET_ACCEPTED_PER_S
        and not closed.error_count,
        "p99_ms": p99,
        "p99_at_rate": rate,
        "p99_reached": p99 is not None
        and p99 < TARGET_P99_MS
        and rate >= TARGET_RATE
        and not opened.error_count
        and opened.msgs_per_s >= 0.95 * rate,
    }


def render(report: dict[str, Any], results: list[FhirPhaseResult]) -> str:
    meta, cfg = report["meta"], report["config"]
    lines = [
        *report_head("FHIR REST benchmark", meta),
        f"request: POST /fhir/Observation, {cfg['resource']} ({cfg['body_bytes']} bytes, "
        f"unique identifier, {cfg['patients']} subjects); {cfg['clients']} clients "
        f"(aiohttp); {cfg['duration_s']:g} s measured after {cfg['warmup_s']:g} s warm-up",
    ]
    closed = [r for r in results if r.mode == "closed"]
    opened = [r for r in results if r.mode == "open"]
    lines += [
        "",
        "phase 1: throughput, closed loop (latency = request to answer read)",
        f"  {'target':<10}{'accepted/s':>11}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}"
        f"{'max ms':>9}  errors",
    ]
    for r in closed:
        lat = r.latency_ms
        lines.append(
            f"  {r.target:<10}{r.msgs_per_s:>11.1f}{_ms(lat, 'p50'):>9}{_ms(lat, 'p90'):>9}"
            f"{_ms(lat, 'p99'):>9}{_ms(lat, 'max'):>9}  {errors_text(r)}"
        )
        if r.per_second:
            seconds = sorted(r.per_second)
            lines.append(
                f"  accepted per second of the window: min {seconds[0]}, "
                f"median {seconds[len(seconds) // 2]}, max {seconds[-1]}; "
                f"first 5 s {sum(r.per_second[:5]) / min(5, len(seconds)):.0f}/s, "
                f"last 5 s {sum(r.per_second[-5:]) / min(5, len(seconds)):.0f}/s"
            )
    lines += [
        "",
        f"phase 2: open loop at {cfg['rate']:g} requests/s offered "
        "(latency from the SCHEDULED send time; service = from the request start)",
        f"  {'target':<10}{'achieved/s':>11}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}"
        f"{'svc p50':>9}{'svc p99':>9}{'lag p99':>9}  errors",
    ]
    lines += open_loop_rows(opened, cfg["rate"], 10)
    for r in results:
        phase = "phase 1" if r.mode == "closed" else "phase 2"
        available = r.window_s * meta["nproc"]
        total = sum(r.cpu_s.values())
        lines += [
            "",
            f"cpu seconds per process during {phase} ({r.window_s:.1f} s window, "
            f"{meta['nproc']} cores = {available:.1f} cpu-s available, {total:.1f} used, "
            f"{total / available:.0%})",
        ]
        lines += cpu_rows(r, "request")
        if r.host_cpu_s:
            host = r.host_cpu_s
            lines.append(
                f"    machine: other processes {host['other processes']:.2f} cpu-s, "
                f"interrupts (softirq) {host['interrupts']:.2f}, steal {host['steal']:.2f}"
            )
    kafka = report.get("kafka") or {}
    if kafka:
        lines += ["", "kafka: records written during the run", *topic_rows(kafka)]
        statuses = Counter[str]()
        for r in results:
            statuses.update(r.statuses)
        lines.append(
            f"  answers: {', '.join(f'{n} x {s}' for s, n in sorted(statuses.items())) or 'none'}"
        )
        lines.append(f"  202 answers: {kafka['answers_202']}; check: {kafka['verdict']}")
        if kafka.get("end_offsets_understated_by_broker"):
            lines.append(
                f"  (the broker reported {kafka['end_offsets_understated_by_broker']} partition "
                "end offsets one short; counted from the records instead)"
            )
    failed = [r for r in results if r.error_count]
    if kafka and kafka.get("verdict") != "ok":
        lines += ["", "!" * 78, f"!!! kafka check: {kafka['verdict']}", "!" * 78]
    if failed:
        lines += ["", "!" * 78, "!!! ERRORS: the numbers above are NOT a valid result"]
        for r in failed:
            lines.append(f"!!! {r.mode} loop: {errors_text(r)}")
            lines += [f"!!!   {s}" for s in r.error_samples]
        lines.append("!" * 78)
    else:
        lines += ["", "all requests answered 202 with a new X-Event-Id"]
    t = report["targets"]
    p99 = "-" if t["p99_ms"] is None else f"{t['p99_ms']:.1f}"
    at = f"{t['p99_at_rate']:g}/s" + (
        "" if t["p99_at_rate"] == TARGET_RATE else f" (the target is at {TARGET_RATE:g}/s)"
    )
    lines.append(
        f"target (issue 4): >= {TARGET_ACCEPTED_PER_S:,.0f} accepted/s: "
        f"{t['accepted_per_s']:,.0f} accepted/s, "
        f"{'reached' if t['accepted_per_s_reached'] else 'not reached'}; "
        f"p99 at {at} < {TARGET_P99_MS:g} ms: {p99} ms, "
        f"{'reached' if t['p99_reached'] else 'not reached'}"
    )
    return "\n".join(lines)


# --- main ---------------------------------------------------------------------------------------


def build_report(
    args: argparse.Namespace,
    factory: ObservationFactory,
    results: list[FhirPhaseResult],
    kafka: dict[str, Any],
    processes: dict[str, int],
    started: float,
) -> dict[str, Any]:
    """Everything measured, with what is needed to compare it with another run."""
    return {
        "meta": run_meta(
            started,
            ("hl7bridge", "aiohttp", "uvloop", "aiokafka", "fhir.resources", "orjson"),
            pids=processes,
        ),
        "config": {
            "clients": args.clients,
            "duration_s": args.duration_s,
            "warmup_s": args.warmup_s,
            "rate": args.rate,
            "resource": str(args.resource),
            "body_bytes": factory.size,
            "patients": PATIENTS,
            "load_generator": "aiohttp ClientSession on uvloop, one TCPConnector, one process",
        },
        "targets": targets(results, args.rate),
        "kafka": kafka,
        "results": [dataclasses.asdict(r) for r in results],
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tests.benchmarks.fhir_bench",
        description="FHIR REST ingest (POST /fhir/Observation) throughput and latency of "
        "hl7bridge dev.",
    )
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (32)")
    parser.add_argument("--duration-s", type=float, default=20.0, help="measured window (20)")
    parser.add_argument("--warmup-s", type=float, default=3.0, help="unmeasured warm-up (3)")
    parser.add_argument(
        "--rate", type=float, default=TARGET_RATE, help="phase 2 requests/s in total (300)"
    )
    parser.add_argument(
        "--resource", type=Path, default=DEFAULT_RESOURCE, help="template Observation (JSON)"
    )
    add_run_options(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.clients < 1 or args.duration_s <= 0 or args.warmup_s < 0 or args.rate <= 0:
        print("clients, duration-s and rate must be positive", file=sys.stderr)
        return 2
    factory = ObservationFactory.from_file(args.resource)

    def body(children: list[Child], started: float) -> int:
        (bridge,) = children
        stack = stack_pids(bridge)
        processes = {"hl7bridge": bridge.proc.pid, **stack, "load generator": os.getpid()}
        log("  pids: " + ", ".join(f"{name} {pid}" for name, pid in processes.items()))
        url = bridge.ready_field("http") + "/fhir/Observation"
        topics = Topics(TOPIC_PREFIX)
        results: list[FhirPhaseResult] = []
        kafka: dict[str, Any] = {}

        async def run_all() -> None:
            bootstrap = bridge.ready_field("kafka")
            before, _ = await kafka_end_offsets(bootstrap, topics.all())
            results.extend(await bench_bridge(url, factory, args, processes, log))
            after, understated = await kafka_end_offsets(bootstrap, topics.all())
            answers_202 = sum(r.statuses.get("202", 0) for r in results)
            new_events = sum(r.ok_total for r in results)
            kafka.update(fhir_kafka_check(before, after, answers_202, new_events, topics))
            kafka["end_offsets_understated_by_broker"] = understated

        run_cancellable(run_all)
        report = build_report(args, factory, results, kafka, processes, started)
        emit(render(report, results), report, as_json=args.json)
        failed = any(r.error_count for r in results) or kafka["verdict"] != "ok"
        return 1 if failed else 0

    return run_bench(
        "hl7bridge-fhir-bench-", keep_logs=args.keep_logs, start=start_dev_only, body=body
    )


if __name__ == "__main__":
    sys.exit(main())
