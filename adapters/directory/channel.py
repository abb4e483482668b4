"""A singleton channel that picks up HL7 v2 files dropped into a folder (the inbox).

Each file is split into messages (:func:`adapters.hl7v2.files.split_messages`:
batch envelopes, line ends, BOM and MLLP framing are dealt with there) and each
message goes through the same pipeline, and the same ACK rules, as a message
received over MLLP. When every message has an outcome the file moves to the
``done`` directory (every message accepted) or the ``error`` directory (at least
one was not), with a report ``<name>.report.json`` next to it.

Exactly once under takeover
---------------------------
The channel runs on one instance at a time; that instance may die at any moment
and another resume. The cluster provides the hooks: ``still_owner`` (fencing),
a :class:`ProgressStore` shared by the instances, and ``already_published``
(was the event with this id published?). The channel keeps, per file, the index
of the next message and the outcome of every earlier one, and saves it:

1. *before* a message is handed to the pipeline, with ``in_flight`` set to its
   index and ``in_flight_event_id`` to its deterministic event id
   (:func:`bridge.envelope.hl7v2_event_id`);
2. *after* the pipeline answered, with the outcome appended and ``in_flight``
   cleared.

An instance that dies between 1 and 2 leaves the message in doubt: the next
owner asks ``already_published(in_flight_event_id)`` and records the message as
accepted (``recovered``) instead of publishing it a second time, or sends it
if it was not published. A message that does not even parse has no event id
(``in_flight_event_id`` None) and is simply sent again: the pipeline answers it
with AE/AR and a DLQ record, so the worst case is a second DLQ record for the
same broken message, never a second event. The same holds for a message that
parses but is rejected (AE/AR): its event was never published, so the in-doubt
check says no and it is rejected again.

The pipeline's AR with ERR 207 ("cannot take it now": Kafka down, overloaded)
is not an outcome: the file stays in the inbox with its progress, ``in_flight``
still set (a publish that timed out may still have landed: the in-doubt check
settles it), and is retried at the next poll. An exception from the pipeline is
handled the same way. Nothing in a file is published twice, and nothing is
skipped.

The progress also holds a digest of the file's bytes. The file is moved before
its progress is cleared (a crash in between must not publish it again), so a new
file dropped later under the same name can meet a stale progress: the digest
tells them apart and the stale one is dropped.

Files are taken once *settled*: the same size and modification time for
``settle_s`` (a writer may still be writing). Writers should still prefer to
write under a hidden or ``.tmp`` / ``.part`` name and rename when done: those
names are never picked up.

Logs carry the file's key (:func:`file_key`, a hash), counts and codes, never
a file name or content: file names may hold patient data.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fnmatch
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal, Protocol

from adapters.hl7v2.ack import ACK_CODES, header_for_unparseable
from adapters.hl7v2.er7 import parse_message
from adapters.hl7v2.files import split_messages
from bridge.dedupe import content_fingerprint
from bridge.envelope import hl7v2_event_id
from bridge.errors import BridgeError, ConfigError, describe_failure
from bridge.sender import summarize_ack

__all__ = [
    "DirectoryChannel",
    "DirectorySettings",
    "FileProgress",
    "FileReport",
    "MessageOutcome",
    "ProgressStore",
    "file_key",
]

log = logging.getLogger(__name__)

#: Name endings of files still being written: never picked up.
PARTIAL_SUFFIXES: Final = (".tmp", ".part", ".filepart")
REPORT_SUFFIX: Final = ".report.json"
_ACCEPTED: Final = frozenset({"AA", "CA"})
_NOT_NOW: Final = frozenset({"AR", "CR"})
#: ERR code of the pipeline's "cannot take it now" (Kafka down, overloaded).
_UNAVAILABLE_ERR: Final = "207"
#: How often ``run`` looks at ``still_owner`` while it waits between polls.
_OWNER_CHECK_S: Final = 0.1


@dataclass(frozen=True, slots=True)
class DirectorySettings:
    """One directory channel."""

    #: The channel's name (a slug).
    name: str
    #: The inbox.
    path: Path
    #: Glob of the files to take (non-recursive). Hidden files, partial files
    #: (``*.tmp``, ``*.part``, ``*.filepart``) and directories are never taken.
    pattern: str = "*"
    #: Where fully accepted files go; default ``path / "done"``.
    done_dir: Path | None = None
    #: Where files with a failed message (or none at all) go; default ``path / "error"``.
    error_dir: Path | None = None
    poll_interval_s: float = 1.0
    #: A file must have kept the same size and mtime this long before it is taken.
    settle_s: float = 1.0

    @property
    def done_path(self) -> Path:
        return self.done_dir if self.done_dir is not None else self.path / "done"

    @property
    def error_path(self) -> Path:
        return self.error_dir if self.error_dir is not None else self.path / "error"


@dataclass(frozen=True, slots=True)
class MessageOutcome:
    """What became of one message of a file."""

    index: int
    #: MSH-10 of the message ("" when it has none or could not be read).
    control_id: str
    #: MSA-1 of the pipeline's ACK (AA/AE/AR/CA/CE/CR); "AA" when ``recovered``.
    ack_code: str
    #: The ACK's ERR text: codes, locations and the bridge's own messages, never content.
    error: str | None = None
    #: Found already published by an earlier owner (the in-doubt check).
    recovered: bool = False

    @property
    def accepted(self) -> bool:
        return self.ack_code in _ACCEPTED

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "control_id": self.control_id,
            "ack_code": self.ack_code,
            "error": self.error,
            "recovered": self.recovered,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> MessageOutcome:
        error = data.get("error")
        return cls(
            index=int(data["index"]),
            control_id=str(data["control_id"]),
            ack_code=str(data["ack_code"]),
            error=None if error is None else str(error),
            recovered=bool(data.get("recovered", False)),
        )


@dataclass(slots=True)
class FileProgress:
    """A file's progress, saved by the :class:`ProgressStore` around every message."""

    #: Messages ``[0, next_index)`` have their outcome.
    next_index: int
    #: One per message done so far, in order.
    outcomes: list[MessageOutcome] = field(default_factory=list)
    #: Index of a message handed to the pipeline whose outcome is not saved yet.
    in_flight: int | None = None
    #: Its deterministic event id, for the in-doubt check (None: it does not parse).
    in_flight_event_id: str | None = None
    #: sha256 (hex) of the file's bytes: tells a stale progress (an earlier file
    #: of the same name) from this file's. None: not known, trusted.
    digest: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "next_index": self.next_index,
            "outcomes": [outcome.to_json() for outcome in self.outcomes],
            "in_flight": self.in_flight,
            "in_flight_event_id": self.in_flight_event_id,
            "digest": self.digest,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FileProgress:
        in_flight = data.get("in_flight")
        event_id = data.get("in_flight_event_id")
        digest = data.get("digest")
        return cls(
            next_index=int(data["next_index"]),
            outcomes=[MessageOutcome.from_json(o) for o in data.get("outcomes", [])],
            in_flight=None if in_flight is None else int(in_flight),
            in_flight_event_id=None if event_id is None else str(event_id),
            digest=None if digest is None else str(digest),
        )


