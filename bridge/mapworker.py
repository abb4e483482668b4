"""Mapping worker processes: HL7 v2 → FHIR off the event loop, on another core.

The bridge is one Python process; the FHIR mapping is CPU-bound Python (about
300 µs for an ORU^R01 with ten results). With ``mapping_workers`` > 0 the
event loop hands each accepted message to a worker process and keeps serving
MLLP, deduplicating and publishing while the worker maps.

Each worker is ``python -m bridge.mapworker`` with a pipe each way. A request
is the message bytes and its content fingerprint; the answer is what
:func:`bridge.events.describe_records` returns (record headers, key, the FHIR
JSON) or the error it raised. The same function runs in process when
``mapping_workers`` is 0, so both paths publish the same records.

Failure handling: a worker that exits or stops answering fails its pending
messages with :class:`~bridge.errors.UnavailableError` (AR 207: the senders
keep them and retry, nothing is lost) and is started again. Workers run in
their own session (a Ctrl-C in the terminal goes to the bridge, which stops
them in order) and exit when their input pipe closes, so a bridge killed hard
leaves none behind.

Wire format, big-endian: request ``id u32, fingerprint_len u16, payload_len
u32`` + fingerprint + payload; answer ``id u32, status u8, meta_len u32,
data_len u32`` + meta (JSON) + data (the event's FHIR JSON). Status 0 ok,
1 a :class:`~bridge.errors.BridgeError` (meta: class, message, location),
2 an internal failure (meta: a PHI-free description).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import signal
import struct
import sys
from dataclasses import dataclass
from typing import Any, BinaryIO

import orjson

from bridge import errors
from bridge.errors import BridgeError, LifecycleError, UnavailableError, describe_failure
from bridge.events import DescribedRecords, describe_records

log = logging.getLogger(__name__)

_REQUEST = struct.Struct(">IHI")
_ANSWER = struct.Struct(">IBII")
OK, BRIDGE_ERROR, INTERNAL_ERROR = 0, 1, 2

#: How long one message may take in a worker before the worker is deemed stuck.
ANSWER_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """What a worker needs to map as the instance does (JSON on its command line)."""

    instance_id: str | None
    identifier_systems: dict[str, str]
    default_timezone: str
    strict_mapping: bool

    def to_json(self) -> str:
        return orjson.dumps(
            {
                "instance_id": self.instance_id,
                "identifier_systems": self.identifier_systems,
                "default_timezone": self.default_timezone,
                "strict_mapping": self.strict_mapping,
            }
        ).decode()

    @classmethod
    def from_json(cls, text: str) -> WorkerConfig:
        data = orjson.loads(text)
        return cls(
            instance_id=data["instance_id"],
            identifier_systems=dict(data["identifier_systems"]),
            default_timezone=data["default_timezone"],
            strict_mapping=bool(data["strict_mapping"]),
        )


# --- the worker process ----------------------------------------------------------------


def _read_exactly(stream: BinaryIO, size: int) -> bytes | None:
    chunks = []
    while size:
        chunk = stream.read(size)
        if not chunk:
            return None
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _answer(request_id: int, status: int, meta: dict[str, Any], data: bytes = b"") -> bytes:
    encoded = orjson.dumps(meta)
    return _ANSWER.pack(request_id, status, len(encoded), len(data)) + encoded + data


def serve_requests(config: WorkerConfig, source: BinaryIO, sink: BinaryIO) -> None:
    """The worker's loop: map each request until the input closes."""
    from bridge.normalize import MappingOptions

    mapping = MappingOptions(
        identifier_systems=config.identifier_systems, default_timezone=config.default_timezone
    )
    while True:
        head = _read_exactly(source, _REQUEST.size)
        if head is None:
            return
        request_id, fingerprint_len, payload_len = _REQUEST.unpack(head)
        body = _read_exactly(source, fingerprint_len + payload_len)
        if body is None:
            return
        fingerprint, payload = body[:fingerprint_len], body[fingerprint_len:]
        try:
            described = describe_records(
                payload,
                fingerprint,
                instance_id=config.instance_id,
                mapping=mapping,
                strict_mapping=config.strict_mapping,
            )
        except BridgeError as exc:
            meta: dict[str, Any] = {
                "class": type(exc).__name__,
                "message": exc.message,
                "location": exc.location,
            }
            sink.write(_answer(request_id, BRIDGE_ERROR, meta))
        except Exception as exc:  # a mapping defect: reported, never the content
            sink.write(_answer(request_id, INTERNAL_ERROR, {"failure": describe_failure(exc)}))
        else:
            meta = {
                "event": [[k, v.decode()] for k, v in described.event_headers],
                "raw": [[k, v.decode()] for k, v in described.raw_headers],
                "key": described.record_key.decode(),
            }
            sink.write(_answer(request_id, OK, meta, described.data))
        sink.flush()


def main() -> None:
    # The parent handles signals and closes our input to stop us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    config = WorkerConfig.from_json(sys.argv[1])
    serve_requests(config, sys.stdin.buffer, sys.stdout.buffer)


# --- the pool, in the bridge process ---------------------------------------------------


