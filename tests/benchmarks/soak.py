"""Soak: a mixed open-loop load on ``hl7bridge dev`` for a given time, then the count check.

Not a test. Starts ``hl7bridge dev`` (embedded ZooKeeper + Tansu, one bridge instance,
port 0 everywhere, its own temporary directory) as :mod:`tests.benchmarks.mllp_bench`
does, and offers ``--rate`` messages/s in total for ``--duration-s``:

* HL7 v2 over MLLP on ``--connections`` connections, 70 % ORU^R01 (``LAB-ORU-1.hl7``)
  and 30 % ADT^A01 (``ADT-A01-01.hl7``), each with a unique MSH-10 and one of 1000
  PID-3 ids (:class:`~tests.benchmarks.mllp_bench.MessageFactory`);
* ``--fhir-share`` of the rate as FHIR Observations POSTed to ``/fhir/Observation``
  (:class:`~tests.benchmarks.fhir_bench.ObservationFactory`: unique identifier each).

Both run on fixed time grids (open loop); latency counts from the *scheduled* send
time, so a slow answer that delays the next send is charged to it too (no
coordinated omission). Every answer is recorded: MSA-1/MSA-2 of each ACK, status and
``X-Event-Id`` of each FHIR answer. Every ``--sample-s`` the RSS (``VmRSS``) of the
bridge process, its mapping worker, Tansu, ZooKeeper and this generator is sampled
and a line printed.

At the end both topics are read from the beginning (headers only are kept): every
control id answered AA must be on ``health.raw.hl7v2`` and on ``health.events``
(``ce_hl7controlid``), every 202 ``X-Event-Id`` on ``health.events`` (``ce_id``).
*Lost* = answered AA/202 but not found; it must be 0. The RSS verdict: least-squares
slope of the bridge's RSS (process + mapping worker) over the second half of the
run, "flat" when at most ``--flat-mb-per-min``.

Run from the repository root::

    .venv/bin/python -m tests.benchmarks.soak [--duration-s 600] [--rate 500]
        [--fhir-share 0.1] [--connections 32] [--sample-s 10] [--json]

The bridge runs with its defaults; ``HL7BRIDGE_*`` variables in the environment reach it
(``hl7bridge dev`` reads them) and are printed in the report. Its bounded in-memory
state, the duplicate-detection windows (``hl7bridge_dedupe_entries`` from ``/metrics``,
sampled with the RSS), fills up to ``dedupe_max_entries`` or ``dedupe_window_s`` worth of
messages: memory is only comparable once they are full, for example with
``HL7BRIDGE_DEDUPE_WINDOW_S=120`` for a 10-minute run.

Exit status 0; 1 if anything answered AA/202 is missing from Kafka, any message was
not answered AA/202, or memory is growing; 2 if the bridge could not be started.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, cast

import aiohttp

from adapters.hl7v2.files import split_messages
from bridge.kafka import Topics
from tests.benchmarks.fhir_bench import DEFAULT_RESOURCE, ObservationFactory, host_cpu_s
from tests.benchmarks.mllp_bench import (
    ACK_TIMEOUT_S,
    DEFAULT_MESSAGE,
    OPEN_LOOP_MAX_OVERRUN_S,
    TOPIC_PREFIX,
    Child,
    Connection,
    Driver,
    MessageFactory,
    ack_fields,
    add_run_options,
    close_connections,
    emit,
    log,
    open_connections,
    percentiles,
    process_cpu_s,
    report_head,
    run_bench,
    run_cancellable,
    run_meta,
    start_dev_only,
)

ADT_MESSAGE: Final = DEFAULT_MESSAGE.parent / "ADT-A01-01.hl7"
#: Of every 10 MLLP messages, this many are ADT^A01 (the rest ORU^R01).
ADT_PER_10: Final = 3
_HEADERS: Final = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
Log = Callable[[str], None]


# --- processes ---------------------------------------------------------------------------------


def rss_mb(pid: int) -> float | None:
    """VmRSS of a process in MB (MiB), None if it is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


