"""The FHIR REST ingest contract (bridge/fhir_ingest.py) with an in-memory publisher:
202 Accepted, event ids, duplicates, X-Request-Id, refusals, Bundles, Kafka down."""

from __future__ import annotations

import asyncio
import copy
import json
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest

from bridge.dedupe import DuplicateFilter
from bridge.fhir_ingest import Answer, FhirIngest, FhirIngestSettings
from bridge.kafka import OutRecord, Topics
from bridge.metrics import BridgeMetrics
from tests.fakes import FakePublisher

pytestmark = pytest.mark.timeout(30)

CORPUS = (
    Path(__file__).resolve().parents[2].parent
    / "shared"
    / "corpus"
    / "hl7-fhir-r4-examples"
    / "package"
)
BASE = "http://bridge.test/fhir"
RAW_TOPIC = "t.raw.fhir"
EVENTS_TOPIC = "t.events"
RETRY_AFTER_S = 7
RESTFUL_INTERACTION = "http://hl7.org/fhir/restful-interaction"
MESSAGE_FILE = "Bundle-10bb101f-a121-4264-a920-67be9cb82c74.json"


@pytest.fixture
def ingest(publisher: FakePublisher, metrics: BridgeMetrics) -> FhirIngest:
    settings = FhirIngestSettings(topics=Topics("t"), instance_id="u1", retry_after_s=RETRY_AFTER_S)
    return FhirIngest(settings, publisher, DuplicateFilter(window_s=60, max_entries=100), metrics)


def corpus(name: str) -> bytes:
    return (CORPUS / name).read_bytes()


def headers_of(record: OutRecord) -> dict[str, str]:
    return {name: value.decode() for name, value in record.headers}


def requests(metrics: BridgeMetrics, interaction: str, status: int) -> float:
    value = metrics.registry.get_sample_value(
        "hl7bridge_fhir_requests_total", {"interaction": interaction, "status": str(status)}
    )
    return 0.0 if value is None else value


def issues_of(answer: Answer) -> list[dict[str, Any]]:
    assert answer.body is not None
    assert answer.body["resourceType"] == "OperationOutcome"
    issues: list[dict[str, Any]] = answer.body["issue"]
    return issues


def expressions(answer: Answer) -> list[str]:
    return [e for issue in issues_of(answer) for e in issue.get("expression", [])]


def observation(**elements: Any) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": {"reference": "Patient/p1"},
        "valueQuantity": {"value": 72, "unit": "/min"},
    }
    resource.update(elements)
    return resource


def dumps(value: Any) -> bytes:
    return json.dumps(value).encode()


# --- create ---------------------------------------------------------------------------


async def test_create_publishes_the_raw_body_and_a_message_bundle(
    ingest: FhirIngest, publisher: FakePublisher, metrics: BridgeMetrics
) -> None:
    body = corpus("Observation-f001.json")
    original = json.loads(body)
    assert original["subject"]["reference"] == "Patient/f001"

    answer = await ingest.write("create", "Observation", None, body, base=BASE)

    assert answer.status == 202
    event_id = answer.headers["X-Event-Id"]
    assert str(uuid.UUID(event_id)) == event_id
    location = answer.headers["Content-Location"]
    type_name, _, assigned = location.partition("/")
    assert type_name == "Observation"
    assert assigned == original["id"]  # an id the client sent is kept
    # The default answer is an informational OperationOutcome.
    (note,) = issues_of(answer)
    assert (note["severity"], note["code"]) == ("information", "informational")

    assert publisher.calls == 1
    (batch,) = publisher.batches
    assert [r.topic for r in batch] == [RAW_TOPIC, EVENTS_TOPIC]
    raw, event = batch
    assert raw.value == body

    data = orjson.loads(event.value)
    assert data["resourceType"] == "Bundle"
    assert data["type"] == "message"
    assert len(data["entry"]) == 2
    header = data["entry"][0]["resource"]
    assert header["resourceType"] == "MessageHeader"
    assert header["eventCoding"] == {"system": RESTFUL_INTERACTION, "code": "create"}
    assert header["focus"] == [{"reference": data["entry"][1]["fullUrl"]}]
    assert data["entry"][0]["fullUrl"] == f"urn:uuid:{header['id']}"
    assert data["entry"][1]["fullUrl"] == f"{BASE}/Observation/{assigned}"
    written = data["entry"][1]["resource"]
    assert written["id"] == assigned
    assert {k: v for k, v in written.items() if k != "id"} == {
        k: v for k, v in original.items() if k != "id"
    }

    headers = headers_of(event)
    assert headers["ce_id"] == event_id
    assert headers["ce_type"] == "org.hl7bridge.fhir.Observation"
    assert headers["ce_fhirinteraction"] == "create"
    assert headers["content-type"] == "application/fhir+json"
    assert headers["ce_subject"] == "Patient/f001"
    assert headers["ce_source"] == "urn:hl7bridge:fhir"
    assert headers["ce_bridgeinstance"] == "u1"
    assert event.key == b"Patient/f001"
    assert event.key == headers["ce_subject"].encode()

    raw_headers = headers_of(raw)
    assert raw_headers["ce_type"] == "org.hl7bridge.fhir.raw"
    assert raw_headers["ce_subject"] == "Patient/f001"
    assert "ce_fhirinteraction" not in raw_headers
    assert raw.key == b"Patient/f001"

    assert requests(metrics, "create", 202) == 1


