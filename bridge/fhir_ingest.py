"""FHIR REST ingest: validate, identify, deduplicate, publish, answer (no HTTP here).

The bridge relays; it does not store. A write is accepted once Kafka has
acknowledged it (acks=all) and is answered ``202 Accepted``: the resource is on
its way to the consumers, not readable here, so ``201 Created`` (which promises a
``Location`` that can be read) would not be true. Every accepted write answers
with the event's id in ``X-Event-Id``; the body follows ``Prefer`` (``return=
OperationOutcome`` by default, ``representation`` or ``minimal``).

What is published (DESIGN.md §3), with the same shape as HL7 v2 traffic:

* ``<prefix>.raw.fhir``: the request body exactly as received, once per request;
* ``<prefix>.events``: a FHIR ``message`` Bundle per event: a MessageHeader
  (``eventCoding`` from http://hl7.org/fhir/restful-interaction, ``focus`` on the
  written resources) and the resources. One event per created or updated
  resource (also per batch entry); one per transaction (it stays atomic); a
  FHIR message Bundle is published as it came.

Identity and duplicates: a request's identity is its ``X-Request-Id`` header when
it has one (per entry of a batch: the id and the entry's index), else what it
writes: interaction, type, id and a digest of the content. The event id is a
UUIDv5 of the identity, so a retry yields the same ``ce_id``; a retry within the
dedupe window is answered like the first and not published again; an
``X-Request-Id`` reused with other content is refused (409), because publishing
it would give two different events one id.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import concurrent.futures.process
import hashlib
import logging
import multiprocessing
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol

import orjson

from adapters.fhir.validation import (
    ID_RE,
    FhirRequestError,
    Issue,
    errors_in,
    is_resource_type,
    operation_outcome,
    parse_json,
    validate_resource,
)
from bridge.dedupe import DuplicateFilter
from bridge.envelope import ID_NAMESPACE, TYPE_PREFIX, EventAttributes, now_rfc3339
from bridge.errors import UnavailableError, describe_failure
from bridge.kafka import Delivered, OutRecord, Topics
from bridge.metrics import BridgeMetrics

log = logging.getLogger(__name__)

CHANNEL: Final = "fhir"
RESTFUL_INTERACTION: Final = "http://hl7.org/fhir/restful-interaction"
RAW_TYPE: Final = f"{TYPE_PREFIX}.fhir.raw"
#: ``ce_source`` of a write whose resource names no ``meta.source``.
DEFAULT_SOURCE: Final = "urn:hl7bridge:fhir"
#: Resource elements that name the patient a resource belongs to, in order.
_PATIENT_ELEMENTS: Final = ("subject", "patient", "beneficiary", "individual")
_WRITE_METHODS: Final = frozenset({"POST", "PUT"})
_STATUS_TEXT: Final = {
    202: "202 Accepted",
    400: "400 Bad Request",
    404: "404 Not Found",
    405: "405 Method Not Allowed",
    409: "409 Conflict",
    422: "422 Unprocessable Entity",
}

Interaction = Literal["create", "update"]
Prefer = Literal["OperationOutcome", "representation", "minimal"]


class Publisher(Protocol):
    async def publish(self, records: Sequence[OutRecord]) -> list[Delivered]: ...


@dataclass(frozen=True, slots=True)
class FhirIngestSettings:
    topics: Topics
    instance_id: str
    #: Seconds a client is told to wait (Retry-After) when Kafka cannot take a write.
    retry_after_s: int = 10


@dataclass(slots=True)
class Answer:
    """What the HTTP edge sends back."""

    status: int
    body: dict[str, Any] | None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class _Write:
    """One validated resource write, identified, ready to become an event."""

    interaction: Interaction
    resource: dict[str, Any]
    identity: tuple[str, ...]
    digest: bytes
    source: str
    event_id: str = ""
    warnings: list[Issue] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.event_id = event_id_of(self.source, self.identity)

    @property
    def dedupe_key(self) -> tuple[str, str]:
        return (self.source, "\x1f".join(self.identity))


def validate_write(resource: Mapping[str, Any], path: str) -> list[Issue]:
    """The issues of a resource written with create or update (a Bundle stored as a
    resource resolves its ``urn:`` references among its own entries)."""
    urls: frozenset[str] = frozenset()
    if resource.get("resourceType") == "Bundle":
        urls = frozenset(
            e["fullUrl"]
            for e in resource.get("entry") or ()
            if isinstance(e, Mapping) and isinstance(e.get("fullUrl"), str)
        )
    return validate_resource(resource, path=path, bundle_urls=urls)


def validate_write_body(body: bytes) -> list[Issue]:
    """:func:`validate_write` from the body's bytes: what a worker process runs."""
    resource = parse_json(body)
    return validate_write(resource, str(resource["resourceType"]))


