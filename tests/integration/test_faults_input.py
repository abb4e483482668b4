"""Input-side faults against a real instance (issue 7, item 5).

Fuzzed and mutated MLLP frames, malformed FHIR bodies, slow clients, idle
connections and oversize input. Each test then checks the instance still answers
correctly, so a fault that wedges a connection, a queue or the event loop shows
up as a wrong answer or a missed deadline, not only as a crash.

Everything is deterministic (seeded ``random.Random``), every wait is bounded.
The MLLP framing the server must apply is modelled here independently of the
codec (:func:`_expected_frames`), so "every complete frame gets exactly one
answer" is checked against a count the bridge did not compute itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest

from adapters.hl7v2.er7 import parse_message
from adapters.mllp.codec import Frame, MLLPDecoder, encode_frame
from bridge.errors import BridgeError
from bridge.sender import summarize_ack
from bridge.service import BridgeInstance
from tests.integration.conftest import InstanceFactory
from tests.kafka_helpers import read_topic

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

VT, FS, CR = b"\x0b", b"\x1c", b"\r"
ACK_CODES = frozenset({"AA", "AE", "AR", "CA", "CE", "CR"})
FHIR_JSON = "application/fhir+json"

ORU = (
    "MSH|^~\\&|LAB|GENHOSP|HL7BRIDGE|HUB|20240101120000||ORU^R01^ORU_R01|{control}|P|2.5.1\r"
    "PID|1||MRN{n}^^^GENHOSP^MR||DOE^JANE||19800101|F\r"
    "OBR|1|ORD{n}|FIL{n}|24331-1^Lipid panel^LN|||20240101110000\r"
    "OBX|1|NM|2093-3^Cholesterol^LN||196|mg/dL|<200|N|||F\r"
    "OBX|2|ST|8251-1^Comment^LN||{comment}||||||F\r"
)


def _oru(control: str, n: int = 1, comment: str = "all good") -> bytes:
    return ORU.format(control=control, n=n, comment=comment).encode()


def _msa(ack: bytes) -> tuple[str, str]:
    """MSA-1 and MSA-2, raw ER7 as the sender's MSH-10 was (components and all)."""
    msa = parse_message(ack).segment("MSA")
    assert msa is not None, ack
    fields = [*msa, "", ""]
    return fields[1], fields[2]


def _msa_lenient(ack: bytes) -> tuple[str, str]:
    """MSA-1 and MSA-2 read by splitting, for an answer the HL7 parser refuses."""
    sep = ack[3:4]
    for segment in ack.split(CR):
        if segment.startswith(b"MSA" + sep):
            fields = [*segment.split(sep), b"", b""]
            return fields[1].decode("latin-1"), fields[2].decode("latin-1")
    return "", ""


def _err_code(ack: bytes) -> str:
    errors = summarize_ack("ack", 1, ack).errors
    assert errors, ack
    return errors[0]["code"]


def _rss_bytes() -> int:
    """Resident set size of this process (the instance runs in it)."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


# --- a raw MLLP connection ------------------------------------------------------------


class Wire:
    """A raw TCP connection to the MLLP port: write any bytes, collect reply frames.

    Replies are read by a background task as they come, so a pipelining writer
    never deadlocks against a server that paused reading.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.answers: asyncio.Queue[bytes] = asyncio.Queue()
        self.closed = asyncio.Event()  # the server closed (EOF or reset)
        self.opened_at = time.monotonic()
        self.closed_at: float | None = None
        self._decoder = MLLPDecoder(64 * 1024 * 1024)
        self._pump = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def open(cls, port: int) -> Wire:
        async with asyncio.timeout(5):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def _read(self) -> None:
        try:
            while data := await self.reader.read(256 * 1024):
                for event in self._decoder.feed(data):
                    if isinstance(event, Frame):
                        self.answers.put_nowait(event.payload)
        except (ConnectionError, OSError):
            pass
        finally:
            self.closed_at = time.monotonic()
            self.closed.set()

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answer(self, timeout_s: float = 10.0) -> bytes:
        async with asyncio.timeout(timeout_s):
            return await self.answers.get()

    async def roundtrip(self, payload: bytes, timeout_s: float = 10.0) -> bytes:
        await self.send(encode_frame(payload))
        return await self.answer(timeout_s)

    async def wait_closed(self, timeout_s: float) -> None:
        async with asyncio.timeout(timeout_s):
            await self.closed.wait()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            async with asyncio.timeout(5):
                await self.writer.wait_closed()
        async with asyncio.timeout(5):
            await self._pump


@contextlib.asynccontextmanager
async def _wires(port: int, count: int) -> AsyncIterator[list[Wire]]:
    wires = [await Wire.open(port) for _ in range(count)]
    try:
        yield wires
    finally:
        for wire in wires:
            await wire.close()


async def _wait_until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():  # noqa: ASYNC110 - server state, no event to wait on
            await asyncio.sleep(0.02)


async def _healthy(instance: BridgeInstance) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        async with http.get(f"{instance.http_url}/healthz") as response:
            assert response.status == 200
        async with http.get(f"{instance.http_url}/readyz") as response:
            assert response.status == 200, await response.text()


# --- the framing model --------------------------------------------------------------