async def test_create_again_is_a_duplicate(
    ingest: FhirIngest, publisher: FakePublisher, metrics: BridgeMetrics
) -> None:
    body = corpus("Observation-f001.json")
    first = await ingest.write("create", "Observation", None, body, base=BASE)
    again = await ingest.write("create", "Observation", None, body, base=BASE)
    assert again.status == 202
    assert again.headers["X-Event-Id"] == first.headers["X-Event-Id"]
    assert again.headers["Content-Location"] == first.headers["Content-Location"]
    assert publisher.calls == 1
    assert len(publisher.records) == 2
    duplicates = metrics.registry.get_sample_value(
        "hl7bridge_duplicates_total", {"channel": "fhir"}
    )
    assert duplicates == 1

    # Key order and whitespace do not make another write.
    reordered = json.dumps(dict(reversed(list(json.loads(body).items()))), indent=4).encode()
    same = await ingest.write("create", "Observation", None, reordered, base=BASE)
    assert same.headers["X-Event-Id"] == first.headers["X-Event-Id"]
    assert publisher.calls == 1

    other = json.loads(body)
    other["status"] = "amended"
    third = await ingest.write("create", "Observation", None, dumps(other), base=BASE)
    assert third.status == 202
    assert third.headers["X-Event-Id"] != first.headers["X-Event-Id"]
    assert publisher.calls == 2
    assert len(publisher.on(EVENTS_TOPIC)) == 2
    assert requests(metrics, "create", 202) == 4


async def test_create_without_an_id_gets_a_deterministic_one(
    ingest: FhirIngest, publisher: FakePublisher
) -> None:
    resource = json.loads(corpus("Observation-f001.json"))
    del resource["id"]
    first = await ingest.write("create", "Observation", None, dumps(resource), base=BASE)
    type_name, _, assigned = first.headers["Content-Location"].partition("/")
    assert type_name == "Observation" and str(uuid.UUID(assigned)) == assigned
    (event,) = publisher.on(EVENTS_TOPIC)
    assert orjson.loads(event.value)["entry"][1]["resource"]["id"] == assigned
    again = await ingest.write("create", "Observation", None, dumps(resource), base=BASE)
    assert again.headers["Content-Location"] == first.headers["Content-Location"]
    assert publisher.calls == 1


async def test_request_id_makes_a_retry_a_duplicate(
    ingest: FhirIngest, publisher: FakePublisher
) -> None:
    body = dumps(observation())
    first = await ingest.write("create", "Observation", None, body, base=BASE, request_id="r-1")
    again = await ingest.write("create", "Observation", None, body, base=BASE, request_id="r-1")
    assert (first.status, again.status) == (202, 202)
    assert again.headers["X-Event-Id"] == first.headers["X-Event-Id"]
    assert publisher.calls == 1
    # Another request id is another write, even with the same content.
    other = await ingest.write("create", "Observation", None, body, base=BASE, request_id="r-2")
    assert other.status == 202
    assert other.headers["X-Event-Id"] != first.headers["X-Event-Id"]
    assert publisher.calls == 2