class ProcessValidator:
    """Validation of large bodies in one worker process (started on first use)."""

    def __init__(self) -> None:
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None

    async def __call__(self, body: bytes) -> list[Issue]:
        if self._pool is None:
            context = multiprocessing.get_context("forkserver")
            self._pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=context)
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, validate_write_body, body)
        except concurrent.futures.process.BrokenProcessPool:
            self._pool = None  # a dead worker: the next call starts another
            raise FhirRequestError.one(
                503, "transient", "the validation worker stopped; retry"
            ) from None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def event_id_of(source: str, identity: Sequence[str]) -> str:
    """The event id of a write: a UUIDv5 of its source and identity (a request id is
    the client's, so two sources may use the same one)."""
    return str(uuid.uuid5(ID_NAMESPACE, "\x1f".join(("fhir", source, *identity))))


def digest_of(value: Any) -> bytes:
    """Content digest, independent of key order and whitespace."""
    return hashlib.blake2b(
        orjson.dumps(value, option=orjson.OPT_SORT_KEYS), digest_size=16
    ).digest()


def source_of(resource: Mapping[str, Any]) -> str:
    """``ce_source``: the resource's own ``meta.source`` (FHIR's "source system") when
    it is a URI, else the bridge's FHIR channel."""
    return _uri_at(resource, "meta", "source") or DEFAULT_SOURCE


def _uri_at(value: Mapping[str, Any], element: str, name: str) -> str | None:
    """``value.element.name`` when it is a URI-like string (non-empty, no spaces)."""
    inner = value.get(element)
    if isinstance(inner, Mapping):
        found = inner.get(name)
        if isinstance(found, str) and found and not any(c.isspace() for c in found):
            return found
    return None


def patient_of(resource: Mapping[str, Any], bundle: Mapping[str, Mapping[str, Any]]) -> str | None:
    """``Patient/<id>`` of the patient a resource belongs to (the resource itself when
    it is a Patient); ``bundle`` resolves ``urn:`` references (fullUrl → resource)."""
    if resource.get("resourceType") == "Patient":
        rid = resource.get("id")
        return f"Patient/{rid}" if isinstance(rid, str) else None
    for name in _PATIENT_ELEMENTS:
        value = resource.get(name)
        if isinstance(value, list):
            value = value[0] if value else None
        if not isinstance(value, Mapping):
            continue
        reference = value.get("reference")
        if not isinstance(reference, str):
            continue
        if reference.startswith("urn:"):
            target = bundle.get(reference)
            return patient_of(target, {}) if target is not None else None
        head, _, tail = reference.rpartition("Patient/")
        patient_id = tail.split("/", 1)[0]
        if (not head or head.endswith("/")) and ID_RE.fullmatch(patient_id):
            return f"Patient/{patient_id}"
    return None


def _resource_id(event_id: str, index: int = 0) -> str:
    return str(uuid.uuid5(ID_NAMESPACE, f"{event_id}/resource/{index}"))