async def dedupe_entries(metrics_url: str) -> dict[str, int]:
    """``hl7bridge_dedupe_entries`` by ingest from the bridge's ``/metrics`` ({} if none)."""
    found: dict[str, int] = {}
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(metrics_url, timeout=aiohttp.ClientTimeout(total=2)) as response,
        ):
            text = await response.text()
    except (aiohttp.ClientError, TimeoutError):
        return found
    for line in text.splitlines():
        if line.startswith('hl7bridge_dedupe_entries{ingest="'):
            labels, _, value = line.rpartition(" ")
            found[labels.split('"')[1]] = int(float(value))
    return found


def full_from(series: list[tuple[float, int]]) -> float | None:
    """When a dedupe window reached 99 % of its size at the end (it only fills)."""
    if not series:
        return None
    final = series[-1][1]
    return next(t for t, n in series if n >= 0.99 * final)


def slope_per_min(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, MB) points, in MB per minute."""
    if len(points) < 2:
        return None
    n = len(points)
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    sxx = sum((t - mx) ** 2 for t, _ in points)
    if sxx == 0:
        return None
    sxy = sum((t - mx) * (v - my) for t, v in points)
    return sxy / sxx * 60


# --- the load ----------------------------------------------------------------------------------


@dataclass
class Answers:
    """What came back for one protocol."""

    sent: int = 0
    answered: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    #: Control ids answered AA / event ids answered 202.
    ok_ids: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    lags: list[float] = field(default_factory=list)
    #: From the actual write (service time), to tell the bridge's delay from the queueing.
    service: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    error_samples: list[str] = field(default_factory=list)

    def error(self, kind: str, sample: str) -> None:
        self.errors[kind] += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(f"{kind}: {sample}")


class Soak(Driver):
    """The open-loop driver: MLLP from protocol callbacks, FHIR from a few coroutines.

    A :class:`~tests.benchmarks.mllp_bench.Driver` like mllp_bench's :class:`Phase`
    (each :class:`Connection` calls ``on_reply`` and ``on_lost``); one message in flight per
    connection, on a per-connection time grid of ``connections / mllp_rate``.
    """

    def __init__(
        self,
        *,
        conns: list[Connection],
        oru: MessageFactory,
        adt: MessageFactory,
        mllp_rate: float,
        duration_s: float,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.conns = conns
        self.oru, self.adt = oru, adt
        self.mllp_rate = mllp_rate
        self.t0 = time.perf_counter() + 0.1
        self.end = self.t0 + duration_s
        self.send_until = self.end + OPEN_LOOP_MAX_OVERRUN_S
        self.mllp = Answers()
        self.fhir = Answers()
        self.types: Counter[str] = Counter()
        #: When the last message was written (late slots may be sent after ``end``).
        self.last_write = self.t0
        self.idle: set[int] = set()
        self.done: asyncio.Future[None] = self.loop.create_future()
        self._seq = 0

    # -- MLLP -----------------------------------------------------------------------------

    def start_mllp(self) -> None:
        if not self.conns or self.mllp_rate <= 0:
            self.done.set_result(None)
            return
        for conn in self.conns:
            conn.phase = self
            conn.slot = 0
            self._arm(conn)

    def _arm(self, conn: Connection) -> None:
        slot_at = self.t0 + (conn.index + conn.slot * len(self.conns)) / self.mllp_rate
        now = time.perf_counter()
        if slot_at >= self.end or now >= self.send_until or not conn.usable:
            self._finish(conn)
        elif slot_at <= now:
            self._send(conn, slot_at)
        else:
            conn.timer = self.loop.call_later(slot_at - now, self._send, conn, slot_at)

    def _send(self, conn: Connection, scheduled_at: float) -> None:
        conn.timer = None
        if not conn.usable:
            self._finish(conn)
            return
        self._seq += 1
        factory = self.adt if self._seq % 10 < ADT_PER_10 else self.oru
        self.types[factory.message_type] += 1
        frame, cid = factory.next_frame()
        self.mllp.sent += 1
        conn.send(frame, cid, scheduled_at)
        self.last_write = conn.sent_at

    def on_reply(self, conn: Connection, payload: bytes | None) -> None:
        now = time.perf_counter()
        answers = self.mllp
        if not conn.busy:
            answers.error("unsolicited reply", repr(payload)[:200])
            return
        conn.busy = False
        answers.answered += 1
        fields = ack_fields(payload) if payload is not None else None
        if fields is None:
            answers.codes["no MSA"] += 1
            answers.error("reply without MSA", repr(payload)[:200])
        else:
            code, control_id = fields
            text = code.decode(errors="replace")
            answers.codes[text] += 1
            if control_id != conn.cid:
                answers.error("MSA-2 does not echo MSH-10", f"{control_id!r} != {conn.cid!r}")
            elif code == b"AA":
                answers.ok_ids.append(control_id.decode())
            else:
                answers.error(f"MSA-1={text}", repr(payload)[:300])
        answers.latencies.append(now - min(conn.scheduled_at, conn.sent_at))
        answers.lags.append(max(0.0, conn.sent_at - conn.scheduled_at))
        answers.service.append(now - conn.sent_at)
        conn.slot += 1
        self._arm(conn)

    def _error(self, kind: str, sample: str) -> None:
        self.mllp.error(kind, sample)

    # -- FHIR -----------------------------------------------------------------------------

    async def fhir_client(
        self,
        session: aiohttp.ClientSession,
        url: str,
        factory: ObservationFactory,
        index: int,
        clients: int,
        rate: float,
    ) -> None:
        answers = self.fhir
        slot = 0
        while True:
            slot_at = self.t0 + (index + slot * clients) / rate
            now = time.perf_counter()
            if slot_at >= self.end or now >= self.send_until:
                return
            if slot_at > now:
                await asyncio.sleep(slot_at - now)
            slot += 1
            body, ident = factory.next_body()
            answers.sent += 1
            sent_at = self.last_write = time.perf_counter()
            try:
                async with session.post(url, data=body, headers=_HEADERS) as response:
                    await response.read()
                    status = response.status
                    event_id = response.headers.get("X-Event-Id", "")
            except (aiohttp.ClientError, TimeoutError) as exc:
                answers.error(f"no answer: {type(exc).__name__}", f"{ident}: {exc}"[:200])
                continue
            done_at = time.perf_counter()
            answers.answered += 1
            answers.codes[str(status)] += 1
            if status != 202:
                answers.error(f"HTTP {status}", ident)
            elif not event_id:
                answers.error("202 without X-Event-Id", ident)
            else:
                answers.ok_ids.append(event_id)
            answers.latencies.append(done_at - min(slot_at, sent_at))
            answers.lags.append(max(0.0, sent_at - slot_at))
            answers.service.append(done_at - sent_at)


# --- kafka ------------------------------------------------------------------------------------


async def read_header_ids(
    bootstrap: str, topic: str, names: tuple[str, ...], timeout_s: float = 600.0
) -> tuple[dict[str, set[str]], int]:
    """Every value of the record headers ``names`` on ``topic`` (all partitions, from the
    beginning up to the end offsets), and the number of records read. Records are not
    kept: a soak's topics hold far more than fits comfortably in memory."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    found: dict[str, set[str]] = {name: set() for name in names}
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=8 * 1024 * 1024,
        fetch_max_bytes=64 * 1024 * 1024,
    )
    count = 0
    await consumer.start()
    try:
        await consumer.topics()
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        if not tps:
            return found, 0
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends: dict[Any, int] = dict(await consumer.end_offsets(tps))
        wanted = set(names)
        deadline = time.monotonic() + timeout_s
        empty_after_end = 0
        while time.monotonic() < deadline:
            batches = await consumer.getmany(*tps, timeout_ms=500, max_records=20000)
            for records in batches.values():
                for record in records:
                    count += 1
                    for key, value in record.headers:
                        if key in wanted:
                            found[key].add(value.decode())
            positions = [await consumer.position(tp) for tp in tps]
            if all(pos >= ends[tp] for pos, tp in zip(positions, tps, strict=True)):
                # Tansu (memory storage) sometimes reports an end offset one short:
                # fetch on until two fetches in a row bring nothing.
                empty_after_end = empty_after_end + 1 if not batches else 0
                if empty_after_end >= 2:
                    break
    finally:
        await consumer.stop()
    return found, count


