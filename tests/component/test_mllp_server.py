"""The MLLP server over real loopback sockets (port 0), with a fake handler."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from adapters.mllp.client import MLLPClient
from adapters.mllp.codec import (
    CARRIAGE_RETURN,
    END_BLOCK,
    START_BLOCK,
    Frame,
    MLLPDecoder,
    encode_frame,
)
from adapters.mllp.server import MLLPServer, MLLPServerSettings, RejectReason
from bridge.errors import LifecycleError

pytestmark = pytest.mark.timeout(30)

SECRET = b"PID|1||MRN-4711^^^HOSP||DOE^JANE"  # stands in for PHI in log checks


class EchoHandler:
    """Answers ``ACK:<payload>``; rejects as ``REJ:<reason>:<head[:16]>``."""

    def __init__(self, delay_s: float = 0.0, fail_prefix: bytes | None = None) -> None:
        self.delay_s = delay_s
        self.fail_prefix = fail_prefix
        self.handled: list[bytes] = []
        self.rejected: list[tuple[bytes, RejectReason]] = []
        self.started = asyncio.Event()
        self.cancelled = 0
        self.peers: list[str] = []

    async def handle_frame(self, payload: bytes, peer: str) -> bytes:
        assert ":" in peer
        self.peers.append(peer)
        self.started.set()
        try:
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.fail_prefix is not None and payload.startswith(self.fail_prefix):
            # The message quotes the payload, as careless library errors do.
            raise RuntimeError(f"cannot parse {payload!r}")
        self.handled.append(payload)
        return b"ACK:" + payload

    def reject_frame(self, head: bytes, reason: RejectReason) -> bytes:
        self.rejected.append((head, reason))
        return b"REJ:" + reason.value.encode() + b":" + head[:16]


def rej(reason: RejectReason, head: bytes) -> bytes:
    return b"REJ:" + reason.value.encode() + b":" + head[:16]


class RawPeer:
    """A bare socket peer, for what MLLPClient will not do (pipelining, garbage, EOF)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._decoder = MLLPDecoder()
        self._frames: list[bytes] = []

    @classmethod
    async def connect(cls, server: MLLPServer) -> RawPeer:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def replies(self, count: int, timeout_s: float = 10.0) -> list[bytes]:
        async with asyncio.timeout(timeout_s):
            while len(self._frames) < count:
                data = await self.reader.read(65536)
                if not data:
                    raise ConnectionError(f"EOF after {len(self._frames)} of {count} replies")
                self._frames.extend(
                    e.payload for e in self._decoder.feed(data) if isinstance(e, Frame)
                )
        out, self._frames = self._frames[:count], self._frames[count:]
        return out

    async def at_eof(self, timeout_s: float = 5.0) -> bool:
        """Read to the end; true if the server closed (any bytes left are frames)."""
        async with asyncio.timeout(timeout_s):
            rest = await self.reader.read()
        self._frames.extend(e.payload for e in self._decoder.feed(rest) if isinstance(e, Frame))
        return self.reader.at_eof()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


@contextlib.asynccontextmanager
async def serving(handler: EchoHandler, **overrides: Any) -> AsyncIterator[MLLPServer]:
    async with MLLPServer(MLLPServerSettings(port=0, **overrides), handler) as server:
        yield server


@contextlib.asynccontextmanager
async def raw_peer(server: MLLPServer) -> AsyncIterator[RawPeer]:
    peer = await RawPeer.connect(server)
    try:
        yield peer
    finally:
        await peer.close()


async def wait_until(predicate: Any, timeout_s: float = 5.0) -> None:
    """Poll server state the server exposes no event for (counts, flags)."""
    async with asyncio.timeout(timeout_s):
        while not predicate():  # noqa: ASYNC110 - no event to wait on, by design
            await asyncio.sleep(0.01)


# -- ordering -----------------------------------------------------------------


async def test_many_connections_each_get_their_own_acks_in_order() -> None:
    handler = EchoHandler()

    async def one_connection(server: MLLPServer, conn: int) -> list[bytes]:
        async with MLLPClient(server.host, server.port) as client:
            return [await client.send(b"MSH|c%d|m%d" % (conn, i)) for i in range(50)]

    async with serving(handler) as server:
        results = await asyncio.gather(*(one_connection(server, c) for c in range(30)))
        assert server.connections_total == 30
    for conn, replies in enumerate(results):
        assert replies == [b"ACK:MSH|c%d|m%d" % (conn, i) for i in range(50)]
    assert server.frames_received == 30 * 50


