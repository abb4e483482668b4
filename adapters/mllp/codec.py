"""MLLP framing as a pure codec: feed bytes in, get events out; no sockets, no asyncio.

MLLP (HL7 v2 Minimal Lower Layer Protocol) wraps each message as::

    <VT> payload <FS><CR>        VT = 0x0B, FS = 0x1C, CR = 0x0D

Keeping the codec free of I/O (as h11 does for HTTP/1.1) lets the server, the
client and the tests drive it identically, and lets hypothesis fuzz it without a
socket in sight. The framing bytes are defined here and nowhere else.

Choices where senders differ from the standard, made to keep talking rather than
to drop a connection (an integration engine's job is to accept what it can):

* ``FS`` ends the frame whether or not ``CR`` follows. Some senders omit the
  trailing CR; HL7 payloads never contain FS, so FS alone is unambiguous. The
  byte after FS, if not CR, is decoded as outside a frame (a VT starts the next
  frame; anything else is skipped as garbage).
* An FS that is the last byte of a read completes its frame at once rather than
  waiting for the next byte: a CR-less sender sends nothing more until it has its
  ACK, so waiting would deadlock it. A CR that then starts the next read is
  swallowed as that frame's trailer, not reported as garbage.
* A ``VT`` inside a frame means the sender gave up on the frame and started again:
  the abandoned bytes (its VT and payload so far) are reported as
  :class:`GarbageSkipped` and decoding restarts at the new VT. This also applies
  while an oversized frame is being discarded: its remainder is dropped and the
  new frame is decoded normally.
* Bytes outside a frame (before a VT) are skipped and reported, never buffered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, TypeAlias

__all__ = [
    "CARRIAGE_RETURN",
    "DEFAULT_MAX_FRAME_BYTES",
    "END_BLOCK",
    "HEAD_BYTES",
    "START_BLOCK",
    "DecodedEvent",
    "Frame",
    "FrameTooLarge",
    "GarbageSkipped",
    "MLLPDecoder",
    "encode_frame",
]

START_BLOCK: Final = b"\x0b"
"""VT: starts a frame."""
END_BLOCK: Final = b"\x1c"
"""FS: ends a frame's payload."""
CARRIAGE_RETURN: Final = b"\x0d"
"""CR: follows FS to close the frame."""

_TRAILER: Final = END_BLOCK + CARRIAGE_RETURN
_VT: Final = START_BLOCK[0]
_CR: Final = CARRIAGE_RETURN[0]

DEFAULT_MAX_FRAME_BYTES: Final = 1024 * 1024
"""Largest payload accepted in one frame (1 MiB).

Real HL7 v2 messages carrying embedded documents (ED / base64 PDFs in OBX-5) run
to hundreds of KB, so the limit must sit well above that; 1 MiB per connection
bounds the worst-case buffering at ~32 MiB for 32 connections and ~1 GiB at the
1000-connection default, which a bridge host can survive.
"""

HEAD_BYTES: Final = 4096
"""How much of an oversized frame is kept so the caller can still read MSH and
answer it: MSH is the first segment and is far below 4 KiB in practice."""


