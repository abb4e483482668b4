"""What answers a claimed diagnosis case: a handler turns the event into a FHIR resource.

A :class:`Handler` is awaited with the :class:`CaseInfo` and the event in CloudEvents
structured JSON form (:meth:`bridge.envelope.EventAttributes.structured`: the
attributes and ``data``); it returns the result, one FHIR R4 resource (a
DiagnosticReport, ClinicalImpression, Communication, ...), validated with
:func:`adapters.fhir.validation.validate_resource` before it is handed back (a
Bundle's ``urn:`` references must resolve among its own entries). Three kinds:

* :class:`ExecHandler` runs a shell command in a session (process group) of its
  own, the event JSON on stdin and the case in ``HL7BRIDGE_*`` environment
  variables; stdout is the result; stderr is discarded. On a timeout, or when the
  call is cancelled, the whole process group is killed.
* :class:`WebhookHandler` POSTs an R5-style subscription notification expressed in
  R4B (:func:`notification_bundle`) and takes the resource the endpoint answers;
  408, 429, 5xx, connection errors and timeouts are retried with exponential
  backoff (honouring a ``Retry-After`` of whole seconds, up to a minute).
* :class:`CallbackHandler` awaits an in-process callable.

A failure raises :class:`HandlerError`, whose message is safe to log: exit
statuses, HTTP statuses, exception class names, FHIRPaths and issue codes, never
event content, stdout, stderr or bodies (they are patient data). Nothing here
logs them either.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Protocol

import aiohttp
import orjson

from adapters.fhir.validation import errors_in, validate_resource
from bridge.envelope import deterministic_id, now_rfc3339

__all__ = [
    "CallbackHandler",
    "CaseInfo",
    "ExecHandler",
    "Handler",
    "HandlerError",
    "WebhookHandler",
    "notification_bundle",
    "validated_result",
]

log = logging.getLogger(__name__)

FHIR_JSON: Final = "application/fhir+json"
#: ``SubscriptionStatus.topic`` of the notifications: this prefix and the rule name.
TOPIC_PREFIX: Final = "urn:hl7bridge:diagnosis:"
#: The longest ``Retry-After`` honoured, in seconds.
MAX_RETRY_AFTER_S: Final = 60.0
#: HTTP statuses worth another attempt (besides every 5xx).
_RETRY_STATUSES: Final = frozenset({408, 429})


@dataclass(frozen=True, slots=True)
class CaseInfo:
    """The case a handler works on (no patient data: ids, names and positions)."""

    case_id: str
    #: The name of the diagnosis rule that opened the case.
    rule: str
    #: 1 (highest) to 9, the rule's.
    priority: int
    #: The event's ``ce_id``.
    event_id: str
    #: Where the event is on Kafka.
    topic: str
    partition: int
    offset: int
    #: When the case was opened (RFC 3339).
    opened: str
    #: 1 for the first try, one more for each try after.
    attempt: int
    #: The resource the rule matched (:class:`bridge.diagnosis.rules.Match`), when
    #: known: a webhook notification's focus points at it.
    resource_type: str | None = None
    resource_id: str | None = None


class HandlerError(Exception):
    """A handler failed. The message is safe to log: codes, exit and HTTP statuses
    only, never patient data (stdout, stderr or body content)."""


class Handler(Protocol):
    async def __call__(self, case: CaseInfo, event: Mapping[str, Any]) -> dict[str, Any]:
        """The result resource for ``event`` (CloudEvents structured JSON)."""
        ...


def validated_result(value: Any, where: str = "handler") -> dict[str, Any]:
    """``value`` if it is a valid FHIR resource; :class:`HandlerError` naming the
    FHIRPath and issue code of the first error otherwise (never the value)."""
    if not isinstance(value, dict) or not isinstance(value.get("resourceType"), str):
        raise HandlerError(
            f"{where} result is not a FHIR resource (a JSON object with a resourceType)"
        )
    urls: frozenset[str] = frozenset()
    if value["resourceType"] == "Bundle" and isinstance(value.get("entry"), list):
        urls = frozenset(
            e["fullUrl"]
            for e in value["entry"]
            if isinstance(e, Mapping) and isinstance(e.get("fullUrl"), str)
        )
    issues = validate_resource(value, bundle_urls=urls)
    if errors_in(issues):
        errors = [i for i in issues if i.severity in ("error", "fatal")]
        first = errors[0]
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise HandlerError(
            f"{where} result is not a valid FHIR resource: "
            f"{first.code} at {first.expression or value['resourceType']}{more}"
        )
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError


def _dumps(value: Any) -> bytes:
    return orjson.dumps(value, default=_json_default)


# --- exec -----------------------------------------------------------------------------


class ExecHandler:
    """Runs ``command`` through the shell for each case.

    stdin: the event JSON. Environment: the parent's plus ``HL7BRIDGE_CASE_ID``,
    ``HL7BRIDGE_RULE``, ``HL7BRIDGE_PRIORITY``, ``HL7BRIDGE_EVENT_ID`` and
    ``HL7BRIDGE_ATTEMPT``. stdout: the result resource (JSON). stderr is discarded
    (it may hold patient data; a handler logs where its operators look).
    """

    def __init__(self, command: str, *, timeout_s: float = 60.0) -> None:
        if not command.strip():
            raise ValueError("the handler command is empty")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self.command = command
        self.timeout_s = timeout_s

    def __repr__(self) -> str:
        return f"ExecHandler(timeout_s={self.timeout_s:g})"

    async def __call__(self, case: CaseInfo, event: Mapping[str, Any]) -> dict[str, Any]:
        env = {
            **os.environ,
            "HL7BRIDGE_CASE_ID": case.case_id,
            "HL7BRIDGE_RULE": case.rule,
            "HL7BRIDGE_PRIORITY": str(case.priority),
            "HL7BRIDGE_EVENT_ID": case.event_id,
            "HL7BRIDGE_ATTEMPT": str(case.attempt),
        }
        payload = _dumps(event)
        started = time.monotonic()
        try:
            process = await asyncio.create_subprocess_shell(
                self.command,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # its own process group: a timeout kills the tree
            )
        except OSError as exc:
            raise HandlerError(f"handler could not be started: {type(exc).__name__}") from None
        try:
            async with asyncio.timeout(self.timeout_s):
                stdout, _ = await process.communicate(payload)
        except TimeoutError:
            await _kill_group(process)
            log.warning("case %s: handler timed out after %g s", case.case_id, self.timeout_s)
            raise HandlerError(f"handler timed out after {self.timeout_s:g} s") from None
        except BaseException:  # cancelled: leave no process behind
            await _kill_group(process)
            raise
        status = process.returncode
        log.info(
            "case %s: handler exited with status %s after %.3f s",
            case.case_id,
            status,
            time.monotonic() - started,
        )
        if status is None or status < 0:
            signal_number = -(status or 0)
            raise HandlerError(f"handler was killed by signal {signal_number}")
        if status != 0:
            raise HandlerError(f"handler exited with status {status}")
        try:
            result = orjson.loads(stdout)
        except orjson.JSONDecodeError:
            raise HandlerError("handler output is not JSON") from None
        return validated_result(result)

    async def aclose(self) -> None:
        """Nothing to release (every process is waited for)."""


async def _kill_group(process: asyncio.subprocess.Process) -> None:
    """SIGKILL the process group of ``process`` (its session) and reap the leader.

    The leader is not reaped before this, so its pid, the group's id, cannot have
    been reused by another process."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    # Shielded: cancelled again while reaping, the group is killed all the same and
    # asyncio's child watcher still reaps the leader.
    await asyncio.shield(process.wait())