class ProgressStore(Protocol):
    """Where file progress lives, shared by every instance that may run the channel."""

    async def load(self, file_key: str) -> FileProgress | None: ...

    async def save(self, file_key: str, progress: FileProgress) -> None: ...

    async def clear(self, file_key: str) -> None: ...


FileStatus = Literal["done", "error", "deferred", "vanished"]


@dataclass(frozen=True, slots=True)
class FileReport:
    """What :meth:`DirectoryChannel.process_file` did with one file.

    ``status``: ``done`` (every message accepted, moved to the done directory),
    ``error`` (moved to the error directory), ``deferred`` (the bridge could
    not take a message now: the file stays in the inbox, retried later),
    ``vanished`` (the file was gone before it could be read).
    """

    file_key: str
    status: FileStatus
    messages: int
    accepted: int
    failed: int
    outcomes: tuple[MessageOutcome, ...] = ()
    #: Where the file went; None while it is still in the inbox.
    destination: Path | None = None
    #: Why a file has no message outcomes (cannot be read, holds no message).
    problem: str | None = None


class _BadAnswer(BridgeError):
    """The pipeline's answer is not an ACK (a bug): the file is retried later."""


def file_key(settings: DirectorySettings, path: Path) -> str:
    """A stable key for a file of a channel: 32 hex characters of the sha256 of the
    channel name and the file's name relative to the inbox. Never the name itself:
    file names may hold patient data, and the key is logged and stored."""
    try:
        relative = path.relative_to(settings.path).as_posix()
    except ValueError:
        relative = path.name
    digest = hashlib.sha256(f"{settings.name}\x00{relative}".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:32]