def _error_from(meta: dict[str, Any]) -> BridgeError:
    """Rebuild a worker's BridgeError by class name (only classes of bridge.errors)."""
    cls = getattr(errors, str(meta.get("class")), None)
    if not (isinstance(cls, type) and issubclass(cls, BridgeError)):
        cls = errors.MessageError
    try:
        return cls(str(meta.get("message", "")), location=meta.get("location"))
    except TypeError:  # ConfigError and others with another signature: not expected here
        return errors.MessageError(str(meta.get("message", "")), location=meta.get("location"))


class WorkerFailed(Exception):
    """A mapping defect inside a worker (the pipeline answers it like an in-process one)."""


class _Worker:
    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.pending: dict[int, asyncio.Future[DescribedRecords]] = {}
        self.reader: asyncio.Task[None] | None = None


class MappingPool:
    """``workers`` mapping processes; ``describe()`` maps one message in one of them."""

    def __init__(self, workers: int, config: WorkerConfig) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self._size = workers
        self._config = config
        self._workers: list[_Worker] = []
        self._ids = itertools.count(1)
        self._started = False
        self._stopping = False

    @property
    def size(self) -> int:
        return self._size

    def pids(self) -> list[int]:
        return [w.process.pid for w in self._workers if w.process.returncode is None]

    async def start(self) -> None:
        if self._started:
            raise LifecycleError("MappingPool.start() called twice")
        self._started = True
        for _ in range(self._size):
            self._workers.append(await self._spawn())

    async def _spawn(self) -> _Worker:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bridge.mapworker",
            self._config.to_json(),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        worker = _Worker(process)
        worker.reader = asyncio.get_running_loop().create_task(self._read(worker))
        return worker

    async def describe(self, payload: bytes, fingerprint: bytes) -> DescribedRecords:
        """Map one message in a worker. Raises the worker's BridgeError, WorkerFailed
        for a mapping defect, or UnavailableError when no worker can answer."""
        if not self._started or self._stopping:
            raise UnavailableError("the mapping workers are not running")
        worker = min(self._workers, key=lambda w: len(w.pending))
        stdin = worker.process.stdin
        if stdin is None or worker.process.returncode is not None:
            raise UnavailableError("a mapping worker is restarting; retry later")
        request_id = next(self._ids) & 0xFFFFFFFF
        future: asyncio.Future[DescribedRecords] = asyncio.get_running_loop().create_future()
        worker.pending[request_id] = future
        try:
            stdin.write(_REQUEST.pack(request_id, len(fingerprint), len(payload)))
            stdin.write(fingerprint)
            stdin.write(payload)
            await stdin.drain()
            async with asyncio.timeout(ANSWER_TIMEOUT_S):
                return await asyncio.shield(future)
        except (ConnectionError, BrokenPipeError) as exc:
            raise UnavailableError("a mapping worker went away; retry later") from exc
        except TimeoutError as exc:
            log.error("mapping worker %d did not answer in time; restarting it", worker.process.pid)
            self._kill(worker)
            raise UnavailableError("mapping took too long; retry later") from exc
        finally:
            worker.pending.pop(request_id, None)

    async def _read(self, worker: _Worker) -> None:
        stdout = worker.process.stdout
        assert stdout is not None
        try:
            while True:
                head = await stdout.readexactly(_ANSWER.size)
                request_id, status, meta_len, data_len = _ANSWER.unpack(head)
                meta = orjson.loads(await stdout.readexactly(meta_len))
                data = await stdout.readexactly(data_len) if data_len else b""
                future = worker.pending.get(request_id)
                if future is None or future.done():
                    continue  # its sender gave up (timeout)
                if status == OK:
                    future.set_result(_described(meta, data))
                elif status == BRIDGE_ERROR:
                    future.set_exception(_error_from(meta))
                else:
                    future.set_exception(WorkerFailed(str(meta.get("failure", "unknown"))))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._fail_pending(worker)
            if not self._stopping:
                await self._replace(worker)

    def _fail_pending(self, worker: _Worker) -> None:
        for future in worker.pending.values():
            if not future.done():
                future.set_exception(UnavailableError("a mapping worker exited; retry later"))
        worker.pending.clear()

    async def _replace(self, worker: _Worker) -> None:
        self._kill(worker)
        with contextlib.suppress(ProcessLookupError):
            await worker.process.wait()
        log.warning(
            "mapping worker %d exited (%s); starting another",
            worker.process.pid,
            worker.process.returncode,
        )
        if self._stopping:
            return
        replacement = await self._spawn()
        self._workers[self._workers.index(worker)] = replacement

    @staticmethod
    def _kill(worker: _Worker) -> None:
        if worker.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                worker.process.kill()

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Close the workers' input (they finish and exit), then reap. Idempotent."""
        if self._stopping or not self._started:
            return
        self._stopping = True
        for worker in self._workers:
            if worker.process.stdin is not None:
                worker.process.stdin.close()
        for worker in self._workers:
            try:
                async with asyncio.timeout(timeout_s):
                    await worker.process.wait()
            except TimeoutError:
                self._kill(worker)
                await worker.process.wait()
            if worker.reader is not None:
                worker.reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await worker.reader


def _described(meta: dict[str, Any], data: bytes) -> DescribedRecords:
    return DescribedRecords(
        event_headers=[(k, v.encode()) for k, v in meta["event"]],
        raw_headers=[(k, v.encode()) for k, v in meta["raw"]],
        record_key=str(meta["key"]).encode(),
        data=data,
    )


if __name__ == "__main__":  # pragma: no cover - run as a worker process
    main()