async def test_request_id_reused_with_other_content_is_409(
    ingest: FhirIngest, publisher: FakePublisher, metrics: BridgeMetrics
) -> None:
    first = await ingest.write(
        "create", "Observation", None, dumps(observation()), base=BASE, request_id="r-1"
    )
    assert first.status == 202
    answer = await ingest.write(
        "create",
        "Observation",
        None,
        dumps(observation(status="amended")),
        base=BASE,
        request_id="r-1",
    )
    assert answer.status == 409
    (issue,) = issues_of(answer)
    assert (issue["severity"], issue["code"]) == ("error", "conflict")
    assert "X-Event-Id" not in answer.headers
    assert publisher.calls == 1
    assert len(publisher.records) == 2
    assert requests(metrics, "create", 409) == 1


async def test_one_request_id_from_two_sources_is_two_requests(
    ingest: FhirIngest, publisher: FakePublisher
) -> None:
    # A request id is the client's: two sources (meta.source) may both use "r-1".
    # The event id includes the source, so the two events never share a ce_id.
    first = await ingest.write(
        "create",
        "Observation",
        None,
        dumps(observation(meta={"source": "http://a.example/lab"})),
        base=BASE,
        request_id="r-1",
    )
    second = await ingest.write(
        "create",
        "Observation",
        None,
        dumps(observation(status="amended", meta={"source": "http://b.example/lab"})),
        base=BASE,
        request_id="r-1",
    )
    assert (first.status, second.status) == (202, 202)
    ids = [headers_of(r)["ce_id"] for r in publisher.on(EVENTS_TOPIC)]
    assert len(ids) == 2 and len(set(ids)) == 2, "two different events with one ce_id"
    assert ids == [first.headers["X-Event-Id"], second.headers["X-Event-Id"]]


# --- update -----------------------------------------------------------------------------


async def test_update_keeps_the_id(ingest: FhirIngest, publisher: FakePublisher) -> None:
    body = corpus("Patient-example.json")
    answer = await ingest.write("update", "Patient", "example", body, base=BASE)
    assert answer.status == 202
    assert answer.headers["Content-Location"] == "Patient/example"
    (event,) = publisher.on(EVENTS_TOPIC)
    headers = headers_of(event)
    assert headers["ce_fhirinteraction"] == "update"
    assert headers["ce_type"] == "org.hl7bridge.fhir.Patient"
    assert headers["ce_subject"] == "Patient/example"
    assert event.key == b"Patient/example"
    data = orjson.loads(event.value)
    header = data["entry"][0]["resource"]
    assert header["eventCoding"] == {"system": RESTFUL_INTERACTION, "code": "update"}
    assert data["entry"][1]["fullUrl"] == f"{BASE}/Patient/example"
    assert data["entry"][1]["resource"] == json.loads(body)


async def test_update_id_must_match_the_url(
    ingest: FhirIngest, publisher: FakePublisher, metrics: BridgeMetrics
) -> None:
    body = corpus("Patient-example.json")
    answer = await ingest.write("update", "Patient", "other", body, base=BASE)
    assert answer.status == 400
    (issue,) = issues_of(answer)
    assert issue["expression"] == ["Patient.id"]
    assert issue["severity"] == "error"
    no_id = json.loads(body)
    del no_id["id"]
    answer = await ingest.write("update", "Patient", "example", dumps(no_id), base=BASE)
    assert answer.status == 400
    assert expressions(answer) == ["Patient.id"]
    assert publisher.calls == 0
    assert requests(metrics, "update", 400) == 2


async def test_resource_type_must_match_the_url(
    ingest: FhirIngest, publisher: FakePublisher
) -> None:
    body = corpus("Patient-example.json")
    answer = await ingest.write("update", "Observation", "example", body, base=BASE)
    assert answer.status == 400
    assert expressions(answer) == ["Observation.resourceType"]
    answer = await ingest.write("create", "Observation", None, body, base=BASE)
    assert answer.status == 400
    assert expressions(answer) == ["Observation.resourceType"]
    assert publisher.calls == 0


