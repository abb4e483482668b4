"""Reading the PROXY protocol header before MLLP (pure code, no sockets)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

import pytest
from proxyprotocol.result import ProxyResultIPv4, ProxyResultIPv6, ProxyResultLocal
from proxyprotocol.v2 import ProxyProtocolV2

from adapters.mllp.proxy import ProxyHeaderError, ProxyHeaderReader

pytestmark = pytest.mark.timeout(30)

FRAME = b"\x0bMSH|^~\\&|A|B\r\x1c\r"
V1 = b"PROXY TCP4 203.0.113.7 10.0.0.5 40001 2575\r\n"


def v2_header(source: str = "203.0.113.7", port: int = 40001) -> bytes:
    result = ProxyResultIPv4((IPv4Address(source), port), (IPv4Address("10.0.0.5"), 2575))
    return ProxyProtocolV2().pack(result)


def test_v1_names_the_sender_and_passes_the_rest_on() -> None:
    assert ProxyHeaderReader().feed(V1 + FRAME) == (("203.0.113.7", 40001), FRAME)


def test_v2_names_the_sender_and_passes_the_rest_on() -> None:
    assert ProxyHeaderReader().feed(v2_header() + FRAME) == (("203.0.113.7", 40001), FRAME)


def test_v2_ipv6() -> None:
    result = ProxyResultIPv6(
        (IPv6Address("2001:db8::7"), 40001), (IPv6Address("2001:db8::1"), 2575)
    )
    header = ProxyProtocolV2().pack(result)
    assert ProxyHeaderReader().feed(header) == (("2001:db8::7", 40001), b"")


@pytest.mark.parametrize("header", [V1, v2_header()], ids=["v1", "v2"])
def test_a_header_arriving_byte_by_byte(header: bytes) -> None:
    reader = ProxyHeaderReader()
    data = header + FRAME
    for byte in data[: len(header) - 1]:
        assert reader.feed(bytes([byte])) is None
    assert reader.feed(data[len(header) - 1 :]) == (("203.0.113.7", 40001), FRAME)


def test_the_balancers_own_connections_keep_the_socket_peer() -> None:
    local = ProxyProtocolV2().pack(ProxyResultLocal())
    assert ProxyHeaderReader().feed(local + FRAME) == (None, FRAME)
    assert ProxyHeaderReader().feed(b"PROXY UNKNOWN\r\n" + FRAME) == (None, FRAME)


@pytest.mark.parametrize(
    "data",
    [
        FRAME,  # a sender connecting directly, not through the balancer
        b"GET / HTTP/1.1\r\n",
        b"PROXY TCP4 not-an-address 10.0.0.5 40001 2575\r\n",
        b"PROXY " + b"1" * 120,  # no CRLF within 107 bytes
        b"\r\n\r\n\x00\r\nQUIT\n\x99\x11\x00\x00",  # v2 signature, bad version
    ],
    ids=["mllp", "http", "bad-address", "too-long", "bad-v2"],
)
def test_anything_else_is_refused(data: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        ProxyHeaderReader().feed(data)
