"""The MLLP client against scripted loopback servers and the real MLLP server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from adapters.mllp.client import MLLPClient
from adapters.mllp.codec import END_BLOCK, START_BLOCK, Frame, MLLPDecoder, encode_frame
from adapters.mllp.server import MLLPServer, MLLPServerSettings, RejectReason
from bridge.errors import LifecycleError, MessageTooLarge

pytestmark = pytest.mark.timeout(30)

OnFrame = Callable[[bytes, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def scripted_server(on_frame: OnFrame) -> AsyncIterator[tuple[str, int]]:
    """A raw server that calls ``on_frame`` for each frame it receives."""
    tasks: set[asyncio.Task[None]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = MLLPDecoder()
        try:
            while data := await reader.read(65536):
                for event in decoder.feed(data):
                    if isinstance(event, Frame):
                        await on_frame(event.payload, writer)
        except ConnectionError:
            pass
        finally:
            writer.close()

    def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.create_task(serve(reader, writer))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    try:
        yield "127.0.0.1", server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class Echo:
    async def handle_frame(self, payload: bytes, peer: str) -> bytes:
        return b"ACK:" + payload

    def reject_frame(self, head: bytes, reason: RejectReason) -> bytes:
        return b"REJ:" + reason.value.encode()


async def test_round_trip_against_the_server_via_connect() -> None:
    async with MLLPServer(MLLPServerSettings(port=0), Echo()) as server:
        client = await MLLPClient.connect(server.host, server.port)
        try:
            assert client.is_connected
            for i in range(200):
                assert await client.send(b"MSH|%d" % i) == b"ACK:MSH|%d" % i
        finally:
            await client.close()
            await client.close()  # idempotent
        assert not client.is_connected


async def test_concurrent_sends_are_serialized_and_matched() -> None:
    async with (
        MLLPServer(MLLPServerSettings(port=0), Echo()) as server,
        MLLPClient(server.host, server.port) as client,
    ):
        replies = await asyncio.gather(*(client.send(b"MSH|%d" % i) for i in range(100)))
        assert replies == [b"ACK:MSH|%d" % i for i in range(100)]


async def test_reply_split_into_single_bytes_is_one_reply() -> None:
    async def trickle(payload: bytes, writer: asyncio.StreamWriter) -> None:
        for byte in encode_frame(b"ACK:" + payload):
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.001)

    async with scripted_server(trickle) as (host, port), MLLPClient(host, port) as client:
        assert await client.send(b"MSH|one") == b"ACK:MSH|one"
        assert await client.send(b"MSH|two") == b"ACK:MSH|two"


async def test_reply_after_garbage_and_without_cr_is_understood() -> None:
    async def sloppy(payload: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(b"\r\n" + START_BLOCK + b"ACK:" + payload + END_BLOCK)

    async with scripted_server(sloppy) as (host, port), MLLPClient(host, port) as client:
        assert await client.send(b"MSH|a") == b"ACK:MSH|a"
        assert await client.send(b"MSH|b") == b"ACK:MSH|b"


async def test_unsolicited_frame_is_ignored_not_taken_as_the_next_reply(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def double(payload: bytes, writer: asyncio.StreamWriter) -> None:
        # A reply, then one nobody asked for, in separate writes.
        writer.write(encode_frame(b"ACK:" + payload))
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(encode_frame(b"EXTRA"))

    async with scripted_server(double) as (host, port), MLLPClient(host, port) as client:
        assert await client.send(b"MSH|a") == b"ACK:MSH|a"
        await asyncio.sleep(0.2)
        assert await client.send(b"MSH|b") == b"ACK:MSH|b"
    assert "unsolicited" in caplog.text


async def test_timeout_raises_and_closes_the_connection() -> None:
    async def silent(payload: bytes, writer: asyncio.StreamWriter) -> None:
        return None

    async with scripted_server(silent) as (host, port), MLLPClient(host, port) as client:
        with pytest.raises(TimeoutError, match="no MLLP reply"):
            await client.send(b"MSH|lost", timeout_s=0.1)
        # A late reply would belong to the lost message, so the connection is gone.
        with pytest.raises(ConnectionError, match="closed"):
            await client.send(b"MSH|next")
        assert not client.is_connected


async def test_cancelled_send_closes_the_connection() -> None:
    async def silent(payload: bytes, writer: asyncio.StreamWriter) -> None:
        return None

    async with scripted_server(silent) as (host, port), MLLPClient(host, port) as client:
        task = asyncio.create_task(client.send(b"MSH|x"))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        with pytest.raises(ConnectionError):
            await client.send(b"MSH|y")


async def test_connection_closed_before_the_reply_raises_connection_error() -> None:
    async def hang_up(payload: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(START_BLOCK + b"ACK:par")  # half a reply, then gone
        await writer.drain()
        writer.close()

    async with scripted_server(hang_up) as (host, port), MLLPClient(host, port) as client:
        with pytest.raises(ConnectionError, match="closed before the reply") as caught:
            await client.send(b"MSH|x")
        assert "7 bytes of a partial reply" in str(caught.value)


async def test_reply_over_max_frame_bytes_raises_message_too_large() -> None:
    async def huge(payload: bytes, writer: asyncio.StreamWriter) -> None:
        size = 5000 if payload == b"MSH|big" else 10
        writer.write(encode_frame(b"A" * size))

    async with (
        scripted_server(huge) as (host, port),
        MLLPClient(host, port, max_frame_bytes=1000) as client,
    ):
        with pytest.raises(MessageTooLarge):
            await client.send(b"MSH|big")
        assert await client.send(b"MSH|small") == b"A" * 10


async def test_lifecycle_errors() -> None:
    client = MLLPClient("127.0.0.1", 1)
    with pytest.raises(LifecycleError):
        await client.send(b"MSH|x")
    await client.close()  # never opened: harmless

    async with (
        MLLPServer(MLLPServerSettings(port=0), Echo()) as server,
        MLLPClient(server.host, server.port) as client,
    ):
        with pytest.raises(LifecycleError):
            await client.open()


async def test_connect_refused_raises_os_error() -> None:
    async with MLLPServer(MLLPServerSettings(port=0), Echo()) as server:
        port = server.port
    with pytest.raises(OSError):
        await MLLPClient.connect("127.0.0.1", port, timeout_s=2.0)


async def test_client_logs_no_payload(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="adapters.mllp")
    secret = b"PID|1||MRN-4711"
    async with (
        MLLPServer(MLLPServerSettings(port=0), Echo()) as server,
        MLLPClient(server.host, server.port) as client,
    ):
        await client.send(secret)
    assert "MRN-4711" not in caplog.text
