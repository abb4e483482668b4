"""bridge.diagnosis.handlers: ExecHandler with real child processes, WebhookHandler
against a loopback aiohttp server, CallbackHandler; results validated, failures
described without patient data."""

from __future__ import annotations

import asyncio
import json
import shlex
import sys
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from fhir.resources.R4B.bundle import Bundle

from adapters.fhir.validation import errors_in, validate_resource
from adapters.hl7v2.er7 import parse_message
from bridge.diagnosis.handlers import (
    CallbackHandler,
    CaseInfo,
    ExecHandler,
    HandlerError,
    WebhookHandler,
    notification_bundle,
)
from bridge.events import hl7v2_event
from bridge.normalize import MappingOptions

pytestmark = pytest.mark.timeout(30)

#: Patient data in the event; it must never appear in an error message.
PATIENT_NAME = "Quixotica"
ORU = "\r".join(
    [
        "MSH|^~\\&|LIS|LAB|EHR|HOSP|20240315083000-0500||ORU^R01^ORU_R01|C1|P|2.5.1",
        f"PID|1||12345^^^HOSP^MR||{PATIENT_NAME}^Jane||19800101|F",
        "OBR|1|PL100^EHR|FL200^LIS|10839-9^Troponin I^LN|||20240315071500-0500"
        "||||||||||||||20240315090000-0500|||F",
        "OBX|1|NM|10839-9^Troponin I^LN||2.5|ng/mL|0.00-0.04|HH|||F",
    ]
).encode()

REPORT = {
    "resourceType": "DiagnosticReport",
    "status": "final",
    "code": {"text": "Remote review"},
    "conclusion": "Reviewed",
}


def the_event() -> dict[str, Any]:
    described = hl7v2_event(parse_message(ORU), instance_id=None, mapping=MappingOptions())
    return described.event.structured(described.data)


EVENT = the_event()
TROPONIN = next(e for e in EVENT["data"]["entry"] if e["resource"]["resourceType"] == "Observation")
CASE = CaseInfo(
    case_id="case-1",
    rule="critical-results",
    priority=2,
    event_id=EVENT["id"],
    topic="hl7.events",
    partition=3,
    offset=41,
    opened="2024-03-15T13:31:00.000Z",
    attempt=1,
)


def python(code: str) -> str:
    """A shell command running ``code`` with this interpreter."""
    return f"{shlex.quote(sys.executable)} -c {shlex.quote(code)}"


def no_patient_data(message: str) -> None:
    assert PATIENT_NAME not in message
    assert "ng/mL" not in message


# --- exec -------------------------------------------------------------------------------

ECHO = """
import json, os, sys
stdin = sys.stdin.read()
seen = {k: v for k, v in os.environ.items() if k.startswith("HL7BRIDGE_")}
json.dump({
    "resourceType": "Communication",
    "status": "completed",
    "payload": [{"contentString": stdin}, {"contentString": json.dumps(seen)}],
}, sys.stdout)
"""


