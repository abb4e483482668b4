"""``hl7bridge tail`` as a user runs it, against a real instance and broker: trace a
message through every topic (raw, event, remote-diagnosis case; a rejected one on
the DLQ with its reason), and follow new records until interrupted."""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

from bridge.service import BridgeInstance
from tests.conftest import REPO_ROOT
from tests.integration.conftest import InstanceFactory
from tests.integration.test_diagnosis import diagnosis_events, leader_of, send, troponin

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def tail_args(instance: BridgeInstance, *args: str) -> list[str]:
    settings = instance.settings
    return [
        *(sys.executable, "-m", "bridge.cli", "tail", *args),
        *("--kafka", settings.kafka, "--topic-prefix", settings.topic_prefix),
    ]


async def run_tail(instance: BridgeInstance, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        tail_args(instance, *args),
        capture_output=True,
        text=True,
        timeout=90,
        cwd=REPO_ROOT,
    )


def siu(control_id: str) -> bytes:
    """A message type the instance does not accept: AR 200, to the DLQ."""
    segments = (
        f"MSH|^~\\&|SCHED|HOSP|EHR|HOSP|20240101120000+0100||SIU^S12^SIU_S12|{control_id}|P|2.5.1",
        "SCH|1||||||||||||||||||||||||",
        "PID|1||P77^^^HOSP^MR||DOE^JANE||19800101|F",
    )
    return ("\r".join(segments) + "\r").encode()


async def test_tail_traces_a_message_through_every_topic(
    start_instance: InstanceFactory, broker: Any, topic_prefix: str
) -> None:
    instance = await leader_of(start_instance, broker, accept_message_types=("ADT", "ORU"))
    assert await send(instance, [troponin("TRACE-1"), troponin("OTHER-1", flag="N")]) == [
        "AA",
        "AA",
    ]
    assert await send(instance, [siu("TRACE-2")]) == ["AR"]
    opened = await diagnosis_events(broker, topic_prefix, 1)
    assert opened

    done = await run_tail(instance, "--all", "--no-follow", "--control-id", "TRACE-1")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    topics = [line.split()[1] for line in lines]
    # In pipeline order: the raw record, its event, then the case opened for the event.
    assert topics[:2] == ["raw.hl7v2", "events"] and set(topics[2:]) == {"diagnosis"}
    assert len(topics) >= 3
    event_line = lines[1]
    assert "ctl=TRACE-1" in event_line and "from=LAB|HOSP" in event_line
    event_id = next(p for p in event_line.split() if p.startswith("id=")).removeprefix("id=")
    assert all(f"event={event_id}" in line for line in lines[2:])
    assert "diagnosis.case.opened" in lines[2]
    assert "OTHER-1" not in done.stdout
    assert "DOE" not in done.stdout and "P77" not in done.stdout  # no patient data

    rejected = await run_tail(instance, "dlq", "--no-follow", "--control-id", "TRACE-2", "--json")
    assert rejected.returncode == 0, rejected.stderr
    (record,) = [json.loads(line) for line in rejected.stdout.splitlines()]
    headers = record["headers"]
    assert record["topic"] == f"{topic_prefix}.dlq"
    assert headers["dlq_reason"] == "unsupported_message_type"
    assert (headers["dlq_ack_code"], headers["dlq_err_code"]) == ("AR", "200")
    assert headers["ce_hl7controlid"] == "TRACE-2" and "value" not in record

    missing = await run_tail(instance, "--all", "--no-follow", "--control-id", "NOPE")
    assert missing.returncode == 1 and "no record matched" in missing.stderr
    unknown = await run_tail(instance, "nosuch", "--no-follow")
    assert unknown.returncode == 2 and "does not exist" in unknown.stderr


def _read_line(proc: subprocess.Popen[str], deadline: float) -> str | None:
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            return proc.stdout.readline()
    return None


async def test_tail_follows_new_records_until_interrupted(
    start_instance: InstanceFactory, broker: Any
) -> None:
    instance = await start_instance(broker.bootstrap)
    assert await send(instance, [troponin("BEFORE-1")]) == ["AA"]
    proc = await asyncio.to_thread(
        subprocess.Popen,
        tail_args(instance, "events"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
        start_new_session=True,
    )
    try:
        # It starts at the end: messages sent from now on appear, the earlier one not.
        seen: list[str] = []
        deadline = time.monotonic() + 30
        n = 0
        while not seen and time.monotonic() < deadline:
            n += 1
            assert await send(instance, [troponin(f"FOLLOW-{n}")]) == ["AA"]
            line = await asyncio.to_thread(_read_line, proc, time.monotonic() + 1.0)
            if line:
                seen.append(line)
        assert seen, "tail printed nothing"
        assert await send(instance, [troponin("LAST-1")]) == ["AA"]
        while not any("ctl=LAST-1" in line for line in seen):
            line = await asyncio.to_thread(_read_line, proc, time.monotonic() + 15)
            assert line, "LAST-1 did not appear"
            seen.append(line)
        assert not any("BEFORE-1" in line for line in seen)
        controls = [p for line in seen for p in line.split() if p.startswith("ctl=")]
        assert controls[-1] == "ctl=LAST-1"
        assert all(c.startswith("ctl=FOLLOW-") for c in controls[:-1])
        os.killpg(proc.pid, signal.SIGINT)
        assert await asyncio.to_thread(proc.wait, 15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