def _now_rfc3339(timestamp: float) -> str:
    moment = datetime.fromtimestamp(timestamp, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _takeable(name: str) -> bool:
    return not name.startswith(".") and not name.lower().endswith(PARTIAL_SUFFIXES)


@dataclass(frozen=True, slots=True)
class _Identity:
    control_id: str
    event_id: str | None


def _identify(message: bytes) -> _Identity:
    """MSH-10 and the event id the pipeline will give this message (None: it does not parse)."""
    try:
        parsed = parse_message(message)
    except BridgeError:
        header = header_for_unparseable(message)
        return _Identity(header.control_id if header is not None else "", None)
    header = parsed.header
    event_id = hl7v2_event_id(
        header.sender_key, header.control_id, content_fingerprint(parsed.text)
    )
    return _Identity(header.control_id, event_id)


def _error_text(errors: list[dict[str, str]], problem: str | None) -> str | None:
    parts = []
    for err in errors:
        head = " ".join(p for p in (err.get("code", ""), err.get("location", "")) if p)
        text = err.get("text", "")
        parts.append(f"{head}: {text}" if head and text else head or text)
    if problem:
        parts.append(problem)
    joined = "; ".join(p for p in parts if p)
    return joined or None


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (best effort where it is not supported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(target: Path, data: bytes) -> None:
    temporary = target.with_name(f".{target.name}.tmp")
    with open(temporary, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(temporary, target)


def _move(source: Path, target: Path) -> None:
    """Rename; across filesystems, copy to a hidden name in place, rename, then unlink."""
    try:
        os.replace(source, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        temporary = target.with_name(f".{target.name}.tmp")
        shutil.copy2(source, temporary)
        with open(temporary, "rb+") as copied:
            os.fsync(copied.fileno())
        os.replace(temporary, target)
        _fsync_dir(target.parent)
        source.unlink()


def _free_name(directory: Path, name: str) -> Path:
    """``name`` in ``directory``, or ``name.1``, ``name.2``... when that is taken.

    Only the data file counts: a report left without its file (a crash between
    writing the report and moving the file) is overwritten by the resumed move.
    """
    candidate = directory / name
    suffix = 0
    while candidate.exists():
        suffix += 1
        candidate = directory / f"{name}.{suffix}"
    return candidate


class DirectoryChannel:
    """Polls an inbox and sends each message of each settled file through ``process``.

    ``process``: the pipeline (message bytes -> ACK bytes).
    ``progress``: the shared progress store.
    ``still_owner``: False as soon as this instance may no longer run the channel.
    ``already_published``: the in-doubt resolver (was the event with this id published?).
    ``clock``: wall-clock time (compared with file modification times).
    """

    def __init__(
        self,
        settings: DirectorySettings,
        *,
        process: Callable[[bytes], Awaitable[bytes]],
        progress: ProgressStore,
        still_owner: Callable[[], bool],
        already_published: Callable[[str], Awaitable[bool]],
        clock: Callable[[], float] = time.time,
    ) -> None:
        _check(settings)
        self._settings = settings
        self._process = process
        self._progress = progress
        self._still_owner = still_owner
        self._already_published = already_published
        self._clock = clock
        self._stop: asyncio.Event | None = None
        #: name -> (size, mtime_ns, unchanged since): the settle check.
        self._seen: dict[str, tuple[int, int, float]] = {}
        self._inbox_missing = False

    @property
    def settings(self) -> DirectorySettings:
        return self._settings

    # --- the loop -------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Poll until ``stop`` is set or ``still_owner()`` turns False.

        A file whose processing raises (a bug, the progress store unreachable)
        stays in the inbox and is retried at the next poll; the loop goes on.
        When the bridge cannot take a message now (AR 207) the round ends and
        the next one starts after ``poll_interval_s``.
        """
        name = self._settings.name
        self._stop = stop
        log.info("directory channel %s: started", name)
        try:
            while self._may_go_on():
                for path in await self._list():
                    if not self._may_go_on():
                        break
                    key = file_key(self._settings, path)
                    try:
                        report = await self.process_file(path)
                    except Exception as exc:
                        log.error(
                            "directory channel %s: file %s left in the inbox, retried at the "
                            "next poll: %s",
                            name,
                            key,
                            describe_failure(exc),
                        )
                        continue
                    if report is not None and report.status == "deferred":
                        break
                await self._pause(stop)
        finally:
            self._stop = None
            log.info("directory channel %s: stopped", name)

    def _may_go_on(self) -> bool:
        stopping = self._stop is not None and self._stop.is_set()
        return not stopping and self._still_owner()

    async def _pause(self, stop: asyncio.Event) -> None:
        """Sleep ``poll_interval_s``; wake as soon as ``stop`` is set or ownership is lost."""
        deadline = time.monotonic() + self._settings.poll_interval_s
        while self._may_go_on():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), min(left, _OWNER_CHECK_S))

    async def _list(self) -> list[Path]:
        try:
            paths = await asyncio.to_thread(self.settled_files)
        except OSError as exc:
            if not self._inbox_missing:
                log.error(
                    "directory channel %s: cannot list the inbox: %s",
                    self._settings.name,
                    exc.strerror or type(exc).__name__,
                )
            self._inbox_missing = True
            return []
        if self._inbox_missing:
            log.info("directory channel %s: the inbox can be listed again", self._settings.name)
            self._inbox_missing = False
        return paths

    def settled_files(self) -> list[Path]:
        """The inbox's files that may be taken now, oldest first (mtime, then name).

        A file is settled when its size and mtime have not changed for
        ``settle_s``: since its mtime, or since this channel first saw them as
        they are now, whichever is earlier (a file first seen long after it was
        written is taken at once; one whose size or mtime changed between two
        looks waits ``settle_s`` again). Blocking: run it in a thread.
        """
        settings = self._settings
        now = self._clock()
        seen: dict[str, tuple[int, int, float]] = {}
        ready: list[tuple[int, str, Path]] = []
        with os.scandir(settings.path) as entries:
            for entry in entries:
                name = entry.name
                if not _takeable(name) or not fnmatch.fnmatch(name, settings.pattern):
                    continue
                try:
                    if not entry.is_file():
                        continue
                    stat = entry.stat()
                except OSError:
                    continue  # gone meanwhile
                size, mtime_ns = stat.st_size, stat.st_mtime_ns
                earlier = self._seen.get(name)
                if earlier is not None and earlier[:2] == (size, mtime_ns):
                    since = earlier[2]
                else:
                    since = min(now, mtime_ns / 1e9)
                seen[name] = (size, mtime_ns, since)
                if now - since >= settings.settle_s:
                    ready.append((mtime_ns, name, Path(entry.path)))
        self._seen = seen
        ready.sort(key=lambda item: (item[0], item[1]))
        return [path for _, _, path in ready]

    # --- one file ---------------------------------------------------------------------

    async def process_file(self, path: Path) -> FileReport | None:
        """Send every message of ``path`` not done yet; move the file when all are done.

        Returns None when it stopped because ownership was lost (or ``run`` was
        asked to stop): the file stays where it is, its progress saved, and the
        next owner resumes it.
        """
        settings = self._settings
        key = file_key(settings, path)
        if not self._may_go_on():
            return None
        try:
            data = await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            log.info("directory channel %s: file %s is gone", settings.name, key)
            return FileReport(key, "vanished", 0, 0, 0)
        except OSError as exc:
            problem = f"the file cannot be read: {exc.strerror or type(exc).__name__}"
            return await self._finish(path, key, [], problem=problem)
        messages = split_messages(data)
        if not messages:
            problem = "the file holds no HL7 v2 message (no MSH segment)"
            return await self._finish(path, key, [], problem=problem)

        total = len(messages)
        digest = hashlib.sha256(data).hexdigest()
        progress = await self._progress.load(key)
        if progress is not None and not _belongs(progress, digest, total):
            log.warning(
                "directory channel %s: file %s: the saved progress is for another file "
                "of the same name (or damaged); starting from its first message",
                settings.name,
                key,
            )
            progress = None
        if progress is None:
            progress = FileProgress(next_index=0, outcomes=[], digest=digest)
        elif progress.next_index or progress.in_flight is not None:
            log.info(
                "directory channel %s: file %s: resuming at message %d of %d",
                settings.name,
                key,
                progress.next_index,
                total,
            )
        progress.digest = digest

        while progress.next_index < total:
            if not self._may_go_on():
                return None
            index = progress.next_index
            message = messages[index]
            identity = _identify(message)
            if progress.in_flight is not None and await self._published_earlier(progress, index):
                progress.outcomes.append(
                    MessageOutcome(index, identity.control_id, "AA", recovered=True)
                )
                log.info(
                    "directory channel %s: file %s: message %d was published by an "
                    "earlier owner; not sent again",
                    settings.name,
                    key,
                    index,
                )
                await self._advance(key, progress)
                continue
            progress.in_flight = index
            progress.in_flight_event_id = identity.event_id
            await self._progress.save(key, progress)

            ack = await self._process(message)
            summary = summarize_ack(key, index, ack)
            if summary.ack_code not in ACK_CODES:
                raise _BadAnswer(summary.problem or "the pipeline's answer has no MSA-1 code")
            codes = {err.get("code", "") for err in summary.errors}
            if summary.ack_code in _NOT_NOW and _UNAVAILABLE_ERR in codes:
                log.warning(
                    "directory channel %s: file %s: message %d of %d answered %s 207 (the "
                    "bridge cannot take it now); the file stays in the inbox and is retried "
                    "after %.1f s",
                    settings.name,
                    key,
                    index,
                    total,
                    summary.ack_code,
                    settings.poll_interval_s,
                )
                accepted = sum(1 for o in progress.outcomes if o.accepted)
                return FileReport(
                    key,
                    "deferred",
                    total,
                    accepted,
                    len(progress.outcomes) - accepted,
                    tuple(progress.outcomes),
                )
            progress.outcomes.append(
                MessageOutcome(
                    index,
                    identity.control_id,
                    summary.ack_code,
                    error=_error_text(summary.errors, summary.problem),
                )
            )
            await self._advance(key, progress)

        if not self._may_go_on():
            return None
        return await self._finish(path, key, progress.outcomes)

    async def _published_earlier(self, progress: FileProgress, index: int) -> bool:
        """The in-doubt check for message ``index``: True when an earlier owner's
        attempt reached Kafka. Clears ``in_flight`` when it does not apply."""
        in_flight, event_id = progress.in_flight, progress.in_flight_event_id
        if in_flight != index or event_id is None:
            progress.in_flight = progress.in_flight_event_id = None
            return False
        return await self._already_published(event_id)

    async def _advance(self, key: str, progress: FileProgress) -> None:
        """Move past the message whose outcome was just appended, and save.

        Saved even when ownership was lost while the pipeline worked: the outcome
        is known, and the store fences writes from an instance that is no longer
        the owner (a refused save raises, and the next owner's in-doubt check
        settles the message)."""
        progress.next_index = len(progress.outcomes)
        progress.in_flight = None
        progress.in_flight_event_id = None
        await self._progress.save(key, progress)

    async def _finish(
        self,
        path: Path,
        key: str,
        outcomes: list[MessageOutcome],
        *,
        problem: str | None = None,
    ) -> FileReport:
        """Write the report, move the file (done or error), then clear the progress."""
        settings = self._settings
        accepted = sum(1 for outcome in outcomes if outcome.accepted)
        failed = len(outcomes) - accepted
        ok = problem is None and failed == 0
        status: FileStatus = "done" if ok else "error"
        body: dict[str, Any] = {
            "file": path.name,
            "channel": settings.name,
            "messages": len(outcomes),
            "accepted": accepted,
            "failed": failed,
            "outcomes": [outcome.to_json() for outcome in outcomes],
            "finished": _now_rfc3339(self._clock()),
        }
        if problem is not None:
            body["problem"] = problem
        directory = settings.done_path if ok else settings.error_path
        destination = await asyncio.to_thread(_store, path, directory, body)
        await self._progress.clear(key)
        log_at = logging.INFO if ok else logging.WARNING
        log.log(
            log_at,
            "directory channel %s: file %s -> %s: %d messages, %d accepted, %d failed%s",
            settings.name,
            key,
            status,
            len(outcomes),
            accepted,
            failed,
            f" ({problem})" if problem else "",
        )
        return FileReport(
            key, status, len(outcomes), accepted, failed, tuple(outcomes), destination, problem
        )


def _store(path: Path, directory: Path, body: dict[str, Any]) -> Path:
    """Blocking: the report, then the file, into ``directory``; both durable."""
    directory.mkdir(parents=True, exist_ok=True)
    target = _free_name(directory, path.name)
    body = {**body, "stored_as": target.name}
    report = json.dumps(body, indent=2, ensure_ascii=False).encode("utf-8", "surrogateescape")
    _write_atomic(target.with_name(target.name + REPORT_SUFFIX), report + b"\n")
    _move(path, target)
    _fsync_dir(directory)
    _fsync_dir(path.parent)
    return target


def _belongs(progress: FileProgress, digest: str, total: int) -> bool:
    """Whether a saved progress is this file's (and consistent)."""
    if progress.digest is not None and progress.digest != digest:
        return False
    if not 0 <= progress.next_index <= total or len(progress.outcomes) != progress.next_index:
        return False
    return all(outcome.index == i for i, outcome in enumerate(progress.outcomes))


def _check(settings: DirectorySettings) -> None:
    if not settings.name:
        raise ConfigError("a directory channel needs a name", key="name")
    pattern = settings.pattern
    if not pattern or "/" in pattern or os.sep in pattern or "**" in pattern:
        raise ConfigError(
            "pattern must be a non-recursive file name glob (no '/', no '**')", key="pattern"
        )
    if settings.poll_interval_s <= 0:
        raise ConfigError("poll_interval_s must be positive", key="poll_interval_s")
    if settings.settle_s < 0:
        raise ConfigError("settle_s must not be negative", key="settle_s")
    inbox = settings.path.resolve()
    for key, directory in (("done_dir", settings.done_path), ("error_dir", settings.error_path)):
        if directory.resolve() == inbox:
            raise ConfigError(f"{key} must not be the inbox itself", key=key)
