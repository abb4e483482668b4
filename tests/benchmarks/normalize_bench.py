"""Mapping benchmark: parse + HL7 v2 → FHIR normalization on one core, no I/O.

Measures what the MLLP hot path does to a message besides MLLP and Kafka, one
message at a time in this single process (one core):

* ``parse``: :func:`adapters.hl7v2.er7.parse_message` only;
* ``parse+map``: parse, :func:`~adapters.hl7v2.er7.validate_header` and
  :func:`bridge.events.hl7v2_event` (the FHIR Bundle and the event attributes),
  i.e. :func:`bridge.convert.convert_message`, the path the pipeline takes;
* ``parse+map+encode``: that, plus what the pipeline does to build its two Kafka
  records (``orjson.dumps`` of the Bundle and both records' CloudEvents headers).

Every iteration gets a unique MSH-10 (so the event id and every id derived from
it are new), cut into the message bytes outside the timed region. Each message
is timed on its own with ``perf_counter_ns``; the report gives messages/s (1 /
mean) and the mean and p99 of the per-message time. As in the bridge, the
collector is on and everything allocated at start is frozen (``gc.freeze``).

Messages: ``--message`` (default ``LAB-ORU-1.hl7``), ``ADT-A01-01.hl7`` and the
largest ORU^R01 in the shared corpus. Run from the repository root::

    .venv/bin/python -m tests.benchmarks.normalize_bench [--message PATH] [--seconds 5] [--json]
    .venv/bin/python -m tests.benchmarks.normalize_bench --profile 2000   # where the time goes

Exit status 0; 1 if ``parse+map`` of the first message is below the target of
issue 3 (:data:`TARGET_MSGS_PER_S` on one core); 2 if a message does not convert.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import orjson

from adapters.hl7v2.er7 import parse_message
from adapters.hl7v2.files import split_messages
from bridge.convert import ConvertOptions, convert_message
from tests.benchmarks.mllp_bench import _version, cpu_model, git_revision

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
CORPUS: Final = REPO_ROOT.parent / "shared" / "corpus"
SAMPLES: Final = CORPUS / "microsoft-fhir-converter" / "data" / "SampleData" / "Hl7v2"
DEFAULT_MESSAGE: Final = SAMPLES / "LAB-ORU-1.hl7"
ADT_MESSAGE: Final = SAMPLES / "ADT-A01-01.hl7"
#: Issue 3: parse + map at least this many ORU^R01 per second on one core.
TARGET_MSGS_PER_S: Final = 3000.0
#: Unmeasured iterations before each measurement (imports, caches, branch warm-up).
WARMUP_S: Final = 0.5


class Template:
    """One message with MSH-10 cut out, so a fresh control id costs one ``bytes.join``."""

    def __init__(self, message: bytes, tag: str) -> None:
        first_end = message.find(b"\r")
        msh = message[: first_end if first_end != -1 else len(message)]
        sep = msh[3:4]
        fields = msh.split(sep)
        if len(fields) < 12:
            raise ValueError("the message's MSH has no MSH-10/11/12")
        # fields[0] is "MSH" and fields[1] MSH-2: MSH-10 is fields[9].
        before = sep.join(fields[:9]) + sep
        after = sep + sep.join(fields[10:]) + message[len(msh) :]
        self.head, self.tail = before, after
        self.message_type = fields[8].decode("ascii", "replace")
        self.size = len(message)
        self.segments = message.count(b"\r") + (0 if message.endswith(b"\r") else 1)
        self._tag = tag.encode()
        self._seq = 0

    def next(self) -> bytes:
        self._seq += 1
        return b"".join((self.head, self._tag, str(self._seq).encode(), self.tail))


@dataclass(slots=True)
class Result:
    message: str
    message_type: str
    message_bytes: int
    segments: int
    mode: str
    iterations: int
    msgs_per_s: float
    mean_us: float
    p50_us: float
    p99_us: float
    max_us: float


def percentile(sorted_ns: list[int], p: float) -> float:
    """Nearest-rank percentile of sorted samples, in µs."""
    rank = max(1, math.ceil(p / 100.0 * len(sorted_ns)))
    return sorted_ns[rank - 1] / 1000.0


OPTIONS: Final = ConvertOptions()


def step_parse(data: bytes) -> object:
    return parse_message(data)


def step_map(data: bytes) -> object:
    return convert_message(data, OPTIONS)


def step_map_encode(data: bytes) -> object:
    described = convert_message(data, OPTIONS)
    return (
        orjson.dumps(described.data),
        described.event.headers(),
        described.raw.headers(),
    )


MODES: Final[dict[str, Callable[[bytes], object]]] = {
    "parse": step_parse,
    "parse+map": step_map,
    "parse+map+encode": step_map_encode,
}


def measure(
    name: str, template: Template, mode: str, seconds: float, clock: Callable[[], int]
) -> Result:
    step = MODES[mode]
    warm_until = time.monotonic() + WARMUP_S
    while time.monotonic() < warm_until:
        step(template.next())
    samples: list[int] = []
    append = samples.append
    spent = 0
    budget = int(seconds * 1e9)
    while spent < budget:
        data = template.next()
        started = clock()
        step(data)
        took = clock() - started
        append(took)
        spent += took
    samples.sort()
    mean_ns = spent / len(samples)
    return Result(
        message=name,
        message_type=template.message_type,
        message_bytes=template.size,
        segments=template.segments,
        mode=mode,
        iterations=len(samples),
        msgs_per_s=1e9 / mean_ns,
        mean_us=mean_ns / 1000.0,
        p50_us=percentile(samples, 50),
        p99_us=percentile(samples, 99),
        max_us=samples[-1] / 1000.0,
    )


def largest_oru(root: Path = CORPUS) -> Path | None:
    """The corpus file holding the largest ORU^R01 message (by bytes)."""
    best: tuple[int, Path] | None = None
    for path in sorted(root.rglob("*.hl7")):
        for message in split_messages(path.read_bytes()):
            try:
                header = parse_message(message).header
            except Exception:  # a corpus file the bridge rejects is not a candidate
                continue
            is_oru = header.message_code == "ORU" and header.trigger_event == "R01"
            if is_oru and (best is None or len(message) > best[0]):
                best = (len(message), path)
    return None if best is None else best[1]


def load(path: Path, tag: str) -> Template:
    messages = split_messages(path.read_bytes())
    if not messages:
        raise ValueError(f"no HL7 v2 message in {path}")
    largest = max(messages, key=len)
    return Template(largest, tag)


def meta() -> dict[str, Any]:
    return {
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "command": shlex.join(sys.orig_argv),
        "git": git_revision(),
        "versions": {d: _version(d) for d in ("hl7bridge", "orjson")},
        "kernel": platform.release(),
    }


def render(report: dict[str, Any]) -> str:
    m = report["meta"]
    lines = [
        f"hl7bridge mapping benchmark  {m['date_utc']}  git {m['git'] or '?'}",
        f"machine: nproc={m['nproc']} ({m['cpu_model']}), {m['implementation']} {m['python']}; "
        "one process, one core, one message at a time",
        f"command: {m['command']}",
        f"{report['seconds']:g} s measured per row after {WARMUP_S:g} s warm-up; "
        "unique MSH-10 per message; gc on, start-up objects frozen",
    ]
    labels = [
        f"{r['message']} ({r['message_type']}, {r['message_bytes']} B)" for r in report["results"]
    ]
    width = max(len(x) for x in [*labels, "message"])
    lines += [
        "",
        f"{'message':<{width}} {'mode':<17} {'msgs/s':>9} {'mean µs':>9} {'p50 µs':>8} "
        f"{'p99 µs':>8} {'max µs':>9} {'n':>7}",
    ]
    for label, r in zip(labels, report["results"], strict=True):
        lines.append(
            f"{label:<{width}} {r['mode']:<17} {r['msgs_per_s']:>9,.0f} {r['mean_us']:>9.1f} "
            f"{r['p50_us']:>8.1f} {r['p99_us']:>8.1f} {r['max_us']:>9.1f} {r['iterations']:>7}"
        )
    target = report["target"]
    verdict = "reached" if target["reached"] else "NOT REACHED"
    lines += [
        "",
        f"target (issue 3): parse+map >= {target['msgs_per_s']:,.0f} msgs/s on one core for "
        f"{target['message']}: {target['measured']:,.0f} msgs/s, {verdict}",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tests.benchmarks.normalize_bench",
        description="Parse and HL7 v2 -> FHIR mapping throughput on one core (no I/O).",
    )
    parser.add_argument(
        "--message", type=Path, default=DEFAULT_MESSAGE, help="HL7 v2 file (its largest message)"
    )
    parser.add_argument(
        "--seconds", type=float, default=5.0, help="measured time per message and mode (5)"
    )
    parser.add_argument(
        "--only", action="store_true", help="only --message, not ADT-A01-01 and the largest ORU"
    )
    parser.add_argument("--json", action="store_true", help="JSON on stdout, report on stderr")
    parser.add_argument(
        "--profile",
        type=int,
        metavar="N",
        default=0,
        help="instead of measuring: cProfile N parse+map iterations of --message, top functions",
    )
    return parser


def profile(template: Template, iterations: int, top: int = 30) -> str:
    """Where parse+map spends its time (cProfile, sorted by own time)."""
    import cProfile
    import io
    import pstats

    frames = [template.next() for _ in range(iterations)]
    profiler = cProfile.Profile()
    profiler.enable()
    for data in frames:
        step_map(data)
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.seconds <= 0:
        print("--seconds must be positive", file=sys.stderr)
        return 2
    if args.profile > 0:
        print(profile(load(args.message, "NBP-"), args.profile))
        return 0
    paths = [args.message]
    if not args.only:
        extra = [ADT_MESSAGE, largest_oru()]
        paths += [p for p in extra if p is not None and p.resolve() != args.message.resolve()]
    tag = f"NB{os.urandom(3).hex()}-"
    templates: list[tuple[str, Template]] = []
    for path in paths:
        template = load(path, tag)
        try:
            convert_message(template.next(), OPTIONS)
        except Exception as exc:
            print(f"{path.name} does not convert: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 2
        templates.append((path.name, template))

    gc.collect()
    gc.freeze()
    results = [
        measure(name, template, mode, args.seconds, time.perf_counter_ns)
        for name, template in templates
        for mode in MODES
    ]
    first = next(r for r in results if r.mode == "parse+map")
    report = {
        "meta": meta(),
        "seconds": args.seconds,
        "target": {
            "message": first.message,
            "msgs_per_s": TARGET_MSGS_PER_S,
            "measured": first.msgs_per_s,
            "reached": first.msgs_per_s >= TARGET_MSGS_PER_S,
        },
        "results": [asdict(r) for r in results],
    }
    if args.json:
        print(json.dumps(report, indent=2))
        print(render(report), file=sys.stderr)
    else:
        print(render(report))
    return 0 if report["target"]["reached"] else 1


if __name__ == "__main__":
    sys.exit(main())