async def test_invalid_content_is_422_with_one_issue_per_problem(
    ingest: FhirIngest, publisher: FakePublisher, metrics: BridgeMetrics
) -> None:
    patient = {
        "resourceType": "Patient",
        "id": "p1",
        "foo": "x",
        "birthDate": "1980-13-01",
        "managingOrganization": {"reference": "not a reference"},
    }
    answer = await ingest.write("update", "Patient", "p1", dumps(patient), base=BASE)
    assert answer.status == 422
    issues = issues_of(answer)
    assert len(issues) == 3
    assert {(i["code"], i["expression"][0]) for i in issues} == {
        ("structure", "Patient.foo"),
        ("value", "Patient.birthDate"),
        ("value", "Patient.managingOrganization.reference"),
    }
    assert all(i["severity"] == "error" for i in issues)
    assert "1980-13-01" not in json.dumps(answer.body)
    assert publisher.calls == 0
    assert requests(metrics, "update", 422) == 1


@pytest.mark.parametrize(
    ("body", "code"),
    [(b"", "structure"), (b"{not json", "structure"), (b'{"id": "x"}', "required")],
)
async def test_unparseable_body_is_400(
    ingest: FhirIngest, publisher: FakePublisher, body: bytes, code: str
) -> None:
    answer = await ingest.write("create", "Observation", None, body, base=BASE)
    assert answer.status == 400
    assert [i["code"] for i in issues_of(answer)] == [code]
    assert publisher.calls == 0


async def test_unknown_contained_resource_type_is_422_not_a_crash(
    ingest: FhirIngest, publisher: FakePublisher
) -> None:
    patient = {"resourceType": "Patient", "contained": [{"resourceType": "Foo", "id": "x"}]}
    # validate_resource raised KeyError('R4.FooType') through FhirIngest.write.
    answer = await ingest.write("create", "Patient", None, dumps(patient), base=BASE)
    assert answer.status == 422
    assert "Patient.contained[0].resourceType" in expressions(answer)
    assert publisher.calls == 0


# --- Prefer -----------------------------------------------------------------------------


async def test_prefer_representation_and_minimal(ingest: FhirIngest) -> None:
    body = dumps(observation())
    full = await ingest.write(
        "create", "Observation", None, body, base=BASE, prefer="representation"
    )
    assert full.status == 202
    assert full.body is not None
    assigned = full.headers["Content-Location"].removeprefix("Observation/")
    assert full.body["id"] == assigned
    assert {k: v for k, v in full.body.items() if k != "id"} == observation()

    minimal = await ingest.write(
        "create",
        "Observation",
        None,
        dumps(observation(status="amended")),
        base=BASE,
        prefer="minimal",
    )
    assert minimal.status == 202
    assert minimal.body is None
    assert "X-Event-Id" in minimal.headers
    assert minimal.headers["Content-Location"].startswith("Observation/")


# --- Kafka down ---------------------------------------------------------------------


async def test_publisher_failure_is_503_and_not_remembered(
    ingest: FhirIngest, publisher: FakePublisher, metrics: BridgeMetrics
) -> None:
    body = corpus("Observation-f001.json")
    publisher.fail_next = 1
    answer = await ingest.write("create", "Observation", None, body, base=BASE, request_id="r-9")
    assert answer.status == 503
    assert answer.headers["Retry-After"] == str(RETRY_AFTER_S)
    (issue,) = issues_of(answer)
    assert (issue["severity"], issue["code"]) == ("error", "transient")
    assert publisher.records == []
    assert requests(metrics, "create", 503) == 1

    retry = await ingest.write("create", "Observation", None, body, base=BASE, request_id="r-9")
    assert retry.status == 202
    assert "Retry-After" not in retry.headers
    assert publisher.calls == 2
    assert len(publisher.on(EVENTS_TOPIC)) == 1
    assert len(publisher.on(RAW_TOPIC)) == 1
    assert headers_of(publisher.on(EVENTS_TOPIC)[0])["ce_id"] == retry.headers["X-Event-Id"]
    duplicates = metrics.registry.get_sample_value(
        "hl7bridge_duplicates_total", {"channel": "fhir"}
    )
    assert duplicates in (None, 0.0)