def _expected_frames(stream: bytes, limit: int) -> list[bytes | None]:
    """The frames a sender of ``stream`` is owed an answer for, in order.

    An independent reading of the server's documented framing (adapters/mllp/
    codec.py): VT opens a frame, FS closes it (CR optional), a VT inside a frame
    abandons it and starts a new one, bytes outside frames are skipped. A payload
    longer than ``limit`` is answered once as too large (``None`` here) as soon as
    it outgrows the limit, however it ends. A frame still open at the end of the
    stream and within the limit is owed nothing.
    """
    frames: list[bytes | None] = []
    n = len(stream)
    pos = stream.find(VT)
    while 0 <= pos < n:
        start = pos + 1
        fs = stream.find(FS, start)
        vt = stream.find(VT, start, fs if fs >= 0 else n)
        if vt >= 0:  # abandoned by a restart
            if vt - start > limit:
                frames.append(None)
            pos = vt
            continue
        if fs < 0:  # open at the end
            if n - start > limit:
                frames.append(None)
            break
        frames.append(None if fs - start > limit else stream[start:fs])
        pos = stream.find(VT, fs + 1)
    return frames


# --- the MLLP corpus ------------------------------------------------------------------


@dataclass
class _Stream:
    """What one fuzzing connection sends, and the valid messages inside it."""

    chunks: list[bytes] = field(default_factory=list)
    pristine: dict[bytes, str] = field(default_factory=dict)  # payload -> control id
    kinds: Counter[str] = field(default_factory=Counter)