# --- webhook --------------------------------------------------------------------------


def _focus(case: CaseInfo, data: Any) -> str | None:
    """The notification's focus: the resource the rule matched when the case names
    it (its entry's fullUrl, else ``Type/id``), else the event's own focus (the
    MessageHeader's first ``focus``), else the first resource after the header."""
    if not isinstance(data, Mapping):
        return None
    entries = data.get("entry")
    if data.get("resourceType") != "Bundle" or not isinstance(entries, list):
        rtype, rid = data.get("resourceType"), data.get("id")
        return f"{rtype}/{rid}" if isinstance(rtype, str) and isinstance(rid, str) else None
    listed = [
        e for e in entries if isinstance(e, Mapping) and isinstance(e.get("resource"), Mapping)
    ]
    if case.resource_type is not None and case.resource_id is not None:
        for entry in listed:
            resource = entry["resource"]
            if (
                resource.get("resourceType") == case.resource_type
                and resource.get("id") == case.resource_id
            ):
                url = entry.get("fullUrl")
                return url if isinstance(url, str) else f"{case.resource_type}/{case.resource_id}"
    header = listed[0]["resource"] if listed else None
    if isinstance(header, Mapping) and header.get("resourceType") == "MessageHeader":
        focus = header.get("focus")
        if isinstance(focus, list) and focus and isinstance(focus[0], Mapping):
            reference = focus[0].get("reference")
            if isinstance(reference, str):
                return reference
        listed = listed[1:]
    for entry in listed:
        url = entry.get("fullUrl")
        if isinstance(url, str):
            return url
    return None