# --- report -----------------------------------------------------------------------------------


def rss_summary(
    series: list[tuple[float, float]], warmup_s: float, duration_s: float
) -> dict[str, float | None]:
    after = [(t, v) for t, v in series if t >= warmup_s] or series
    half = [(t, v) for t, v in series if t >= duration_s / 2]
    quarter = [(t, v) for t, v in series if t >= duration_s * 3 / 4]
    return {
        "first_after_warmup": after[0][1] if after else None,
        "last": series[-1][1] if series else None,
        "max": max(v for _, v in series) if series else None,
        "slope_mb_per_min_second_half": slope_per_min(half),
        "slope_mb_per_min_last_quarter": slope_per_min(quarter),
    }


def latency_text(name: str, answers: Answers) -> str:
    lat = percentiles(answers.latencies)
    lag = percentiles(answers.lags)
    svc = percentiles(answers.service)
    if not lat:
        return f"  {name:<6} no answers"
    return (
        f"  {name:<6}{int(lat['count']):>8}"
        + "".join(f"{lat[k]:>9.1f}" for k in ("p50", "p90", "p99", "p99.9", "max"))
        + f"{lag['p99']:>10.1f}{svc['p50']:>9.1f}{svc['p99']:>9.1f}"
    )


def render(report: dict[str, Any]) -> str:
    meta, cfg, res = report["meta"], report["config"], report["results"]
    lines = [
        *report_head("soak", meta),
        f"command: {meta['command']}",
        "bridge settings from the environment: "
        + (" ".join(f"{k}={v}" for k, v in sorted(meta["bridge_env"].items())) or "none"),
        f"load: {cfg['rate']:g}/s for {cfg['duration_s']:g} s; MLLP {cfg['mllp_rate']:g}/s on "
        f"{cfg['connections']} connections ({cfg['mllp_types']}); FHIR {cfg['fhir_rate']:g}/s "
        f"on {cfg['fhir_clients']} clients",
        "",
        f"throughput: sent {res['sent_per_s']:.1f}/s, answered OK {res['ok_per_s']:.1f}/s "
        f"(MLLP {res['mllp']['sent']} sent, FHIR {res['fhir']['sent']} sent, "
        f"{res['send_window_s']:.1f} s)",
        "",
        "latency ms from the SCHEDULED send time (lag = how late the write was, "
        "svc = from the write)",
        f"  {'':<6}{'count':>8}{'p50':>9}{'p90':>9}{'p99':>9}{'p99.9':>9}{'max':>9}{'lag p99':>10}"
        f"{'svc p50':>9}{'svc p99':>9}",
        res["mllp_latency_line"],
        res["fhir_latency_line"],
        "",
        f"RSS MB (warm-up {cfg['warmup_s']:g} s; slope over the second half of the run)",
        f"  {'process':<16}{'first':>9}{'last':>9}{'max':>9}{'MB/min':>9}{'last 1/4':>9}",
    ]
    for name, s in report["rss"].items():
        slope = s["slope_mb_per_min_second_half"]
        lines.append(
            f"  {name:<16}"
            + "".join(
                f"{s[k]:>9.1f}" if s[k] is not None else f"{'-':>9}"
                for k in ("first_after_warmup", "last", "max")
            )
            + "".join(
                f"{x:>+9.2f}" if x is not None else f"{'-':>9}"
                for x in (slope, s["slope_mb_per_min_last_quarter"])
            )
        )
    for ingest, series in report["dedupe_entries"].items():
        full_at = full_from([(t, n) for t, n in series])
        lines.append(
            f"  dedupe window {ingest}: {series[-1][1] if series else 0} entries at the end, "
            f"full (99 % of that) from {'-' if full_at is None else f'{full_at:.0f}'} s"
        )
    window = res["run_window_s"]
    lines += ["", f"cpu seconds per process over the run ({window:.1f} s, {meta['nproc']} cores)"]
    ok = max(res["mllp"]["ok"] + res["fhir"]["ok"], 1)
    for name, secs in sorted(report["cpu_s"].items(), key=lambda kv: -kv[1]):
        lines.append(
            f"  {name:<16}{secs:>8.1f} cpu-s {secs / window:>6.0%} of a core "
            f"{secs / ok * 1e6:>8.0f} us/msg"
        )
    host = report["host_cpu_s"]
    lines.append(
        f"  machine: other processes {host['other processes']:.1f} cpu-s, interrupts "
        f"{host['interrupts']:.1f}, steal {host['steal']:.1f}"
        " (if more than a little: a disturbed run)"
    )
    k = report["kafka"]
    lines += [
        "",
        "count check",
        f"  MLLP: scheduled {cfg['mllp_scheduled']}, sent {res['mllp']['sent']}, "
        f"answered {res['mllp']['answered']}: "
        + ", ".join(f"{n} {c}" for c, n in sorted(res["mllp"]["codes"].items())),
        f"  FHIR: scheduled {cfg['fhir_scheduled']}, sent {res['fhir']['sent']}, "
        f"answered {res['fhir']['answered']}: "
        + (", ".join(f"{n} x {c}" for c, n in sorted(res["fhir"]["codes"].items())) or "-"),
        f"  {k['raw_topic']}: {k['raw_records']} records, {k['raw_control_ids']} distinct "
        f"control ids; AA not found: {k['lost_raw']}",
        f"  {k['events_topic']}: {k['events_records']} records, {k['events_control_ids']} "
        f"distinct control ids, {k['events_ids']} distinct event ids; AA not found: "
        f"{k['lost_events_hl7v2']}, 202 not found: {k['lost_events_fhir']}",
        f"  lost ACKed (AA or 202 answered, not in Kafka): {k['lost']}",
    ]
    for sample in k["lost_samples"]:
        lines.append(f"    e.g. {sample}")
    errors = res["mllp"]["errors"] | {f"FHIR {e}": n for e, n in res["fhir"]["errors"].items()}
    if errors:
        lines += ["", "!" * 78, "!!! answers other than AA/202, or none:"]
        lines += [f"!!!   {n} x {kind}" for kind, n in sorted(errors.items())]
        lines += [f"!!!   {s}" for s in res["mllp"]["error_samples"] + res["fhir"]["error_samples"]]
        lines.append("!" * 78)
    v = report["verdict"]
    slope = v["rss_slope_mb_per_min"]
    lines += [
        "",
        f"soak: {cfg['duration_s']:g} s at {res['sent_per_s']:.0f}/s: lost ACKed {k['lost']}, "
        f"RSS slope {'?' if slope is None else f'{slope:+.2f}'} MB/min: {v['memory']}",
    ]
    return "\n".join(lines)