async def test_pipelined_frames_are_answered_in_order_with_backpressure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # 300 frames in one write: more than max_queued_frames, so reading pauses
    # and resumes while the (slightly slow) handler works through them.
    caplog.set_level(logging.DEBUG, logger="adapters.mllp.server")
    handler = EchoHandler(delay_s=0.001)
    payloads = [b"MSH|%04d|" % i + b"x" * 200 for i in range(300)]
    async with serving(handler, max_queued_frames=8) as server, raw_peer(server) as peer:
        await peer.send(b"".join(encode_frame(p) for p in payloads))
        assert await peer.replies(300) == [b"ACK:" + p for p in payloads]
        assert handler.handled == payloads
    assert "reading paused" in caplog.text


async def test_the_backlog_across_connections_is_bounded_by_max_queued_bytes() -> None:
    # A stuck handler and 8 connections each pipelining 50 frames of 1 KiB: without a
    # bound across connections the server would buffer 400 KiB; with 16 KiB it pauses
    # every connection that receives a frame once the backlog reaches the bound.
    gate = asyncio.Event()

    class Gated(EchoHandler):
        async def handle_frame(self, payload: bytes, peer: str) -> bytes:
            await gate.wait()
            return await super().handle_frame(payload, peer)

    handler = Gated()
    limit = 16 * 1024
    frames = [[b"MSH|%d-%02d|" % (c, i) + b"x" * 1024 for i in range(50)] for c in range(8)]
    async with serving(handler, max_queued_bytes=limit, max_queued_frames=64) as server:
        peers = [await RawPeer.connect(server) for _ in range(8)]
        try:
            for peer, mine in zip(peers, frames, strict=True):
                await peer.send(b"".join(encode_frame(p) for p in mine))
            await asyncio.sleep(0.5)
            # Bounded: the limit plus what one socket read per connection can add.
            assert limit <= server.queued_bytes <= limit + 8 * 70 * 1024
            assert server.queued_bytes < sum(len(p) for mine in frames for p in mine)
            gate.set()
            for peer, mine in zip(peers, frames, strict=True):
                assert await peer.replies(50) == [b"ACK:" + p for p in mine]
            assert server.queued_bytes == 0
        finally:
            for peer in peers:
                await peer.close()


async def test_peer_that_does_not_read_its_acks_is_throttled_not_buffered() -> None:
    # Large replies and a peer that reads nothing: the server must stop producing
    # ACKs once its write buffer is full, then finish when the peer reads.
    class BigReply(EchoHandler):
        async def handle_frame(self, payload: bytes, peer: str) -> bytes:
            await super().handle_frame(payload, peer)
            return payload * 16384

    handler = BigReply()
    # 400 x 64 KiB = 25 MiB of replies: more than loopback socket buffers hold.
    payloads = [b"%04d" % i for i in range(400)]
    async with serving(handler) as server, raw_peer(server) as peer:
        await peer.send(b"".join(encode_frame(p) for p in payloads))
        await asyncio.sleep(0.3)
        assert len(handler.handled) < len(payloads)  # throttled
        replies = await peer.replies(len(payloads))
        assert replies == [p * 16384 for p in payloads]


