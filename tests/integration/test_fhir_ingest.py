"""FHIR REST ingest against a real ZooKeeper and the real Tansu broker.

Every official R4 example instance is sent the way a FHIR client would send it
and must be accepted and on the events topic with its CloudEvents headers;
broken variants are refused with the right status and an OperationOutcome that
names the element; the CapabilityStatement is checked interaction by
interaction against the running endpoints.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from fhir.resources.R4B.capabilitystatement import CapabilityStatement

from bridge.kafka import ensure_topics
from bridge.service import BridgeInstance
from tests.integration.conftest import InstanceFactory
from tests.kafka_helpers import read_topic

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

FHIR_JSON = "application/fhir+json"
#: Official examples the relay refuses on purpose, and why (the test asserts the list).
REFUSED_EXAMPLES = {
    # A transaction with a conditional update, DELETEs, an operation call and GETs: the
    # relay publishes resources and can neither search, delete nor read, so this
    # transaction cannot become its one atomic event. (The first problem is named.)
    "Bundle-bundle-transaction.json": (422, "Bundle.entry[3].request.url"),
}
#: Batches of reads only: answered 200 with every entry 405; nothing to publish.
READ_ONLY_BATCHES = {
    "Bundle-bundle-request-medsallergies.json",
    "Bundle-bundle-request-simplesummary.json",
}


@pytest.fixture(scope="module")
def examples_dir(corpus_dir: Path) -> Path:
    return corpus_dir / "hl7-fhir-r4-examples" / "package"


@pytest.fixture(scope="module")
def example_files(examples_dir: Path) -> list[Path]:
    return sorted(p for p in examples_dir.glob("*.json") if p.name != "package.json")


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def _base(instance: BridgeInstance) -> str:
    return f"{instance.http_url}/fhir"


async def _send(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    body: bytes | None = None,
    content_type: str = FHIR_JSON,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any] | None, Any]:
    all_headers = {"Content-Type": content_type, **(headers or {})}
    async with http.request(method, url, data=body, headers=all_headers) as response:
        raw = await response.read()
        return response.status, (orjson.loads(raw) if raw else None), response.headers


def _where(example: dict[str, Any]) -> tuple[str, str]:
    """How a FHIR client sends an example: method and path under the base."""
    if example["resourceType"] == "Bundle" and example.get("type") in (
        "transaction",
        "batch",
        "message",
    ):
        return "POST", ""
    return "POST", f"/{example['resourceType']}"


def _expressions(outcome: dict[str, Any] | None) -> list[str]:
    assert outcome is not None and outcome["resourceType"] == "OperationOutcome"
    return [e for issue in outcome["issue"] for e in issue.get("expression", [])]


async def test_every_official_example_is_accepted_and_published(
    start_instance: InstanceFactory,
    broker: Any,
    topic_prefix: str,
    example_files: list[Path],
    http: aiohttp.ClientSession,
) -> None:
    instance = await start_instance(broker.bootstrap)
    base = _base(instance)
    files = example_files
    assert len(files) == 591
    expected_events: set[str] = set()
    refused: dict[str, tuple[int, list[str]]] = {}
    for path in files:
        body = path.read_bytes()
        example = orjson.loads(body)
        method, where = _where(example)
        status, answer, headers = await _send(http, method, base + where, body)
        assert answer is not None
        if path.name in READ_ONLY_BATCHES:
            assert status == 200, path.name
            statuses = [e["response"]["status"] for e in answer["entry"]]
            assert statuses == ["405 Method Not Allowed"] * len(example["entry"]), path.name
            continue
        if status >= 400:
            refused[path.name] = (status, _expressions(answer))
            continue
        if where:  # a resource: 202 with the event id
            assert status == 202, (path.name, answer)
            expected_events.add(headers["X-Event-Id"])
        elif example["type"] == "batch":
            assert status == 200 and answer["type"] == "batch-response", path.name
        else:
            assert status == 200, (path.name, answer)
            expected_events.add(headers["X-Event-Id"])
            if example["type"] == "transaction":
                assert answer["type"] == "transaction-response"
                assert len(answer["entry"]) == len(example["entry"])
            else:
                header = answer["entry"][0]["resource"]
                assert header["response"]["code"] == "ok"
                assert header["response"]["identifier"] == example["entry"][0]["resource"]["id"]
    assert {name: (status, exprs[:1]) for name, (status, exprs) in refused.items()} == {
        name: (status, [expression]) for name, (status, expression) in REFUSED_EXAMPLES.items()
    }

    events = await read_topic(
        broker.bootstrap, f"{topic_prefix}.events", min_records=len(expected_events), timeout_s=30
    )
    by_id: dict[str, Any] = {}
    for record in events:
        headers = {k: v.decode() for k, v in record.headers}
        by_id[headers["ce_id"]] = (headers, record)
    assert set(by_id) == expected_events
    for headers, record in by_id.values():
        assert headers["ce_specversion"] == "1.0"
        assert headers["content-type"] == FHIR_JSON
        assert headers["ce_type"].startswith("org.hl7bridge.fhir.")
        assert headers["ce_fhirinteraction"] in ("create", "transaction", "message")
        assert headers["ce_source"]
        assert headers["ce_time"]
        data = orjson.loads(record.value)
        assert data["resourceType"] == "Bundle" and data["type"] == "message"
        assert data["entry"][0]["resource"]["resourceType"] == "MessageHeader"
        if "ce_subject" in headers:
            assert record.key == headers["ce_subject"].encode()
    raw = await read_topic(
        broker.bootstrap, f"{topic_prefix}.raw.fhir", min_records=len(expected_events), timeout_s=30
    )
    assert len({dict(r.headers)["ce_id"] for r in raw}) >= len(expected_events)


BROKEN: list[tuple[str, str, str, bytes, str, int, str | None]] = [
    # (name, method, path, body, content type, status, an expression the outcome names)
    ("not json", "POST", "/Patient", b"{not json", FHIR_JSON, 400, None),
    ("not a resource", "POST", "/Patient", b'{"name": []}', FHIR_JSON, 400, None),
    ("type differs from URL", "POST", "/Patient", b'{"resourceType": "Observation"}', FHIR_JSON,
     400, "Patient.resourceType"),
    ("unknown type", "POST", "/Patientz", b'{"resourceType": "Patientz"}', FHIR_JSON, 404, None),
    ("xml", "POST", "/Patient", b"<Patient/>", "application/fhir+xml", 415, None),
    ("unknown element", "POST", "/Patient", b'{"resourceType": "Patient", "nmae": []}',
     FHIR_JSON, 422, "Patient.nmae"),
    ("wrong type", "POST", "/Patient", b'{"resourceType": "Patient", "active": "yes"}',
     FHIR_JSON, 422, "Patient.active"),
    ("missing required", "POST", "/Observation",
     b'{"resourceType": "Observation", "code": {"text": "x"}}', FHIR_JSON, 422,
     "Observation.status"),
    ("bad date", "POST", "/Patient", b'{"resourceType": "Patient", "birthDate": "1974-13-45"}',
     FHIR_JSON, 422, "Patient.birthDate"),
    ("bad reference", "POST", "/Observation",
     b'{"resourceType": "Observation", "status": "final", "code": {"text": "x"},'
     b' "subject": {"reference": "Patient 12"}}', FHIR_JSON, 422,
     "Observation.subject.reference"),
    ("dangling contained reference", "POST", "/Observation",
     b'{"resourceType": "Observation", "status": "final", "code": {"text": "x"},'
     b' "subject": {"reference": "#p1"}}', FHIR_JSON, 422, "Observation.subject.reference"),
    ("update id differs", "PUT", "/Patient/a1", b'{"resourceType": "Patient", "id": "b2"}',
     FHIR_JSON, 400, "Patient.id"),
    ("read", "GET", "/Patient/a1", b"", FHIR_JSON, 405, None),
    ("delete", "DELETE", "/Patient/a1", b"", FHIR_JSON, 405, None),
    ("search", "GET", "/Patient", b"", FHIR_JSON, 405, None),
    ("collection at the base", "POST", "", b'{"resourceType": "Bundle", "type": "collection"}',
     FHIR_JSON, 400, "Bundle.type"),
    ("transaction with an invalid entry", "POST", "",
     b'{"resourceType": "Bundle", "type": "transaction", "entry": [{"request": {"method":'
     b' "POST", "url": "Patient"}, "resource": {"resourceType": "Patient", "gender": 7}}]}',
     FHIR_JSON, 422, "Bundle.entry[0].resource.gender"),
    ("unresolved urn in a transaction", "POST", "",
     b'{"resourceType": "Bundle", "type": "transaction", "entry": [{"request": {"method":'
     b' "POST", "url": "Observation"}, "resource": {"resourceType": "Observation", "status":'
     b' "final", "code": {"text": "x"}, "subject": {"reference":'
     b' "urn:uuid:2b5fd7b4-9f35-4f27-a1ee-1c2a3e4f5a6b"}}}]}',
     FHIR_JSON, 422, "Bundle.entry[0].resource.subject.reference"),
    ("no such endpoint", "POST", "/Patient/a1/_history/2", b"{}", FHIR_JSON, 404, None),
]  # fmt: skip


async def test_broken_requests_are_refused_with_an_outcome_naming_the_element(
    start_instance: InstanceFactory, broker: Any, topic_prefix: str, http: aiohttp.ClientSession
) -> None:
    instance = await start_instance(broker.bootstrap)
    base = _base(instance)
    for name, method, where, body, content_type, status, expression in BROKEN:
        got, outcome, _ = await _send(http, method, base + where, body or None, content_type)
        assert got == status, (name, outcome)
        expressions = _expressions(outcome)
        if expression is not None:
            assert expression in expressions, (name, outcome)
        assert all(issue["diagnostics"] for issue in outcome["issue"]), name  # type: ignore[index]
    # Too large: over fhir_max_body_bytes (1 MiB here), answered 413 and still serving.
    small = await start_instance(broker.bootstrap, fhir_max_body_bytes=4096, instance_id="it-2")
    big = orjson.dumps({"resourceType": "Patient", "name": [{"text": "x" * 8000}]})
    got, outcome, _ = await _send(http, "POST", _base(small) + "/Patient", big)
    assert got == 413 and outcome is not None
    got, _, _ = await _send(http, "POST", _base(small) + "/Patient", b'{"resourceType":"Patient"}')
    assert got == 202
    # Nothing refused reached the events topic: only the one accepted Patient.
    events = await read_topic(broker.bootstrap, f"{topic_prefix}.events", min_records=1)
    assert len(events) == 1


async def test_capability_statement_matches_the_endpoints(
    start_instance: InstanceFactory, broker: Any, http: aiohttp.ClientSession
) -> None:
    instance = await start_instance(broker.bootstrap)
    base = _base(instance)
    async with http.get(base + "/metadata") as response:
        assert response.status == 200
        statement = await response.json(content_type=None)
    CapabilityStatement.model_validate(statement)
    assert statement["fhirVersion"] == "4.0.1"
    rest = statement["rest"][0]
    for entry in rest["resource"]:
        name = entry["type"]
        assert [i["code"] for i in entry["interaction"]] == ["create", "update"]
        # create and update exist (accepted, or refused for missing content: never
        # 404/405); read, search and delete do not.
        body = orjson.dumps({"resourceType": name})
        got, outcome, _ = await _send(http, "POST", f"{base}/{name}", body)
        assert got in (202, 422), (name, outcome)
        if got == 422:
            assert {i["code"] for i in outcome["issue"]} <= {"required", "structure"}, outcome  # type: ignore[index]
        body = orjson.dumps({"resourceType": name, "id": "cap1"})
        got, _, _ = await _send(http, "PUT", f"{base}/{name}/cap1", body)
        assert got in (202, 422), name
        for method, where in (
            ("GET", f"/{name}/cap1"),
            ("GET", f"/{name}"),
            ("DELETE", f"/{name}/cap1"),
        ):
            got, _, _ = await _send(http, method, base + where)
            assert got == 405, (method, where)
    assert [i["code"] for i in rest["interaction"]] == ["transaction", "batch"]
    patient = {"resourceType": "Patient", "id": "t1"}
    for kind in ("transaction", "batch"):
        bundle = {
            "resourceType": "Bundle",
            "type": kind,
            "entry": [{"resource": patient, "request": {"method": "PUT", "url": "Patient/t1"}}],
        }
        got, answer, _ = await _send(http, "POST", base, orjson.dumps(bundle))
        assert got == 200 and answer is not None and answer["type"] == f"{kind}-response"
        assert answer["entry"][0]["response"]["status"] == "202 Accepted"
    assert [o["name"] for o in rest["operation"]] == ["process-message"]
    message = {
        "resourceType": "Bundle",
        "type": "message",
        "entry": [
            {
                "fullUrl": "urn:uuid:0c3b4f8e-1d2a-4e5f-9a6b-7c8d9e0f1a2b",
                "resource": {
                    "resourceType": "MessageHeader",
                    "id": "m1",
                    "eventCoding": {"system": "urn:test", "code": "notify"},
                    "source": {"endpoint": "urn:test:ehr"},
                },
            }
        ],
    }
    got, answer, _ = await _send(http, "POST", base + "/$process-message", orjson.dumps(message))
    assert got == 200 and answer is not None
    assert answer["entry"][0]["resource"]["response"] == {"identifier": "m1", "code": "ok"}
    assert statement["format"] == ["application/fhir+json", "json"]


async def test_a_retried_create_is_answered_like_the_first_and_published_once(
    start_instance: InstanceFactory,
    broker: Any,
    topic_prefix: str,
    examples_dir: Path,
    http: aiohttp.ClientSession,
) -> None:
    instance = await start_instance(broker.bootstrap)
    base = _base(instance)
    body = (examples_dir / "Observation-f001.json").read_bytes()
    answers = await asyncio.gather(
        *(_send(http, "POST", base + "/Observation", body) for _ in range(5))
    )
    ids = {headers["X-Event-Id"] for status, _, headers in answers if status == 202}
    assert [a[0] for a in answers] == [202] * 5 and len(ids) == 1
    # The same request id with a re-serialised body (other whitespace) is the same request.
    again = json.dumps(json.loads(body), indent=4).encode()
    status, _, headers = await _send(
        http, "POST", base + "/Observation", again, headers={"X-Request-Id": "r-1"}
    )
    assert status == 202
    first = headers["X-Event-Id"]
    status, _, headers = await _send(
        http, "POST", base + "/Observation", again, headers={"X-Request-Id": "r-1"}
    )
    assert (status, headers["X-Event-Id"]) == (202, first)
    other = body.replace(b'"final"', b'"amended"')
    status, outcome, _ = await _send(
        http, "POST", base + "/Observation", other, headers={"X-Request-Id": "r-1"}
    )
    assert status == 409 and outcome is not None
    assert outcome["issue"][0]["code"] == "conflict"
    events = await read_topic(broker.bootstrap, f"{topic_prefix}.events", min_records=2)
    event_ids = sorted(dict(r.headers)["ce_id"].decode() for r in events)
    assert event_ids == sorted({*ids, first})


async def test_broker_outage_answers_503_with_retry_after_then_accepts(
    start_instance: InstanceFactory, own_broker: Any, topic_prefix: str, http: aiohttp.ClientSession
) -> None:
    instance = await start_instance(
        own_broker.bootstrap, kafka_publish_timeout_s=2.0, fhir_retry_after_s=7
    )
    base = _base(instance)
    body = b'{"resourceType": "Patient", "id": "p503", "active": true}'
    status, _, _ = await _send(http, "PUT", base + "/Patient/p503", body)
    assert status == 202
    await asyncio.to_thread(own_broker.stop)
    status, outcome, headers = await _send(
        http, "PUT", base + "/Patient/p503", body.replace(b"true", b"false")
    )
    assert status == 503 and headers["Retry-After"] == "7"
    assert outcome is not None and outcome["issue"][0]["code"] == "transient"
    await asyncio.to_thread(own_broker.start)
    await ensure_topics(own_broker.bootstrap, instance.topics.all(), partitions=3)
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        status, _, headers = await _send(
            http, "PUT", base + "/Patient/p503", body.replace(b"true", b"false")
        )
        if status == 202 or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.5)
    assert status == 202
    events = await read_topic(own_broker.bootstrap, f"{topic_prefix}.events", min_records=1)
    assert [dict(r.headers)["ce_id"].decode() for r in events] == [headers["X-Event-Id"]]
    data = orjson.loads(events[0].value)
    assert data["entry"][1]["resource"] == {
        "resourceType": "Patient",
        "id": "p503",
        "active": False,
    }


async def test_fhir_over_https_with_client_certificates(
    start_instance: InstanceFactory,
    broker: Any,
    topic_prefix: str,
    examples_dir: Path,
    tls_cert: tuple[Path, Path],
) -> None:
    import ssl

    cert, key = tls_cert
    instance = await start_instance(
        broker.bootstrap,
        http_tls_cert_file=cert,
        http_tls_key_file=key,
        http_tls_client_ca_file=cert,  # the test's one cert signs itself: client cert too
    )
    assert instance.http_url.startswith("https://")
    url = instance.http_url.replace("0.0.0.0", "127.0.0.1") + "/fhir/Observation"
    body = (examples_dir / "Observation-f001.json").read_bytes()
    trusted = ssl.create_default_context(cafile=str(cert))  # names 127.0.0.1 too
    trusted.load_cert_chain(cert, key)
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trusted)) as https,
        https.post(url, data=body, headers={"Content-Type": FHIR_JSON}) as response,
    ):
        assert response.status == 202
        event_id = response.headers["X-Event-Id"]
    records = await read_topic(broker.bootstrap, f"{topic_prefix}.events", min_records=1)
    assert [dict(r.headers)["ce_id"].decode() for r in records] == [event_id]

    anonymous = ssl.create_default_context(cafile=str(cert))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=anonymous)) as https:
        with pytest.raises(aiohttp.ClientError):  # no client certificate: no handshake
            async with https.post(url, data=body, headers={"Content-Type": FHIR_JSON}):
                pass
    async with aiohttp.ClientSession() as plain:  # plain HTTP on the HTTPS port
        with pytest.raises(aiohttp.ClientError):
            async with plain.post(url.replace("https://", "http://"), data=body):
                pass
