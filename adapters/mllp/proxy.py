"""The PROXY protocol header a load balancer puts before an MLLP connection's bytes.

Behind HAProxy (``send-proxy``/``send-proxy-v2``) or a cloud load balancer with
proxy protocol on, the TCP peer of every connection is the balancer; the header it
sends first names the sender. The bridge reads it (v1 text or v2 binary, parsed by
the ``proxy-protocol`` library), so logs and DLQ records (``dlq_peer``) show the
sending system's address. A connection that does not start with a valid header is
refused: with this setting on, only the balancer may connect.
"""

from __future__ import annotations

from typing import Final

from proxyprotocol import ProxyProtocolIncompleteError, ProxyProtocolSyntaxError
from proxyprotocol.detect import ProxyProtocolDetect

_V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
_V1_PREFIX: Final = b"PROXY "
#: The longest v1 line the specification allows, CRLF included.
_V1_MAX: Final = 107
#: A v2 header's fixed part; its last two bytes give the length of the rest.
_V2_FIXED: Final = 16


class ProxyHeaderError(ValueError):
    """The connection did not start with a valid PROXY protocol header."""


class ProxyHeaderReader:
    """Collects a connection's first bytes until its PROXY header is complete."""

    def __init__(self) -> None:
        self._buffer = b""
        self._parser = ProxyProtocolDetect()

    def feed(self, data: bytes) -> tuple[tuple[str, int] | None, bytes] | None:
        """None while the header is incomplete; then the sender's (host, port), or None
        when the balancer speaks for itself (v2 LOCAL, v1 UNKNOWN: a health check), and
        the bytes after the header. Raises ProxyHeaderError for anything else."""
        buffer = self._buffer + data
        length = _header_length(buffer)
        if length is None:
            self._buffer = buffer
            return None
        try:
            result = self._parser.unpack(buffer[:length])
        except (ProxyProtocolSyntaxError, ProxyProtocolIncompleteError, ValueError) as exc:
            raise ProxyHeaderError(f"invalid PROXY header: {type(exc).__name__}") from None
        self._buffer = b""
        peer = result.peername if result.proxied else None
        if isinstance(peer, tuple) and len(peer) >= 2:
            return (str(peer[0]), int(peer[1])), buffer[length:]
        return None, buffer[length:]


def _header_length(buffer: bytes) -> int | None:
    """The header's length in bytes, None if more bytes are needed to tell."""
    if buffer.startswith(_V2_SIGNATURE):
        if len(buffer) < _V2_FIXED:
            return None
        length = _V2_FIXED + int.from_bytes(buffer[14:16], "big")
        return length if len(buffer) >= length else None
    if _V2_SIGNATURE.startswith(buffer) and len(buffer) < len(_V2_SIGNATURE):
        return None
    if buffer.startswith(_V1_PREFIX):
        end = buffer.find(b"\r\n", 0, _V1_MAX)
        if end >= 0:
            return end + 2
        if len(buffer) >= _V1_MAX:
            raise ProxyHeaderError("PROXY v1 line longer than 107 bytes")
        return None
    if _V1_PREFIX.startswith(buffer):
        return None
    raise ProxyHeaderError("no PROXY protocol header")
