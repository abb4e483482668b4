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
evicted first; about 200 bytes per remembered message, so the default 200,000
entries hold ~40 MB per ingest). Across instances the deterministic ``ce_id``
lets consumers drop what a load balancer sent to two instances.
"""

from __future__ import annotations

import asyncio
import hashlib
import struct
import time
from collections import OrderedDict
from collections.abc import Callable

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


#: A remembered message: the time it is forgotten, then its ack code (ASCII).
_EXPIRY = struct.Struct("<d")
_FINGERPRINT_BYTES = 16


def _identity(key: DedupeKey) -> bytes:
    """16 bytes for (sender, control id): a remembered message costs ~200 bytes, not
    the ~540 of keeping the strings, tuples and floats as Python objects."""
    sender, control_id = key
    digest = hashlib.blake2b(digest_size=16)
    digest.update(sender.encode("utf-8", "surrogatepass"))
    digest.update(b"\x1f")
    digest.update(control_id.encode("utf-8", "surrogatepass"))
    return digest.digest()


def _pack(expires_at: float, ack_code: str) -> bytes:
    return _EXPIRY.pack(expires_at) + ack_code.encode("ascii")


def _expires_at(packed: bytes) -> float:
    return float(_EXPIRY.unpack_from(packed)[0])


def _ack_code(packed: bytes) -> str:
    return packed[_EXPIRY.size :].decode("ascii")


class DuplicateFilter:
    """Remembers accepted messages for ``window_s``; coalesces in-flight resends.

    Memory: each remembered message is two bytes objects in an ordered dict,
    keyed by a digest of (sender, control id): the latest accepted content of
    every control id with its expiry and ack code. Content that a control id
    reuse superseded is kept apart until it expires (rare: senders resetting
    their counters), so a resend of it is still answered as a duplicate.
    """

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
        #: identity → fingerprint + expiry + ack code of its latest accepted content.
        self._latest: OrderedDict[bytes, bytes] = OrderedDict()
        #: identity + fingerprint → expiry + ack code, for superseded content.
        self._superseded: OrderedDict[bytes, bytes] = OrderedDict()
        self._pending: dict[tuple[str, str, bytes], asyncio.Future[str | None]] = {}

    @property
    def enabled(self) -> bool:
        return self._window_s > 0 and self._max_entries > 0

    def __len__(self) -> int:
        return len(self._latest) + len(self._superseded)

    def lookup(self, key: DedupeKey, fingerprint: bytes) -> str | None:
        """The ack code given to an identical earlier message, if within the window."""
        identity = _identity(key)
        latest = self._latest.get(identity)
        if latest is not None and latest[:_FINGERPRINT_BYTES] == fingerprint:
            packed = latest[_FINGERPRINT_BYTES:]
        else:
            found = self._superseded.get(identity + fingerprint)
            if found is None:
                return None
            packed = found
        if _expires_at(packed) <= self._clock():
            return None
        return _ack_code(packed)

    def reused(self, key: DedupeKey, fingerprint: bytes) -> bool:
        """True when the control id was accepted, within the window, with other content."""
        latest = self._latest.get(_identity(key))
        if latest is None or latest[:_FINGERPRINT_BYTES] == fingerprint:
            return False
        return _expires_at(latest[_FINGERPRINT_BYTES:]) > self._clock()

    def pending(self, key: DedupeKey, fingerprint: bytes) -> asyncio.Future[str | None] | None:
        """The in-flight attempt of the same message, if there is one."""
        return self._pending.get((*key, fingerprint))

    def begin(self, key: DedupeKey, fingerprint: bytes) -> asyncio.Future[str | None]:
        future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._pending[(*key, fingerprint)] = future
        return future

    def finish(self, key: DedupeKey, fingerprint: bytes, ack_code: str | None) -> None:
        """End an attempt; remember it if accepted (``ack_code`` not None)."""
        future = self._pending.pop((*key, fingerprint), None)
        if future is not None and not future.done():
            future.set_result(ack_code)
        if ack_code is None or not self.enabled:
            return
        now = self._clock()
        identity = _identity(key)
        earlier = self._latest.pop(identity, None)
        if earlier is not None and earlier[:_FINGERPRINT_BYTES] != fingerprint:
            packed = earlier[_FINGERPRINT_BYTES:]
            if _expires_at(packed) > now:  # reuse: the earlier content stays remembered
                self._superseded[identity + earlier[:_FINGERPRINT_BYTES]] = packed
        self._superseded.pop(identity + fingerprint, None)
        self._latest[identity] = fingerprint + _pack(now + self._window_s, ack_code)
        self._evict(now)

    def _evict(self, now: float) -> None:
        """Drop expired entries, then the oldest (superseded content first) over the bound."""
        for entries, offset in ((self._superseded, 0), (self._latest, _FINGERPRINT_BYTES)):
            while entries:
                identity, packed = next(iter(entries.items()))
                if _expires_at(packed[offset:]) > now:
                    break
                del entries[identity]
        while len(self) > self._max_entries:
            (self._superseded or self._latest).popitem(last=False)
