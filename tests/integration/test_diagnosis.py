"""Remote diagnosis end to end, against a real ZooKeeper and the broker, with real
bridge instances and subscribers (in-process and `hl7bridge subscribe` processes):
cases open from HL7 v2 and FHIR events, wake subscribers, are handled exactly once,
survive a subscriber's SIGKILL, fail after retries, escalate with nobody there."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from adapters.mllp.client import MLLPClient
from bridge.cluster.cluster_config import ClusterConfig, DiagnosisRule, RuleMatch
from bridge.cluster.config_store import ConfigStore
from bridge.cluster.status import read_status
from bridge.diagnosis import cases as c
from bridge.diagnosis.handlers import CallbackHandler, CaseInfo
from bridge.diagnosis.subscriber import Subscriber, SubscriberSettings
from bridge.sender import summarize_ack
from bridge.service import BridgeInstance
from tests.integration.conftest import InstanceFactory
from tests.integration.test_cluster import eventually
from tests.kafka_helpers import read_topic
from tests.processes import reap_all, start_cli

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

REPORT = {
    "resourceType": "DiagnosticReport",
    "status": "final",
    "code": {"text": "remote review of a critical result"},
    "conclusion": "reviewed",
}


def troponin(control_id: str, flag: str = "HH", patient: str = "P77") -> bytes:
    segments = (
        f"MSH|^~\\&|LAB|HOSP|EHR|HOSP|20240101120000+0100||ORU^R01^ORU_R01|{control_id}|P|2.5.1",
        f"PID|1||{patient}^^^HOSP^MR||DOE^JANE||19800101|F",
        "OBR|1|||10839-9^Troponin I.cardiac^LN",
        f"OBX|1|NM|10839-9^Troponin I.cardiac^LN||2.5|ng/mL|0.00-0.04|{flag}|||F",
    )
    return ("\r".join(segments) + "\r").encode()


async def send(instance: BridgeInstance, messages: list[bytes]) -> list[str]:
    async with MLLPClient("127.0.0.1", instance.mllp.port) as client:
        return [
            summarize_ack("t", 1, await client.send(m, timeout_s=15)).ack_code for m in messages
        ]


def subscriber_settings(instance: BridgeInstance, **extra: Any) -> SubscriberSettings:
    settings = instance.settings
    values: dict[str, Any] = {
        "zookeeper": settings.zookeeper_servers,
        "base_path": settings.zookeeper_base_path,
        "kafka": settings.kafka,
        "topic_prefix": settings.topic_prefix,
        "rules": ("critical-results",),
        "session_timeout_s": 3.0,
    }
    values.update(extra)
    return SubscriberSettings(**values)


async def diagnosis_events(
    broker: Any, prefix: str, minimum: int, timeout_s: float = 30
) -> list[Any]:
    return await read_topic(
        broker.bootstrap, f"{prefix}.diagnosis", min_records=minimum, timeout_s=timeout_s
    )


def _kind(record: Any) -> str:
    """``opened``, ``claimed``, ... or ``result``: the last part of ce_type."""
    return str(dict(record.headers)["ce_type"].decode().rsplit(".", 1)[-1])


def kinds(records: list[Any]) -> Counter[str]:
    return Counter(_kind(r) for r in records)


async def leader_of(start_instance: InstanceFactory, broker: Any, **extra: Any) -> BridgeInstance:
    instance = await start_instance(broker.bootstrap, **extra)
    await eventually(lambda: _is(instance.cluster.election.is_leader), 10)
    await eventually(lambda: _is(instance.diagnosis.reading), 10)
    return instance


async def test_a_critical_troponin_wakes_a_subscriber_and_the_result_is_published(
    start_instance: InstanceFactory, broker: Any, topic_prefix: str
) -> None:
    instance = await leader_of(start_instance, broker)
    woken: list[float] = []
    seen: list[Mapping[str, Any]] = []

    async def review(case: CaseInfo, event: Mapping[str, Any]) -> dict[str, Any]:
        woken.append(time.monotonic())
        seen.append(event)
        return REPORT

    subscriber = Subscriber(subscriber_settings(instance), CallbackHandler(review))
    await subscriber.start()
    try:
        assert await send(instance, [troponin("TROP-N", flag="N")]) == ["AA"]
        acked_at = time.monotonic()
        assert await send(instance, [troponin("TROP-HH")]) == ["AA"]
        acked_at = time.monotonic()
        await eventually(lambda: _is(len(woken) == 1), 5, step_s=0.005)
        assert woken[0] - acked_at < 1.0  # the benchmark measures it precisely
        await eventually(lambda: _is(len(subscriber.handled) == 1), 5)
    finally:
        await subscriber.stop()
    (event,) = seen
    assert event["hl7controlid"] == "TROP-HH" and event["data"]["resourceType"] == "Bundle"
    records = await diagnosis_events(broker, topic_prefix, 4)
    assert kinds(records) == Counter({"opened": 1, "claimed": 1, "completed": 1, "result": 1})
    (result,) = [r for r in records if _kind(r) == "result"]
    assert orjson.loads(result.value) == REPORT
    assert result.key == b"HOSP|P77"  # keyed by patient, like the event
    # The case znode went away; its closed marker stays.
    session = instance.zookeeper
    assert (
        await session.call(
            session.client.get_children, session.path("diagnosis", "cases", "critical-results")
        )
        == []
    )


async def test_a_fhir_observation_interpreted_ll_opens_a_case_the_same_way(
    start_instance: InstanceFactory, broker: Any, topic_prefix: str
) -> None:
    instance = await leader_of(start_instance, broker)
    handled: list[str] = []

    async def review(case: CaseInfo, event: Mapping[str, Any]) -> dict[str, Any]:
        handled.append(event["data"]["entry"][1]["resource"]["resourceType"])
        return REPORT

    subscriber = Subscriber(subscriber_settings(instance), CallbackHandler(review))
    await subscriber.start()
    observation = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "2823-3"}]},
        "subject": {"reference": "Patient/p-ll"},
        "valueQuantity": {"value": 2.1, "unit": "mmol/L"},
        "interpretation": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
                        "code": "LL",
                    }
                ]
            }
        ],
    }
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"{instance.http_url}/fhir/Observation",
                data=orjson.dumps(observation),
                headers={"Content-Type": "application/fhir+json"},
            ) as response,
        ):
            assert response.status == 202
        await eventually(lambda: _is(len(subscriber.handled) == 1), 10)
    finally:
        await subscriber.stop()
    assert handled == ["Observation"]
    records = await diagnosis_events(broker, topic_prefix, 4)
    assert kinds(records)["completed"] == 1
    (result,) = [r for r in records if _kind(r) == "result"]
    assert result.key == b"Patient/p-ll"


async def test_a_resent_message_opens_its_case_once(
    start_instance: InstanceFactory, broker: Any, topic_prefix: str
) -> None:
    instance = await leader_of(start_instance, broker)
    other = await start_instance(broker.bootstrap, instance_id="it-2")
    message = troponin("RESENT-1")
    assert await send(instance, [message]) == ["AA"]
    assert await send(other, [message]) == ["AA"]  # another instance: on Kafka twice
    records = await diagnosis_events(broker, topic_prefix, 1, timeout_s=5)
    await asyncio.sleep(1.0)
    records = await diagnosis_events(broker, topic_prefix, 1, timeout_s=5)
    assert kinds(records) == Counter({"opened": 1})


async def test_the_opener_saves_its_read_positions_and_the_next_leader_resumes_there(
    start_instance: InstanceFactory, broker: Any, topic_prefix: str
) -> None:
    first = await leader_of(start_instance, broker)
    second = await start_instance(broker.bootstrap, instance_id="it-2")
    normal = [troponin(f"N-{n}", flag="N", patient=f"P{n}") for n in range(20)]
    assert await send(first, [*normal, troponin("CRIT-1"), troponin("CRIT-2")]) == ["AA"] * 22
    await eventually(lambda: _opened(broker, topic_prefix, 2), 15)
    await first.stop()  # a graceful handover saves where the opener got to
    await eventually(lambda: _is(second.diagnosis.reading), 15)
    session = second.zookeeper
    topic = f"{topic_prefix}.events"
    saved = 0
    for partition in await session.call(
        session.client.get_children, c.path(session, c.OFFSETS, topic)
    ):
        data, _ = await session.call(
            session.client.get, c.path(session, c.OFFSETS, topic, partition)
        )
        saved += orjson.loads(data)["offset"]
    assert saved == 22  # every event read, none left to read again (one record each)
    assert await send(second, [troponin("CRIT-3")]) == ["AA"]
    await eventually(lambda: _opened(broker, topic_prefix, 3), 15)
    await asyncio.sleep(1.0)
    records = await diagnosis_events(broker, topic_prefix, 3, timeout_s=5)
    assert kinds(records) == Counter({"opened": 3})


async def _opened(broker: Any, prefix: str, count: int) -> bool:
    records = await diagnosis_events(broker, prefix, 0, timeout_s=2)
    return kinds(records)["opened"] >= count


async def test_with_no_subscriber_the_case_escalates_on_time(
    start_instance: InstanceFactory, broker: Any, topic_prefix: str
) -> None:
    instance = await leader_of(start_instance, broker)
    rule = DiagnosisRule(
        name="critical-results",
        priority=1,
        escalation_s=1.0,
        match=RuleMatch(resource_type="Observation", interpretation=["HH", "LL", "AA"]),
    )
    version = await ConfigStore(instance.zookeeper).push(
        ClusterConfig(diagnosis_rules=[rule]), source="test"
    )
    await eventually(lambda: _is(instance.cluster.config_version == version), 2)
    assert await send(instance, [troponin("ESC-1")]) == ["AA"]
    records = await diagnosis_events(broker, topic_prefix, 3, timeout_s=10)
    opened = [r for r in records if _kind(r) == "opened"]
    escalated = [r for r in records if _kind(r) == "escalated"]
    assert len(opened) == 1 and len(escalated) >= 2  # escalated, then re-announced
    status = await read_status(instance.zookeeper)
    assert status["diagnosis"] == {
        "open_cases": {"critical-results": 1},
        "claimed": 0,
        "subscribers": [],
    }
    first = orjson.loads(escalated[0].value)
    assert first["escalations"] == 1 and first["priority"] == 1
    delay_ms = escalated[0].timestamp - opened[0].timestamp
    assert 900 <= delay_ms <= 2500, delay_ms
    assert escalated[0].key == b"HOSP|P77"


# --- with `hl7bridge subscribe` processes ----------------------------------------------------


@pytest.fixture
async def subscribers(
    zookeeper: Any, zk_chroot: str, broker: Any, topic_prefix: str
) -> AsyncIterator[Callable[..., Any]]:
    procs: list[subprocess.Popen[str]] = []

    async def start(name: str, command: str, *extra: str) -> subprocess.Popen[str]:
        proc = await asyncio.to_thread(
            start_cli,
            [
                "subscribe",
                "--zookeeper", f"{zookeeper.hosts}{zk_chroot}", "--kafka", broker.bootstrap,
                "--cluster", "it", "--topic-prefix", topic_prefix,
                "--rule", "critical-results", "--exec", command, "--subscriber-id", name,
                "--zookeeper-session-timeout-s", "3", "--kafka-idempotence", "false",
                "--log-level", "WARNING", *extra,
            ],
        )  # fmt: skip
        procs.append(proc)
        return proc

    yield start
    reap_all(procs)


def _handler_script(tmp_path: Path, body: str, name: str = "handler") -> str:
    script = tmp_path / f"{name}.py"
    script.write_text(
        "import json, os, sys, time, pathlib\n"
        "event = json.load(sys.stdin)\n"
        "case = os.environ['HL7BRIDGE_CASE_ID']\n"
        f"log = pathlib.Path({str(tmp_path / 'handled.log')!r})\n"
        + body
        + "\nattempt = os.environ['HL7BRIDGE_ATTEMPT']\n"
        + "with log.open('a') as f: f.write(case + ' ' + attempt + '\\n')\n"
        + f"print(json.dumps({REPORT!r}))\n"
    )
    return f"{sys.executable} {script}"


async def test_two_subscriber_processes_200_cases_each_handled_exactly_once(
    start_instance: InstanceFactory,
    broker: Any,
    topic_prefix: str,
    subscribers: Callable[..., Any],
    tmp_path: Path,
) -> None:
    instance = await leader_of(start_instance, broker)
    command = _handler_script(tmp_path, "")
    await subscribers("sub-a", command)
    await subscribers("sub-b", command)
    messages = [troponin(f"C{i:03d}", patient=f"P{i % 13}") for i in range(200)]
    assert set(await send(instance, messages)) == {"AA"}
    records = await diagnosis_events(broker, topic_prefix, 800, timeout_s=120)
    counts = kinds(records)
    assert counts["opened"] == 200 and counts["completed"] == 200 and counts["result"] == 200
    completed = Counter(dict(r.headers)["ce_caseid"] for r in records if _kind(r) == "completed")
    assert len(completed) == 200 and set(completed.values()) == {1}
    lines = (tmp_path / "handled.log").read_text().split()
    handled = Counter(lines[0::2])
    assert len(handled) == 200 and set(handled.values()) == {1}  # each case handled once
    by = Counter(orjson.loads(r.value)["subscriber"] for r in records if _kind(r) == "completed")
    assert set(by) == {"sub-a", "sub-b"}  # both took part


async def test_a_subscriber_killed_mid_case_another_completes_it(
    start_instance: InstanceFactory,
    broker: Any,
    topic_prefix: str,
    subscribers: Callable[..., Any],
    tmp_path: Path,
) -> None:
    instance = await leader_of(start_instance, broker)
    started = tmp_path / "started"
    # The first subscriber hangs inside its handler (and says so); the second is normal.
    slow = _handler_script(
        tmp_path, f"pathlib.Path({str(started)!r}).write_text(case)\ntime.sleep(120)", "slow"
    )
    victim = await subscribers("sub-slow", slow)
    assert await send(instance, [troponin("KILL-1")]) == ["AA"]
    await eventually(lambda: _is(started.exists()), 20)
    await subscribers("sub-ok", _handler_script(tmp_path, ""))
    os.killpg(victim.pid, signal.SIGKILL)  # the subscriber and its handler
    victim.wait(timeout=10)
    records = await diagnosis_events(broker, topic_prefix, 5, timeout_s=30)
    counts = kinds(records)
    assert counts["completed"] == 1 and counts["result"] == 1
    completed = [orjson.loads(r.value) for r in records if _kind(r) == "completed"]
    assert completed[0]["subscriber"] == "sub-ok"
    await asyncio.sleep(2.0)  # nothing more happens to a completed case
    again = await diagnosis_events(broker, topic_prefix, 5, timeout_s=5)
    assert kinds(again)["completed"] == 1 and kinds(again)["result"] == 1


async def test_a_failing_handler_is_retried_then_the_case_fails(
    start_instance: InstanceFactory,
    broker: Any,
    topic_prefix: str,
    subscribers: Callable[..., Any],
    tmp_path: Path,
) -> None:
    instance = await leader_of(start_instance, broker)
    await subscribers(
        "sub-fail", f"{sys.executable} -c 'import sys; sys.exit(3)'", "--max-attempts", "3"
    )
    assert await send(instance, [troponin("FAIL-1")]) == ["AA"]
    records = await diagnosis_events(broker, topic_prefix, 5, timeout_s=30)
    counts = kinds(records)
    assert counts == Counter({"opened": 1, "claimed": 3, "failed": 1})
    failed = [orjson.loads(r.value) for r in records if _kind(r) == "failed"]
    assert failed[0]["attempts"] == 3 and "status 3" in failed[0]["reason"]


async def _is(value: bool) -> bool:
    return value
