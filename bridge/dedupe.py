"""Duplicate detection for resent messages: same sender, same control id, same content.

HL7 v2 senders resend a message when they did not see its ACK (a timeout, a
dropped connection). The resend carries the same MSH-10; it must be answered
like the original and not published twice.

Two deliberate choices:

* The identity is (sender, control id), but a *different* message body under a
  control id seen before is **not** treated as a duplicate: some senders reset
  their counters on restart, and dropping a new message as a "duplicate" would
  lose data silently. The fingerprint covers the whole message but MSH-7, so a
  resend with a fresh MSH-7 timestamp still counts as the same message.
* A message still in flight (published, Kafka not yet acknowledged) is
  "pending": a resend of it waits for the first attempt's outcome instead of
  publishing a second copy.

The window is per instance (in memory, bounded by ``max_entries``, oldest
evicted first). Across instances the deterministic ``ce_id`` lets consumers drop
what a load balancer sent to two instances.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple

DedupeKey = tuple[str, str]


def content_fingerprint(text: str) -> bytes:
    """Digest of the whole message except MSH-7, which senders refresh on a resend."""
    msh, _, body = text.partition("\r")
    separator = msh[3:4]
    fields = msh.split(separator) if separator else [msh]
    if len(fields) > 6:
        fields[6] = ""  # MSH-7 (index 6: MSH-1 is the separator itself)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(separator.join(fields).encode("utf-8", "surrogatepass"))
    digest.update(b"\r")
    digest.update(body.encode("utf-8", "surrogatepass"))
    return digest.digest()


class _Entry(NamedTuple):
    # A tuple of atomic values: the garbage collector stops tracking it, so a
    # window of 200,000 remembered messages adds nothing to each full collection.
    ack_code: str
    expires_at: float


class DuplicateFilter:
    """Remembers accepted messages for ``window_s``; coalesces in-flight resends."""

    def __init__(
        self,
        *,
        window_s: float,
        max_entries: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._window_s = window_s
        self._max_entries = max_entries
        self._clock = clock
        self._seen: OrderedDict[tuple[str, str, bytes], _Entry] = OrderedDict()
        #: The latest fingerprint accepted per control id, to notice reuse.
        self._latest: dict[DedupeKey, bytes] = {}
        self._pending: dict[tuple[str, str, bytes], asyncio.Future[str | None]] = {}

    @property
    def enabled(self) -> bool:
        return self._window_s > 0 and self._max_entries > 0

    def __len__(self) -> int:
        return len(self._seen)

    def lookup(self, key: DedupeKey, fingerprint: bytes) -> str | None:
        """The ack code given to an identical earlier message, if within the window."""
        entry = self._seen.get((*key, fingerprint))
        if entry is None or entry.expires_at <= self._clock():
            return None
        return entry.ack_code

    def reused(self, key: DedupeKey, fingerprint: bytes) -> bool:
        """True when the control id was accepted, within the window, with other content."""
        latest = self._latest.get(key)
        if latest is None or latest == fingerprint:
            return False
        entry = self._seen.get((*key, latest))
        return entry is not None and entry.expires_at > self._clock()

    def pending(self, key: DedupeKey, fingerprint: bytes) -> asyncio.Future[str | None] | None:
        """The in-flight attempt of the same message, if there is one."""
        return self._pending.get((*key, fingerprint))

    def begin(self, key: DedupeKey, fingerprint: bytes) -> asyncio.Future[str | None]:
        future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._pending[(*key, fingerprint)] = future
        return future

    def finish(self, key: DedupeKey, fingerprint: bytes, ack_code: str | None) -> None:
        """End an attempt; remember it if accepted (``ack_code`` not None)."""
        full = (*key, fingerprint)
        future = self._pending.pop(full, None)
        if future is not None and not future.done():
            future.set_result(ack_code)
        if ack_code is None or not self.enabled:
            return
        self._seen[full] = _Entry(ack_code, self._clock() + self._window_s)
        self._seen.move_to_end(full)
        self._latest[key] = fingerprint
        self._evict()

    def _evict(self) -> None:
        now = self._clock()
        while self._seen:
            full, entry = next(iter(self._seen.items()))
            if len(self._seen) > self._max_entries or entry.expires_at <= now:
                del self._seen[full]
                sender, control_id, fingerprint = full
                if self._latest.get((sender, control_id)) == fingerprint:
                    del self._latest[(sender, control_id)]
            else:
                break
