"""Remote-diagnosis wake latency: from the ACK of a critical result to the subscriber's handler.

Starts ``hl7bridge dev`` (embedded ZooKeeper + Tansu, one bridge instance, which
leads its one-member cluster and so runs the case opener) as a subprocess, as
:mod:`tests.benchmarks.mllp_bench` does, then, in this process, a
:class:`~bridge.diagnosis.subscriber.Subscriber` of the built-in
``critical-results`` rule with a :class:`~bridge.diagnosis.handlers.CallbackHandler`
that notes ``time.monotonic()`` when it is called and answers a small
DiagnosticReport: what a remote-diagnosis service does when it imports the library.

After one warm-up case (sent, handled and completed; not counted: it waits until
the leader's case opener reads the events topics), ``--cases`` critical results
are sent one by one over one MLLP connection, ``--interval-ms`` apart on a fixed
time grid (so a case does not queue behind the previous one: this measures the
wake latency, not throughput): a troponin ORU^R01 whose OBX-8 is ``HH``, each
with its own MSH-10 and one of ``PATIENTS`` patients. Every ACK must be AA with
MSA-2 = MSH-10; the monotonic and wall-clock times of its arrival are kept.
Handler calls are matched to messages by the event's ``hl7controlid`` attribute
(the control id), and carry the event id (the event's ``id``).

With ``--fhir`` the cases are FHIR Observations interpreted ``LL`` posted to
``POST /fhir/Observation`` (the ready line's ``http=``) instead; the clock starts
at the 202 answer (body read), and calls are matched by ``X-Event-Id``.

Per case: **wake latency** = handler call - ACK (monotonic clock); from the
records on ``health.diagnosis`` (read at the end; their timestamps are the
producer's wall-clock ms) the time from the ACK to the ``completed`` lifecycle
event and to the result. A breakdown, on the wall clock (ms resolution), from the
``ctime`` of the case znode and of the claim znode (read by the handler with an
asynchronous ``exists`` on the subscriber's own ZooKeeper session, queued before
anything the subscriber does next, so both nodes still exist) and the timestamps
of the ``opened`` and ``claimed`` records. The count check: every measured event
has exactly one ``opened``, one ``completed`` and one result record and one
handler call. CPU seconds of the bridge, its servers and this process (the
client and the subscriber) over the measured run, and what other processes on the
machine used meanwhile.

Run from the repository root::

    .venv/bin/python -m tests.benchmarks.diagnosis_bench [--cases 200] [--interval-ms 50]
        [--fhir] [--json] [--keep-logs]

Exit status 0 (whether the target is reached or not: the last line says); 1 if a
message was not answered AA / 202, a case was not handled, or the count check
failed; 2 if the bridge could not be started.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp
import orjson

from adapters.mllp.client import MLLPClient
from bridge.diagnosis import cases as dc
from bridge.diagnosis.handlers import CallbackHandler, CaseInfo
from bridge.diagnosis.subscriber import Subscriber, SubscriberSettings
from bridge.envelope import now_rfc3339
from bridge.kafka import Topics
from tests.benchmarks.fhir_bench import host_cpu_s
from tests.benchmarks.mllp_bench import (
    TOPIC_PREFIX,
    Child,
    ack_fields,
    add_run_options,
    describe_ack,
    emit,
    log,
    percentiles,
    process_cpu_s,
    report_head,
    run_bench,
    run_cancellable,
    run_meta,
    stack_pids,
    start_dev_only,
)
from tests.kafka_helpers import read_topic

#: Issue 6: a critical result wakes a subscriber within this long after its ACK (p99).
TARGET_WAKE_MS: Final = 200.0
RULE: Final = "critical-results"
#: Distinct patients cycled through (the Kafka key of the event and of the case records).
PATIENTS: Final = 50
#: How long the warm-up case may take (the leader's case opener starts after the election).
WARMUP_TIMEOUT_S: Final = 90.0
#: How long after the last ACK every case must have been handled and completed.
DRAIN_TIMEOUT_S: Final = 60.0
ANSWER_TIMEOUT_S: Final = 15.0
REPORT: Final[dict[str, Any]] = {
    "resourceType": "DiagnosticReport",
    "status": "final",
    "code": {"text": "remote review of a critical result"},
    "conclusion": "reviewed",
}
_INTERPRETATION: Final = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
Log = Callable[[str], None]


# --- the cases ---------------------------------------------------------------------------------


def troponin(control_id: str, patient: str) -> bytes:
    """A critical troponin ORU^R01 (OBX-8 HH), shaped like tests/integration/test_diagnosis.py."""
    segments = (
        f"MSH|^~\\&|LAB|HOSP|EHR|HOSP|20240101120000+0100||ORU^R01^ORU_R01|{control_id}|P|2.5.1",
        f"PID|1||{patient}^^^HOSP^MR||DOE^JANE||19800101|F",
        "OBR|1|||10839-9^Troponin I.cardiac^LN",
        "OBX|1|NM|10839-9^Troponin I.cardiac^LN||2.5|ng/mL|0.00-0.04|HH|||F",
    )
    return ("\r".join(segments) + "\r").encode()


def potassium_ll(identifier: str, patient: str, seq: int) -> bytes:
    """A FHIR Observation interpreted LL (critically low potassium), unique by identifier."""
    observation = {
        "resourceType": "Observation",
        "identifier": [{"system": "urn:hl7bridge:bench", "value": identifier}],
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "2823-3"}]},
        "subject": {"reference": f"Patient/{patient}"},
        "valueQuantity": {"value": 2.0 + (seq % 50) / 100, "unit": "mmol/L"},
        "interpretation": [{"coding": [{"system": _INTERPRETATION, "code": "LL"}]}],
    }
    return orjson.dumps(observation)


@dataclass
class Sent:
    """One message or request, and when it was answered."""

    seq: int
    #: MSH-10 (MLLP) or the Observation's identifier (FHIR).
    key: str
    sent_mono: float = 0.0
    ack_mono: float | None = None
    ack_wall: float | None = None
    #: From the handler's event (MLLP) or the 202's X-Event-Id (FHIR).
    event_id: str | None = None
    error: str | None = None


@dataclass
class Call:
    """One handler call, as the handler saw it."""

    mono: float
    wall: float
    event_id: str
    control_id: str | None
    case_id: str
    attempt: int
    #: kazoo IAsyncResults of ``exists`` on the case and the claim znodes.
    case_stat: Any = None
    claim_stat: Any = None
    case_ctime_ms: int | None = None
    claim_ctime_ms: int | None = None


@dataclass
class CaseTimes:
    """Milestones of one measured case; ``*_ms`` are from the ACK (or 202)."""

    seq: int
    key: str
    event_id: str | None
    wake_ms: float | None = None
    case_node_ms: float | None = None
    opened_ms: float | None = None
    claim_node_ms: float | None = None
    claimed_ms: float | None = None
    handler_wall_ms: float | None = None
    result_ms: float | None = None
    completed_ms: float | None = None
    #: The case's ACK came before the previous case's ``completed``: it may have queued.
    overlapped: bool = False


@dataclass
class RunResult:
    cases: list[CaseTimes] = field(default_factory=list)
    window_s: float = 0.0
    cpu_s: dict[str, float] = field(default_factory=dict)
    host_cpu_s: dict[str, float] = field(default_factory=dict)
    counts: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    timestamp_types: dict[str, int] = field(default_factory=dict)


# --- the run -------------------------------------------------------------------------------------


class Bench:
    def __init__(
        self,
        args: argparse.Namespace,
        bridge: Child,
        processes: dict[str, int],
        log: Log,
    ) -> None:
        self.args = args
        self.bridge = bridge
        self.processes = processes
        self.log = log
        self.fhir: bool = args.fhir
        self.tag = f"DX{os.urandom(3).hex().upper()}"
        self.bootstrap = bridge.ready_field("kafka")
        self.topics = Topics(TOPIC_PREFIX)
        cluster = bridge.ready_field("cluster")
        self.settings = SubscriberSettings(
            zookeeper=bridge.ready_field("zookeeper"),
            base_path=f"/hl7bridge/{cluster}",
            kafka=self.bootstrap,
            topic_prefix=TOPIC_PREFIX,
            rules=(RULE,),
            kafka_idempotence=False,
        )
        self.subscriber = Subscriber(self.settings, CallbackHandler(self._review))
        self._closed = asyncio.Event()
        self.subscriber.handled = _Handled(self._closed)
        self.calls: list[Call] = []
        #: Handler calls by the key they are matched on (control id or event id).
        self._called: dict[str, asyncio.Event] = {}
        self.result = RunResult()

    # -- the handler ------------------------------------------------------------------------

    async def _review(self, case: CaseInfo, event: Mapping[str, Any]) -> dict[str, Any]:
        mono, wall = time.monotonic(), time.time()
        control_id = event.get("hl7controlid")
        call = Call(
            mono=mono,
            wall=wall,
            event_id=str(event.get("id")),
            control_id=control_id if isinstance(control_id, str) else None,
            case_id=case.case_id,
            attempt=case.attempt,
        )
        if self.args.breakdown:
            # Queued on the subscriber's own session before its next request (kazoo sends
            # a session's requests in order), so both nodes still exist when these run.
            session = self.subscriber.session
            client = session.client
            call.case_stat = client.exists_async(
                dc.path(session, dc.CASES, case.rule, case.case_id)
            )
            call.claim_stat = client.exists_async(dc.path(session, dc.CLAIMS, case.case_id))
        self.calls.append(call)
        key = call.event_id if self.fhir else (call.control_id or "")
        self._called.setdefault(key, asyncio.Event()).set()
        return REPORT

    def _called_event(self, key: str) -> asyncio.Event:
        return self._called.setdefault(key, asyncio.Event())

    # -- sending ----------------------------------------------------------------------------

    async def _send_mllp(self, client: MLLPClient, item: Sent) -> None:
        payload = troponin(item.key, f"{self.tag}P{item.seq % PATIENTS:03d}")
        item.sent_mono = time.monotonic()
        try:
            reply = await client.send(payload, timeout_s=ANSWER_TIMEOUT_S)
        except (OSError, TimeoutError) as exc:
            item.error = f"no ACK: {type(exc).__name__}: {exc}"
            return
        item.ack_mono, item.ack_wall = time.monotonic(), time.time()
        fields = ack_fields(reply)
        if fields is None or fields[0] != b"AA" or fields[1] != item.key.encode():
            item.error = f"not AA for {item.key}: {describe_ack(reply)}"

    async def _send_fhir(self, http: aiohttp.ClientSession, url: str, item: Sent) -> None:
        body = potassium_ll(item.key, f"{self.tag.lower()}-p{item.seq % PATIENTS:03d}", item.seq)
        item.sent_mono = time.monotonic()
        try:
            async with http.post(url, data=body) as response:
                answer = await response.read()
                status = response.status
                event_id = response.headers.get("X-Event-Id")
        except (aiohttp.ClientError, TimeoutError) as exc:
            item.error = f"no answer: {type(exc).__name__}: {exc}"
            return
        item.ack_mono, item.ack_wall = time.monotonic(), time.time()
        if status != 202 or not event_id:
            item.error = f"HTTP {status} (X-Event-Id {event_id!r}): {answer[:200]!r}"
            return
        item.event_id = event_id
        self._called_event(event_id)

    async def _send_all(self, items: list[Sent], interval_s: float) -> None:
        t0 = time.monotonic() + 0.01
        if self.fhir:
            url = self.bridge.ready_field("http") + "/fhir/Observation"
            headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
            timeout = aiohttp.ClientTimeout(total=ANSWER_TIMEOUT_S)
            async with aiohttp.ClientSession(headers=headers, timeout=timeout) as http:
                for i, item in enumerate(items):
                    await _sleep_until(t0 + i * interval_s)
                    await self._send_fhir(http, url, item)
            return
        host, port = self.bridge.ready_field("mllp").rsplit(":", 1)
        async with MLLPClient(host, int(port)) as client:
            for i, item in enumerate(items):
                await _sleep_until(t0 + i * interval_s)
                await self._send_mllp(client, item)
                if item.error and not client.is_connected:
                    break

    def _key_of(self, item: Sent) -> str | None:
        return item.event_id if self.fhir else item.key

    async def _wait_called(self, items: list[Sent], timeout_s: float) -> None:
        keys = [k for item in items if item.error is None and (k := self._key_of(item))]
        waits = [self._called_event(k).wait() for k in keys]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await asyncio.gather(*waits)

    async def _wait_handled(self, count: int, timeout_s: float) -> None:
        """Until the subscriber has closed ``count`` cases (it appends each to ``handled``)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while len(self.subscriber.handled) < count:
                    self._closed.clear()
                    await self._closed.wait()

    # -- the whole run ----------------------------------------------------------------------

    async def run(self) -> RunResult:
        args, log = self.args, self.log
        await self.subscriber.start()
        try:
            if args.closed_markers:
                await self._add_closed_markers(args.closed_markers)
            prefix = "F" if self.fhir else "M"
            warm = [Sent(seq=0, key=f"{self.tag}{prefix}W")]
            log(f"  warm-up: one case, waiting for the case opener (up to {WARMUP_TIMEOUT_S:g} s)")
            started = time.monotonic()
            await self._send_all(warm, 0.0)
            if warm[0].error:
                raise RuntimeError(f"warm-up: {warm[0].error}")
            await self._wait_called(warm, WARMUP_TIMEOUT_S)
            await self._wait_handled(1, 10.0)
            if not self.calls or len(self.subscriber.handled) < 1:
                raise RuntimeError("warm-up: the case was not handled (is the opener running?)")
            log(f"  warm-up case handled after {time.monotonic() - started:.1f} s")
            await asyncio.sleep(0.5)

            items = [
                Sent(seq=i, key=f"{self.tag}{prefix}{i:04d}") for i in range(1, args.cases + 1)
            ]
            log(f"  {args.cases} cases, {args.interval_ms:g} ms apart")
            cpu_start, host_start = self._cpu(), host_cpu_s()
            wall_start = time.monotonic()
            await self._send_all(items, args.interval_ms / 1000)
            await self._wait_called(items, DRAIN_TIMEOUT_S)
            await self._wait_handled(1 + sum(item.error is None for item in items), 30.0)
            self.result.window_s = time.monotonic() - wall_start
            cpu_end, host_end = self._cpu(), host_cpu_s()
            self.result.cpu_s = {
                name: cpu_end[name] - cpu_start[name] for name in cpu_start if name in cpu_end
            }
            host = {k: host_end[k] - host_start[k] for k in host_start}
            host["other processes"] = max(0.0, host["processes"] - sum(self.result.cpu_s.values()))
            self.result.host_cpu_s = host
            await self._collect_stats()
            await self._analyse(items, warm[0])
        finally:
            await self.subscriber.stop()
        return self.result

    async def _add_closed_markers(self, count: int) -> None:
        """``count`` closed-case markers, as a cluster has after days of cases (they stay for
        the retention, 7 days by default; the leader's reaper looks at each)."""
        session = self.subscriber.session
        client = session.client
        await asyncio.to_thread(client.ensure_path, dc.path(session, dc.CLOSED))
        data = orjson.dumps({"outcome": "completed", "closed": now_rfc3339()})
        started = time.monotonic()
        names = [dc.path(session, dc.CLOSED, f"{self.tag.lower()}-old-{i}") for i in range(count)]
        for first in range(0, count, 500):
            pending = [client.create_async(name, data) for name in names[first : first + 500]]
            await asyncio.to_thread(_wait_all, pending)
        self.log(f"  {count} closed-case markers added in {time.monotonic() - started:.1f} s")

    def _cpu(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, pid in self.processes.items():
            cpu = process_cpu_s(pid)
            if cpu is not None:
                out[name] = cpu
        return out

    async def _collect_stats(self) -> None:
        def get(result: Any) -> int | None:
            if result is None:
                return None
            try:
                stat = result.get(timeout=5)
            except Exception:
                return None
            return None if stat is None else int(stat.ctime)

        for call in self.calls:
            call.case_ctime_ms = await asyncio.to_thread(get, call.case_stat)
            call.claim_ctime_ms = await asyncio.to_thread(get, call.claim_stat)
            call.case_stat = call.claim_stat = None

    async def _analyse(self, items: list[Sent], warm: Sent) -> None:
        result = self.result
        errors = result.errors
        errors += [f"case {item.seq}: {item.error}" for item in items if item.error]
        # Calls by the matching key; more than one call per event is an error.
        by_key: dict[str, list[Call]] = {}
        for call in self.calls:
            key = call.event_id if self.fhir else (call.control_id or "?")
            by_key.setdefault(key, []).append(call)
        if not self.fhir:
            # The event id of every message answered AA, from its event on Kafka.
            events = await read_topic(
                self.bootstrap, self.topics.events, min_records=len(items) + 1, timeout_s=30
            )
            by_control_id: dict[str, str] = {}
            for record in events:
                headers = {k: v.decode("utf-8", "replace") for k, v in record.headers}
                control_id = headers.get("ce_hl7controlid")
                if control_id and control_id.startswith(self.tag):
                    by_control_id[control_id] = headers.get("ce_id", "")
            for item in items:
                item.event_id = by_control_id.get(item.key)
                if item.error is None and item.event_id is None:
                    errors.append(f"case {item.seq}: answered AA but no event on Kafka")
                found = by_key.get(item.key)
                if found and found[0].event_id != item.event_id:
                    errors.append(f"case {item.seq}: the handler's event id is not the event's")
        warm_key = (warm.event_id if self.fhir else warm.key) or ""
        measured = {k for item in items if (k := self._key_of(item))}
        strays = [k for k in by_key if k not in measured and k != warm_key]
        if strays:
            errors.append(f"{len(strays)} handler calls for events not sent by this run")
        # The diagnosis topic: every record of the measured events.
        expected_records = 4 * (len(measured) + 1)
        records = await read_topic(
            self.bootstrap, self.topics.diagnosis, min_records=expected_records, timeout_s=30
        )
        event_ids = {item.event_id for item in items if item.event_id}
        kinds: dict[str, dict[str, list[int]]] = {}
        case_ids: dict[str, set[str]] = {}
        ts_types: Counter[str] = Counter()
        for record in records:
            headers = {k: v.decode("utf-8", "replace") for k, v in record.headers}
            event_id = headers.get("ce_eventid", "")
            if event_id not in event_ids:
                continue
            kind = headers.get("ce_type", "").rsplit(".", 1)[-1]
            kinds.setdefault(event_id, {}).setdefault(kind, []).append(record.timestamp)
            case_ids.setdefault(event_id, set()).add(headers.get("ce_caseid", ""))
            ts_types[str(record.timestamp_type)] += 1
        result.timestamp_types = dict(ts_types)
        totals: Counter[str] = Counter()
        for per_kind in kinds.values():
            for kind, stamps in per_kind.items():
                totals[kind] += len(stamps)
        calls_total = sum(len(by_key.get(k, [])) for k in measured)
        sent_ok = sum(item.error is None for item in items)
        once = {
            kind: sum(len(kinds.get(e, {}).get(kind, [])) == 1 for e in event_ids)
            for kind in ("opened", "completed", "result")
        }
        once["handler"] = sum(len(by_key.get(k, [])) == 1 for k in measured)
        result.counts = {
            "cases": len(items),
            "answered": sent_ok,
            "records": dict(totals),
            "handler_calls": calls_total,
            "exactly_once": once,
            "one_case_id_per_event": sum(len(ids) == 1 for ids in case_ids.values()),
            "handled_by_subscriber": len(self.subscriber.handled) - 1,
        }
        n = sent_ok
        ok = (
            n == len(items)
            and all(once[k] == n for k in once)
            and totals["opened"] == n
            and totals["completed"] == n
            and totals["result"] == n
            and calls_total == n
        )
        result.counts["verdict"] = "ok" if ok else "MISMATCH"
        if not ok:
            errors.append(
                f"count check failed: {n} answered, opened {totals['opened']}, "
                f"completed {totals['completed']}, results {totals['result']}, "
                f"handler calls {calls_total}, exactly once {once}"
            )
        # Per case milestones.
        previous_completed: float | None = None
        for item in items:
            match_key = self._key_of(item)
            times = CaseTimes(seq=item.seq, key=item.key, event_id=item.event_id)
            result.cases.append(times)
            if item.ack_mono is None or item.ack_wall is None or match_key is None:
                previous_completed = None
                continue
            ack_ms = item.ack_wall * 1000
            if previous_completed is not None and ack_ms < previous_completed:
                times.overlapped = True
            calls = by_key.get(match_key) or []
            if calls:
                call = calls[0]
                times.wake_ms = (call.mono - item.ack_mono) * 1000
                times.handler_wall_ms = call.wall * 1000 - ack_ms
                if call.case_ctime_ms is not None:
                    times.case_node_ms = call.case_ctime_ms - ack_ms
                if call.claim_ctime_ms is not None:
                    times.claim_node_ms = call.claim_ctime_ms - ack_ms
            firsts = {k: min(v) for k, v in kinds.get(item.event_id or "", {}).items() if v}
            for kind, attr in (
                ("opened", "opened_ms"),
                ("claimed", "claimed_ms"),
                ("completed", "completed_ms"),
                ("result", "result_ms"),
            ):
                if kind in firsts:
                    setattr(times, attr, firsts[kind] - ack_ms)
            completed = firsts.get("completed")
            previous_completed = None if completed is None else float(completed)


def _wait_all(results: list[Any]) -> None:
    """Wait for kazoo asynchronous results (raises the first failure)."""
    for result in results:
        result.get(timeout=30)


class _Handled(list[str]):
    """The subscriber's ``handled`` list, which also sets an event when a case is closed."""

    def __init__(self, closed: asyncio.Event) -> None:
        super().__init__()
        self._closed = closed

    def append(self, case_id: str) -> None:
        super().append(case_id)
        self._closed.set()


async def _sleep_until(at: float) -> None:
    delay = at - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


# --- report -------------------------------------------------------------------------------------

#: The milestones of the breakdown, in order: (field, label).
MILESTONES: Final = (
    ("case_node_ms", "case znode created (ctime)"),
    ("opened_ms", "`opened` record (timestamp)"),
    ("claim_node_ms", "claim znode created (ctime)"),
    ("claimed_ms", "`claimed` record (timestamp)"),
    ("handler_wall_ms", "handler called (wall clock)"),
    ("result_ms", "result record (timestamp)"),
    ("completed_ms", "`completed` record (timestamp)"),
)
#: Segments between milestones: (label, from, to); from None = the ACK.
SEGMENTS: Final = (
    ("ACK -> case znode (opener: fetch, match, ZK txn)", None, "case_node_ms"),
    ("case znode -> claim znode (watch, scan, claim)", "case_node_ms", "claim_node_ms"),
    ("claim znode -> `claimed` (re-read, fetch event)", "claim_node_ms", "claimed_ms"),
    ("`claimed` -> handler (publish `claimed`)", "claimed_ms", "handler_wall_ms"),
    ("handler -> `completed` (result + completed)", "handler_wall_ms", "completed_ms"),
)


def stats(values: list[float]) -> dict[str, float]:
    """p50/p90/p99/max/mean in ms of values given in ms (nearest rank)."""
    return percentiles([v / 1000 for v in values])


def summarize(result: RunResult) -> dict[str, Any]:
    cases = result.cases

    def column(name: str) -> list[float]:
        return [v for c in cases if (v := getattr(c, name)) is not None]

    milestones = {name: stats(column(name)) for name, _ in MILESTONES}
    segments: dict[str, dict[str, float]] = {}
    for label, start, end in SEGMENTS:
        values = [
            getattr(c, end) - (0.0 if start is None else getattr(c, start))
            for c in cases
            if getattr(c, end) is not None and (start is None or getattr(c, start) is not None)
        ]
        segments[label] = stats(values)
    return {
        "wake_ms": stats(column("wake_ms")),
        "completed_ms": milestones["completed_ms"],
        "result_ms": milestones["result_ms"],
        "milestones": milestones,
        "segments": segments,
        "overlapped": sum(c.overlapped for c in cases),
    }


def _f(stat: dict[str, float], key: str) -> str:
    return f"{stat[key]:.1f}" if key in stat else "-"


def render(report: dict[str, Any]) -> str:
    meta, cfg, summary, result = (
        report["meta"],
        report["config"],
        report["summary"],
        report["result"],
    )
    source = "ACK (AA)" if not cfg["fhir"] else "202 answer"
    lines = [
        *report_head("remote-diagnosis wake benchmark", meta),
        f"command: {meta['command']}",
        f"cases: {cfg['cases']} {cfg['what']}, {cfg['interval_ms']:g} ms apart, one "
        f"{'MLLP connection' if not cfg['fhir'] else 'HTTP client'}; subscriber in this "
        f"process (CallbackHandler), rule {RULE}"
        + (
            f"; {cfg['closed_markers']} closed-case markers added first"
            if cfg["closed_markers"]
            else ""
        ),
        "",
        f"latency from the {source}, ms (n = cases with the milestone)",
        f"  {'':<44}{'p50':>8}{'p90':>8}{'p99':>8}{'max':>8}{'n':>6}",
    ]
    rows = [("wake: handler called (monotonic)", summary["wake_ms"])]
    rows += [(label, summary["milestones"][name]) for name, label in MILESTONES]
    for label, stat in rows:
        lines.append(
            f"  {label:<44}{_f(stat, 'p50'):>8}{_f(stat, 'p90'):>8}{_f(stat, 'p99'):>8}"
            f"{_f(stat, 'max'):>8}{int(stat.get('count', 0)):>6}"
        )
    lines += ["", "breakdown: segments between the milestones (wall clock, 1 ms resolution), ms"]
    for label, stat in summary["segments"].items():
        label = label.replace("ACK", "202") if cfg["fhir"] else label
        lines.append(
            f"  {label:<52}{_f(stat, 'p50'):>8}{_f(stat, 'p90'):>8}{_f(stat, 'p99'):>8}"
            f"{_f(stat, 'max'):>8}"
        )
    lines.append(
        f"  cases answered before the previous case completed (may have queued): "
        f"{summary['overlapped']}"
    )
    stamp_types = {"0": "CreateTime", "1": "LogAppendTime"}
    found = ", ".join(
        f"{n} {stamp_types.get(t, t)}" for t, n in sorted(cfg["kafka_timestamp_types"].items())
    )
    lines.append(f"  record timestamps on {TOPIC_PREFIX}.diagnosis: {found or 'none'}")
    window = result["window_s"]
    cpu = result["cpu_s"]
    total = sum(cpu.values())
    lines += [
        "",
        f"cpu seconds during the run ({window:.1f} s, from the first send to the last "
        f"completion; {meta['nproc']} cores = {window * meta['nproc']:.1f} cpu-s available, "
        f"{total:.2f} used)",
    ]
    n = max(cfg["cases"], 1)
    for name, secs in sorted(cpu.items(), key=lambda kv: -kv[1]):
        lines.append(
            f"    {name:<30}{secs:>7.2f} cpu-s {secs / window:>6.1%} of a core "
            f"{secs / n * 1000:>8.1f} ms/case"
        )
    host = result["host_cpu_s"]
    if host:
        lines.append(
            f"    machine: other processes {host['other processes']:.2f} cpu-s, "
            f"interrupts {host['interrupts']:.2f}, steal {host['steal']:.2f}"
        )
    counts = result["counts"]
    records = counts.get("records", {})
    lines += [
        "",
        f"count check ({TOPIC_PREFIX}.diagnosis, measured cases only): "
        f"{counts.get('answered', 0)} of {counts.get('cases', 0)} answered; "
        f"opened {records.get('opened', 0)}, claimed {records.get('claimed', 0)}, "
        f"completed {records.get('completed', 0)}, results {records.get('result', 0)}, "
        f"escalated {records.get('escalated', 0)}; handler calls {counts.get('handler_calls', 0)}; "
        f"exactly once: {counts.get('exactly_once', {})}: {counts.get('verdict', '?')}",
    ]
    if result["errors"]:
        lines += ["", "!" * 78, "!!! ERRORS: the numbers above are NOT a valid result"]
        lines += [f"!!!   {e}" for e in result["errors"][:10]]
        lines.append("!" * 78)
    lines.append(target_line(report))
    return "\n".join(lines)


def target_line(report: dict[str, Any]) -> str:
    wake = report["summary"]["wake_ms"]
    reached = report["targets"]["reached"]
    what = "the ACK" if not report["config"]["fhir"] else "the 202 (FHIR variant)"
    return (
        f"target (issue 6): wake within {TARGET_WAKE_MS:g} ms of {what}: "
        f"p50 {_f(wake, 'p50')} ms, p99 {_f(wake, 'p99')} ms, "
        f"{'reached' if reached else 'not reached'}"
    )


# --- main ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tests.benchmarks.diagnosis_bench",
        description="How fast a remote-diagnosis subscriber is woken after the bridge ACKs "
        "a critical result (issue 6).",
    )
    parser.add_argument("--cases", type=int, default=200, help="measured cases (200)")
    parser.add_argument(
        "--interval-ms", type=float, default=50.0, help="between two sends, ms (50)"
    )
    parser.add_argument(
        "--fhir",
        action="store_true",
        help="POST FHIR Observations interpreted LL instead of MLLP (clock from the 202)",
    )
    parser.add_argument(
        "--no-breakdown",
        dest="breakdown",
        action="store_false",
        help="do not read the case and claim znodes' ctime from the handler",
    )
    parser.add_argument(
        "--closed-markers",
        type=int,
        default=0,
        help="first add this many closed-case markers, as after days of cases (0)",
    )
    add_run_options(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cases < 1 or args.interval_ms < 0 or args.closed_markers < 0:
        print("cases must be positive and interval-ms not negative", file=sys.stderr)
        return 2

    def body(children: list[Child], started: float) -> int:
        (bridge,) = children
        stack = stack_pids(bridge)
        processes = {
            "hl7bridge": bridge.proc.pid,
            **stack,
            "benchmark (client+subscriber)": os.getpid(),
        }
        log("  pids: " + ", ".join(f"{name} {pid}" for name, pid in processes.items()))
        bench = Bench(args, bridge, processes, log)
        try:
            result = run_cancellable(bench.run)
        except RuntimeError as exc:
            log(f"error: {exc}")
            return 1
        summary = summarize(result)
        p99 = summary["wake_ms"].get("p99")
        report: dict[str, Any] = {
            "meta": run_meta(
                started,
                ("hl7bridge", "aiokafka", "kazoo", "uvloop", "aiohttp"),
                pids=processes,
            ),
            "config": {
                "cases": args.cases,
                "interval_ms": args.interval_ms,
                "fhir": args.fhir,
                "breakdown": args.breakdown,
                "closed_markers": args.closed_markers,
                "what": (
                    "FHIR Observations interpreted LL, POST /fhir/Observation"
                    if args.fhir
                    else "troponin ORU^R01 with OBX-8 HH over MLLP"
                ),
                "patients": PATIENTS,
                "kafka_timestamp_types": result.timestamp_types,
            },
            "summary": summary,
            "targets": {
                "wake_p99_ms": p99,
                "target_ms": TARGET_WAKE_MS,
                "reached": p99 is not None and p99 < TARGET_WAKE_MS and not result.errors,
            },
            "result": dataclasses.asdict(result),
        }
        emit(render(report), report, as_json=args.json)
        return 1 if result.errors else 0

    return run_bench(
        "hl7bridge-diagnosis-bench-", keep_logs=args.keep_logs, start=start_dev_only, body=body
    )


if __name__ == "__main__":
    sys.exit(main())