class FhirIngest:
    """The FHIR REST edge's contract with Kafka; see the module docstring."""

    def __init__(
        self,
        settings: FhirIngestSettings,
        publisher: Publisher,
        dedupe: DuplicateFilter,
        metrics: BridgeMetrics,
        *,
        offload: Callable[[bytes], Awaitable[list[Issue]]] | None = None,
        offload_bytes: int = 256 * 1024,
    ) -> None:
        self._settings = settings
        self._publisher = publisher
        self._dedupe = dedupe
        self._metrics = metrics
        self._routes: dict[str, str] = {}
        self._offload: Callable[[bytes], Awaitable[list[Issue]]] | None = offload
        self._offload_bytes = offload_bytes

    def set_routes(self, routes: Mapping[str, str]) -> None:
        """Topic routing (cluster config): resource type → the events topic that its
        creates and updates go to instead of ``.events``."""
        self._routes = dict(routes)

    # --- create / update ----------------------------------------------------------

    async def write(
        self,
        interaction: Interaction,
        resource_type: str,
        resource_id: str | None,
        body: bytes,
        *,
        base: str,
        request_id: str | None = None,
        prefer: Prefer = "OperationOutcome",
    ) -> Answer:
        """``POST [base]/[type]`` (create) or ``PUT [base]/[type]/[id]`` (update)."""
        try:
            resource = parse_json(body)
            checked = None
            if self._offload is not None and len(body) > self._offload_bytes:
                # A large body is validated in a worker process: seconds of CPU must
                # not hold up the event loop (MLLP answers, other requests).
                checked = await self._offload(body)
            write = self._checked_write(
                interaction,
                resource,
                resource_type,
                resource_id,
                request_id,
                f"{resource_type}",
                checked=checked,
            )
            outcome = await self._publish_writes([write], body, base, raw_id=write.event_id)
        except FhirRequestError as exc:
            return self._refusal(interaction, exc)
        status, headers = outcome[0]
        if status != 202:
            return self._count(interaction, Answer(status, _conflict_outcome(), headers))
        return self._count(interaction, self._accepted(write, prefer))

    def _checked_write(
        self,
        interaction: Interaction,
        resource: dict[str, Any],
        resource_type: str,
        resource_id: str | None,
        request_id: str | None,
        path: str,
        *,
        index: int | None = None,
        checked: list[Issue] | None = None,
    ) -> _Write:
        """Validate one resource write (``checked``: its issues, found elsewhere);
        raise :class:`FhirRequestError` if it cannot be taken."""
        if resource.get("resourceType") != resource_type:
            raise FhirRequestError.one(
                400,
                "invalid",
                f"the body's resourceType is not {resource_type}, the type the URL names",
                f"{path}.resourceType",
            )
        if interaction == "update" and resource.get("id") != resource_id:
            raise FhirRequestError.one(
                400,
                "invalid",
                "an update's resource must carry the id the URL names",
                f"{path}.id",
            )
        issues = checked if checked is not None else validate_write(resource, path)
        if errors_in(issues):
            raise FhirRequestError(422, issues)
        digest = digest_of(resource)
        if request_id:
            identity: tuple[str, ...] = ("request", request_id)
            if index is not None:
                identity += (str(index),)
        else:
            identity = (interaction, resource_type, resource_id or "", digest.hex())
        write = _Write(
            interaction=interaction,
            resource=resource,
            identity=identity,
            digest=digest,
            source=source_of(resource),
            warnings=issues,
        )
        if interaction == "create" and not resource.get("id"):
            # The relay assigns an id as a server would (deterministic: a retry keeps it).
            # An id the client sent is kept: references in its data may use it.
            resource["id"] = _resource_id(write.event_id)
        return write

    # --- Bundles ------------------------------------------------------------------

    async def bundle(
        self,
        body: bytes,
        *,
        base: str,
        request_id: str | None = None,
        prefer: Prefer = "OperationOutcome",
        process_message: bool = False,
    ) -> Answer:
        """``POST [base]`` with a transaction, batch or message Bundle, or
        ``POST [base]/$process-message``."""
        kind = "message" if process_message else "bundle"
        try:
            bundle = parse_json(body)
            if bundle.get("resourceType") != "Bundle":
                raise FhirRequestError.one(
                    400,
                    "invalid",
                    "POST to the base takes a Bundle; POST a resource to [base]/[type]",
                    "Bundle.resourceType",
                )
            bundle_type = bundle.get("type")
            allowed = ("message",) if process_message else ("transaction", "batch", "message")
            if bundle_type not in allowed:
                raise FhirRequestError.one(
                    400,
                    "invalid",
                    f"Bundle.type must be {' or '.join(allowed)} here; "
                    "other Bundles are resources: POST them to [base]/Bundle",
                    "Bundle.type",
                )
            kind = str(bundle_type)
            if bundle_type == "batch":
                answer = await self._batch(bundle, body, base, request_id)
            elif bundle_type == "transaction":
                answer = await self._transaction(bundle, body, base, request_id)
            else:
                answer = await self._message(bundle, body, base, request_id)
        except FhirRequestError as exc:
            return self._refusal(kind, exc)
        return self._count(kind, answer)

    def _entries(self, bundle: Mapping[str, Any]) -> list[Mapping[str, Any]]:
        entries = bundle.get("entry", [])
        if not isinstance(entries, list) or not all(isinstance(e, Mapping) for e in entries):
            raise FhirRequestError.one(400, "structure", "Bundle.entry is not a list of objects")
        return entries

    async def _transaction(
        self, bundle: dict[str, Any], body: bytes, base: str, request_id: str | None
    ) -> Answer:
        entries = self._entries(bundle)
        urls = frozenset(
            e["fullUrl"] for e in entries if isinstance(e.get("fullUrl"), str) and e["fullUrl"]
        )
        issues: list[Issue] = []
        warnings: list[Issue] = []
        for i, entry in enumerate(entries):
            path = f"Bundle.entry[{i}]"
            found = _entry_write_problem(entry, path)
            if found is not None:
                issues.append(found)
                continue
            resource = entry["resource"]
            entry_issues = validate_resource(
                resource, path=f"{path}.resource", bundle_urls=urls, conditional_references=True
            )
            (issues if errors_in(entry_issues) else warnings).extend(entry_issues)
        if issues:
            # All or nothing: one refusal that names every problem.
            raise FhirRequestError(422, issues)
        digest = digest_of(bundle)
        identity = ("request", request_id) if request_id else ("transaction", digest.hex())
        source = source_of(bundle)
        event_id = event_id_of(source, identity)
        resources: list[tuple[str, dict[str, Any]]] = []
        for i, entry in enumerate(entries):
            resource = dict(entry["resource"])
            method = entry["request"]["method"]
            if method == "POST" and not resource.get("id"):
                resource["id"] = _resource_id(event_id, i)
            full_url = entry.get("fullUrl") or f"{base}/{resource['resourceType']}/{resource['id']}"
            resources.append((str(full_url), resource))
        by_url = {url: r for url, r in resources}
        subject = next((p for _, r in resources if (p := patient_of(r, by_url))), None)
        data = _message_bundle(event_id, "transaction", source, resources)
        status = await self._publish_once(
            identity, digest, body, data, event_id, source, "transaction", subject
        )
        if status != 202:
            return Answer(status, _conflict_outcome())
        response: dict[str, Any] = {
            "resourceType": "Bundle",
            "type": "transaction-response",
            "entry": [
                {
                    "response": {
                        "status": _STATUS_TEXT[202],
                        "location": f"{r['resourceType']}/{r['id']}",
                    }
                }
                for _, r in resources
            ],
        }
        if warnings:
            response["entry"][0]["response"]["outcome"] = operation_outcome(warnings)
        return Answer(200, response, {"X-Event-Id": event_id})

    async def _batch(
        self, bundle: dict[str, Any], body: bytes, base: str, request_id: str | None
    ) -> Answer:
        entries = self._entries(bundle)
        results: list[dict[str, Any]] = []
        writes: list[tuple[int, _Write]] = []
        for i, entry in enumerate(entries):
            path = f"Bundle.entry[{i}]"
            try:
                problem = _entry_write_problem(entry, path)
                if problem is not None:
                    status = 405 if problem.code == "not-supported" else 400
                    raise FhirRequestError(status, [problem])
                method = entry["request"]["method"]
                type_name, _, rid = str(entry["request"].get("url", "")).strip("/").partition("/")
                resource = dict(entry["resource"])
                interaction: Interaction = "update" if method == "PUT" else "create"
                write = self._checked_write(
                    interaction,
                    resource,
                    resource["resourceType"] if method == "POST" else type_name,
                    rid or None,
                    request_id,
                    f"{path}.resource",
                    index=i,
                )
            except FhirRequestError as exc:
                results.append(
                    {
                        "response": {
                            "status": _STATUS_TEXT.get(exc.status, str(exc.status)),
                            "outcome": exc.outcome(),
                        }
                    }
                )
                continue
            writes.append((len(results), write))
            results.append({})
        outcomes = await self._publish_writes([w for _, w in writes], body, base) if writes else []
        for (slot, write), (status, _) in zip(writes, outcomes, strict=True):
            response: dict[str, Any] = {"status": _STATUS_TEXT[status]}
            if status == 202:
                r = write.resource
                response["location"] = f"{r['resourceType']}/{r['id']}"
                response["etag"] = f'W/"{write.event_id}"'
                if write.warnings:
                    response["outcome"] = operation_outcome(write.warnings)
            else:
                response["outcome"] = _conflict_outcome()
            results[slot] = {"response": response}
        return Answer(200, {"resourceType": "Bundle", "type": "batch-response", "entry": results})

    async def _message(
        self, bundle: dict[str, Any], body: bytes, base: str, request_id: str | None
    ) -> Answer:
        entries = self._entries(bundle)
        header = entries[0].get("resource") if entries else None
        if not isinstance(header, Mapping) or header.get("resourceType") != "MessageHeader":
            raise FhirRequestError.one(
                422, "invalid", "a message Bundle starts with its MessageHeader", "Bundle.entry[0]"
            )
        if not isinstance(header.get("id"), str):
            raise FhirRequestError.one(
                422,
                "required",
                "the MessageHeader needs an id to be answered",
                "Bundle.entry[0].resource.id",
            )
        urls = frozenset(
            e["fullUrl"] for e in entries if isinstance(e.get("fullUrl"), str) and e["fullUrl"]
        )
        issues = validate_resource(bundle, bundle_urls=urls)
        if errors_in(issues):
            raise FhirRequestError(422, issues)
        digest = digest_of(bundle)
        identity = ("request", request_id) if request_id else ("message", digest.hex())
        source = _message_source(header) or source_of(bundle)
        event_id = event_id_of(source, identity)
        by_url = {
            str(e.get("fullUrl")): e["resource"]
            for e in entries
            if isinstance(e.get("resource"), Mapping)
        }
        subject = next((p for r in by_url.values() if (p := patient_of(r, by_url))), None)
        status = await self._publish_once(
            identity, digest, body, bundle, event_id, source, "message", subject
        )
        if status != 202:
            return Answer(status, _conflict_outcome())
        return Answer(
            200, _message_response(event_id, header, base, issues), {"X-Event-Id": event_id}
        )

    # --- publishing ---------------------------------------------------------------

    async def _publish_writes(
        self, writes: Sequence[_Write], body: bytes, base: str, raw_id: str | None = None
    ) -> list[tuple[int, dict[str, str]]]:
        """Publish the raw body and each write's event that is not a duplicate, in one
        batch; per write: 202 (accepted now or before) or 409 (request id reused)."""
        # First wait, without claiming anything, until no write of this request has an
        # attempt in flight elsewhere; then classify and claim in one step with no await
        # in between, so nothing can change under us and a cancelled request never
        # leaves a claim unfinished.
        while pending := [
            p
            for w in writes
            if self._dedupe.lookup(w.dedupe_key, w.digest) is None
            and (p := self._dedupe.pending(w.dedupe_key, w.digest)) is not None
        ]:
            await asyncio.gather(*(asyncio.shield(p) for p in pending))
        results: list[tuple[int, dict[str, str]]] = []
        fresh: list[_Write] = []
        claimed: set[tuple[tuple[str, str], bytes]] = set()
        for write in writes:
            seen, digest = write.dedupe_key, write.digest
            accepted_id = {"X-Event-Id": write.event_id}
            if (seen, digest) in claimed or self._dedupe.lookup(seen, digest) is not None:
                # Accepted before, or the same write twice in this request (a batch).
                self._metrics.duplicates.labels(CHANNEL).inc()
                results.append((202, accepted_id))
                continue
            if write.identity[0] == "request" and self._dedupe.reused(seen, digest):
                results.append((409, {}))
                continue
            self._dedupe.begin(seen, digest)
            claimed.add((seen, digest))
            fresh.append(write)
            results.append((202, accepted_id))
        if not fresh:
            return results
        accepted: str | None = None
        try:
            records: list[OutRecord] = []
            first_key = b""
            for write in fresh:
                full_url = f"{base}/{write.resource['resourceType']}/{write.resource['id']}"
                subject = patient_of(write.resource, {})
                data = _message_bundle(
                    write.event_id, write.interaction, write.source, [(full_url, write.resource)]
                )
                key = (subject or f"source|{write.source}").encode()
                first_key = first_key or key
                attributes = self._attributes(
                    write.event_id,
                    write.source,
                    str(write.resource["resourceType"]),
                    write.interaction,
                    subject,
                )
                topic = self._routes.get(
                    str(write.resource["resourceType"]), self._settings.topics.events
                )
                records.append(OutRecord(topic, orjson.dumps(data), key, attributes.headers()))
            first = fresh[0]
            raw = self._raw_record(
                body,
                first_key,
                raw_id or str(uuid.uuid5(ID_NAMESPACE, f"{first.event_id}/raw")),
                first.source,
                patient_of(first.resource, {}),
            )
            await self._publish([raw, *records])
            accepted = "202"
        finally:
            for write in fresh:
                self._dedupe.finish(write.dedupe_key, write.digest, accepted)
        return results

    async def _publish_once(
        self,
        identity: tuple[str, ...],
        digest: bytes,
        body: bytes,
        data: dict[str, Any],
        event_id: str,
        source: str,
        interaction: str,
        subject: str | None,
    ) -> int:
        """Publish the raw body and one event (a transaction or a message) unless it is
        a duplicate; 202, or 409 for a request id reused with other content."""
        key = (source, "\x1f".join(identity))
        record_key = (subject or f"source|{source}").encode()
        attributes = self._attributes(event_id, source, interaction, interaction, subject)
        records = [
            self._raw_record(body, record_key, event_id, source, subject),
            OutRecord(
                self._settings.topics.events, orjson.dumps(data), record_key, attributes.headers()
            ),
        ]
        while (earlier := self._dedupe.lookup(key, digest)) is None:
            pending = self._dedupe.pending(key, digest)
            if pending is None:
                break
            await asyncio.shield(pending)
        if earlier is not None:
            self._metrics.duplicates.labels(CHANNEL).inc()
            return 202
        if key[1].startswith("request") and self._dedupe.reused(key, digest):
            return 409
        self._dedupe.begin(key, digest)
        accepted: str | None = None
        try:
            await self._publish(records)
            accepted = "202"
        finally:
            self._dedupe.finish(key, digest, accepted)
        return 202

    async def _publish(self, records: list[OutRecord]) -> None:
        try:
            await self._publisher.publish(records)
        except UnavailableError as exc:
            log.warning("FHIR write not published: %s", describe_failure(exc))
            raise FhirRequestError(
                503,
                [Issue("transient", f"{exc.message}; nothing was published: retry later")],
            ) from exc

    def _raw_record(
        self, body: bytes, key: bytes, event_id: str, source: str, subject: str | None
    ) -> OutRecord:
        raw = EventAttributes(
            id=event_id,
            source=source,
            type=RAW_TYPE,
            time=now_rfc3339(),
            subject=subject,
            bridge_instance=self._settings.instance_id,
        )
        return OutRecord(self._settings.topics.raw_fhir, body, key, raw.headers())

    def _attributes(
        self, event_id: str, source: str, type_name: str, interaction: str, subject: str | None
    ) -> EventAttributes:
        return EventAttributes(
            id=event_id,
            source=source,
            type=f"{TYPE_PREFIX}.fhir.{type_name}",
            time=now_rfc3339(),
            subject=subject,
            bridge_instance=self._settings.instance_id,
            fhir_interaction=interaction,
        )

    # --- answers ------------------------------------------------------------------

    def _accepted(self, write: _Write, prefer: Prefer) -> Answer:
        r = write.resource
        headers = {
            "X-Event-Id": write.event_id,
            "ETag": f'W/"{write.event_id}"',
            "Content-Location": f"{r['resourceType']}/{r['id']}",
        }
        if prefer == "minimal":
            return Answer(202, None, headers)
        if prefer == "representation":
            return Answer(202, r, headers)
        note = Issue(
            "informational",
            f"accepted: published to Kafka as event {write.event_id} "
            f"({r['resourceType']}/{r['id']}); the bridge relays and does not store",
            severity="information",
        )
        return Answer(202, operation_outcome([note, *write.warnings]), headers)

    def _refusal(self, interaction: str, exc: FhirRequestError) -> Answer:
        headers = {}
        if exc.status == 503:
            headers["Retry-After"] = str(self._settings.retry_after_s)
        return self._count(interaction, Answer(exc.status, exc.outcome(), headers))

    def _count(self, interaction: str, answer: Answer) -> Answer:
        self._metrics.fhir_requests.labels(interaction, str(answer.status)).inc()
        return answer


