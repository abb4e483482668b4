"""Reading HL7 v2 messages out of files as testers and analysts keep them.

A file may hold one message or many, with CR, LF or CRLF line ends, a UTF-8
BOM, MLLP framing bytes, or an FHS/BHS batch envelope. Each message starts at a
line that begins with ``MSH`` followed by its field separator.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from adapters.mllp.codec import END_BLOCK, START_BLOCK, Frame, MLLPDecoder
from bridge.errors import ConfigError

_BOM = b"\xef\xbb\xbf"
_NEWLINES = re.compile(rb"\r\n|\n|\r")
#: Batch envelope segments: they wrap messages but are not part of any.
_ENVELOPE = (b"FHS", b"BHS", b"BTS", b"FTS")


def split_messages(data: bytes) -> list[bytes]:
    """The messages in a file's bytes, each CR-separated, without framing."""
    if START_BLOCK in data and END_BLOCK in data:
        decoder = MLLPDecoder(max_frame_bytes=max(len(data), 1024))
        frames = [e.payload for e in decoder.feed(data) if isinstance(e, Frame)]
        unterminated = decoder.eof()  # a last frame without FS is still a message
        if unterminated:
            frames.append(unterminated)
        return [m for frame in frames for m in split_messages(frame)]
    messages: list[list[bytes]] = []
    for line in _NEWLINES.split(data.replace(_BOM, b"")):
        if not line.strip():
            continue
        if line.startswith(_ENVELOPE) and len(line) > 3 and line[3:4] in (b"|", b"^"):
            continue
        if line.startswith(b"MSH") and len(line) > 3:
            messages.append([line])
        elif messages:
            messages[-1].append(line)
        # Lines before the first MSH are not part of a message: ignored.
    return [b"\r".join(segments) + b"\r" for segments in messages]


def read_files(paths: Sequence[Path]) -> list[tuple[str, list[bytes]]]:
    """Each file's messages. Raises :class:`ConfigError` naming a file that cannot be
    read or holds no HL7 v2 message: a usage error, found before anything is printed."""
    batches: list[tuple[str, list[bytes]]] = []
    for path in paths:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}", key="file") from exc
        messages = split_messages(data)
        if not messages:
            raise ConfigError(f"{path} holds no HL7 v2 message (no MSH segment)", key="file")
        batches.append((str(path), messages))
    return batches