async def test_peer_reset_with_frames_queued_does_not_disturb_the_server(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A reset (not a FIN: that may be a half-close, whose frames are answered).
    caplog.set_level(logging.DEBUG, logger="adapters.mllp.server")
    handler = EchoHandler(delay_s=0.2)
    async with serving(handler) as server:
        async with raw_peer(server) as peer:
            await peer.send(b"".join(encode_frame(b"MSH|%d" % i) for i in range(3)))
            await asyncio.wait_for(handler.started.wait(), 5)
            sock = peer.writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            peer.writer.transport.abort()
        await wait_until(lambda: server.connection_count == 0)
        assert "2 frames unanswered" in caplog.text
        # The frame that was in flight is finished, the queued ones are not run.
        await wait_until(lambda: handler.handled == [b"MSH|0"])
        handler.delay_s = 0
        async with MLLPClient(server.host, server.port) as client:
            assert await client.send(b"MSH|after") == b"ACK:MSH|after"
        assert handler.handled == [b"MSH|0", b"MSH|after"]


# -- limits -------------------------------------------------------------------


async def test_oversize_frame_is_rejected_and_the_connection_still_serves() -> None:
    handler = EchoHandler()
    big = b"MSH|^~\\&|BIG|" + b"x" * 50_000
    async with serving(handler, max_frame_bytes=10_000) as server, raw_peer(server) as peer:
        await peer.send(encode_frame(big) + encode_frame(b"MSH|next"))
        assert await peer.replies(2) == [
            rej(RejectReason.TOO_LARGE, big),
            b"ACK:MSH|next",
        ]
        assert handler.rejected[0][0] == big[:4096]
        assert handler.handled == [b"MSH|next"]
        assert server.frames_rejected == 1


async def test_handler_exception_is_answered_and_logged_without_payload(
    caplog: pytest.LogCaptureFixture,
) -> None:
    handler = EchoHandler(fail_prefix=b"MSH|bad")
    bad = b"MSH|bad\r" + SECRET
    caplog.set_level(logging.DEBUG, logger="adapters.mllp")
    async with serving(handler) as server, MLLPClient(server.host, server.port) as client:
        assert await client.send(bad) == rej(RejectReason.HANDLER_FAILED, bad)
        assert await client.send(b"MSH|good") == b"ACK:MSH|good"
        assert server.frames_failed == 1
    assert "RuntimeError" in caplog.text
    assert "MRN-4711" not in caplog.text and "DOE" not in caplog.text


async def test_reject_frame_failure_closes_the_connection() -> None:
    class BrokenReject(EchoHandler):
        def reject_frame(self, head: bytes, reason: RejectReason) -> bytes:
            raise ValueError("no ack for you")

    handler = BrokenReject(fail_prefix=b"MSH|bad")
    async with serving(handler) as server:
        async with raw_peer(server) as peer:
            await peer.send(encode_frame(b"MSH|bad"))
            assert await peer.at_eof()
        # The server itself keeps serving others.
        async with MLLPClient(server.host, server.port) as client:
            assert await client.send(b"MSH|ok") == b"ACK:MSH|ok"


async def test_connection_over_the_limit_gets_too_many_connections_then_closed() -> None:
    handler = EchoHandler()
    async with serving(handler, max_connections=2) as server:
        first = await MLLPClient.connect(server.host, server.port)
        second = await MLLPClient.connect(server.host, server.port)
        assert await first.send(b"MSH|1") == b"ACK:MSH|1"
        assert await second.send(b"MSH|2") == b"ACK:MSH|2"
        assert server.connection_count == 2
        async with raw_peer(server) as third:
            await third.send(encode_frame(b"MSH|3"))
            assert await third.replies(1) == [rej(RejectReason.TOO_MANY_CONNECTIONS, b"MSH|3")]
            assert await third.at_eof()
        assert server.connections_rejected == 1
        assert handler.handled == [b"MSH|1", b"MSH|2"]
        # Room again once a connection goes away.
        await first.close()
        await wait_until(lambda: server.connection_count == 1)
        async with MLLPClient(server.host, server.port) as again:
            assert await again.send(b"MSH|4") == b"ACK:MSH|4"
        await second.close()


async def test_connection_over_the_limit_sending_nothing_is_closed() -> None:
    handler = EchoHandler()
    async with (
        serving(handler, max_connections=1, over_limit_wait_s=0.2) as server,
        MLLPClient(server.host, server.port) as client,
    ):
        assert await client.send(b"MSH|1") == b"ACK:MSH|1"
        async with raw_peer(server) as extra:
            assert await extra.at_eof(timeout_s=3.0)
        assert await client.send(b"MSH|2") == b"ACK:MSH|2"


async def test_idle_connection_is_closed() -> None:
    handler = EchoHandler()
    async with serving(handler, idle_timeout_s=0.3) as server, raw_peer(server) as peer:
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await peer.at_eof(timeout_s=5.0)
        assert loop.time() - started >= 0.25
        assert server.connections_idle_closed == 1
        await wait_until(lambda: server.connection_count == 0)


async def test_active_connection_is_not_idle() -> None:
    handler = EchoHandler()
    async with (
        serving(handler, idle_timeout_s=0.3) as server,
        MLLPClient(server.host, server.port) as client,
    ):
        for i in range(8):  # 0.8 s of traffic, never 0.3 s quiet
            assert await client.send(b"MSH|%d" % i) == b"ACK:MSH|%d" % i
            await asyncio.sleep(0.1)
        assert server.connections_idle_closed == 0


async def test_frame_being_processed_is_not_idle() -> None:
    handler = EchoHandler(delay_s=0.7)
    async with (
        serving(handler, idle_timeout_s=0.2) as server,
        MLLPClient(server.host, server.port) as client,
    ):
        assert await client.send(b"MSH|slow") == b"ACK:MSH|slow"


# -- lifecycle ----------------------------------------------------------------


async def test_stop_drains_an_in_flight_frame_and_is_idempotent() -> None:
    handler = EchoHandler(delay_s=0.2)
    server = MLLPServer(MLLPServerSettings(port=0), handler)
    await server.start()
    port = server.port
    async with raw_peer(server) as peer:
        await peer.send(encode_frame(b"MSH|inflight"))
        await asyncio.wait_for(handler.started.wait(), 5)
        await asyncio.gather(server.stop(), server.stop())
        assert await peer.replies(1) == [b"ACK:MSH|inflight"]
        assert await peer.at_eof()
    await server.stop()
    assert not server.is_serving
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


async def test_frames_arriving_during_shutdown_are_rejected_in_order() -> None:
    handler = EchoHandler(delay_s=0.3)
    server = MLLPServer(MLLPServerSettings(port=0), handler)
    await server.start()
    async with raw_peer(server) as peer:
        await peer.send(encode_frame(b"MSH|first"))
        await asyncio.wait_for(handler.started.wait(), 5)
        stopping = asyncio.create_task(server.stop())
        await wait_until(lambda: server.shutting_down)
        await peer.send(encode_frame(b"MSH|late"))
        assert await peer.replies(2) == [
            b"ACK:MSH|first",
            rej(RejectReason.SHUTTING_DOWN, b"MSH|late"),
        ]
        await stopping
    assert handler.handled == [b"MSH|first"]


async def test_drain_timeout_answers_unfinished_frames_and_cancels_handlers() -> None:
    handler = EchoHandler(delay_s=60)
    server = MLLPServer(MLLPServerSettings(port=0, drain_timeout_s=0.2), handler)
    await server.start()
    async with raw_peer(server) as peer:
        await peer.send(encode_frame(b"MSH|stuck") + encode_frame(b"MSH|queued"))
        await asyncio.wait_for(handler.started.wait(), 5)
        async with asyncio.timeout(5):
            await server.stop()
        assert await peer.replies(2) == [
            rej(RejectReason.SHUTTING_DOWN, b"MSH|stuck"),
            rej(RejectReason.SHUTTING_DOWN, b"MSH|queued"),
        ]
        assert await peer.at_eof()
    assert handler.cancelled == 1


async def test_start_twice_and_start_after_stop_raise_lifecycle_error() -> None:
    server = MLLPServer(MLLPServerSettings(port=0), EchoHandler())
    with pytest.raises(LifecycleError):
        _ = server.port
    await server.stop()  # stop before start is harmless
    with pytest.raises(LifecycleError):
        await server.start()

    server = MLLPServer(MLLPServerSettings(port=0), EchoHandler())
    async with server:
        assert server.port > 0
        assert server.host == "127.0.0.1"
        with pytest.raises(LifecycleError):
            await server.start()
    with pytest.raises(LifecycleError):
        await server.start()


async def test_port_in_use_raises_os_error_and_allows_retry() -> None:
    async with serving(EchoHandler()) as first:
        second = MLLPServer(MLLPServerSettings(port=first.port), EchoHandler())
        with pytest.raises(OSError):
            await second.start()
        await second.stop()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("port", -1),
        ("port", 70000),
        ("max_frame_bytes", 0),
        ("idle_timeout_s", 0),
        ("idle_timeout_s", float("nan")),
        ("max_connections", 0),
        ("drain_timeout_s", -1.0),
        ("max_queued_frames", 0),
        ("max_queued_bytes", 0),
        ("over_limit_wait_s", float("inf")),
    ],
)
def test_settings_reject_bad_values_naming_the_field(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        MLLPServerSettings(**{field: value})


# -- odd peers ----------------------------------------------------------------


async def test_half_closed_peer_still_gets_its_replies() -> None:
    handler = EchoHandler(delay_s=0.1)
    async with serving(handler) as server, raw_peer(server) as peer:
        await peer.send(encode_frame(b"MSH|a") + encode_frame(b"MSH|b"))
        peer.writer.write_eof()
        assert await peer.replies(2) == [b"ACK:MSH|a", b"ACK:MSH|b"]
        assert await peer.at_eof()


async def test_garbage_missing_cr_and_split_frames_are_tolerated() -> None:
    handler = EchoHandler()
    stream = (
        b"\r\n junk"
        + START_BLOCK
        + b"MSH|one"
        + END_BLOCK  # no CR
        + encode_frame(b"MSH|two")
        + START_BLOCK
        + b"MSH|thr"
    )
    async with serving(handler) as server, raw_peer(server) as peer:
        for i in range(len(stream)):
            peer.writer.write(stream[i : i + 1])
        await peer.writer.drain()
        await peer.send(b"ee" + END_BLOCK)
        await asyncio.sleep(0.05)
        await peer.send(CARRIAGE_RETURN)
        assert await peer.replies(3) == [b"ACK:MSH|one", b"ACK:MSH|two", b"ACK:MSH|three"]
        assert server.garbage_bytes == len(b"\r\n junk")


async def test_sender_omitting_cr_gets_its_ack_without_sending_more() -> None:
    async with serving(EchoHandler()) as server, raw_peer(server) as peer:
        await peer.send(START_BLOCK + b"MSH|nocr" + END_BLOCK)
        assert await peer.replies(1, timeout_s=2.0) == [b"ACK:MSH|nocr"]
        await peer.send(CARRIAGE_RETURN + START_BLOCK + b"MSH|again" + END_BLOCK)
        assert await peer.replies(1, timeout_s=2.0) == [b"ACK:MSH|again"]
        assert server.garbage_bytes == 0


async def test_partial_frame_at_close_is_logged_without_content(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="adapters.mllp")
    async with serving(EchoHandler()) as server:
        async with raw_peer(server) as peer:
            await peer.send(START_BLOCK + SECRET)
        await wait_until(lambda: server.connection_count == 0)
    assert f"partial frame of {len(SECRET)} bytes" in caplog.text
    assert "MRN-4711" not in caplog.text


def test_serves_under_uvloop() -> None:
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> list[bytes]:
        async with (
            serving(EchoHandler()) as server,
            MLLPClient(server.host, server.port) as client,
        ):
            return [await client.send(b"MSH|%d" % i) for i in range(100)]

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(scenario()) == [b"ACK:MSH|%d" % i for i in range(100)]


# -- TLS ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_contexts(tls_cert: tuple[Path, Path]) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    cert, key = tls_cert
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))  # verification stays on
    return server_ctx, client_ctx