async def test_exec_returns_the_validated_result_with_the_event_on_stdin_and_the_case_in_env(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HL7BRIDGE_FROM_PARENT", "kept")
    case = replace(CASE, attempt=2)
    result = await ExecHandler(python(ECHO), timeout_s=20)(case, EVENT)
    assert (result["resourceType"], result["status"]) == ("Communication", "completed")
    stdin, env = (json.loads(p["contentString"]) for p in result["payload"])
    assert stdin == EVENT
    assert env == {
        "HL7BRIDGE_FROM_PARENT": "kept",
        "HL7BRIDGE_CASE_ID": "case-1",
        "HL7BRIDGE_RULE": "critical-results",
        "HL7BRIDGE_PRIORITY": "2",
        "HL7BRIDGE_EVENT_ID": EVENT["id"],
        "HL7BRIDGE_ATTEMPT": "2",
    }


async def test_exec_takes_a_plain_shell_command() -> None:
    command = "cat >/dev/null; printf '%s' " + shlex.quote(json.dumps(REPORT))
    assert await ExecHandler(command, timeout_s=20)(CASE, EVENT) == REPORT


async def test_exec_non_zero_exit_names_the_status_only() -> None:
    command = f"cat; echo {PATIENT_NAME} >&2; exit 3"
    with pytest.raises(HandlerError) as caught:
        await ExecHandler(command, timeout_s=20)(CASE, EVENT)
    assert str(caught.value) == "handler exited with status 3"


async def test_exec_killed_by_a_signal() -> None:
    with pytest.raises(HandlerError) as caught:
        await ExecHandler(python("import os, signal; os.kill(os.getpid(), 9)"))(CASE, EVENT)
    assert str(caught.value) in ("handler was killed by signal 9", "handler exited with status 137")


@pytest.mark.parametrize(
    ("output", "message"),
    [
        (f"not json {PATIENT_NAME}", "handler output is not JSON"),
        ("", "handler output is not JSON"),
        ('["a"]', "handler result is not a FHIR resource (a JSON object with a resourceType)"),
        ('{"status": "final"}', "handler result is not a FHIR resource"),
        (
            '{"resourceType": "Observation", "status": "final"}',
            "handler result is not a valid FHIR resource: required at Observation.code",
        ),
        (
            json.dumps(
                {
                    "resourceType": "Observation",
                    "status": "final",
                    "code": {"text": "t"},
                    "valueQuantity": {"value": PATIENT_NAME},
                }
            ),
            "handler result is not a valid FHIR resource: value at Observation.valueQuantity.value",
        ),
        (
            '{"resourceType": "NotAResource"}',
            "handler result is not a valid FHIR resource: not-supported at "
            "NotAResource.resourceType",
        ),
    ],
)
async def test_exec_output_that_is_not_a_valid_resource(output: str, message: str) -> None:
    command = "cat >/dev/null; printf '%s' " + shlex.quote(output)
    with pytest.raises(HandlerError) as caught:
        await ExecHandler(command, timeout_s=20)(CASE, EVENT)
    assert str(caught.value).startswith(message)
    no_patient_data(str(caught.value))


SPAWN = """
import subprocess, sys, time
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
with open(sys.argv[1], "w") as f:
    f.write(f"{__import__('os').getpid()} {grandchild.pid}")
time.sleep(60)
"""


def alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def read_pids(path: Path) -> list[int] | None:
    text = path.read_text() if path.exists() else ""
    return [int(p) for p in text.split()] if text.count(" ") == 1 else None


async def pids_written(path: Path) -> list[int]:
    for _ in range(200):
        pids = read_pids(path)
        if pids is not None:
            return pids
        await asyncio.sleep(0.05)
    raise AssertionError("the handler did not start its grandchild")


async def gone(pids: list[int]) -> bool:
    for _ in range(100):
        if not any(alive(p) for p in pids):
            return True
        await asyncio.sleep(0.05)
    return False


async def test_exec_timeout_kills_the_child_and_its_grandchild(tmp_path: Path) -> None:
    pids_file = tmp_path / "pids"
    command = f"{python(SPAWN)} {shlex.quote(str(pids_file))}"
    started = time.monotonic()
    with pytest.raises(HandlerError) as caught:
        await ExecHandler(command, timeout_s=1.5)(CASE, EVENT)
    assert str(caught.value) == "handler timed out after 1.5 s"
    assert time.monotonic() - started < 10
    pids = await pids_written(pids_file)
    assert await gone(pids), pids


async def test_exec_cancelled_kills_the_process_group(tmp_path: Path) -> None:
    pids_file = tmp_path / "pids"
    command = f"{python(SPAWN)} {shlex.quote(str(pids_file))}"
    task = asyncio.create_task(ExecHandler(command, timeout_s=60)(CASE, EVENT))
    pids = await pids_written(pids_file)
    assert all(alive(p) for p in pids)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await gone(pids), pids


def test_exec_refuses_an_empty_command_or_timeout() -> None:
    with pytest.raises(ValueError):
        ExecHandler("  ")
    with pytest.raises(ValueError):
        ExecHandler("true", timeout_s=0)


# --- webhook ------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


@dataclass
class Hook:
    url: str
    replies: list[Reply]
    requests: list[tuple[dict[str, str], bytes, float]] = field(default_factory=list)


def fhir_reply(resource: Mapping[str, Any], status: int = 200) -> Reply:
    return Reply(status, json.dumps(resource).encode(), {"Content-Type": "application/fhir+json"})


@pytest.fixture
async def hook() -> AsyncIterator[Hook]:
    """A loopback webhook answering with the scripted replies in turn (the last one
    again when they run out)."""
    state = Hook("", [])

    async def receive(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        state.requests.append((dict(request.headers), body, time.monotonic()))
        reply = state.replies.pop(0) if len(state.replies) > 1 else state.replies[0]
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        return web.Response(status=reply.status, body=reply.body, headers=reply.headers)

    app = web.Application()
    app.router.add_post("/hook", receive)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    state.url = f"http://127.0.0.1:{port}/hook"
    try:
        yield state
    finally:
        await runner.cleanup()


async def test_webhook_posts_an_r4b_notification_and_returns_the_answered_resource(
    hook: Hook,
) -> None:
    hook.replies = [fhir_reply(REPORT)]
    async with WebhookHandler(hook.url, backoff_s=0.01) as handler:
        assert await handler(CASE, EVENT) == REPORT
    ((headers, body, _),) = hook.requests
    assert headers["Content-Type"] == "application/fhir+json"
    assert (headers["X-Case-Id"], headers["X-Rule"]) == ("case-1", "critical-results")
    assert headers["X-Event-Id"] == EVENT["id"]
    posted = json.loads(body)
    Bundle.model_validate(posted)  # R4B
    urls = frozenset(e["fullUrl"] for e in posted["entry"])
    assert not errors_in(validate_resource(posted, bundle_urls=urls))
    assert posted["type"] == "history"
    first, *rest = posted["entry"]
    status = first["resource"]
    assert status["resourceType"] == "SubscriptionStatus"
    assert (status["status"], status["type"]) == ("active", "event-notification")
    assert status["eventsSinceSubscriptionStart"] == "1"
    assert status["topic"] == "urn:hl7bridge:diagnosis:critical-results"
    assert status["subscription"] == {"reference": "Subscription/critical-results"}
    (notified,) = status["notificationEvent"]
    header = EVENT["data"]["entry"][0]["resource"]
    assert notified["eventNumber"] == "1"
    assert notified["focus"] == header["focus"][0]  # the message's own focus
    assert notified["timestamp"] == EVENT["time"]
    assert first["fullUrl"] == f"urn:uuid:{status['id']}"
    assert first["request"]["method"] == "GET" and first["response"]["status"] == "200"
    assert [(e["fullUrl"], e["resource"]) for e in rest] == [
        (e["fullUrl"], e["resource"]) for e in EVENT["data"]["entry"]
    ]
    assert all(e["request"]["method"] == "POST" for e in rest)


def test_webhook_focus_is_the_matched_resource_when_the_case_names_it() -> None:
    case = replace(CASE, resource_type="Observation", resource_id=TROPONIN["resource"]["id"])
    posted = notification_bundle(case, EVENT, 7)
    status = posted["entry"][0]["resource"]
    assert status["notificationEvent"] == [
        {
            "eventNumber": "7",
            "timestamp": EVENT["time"],
            "focus": {"reference": TROPONIN["fullUrl"]},
        }
    ]
    assert status["eventsSinceSubscriptionStart"] == "7"
    Bundle.model_validate(posted)


def test_webhook_notification_of_a_single_resource_event() -> None:
    observation = {
        "resourceType": "Observation",
        "id": "obs-1",
        "status": "final",
        "code": {"text": "Troponin I"},
        "interpretation": [{"coding": [{"code": "HH"}]}],
    }
    posted = notification_bundle(CASE, {"id": "e", "data": observation}, 1)
    assert posted["entry"][1]["resource"] == observation
    assert "fullUrl" not in posted["entry"][1]
    (notified,) = posted["entry"][0]["resource"]["notificationEvent"]
    assert notified == {"eventNumber": "1", "focus": {"reference": "Observation/obs-1"}}
    Bundle.model_validate(posted)


async def test_webhook_retries_503_then_succeeds_with_the_same_notification(hook: Hook) -> None:
    hook.replies = [Reply(503), Reply(503), fhir_reply(REPORT, 201)]
    async with WebhookHandler(hook.url, attempts=3, backoff_s=0.05) as handler:
        assert await handler(CASE, EVENT) == REPORT
    assert len(hook.requests) == 3
    bodies = {body for _, body, _ in hook.requests}
    assert len(bodies) == 1  # the tries of one call share the Bundle id and number
    first, second, third = (t for _, _, t in hook.requests)
    assert second - first >= 0.04 and third - second >= 0.09  # exponential backoff


async def test_webhook_does_not_retry_a_400(hook: Hook) -> None:
    hook.replies = [Reply(400, f"bad {PATIENT_NAME}".encode()), fhir_reply(REPORT)]
    async with WebhookHandler(hook.url, attempts=3, backoff_s=0.01) as handler:
        with pytest.raises(HandlerError) as caught:
            await handler(CASE, EVENT)
    assert str(caught.value) == "webhook answered HTTP 400"
    assert len(hook.requests) == 1


async def test_webhook_gives_up_after_attempts_of_5xx(hook: Hook) -> None:
    hook.replies = [Reply(500), Reply(502), Reply(503, f"down {PATIENT_NAME}".encode())]
    async with WebhookHandler(hook.url, attempts=3, backoff_s=0.01) as handler:
        with pytest.raises(HandlerError) as caught:
            await handler(CASE, EVENT)
    assert str(caught.value) == "webhook answered HTTP 503; gave up after 3 tries"
    assert len(hook.requests) == 3


async def test_webhook_retries_408_and_429_honouring_retry_after(hook: Hook) -> None:
    hook.replies = [Reply(408), Reply(429, headers={"Retry-After": "1"}), fhir_reply(REPORT)]
    async with WebhookHandler(hook.url, attempts=3, backoff_s=0.01) as handler:
        assert await handler(CASE, EVENT) == REPORT
    times = [t for _, _, t in hook.requests]
    assert len(times) == 3
    assert times[2] - times[1] >= 0.95


async def test_webhook_timeout_is_retried_then_reported(hook: Hook) -> None:
    hook.replies = [Reply(200, json.dumps(REPORT).encode(), delay_s=2.0)]
    async with WebhookHandler(hook.url, timeout_s=0.2, attempts=2, backoff_s=0.01) as handler:
        with pytest.raises(HandlerError) as caught:
            await handler(CASE, EVENT)
    assert str(caught.value) == "webhook timed out after 0.2 s; gave up after 2 tries"
    assert len(hook.requests) == 2


async def test_webhook_timeout_then_success(hook: Hook) -> None:
    hook.replies = [Reply(200, b"{}", delay_s=2.0), fhir_reply(REPORT)]
    async with WebhookHandler(hook.url, timeout_s=0.5, attempts=2, backoff_s=0.01) as handler:
        assert await handler(CASE, EVENT) == REPORT


async def test_webhook_connection_refused_is_retried_then_reported() -> None:
    async with WebhookHandler("http://127.0.0.1:1/hook", attempts=2, backoff_s=0.01) as handler:
        with pytest.raises(HandlerError) as caught:
            await handler(CASE, EVENT)
    assert str(caught.value).startswith("webhook request failed: Client")
    assert str(caught.value).endswith("; gave up after 2 tries")


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (Reply(204), "webhook answered HTTP 204 without a FHIR resource"),
        (
            Reply(200, PATIENT_NAME.encode()),
            "webhook answered HTTP 200 with a body that is not JSON",
        ),
        (
            Reply(
                200, json.dumps({"resourceType": "DiagnosticReport", "status": "final"}).encode()
            ),
            "webhook result is not a valid FHIR resource: required at DiagnosticReport.code",
        ),
        (Reply(200, b'{"ok": true}'), "webhook result is not a FHIR resource"),
        (Reply(302, headers={"Location": "/elsewhere"}), "webhook answered HTTP 302"),
    ],
)
async def test_webhook_an_answer_without_a_valid_resource_fails_at_once(
    hook: Hook, reply: Reply, message: str
) -> None:
    hook.replies = [reply, fhir_reply(REPORT)]
    async with WebhookHandler(hook.url, attempts=3, backoff_s=0.01) as handler:
        with pytest.raises(HandlerError) as caught:
            await handler(CASE, EVENT)
    assert str(caught.value).startswith(message)
    no_patient_data(str(caught.value))
    assert len(hook.requests) == 1