async def test_publisher_failure_of_a_transaction_is_503(
    ingest: FhirIngest, publisher: FakePublisher
) -> None:
    body = corpus("Bundle-xds.json")
    publisher.fail_next = 1
    answer = await ingest.bundle(body, base=BASE)
    assert answer.status == 503
    assert answer.headers["Retry-After"] == str(RETRY_AFTER_S)
    assert [i["code"] for i in issues_of(answer)] == ["transient"]
    retry = await ingest.bundle(body, base=BASE)
    assert retry.status == 200
    assert len(publisher.on(EVENTS_TOPIC)) == 1


# --- transaction --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["Bundle-xds.json", "Bundle-hla-1.json"])
async def test_transaction_is_one_event(
    ingest: FhirIngest, publisher: FakePublisher, metrics: BridgeMetrics, name: str
) -> None:
    body = corpus(name)
    request = json.loads(body)
    answer = await ingest.bundle(body, base=BASE)

    assert answer.status == 200
    assert answer.body is not None
    assert answer.body["resourceType"] == "Bundle"
    assert answer.body["type"] == "transaction-response"
    responses = [e["response"] for e in answer.body["entry"]]
    assert len(responses) == len(request["entry"])
    assert [r["status"] for r in responses] == ["202 Accepted"] * len(request["entry"])
    event_id = answer.headers["X-Event-Id"]

    assert publisher.calls == 1
    assert len(publisher.on(RAW_TOPIC)) == 1
    assert publisher.on(RAW_TOPIC)[0].value == body
    (event,) = publisher.on(EVENTS_TOPIC)
    headers = headers_of(event)
    assert headers["ce_id"] == event_id
    assert headers["ce_fhirinteraction"] == "transaction"
    assert headers["ce_type"] == "org.hl7bridge.fhir.transaction"
    data = orjson.loads(event.value)
    assert data["type"] == "message"
    header = data["entry"][0]["resource"]
    assert header["resourceType"] == "MessageHeader"
    assert header["eventCoding"] == {"system": RESTFUL_INTERACTION, "code": "transaction"}
    written = data["entry"][1:]
    assert len(written) == len(request["entry"])
    assert header["focus"] == [{"reference": e["fullUrl"]} for e in written]
    for sent, out, response in zip(request["entry"], written, responses, strict=True):
        resource = out["resource"]
        assert resource["resourceType"] == sent["resource"]["resourceType"]
        assert out["fullUrl"] == sent["fullUrl"]
        assert response["location"] == f"{resource['resourceType']}/{resource['id']}"
        assert sent["request"]["method"] == "POST"
        assert {k: v for k, v in resource.items() if k != "id"} == {
            k: v for k, v in sent["resource"].items() if k != "id"
        }
    assert requests(metrics, "transaction", 200) == 1

    again = await ingest.bundle(body, base=BASE)
    assert again.status == 200
    assert again.headers["X-Event-Id"] == event_id
    assert publisher.calls == 1


async def test_transaction_with_an_invalid_entry_is_422(
    ingest: FhirIngest, publisher: FakePublisher, metrics: BridgeMetrics
) -> None:
    bundle = json.loads(corpus("Bundle-xds.json"))
    bundle["entry"][1]["resource"]["bogusElement"] = True
    bundle["entry"][3]["resource"]["birthDate"] = "1970-02-31"
    answer = await ingest.bundle(dumps(bundle), base=BASE)
    assert answer.status == 422
    assert expressions(answer) == [
        "Bundle.entry[1].resource.bogusElement",
        "Bundle.entry[3].resource.birthDate",
    ]
    assert publisher.calls == 0
    assert requests(metrics, "transaction", 422) == 1


