"""The mapping worker's request loop, driven through in-memory pipes."""

from __future__ import annotations

import io
import struct

import orjson
import pytest

from adapters.hl7v2.er7 import parse_message
from bridge.dedupe import content_fingerprint
from bridge.errors import DataTypeError, MessageError
from bridge.events import records_for
from bridge.mapworker import WorkerConfig, _error_from, serve_requests
from bridge.normalize import MappingOptions

pytestmark = pytest.mark.timeout(30)

CONFIG = WorkerConfig(
    instance_id="w1",
    identifier_systems={"HOSP": "urn:oid:1.2.3"},
    default_timezone="UTC",
    strict_mapping=False,
)
GOOD = (
    b"MSH|^~\\&|EHR|HOSP|HUB|HUB|20240101120000+0000||ADT^A01^ADT_A01|C1|P|2.5.1\r"
    b"PID|1||MRN1^^^HOSP^MR||DOE^JANE||19800101|F\r"
)
BAD = GOOD.replace(b"C1", b"C2").replace(b"19800101", b"19801301")


def request(request_id: int, payload: bytes) -> bytes:
    fingerprint = content_fingerprint(parse_message(payload).text)
    return struct.pack(">IHI", request_id, len(fingerprint), len(payload)) + fingerprint + payload


def answers(stream: bytes) -> list[tuple[int, int, dict[str, object], bytes]]:
    out, view = [], memoryview(stream)
    while view:
        request_id, status, meta_len, data_len = struct.unpack(">IBII", view[:13])
        meta = orjson.loads(bytes(view[13 : 13 + meta_len]))
        data = bytes(view[13 + meta_len : 13 + meta_len + data_len])
        out.append((request_id, status, meta, data))
        view = view[13 + meta_len + data_len :]
    return out


def test_worker_maps_like_the_event_loop_and_reports_errors_by_class() -> None:
    sink = io.BytesIO()
    serve_requests(CONFIG, io.BytesIO(request(7, GOOD) + request(8, BAD)), sink)
    (id_ok, status_ok, meta_ok, data_ok), (id_bad, status_bad, meta_bad, _) = answers(
        sink.getvalue()
    )
    assert (id_ok, status_ok, id_bad, status_bad) == (7, 0, 8, 1)

    message = parse_message(GOOD)
    local = records_for(
        message,
        content_fingerprint(message.text),
        instance_id="w1",
        mapping=MappingOptions(identifier_systems={"HOSP": "urn:oid:1.2.3"}),
        strict_mapping=False,
    )
    theirs, ours = orjson.loads(data_ok), orjson.loads(local.data)
    theirs.pop("timestamp"), ours.pop("timestamp")
    assert theirs == ours
    assert meta_ok["key"] == local.record_key.decode()
    assert dict(meta_ok["event"])["ce_id"] == dict(local.event_headers)["ce_id"].decode()
    assert meta_bad == {
        "class": "DataTypeError",
        "message": "not a valid calendar date or time",
        "location": "PID-7",
    }
    rebuilt = _error_from(meta_bad)
    assert isinstance(rebuilt, DataTypeError) and rebuilt.location == "PID-7"


def test_unknown_error_class_becomes_a_message_error() -> None:
    rebuilt = _error_from({"class": "os.system", "message": "x", "location": None})
    assert type(rebuilt) is MessageError


def test_worker_stops_at_end_of_input_even_mid_request() -> None:
    sink = io.BytesIO()
    serve_requests(CONFIG, io.BytesIO(request(1, GOOD)[:10]), sink)
    assert sink.getvalue() == b""