@dataclass(frozen=True, slots=True)
class Frame:
    """A complete frame's payload, without VT / FS / CR."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class FrameTooLarge:
    """A frame's payload grew past ``limit`` bytes; emitted once per such frame.

    ``head`` is the first ``min(HEAD_BYTES, limit + 1)`` bytes of the payload,
    enough to parse MSH and build a rejecting ACK. The rest of the frame is
    discarded. A frame abandoned by a restarting VT after it outgrew the limit is
    reported here too, not as garbage.
    """

    head: bytes
    limit: int


@dataclass(frozen=True, slots=True)
class GarbageSkipped:
    """``byte_count`` bytes that were not part of any complete frame were dropped."""

    byte_count: int


DecodedEvent: TypeAlias = Frame | FrameTooLarge | GarbageSkipped


def encode_frame(payload: bytes) -> bytes:
    """Wrap ``payload`` as one MLLP frame: VT + payload + FS + CR."""
    return START_BLOCK + payload + _TRAILER


class MLLPDecoder:
    """Incremental MLLP decoder; keeps at most one frame's payload buffered.

    Each byte is searched for a bounded number of times (``bytes.find`` from the
    last scanned position), so feeding many small chunks is linear in the total,
    and the buffer is trimmed once per :meth:`feed`, not once per frame.
    """

    __slots__ = (
        "_buf",
        "_expect_cr",
        "_head_bytes",
        "_in_frame",
        "_max_frame_bytes",
        "_oversized",
        "_scan",
    )

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        if max_frame_bytes <= 0:
            raise ValueError("max_frame_bytes must be positive")
        self._max_frame_bytes = max_frame_bytes
        # limit + 1 bytes are always at hand when a frame is found too large, so a
        # head of that length (capped) does not depend on how reads were split.
        self._head_bytes = min(HEAD_BYTES, max_frame_bytes + 1)
        self._buf = bytearray()
        # Between feeds the buffer holds only the open frame's payload (from index
        # 0, its VT already consumed) or nothing. _scan is where the next search
        # resumes: everything before it is known to hold neither FS nor VT.
        self._in_frame = False
        self._oversized = False
        self._scan = 0
        # The last read ended with a frame's FS; a CR starting the next read is
        # that frame's, not garbage.
        self._expect_cr = False

    @property
    def max_frame_bytes(self) -> int:
        return self._max_frame_bytes

    @property
    def buffered_bytes(self) -> int:
        """Bytes held for the frame being received (for memory metrics)."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[DecodedEvent]:
        """Consume ``data`` and return the events it completes, in stream order."""
        if not data:
            return []
        buf = self._buf
        buf += data
        events: list[DecodedEvent] = []
        pos = 0  # first byte not consumed yet
        scan = self._scan
        if self._expect_cr:
            # The previous read ended right after an FS: its CR is no garbage.
            self._expect_cr = False
            if buf[0] == _CR:
                pos = scan = 1
        expect_cr = False
        end = len(buf)
        limit = self._max_frame_bytes
        head = self._head_bytes
        in_frame = self._in_frame
        oversized = self._oversized
        with memoryview(buf) as view:
            while pos < end:
                if not in_frame:
                    vt = buf.find(_VT, pos)
                    if vt < 0:
                        events.append(GarbageSkipped(end - pos))
                        pos = scan = end
                        break
                    if vt > pos:
                        events.append(GarbageSkipped(vt - pos))
                    pos = scan = vt + 1
                    in_frame = True
                    oversized = False
                    continue

                # In a frame whose payload starts at pos.
                fs = buf.find(END_BLOCK, scan)
                stop = fs if fs >= 0 else end
                vt = buf.find(_VT, scan, stop)
                if vt >= 0:
                    # Sender restarted: the old frame (its VT at pos - 1) is abandoned.
                    # One that already outgrew the limit is reported as too large
                    # whether or not the VT arrived in the same read.
                    if oversized:
                        pass
                    elif vt - pos > limit:
                        events.append(FrameTooLarge(bytes(view[pos : pos + head]), limit))
                    else:
                        events.append(GarbageSkipped(vt - pos + 1))
                    pos = scan = vt + 1
                    oversized = False
                    continue

                if fs < 0:
                    if not oversized and end - pos > limit:
                        events.append(FrameTooLarge(bytes(view[pos : pos + head]), limit))
                        oversized = True
                    if oversized:
                        pos = end  # discard, keep nothing of this frame
                    scan = end
                    break

                if not oversized:
                    if fs - pos > limit:
                        events.append(FrameTooLarge(bytes(view[pos : pos + head]), limit))
                    else:
                        events.append(Frame(bytes(view[pos:fs])))
                in_frame = False
                oversized = False
                if fs + 1 == end:
                    pos = scan = end
                    expect_cr = True
                else:
                    pos = scan = fs + 2 if buf[fs + 1] == _CR else fs + 1

        del buf[:pos]
        self._scan = scan - pos
        self._in_frame = in_frame
        self._oversized = oversized
        self._expect_cr = expect_cr
        return events

    def eof(self) -> bytes | None:
        """Signal end of stream; return the payload of an unterminated frame, if any.

        ``None`` means no frame was open (or the open one was already reported as
        :class:`FrameTooLarge`); ``b""`` means a VT arrived with nothing after it.
        The decoder is reset and can be reused.
        """
        partial: bytes | None = None
        if self._in_frame and not self._oversized:
            partial = bytes(self._buf[: self._scan])
        self._buf.clear()
        self._scan = 0
        self._in_frame = False
        self._oversized = False
        self._expect_cr = False
        return partial