async def test_tls_round_trip(tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server_ctx, client_ctx = tls_contexts
    async with (
        serving(EchoHandler(), ssl=server_ctx) as server,
        MLLPClient("127.0.0.1", server.port, ssl=client_ctx, server_hostname="localhost") as client,
    ):
        for i in range(20):
            assert await client.send(b"MSH|tls%d" % i) == b"ACK:MSH|tls%d" % i


# -- PROXY protocol (behind a load balancer) --------------------------------------


async def test_the_proxy_header_names_the_sender_the_handler_sees() -> None:
    handler = EchoHandler()
    async with serving(handler, proxy_protocol=True) as server, raw_peer(server) as peer:
        await peer.send(b"PROXY TCP4 203.0.113.7 10.0.0.5 40001 2575\r\n")
        await peer.send(encode_frame(b"one"))
        await peer.send(encode_frame(b"two"))
        assert await peer.replies(2) == [b"ACK:one", b"ACK:two"]
    assert handler.peers == ["203.0.113.7:40001", "203.0.113.7:40001"]


async def test_a_connection_without_the_proxy_header_is_closed_unanswered() -> None:
    handler = EchoHandler()
    async with serving(handler, proxy_protocol=True) as server:
        async with raw_peer(server) as direct:
            await direct.send(encode_frame(SECRET))
            assert await direct.at_eof()
        async with raw_peer(server) as proxied:  # still serving the balancer
            await proxied.send(
                b"PROXY TCP4 198.51.100.2 10.0.0.5 5000 2575\r\n" + encode_frame(b"x")
            )
            assert await proxied.replies(1) == [b"ACK:x"]
    assert handler.handled == [b"x"] and handler.peers == ["198.51.100.2:5000"]