def _event_time(event: Mapping[str, Any]) -> str | None:
    """The event's ``time`` when it is an RFC 3339 instant (with its zone)."""
    value = event.get("time")
    if not isinstance(value, str) or "T" not in value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return value if parsed.tzinfo is not None else None


def notification_bundle(
    case: CaseInfo, event: Mapping[str, Any], event_number: int
) -> dict[str, Any]:
    """The R5-style subscription notification, in R4B, that announces a case.

    A ``history`` Bundle: first a SubscriptionStatus (``active``,
    ``event-notification``, ``eventsSinceSubscriptionStart`` and
    ``notificationEvent[0].eventNumber`` = ``event_number``, the focus, the topic
    ``urn:hl7bridge:diagnosis:<rule>``, the subscription ``Subscription/<rule>``),
    then the resources of the event's data with their fullUrls. Every entry has the
    ``request`` and ``response`` a history Bundle needs (``GET .../$status`` →
    200 for the status, ``POST <type>`` → 201 for the resources)."""
    status_id = deterministic_id("diagnosis-notification", case.case_id, str(case.attempt))
    notification_event: dict[str, Any] = {"eventNumber": str(event_number)}
    occurred = _event_time(event)
    if occurred is not None:
        notification_event["timestamp"] = occurred
    data = event.get("data")
    focus = _focus(case, data)
    if focus is not None:
        notification_event["focus"] = {"reference": focus}
    status = {
        "resourceType": "SubscriptionStatus",
        "id": status_id,
        "status": "active",
        "type": "event-notification",
        "eventsSinceSubscriptionStart": str(event_number),
        "notificationEvent": [notification_event],
        "subscription": {"reference": f"Subscription/{case.rule}"},
        "topic": f"{TOPIC_PREFIX}{case.rule}",
    }
    entries: list[dict[str, Any]] = [
        {
            "fullUrl": f"urn:uuid:{status_id}",
            "resource": status,
            "request": {"method": "GET", "url": f"Subscription/{case.rule}/$status"},
            "response": {"status": "200"},
        }
    ]
    for url, resource in _data_resources(data):
        entry: dict[str, Any] = {"fullUrl": url} if url is not None else {}
        entry["resource"] = resource
        entry["request"] = {"method": "POST", "url": str(resource["resourceType"])}
        entry["response"] = {"status": "201"}
        entries.append(entry)
    return {
        "resourceType": "Bundle",
        "id": deterministic_id("diagnosis-notification-bundle", case.case_id, str(case.attempt)),
        "type": "history",
        "timestamp": now_rfc3339(),
        "entry": entries,
    }


def _data_resources(data: Any) -> list[tuple[str | None, Mapping[str, Any]]]:
    if not isinstance(data, Mapping) or not isinstance(data.get("resourceType"), str):
        return []
    if data["resourceType"] != "Bundle":
        return [(None, data)]
    out: list[tuple[str | None, Mapping[str, Any]]] = []
    for entry in data.get("entry") or ():
        if not isinstance(entry, Mapping):
            continue
        resource = entry.get("resource")
        if isinstance(resource, Mapping) and isinstance(resource.get("resourceType"), str):
            url = entry.get("fullUrl")
            out.append((url if isinstance(url, str) else None, resource))
    return out


