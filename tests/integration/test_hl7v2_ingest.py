"""MLLP into Kafka against a real ZooKeeper and the real Tansu broker.

Each test gets its own topic prefix and ZooKeeper chroot; the servers are the
session's (or the test's own broker where it is stopped on purpose).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import orjson
import pytest
from kazoo.client import KazooClient

from adapters.hl7v2.ack import map_ack_code
from adapters.hl7v2.er7 import parse_message
from adapters.hl7v2.files import split_messages
from adapters.mllp.client import MLLPClient
from bridge.config import DEFAULT_ACCEPTED_MESSAGE_TYPES
from bridge.dedupe import content_fingerprint
from bridge.envelope import hl7v2_event_id
from bridge.kafka import ensure_topics
from bridge.sender import summarize_ack
from bridge.service import BridgeInstance
from tests.integration.conftest import InstanceFactory
from tests.kafka_helpers import read_topic

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


async def _send_all(instance: BridgeInstance, messages: list[bytes]) -> list[bytes]:
    async with MLLPClient("127.0.0.1", instance.mllp.port) as client:
        return [await client.send(m, timeout_s=15) for m in messages]


def _msa(ack: bytes) -> tuple[str, str]:
    message = parse_message(ack)
    return message.field("MSA", 1), message.field("MSA", 2)


def _err(ack: bytes, field_no: int) -> str:
    """A whole ERR field, components included (ERR-3 is code^text^HL70357)."""
    segment = parse_message(ack).segment("ERR")
    assert segment is not None, ack
    return segment[field_no]


def _err_code(ack: bytes) -> str:
    """The first ERR's table 0357 code, whatever the ACK's version (ERR-3 or ERR-1)."""
    errors = summarize_ack("ack", 1, ack).errors
    assert errors, ack
    return errors[0]["code"]


def _headers(record: Any) -> dict[str, bytes]:
    return {k: v for k, v in record.headers}


def _corpus_messages(corpus_dir: Path) -> list[tuple[str, bytes]]:
    folder = corpus_dir / "microsoft-fhir-converter" / "data" / "SampleData" / "Hl7v2"
    found = []
    for path in sorted(folder.glob("*.hl7")):
        for message in split_messages(path.read_bytes()):
            found.append((path.name, message))
    assert len(found) >= 139
    return found


async def test_every_accepted_corpus_message_is_acked_and_published_once(
    start_instance: InstanceFactory, broker: Any, topic_prefix: str, corpus_dir: Path
) -> None:
    instance = await start_instance(broker.bootstrap)
    corpus = _corpus_messages(corpus_dir)
    acks = await _send_all(instance, [m for _, m in corpus])

    expected_ids: set[str] = set()
    rejected = 0
    for (name, message), ack in zip(corpus, acks, strict=True):
        parsed = parse_message(message)
        header = parsed.header
        code, echoed = _msa(ack)
        assert echoed == header.control_id, name
        if header.message_code in DEFAULT_ACCEPTED_MESSAGE_TYPES:
            # enhanced mode (MSH-15 set) answers with commit codes
            assert code == map_ack_code("AA", header), (name, ack)
            expected_ids.add(
                hl7v2_event_id(
                    header.sender_key, header.control_id, content_fingerprint(parsed.text)
                )
            )
        else:
            assert code == map_ack_code("AR", header), name
            assert _err_code(ack) == "200", name
            rejected += 1
    assert rejected > 0  # BAR, DFT, OUL, RDE... are in the corpus and not accepted

    raw = await read_topic(
        broker.bootstrap, f"{topic_prefix}.raw.hl7v2", min_records=len(expected_ids)
    )
    events = await read_topic(
        broker.bootstrap, f"{topic_prefix}.events", min_records=len(expected_ids)
    )
    dlq = await read_topic(broker.bootstrap, f"{topic_prefix}.dlq", min_records=rejected)
    raw_ids = [_headers(r)["ce_id"].decode() for r in raw]
    event_ids = [_headers(r)["ce_id"].decode() for r in events]
    assert sorted(raw_ids) == sorted(expected_ids)  # each exactly once
    assert sorted(event_ids) == sorted(expected_ids)
    assert len(dlq) == rejected

    for record in events:
        headers = _headers(record)
        assert headers["ce_specversion"] == b"1.0"
        assert headers["content-type"] == b"application/fhir+json"
        assert headers["ce_type"].startswith(b"org.hl7bridge.hl7v2.")
        assert headers["ce_source"].startswith(b"urn:hl7v2:")
        assert headers["ce_time"].endswith(b"Z")
        assert headers["ce_bridgeinstance"] == b"it-1"
        bundle = orjson.loads(record.value)
        assert bundle["resourceType"] == "Bundle"
        assert bundle["type"] == "message"
        assert bundle["entry"][0]["resource"]["resourceType"] == "MessageHeader"
        assert record.key  # the patient key, or the sender for patient-less messages


ADT = (
    "MSH|^~\\&|EHR|GENHOSP|HL7BRIDGE|HUB|20240101120000||ADT^A01^ADT_A01|{control}|P|{version}{tail}\r"
    "EVN|A01|20240101120000\r"
    "PID|1||MRN123^^^GENHOSP^MR||DOE^JANE||19800101|F\r"
    "PV1|1|I|WARD1^101^A\r"
)


def _adt(control: str = "CTRL1", version: str = "2.5.1", tail: str = "") -> bytes:
    return ADT.format(control=control, version=version, tail=tail).encode()


async def test_error_cases_get_their_ack_and_err_codes(
    start_instance: InstanceFactory, broker: Any, topic_prefix: str
) -> None:
    instance = await start_instance(broker.bootstrap)
    missing_control = _adt(control="")
    missing_type = _adt().replace(b"ADT^A01^ADT_A01", b"")
    unsupported_type = _adt(control="T1").replace(b"ADT^A01^ADT_A01", b"ZZZ^Z01^ZZZ_Z01")
    bad_version = _adt(control="V1", version="9.9")
    not_hl7 = b"this is not an HL7 message at all"
    enhanced = _adt(control="E1", tail="|||AL|NE")
    acks = await _send_all(
        instance, [missing_control, missing_type, unsupported_type, bad_version, not_hl7, enhanced]
    )

    assert _msa(acks[0]) == ("AE", "")
    assert _err_code(acks[0]) == "101"
    assert _err(acks[0], 2) == "MSH^1^10"
    assert _msa(acks[1]) == ("AE", "CTRL1")
    assert _err_code(acks[1]) == "101"
    assert _msa(acks[2]) == ("AR", "T1")
    assert _err_code(acks[2]) == "200"
    assert _msa(acks[3]) == ("AR", "V1")
    # 9.9 is unknown to us; the ACK keeps the sender's version anyway
    assert parse_message(acks[3]).header.version_id == "9.9"
    assert _err_code(acks[3]) == "203"
    assert _msa(acks[4])[0] == "AE"
    assert _err_code(acks[4]) == "100"
    assert _msa(acks[5]) == ("CA", "E1")

    # The ACK's MSH swaps sender and receiver and keeps the version.
    ack = parse_message(acks[5]).header
    assert (ack.sending_application, ack.sending_facility) == ("HL7BRIDGE", "HUB")
    assert (ack.receiving_application, ack.receiving_facility) == ("EHR", "GENHOSP")
    assert ack.version_id == "2.5.1"

    dlq = await read_topic(broker.bootstrap, f"{topic_prefix}.dlq", min_records=5)
    reasons = sorted(_headers(r)["dlq_err_code"].decode() for r in dlq)
    assert reasons == ["100", "101", "101", "200", "203"]
    raw = await read_topic(broker.bootstrap, f"{topic_prefix}.raw.hl7v2", min_records=1)
    assert [_headers(r)["ce_hl7controlid"] for r in raw] == [b"E1"]


async def test_resent_message_is_acked_again_but_published_once(
    start_instance: InstanceFactory, broker: Any, topic_prefix: str
) -> None:
    instance = await start_instance(broker.bootstrap)
    first = _adt(control="DUP1")
    resend = first.replace(b"20240101120000||ADT", b"20240101120500||ADT")  # fresh MSH-7
    reused = _adt(control="DUP1").replace(b"DOE^JANE", b"ROE^RICHARD")
    acks = await _send_all(instance, [first, resend, first, reused])
    assert [_msa(a) for a in acks] == [("AA", "DUP1")] * 4

    raw = await read_topic(broker.bootstrap, f"{topic_prefix}.raw.hl7v2", min_records=2)
    events = await read_topic(broker.bootstrap, f"{topic_prefix}.events", min_records=2)
    await asyncio.sleep(0.5)
    raw = await read_topic(broker.bootstrap, f"{topic_prefix}.raw.hl7v2", min_records=2)
    # the first copy and the different message under a reused control id
    assert len(raw) == 2
    assert len(events) == 2
    assert len({_headers(r)["ce_id"] for r in events}) == 2
    assert instance.metrics.duplicates.labels("mllp")._value.get() == 2


async def test_concurrent_resends_publish_once(
    start_instance: InstanceFactory, broker: Any, topic_prefix: str
) -> None:
    instance = await start_instance(broker.bootstrap)
    message = _adt(control="RACE1")
    results = await asyncio.gather(*(_send_all(instance, [message]) for _ in range(8)))
    assert all(_msa(acks[0]) == ("AA", "RACE1") for acks in results)
    raw = await read_topic(broker.bootstrap, f"{topic_prefix}.raw.hl7v2", min_records=1)
    await asyncio.sleep(0.3)
    raw = await read_topic(broker.bootstrap, f"{topic_prefix}.raw.hl7v2", min_records=1)
    assert len(raw) == 1


async def test_broker_down_answers_ar_207_and_accepts_nothing(
    start_instance: InstanceFactory, own_broker: Any, topic_prefix: str
) -> None:
    instance = await start_instance(own_broker.bootstrap, kafka_publish_timeout_s=2.0)
    assert _msa((await _send_all(instance, [_adt(control="UP1")]))[0]) == ("AA", "UP1")

    await asyncio.to_thread(own_broker.stop)
    acks = await _send_all(instance, [_adt(control="DOWN1")])
    assert _msa(acks[0]) == ("AR", "DOWN1")
    assert _err_code(acks[0]) == "207"
    assert instance.metrics.messages.labels("mllp", "AA", "ADT^A01")._value.get() == 1

    # The sender retries once the broker is back: now it is accepted and published.
    # (Tansu keeps topics in memory only: a restarted one has none, and it acks
    # records for a missing topic without storing them, so provision them again.)
    await asyncio.to_thread(own_broker.start)
    await ensure_topics(own_broker.bootstrap, instance.topics.all(), partitions=3)
    for _ in range(40):
        ack = (await _send_all(instance, [_adt(control="DOWN1")]))[0]
        if _msa(ack)[0] == "AA":
            break
        await asyncio.sleep(0.5)
    assert _msa(ack) == ("AA", "DOWN1")
    raw = await read_topic(own_broker.bootstrap, f"{topic_prefix}.raw.hl7v2", min_records=1)
    assert [_headers(r)["ce_hl7controlid"] for r in raw] == [b"DOWN1"]


async def test_oversize_frame_is_answered_and_connection_keeps_serving(
    start_instance: InstanceFactory, broker: Any
) -> None:
    instance = await start_instance(broker.bootstrap, max_frame_bytes=2048)
    big = _adt(control="BIG1") + b"NTE|1||" + b"x" * 5000 + b"\r"
    acks = await _send_all(instance, [big, _adt(control="SMALL1")])
    assert _msa(acks[0]) == ("AE", "BIG1")
    assert _err_code(acks[0]) == "207"
    assert _msa(acks[1]) == ("AA", "SMALL1")


async def test_instance_is_an_ephemeral_member_in_zookeeper(
    start_instance: InstanceFactory, broker: Any, zookeeper: Any, zk_chroot: str
) -> None:
    instance = await start_instance(broker.bootstrap, instance_id="member-a", cluster="c1")
    zk = KazooClient(hosts=f"{zookeeper.hosts}{zk_chroot}")
    await asyncio.to_thread(zk.start, 10)
    try:
        path = "/hl7bridge/c1/members/member-a"
        data, stat = await asyncio.to_thread(zk.get, path)
        member = orjson.loads(data)
        assert stat.ephemeralOwner != 0
        assert member["mllp_port"] == instance.mllp.port
        assert member["version"]
        await instance.stop()
        assert await asyncio.to_thread(zk.exists, path) is None
    finally:
        await asyncio.to_thread(zk.stop)
        await asyncio.to_thread(zk.close)


async def test_http_health_ready_and_metrics(start_instance: InstanceFactory, broker: Any) -> None:
    import aiohttp

    instance = await start_instance(broker.bootstrap)
    await _send_all(instance, [_adt(control="M1")])
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{instance.http_url}/healthz") as response:
            assert response.status == 200
        async with http.get(f"{instance.http_url}/readyz") as response:
            body = await response.json()
            assert response.status == 200, body
            assert body["checks"] == {"kafka": True, "zookeeper": True, "mllp": True}
        async with MLLPClient("127.0.0.1", instance.mllp.port) as client:
            await client.send(_adt(control="M2"), timeout_s=15)  # connected: counted
            async with http.get(f"{instance.http_url}/metrics") as response:
                text = await response.text()
    assert "hl7bridge_mllp_connections 1.0" in text
    assert (
        'hl7bridge_messages_total{ack_code="AA",channel="mllp",message_type="ADT^A01"} 2.0' in text
    )
    assert 'hl7bridge_dedupe_entries{ingest="hl7v2"} 2.0' in text
    assert 'hl7bridge_dedupe_entries{ingest="fhir"} 0.0' in text
    assert "hl7bridge_spool_messages 0.0" in text  # ack_mode kafka: no spool
    assert "MRN123" not in text and "DOE" not in text


async def test_mllp_over_tls_with_client_certificates(
    start_instance: InstanceFactory, broker: Any, tls_cert: tuple[Path, Path]
) -> None:
    import ssl

    cert, key = tls_cert
    instance = await start_instance(
        broker.bootstrap,
        mllp_tls_cert_file=cert,
        mllp_tls_key_file=key,
        mllp_tls_client_ca_file=cert,  # the test's one cert signs itself: client cert too
    )
    client_ctx = ssl.create_default_context(cafile=str(cert))
    client_ctx.load_cert_chain(cert, key)
    async with MLLPClient(
        "127.0.0.1", instance.mllp.port, ssl=client_ctx, server_hostname="localhost"
    ) as client:
        assert _msa(await client.send(_adt(control="TLS1"), timeout_s=15)) == ("AA", "TLS1")

    # Without a client certificate the handshake fails: nothing is accepted.
    anonymous = ssl.create_default_context(cafile=str(cert))
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        async with MLLPClient(
            "127.0.0.1", instance.mllp.port, ssl=anonymous, server_hostname="localhost"
        ) as client:
            await client.send(_adt(control="TLS2"), timeout_s=5)
    # And plain MLLP on the TLS port gets no ACK.
    with pytest.raises((TimeoutError, ConnectionError, OSError)):
        async with MLLPClient("127.0.0.1", instance.mllp.port) as client:
            await client.send(_adt(control="PLAIN1"), timeout_s=3)


async def test_mapping_workers_publish_what_the_event_loop_would(
    start_instance: InstanceFactory, broker: Any, topic_prefix: str, corpus_dir: Path
) -> None:
    import signal

    from bridge.events import records_for
    from bridge.normalize import MappingOptions

    instance = await start_instance(broker.bootstrap, mapping_workers=2)
    assert instance.mapping_pool is not None and len(instance.mapping_pool.pids()) == 2
    lab = _corpus_messages(corpus_dir)
    lab_oru = next(m for name, m in lab if name == "LAB-ORU-1.hl7")
    bad_date = _adt(control="BADDOB").replace(b"19800101", b"19801301")
    acks = await _send_all(instance, [lab_oru, bad_date])
    assert _msa(acks[0])[0] == "AA"
    assert _msa(acks[1]) == ("AE", "BADDOB")  # the worker's DataTypeError, as in process
    assert _err_code(acks[1]) == "102"

    events = await read_topic(broker.bootstrap, f"{topic_prefix}.events", min_records=1)
    [record] = events
    message = parse_message(lab_oru)
    local = records_for(
        message,
        content_fingerprint(message.text),
        instance_id="it-1",
        mapping=MappingOptions(),
        strict_mapping=False,
    )
    published, expected = orjson.loads(record.value), orjson.loads(local.data)
    published.pop("timestamp"), expected.pop("timestamp")
    assert published == expected
    assert _headers(record)["ce_id"] == dict(local.event_headers)["ce_id"]

    # A worker killed hard is replaced; messages keep being answered.
    before = set(instance.mapping_pool.pids())
    os.kill(next(iter(before)), signal.SIGKILL)
    answers = []
    for i in range(20):
        ack = (await _send_all(instance, [_adt(control=f"AFTER{i}")]))[0]
        answers.append(_msa(ack)[0])
        if answers[-1] == "AA" and len(set(instance.mapping_pool.pids()) - before) == 1:
            break
        await asyncio.sleep(0.2)
    assert answers[-1] == "AA"
    assert set(answers) <= {"AA", "AR"}  # never lost: at worst AR 207, and the sender retries
    assert len(instance.mapping_pool.pids()) == 2
    assert len(set(instance.mapping_pool.pids()) - before) == 1


async def test_mapping_workers_stop_with_the_instance(
    start_instance: InstanceFactory, broker: Any
) -> None:
    instance = await start_instance(broker.bootstrap, mapping_workers=1)
    assert instance.mapping_pool is not None
    [pid] = instance.mapping_pool.pids()
    await instance.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # reaped: no such process any more


async def test_behind_a_proxy_protocol_balancer_the_dlq_names_the_sender(
    start_instance: InstanceFactory, broker: Any, topic_prefix: str
) -> None:
    from adapters.mllp.codec import MLLPDecoder, encode_frame

    instance = await start_instance(
        broker.bootstrap, mllp_proxy_protocol=True, accept_message_types=("ORU",)
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", instance.mllp.port)
    try:
        header = b"PROXY TCP4 203.0.113.7 10.0.0.5 40001 2575\r\n"
        writer.write(header + encode_frame(_adt(control="VIA-LB")))  # ADT: not accepted
        await writer.drain()
        decoder, frames = MLLPDecoder(), []
        async with asyncio.timeout(15):
            while not frames:
                frames = [
                    e for e in decoder.feed(await reader.read(65536)) if hasattr(e, "payload")
                ]
    finally:
        writer.close()
    assert _msa(frames[0].payload) == ("AR", "VIA-LB")
    (record,) = await read_topic(broker.bootstrap, f"{topic_prefix}.dlq", min_records=1)
    assert dict(record.headers)["dlq_peer"] == b"203.0.113.7:40001"
