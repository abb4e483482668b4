"""Asyncio MLLP server: one :class:`asyncio.Protocol` per connection, the codec inside.

The server only deals in bytes: it frames and unframes, keeps per-connection order,
bounds memory, time and connections, and asks a :class:`FrameHandler` for every
answer. What an answer says (AA/AE/AR, MSA, ERR) is the handler's business.

Guarantees, from DESIGN.md §5 ("never close a socket without an answer to a
complete frame"):

* Frames on one connection are handled one at a time, in order, and their replies
  are written in that order: MLLP senders match ACKs by position.
* Every complete frame gets a reply while the connection is open: the handler's,
  or :meth:`FrameHandler.reject_frame`'s when the frame is too large, the handler
  raised, the connection is over the limit, or the server is shutting down.
* Memory per connection is bounded: at most ``max_frame_bytes`` in the decoder and
  ``max_queued_frames`` frames waiting; beyond that reading is paused.
* Memory across connections is bounded too: when the frames waiting on all
  connections reach ``max_queued_bytes``, each connection that receives another
  frame pauses reading (TCP backpressure reaches the senders) until the backlog is
  down to half.

Shutdown order (:meth:`MLLPServer.stop`), written once here:

1. stop accepting (close the listening sockets);
2. frames already received are handled and answered, for up to
   ``drain_timeout_s``; frames that arrive meanwhile get ``SHUTTING_DOWN``;
3. frames still unanswered at the deadline are answered with ``SHUTTING_DOWN``
   and their handlers cancelled;
4. transports are closed (pending replies flushed), then aborted if the peer does
   not read them within a short grace.

Logs carry peers, counts and sizes, never payload bytes: payloads are patient data.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import ssl as ssl_module
from collections import deque
from dataclasses import dataclass
from typing import Final, Protocol, cast

from bridge.errors import LifecycleError, describe_failure

from .codec import (
    DEFAULT_MAX_FRAME_BYTES,
    HEAD_BYTES,
    Frame,
    FrameTooLarge,
    GarbageSkipped,
    MLLPDecoder,
    encode_frame,
)
from .proxy import ProxyHeaderError, ProxyHeaderReader

__all__ = [
    "FrameHandler",
    "MLLPServer",
    "MLLPServerSettings",
    "RejectReason",
]

logger = logging.getLogger(__name__)

_CLOSE_GRACE_S: Final = 2.0
"""How long stop() lets closing transports flush replies before aborting them: a
peer that stopped reading must not hold shutdown hostage."""

_CANCEL_GRACE_S: Final = 1.0
"""How long stop() waits for cancelled handlers to unwind after the drain deadline."""


class RejectReason(enum.StrEnum):
    """Why a frame is answered by :meth:`FrameHandler.reject_frame` (also a metric label)."""

    TOO_LARGE = "too_large"
    TOO_MANY_CONNECTIONS = "too_many_connections"
    SHUTTING_DOWN = "shutting_down"
    HANDLER_FAILED = "handler_failed"


class FrameHandler(Protocol):
    """What the server asks for every answer; it builds ACKs, the server moves bytes."""

    async def handle_frame(self, payload: bytes, peer: str) -> bytes:
        """Process one complete frame; return the reply payload (an ACK), unframed."""
        ...

    def reject_frame(self, head: bytes, reason: RejectReason) -> bytes:
        """Answer a frame without processing it; synchronous and cheap.

        ``head`` is the first up to 4096 bytes of the frame's payload (enough for MSH).
        """
        ...


@dataclass(frozen=True, slots=True)
class MLLPServerSettings:
    """Listener settings; every limit carries its unit in its name."""

    host: str = "127.0.0.1"
    port: int = 2575
    """TCP port; 0 binds any free port (read it back from :attr:`MLLPServer.port`)."""
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    idle_timeout_s: float = 300.0
    """Close a connection that received nothing and had nothing in flight this long."""
    max_connections: int = 1000
    drain_timeout_s: float = 10.0
    """How long stop() lets frames already received finish."""
    ssl: ssl_module.SSLContext | None = None
    max_queued_frames: int = 64
    """Frames waiting per connection before reading is paused. Well-behaved senders
    wait for each ACK, so this only bites pipelining senders; 64 keeps them busy
    without letting one connection buffer unbounded frames."""
    max_queued_bytes: int = 64 * 1024 * 1024
    """Bytes of received frames waiting to be handled, across all connections. Past
    it, every connection that receives a frame pauses reading until the backlog is
    half that again: memory stays bounded however many senders push at once."""
    over_limit_wait_s: float = 5.0
    """How long a connection over ``max_connections`` may take to send the frame we
    answer with TOO_MANY_CONNECTIONS before it is closed unanswered."""
    proxy_protocol: bool = False
    """Every connection starts with a PROXY protocol v1/v2 header (from a load
    balancer); the sender it names becomes the connection's peer. Without one the
    connection is closed."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be between 0 and 65535, got {self.port}")
        for name in ("max_frame_bytes", "max_connections", "max_queued_frames", "max_queued_bytes"):
            value = getattr(self, name)
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        for name in ("idle_timeout_s", "drain_timeout_s", "over_limit_wait_s"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive finite number, got {value}")


def _format_peer(peername: object) -> str:
    if isinstance(peername, tuple) and len(peername) >= 2:
        host, port = peername[0], peername[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peername) if peername else "unknown"


# A queued frame: its payload (or head), and the reason to reject it, or None to
# hand it to the handler.
_Work = tuple[bytes, RejectReason | None]


class _Connection(asyncio.Protocol):
    """One MLLP connection: decode, queue, answer in order, enforce limits.

    No task exists while the connection is quiet; one is started when a frame
    arrives and ends when the queue is empty, so idle connections cost only memory.
    """

    def __init__(self, server: MLLPServer, loop: asyncio.AbstractEventLoop) -> None:
        self._server = server
        self._settings = server.settings
        self._loop = loop
        self._decoder = MLLPDecoder(self._settings.max_frame_bytes)
        self._transport: asyncio.Transport | None = None
        self.peer = "unknown"
        self._queue: deque[_Work] = deque()
        self.worker: asyncio.Task[None] | None = None
        self._current: _Work | None = None
        self._reading_paused = False
        self._writing_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._last_activity = 0.0
        self._over_limit = False
        self._peer_eof = False
        self._abandoned = False  # stop() answered everything; write nothing more
        self._lost = False
        self._proxy = ProxyHeaderReader() if self._settings.proxy_protocol else None

    # -- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they implement it.
        self._transport = cast(asyncio.Transport, transport)
        self.peer = _format_peer(transport.get_extra_info("peername"))
        server = self._server
        server.connections_total += 1
        self._last_activity = self._loop.time()
        if server.shutting_down:
            logger.info("MLLP connection from %s refused: shutting down", self.peer)
            self._lost = True  # not tracked anywhere; connection_lost has nothing to undo
            transport.close()
            return
        if len(server._connections) >= self._settings.max_connections:
            server.connections_rejected += 1
            if len(server._rejecting) >= self._settings.max_connections:
                # Even the connections waiting to be told "too many" are too many.
                logger.warning(
                    "MLLP connection from %s closed at once: %d connections open, "
                    "%d more waiting for a rejection",
                    self.peer,
                    len(server._connections),
                    len(server._rejecting),
                )
                self._lost = True
                transport.close()
                return
            logger.warning(
                "MLLP connection from %s over max_connections=%d; will reject its first frame",
                self.peer,
                self._settings.max_connections,
            )
            self._over_limit = True
            server._rejecting.add(self)
            self._timer = self._loop.call_later(
                self._settings.over_limit_wait_s, self._on_over_limit_timeout
            )
            return
        server._connections.add(self)
        logger.debug("MLLP connection from %s (%d open)", self.peer, len(server._connections))
        self._timer = self._loop.call_later(self._settings.idle_timeout_s, self._on_idle_timer)

    def data_received(self, data: bytes) -> None:
        self._last_activity = self._loop.time()
        if self._abandoned:
            return
        if self._proxy is not None:
            rest = self._read_proxy_header(data)
            if not rest:
                return
            data = rest
        events = self._decoder.feed(data)
        if not events:
            return
        server = self._server
        queue = self._queue
        for event in events:
            if isinstance(event, Frame):
                server.frames_received += 1
                if self._over_limit:
                    self._reject_over_limit(event.payload[:HEAD_BYTES])
                    return
                reason = RejectReason.SHUTTING_DOWN if server.shutting_down else None
                queue.append((event.payload, reason))
                server.queued_bytes += len(event.payload)
            elif isinstance(event, FrameTooLarge):
                server.frames_received += 1
                logger.warning(
                    "MLLP frame from %s exceeds max_frame_bytes=%d; rejecting it",
                    self.peer,
                    event.limit,
                )
                if self._over_limit:
                    self._reject_over_limit(event.head)
                    return
                queue.append((event.head, RejectReason.TOO_LARGE))
                server.queued_bytes += len(event.head)
            elif isinstance(event, GarbageSkipped):
                server.garbage_bytes += event.byte_count
                logger.debug(
                    "MLLP skipped %d bytes outside a frame from %s", event.byte_count, self.peer
                )
        if queue:
            if self.worker is None:
                self.worker = self._loop.create_task(self._run())
                server._track_worker(self.worker)
            over_local = len(queue) >= self._settings.max_queued_frames
            over_global = server.queued_bytes >= self._settings.max_queued_bytes
            if (over_local or over_global) and not self._reading_paused:
                assert self._transport is not None
                self._reading_paused = True
                self._transport.pause_reading()
                if over_global:
                    server._paused_for_backlog.add(self)
                logger.debug("MLLP reading paused for %s: %d frames queued", self.peer, len(queue))

    def _read_proxy_header(self, data: bytes) -> bytes:
        """Consume the PROXY header; the bytes after it (b"" while it is incomplete)."""
        assert self._proxy is not None
        try:
            done = self._proxy.feed(data)
        except ProxyHeaderError as exc:
            logger.warning("MLLP connection from %s closed: %s", self.peer, exc)
            self._abandoned = True
            if self._transport is not None:
                self._transport.close()
            return b""
        if done is None:
            return b""
        self._proxy = None
        source, rest = done
        if source is not None:
            proxy, self.peer = self.peer, _format_peer(source)
            logger.debug("MLLP connection from %s via %s", self.peer, proxy)
        return rest

    def eof_received(self) -> bool | None:
        self._peer_eof = True
        if self.worker is None and not self._queue:
            return None  # nothing owed: let the transport close
        # Half-closed sender: answer what it sent, then close (_run does).
        # TLS transports close regardless, and warn if asked otherwise.
        return None if self._settings.ssl is not None else True

    def connection_lost(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._cancel_timer()
        server = self._server
        server._connections.discard(self)
        server._rejecting.discard(self)
        partial = self._decoder.eof()
        if partial is not None:
            logger.warning(
                "MLLP connection from %s closed with a partial frame of %d bytes; dropped",
                self.peer,
                len(partial),
            )
        if self._queue:
            # Unanswered frames are not processed: the sender saw no ACK and will
            # resend; processing them now would only publish what it resends.
            logger.warning(
                "MLLP connection from %s closed with %d frames unanswered; dropped",
                self.peer,
                len(self._queue),
            )
            server.release_queued(sum(len(w[0]) for w in self._queue))
            self._queue.clear()
        server._paused_for_backlog.discard(self)
        self._wake_drain()
        if exc is not None:
            logger.info("MLLP connection from %s lost: %s", self.peer, type(exc).__name__)
        else:
            logger.debug("MLLP connection from %s closed", self.peer)
        server._connection_closed()

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._wake_drain()

    # -- frame processing ---------------------------------------------------

    async def _run(self) -> None:
        """Answer queued frames one at a time, in order, until the queue is empty."""
        queue = self._queue
        try:
            while queue and not self._abandoned:
                if self._writing_paused:
                    # The peer is not reading its ACKs: stop producing more of them.
                    await self._wait_drain()
                    continue
                work = queue.popleft()
                self._current = work
                self._server.release_queued(len(work[0]))
                if (
                    self._reading_paused
                    and self not in self._server._paused_for_backlog
                    and len(queue) <= self._settings.max_queued_frames // 2
                ):
                    self._resume_reading()
                payload, reason = work
                if reason is None:
                    reply = await self._call_handler(payload)
                else:
                    reply = self._reject(payload[:HEAD_BYTES], reason)
                if self._abandoned:
                    break  # stop() already answered this frame
                self._current = None
                if reply is None:
                    self._close()
                    break
                self._write(reply)
        except Exception as exc:  # a bug here must not leave the sender waiting
            logger.error(
                "MLLP connection worker for %s failed: %s", self.peer, describe_failure(exc)
            )
            self._close()
        finally:
            self.worker = None
            self._current = None
            self._last_activity = self._loop.time()
            if (
                self._reading_paused
                and not self._lost
                and self not in self._server._paused_for_backlog
            ):
                self._resume_reading()
            if self._peer_eof and not self._queue:
                self._close()

    async def _call_handler(self, payload: bytes) -> bytes | None:
        try:
            reply = await self._server.handler.handle_frame(payload, self.peer)
            if not isinstance(reply, bytes | bytearray):
                raise TypeError(f"handle_frame returned {type(reply).__name__}, not bytes")
            return reply
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._server.frames_failed += 1
            logger.error(
                "MLLP handler failed on a %d-byte frame from %s: %s",
                len(payload),
                self.peer,
                describe_failure(exc),
            )
            return self._reject(payload[:HEAD_BYTES], RejectReason.HANDLER_FAILED)

    def _reject(self, head: bytes, reason: RejectReason) -> bytes | None:
        """The handler's rejection, or None if even that failed (then we must close)."""
        self._server.frames_rejected += 1
        try:
            return self._server.handler.reject_frame(head, reason)
        except Exception as exc:
            logger.error(
                "MLLP reject_frame(%s) failed for %s: %s; closing the connection so "
                "the sender retries",
                reason.value,
                self.peer,
                describe_failure(exc),
            )
            return None

    def _write(self, reply: bytes) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            logger.debug("MLLP reply to %s dropped: connection closed", self.peer)
            return
        transport.write(encode_frame(reply))

    def _reject_over_limit(self, head: bytes) -> None:
        self._cancel_timer()
        self._abandoned = True  # ignore anything more this peer sends
        reply = self._reject(head, RejectReason.TOO_MANY_CONNECTIONS)
        if reply is not None:
            self._write(reply)
        self._close()

    # -- shutdown -------------------------------------------------------------

    def answer_unfinished(self) -> int:
        """Answer the in-flight and queued frames with SHUTTING_DOWN; return how many.

        Called by stop() at the drain deadline, before the worker is cancelled, so
        the sender gets an AR it can retry instead of a dropped connection.
        """
        if self._abandoned:
            return 0
        self._abandoned = True
        pending = ([self._current] if self._current is not None else []) + list(self._queue)
        self._server.release_queued(sum(len(w[0]) for w in self._queue))
        self._queue.clear()
        self._current = None
        for payload, _ in pending:
            reply = self._reject(payload[:HEAD_BYTES], RejectReason.SHUTTING_DOWN)
            if reply is None:
                break
            self._write(reply)
        return len(pending)

    def close(self) -> None:
        self._cancel_timer()
        self._close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    # -- helpers ------------------------------------------------------------

    def _close(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()  # flushes replies already written

    def _resume_reading(self) -> None:
        self._reading_paused = False
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_idle_timer(self) -> None:
        # Re-armed lazily: data_received only stamps the time, so a busy connection
        # costs no timer churn per read.
        self._timer = None
        if self._lost:
            return
        timeout = self._settings.idle_timeout_s
        if self.worker is not None or self._queue:
            self._timer = self._loop.call_later(timeout, self._on_idle_timer)
            return
        remaining = self._last_activity + timeout - self._loop.time()
        if remaining > 0:
            self._timer = self._loop.call_later(remaining, self._on_idle_timer)
            return
        logger.info("MLLP connection from %s idle for %.1f s; closing", self.peer, timeout)
        self._server.connections_idle_closed += 1
        self._close()

    def _on_over_limit_timeout(self) -> None:
        self._timer = None
        if not self._lost:
            logger.info("MLLP connection from %s over the limit sent no frame; closing", self.peer)
            self._abandoned = True
            self._close()

    async def _wait_drain(self) -> None:
        if not self._writing_paused or self._lost:
            return
        waiter = self._drain_waiter
        if waiter is None:
            waiter = self._drain_waiter = self._loop.create_future()
        await waiter

    def _wake_drain(self) -> None:
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class MLLPServer:
    """An MLLP listener that hands each frame to a :class:`FrameHandler`.

    Single use: ``start()`` once (a second call raises :class:`LifecycleError`),
    ``stop()`` any number of times. The counters are plain attributes for metrics.
    """

    def __init__(self, settings: MLLPServerSettings, handler: FrameHandler) -> None:
        self.settings = settings
        self.handler = handler
        self._server: asyncio.Server | None = None
        self._started = False
        self._stop_done: asyncio.Event | None = None
        self.shutting_down = False
        self._connections: set[_Connection] = set()
        self._rejecting: set[_Connection] = set()
        self._workers: set[asyncio.Task[None]] = set()
        self._all_closed: asyncio.Future[None] | None = None
        # Counters (monotonic, for metrics).
        self.frames_received = 0
        self.frames_rejected = 0
        self.frames_failed = 0
        self.connections_total = 0
        self.connections_rejected = 0
        self.connections_idle_closed = 0
        self.garbage_bytes = 0
        #: Bytes of frames received and not yet handled, on all connections.
        self.queued_bytes = 0
        #: Connections paused because the backlog across connections is too large.
        self._paused_for_backlog: set[_Connection] = set()

    def release_queued(self, byte_count: int) -> None:
        """Frames left the backlog; resume the connections it paused once it is at
        half ``max_queued_bytes``."""
        self.queued_bytes = max(0, self.queued_bytes - byte_count)
        if self._paused_for_backlog and self.queued_bytes <= self.settings.max_queued_bytes // 2:
            paused, self._paused_for_backlog = self._paused_for_backlog, set()
            for connection in paused:
                # One still over its own limit is resumed by its worker later.
                if len(connection._queue) < self.settings.max_queued_frames:
                    connection._resume_reading()

    async def __aenter__(self) -> MLLPServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Bind and start accepting. Raises OSError if the address cannot be bound."""
        if self._started:
            raise LifecycleError("MLLPServer.start() called twice; a server is single use")
        if self._stop_done is not None:
            raise LifecycleError("MLLPServer.start() called after stop(); a server is single use")
        self._started = True
        loop = asyncio.get_running_loop()
        settings = self.settings
        try:
            self._server = await loop.create_server(
                lambda: _Connection(self, loop),
                settings.host,
                settings.port,
                ssl=settings.ssl,
                # Let bursts of reconnecting senders queue in the kernel, not fail.
                backlog=max(100, min(settings.max_connections, 4096)),
            )
        except BaseException:
            self._started = False
            raise
        logger.info(
            "MLLP listening on %s:%d (tls=%s, max_connections=%d, max_frame_bytes=%d)",
            self.host,
            self.port,
            "on" if settings.ssl is not None else "off",
            settings.max_connections,
            settings.max_frame_bytes,
        )

    @property
    def is_serving(self) -> bool:
        return self._server is not None and self._server.is_serving()

    @property
    def host(self) -> str:
        """The address actually bound (first socket if the host resolved to several)."""
        return self._bound_address()[0]

    @property
    def port(self) -> int:
        """The port actually bound; differs from settings.port when that is 0."""
        return self._bound_address()[1]

    @property
    def connection_count(self) -> int:
        """Connections being served (not counting those over the limit being rejected)."""
        return len(self._connections)

    def _bound_address(self) -> tuple[str, int]:
        if self._server is None or not self._server.sockets:
            raise LifecycleError("MLLPServer is not listening; call start() first")
        name = self._server.sockets[0].getsockname()
        return str(name[0]), int(name[1])

    async def stop(self) -> None:
        """Stop accepting, drain, answer the rest with SHUTTING_DOWN, close. Idempotent."""
        if self._stop_done is not None:
            await self._stop_done.wait()
            return
        self._stop_done = asyncio.Event()
        try:
            await self._shutdown()
        finally:
            self._stop_done.set()

    async def _shutdown(self) -> None:
        server = self._server
        if server is None:
            return
        loop = asyncio.get_running_loop()
        port = self.port
        # 1. Stop accepting.
        self.shutting_down = True
        server.close()
        logger.info(
            "MLLP stopping on port %d: draining %d connections for up to %.1f s",
            port,
            len(self._connections),
            self.settings.drain_timeout_s,
        )
        for conn in list(self._rejecting):
            conn.close()

        # 2. Let frames already received finish, up to the deadline. Workers may
        # start meanwhile (to answer SHUTTING_DOWN), so look again until none.
        deadline = loop.time() + self.settings.drain_timeout_s
        while self._workers:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            await asyncio.wait(set(self._workers), timeout=remaining)

        # 3. Answer what did not finish, then cancel its handlers.
        if self._workers:
            unanswered = sum(conn.answer_unfinished() for conn in list(self._connections))
            logger.warning(
                "MLLP drain timeout: %d frames answered SHUTTING_DOWN, %d handlers cancelled",
                unanswered,
                len(self._workers),
            )
            workers = set(self._workers)
            for task in workers:
                task.cancel()
            await asyncio.wait(workers, timeout=_CANCEL_GRACE_S)

        # 4. Close transports; abort those whose peer does not take the replies.
        if self._connections or self._rejecting:
            self._all_closed = loop.create_future()
            for conn in list(self._connections) + list(self._rejecting):
                conn.close()
            try:
                async with asyncio.timeout(_CLOSE_GRACE_S):
                    await self._all_closed
            except TimeoutError:
                for conn in list(self._connections) + list(self._rejecting):
                    conn.abort()
            finally:
                self._all_closed = None
        await server.wait_closed()
        logger.info(
            "MLLP stopped: %d connections served, %d frames received, %d rejected",
            self.connections_total,
            self.frames_received,
            self.frames_rejected,
        )

    # -- called by connections ------------------------------------------------

    def _track_worker(self, task: asyncio.Task[None]) -> None:
        self._workers.add(task)
        task.add_done_callback(self._workers.discard)

    def _connection_closed(self) -> None:
        waiter = self._all_closed
        idle = not self._connections and not self._rejecting
        if idle and waiter is not None and not waiter.done():
            waiter.set_result(None)