def _mutate(rng: random.Random, base: bytes, limit: int) -> tuple[str, bytes]:
    """One mutation of a valid ORU^R01 payload: (its kind, the payload)."""
    kind = rng.choice(
        [
            "bitflip",
            "truncate",
            "dup_separator",
            "drop_separator",
            "msh_encoding",
            "huge_field",
            "embedded_vt_fs",
            "non_utf8",
            "charset",
            "segments",
            "line_endings",
            "header_fields",
        ]
    )
    data = bytearray(base)
    if kind == "bitflip":
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        del data[rng.randrange(len(data)) :]
    elif kind in ("dup_separator", "drop_separator"):
        seps = [i for i, b in enumerate(data) if b in b"|^~\\&\r"]
        for i in sorted(rng.sample(seps, rng.randint(1, 6)), reverse=True):
            if kind == "dup_separator":
                data[i:i] = data[i : i + 1] * rng.randint(1, 3)
            else:
                del data[i]
    elif kind == "msh_encoding":
        alphabet = b"|^~\\&#$%*!@ \t\x00\x7fA1\xff"
        if rng.random() < 0.5:  # MSH-1, the field separator, everywhere or only in MSH
            data[3] = rng.choice(alphabet)
        else:  # MSH-2
            data[4:8] = bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 6)))
    elif kind == "huge_field":
        # Up to just under the limit, sometimes just over it (answered as too large).
        room = limit - len(data) + len(b"all good")
        size = rng.choice([room, room - 1, room - rng.randint(2, 1000), room + 1, room + 500])
        fill = rng.choice([b"x", b"A^B", b"\\F\\", b"0123456789"])
        comment = (fill * (size // len(fill) + 1))[: max(size, 0)]
        data = bytearray(base.replace(b"all good", comment))
    elif kind == "embedded_vt_fs":
        for _ in range(rng.randint(1, 3)):
            data.insert(rng.randrange(len(data) + 1), rng.choice([0x0B, 0x1C, 0x0D, 0x0A]))
    elif kind == "non_utf8":
        junk = [b"\xff\xfe", b"\xc3\x28", b"\xe2\x82", b"\xf0\x9f\x98", b"\xed\xa0\x80", b"\x80"]
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(data) + 1)
            data[i:i] = rng.choice(junk)
    elif kind == "charset":
        charset = rng.choice(
            ["UNICODE UTF-8", "8859/1", "ASCII", "UNICODE UTF-16", "KLINGON", "ISO IR87", ""]
        )
        msh_end = data.index(b"\r")
        msh = bytes(data[:msh_end]) + b"||||||" + charset.encode()  # MSH-18
        tail = bytes(data[msh_end:])
        if rng.random() < 0.5:
            tail = tail.replace(b"DOE", "DÖE".encode(rng.choice(["utf-8", "latin-1", "utf-16"])))
        data = bytearray(msh + tail)
    elif kind == "segments":
        segments = bytes(data).split(b"\r")
        op = rng.choice(["shuffle", "drop", "dup_msh", "empty", "only_msh"])
        if op == "shuffle":
            rng.shuffle(segments)
        elif op == "drop":
            del segments[rng.randrange(len(segments))]
        elif op == "dup_msh":
            segments.insert(rng.randrange(1, len(segments)), segments[0])
        elif op == "empty":
            segments = [b""]
        else:
            segments = segments[:1]
        data = bytearray(b"\r".join(segments))
    elif kind == "line_endings":
        data = bytearray(base.replace(b"\r", rng.choice([b"\n", b"\r\n", b"\n\r", b""])))
    else:  # header_fields
        fields = bytes(data[: data.index(b"\r")]).split(b"|")
        index = rng.choice([2, 3, 6, 8, 9, 10, 11])
        fields[index] = rng.choice(
            [b"", b"ZZZ^Z99", b"ADT^A01", b"2.1", b"9.9", b"T", b"X" * 300, b"^^^", b"AL", b"\x00"]
        )
        data = bytearray(b"|".join(fields) + bytes(data[data.index(b"\r") :]))
    return kind, bytes(data)


def _fuzz_streams(
    seed: int, connections: int, frames: int, limit: int, round_no: int = 0
) -> list[_Stream]:
    """``frames`` items spread over ``connections`` streams, each ending with a valid
    message (which must be answered AA on the same connection)."""
    rng = random.Random(seed)
    streams = [_Stream() for _ in range(connections)]
    for i in range(frames):
        stream = streams[i % connections]
        roll = rng.random()
        control = f"F{round_no}-{i:05d}"
        if roll < 0.10:
            kind, chunk = "valid", encode_frame(_oru(control, i))
            stream.pristine[chunk[1:-2]] = control
        elif roll < 0.25:
            size = rng.choice([0, 1, 3, rng.randint(4, 300), rng.randint(300, 3000)])
            kind, chunk = "random_in_frame", encode_frame(rng.randbytes(size))
        elif roll < 0.30:
            kind, chunk = "unframed_garbage", rng.randbytes(rng.randint(1, 2000))
        elif roll < 0.33:
            text = rng.choice([b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"MSH|", b"\r\n", b"\x1c\r"])
            kind, chunk = "unframed_garbage", text * rng.randint(1, 5)
        else:
            kind, payload = _mutate(rng, _oru(control, i), limit)
            # Most mutants are framed properly; some lose or double their framing.
            framing = rng.random()
            if framing < 0.9:
                chunk = encode_frame(payload)
            elif framing < 0.95:
                chunk = VT + payload + FS  # no CR after FS
            else:
                chunk = VT + VT + payload + FS + CR + CR
        stream.kinds[kind] += 1
        stream.chunks.append(chunk)
    for n, stream in enumerate(streams):
        control = f"LAST{round_no}-{n}"
        chunk = encode_frame(_oru(control, 90_000 + n))
        stream.pristine[chunk[1:-2]] = control
        stream.chunks.append(chunk)
    return streams


async def _write_stream(wire: Wire, rng: random.Random, chunks: list[bytes]) -> None:
    """Write the chunks cut at random places, so frames span reads and reads span frames."""
    data = b"".join(chunks)
    pos = 0
    while pos < len(data):
        step = rng.choice([1, 7, 100, 1500, 4096, 65536])
        await wire.send(data[pos : pos + step])
        pos += step


async def test_fuzzed_mllp_frames_are_each_answered_once_and_the_bridge_keeps_serving(
    start_instance: InstanceFactory, broker: Any, topic_prefix: str
) -> None:
    limit = 64 * 1024
    connections, total = 8, 10_000
    # The production default publish timeout: this test is about input, not Kafka.
    instance = await start_instance(
        broker.bootstrap, max_frame_bytes=limit, kafka_publish_timeout_s=10.0
    )
    # Two rounds of 5,000 on the same connections, to tell a warm-up from a leak.
    rounds = [
        _fuzz_streams(20240501 + r, connections, total // 2, limit, round_no=r) for r in range(2)
    ]
    expected = [_expected_frames(b"".join(s.chunks), limit) for ss in rounds for s in ss]
    streams = [s for ss in rounds for s in ss]  # flat, in step with expected
    kinds = sum((s.kinds for s in streams), Counter())
    assert sum(kinds.values()) == total
    sent_bytes = sum(len(chunk) for s in streams for chunk in s.chunks)

    async def run(n: int, wire: Wire) -> list[bytes]:
        writer = asyncio.create_task(_write_stream(wire, random.Random(n), streams[n].chunks))
        answers = []
        try:
            for _ in expected[n]:
                answers.append(await wire.answer(timeout_s=30))
            await writer
        finally:
            writer.cancel()
        return answers

    rss = [_rss_bytes()]
    results: list[list[bytes]] = []
    started = time.monotonic()
    async with _wires(instance.mllp.port, connections) as wires:
        for r in range(len(rounds)):
            async with asyncio.timeout(90):
                results += await asyncio.gather(
                    *(run(r * connections + n, w) for n, w in enumerate(wires))
                )
            # Exactly one answer per frame: nothing more arrives, and every connection
            # (garbage and all) is still open: bytes outside frames are skipped, never
            # a reason to close (codec docstring).
            await asyncio.sleep(0.3)
            assert all(w.answers.empty() for w in wires)
            assert not any(w.closed.is_set() for w in wires)
            # Inside the server (private state, read only): nothing queued, no worker,
            # nothing buffered, on every connection still open.
            served = list(instance.mllp._connections)
            assert len(served) == connections
            for conn in served:
                assert not conn._queue and conn.worker is None
                assert conn._decoder.buffered_bytes == 0
            rss.append(_rss_bytes())
        elapsed = time.monotonic() - started

    codes: Counter[str] = Counter()
    err_codes: Counter[str] = Counter()
    accepted_ids: set[str] = set()
    unparseable: list[tuple[bytes | None, bytes, str]] = []  # frame, answer, why
    for n, (frames, answers) in enumerate(zip(expected, results, strict=True)):
        assert len(answers) == len(frames)
        for frame, answer in zip(frames, answers, strict=True):
            try:
                code, control = _msa(answer)
                parsed = True
            except BridgeError as exc:
                # Asserted at the end, once every other guarantee has been checked.
                unparseable.append((frame, answer, f"{type(exc).__name__}: {exc}"))
                code, control = _msa_lenient(answer)
                parsed = False
            assert code in ACK_CODES, answer
            codes[code] += 1
            if code in ("AA", "CA"):
                accepted_ids.add(control)
            elif parsed:
                err_codes[_err_code(answer)] += 1
            if frame is None:  # too large: AE (or CE) 207, without processing
                assert code in ("AE", "CE") and b"|207^" in answer, answer
            elif frame in streams[n].pristine:  # answered in order, by position
                assert (code, control) == ("AA", streams[n].pristine[frame])
        assert _msa(answers[-1]) == ("AA", f"LAST{n // connections}-{n % connections}")

    frames_total = sum(len(f) for f in expected)
    assert instance.mllp.frames_received == frames_total
    assert instance.mllp.garbage_bytes > 0
    assert sum(codes.values()) == frames_total
    # The fuzz reached past the framing: all three answers, and many error kinds.
    assert codes["AA"] >= kinds["valid"] and codes["AE"] > 1000 and codes["AR"] > 0
    assert {"100", "207"} <= set(err_codes)

    # Nothing is left inside the server once the connections are gone.
    await _wait_until(lambda: not instance.mllp.connection_count and not instance.mllp._workers)

    # Memory. In the server at once: at most 8 connections x (one 64 KiB frame being
    # read + 64 queued) ~ 34 MiB, plus per accepted message a dedupe entry, and
    # the producer's buffers. The first round warms all that up; the second, as
    # big, must add little: a leak of the frames (sent_bytes / 2 per round) or of
    # anything per frame grows it again.
    warm_up, second = rss[1] - rss[0], rss[2] - rss[1]
    assert rss[2] - rss[0] < 100 * 2**20, f"RSS grew {(rss[2] - rss[0]) / 2**20:.0f} MiB"
    assert second < 16 * 2**20, f"RSS grew {second / 2**20:.0f} MiB in the second round"

    # Alive and still serving: /healthz, the mapping workers, a new connection.
    await _healthy(instance)
    if instance.mapping_pool is not None:
        for pid in instance.mapping_pool.pids():
            os.kill(pid, 0)  # raises if the worker died
    async with _wires(instance.mllp.port, 1) as [wire]:
        assert _msa(await wire.roundtrip(_oru("AFTER1"))) == ("AA", "AFTER1")
    accepted_ids.add("AFTER1")

    # Nothing answered AA was lost: each is on the events topic.
    events = await read_topic(
        broker.bootstrap, f"{topic_prefix}.events", min_records=len(accepted_ids), timeout_s=30
    )
    published = {dict(r.headers)["ce_hl7controlid"].decode() for r in events}
    assert accepted_ids <= published, sorted(accepted_ids - published)[:20]
    print(
        f"\nMLLP fuzz: {total} items ({dict(kinds)}), {frames_total} frames answered "
        f"in {elapsed:.1f} s: {dict(codes)}, ERR {dict(err_codes)}; "
        f"{len(accepted_ids)} accepted ids all on {len(events)} events; "
        f"{sent_bytes / 2**20:.0f} MiB sent; RSS {rss[0] / 2**20:.0f} MiB, +{warm_up / 2**20:.1f} "
        f"MiB in round 1, +{second / 2**20:.1f} MiB in round 2; "
        f"{len(unparseable)} answers not parseable as HL7"
    )
    # Every answer must itself be HL7 the bridge can read (a sender's engine parses it).
    assert not unparseable, "\n".join(
        [
            f"{len(unparseable)} answers do not parse as HL7; first ones:",
            *(f"{f[:100] if f else f!r} -> {a[:200]!r} ({why})" for f, a, why in unparseable[:5]),
        ]
    )


# --- FHIR ----------------------------------------------------------------------------

OBSERVATION: dict[str, Any] = {
    "resourceType": "Observation",
    "status": "final",
    "code": {"coding": [{"system": "http://loinc.org", "code": "2093-3", "display": "Chol"}]},
    "subject": {"reference": "Patient/p1"},
    "valueQuantity": {
        "value": 196,
        "unit": "mg/dL",
        "system": "http://unitsofmeasure.org",
        "code": "mg/dL",
    },
}
_ODD_VALUES: list[Any] = [
    None,
    True,
    0,
    -1,
    1.5,
    10**30,
    "",
    " ",
    "x" * 5000,
    [],
    [None],
    {},
    {"resourceType": "Patient"},
    "\u0000",
    "\u202eevil",
    "\U0001f600" * 50,
    "e\u0301" * 2000,
    "\ufffe\uffff",
]


def _observation(rng: random.Random, n: int) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(json.dumps(OBSERVATION))  # a deep copy
    body["valueQuantity"]["value"] = n
    body["subject"]["reference"] = f"Patient/p{rng.randrange(1000)}"
    return body


def _dumps(value: Any) -> bytes:
    """JSON as UTF-8, integers past 64 bits included (orjson refuses those)."""
    return json.dumps(value, ensure_ascii=False).encode()


def _fhir_cases(seed: int, count: int) -> list[tuple[str, str, str, bytes]]:
    """(kind, path, content type, body) for ``count`` malformed or odd requests."""
    rng = random.Random(seed)
    cases: list[tuple[str, str, str, bytes]] = []
    for n in range(count):
        to_base = rng.random() < 0.4
        path = "/fhir" if to_base else "/fhir/Observation"
        ctype = FHIR_JSON
        obs = _observation(rng, n)
        roll = rng.random()
        if roll < 0.03:
            kind = "valid"
            body = orjson.dumps(obs if not to_base else _bundle(rng, [obs], "transaction"))
        elif roll < 0.15:
            kind, body = "random_bytes", rng.randbytes(rng.choice([0, 1, 10, 300, 3000]))
        elif roll < 0.27:
            full = orjson.dumps(obs if not to_base else _bundle(rng, [obs, obs], "batch"))
            kind, body = "truncated", full[: rng.randrange(len(full))]
        elif roll < 0.33:
            kind = "deep"
            depth = rng.choice([100, 500, 1000, 1023, 1024, 1025, 5000, 10_000])
            shape = rng.choice(["arrays", "objects", "extension", "contained", "entry"])
            if shape == "arrays":
                body = b"[" * depth + b"]" * depth
            elif shape == "objects":
                body = b'{"a":' * depth + b"1" + b"}" * depth
            else:
                # Written as text: deeper than json/orjson will encode.
                if shape == "extension":
                    k = depth // 2
                    nest = b'{"url":"http://e.org/x","extension":[' * k
                    nest += b'{"url":"http://e.org/x","valueString":"v"}' + b"]}" * k
                    obs["extension"] = ["@@"]
                elif shape == "contained":
                    k = depth // 2
                    head = b'{"resourceType":"Observation","status":"final","code":{}'
                    nest = (head + b',"contained":[') * k + head + b"}" + b"]}" * k
                    obs["contained"] = ["@@"]
                else:
                    k = depth // 3
                    nest = b'{"resourceType":"Bundle","type":"collection","entry":[{"resource":' * k
                    nest += orjson.dumps(OBSERVATION) + b"}]}" * k
                    obs = {"resourceType": "Bundle", "type": "collection", "entry": ["@@"]}
                doc = _bundle(rng, [obs], "batch") if to_base else obs
                body = orjson.dumps(doc).replace(b'"@@"', nest)
        elif roll < 0.38:
            kind = "huge"
            # Big in bytes (to 3 MB) or in elements (to 20,000): a body validated on
            # the event loop, with more elements, stalls it for seconds (see
            # test_large_fhir_body_does_not_stall_mllp_answers).
            size = rng.choice([100_000, 1_000_000, 3_000_000])
            count = rng.choice([1_000, 20_000])
            what = rng.choice(["string", "key", "keys", "array", "number"])
            if what == "string":
                obs["valueString"] = "y" * size
                del obs["valueQuantity"]
            elif what == "key":
                obs["k" * size] = 1
            elif what == "keys":
                obs.update({f"k{i}": i for i in range(count)})
            elif what == "array":
                obs["note"] = [{"text": "t"}] * count
            if what != "number":
                body = orjson.dumps(obs)
            else:
                body = b'{"resourceType":"Observation","status":"final","code":{},"valueInteger":'
                body += b"9" * size + b"}"
        elif roll < 0.55:
            kind = "wrong_type"
            target: dict[str, Any] = obs if not to_base else _bundle(rng, [obs], "transaction")
            for _ in range(rng.randint(1, 3)):
                node = target if to_base and rng.random() < 0.5 else obs
                key = rng.choice([*node, "resourceType", "id", "meta", "entry", "type"])
                node[key] = rng.choice(_ODD_VALUES)
            body = _dumps(target)
        elif roll < 0.67:
            kind = "unicode"
            text = orjson.dumps(obs if not to_base else _bundle(rng, [obs], "transaction"))
            trick = rng.choice(
                [
                    (b'"final"', b'"\\ud800"'),  # lone surrogate escape
                    (b'"final"', b'"fi\\u0000nal"'),
                    (b'"final"', b'"fi\xffnal"'),  # invalid UTF-8
                    (b'"final"', b'"fi\xc0\xafnal"'),  # overlong encoding
                    (b'"final"', b'"fi\xed\xa0\x80nal"'),  # encoded surrogate
                    (b'"Chol"', '"\u202e\U0001f600\ufeff\u0301"'.encode()),
                    (b'"mg/dL"', '"\uffff\ufffe"'.encode()),
                    (b'"code"', '"c\u00f6de"'.encode()),  # unknown element
                    (b"{", b"\xef\xbb\xbf{"),  # BOM
                ]
            )
            body = text.replace(*trick)
            if rng.random() < 0.1:
                body = text.decode().encode(rng.choice(["utf-16", "utf-32", "latin-1"]))
        elif roll < 0.75:
            kind = "content_type"
            body = orjson.dumps(obs)
            ctype = rng.choice(
                [
                    "text/plain",
                    "application/xml",
                    "application/fhir+xml",
                    "application/x-www-form-urlencoded",
                    "multipart/form-data; boundary=x",
                    "application/octet-stream",
                    "application/fhir+json; charset=utf-16",
                    "application/json; fhirVersion=9.9",
                    "*/*",
                    "application/fhir+json;;;=",
                    "APPLICATION/FHIR+JSON",
                    "",
                ]
            )
        elif roll < 0.90:
            kind = "bundle"
            path = "/fhir"
            body = _dumps(_odd_bundle(rng, obs))
        else:
            kind = "json_edge"
            body = rng.choice(
                [
                    b"null",
                    b"[]",
                    b'"Observation"',
                    b"1e400",
                    b"NaN",
                    b"{'resourceType': 'Observation'}",
                    b'{"resourceType":"Observation",}',
                    b'{"resourceType":"Observation"} {"resourceType":"Observation"}',
                    b'{"resourceType":"Observation","status":"final","status":"bogus"}',
                    b'{"resourceType":"Observation" /* c */}',
                    b'{"resourceType":"Observation","valueQuantity":{"value":1e400}}',
                    b'{"resourceType":"Observation","valueQuantity":{"value":-0.0e-400}}',
                    b'{"resourceType":"NoSuchType"}',
                    b'{"resourceType":""}',
                    b" \t\r\n ",
                ]
            )
        cases.append((kind, path, ctype, body))
    return cases


def _bundle(rng: random.Random, resources: list[Any], kind: str) -> dict[str, Any]:
    entries = []
    for resource in resources:
        entry: dict[str, Any] = {"fullUrl": f"urn:uuid:{rng.randbytes(16).hex()}"}
        entry["resource"] = resource
        entry["request"] = {"method": "POST", "url": "Observation"}
        entries.append(entry)
    return {"resourceType": "Bundle", "type": kind, "entry": entries}


def _odd_bundle(rng: random.Random, obs: dict[str, Any]) -> Any:
    bundle = _bundle(rng, [obs, dict(obs)], rng.choice(["transaction", "batch", "message"]))
    op = rng.choice(
        [
            "type",
            "entry_not_list",
            "entry_item",
            "method",
            "url",
            "same_fullurl",
            "dangling_ref",
            "no_header",
            "empty",
            "many",
        ]
    )
    entries = bundle["entry"]
    if op == "type":
        bundle["type"] = rng.choice([*_ODD_VALUES, "document", "searchset", "history"])
    elif op == "entry_not_list":
        bundle["entry"] = rng.choice(_ODD_VALUES[1:])
    elif op == "entry_item":
        entries[0] = rng.choice(_ODD_VALUES)
    elif op == "method":
        entries[0]["request"]["method"] = rng.choice([*_ODD_VALUES, "PATCH", "GET", "DELETE"])
    elif op == "url":
        entries[0]["request"]["url"] = rng.choice(
            [*_ODD_VALUES, "../../etc", "Observation?x=1", "http://other/Observation", "a/b/c/d"]
        )
    elif op == "same_fullurl":
        entries[1]["fullUrl"] = entries[0]["fullUrl"]
    elif op == "dangling_ref":
        entries[0]["resource"]["subject"] = {"reference": "urn:uuid:" + "0" * 32}
    elif op == "no_header":
        bundle["type"] = "message"
    elif op == "empty":
        bundle["entry"] = []
    else:
        bundle["entry"] = entries * rng.choice([50, 500])
    return bundle


async def _post_json(
    http: aiohttp.ClientSession, url: str, body: Any, **kwargs: Any
) -> tuple[int, dict[str, Any] | None]:
    headers = {"Content-Type": FHIR_JSON}
    async with http.post(url, data=body, headers=headers, **kwargs) as response:
        raw = await response.read()
        answer = orjson.loads(raw) if raw and response.content_type == FHIR_JSON else None
        return response.status, answer


async def test_malformed_fhir_bodies_get_4xx_outcomes_and_the_endpoint_keeps_serving(
    start_instance: InstanceFactory, broker: Any
) -> None:
    # The production default publish timeout: this test is about bodies, not Kafka.
    instance = await start_instance(broker.bootstrap, kafka_publish_timeout_s=10.0)
    cases = _fhir_cases(seed=7, count=2000)
    limit = asyncio.Semaphore(16)
    statuses: Counter[tuple[str, int]] = Counter()
    problems: list[str] = []
    started = time.monotonic()

    async def post(http: aiohttp.ClientSession, case: tuple[str, str, str, bytes]) -> None:
        kind, path, ctype, body = case
        async with limit:
            # aiohttp warns about raw bytes over 1 MiB; a BytesIO is sent the same way.
            data = body if len(body) < 2**20 else io.BytesIO(body)
            async with http.post(
                instance.http_url + path, data=data, headers={"Content-Type": ctype}
            ) as response:
                raw = await response.read()
                status, media = response.status, response.content_type
        statuses[(kind, status)] += 1
        outcome = orjson.loads(raw) if media == FHIR_JSON and raw else None
        accepted = 200 if path == "/fhir" else 202  # a Bundle's response, or a write's
        if status >= 500 or (status < 400 and status != accepted):
            problems.append(f"{kind} {path} {ctype!r} {body[:80]!r} -> {status} {raw[:200]!r}")
        elif status >= 400 and (outcome is None or outcome["resourceType"] != "OperationOutcome"):
            problems.append(f"{kind} {path} -> {status} without an OperationOutcome: {raw[:200]!r}")

    timeout = aiohttp.ClientTimeout(total=20)  # per request: a hang fails the test
    async with aiohttp.ClientSession(timeout=timeout) as http:
        async with asyncio.timeout(120):
            await asyncio.gather(*(post(http, case) for case in cases))
        elapsed = time.monotonic() - started
        await _healthy(instance)
        async with http.post(
            f"{instance.http_url}/fhir/Observation",
            data=orjson.dumps(OBSERVATION),
            headers={"Content-Type": FHIR_JSON},
        ) as response:
            assert response.status == 202, await response.text()
            assert response.headers["X-Event-Id"]

    by_status = Counter(status for (_, status) in statuses.elements())
    print(
        f"\nFHIR: {len(cases)} requests in {elapsed:.1f} s: {dict(sorted(by_status.items()))}; "
        f"by kind: {dict(sorted(statuses.items()))}"
    )
    assert sum(by_status.values()) == len(cases)
    assert by_status[400] > 0 and by_status[415] > 0 and by_status[422] > 0
    assert not problems, "\n".join([f"{len(problems)} bad answers:", *problems[:10]])


# --- slow clients, idle connections, oversize input -------------------------------------


async def test_slow_sender_is_bounded_by_idle_timeout_and_others_are_served(
    start_instance: InstanceFactory, broker: Any
) -> None:
    idle_s = 3.0
    instance = await start_instance(
        broker.bootstrap, idle_timeout_s=idle_s, fhir_request_timeout_s=2.0
    )
    port = instance.mllp.port
    frame = encode_frame(_oru("SLOW1"))
    trickled = 6  # bytes, one a second: the frame spans ~5 s, longer than idle_timeout_s

    async def trickle(wire: Wire) -> float:
        """MLLPServerSettings.idle_timeout_s: "Close a connection that received nothing
        [...] this long": a byte a second is not idle, so the frame completes."""
        for i in range(trickled):
            await wire.send(frame[i : i + 1])
            await asyncio.sleep(1.0)
        assert not wire.closed.is_set()
        await wire.send(frame[trickled:])
        assert _msa(await wire.answer(5)) == ("AA", "SLOW1")
        return time.monotonic()

    async def stall(wire: Wire) -> float:
        """Half a frame, then silence: closed after idle_timeout_s, owed no answer."""
        sent = time.monotonic()
        await wire.send(frame[: len(frame) // 2])
        await wire.wait_closed(idle_s + 3)
        assert wire.answers.empty()
        return time.monotonic() - sent

    async def steady(wire: Wire) -> list[float]:
        latencies = []
        for i in range(50):
            sent = time.monotonic()
            ack = await wire.roundtrip(_oru(f"FAST{i}", i), timeout_s=5)
            latencies.append(time.monotonic() - sent)
            assert _msa(ack) == ("AA", f"FAST{i}")
            await asyncio.sleep(0.1)
        return latencies

    async def slow_fhir_body() -> tuple[int, float]:
        """The FHIR side of the same bound: a body arriving a byte a second is refused
        with 408 after fhir_request_timeout_s."""

        async def body() -> AsyncIterator[bytes]:
            for byte in orjson.dumps(OBSERVATION)[:8]:
                yield bytes([byte])
                await asyncio.sleep(1.0)

        sent = time.monotonic()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as http:
            status, outcome = await _post_json(
                http, f"{instance.http_url}/fhir/Observation", body()
            )
        assert outcome is not None and outcome["resourceType"] == "OperationOutcome"
        return status, time.monotonic() - sent

    async with _wires(port, 3) as [slow, stalled, fast]:
        started = time.monotonic()
        async with asyncio.timeout(30):
            done_at, closed_after, latencies, (fhir_status, fhir_s) = await asyncio.gather(
                trickle(slow), stall(stalled), steady(fast), slow_fhir_body()
            )
        # The trickle outlived idle_timeout_s and was answered, on its own connection.
        assert done_at - started >= trickled - 1 > idle_s
        assert not slow.closed.is_set()
        # The silent one was closed by the bound, not before it and not long after.
        assert idle_s - 0.2 <= closed_after <= idle_s + 2, closed_after
        assert instance.mllp.connections_idle_closed == 1
        # Meanwhile the well-behaved sender kept getting fast answers.
        assert max(latencies) < 2.0, max(latencies)
        assert fhir_status == 408 and fhir_s < 2.0 + 2, (fhir_status, fhir_s)
    print(
        f"\nslow sender answered after {done_at - started:.1f} s; stalled one closed after "
        f"{closed_after:.1f} s; 50 others: max latency {max(latencies) * 1000:.0f} ms; "
        f"slow FHIR body {fhir_status} after {fhir_s:.1f} s"
    )


async def test_connections_over_max_are_refused_and_idle_ones_are_closed(
    start_instance: InstanceFactory, broker: Any
) -> None:
    max_connections, idle_s = 50, 3.0
    instance = await start_instance(
        broker.bootstrap, max_connections=max_connections, idle_timeout_s=idle_s
    )
    port = instance.mllp.port
    async with _wires(port, max_connections) as idle:
        await _wait_until(lambda: instance.mllp.connection_count == max_connections)

        # One more: its first frame is answered AR 207, then it is closed
        # (Settings.max_connections: "one more is answered AR 207 and closed").
        async with _wires(port, 1) as [extra]:
            ack = await extra.roundtrip(_oru("OVER1"), timeout_s=5)
            assert _msa(ack) == ("AR", "OVER1")
            assert _err_code(ack) == "207"
            await extra.wait_closed(2)
        assert instance.mllp.connections_rejected == 1
        # Those already connected are still served meanwhile.
        busy_sent = time.monotonic()
        assert _msa(await idle[0].roundtrip(_oru("BUSY1"), timeout_s=5)) == ("AA", "BUSY1")
        busy_answered = time.monotonic()

        # The idle ones are closed by the server idle_timeout_s after their last byte:
        # not before (0.1 s for clock and scheduling), and not much after.
        async with asyncio.timeout(idle_s + 5):
            await asyncio.gather(*(w.closed.wait() for w in idle))
        for n, wire in enumerate(idle):
            assert wire.closed_at is not None
            earliest, latest = (busy_answered, busy_sent) if n == 0 else (wire.opened_at,) * 2
            assert wire.closed_at - earliest >= idle_s - 0.1, (n, wire.closed_at - earliest)
            assert wire.closed_at - latest <= idle_s + 2.0, (n, wire.closed_at - latest)
        assert all(w.answers.empty() for w in idle)
    assert instance.mllp.connections_idle_closed == max_connections
    assert instance.mllp.connection_count == 0

    # And new connections are served again, up to the limit.
    async with _wires(port, 5) as fresh:
        acks = await asyncio.gather(
            *(w.roundtrip(_oru(f"AGAIN{i}"), timeout_s=5) for i, w in enumerate(fresh))
        )
    assert [_msa(a) for a in acks] == [("AA", f"AGAIN{i}") for i in range(5)]
    print(
        f"\n{max_connections} idle connections closed {idle_s:.0f} s after their last byte; "
        f"connection {max_connections + 1} answered AR 207 and closed"
    )


async def test_oversize_frames_and_bodies_are_refused_without_buffering(
    start_instance: InstanceFactory, broker: Any
) -> None:
    limit, fhir_limit = 4096, 8192
    instance = await start_instance(
        broker.bootstrap, max_frame_bytes=limit, fhir_max_body_bytes=fhir_limit
    )
    head = _oru("BIG1", comment="")
    filler = b"x" * (100 * 1024)
    async with _wires(instance.mllp.port, 2) as [wire, other]:
        # 100 KB of one frame, not yet ended: the answer comes before the frame does,
        # so the server did not wait to buffer it.
        await wire.send(VT + head + filler)
        ack = await wire.answer(5)
        assert _msa(ack) == ("AE", "BIG1")
        assert _err_code(ack) == "207"
        # What the server holds of that frame (private state, read only): nothing;
        # the rest of it, however long, is discarded as it comes.
        local = wire.writer.get_extra_info("sockname")
        [conn] = [c for c in instance.mllp._connections if c.peer == f"{local[0]}:{local[1]}"]
        assert conn._decoder.buffered_bytes == 0
        for _ in range(10):  # another 1 MB of the same frame
            await wire.send(filler)
        await asyncio.sleep(0.1)
        assert conn._decoder.buffered_bytes == 0
        await wire.send(FS + CR)
        # Meanwhile and afterwards, both connections are served.
        assert _msa(await other.roundtrip(_oru("OTHER1"))) == ("AA", "OTHER1")
        assert _msa(await wire.roundtrip(_oru("SMALL1"))) == ("AA", "SMALL1")
        await asyncio.sleep(0.2)
        assert wire.answers.empty()  # one answer for the big frame, not one per read

    url = f"{instance.http_url}/fhir/Observation"
    big = dict(OBSERVATION, valueString="y" * (100 * 1024))
    del big["valueQuantity"]

    async def chunked() -> AsyncIterator[bytes]:
        body = orjson.dumps(big)
        for i in range(0, len(body), 4096):
            yield body[i : i + 4096]

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        status, outcome = await _post_json(http, url, orjson.dumps(big))  # Content-Length
        assert status == 413 and outcome is not None
        assert outcome["resourceType"] == "OperationOutcome"
        status, outcome = await _post_json(http, url, chunked())  # no Content-Length
        assert status == 413 and outcome is not None
        assert outcome["resourceType"] == "OperationOutcome"
        status, _ = await _post_json(http, url, orjson.dumps(OBSERVATION))
        assert status == 202


# --- defects the fuzzing found, one input each --------------------------------------------


async def test_answer_to_an_unsupported_character_set_is_readable_hl7(
    start_instance: InstanceFactory, broker: Any
) -> None:
    """A message refused for its MSH-18 (AE 103) must get an ACK that is HL7 itself.

    The ACK is encoded in latin-1 (the fallback codec) but echoes the unsupported
    MSH-18, so it declares a character set nobody (the bridge included) can decode.
    The same happens when MSH-18 is garbage because the MSH lost its CR or a field.
    """
    instance = await start_instance(broker.bootstrap)
    base = _oru("CS1")
    msh_end = base.index(b"\r")
    klingon = base[:msh_end] + b"||||||KLINGON" + base[msh_end:]
    joined = _oru("CS2").replace(b"2.5.1\rPID", b"2.5.1|||||PID", 1)  # MSH-18 = PID-1
    async with _wires(instance.mllp.port, 1) as [wire]:
        answers = [await wire.roundtrip(m) for m in (klingon, joined)]
    for answer, control in zip(answers, ("CS1", "CS2"), strict=True):
        assert _msa_lenient(answer) == ("AE", control), answer
        assert b"|103^" in answer, answer
        # The bridge's own parser reads the ACK, as a sender's engine must.
        assert _msa(answer) == ("AE", control), answer


async def test_deeply_nested_fhir_resource_is_refused_with_4xx_not_500(
    start_instance: InstanceFactory, broker: Any
) -> None:
    """~150 nested extensions (a 6 KB body, within orjson's depth limit) make the
    R4B model validation raise RecursionError, which only the HTTP edge's last-resort
    handler catches: 500 "internal error" instead of a 4xx OperationOutcome."""
    instance = await start_instance(broker.bootstrap)
    depth = 150
    nest = b'{"url":"http://e.org/x","extension":[' * depth
    nest += b'{"url":"http://e.org/x","valueString":"v"}' + b"]}" * depth
    body = orjson.dumps(dict(OBSERVATION, extension=["@@"])).replace(b'"@@"', nest)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        status, outcome = await _post_json(http, f"{instance.http_url}/fhir/Observation", body)
        assert outcome is not None and outcome["resourceType"] == "OperationOutcome"
        assert 400 <= status < 500, (status, outcome)
        status, _ = await _post_json(
            http, f"{instance.http_url}/fhir/Observation", orjson.dumps(OBSERVATION)
        )
        assert status == 202


async def test_large_fhir_body_does_not_stall_mllp_answers(
    start_instance: InstanceFactory, broker: Any
) -> None:
    """A body under fhir_max_body_bytes (10 MiB default) but with many elements is
    validated on the event loop: meanwhile no MLLP sender gets an answer. The mapping
    of HL7 v2 runs in worker processes for this reason (Settings.mapping_workers)."""
    instance = await start_instance(broker.bootstrap, kafka_publish_timeout_s=10.0)
    big = dict(OBSERVATION, unknownElement=1, note=[{"text": "t"}] * 600_000)
    body = orjson.dumps(big)
    assert len(body) < instance.settings.fhir_max_body_bytes
    stop = threading.Event()

    async def post() -> int:
        await asyncio.sleep(0.5)  # a few answers first, to compare with
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
                status, _ = await _post_json(
                    http, f"{instance.http_url}/fhir/Observation", io.BytesIO(body)
                )
        finally:
            stop.set()
        return status

    def ping() -> list[tuple[float, str, str]]:
        """A sender of its own (a thread: this test's event loop is the bridge's), one
        message every 100 ms until the FHIR answer is in, and one more."""
        answers = []
        with socket.create_connection(("127.0.0.1", instance.mllp.port), timeout=30) as sock:
            n = 0
            while True:
                last = stop.is_set()
                sent = time.monotonic()
                sock.sendall(encode_frame(_oru(f"PING{n}", n)))
                reply = b""
                while not reply.endswith(FS + CR):
                    data = sock.recv(65536)
                    assert data, "connection closed"
                    reply += data
                ack = reply.strip(VT + FS + CR)
                code, control = _msa(ack)
                assert control == f"PING{n}"
                errors = summarize_ack("ack", n, ack).errors
                answers.append((time.monotonic() - sent, code, errors[0]["text"] if errors else ""))
                if last:
                    return answers
                n += 1
                time.sleep(0.1)

    async with asyncio.timeout(60):
        status, answers = await asyncio.gather(post(), asyncio.to_thread(ping))
    assert status == 422  # refused, after validating all of it
    slowest = max(answers)
    print(
        f"\n{len(body)} byte FHIR body: {len(answers)} MLLP answers meanwhile, "
        f"slowest {slowest[0]:.1f} s ({slowest[1]})"
    )
    assert slowest[0] < 2.0 and {code for _, code, _ in answers} == {"AA"}, (
        f"an MLLP answer waited {slowest[0]:.1f} s: {slowest[1]} {slowest[2]!r}"
    )