async def test_webhook_numbers_its_notifications(hook: Hook) -> None:
    hook.replies = [fhir_reply(REPORT)]
    async with WebhookHandler(hook.url) as handler:
        await handler(CASE, EVENT)
        await handler(replace(CASE, case_id="case-2"), EVENT)
    numbers = [
        json.loads(body)["entry"][0]["resource"]["notificationEvent"][0]["eventNumber"]
        for _, body, _ in hook.requests
    ]
    assert numbers == ["1", "2"]
    assert [h["X-Case-Id"] for h, _, _ in hook.requests] == ["case-1", "case-2"]


async def test_webhook_closes_its_own_session_only(hook: Hook) -> None:
    hook.replies = [fhir_reply(REPORT)]
    handler = WebhookHandler(hook.url)
    await handler(CASE, EVENT)
    own = handler._session
    assert own is not None and not own.closed
    await handler.aclose()
    assert own.closed
    async with aiohttp.ClientSession() as session:
        given = WebhookHandler(hook.url, session=session)
        assert await given(CASE, EVENT) == REPORT
        await given.aclose()
        assert not session.closed


# --- callback -----------------------------------------------------------------------------


async def test_callback_result_is_validated() -> None:
    seen: list[tuple[CaseInfo, Mapping[str, Any]]] = []

    async def good(case: CaseInfo, event: Mapping[str, Any]) -> dict[str, Any]:
        seen.append((case, event))
        return dict(REPORT)

    async def bad(case: CaseInfo, event: Mapping[str, Any]) -> dict[str, Any]:
        return {"resourceType": "Communication", "status": 7}

    assert await CallbackHandler(good)(CASE, EVENT) == REPORT
    assert seen == [(CASE, EVENT)]
    with pytest.raises(HandlerError) as caught:
        await CallbackHandler(bad)(CASE, EVENT)
    assert str(caught.value) == (
        "handler result is not a valid FHIR resource: value at Communication.status"
    )