# --- helpers --------------------------------------------------------------------------


def _entry_write_problem(entry: Mapping[str, Any], path: str) -> Issue | None:
    """Why a transaction/batch entry is not a write the relay takes (None: it is)."""
    request = entry.get("request")
    if not isinstance(request, Mapping) or not isinstance(request.get("method"), str):
        return Issue(
            "required", "a transaction or batch entry needs request.method", f"{path}.request"
        )
    method = request["method"]
    if method not in _WRITE_METHODS:
        return Issue(
            "not-supported",
            f"{method} is not supported: the bridge relays writes (POST, PUT) and stores "
            "nothing to read or delete",
            f"{path}.request.method",
        )
    resource = entry.get("resource")
    if not isinstance(resource, Mapping) or not isinstance(resource.get("resourceType"), str):
        return Issue("required", f"a {method} entry needs a resource", f"{path}.resource")
    url = request.get("url")
    if not isinstance(url, str) or not url:
        return Issue("required", "request.url is required", f"{path}.request.url")
    if "?" in url and method == "PUT":
        return Issue(
            "not-supported",
            "conditional update (PUT with a search) is not supported: the bridge cannot search",
            f"{path}.request.url",
        )
    type_name, _, rid = url.split("?", 1)[0].strip("/").partition("/")
    if not is_resource_type(type_name) or type_name != resource["resourceType"]:
        return Issue(
            "invalid", "request.url does not name the entry resource's type", f"{path}.request.url"
        )
    if method == "PUT" and (not rid or rid != resource.get("id")):
        return Issue(
            "invalid",
            "a PUT entry's url must be [type]/[id] of its resource",
            f"{path}.request.url",
        )
    return None