# --- main -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tests.benchmarks.soak",
        description="Mixed MLLP + FHIR open-loop soak of hl7bridge dev with a count check.",
    )
    parser.add_argument("--duration-s", type=float, default=600.0, help="load time (600)")
    parser.add_argument("--rate", type=float, default=500.0, help="messages/s in total (500)")
    parser.add_argument("--fhir-share", type=float, default=0.1, help="FHIR share (0.1)")
    parser.add_argument("--connections", type=int, default=32, help="MLLP connections (32)")
    parser.add_argument("--fhir-clients", type=int, default=4, help="FHIR clients (4)")
    parser.add_argument("--sample-s", type=float, default=10.0, help="RSS sample period (10)")
    parser.add_argument(
        "--warmup-s",
        type=float,
        default=None,
        help="RSS warm-up: the first sample reported is the first after it (min(60, 10%%))",
    )
    parser.add_argument(
        "--flat-mb-per-min",
        type=float,
        default=1.0,
        help="bridge RSS slope (second half) at most this is flat (1.0)",
    )
    add_run_options(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if (
        args.duration_s <= 0
        or args.rate <= 0
        or args.connections < 1
        or args.fhir_clients < 1
        or args.sample_s <= 0
        or not 0 <= args.fhir_share <= 1
    ):
        print(
            "durations, rate, connections must be positive; fhir-share in [0, 1]", file=sys.stderr
        )
        return 2
    warmup_s = args.warmup_s if args.warmup_s is not None else min(60.0, args.duration_s / 10)
    tag = os.urandom(3).hex()
    oru = MessageFactory(split_messages(DEFAULT_MESSAGE.read_bytes())[0], run_tag=f"S{tag}O")
    adt = MessageFactory(split_messages(ADT_MESSAGE.read_bytes())[0], run_tag=f"S{tag}A")
    observations = ObservationFactory.from_file(DEFAULT_RESOURCE)
    fhir_rate = args.rate * args.fhir_share
    mllp_rate = args.rate - fhir_rate

    def body(children: list[Child], started: float) -> int:
        (bridge,) = children
        processes: dict[str, int] = {"hl7bridge": bridge.proc.pid}

        def find_children() -> None:
            for name, pid in bridge.find_descendants().items():
                key = "mapping worker" if name.startswith("python") else name
                processes.setdefault(key, pid)
            processes.setdefault("load generator", os.getpid())

        find_children()
        log("  pids: " + ", ".join(f"{name} {pid}" for name, pid in processes.items()))
        host, port = bridge.ready_field("mllp").rsplit(":", 1)
        url = bridge.ready_field("http") + "/fhir/Observation"
        metrics_url = bridge.ready_field("http") + "/metrics"
        dedupe: dict[str, list[tuple[float, int]]] = {}
        bootstrap = bridge.ready_field("kafka")
        topics = Topics(TOPIC_PREFIX)
        rss: dict[str, list[tuple[float, float]]] = {}
        out: dict[str, Any] = {}

        async def run() -> None:
            conns = await open_connections(host, int(port), args.connections)
            soak = Soak(
                conns=conns, oru=oru, adt=adt, mllp_rate=mllp_rate, duration_s=args.duration_s
            )
            cpu_start = {n: process_cpu_s(p) for n, p in processes.items()}
            host_start = host_cpu_s()
            wall_start = time.perf_counter()

            async def sampler() -> None:
                i = 0
                log(
                    f"{'elapsed s':>9}{'sent':>9}{'answered':>9}{'ok':>9}{'/s':>7}  RSS MB: "
                    "bridge worker tansu zookeeper generator  dedupe: hl7v2 fhir"
                )
                last_ok, last_t = 0, 0.0
                while True:
                    i += 1
                    at = soak.t0 + i * args.sample_s
                    await asyncio.sleep(max(0.0, at - time.perf_counter()))
                    if "mapping worker" not in processes:
                        find_children()
                    elapsed = time.perf_counter() - soak.t0
                    row: list[str] = []
                    for name in ("hl7bridge", "mapping worker", "tansu", "zookeeper"):
                        pid = processes.get(name)
                        mb = rss_mb(pid) if pid is not None else None
                        if mb is not None:
                            rss.setdefault(name, []).append((elapsed, mb))
                        row.append("-" if mb is None else f"{mb:.1f}")
                    gen = rss_mb(os.getpid())
                    if gen is not None:
                        rss.setdefault("load generator", []).append((elapsed, gen))
                    row.append(f"{gen:.1f}" if gen is not None else "-")
                    entries = await dedupe_entries(metrics_url)
                    for ingest in ("hl7v2", "fhir"):
                        if ingest in entries:
                            dedupe.setdefault(ingest, []).append((elapsed, entries[ingest]))
                    row.append(" " + " ".join(str(entries.get(i, "-")) for i in ("hl7v2", "fhir")))
                    sent = soak.mllp.sent + soak.fhir.sent
                    answered = soak.mllp.answered + soak.fhir.answered
                    ok = len(soak.mllp.ok_ids) + len(soak.fhir.ok_ids)
                    per_s = (ok - last_ok) / (elapsed - last_t)
                    last_ok, last_t = ok, elapsed
                    log(
                        f"{elapsed:>9.0f}{sent:>9}{answered:>9}{ok:>9}{per_s:>7.0f}  "
                        + " ".join(row)
                    )
                    if i * args.sample_s >= args.duration_s:
                        return

            sampling = asyncio.create_task(sampler())
            connector = aiohttp.TCPConnector(limit=args.fhir_clients)
            async with aiohttp.ClientSession(connector=connector) as session:
                soak.start_mllp()
                fhir_tasks = (
                    [
                        asyncio.create_task(
                            soak.fhir_client(
                                session, url, observations, i, args.fhir_clients, fhir_rate
                            )
                        )
                        for i in range(args.fhir_clients)
                    ]
                    if fhir_rate > 0
                    else []
                )
                hard_end = soak.send_until + ACK_TIMEOUT_S
                with_timeout = max(0.0, hard_end - time.perf_counter())
                waiting: list[asyncio.Future[Any]] = [soak.done, *fhir_tasks]
                _, pending = await asyncio.wait(waiting, timeout=with_timeout)
                if not soak.done.done():
                    soak.give_up()
                for t in pending:
                    if t is not soak.done:
                        t.cancel()
                        soak.fhir.error("client still waiting at the hard end", "")
                for t in fhir_tasks:
                    if not t.cancelled() and t.exception() is not None:
                        soak.fhir.error("client crashed", repr(t.exception())[:200])
            await sampling
            wall = time.perf_counter() - wall_start
            cpu_end = {n: process_cpu_s(p) for n, p in processes.items()}
            machine = {k: v - host_start[k] for k, v in host_cpu_s().items()}
            out["cpu_s"] = {
                n: cast(float, cpu_end[n]) - (cpu_start.get(n) or 0.0)
                for n in processes
                if cpu_end.get(n) is not None
            }
            out["run_window_s"] = wall
            # The mapping worker may have been found after cpu_start: then its whole CPU
            # counts, which is what it used anyway (it starts with the bridge).
            machine["other processes"] = max(0.0, machine["processes"] - sum(out["cpu_s"].values()))
            out["host_cpu_s"] = machine
            out["send_window_s"] = max(args.duration_s, soak.last_write - soak.t0)
            await close_connections(conns)
            out["soak"] = soak
            log("reading the topics back ...")
            t_read = time.monotonic()
            raw, raw_count = await read_header_ids(
                bootstrap, topics.raw_hl7v2, ("ce_hl7controlid",)
            )
            events, events_count = await read_header_ids(
                bootstrap, topics.events, ("ce_hl7controlid", "ce_id")
            )
            log(f"  read {raw_count + events_count} records in {time.monotonic() - t_read:.0f} s")
            out["raw"], out["raw_count"] = raw, raw_count
            out["events"], out["events_count"] = events, events_count

        run_cancellable(run)

        soak: Soak = out["soak"]
        aa = set(soak.mllp.ok_ids)
        accepted = set(soak.fhir.ok_ids)
        raw_ids = out["raw"]["ce_hl7controlid"]
        ev_cids = out["events"]["ce_hl7controlid"]
        ev_ids = out["events"]["ce_id"]
        lost_raw = aa - raw_ids
        lost_events = aa - ev_cids
        lost_fhir = accepted - ev_ids
        lost_any = lost_raw | lost_events | lost_fhir
        samples = [f"{i} not on {topics.raw_hl7v2}" for i in sorted(lost_raw)[:3]]
        samples += [f"{i} not on {topics.events}" for i in sorted(lost_events | lost_fhir)[:3]]
        kafka = {
            "raw_topic": topics.raw_hl7v2,
            "events_topic": topics.events,
            "raw_records": out["raw_count"],
            "raw_control_ids": len(raw_ids),
            "events_records": out["events_count"],
            "events_control_ids": len(ev_cids),
            "events_ids": len(ev_ids),
            "aa_distinct": len(aa),
            "accepted_distinct": len(accepted),
            "lost_raw": len(lost_raw),
            "lost_events_hl7v2": len(lost_events),
            "lost_events_fhir": len(lost_fhir),
            "lost": len(lost_any),
            "lost_samples": samples,
        }
        send_window = max(out["send_window_s"], 1e-9)
        ok_total = len(soak.mllp.ok_ids) + len(soak.fhir.ok_ids)

        def answers_dict(a: Answers) -> dict[str, Any]:
            return {
                "sent": a.sent,
                "answered": a.answered,
                "ok": len(a.ok_ids),
                "codes": dict(a.codes),
                "latency_ms": percentiles(a.latencies),
                "send_lag_ms": percentiles(a.lags),
                "service_ms": percentiles(a.service),
                "errors": dict(a.errors),
                "error_samples": a.error_samples,
            }

        rss_report = {
            name: rss_summary(series, warmup_s, args.duration_s) for name, series in rss.items()
        }
        bridge_total = [
            (t, v + dict(rss.get("mapping worker", [])).get(t, 0.0))
            for t, v in rss.get("hl7bridge", [])
        ]
        rss_report["bridge total"] = rss_summary(bridge_total, warmup_s, args.duration_s)
        slope = rss_report["bridge total"]["slope_mb_per_min_second_half"]
        memory = "flat" if slope is not None and slope <= args.flat_mb_per_min else "growing"
        # A window still filling in the second half is expected growth, not a leak, and
        # hides one: no verdict then.
        filling = {
            ingest: t
            for ingest, series in dedupe.items()
            if (t := full_from(series)) is not None and t > args.duration_s / 2
        }
        if filling:
            memory = (
                "inconclusive: dedupe windows still filling ("
                + ", ".join(f"{i} until {t:.0f} s" for i, t in filling.items())
                + "; see HL7BRIDGE_DEDUPE_WINDOW_S)"
            )
        report: dict[str, Any] = {
            "meta": run_meta(
                started,
                ("hl7bridge", "aiohttp", "uvloop", "aiokafka"),
                pids=processes,
                bridge_env={k: v for k, v in os.environ.items() if k.startswith("HL7BRIDGE_")},
            ),
            "config": {
                "duration_s": args.duration_s,
                "rate": args.rate,
                "mllp_rate": mllp_rate,
                "fhir_rate": fhir_rate,
                "fhir_share": args.fhir_share,
                # Slots on the time grids; those not sent by the end + the overrun never are.
                "mllp_scheduled": round(mllp_rate * args.duration_s),
                "fhir_scheduled": round(fhir_rate * args.duration_s),
                "connections": args.connections,
                "fhir_clients": args.fhir_clients,
                "sample_s": args.sample_s,
                "warmup_s": warmup_s,
                "flat_mb_per_min": args.flat_mb_per_min,
                "mllp_types": ", ".join(f"{n} {t}" for t, n in sorted(soak.types.items())),
            },
            "results": {
                "send_window_s": out["send_window_s"],
                "run_window_s": out["run_window_s"],
                "sent_per_s": (soak.mllp.sent + soak.fhir.sent) / send_window,
                "ok_per_s": ok_total / send_window,
                "mllp": answers_dict(soak.mllp),
                "fhir": answers_dict(soak.fhir),
                "mllp_latency_line": latency_text("MLLP", soak.mllp),
                "fhir_latency_line": latency_text("FHIR", soak.fhir),
            },
            "rss": rss_report,
            "rss_samples": {
                name: [[round(t, 1), round(v, 1)] for t, v in s] for name, s in rss.items()
            },
            "dedupe_entries": {i: [[round(t, 1), n] for t, n in s] for i, s in dedupe.items()},
            "cpu_s": out["cpu_s"],
            "host_cpu_s": out["host_cpu_s"],
            "kafka": kafka,
            "verdict": {"lost": len(lost_any), "rss_slope_mb_per_min": slope, "memory": memory},
        }
        emit(render(report), report, as_json=args.json)
        errors = sum(soak.mllp.errors.values()) + sum(soak.fhir.errors.values())
        failed = bool(lost_any) or errors > 0 or memory != "flat"
        return 1 if failed else 0

    return run_bench("hl7bridge-soak-", keep_logs=args.keep_logs, start=start_dev_only, body=body)


if __name__ == "__main__":
    sys.exit(main())
