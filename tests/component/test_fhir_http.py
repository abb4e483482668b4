"""The FHIR HTTP edge on a loopback aiohttp server with a recording ingest: routes,
methods, media types, size and time limits, Prefer and X-Request-Id handling."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from adapters.fhir.server import FhirHttpSettings, add_fhir_routes

pytestmark = pytest.mark.timeout(30)

FHIR_JSON = "application/fhir+json"


@dataclass
class Answer:
    status: int
    body: dict[str, Any] | None
    headers: dict[str, str] = field(default_factory=dict)


class RecordingIngest:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    async def write(
        self,
        interaction: Any,
        resource_type: str,
        resource_id: str | None,
        body: bytes,
        *,
        base: str,
        request_id: str | None = None,
        prefer: Any = "OperationOutcome",
    ) -> Answer:
        self.calls.append(
            (
                interaction,
                {
                    "type": resource_type,
                    "id": resource_id,
                    "body": body,
                    "base": base,
                    "request_id": request_id,
                    "prefer": prefer,
                },
            )
        )
        return Answer(202, None, {"X-Event-Id": "e-1"})

    async def bundle(
        self,
        body: bytes,
        *,
        base: str,
        request_id: str | None = None,
        prefer: Any = "OperationOutcome",
        process_message: bool = False,
    ) -> Answer:
        self.calls.append(("bundle", {"body": body, "process_message": process_message}))
        return Answer(200, {"resourceType": "Bundle", "type": "batch-response"})


@dataclass
class Server:
    url: str
    ingest: RecordingIngest
    observed: list[int]


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    ingest = RecordingIngest()
    observed: list[int] = []
    app = web.Application(client_max_size=2048)
    add_fhir_routes(
        app,
        ingest,
        FhirHttpSettings(
            max_body_bytes=2048,
            request_timeout_s=0.5,
            version="9.9",
            observe=lambda _s, status: observed.append(status),
        ),
    )
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield Server(f"http://127.0.0.1:{port}", ingest, observed)
    finally:
        await runner.cleanup()


async def _request(
    method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any] | None, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, data=body, headers=headers) as response,
    ):
        payload = await response.json(content_type=None) if response.content_length else None
        return response.status, payload, response.headers


async def test_create_and_update_reach_the_ingest_with_base_prefer_and_request_id(
    server: Server,
) -> None:
    headers = {"Content-Type": FHIR_JSON, "Prefer": "return=representation", "X-Request-Id": "r9"}
    status, _, answer_headers = await _request(
        "POST", server.url + "/fhir/Patient", b'{"resourceType":"Patient"}', headers
    )
    assert (status, answer_headers["X-Event-Id"]) == (202, "e-1")
    status, _, _ = await _request(
        "PUT",
        server.url + "/fhir/Patient/p1",
        b'{"resourceType":"Patient","id":"p1"}',
        {"Content-Type": "application/json; charset=utf-8"},
    )
    assert status == 202
    (create, create_args), (update, update_args) = server.ingest.calls
    assert create == "create" and update == "update"
    assert create_args["base"] == server.url + "/fhir"
    assert (create_args["prefer"], create_args["request_id"]) == ("representation", "r9")
    assert (update_args["type"], update_args["id"], update_args["prefer"]) == (
        "Patient",
        "p1",
        "OperationOutcome",
    )
    assert server.observed == [202, 202]


async def test_bundles_and_process_message_reach_the_ingest(server: Server) -> None:
    headers = {"Content-Type": FHIR_JSON}
    assert (await _request("POST", server.url + "/fhir", b"{}", headers))[0] == 200
    assert (await _request("POST", server.url + "/fhir/$process-message", b"{}", headers))[0] == 200
    assert [args["process_message"] for _, args in server.ingest.calls] == [False, True]


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/fhir/Patient/p1", 405),
        ("DELETE", "/fhir/Patient/p1", 405),
        ("PATCH", "/fhir/Patient/p1", 405),
        ("GET", "/fhir/Patient", 405),
        ("GET", "/fhir", 405),
        ("POST", "/fhir/metadata", 405),
        ("POST", "/fhir/NoSuchType", 404),
        ("PUT", "/fhir/NoSuchType/1", 404),
        ("GET", "/fhir/Patient/p1/_history/1", 404),
    ],
)
async def test_interactions_the_relay_does_not_offer(
    server: Server, method: str, path: str, status: int
) -> None:
    got, outcome, _ = await _request(method, server.url + path, b"{}", {"Content-Type": FHIR_JSON})
    assert got == status
    assert outcome is not None and outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["severity"] == "error"
    assert server.ingest.calls == []


@pytest.mark.parametrize("content_type", ["application/fhir+xml", "text/plain", ""])
async def test_a_body_that_is_not_fhir_json_is_415(server: Server, content_type: str) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    got, outcome, _ = await _request("POST", server.url + "/fhir/Patient", b"<Patient/>", headers)
    assert got == 415
    assert outcome is not None and outcome["issue"][0]["code"] == "not-supported"


async def test_a_body_over_the_limit_is_413_and_the_server_keeps_serving(server: Server) -> None:
    big = b'{"resourceType":"Patient","x":"' + b"a" * 4000 + b'"}'
    got, outcome, _ = await _request(
        "POST", server.url + "/fhir/Patient", big, {"Content-Type": FHIR_JSON}
    )
    assert got == 413 and outcome is not None
    assert "2048" in outcome["issue"][0]["diagnostics"]
    got, _, _ = await _request(
        "POST",
        server.url + "/fhir/Patient",
        b'{"resourceType":"Patient"}',
        {"Content-Type": FHIR_JSON},
    )
    assert got == 202


async def test_a_body_that_does_not_arrive_in_time_is_408(server: Server) -> None:
    host, port = server.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /fhir/Patient HTTP/1.1\r\nHost: x\r\nContent-Type: application/fhir+json\r\n"
        b'Content-Length: 100\r\n\r\n{"resourceType"'
    )
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), timeout=5)
    writer.close()
    assert status_line.startswith(b"HTTP/1.1 408")
    assert server.ingest.calls == []


async def test_metadata_is_served(server: Server) -> None:
    got, statement, headers = await _request("GET", server.url + "/fhir/metadata")
    assert got == 200 and headers["Content-Type"].startswith(FHIR_JSON)
    assert statement is not None
    assert statement["software"] == {"name": "hl7bridge", "version": "9.9"}
    assert statement["implementation"]["url"] == server.url + "/fhir"


async def test_requests_over_the_in_flight_bound_get_503_with_retry_after() -> None:
    gate = asyncio.Event()

    class Slow(RecordingIngest):
        async def write(self, *args: Any, **kwargs: Any) -> Answer:
            await gate.wait()
            return await super().write(*args, **kwargs)

    app = web.Application()
    add_fhir_routes(
        app,
        Slow(),
        FhirHttpSettings(
            max_body_bytes=2048, request_timeout_s=5, version="t", max_in_flight=2,
            retry_after_s=3,
        ),
    )  # fmt: skip
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/fhir/Patient"  # type: ignore[union-attr]
    body, headers = b'{"resourceType":"Patient"}', {"Content-Type": FHIR_JSON}
    try:
        first = [asyncio.create_task(_request("POST", url, body, headers)) for _ in range(2)]
        await asyncio.sleep(0.2)  # both are in flight, waiting on the gate
        status, outcome, answer_headers = await _request("POST", url, body, headers)
        assert status == 503 and answer_headers["Retry-After"] == "3"
        assert outcome is not None and outcome["issue"][0]["code"] == "transient"
        gate.set()
        assert [t[0] for t in await asyncio.gather(*first)] == [202, 202]
        assert (await _request("POST", url, body, headers))[0] == 202
    finally:
        await runner.cleanup()
