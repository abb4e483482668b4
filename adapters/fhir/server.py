"""The FHIR REST edge on aiohttp: routes, limits and status codes under ``/fhir``.

Each request is checked here for what HTTP decides (method, media type, size,
time, the type in the URL) and handed to an :class:`Ingest` (the bridge's FHIR
ingest) for what FHIR decides. Every refusal is an OperationOutcome:

=====  ==================================================================
400    not JSON, not a resource, resourceType or id differ from the URL
404    unknown resource type, or no such endpoint
405    an interaction the relay does not offer (read, search, delete ...)
408    the body did not arrive within ``fhir_request_timeout_s``
409    X-Request-Id reused with other content
413    a body over ``fhir_max_body_bytes``
415    a body that is not FHIR JSON (``application/fhir+json`` or ``application/json``)
422    valid JSON, invalid FHIR content (one issue per problem, with its path)
503    Kafka did not take the write, or ``fhir_max_in_flight`` requests are being
       handled already (``Retry-After`` says when to retry)
=====  ==================================================================
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

import orjson
from aiohttp import web

from adapters.fhir.capability import capability_statement
from adapters.fhir.validation import FhirRequestError, Issue, is_resource_type, operation_outcome

log = logging.getLogger(__name__)

FHIR_JSON: Final = "application/fhir+json"
_JSON_TYPES: Final = frozenset(
    {"application/fhir+json", "application/json", "application/json+fhir"}
)
_PREFER: Final = {
    "return=minimal": "minimal",
    "return=representation": "representation",
    "return=operationoutcome": "OperationOutcome",
}


class AnswerLike(Protocol):
    status: int
    body: dict[str, Any] | None
    headers: dict[str, str]


class Ingest(Protocol):
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
    ) -> AnswerLike: ...

    async def bundle(
        self,
        body: bytes,
        *,
        base: str,
        request_id: str | None = None,
        prefer: Any = "OperationOutcome",
        process_message: bool = False,
    ) -> AnswerLike: ...


@dataclass(frozen=True, slots=True)
class FhirHttpSettings:
    max_body_bytes: int
    request_timeout_s: float
    version: str
    #: Requests handled at once at most; one more is answered 503 at once.
    max_in_flight: int = 256
    retry_after_s: int = 10
    #: Observes each answered request: (seconds taken, HTTP status).
    observe: Callable[[float, int], None] | None = None


def fhir_response(
    status: int, body: dict[str, Any] | None, headers: dict[str, str] | None = None
) -> web.Response:
    out = web.Response(
        status=status,
        body=None if body is None else orjson.dumps(body),
        headers=headers,
    )
    if body is not None:
        out.content_type = FHIR_JSON
        out.charset = "utf-8"
    return out


def _refusal(
    status: int, code: str, diagnostics: str, expression: str | None = None
) -> web.Response:
    return fhir_response(status, operation_outcome([Issue(code, diagnostics, expression)]))


def add_fhir_routes(app: web.Application, ingest: Ingest, settings: FhirHttpSettings) -> None:
    """Mount the FHIR endpoints on ``app`` under ``/fhir``."""
    handlers = _Handlers(ingest, settings)
    app.router.add_route("*", "/fhir", handlers.base)
    app.router.add_route("*", "/fhir/", handlers.base)
    app.router.add_route("*", "/fhir/metadata", handlers.metadata)
    app.router.add_route("*", "/fhir/$process-message", handlers.process_message)
    app.router.add_route("*", "/fhir/{type}", handlers.type_level)
    app.router.add_route("*", "/fhir/{type}/{id}", handlers.instance_level)
    app.router.add_route("*", "/fhir/{tail:.+}", handlers.not_found)


class _Handlers:
    def __init__(self, ingest: Ingest, settings: FhirHttpSettings) -> None:
        self._ingest = ingest
        self._settings = settings
        self._in_flight = 0

    # --- endpoints ------------------------------------------------------------------

    async def metadata(self, request: web.Request) -> web.Response:
        if request.method not in ("GET", "HEAD"):
            return _not_allowed(request.method, "the capability statement")
        return fhir_response(200, capability_statement(_base(request), self._settings.version))

    async def base(self, request: web.Request) -> web.Response:
        if request.method != "POST":
            return _not_allowed(
                request.method, "the base (POST a transaction, batch or message Bundle)"
            )
        return await self._timed(
            request, lambda body: self._ingest.bundle(body, **self._common(request))
        )

    async def process_message(self, request: web.Request) -> web.Response:
        if request.method != "POST":
            return _not_allowed(request.method, "$process-message")
        return await self._timed(
            request,
            lambda body: self._ingest.bundle(body, process_message=True, **self._common(request)),
        )

    async def type_level(self, request: web.Request) -> web.Response:
        resource_type = request.match_info["type"]
        if not is_resource_type(resource_type):
            return _unknown_type(resource_type)
        if request.method != "POST":
            return _not_allowed(request.method, f"[base]/{resource_type} (create with POST)")
        return await self._timed(
            request,
            lambda body: self._ingest.write(
                "create", resource_type, None, body, **self._common(request)
            ),
        )

    async def instance_level(self, request: web.Request) -> web.Response:
        resource_type, resource_id = request.match_info["type"], request.match_info["id"]
        if not is_resource_type(resource_type):
            return _unknown_type(resource_type)
        if request.method != "PUT":
            return _not_allowed(request.method, f"[base]/{resource_type}/[id] (update with PUT)")
        return await self._timed(
            request,
            lambda body: self._ingest.write(
                "update", resource_type, resource_id, body, **self._common(request)
            ),
        )

    async def not_found(self, request: web.Request) -> web.Response:
        return _refusal(
            404,
            "not-found",
            "no such FHIR endpoint: the relay offers create, update, "
            "transaction, batch, $process-message and metadata",
        )

    # --- the common part --------------------------------------------------------------

    def _common(self, request: web.Request) -> dict[str, Any]:
        prefer = _PREFER.get(
            request.headers.get("Prefer", "").replace(" ", "").lower(), "OperationOutcome"
        )
        request_id = request.headers.get("X-Request-Id") or None
        return {"base": _base(request), "request_id": request_id, "prefer": prefer}

    async def _timed(
        self, request: web.Request, handle: Callable[[bytes], Awaitable[AnswerLike]]
    ) -> web.Response:
        started = time.perf_counter()
        if self._in_flight >= self._settings.max_in_flight:
            response = _refusal(
                503, "transient", "too many requests in flight (fhir_max_in_flight); retry later"
            )
            response.headers["Retry-After"] = str(self._settings.retry_after_s)
            return response
        self._in_flight += 1
        try:
            response = await self._handle(request, handle)
        finally:
            self._in_flight -= 1
        if self._settings.observe is not None:
            self._settings.observe(time.perf_counter() - started, response.status)
        return response

    async def _handle(
        self, request: web.Request, handle: Callable[[bytes], Awaitable[AnswerLike]]
    ) -> web.Response:
        media_type = request.content_type.lower()
        if media_type not in _JSON_TYPES:
            return _refusal(
                415,
                "not-supported",
                "the body must be FHIR JSON (Content-Type application/fhir+json or "
                "application/json); XML is not supported",
            )
        limit = self._settings.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            return _too_large(limit)
        try:
            async with asyncio.timeout(self._settings.request_timeout_s):
                body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _too_large(limit)
        except TimeoutError:
            return _refusal(
                408,
                "timeout",
                f"the body did not arrive within {self._settings.request_timeout_s:g} s",
            )
        if len(body) > limit:
            return _too_large(limit)
        try:
            answer = await handle(body)
        except FhirRequestError as exc:
            return fhir_response(exc.status, exc.outcome())
        except Exception as exc:  # a defect must not take the server down or leak content
            log.error("FHIR request failed: %s", type(exc).__name__)
            return _refusal(500, "exception", "internal error; nothing was published")
        return fhir_response(answer.status, answer.body, answer.headers)


def _base(request: web.Request) -> str:
    return f"{request.scheme}://{request.host}/fhir"


def _not_allowed(method: str, what: str) -> web.Response:
    response = _refusal(
        405,
        "not-supported",
        f"{method} is not supported on {what}: the bridge relays writes and stores nothing to "
        "read, search or delete",
    )
    return response


def _unknown_type(name: str) -> web.Response:
    safe = name if name.isalnum() and len(name) <= 64 else "that"
    return _refusal(404, "not-supported", f"{safe} is not an R4 resource type this relay knows")


def _too_large(limit: int) -> web.Response:
    return _refusal(
        413, "too-costly", f"the body is larger than {limit} bytes (fhir_max_body_bytes)"
    )
