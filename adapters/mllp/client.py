"""Asyncio MLLP client: send one frame, wait for exactly one reply frame.

Used by ``hl7bridge send``, the benchmark and the tests. Replies are decoded with
the same :class:`~adapters.mllp.codec.MLLPDecoder` as the server uses, so a reply
split over several reads, or merged with garbage, is still one reply; nothing here
hopes that one ``recv()`` holds one ACK.

MLLP matches replies to requests by position only. After a send times out or is
cancelled, a late reply would be taken for the next message's ACK, so the client
closes the connection instead; later sends raise :class:`ConnectionError`.
Reconnecting is the caller's decision (it may want a back-off).
"""

from __future__ import annotations

import asyncio
import logging
import ssl as ssl_module
from typing import Final, cast

from bridge.errors import LifecycleError, MessageTooLarge

from .codec import DEFAULT_MAX_FRAME_BYTES, Frame, FrameTooLarge, MLLPDecoder, encode_frame

__all__ = ["MLLPClient"]

logger = logging.getLogger(__name__)

_CLOSE_GRACE_S: Final = 5.0
"""How long close() lets the transport flush before aborting it."""


class _ClientProtocol(asyncio.Protocol):
    """Feeds received bytes to the decoder and resolves the one waiting send()."""

    def __init__(self, peer: str, max_frame_bytes: int, loop: asyncio.AbstractEventLoop) -> None:
        self.peer = peer
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[bytes] | None = None
        self.closed = False
        self.lost: asyncio.Future[None] = loop.create_future()
        self._decoder = MLLPDecoder(max_frame_bytes)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they implement it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        for event in self._decoder.feed(data):
            if isinstance(event, Frame):
                self._resolve(event.payload, None)
            elif isinstance(event, FrameTooLarge):
                self._resolve(
                    None,
                    MessageTooLarge(
                        f"MLLP reply from {self.peer} exceeds max_frame_bytes={event.limit}"
                    ),
                )
            else:
                logger.debug("MLLP skipped %d bytes from %s", event.byte_count, self.peer)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        partial = self._decoder.eof()
        error = ConnectionError(
            f"MLLP connection to {self.peer} closed before the reply arrived"
            + (f" ({len(partial)} bytes of a partial reply received)" if partial else "")
        )
        error.__cause__ = exc
        self._resolve(None, error)
        if not self.lost.done():
            self.lost.set_result(None)

    def _resolve(self, reply: bytes | None, error: BaseException | None) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is None or waiter.done():
            if reply is not None:
                logger.warning("MLLP unsolicited reply frame from %s; ignored", self.peer)
            return
        if error is not None:
            waiter.set_exception(error)
        else:
            assert reply is not None
            waiter.set_result(reply)


class MLLPClient:
    """One MLLP connection to a server; messages are sent one at a time.

    Either ``client = await MLLPClient.connect(host, port)`` or
    ``async with MLLPClient(host, port) as client:``. Concurrent :meth:`send` calls
    are serialized, since MLLP has no way to tell interleaved replies apart.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        timeout_s: float = 10.0,
        ssl: ssl_module.SSLContext | None = None,
        server_hostname: str | None = None,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    ) -> None:
        self.host = host
        self.port = port
        self._connect_timeout_s = timeout_s
        self._ssl = ssl
        self._server_hostname = server_hostname
        self._max_frame_bytes = max_frame_bytes
        self._protocol: _ClientProtocol | None = None
        self._lock = asyncio.Lock()
        self._opened = False

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        timeout_s: float = 10.0,
        ssl: ssl_module.SSLContext | None = None,
        server_hostname: str | None = None,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    ) -> MLLPClient:
        """Open a connection; raise TimeoutError or OSError if it cannot be opened."""
        client = cls(
            host,
            port,
            timeout_s=timeout_s,
            ssl=ssl,
            server_hostname=server_hostname,
            max_frame_bytes=max_frame_bytes,
        )
        await client.open()
        return client

    async def __aenter__(self) -> MLLPClient:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def peer(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_connected(self) -> bool:
        protocol = self._protocol
        return (
            protocol is not None
            and not protocol.closed
            and protocol.transport is not None
            and not protocol.transport.is_closing()
        )

    async def open(self) -> None:
        """Connect (once per client: a second call raises LifecycleError)."""
        if self._opened:
            raise LifecycleError("MLLPClient.open() called twice; create a new client")
        self._opened = True
        loop = asyncio.get_running_loop()
        peer = self.peer
        max_frame_bytes = self._max_frame_bytes
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                _, protocol = await loop.create_connection(
                    lambda: _ClientProtocol(peer, max_frame_bytes, loop),
                    self.host,
                    self.port,
                    ssl=self._ssl,
                    server_hostname=self._server_hostname if self._ssl is not None else None,
                )
        except TimeoutError:
            raise TimeoutError(
                f"MLLP connect to {peer} timed out after {self._connect_timeout_s} s"
            ) from None
        self._protocol = protocol

    async def send(self, payload: bytes, *, timeout_s: float | None = 30.0) -> bytes:
        """Send one message and return its reply payload (unframed).

        Raises TimeoutError if no reply came within ``timeout_s`` (the connection is
        then closed), ConnectionError if the connection is or gets closed, and
        :class:`~bridge.errors.MessageTooLarge` if the reply exceeds max_frame_bytes.
        """
        async with self._lock:
            protocol = self._protocol
            if protocol is None:
                raise LifecycleError("MLLPClient.send() before open()")
            transport = protocol.transport
            if protocol.closed or transport is None or transport.is_closing():
                raise ConnectionError(f"MLLP connection to {self.peer} is closed")
            waiter: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
            protocol.waiter = waiter
            transport.write(encode_frame(payload))
            try:
                async with asyncio.timeout(timeout_s):
                    return await waiter
            except TimeoutError:
                transport.abort()
                raise TimeoutError(
                    f"no MLLP reply from {self.peer} within {timeout_s} s; connection closed"
                ) from None
            except asyncio.CancelledError:
                transport.abort()  # a late reply must not answer the next message
                raise

    async def close(self) -> None:
        """Close the connection, letting written bytes flush briefly. Idempotent."""
        protocol = self._protocol
        if protocol is None or protocol.transport is None:
            return
        transport = protocol.transport
        if not transport.is_closing():
            transport.close()
        try:
            async with asyncio.timeout(_CLOSE_GRACE_S):
                await asyncio.shield(protocol.lost)
        except TimeoutError:
            transport.abort()