def _message_source(header: Mapping[str, Any]) -> str | None:
    return _uri_at(header, "source", "endpoint")


def _message_bundle(
    event_id: str, interaction: str, source: str, resources: Sequence[tuple[str, dict[str, Any]]]
) -> dict[str, Any]:
    """The event's data: a FHIR message Bundle like the HL7 v2 events' (MessageHeader
    first, its focus on the written resources)."""
    header_id = str(uuid.uuid5(ID_NAMESPACE, f"{event_id}/MessageHeader"))
    header = {
        "resourceType": "MessageHeader",
        "id": header_id,
        "eventCoding": {"system": RESTFUL_INTERACTION, "code": interaction},
        "source": {"endpoint": source},
        "focus": [{"reference": url} for url, _ in resources],
    }
    return {
        "resourceType": "Bundle",
        "id": event_id,
        "type": "message",
        "timestamp": now_rfc3339(),
        "entry": [
            {"fullUrl": f"urn:uuid:{header_id}", "resource": header},
            *({"fullUrl": url, "resource": r} for url, r in resources),
        ],
    }


def _message_response(
    event_id: str, request_header: Mapping[str, Any], base: str, warnings: Sequence[Issue]
) -> dict[str, Any]:
    """The synchronous answer to a FHIR message: a message Bundle whose MessageHeader
    responds ``ok`` to the request's MessageHeader."""
    header_id = str(uuid.uuid5(ID_NAMESPACE, f"{event_id}/response"))
    header: dict[str, Any] = {"resourceType": "MessageHeader", "id": header_id}
    if "eventCoding" in request_header:
        header["eventCoding"] = request_header["eventCoding"]
    else:
        header["eventUri"] = request_header.get("eventUri", "urn:hl7bridge:fhir:message")
    header["source"] = {"name": "hl7bridge", "endpoint": base}
    sender = _message_source(request_header)
    if sender:
        header["destination"] = [{"endpoint": sender}]
    header["response"] = {"identifier": request_header["id"], "code": "ok"}
    entries: list[dict[str, Any]] = [{"fullUrl": f"urn:uuid:{header_id}", "resource": header}]
    if warnings:
        outcome_id = str(uuid.uuid5(ID_NAMESPACE, f"{event_id}/outcome"))
        header["response"]["details"] = {"reference": f"urn:uuid:{outcome_id}"}
        entries.append(
            {
                "fullUrl": f"urn:uuid:{outcome_id}",
                "resource": {"id": outcome_id, **operation_outcome(warnings)},
            }
        )
    return {
        "resourceType": "Bundle",
        "id": str(uuid.uuid5(ID_NAMESPACE, f"{event_id}/response-bundle")),
        "type": "message",
        "timestamp": now_rfc3339(),
        "entry": entries,
    }


def _conflict_outcome() -> dict[str, Any]:
    return operation_outcome(
        [
            Issue(
                "conflict",
                "X-Request-Id was used before for other content; send new content with a new id",
            )
        ]
    )