class WebhookHandler:
    """POSTs a subscription notification (:func:`notification_bundle`) to ``url``.

    Headers: ``Content-Type: application/fhir+json``, ``Accept``, ``X-Case-Id``,
    ``X-Rule``, ``X-Event-Id``. A 2xx answer whose body is a valid FHIR resource
    is the result; a 2xx without one fails at once, as do 3xx and the 4xx other
    than 408 and 429. 408, 429, 5xx, connection errors and timeouts (``timeout_s``
    per attempt) are tried again, ``attempts`` tries in all, waiting
    ``backoff_s``, then twice as long each time (or the ``Retry-After`` seconds
    asked for, up to a minute, when longer). The notifications of one handler are
    numbered from 1 (``eventsSinceSubscriptionStart``: the subscription starts
    with the handler); the tries of one call share the number and Bundle id.
    A session the handler creates is closed by :meth:`aclose`; one given is not.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 30.0,
        attempts: int = 3,
        backoff_s: float = 0.5,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        if timeout_s <= 0 or backoff_s < 0:
            raise ValueError("timeout_s must be positive and backoff_s not negative")
        self.url = url
        self.timeout_s = timeout_s
        self.attempts = attempts
        self.backoff_s = backoff_s
        self._session = session
        self._own_session = session is None
        self._numbers = itertools.count(1)

    def __repr__(self) -> str:
        return f"WebhookHandler(attempts={self.attempts}, timeout_s={self.timeout_s:g})"

    async def __aenter__(self) -> WebhookHandler:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the session this handler created (a given one stays open)."""
        if self._own_session and self._session is not None:
            session, self._session = self._session, None
            await session.close()

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
            self._own_session = True
        return self._session

    async def __call__(self, case: CaseInfo, event: Mapping[str, Any]) -> dict[str, Any]:
        body = _dumps(notification_bundle(case, event, next(self._numbers)))
        headers = {
            "Content-Type": FHIR_JSON,
            "Accept": FHIR_JSON,
            "X-Case-Id": case.case_id,
            "X-Rule": case.rule,
            "X-Event-Id": case.event_id,
        }
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        failure = ""
        for attempt in range(1, self.attempts + 1):
            retry_after: float | None = None
            try:
                async with self._client().post(
                    self.url, data=body, headers=headers, timeout=timeout, allow_redirects=False
                ) as response:
                    status = response.status
                    if 200 <= status < 300:
                        answer = await response.read()
                        log.info("case %s: webhook answered HTTP %d", case.case_id, status)
                        return _webhook_result(answer, status)
                    if status not in _RETRY_STATUSES and status < 500:
                        raise HandlerError(f"webhook answered HTTP {status}")
                    failure = f"webhook answered HTTP {status}"
                    retry_after = _retry_after(response.headers.get("Retry-After"))
            except TimeoutError:
                failure = f"webhook timed out after {self.timeout_s:g} s"
            except aiohttp.ClientError as exc:
                failure = f"webhook request failed: {type(exc).__name__}"
            log.warning("case %s: %s (try %d of %d)", case.case_id, failure, attempt, self.attempts)
            if attempt < self.attempts:
                delay = self.backoff_s * 2 ** (attempt - 1)
                if retry_after is not None:
                    delay = max(delay, retry_after)
                await asyncio.sleep(delay)
        raise HandlerError(f"{failure}; gave up after {self.attempts} tries")


def _retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds (delta-seconds only; an HTTP date is ignored)."""
    if value is None or not value.strip().isdigit():
        return None
    return min(float(value.strip()), MAX_RETRY_AFTER_S)


def _webhook_result(body: bytes, status: int) -> dict[str, Any]:
    if not body.strip():
        raise HandlerError(f"webhook answered HTTP {status} without a FHIR resource")
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise HandlerError(f"webhook answered HTTP {status} with a body that is not JSON") from None
    return validated_result(value, "webhook")


# --- callback -------------------------------------------------------------------------


class CallbackHandler:
    """Awaits ``callback(case, event)`` in process; its return is validated like the
    other handlers' results. An exception other than :class:`HandlerError` becomes
    one that names its class only (its message may hold patient data)."""

    def __init__(
        self, callback: Callable[[CaseInfo, Mapping[str, Any]], Awaitable[dict[str, Any]]]
    ) -> None:
        self.callback = callback

    async def __call__(self, case: CaseInfo, event: Mapping[str, Any]) -> dict[str, Any]:
        try:
            result = await self.callback(case, event)
        except HandlerError:
            raise
        except Exception as exc:
            raise HandlerError(f"handler raised {type(exc).__name__}") from None
        return validated_result(result)

    async def aclose(self) -> None:
        """Nothing to release."""