async def test_callback_bundle_references_resolve_among_its_entries() -> None:
    patient_url = "urn:uuid:9a0b6a2e-1111-4222-8333-444455556666"
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {"fullUrl": patient_url, "resource": {"resourceType": "Patient"}},
            {"resource": {**REPORT, "subject": {"reference": patient_url}}},
        ],
    }

    async def answer(case: CaseInfo, event: Mapping[str, Any]) -> dict[str, Any]:
        return bundle

    assert await CallbackHandler(answer)(CASE, EVENT) == bundle
    bundle["entry"] = bundle["entry"][1:]
    with pytest.raises(HandlerError) as caught:
        await CallbackHandler(answer)(CASE, EVENT)
    assert str(caught.value) == (
        "handler result is not a valid FHIR resource: "
        "value at Bundle.entry[0].resource.subject.reference"
    )


async def test_callback_exceptions_become_handler_errors_naming_the_class_only() -> None:
    async def failing(case: CaseInfo, event: Mapping[str, Any]) -> dict[str, Any]:
        raise KeyError(PATIENT_NAME)

    async def refusing(case: CaseInfo, event: Mapping[str, Any]) -> dict[str, Any]:
        raise HandlerError("reviewer unavailable")

    with pytest.raises(HandlerError) as caught:
        await CallbackHandler(failing)(CASE, EVENT)
    assert str(caught.value) == "handler raised KeyError"
    assert caught.value.__suppress_context__
    with pytest.raises(HandlerError, match=r"^reviewer unavailable$"):
        await CallbackHandler(refusing)(CASE, EVENT)