async def test_transaction_with_reads_and_deletes_is_422(
    ingest: FhirIngest, publisher: FakePublisher
) -> None:
    answer = await ingest.bundle(corpus("Bundle-bundle-transaction.json"), base=BASE)
    assert answer.status == 422
    issues = issues_of(answer)
    methods = [
        (i["code"], i["expression"][0])
        for i in issues
        if i["expression"][0].endswith(".request.method")
    ]
    # Entries 5 and 6 are DELETEs, 8 and 9 GETs.
    assert methods == [
        ("not-supported", "Bundle.entry[5].request.method"),
        ("not-supported", "Bundle.entry[6].request.method"),
        ("not-supported", "Bundle.entry[8].request.method"),
        ("not-supported", "Bundle.entry[9].request.method"),
    ]
    # Also refused: entry 3 (a conditional PUT) and entry 7 (POST ValueSet/$lookup with
    # a Parameters); the POSTs and PUTs of entries 0, 1, 2 and 4 are not named.
    named = {e.split(".", 2)[1] for i in issues for e in i["expression"]}
    assert named == {"entry[3]", "entry[5]", "entry[6]", "entry[7]", "entry[8]", "entry[9]"}
    assert all(i["severity"] == "error" for i in issues)
    assert publisher.calls == 0


async def test_transaction_allows_conditional_references(
    ingest: FhirIngest, publisher: FakePublisher
) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "request": {"method": "POST", "url": "Observation"},
                "resource": observation(
                    subject={"reference": "Patient?identifier=http://hospital.example/mrn|1"}
                ),
            }
        ],
    }
    answer = await ingest.bundle(dumps(bundle), base=BASE)
    assert answer.status == 200
    assert publisher.calls == 1


# --- batch ----------------------------------------------------------------------------


async def test_batch_is_answered_entry_by_entry(
    ingest: FhirIngest, publisher: FakePublisher, metrics: BridgeMetrics
) -> None:
    invalid = observation()
    del invalid["status"]
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"request": {"method": "POST", "url": "Observation"}, "resource": observation()},
            {"request": {"method": "POST", "url": "Observation"}, "resource": invalid},
            {"request": {"method": "GET", "url": "Patient/p1"}},
        ],
    }
    body = dumps(bundle)
    answer = await ingest.bundle(body, base=BASE)

    assert answer.status == 200
    assert answer.body is not None
    assert answer.body["type"] == "batch-response"
    responses = [e["response"] for e in answer.body["entry"]]
    assert [r["status"] for r in responses] == [
        "202 Accepted",
        "422 Unprocessable Entity",
        "405 Method Not Allowed",
    ]
    assert responses[0]["location"].startswith("Observation/")
    assert [(i["code"], i["expression"]) for i in responses[1]["outcome"]["issue"]] == [
        ("required", ["Bundle.entry[1].resource.status"])
    ]
    assert [(i["code"], i["expression"]) for i in responses[2]["outcome"]["issue"]] == [
        ("not-supported", ["Bundle.entry[2].request.method"])
    ]

    assert publisher.calls == 1
    assert len(publisher.on(RAW_TOPIC)) == 1
    assert publisher.on(RAW_TOPIC)[0].value == body
    (event,) = publisher.on(EVENTS_TOPIC)
    data = orjson.loads(event.value)
    assert data["entry"][0]["resource"]["eventCoding"]["code"] == "create"
    assigned = data["entry"][1]["resource"]["id"]
    assert responses[0]["location"] == f"Observation/{assigned}"
    assert responses[0]["etag"] == f'W/"{headers_of(event)["ce_id"]}"'
    assert headers_of(event)["ce_fhirinteraction"] == "create"
    assert requests(metrics, "batch", 200) == 1


async def test_batch_with_two_identical_entries_does_not_hang(
    ingest: FhirIngest, publisher: FakePublisher
) -> None:
    # Both entries have one identity (no X-Request-Id, same content): the second
    # waited on the first's pending attempt, which finishes only after the loop.
    entry = {"request": {"method": "POST", "url": "Observation"}, "resource": observation()}
    bundle = {"resourceType": "Bundle", "type": "batch", "entry": [entry, copy.deepcopy(entry)]}
    try:
        answer = await asyncio.wait_for(ingest.bundle(dumps(bundle), base=BASE), timeout=5)
    except TimeoutError:
        pytest.fail("FhirIngest.bundle hung on a batch with two identical entries")
    assert answer.status == 200
    assert answer.body is not None
    assert [e["response"]["status"] for e in answer.body["entry"]] == ["202 Accepted"] * 2


