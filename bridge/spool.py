"""Store-and-forward: the ``ack_mode: spool`` write-ahead spool (SQLite, WAL, fsync).

In spool mode a message is acknowledged once its Kafka records are committed to a
local SQLite database in WAL mode with ``synchronous=FULL`` (fsync on every
commit), and a single forwarder sends them to Kafka in the order they were
spooled, deleting each entry once Kafka acknowledged it (acks=all). On restart
the forwarder drains what the previous run left. The spool has a size bound:
when it is full, new messages are answered AR 207 instead of growing without end.

Why SQLite: a crash-safe, ordered, size-countable log from the standard library;
each append is one small transaction. The database holds message content (it is
the message until Kafka has it): keep it on an encrypted volume like Kafka's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

import orjson

from bridge.errors import OverloadedError, UnavailableError, describe_failure
from bridge.kafka import Delivered, OutRecord

log = logging.getLogger(__name__)

#: Pause between the forwarder's attempts while Kafka is away.
_RETRY_S = 0.5

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    size INTEGER NOT NULL,
    records BLOB NOT NULL
)
"""


class Publisher(Protocol):
    async def publish(self, records: Sequence[OutRecord]) -> list[Delivered]: ...

    async def missing_topics(self, topics: Iterable[str]) -> set[str]: ...


def _encode(records: Sequence[OutRecord]) -> bytes:
    return orjson.dumps(
        [
            [r.topic, None if r.key is None else r.key.hex(), r.value.hex(),
             [[name, value.hex()] for name, value in r.headers]]
            for r in records
        ]
    )  # fmt: skip


def _decode(blob: bytes) -> list[OutRecord]:
    return [
        OutRecord(
            topic,
            bytes.fromhex(value),
            None if key is None else bytes.fromhex(key),
            [(name, bytes.fromhex(v)) for name, v in headers],
        )
        for topic, key, value, headers in orjson.loads(blob)
    ]


class Spool:
    """The spool file; every method runs in a worker thread (never on the loop)."""

    def __init__(self, path: Path, *, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(_SCHEMA)
        row = self._db.execute("SELECT COALESCE(SUM(size), 0), COUNT(*) FROM spool").fetchone()
        self.size_bytes: int = int(row[0])
        self.count: int = int(row[1])

    def append(self, records: Sequence[OutRecord]) -> int:
        """Commit (fsync) one message's records; raise OverloadedError when full."""
        blob = _encode(records)
        with self._lock:
            if self.size_bytes + len(blob) > self.max_bytes:
                raise OverloadedError("the store-and-forward spool is full; retry later")
            cursor = self._db.execute(
                "INSERT INTO spool (size, records) VALUES (?, ?)", (len(blob), blob)
            )
            self.size_bytes += len(blob)
            self.count += 1
            return int(cursor.lastrowid or 0)

    def oldest(self, limit: int) -> list[tuple[int, int, list[OutRecord]]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, size, records FROM spool ORDER BY seq LIMIT ?", (limit,)
            ).fetchall()
        return [(int(seq), int(size), _decode(blob)) for seq, size, blob in rows]

    def delete_through(self, seq: int, size: int, count: int) -> None:
        with self._lock:
            self._db.execute("DELETE FROM spool WHERE seq <= ?", (seq,))
            self.size_bytes -= size
            self.count -= count

    def close(self) -> None:
        with self._lock:
            self._db.close()


class SpoolingPublisher:
    """A publisher for the pipeline in spool mode: ``publish`` returns once the records
    are on disk; a forwarder task sends them to Kafka in order."""

    def __init__(self, spool: Spool, kafka: Publisher, *, batch: int = 200) -> None:
        self._spool = spool
        self._kafka = kafka
        self._batch = batch
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def backlog(self) -> int:
        """Messages spooled and not yet acknowledged by Kafka."""
        return self._spool.count

    async def publish(self, records: Sequence[OutRecord]) -> list[Delivered]:
        try:
            await asyncio.to_thread(self._spool.append, records)
        except OverloadedError:
            raise
        except (OSError, sqlite3.Error) as exc:
            raise UnavailableError(f"the spool could not be written: {type(exc).__name__}") from exc
        self._wake.set()
        return []

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._forward())

    async def stop(self, *, drain_timeout_s: float) -> None:
        """Forward what is spooled for up to ``drain_timeout_s``, then stop (the rest is
        forwarded at the next start)."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._task), timeout=drain_timeout_s)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        await asyncio.to_thread(self._spool.close)

    async def _until_topics_exist(self, topics: set[str]) -> None:
        """After a failed send, wait until the broker answers and knows every topic.

        A broker that comes back without its topics (a rebuilt cluster, a deleted
        topic, a broker that keeps no state) must not be sent the spool: depending on
        its auto-create setting it would refuse each record, create the topic with
        the wrong partitioning, or (some Kafka-protocol brokers) acknowledge records
        it does not keep. The spool waits instead, and fills towards AR 207.
        """
        reported: set[str] = set()
        while not self._stopping:
            await asyncio.sleep(_RETRY_S)
            try:
                missing = await self._kafka.missing_topics(topics)
            except UnavailableError:
                continue
            if not missing:
                return
            if missing != reported:
                log.warning(
                    "spool forwarder: waiting for topics missing on the broker: %s",
                    ", ".join(sorted(missing)),
                )
                reported = missing

    async def _forward(self) -> None:
        while True:
            entries = await asyncio.to_thread(self._spool.oldest, self._batch)
            if not entries:
                if self._stopping:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            records = [r for _, _, rs in entries for r in rs]
            try:
                await self._kafka.publish(records)  # in order: one batch, sent in order
            except UnavailableError as exc:
                log.warning("spool forwarder: %s; retrying", describe_failure(exc))
                await self._until_topics_exist({r.topic for r in records})
                continue
            await asyncio.to_thread(
                self._spool.delete_through,
                entries[-1][0],
                sum(size for _, size, _ in entries),
                len(entries),
            )