# --- messages -------------------------------------------------------------------------


@pytest.mark.parametrize("process_message", [True, False])
async def test_message_is_published_as_received_and_answered(
    ingest: FhirIngest, publisher: FakePublisher, metrics: BridgeMetrics, process_message: bool
) -> None:
    body = corpus(MESSAGE_FILE)
    request = json.loads(body)
    request_header = request["entry"][0]["resource"]
    answer = await ingest.bundle(body, base=BASE, process_message=process_message)

    assert answer.status == 200
    assert answer.body is not None
    assert answer.body["resourceType"] == "Bundle"
    assert answer.body["type"] == "message"
    header = answer.body["entry"][0]["resource"]
    assert header["resourceType"] == "MessageHeader"
    assert header["response"]["identifier"] == request_header["id"]
    assert header["response"]["code"] == "ok"
    assert header["eventCoding"] == request_header["eventCoding"]
    assert header["destination"] == [{"endpoint": request_header["source"]["endpoint"]}]
    assert header["source"]["endpoint"] == BASE
    event_id = answer.headers["X-Event-Id"]

    assert publisher.calls == 1
    (raw,) = publisher.on(RAW_TOPIC)
    assert raw.value == body
    (event,) = publisher.on(EVENTS_TOPIC)
    assert orjson.loads(event.value) == request
    headers = headers_of(event)
    assert headers["ce_id"] == event_id
    assert headers["ce_fhirinteraction"] == "message"
    assert headers["ce_source"] == request_header["source"]["endpoint"]
    assert requests(metrics, "message", 200) == 1


async def test_message_must_start_with_its_message_header(
    ingest: FhirIngest, publisher: FakePublisher, metrics: BridgeMetrics
) -> None:
    bundle = json.loads(corpus(MESSAGE_FILE))
    bundle["entry"] = bundle["entry"][1:] + bundle["entry"][:1]
    answer = await ingest.bundle(dumps(bundle), base=BASE, process_message=True)
    assert answer.status == 422
    assert expressions(answer) == ["Bundle.entry[0]"]
    assert publisher.calls == 0
    assert requests(metrics, "message", 422) == 1


@pytest.mark.parametrize("process_message", [True, False])
async def test_collection_bundle_to_the_base_is_400(
    ingest: FhirIngest, publisher: FakePublisher, process_message: bool
) -> None:
    answer = await ingest.bundle(
        corpus("Bundle-lipids.json"), base=BASE, process_message=process_message
    )
    assert answer.status == 400
    assert expressions(answer) == ["Bundle.type"]
    assert publisher.calls == 0


async def test_transaction_to_process_message_is_400(
    ingest: FhirIngest, publisher: FakePublisher
) -> None:
    answer = await ingest.bundle(corpus("Bundle-xds.json"), base=BASE, process_message=True)
    assert answer.status == 400
    assert expressions(answer) == ["Bundle.type"]
    assert publisher.calls == 0


async def test_a_resource_to_the_base_is_400(ingest: FhirIngest) -> None:
    answer = await ingest.bundle(corpus("Patient-example.json"), base=BASE)
    assert answer.status == 400
    assert expressions(answer) == ["Bundle.resourceType"]


# --- metrics --------------------------------------------------------------------------


async def test_requests_are_counted_by_interaction_and_status(
    ingest: FhirIngest, metrics: BridgeMetrics
) -> None:
    body = corpus("Observation-f001.json")
    await ingest.write("create", "Observation", None, body, base=BASE)
    await ingest.write("create", "Observation", None, body, base=BASE)
    await ingest.write("update", "Observation", "wrong-id", body, base=BASE)
    await ingest.bundle(corpus("Bundle-bundle-transaction.json"), base=BASE)
    assert requests(metrics, "create", 202) == 2
    assert requests(metrics, "update", 400) == 1
    assert requests(metrics, "transaction", 422) == 1
    assert metrics.fhir_requests.labels("create", "202")._value.get() == 2
    text = metrics.render().decode()
    assert 'hl7bridge_fhir_requests_total{interaction="create",status="202"} 2.0' in text
    assert 'hl7bridge_fhir_requests_total{interaction="update",status="400"} 1.0' in text
