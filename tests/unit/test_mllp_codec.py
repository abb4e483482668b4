"""The MLLP codec with no sockets: split, merged, garbled and oversized input."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.mllp.codec import (
    CARRIAGE_RETURN,
    DEFAULT_MAX_FRAME_BYTES,
    END_BLOCK,
    HEAD_BYTES,
    START_BLOCK,
    DecodedEvent,
    Frame,
    FrameTooLarge,
    GarbageSkipped,
    MLLPDecoder,
    encode_frame,
)

pytestmark = pytest.mark.timeout(30)

VT, FS, CR = START_BLOCK, END_BLOCK, CARRIAGE_RETURN
MSG_A = b"MSH|^~\\&|LAB|HOSP|BRIDGE|HOSP|20240101120000||ORU^R01|A1|P|2.5\rPID|1||123\r"
MSG_B = b"MSH|^~\\&|ADT|HOSP|BRIDGE|HOSP|20240101120001||ADT^A01|B2|P|2.5\rPID|1||456\r"


def feed_all(decoder: MLLPDecoder, chunks: list[bytes]) -> list[DecodedEvent]:
    events: list[DecodedEvent] = []
    for chunk in chunks:
        events.extend(decoder.feed(chunk))
    return events


def frames_of(events: list[DecodedEvent]) -> list[bytes]:
    return [e.payload for e in events if isinstance(e, Frame)]


def garbage_of(events: list[DecodedEvent]) -> int:
    return sum(e.byte_count for e in events if isinstance(e, GarbageSkipped))


def test_framing_bytes_are_the_mllp_ones() -> None:
    assert (VT, FS, CR) == (b"\x0b", b"\x1c", b"\x0d")
    assert encode_frame(b"abc") == b"\x0babc\x1c\x0d"


def test_round_trip() -> None:
    decoder = MLLPDecoder()
    assert decoder.feed(encode_frame(MSG_A)) == [Frame(MSG_A)]
    assert decoder.buffered_bytes == 0
    assert decoder.eof() is None


def test_empty_payload_is_a_frame() -> None:
    assert MLLPDecoder().feed(encode_frame(b"")) == [Frame(b"")]


def test_empty_feed_yields_nothing() -> None:
    assert MLLPDecoder().feed(b"") == []


def test_split_at_every_position_of_a_two_frame_stream() -> None:
    stream = encode_frame(MSG_A) + encode_frame(MSG_B)
    for cut in range(len(stream) + 1):
        decoder = MLLPDecoder()
        events = feed_all(decoder, [stream[:cut], stream[cut:]])
        assert events == [Frame(MSG_A), Frame(MSG_B)], cut
        assert decoder.buffered_bytes == 0


def test_byte_at_a_time() -> None:
    stream = encode_frame(MSG_A) + encode_frame(MSG_B)
    decoder = MLLPDecoder()
    events = feed_all(decoder, [stream[i : i + 1] for i in range(len(stream))])
    assert events == [Frame(MSG_A), Frame(MSG_B)]


def test_many_frames_merged_into_one_feed() -> None:
    payloads = [b"MSH|%d" % i for i in range(1000)]
    events = MLLPDecoder().feed(b"".join(encode_frame(p) for p in payloads))
    assert events == [Frame(p) for p in payloads]


def test_partial_frame_is_buffered_and_reported_at_eof() -> None:
    decoder = MLLPDecoder()
    assert decoder.feed(VT + b"MSH|par") == []
    assert decoder.buffered_bytes == len(b"MSH|par")
    assert decoder.eof() == b"MSH|par"
    assert decoder.buffered_bytes == 0
    assert decoder.eof() is None  # reset
    assert decoder.feed(encode_frame(b"x")) == [Frame(b"x")]


def test_eof_after_lone_start_block_is_empty_partial() -> None:
    decoder = MLLPDecoder()
    decoder.feed(VT)
    assert decoder.eof() == b""


def test_eof_after_end_block_without_cr_has_no_partial() -> None:
    decoder = MLLPDecoder()
    assert decoder.feed(VT + b"abc" + FS) == [Frame(b"abc")]
    assert decoder.eof() is None


def test_garbage_before_and_between_frames_is_skipped_and_reported() -> None:
    stream = b"noise" + encode_frame(MSG_A) + b"\n\n" + encode_frame(MSG_B) + b"tail"
    events = MLLPDecoder().feed(stream)
    assert events == [
        GarbageSkipped(5),
        Frame(MSG_A),
        GarbageSkipped(2),
        Frame(MSG_B),
        GarbageSkipped(4),
    ]


def test_garbage_only_is_not_buffered() -> None:
    decoder = MLLPDecoder()
    assert decoder.feed(b"x" * 10_000) == [GarbageSkipped(10_000)]
    assert decoder.buffered_bytes == 0
    assert decoder.eof() is None


def test_stray_end_block_outside_a_frame_is_garbage() -> None:
    events = MLLPDecoder().feed(FS + CR + encode_frame(b"a"))
    assert events == [GarbageSkipped(2), Frame(b"a")]


def test_end_block_without_carriage_return_ends_the_frame() -> None:
    events = MLLPDecoder().feed(VT + b"a" + FS + VT + b"b" + FS + b"X" + VT + b"c" + FS + CR)
    assert events == [Frame(b"a"), Frame(b"b"), GarbageSkipped(1), Frame(b"c")]


def test_end_block_ending_a_read_completes_the_frame_at_once() -> None:
    # A CR-less sender waits for its ACK after the FS: waiting for a CR would hang.
    decoder = MLLPDecoder()
    assert decoder.feed(VT + b"abc" + FS) == [Frame(b"abc")]
    # A CR arriving in the next read belongs to that frame, it is not garbage.
    assert decoder.feed(CR) == []
    assert decoder.feed(VT + b"d" + FS) == [Frame(b"d")]
    assert decoder.feed(VT + b"e" + FS + CR) == [Frame(b"e")]
    # Only the one CR right after the FS is the trailer's.
    assert decoder.feed(VT + b"f" + FS) == [Frame(b"f")]
    assert decoder.feed(CR + CR) == [GarbageSkipped(1)]


def test_start_block_inside_a_frame_restarts_it() -> None:
    decoder = MLLPDecoder()
    events = decoder.feed(VT + b"abandoned" + VT + MSG_A + FS + CR)
    assert events == [GarbageSkipped(1 + len(b"abandoned")), Frame(MSG_A)]


def test_restart_across_feeds() -> None:
    decoder = MLLPDecoder()
    assert decoder.feed(VT + b"half") == []
    assert decoder.feed(b"way" + VT + b"new") == [GarbageSkipped(8)]
    assert decoder.feed(FS + CR) == [Frame(b"new")]


def test_oversize_frame_reported_once_with_head_then_next_frame_decoded() -> None:
    limit = 10_000
    big = b"MSH|^~\\&|BIG|" + b"x" * (3 * limit)
    stream = encode_frame(big) + encode_frame(MSG_A)
    decoder = MLLPDecoder(max_frame_bytes=limit)
    chunks = [stream[i : i + 1000] for i in range(0, len(stream), 1000)]
    events: list[DecodedEvent] = []
    for chunk in chunks:
        events.extend(decoder.feed(chunk))
        # Memory stays bounded while the oversized frame is discarded.
        assert decoder.buffered_bytes <= limit + len(chunk)
    assert events == [FrameTooLarge(head=big[:HEAD_BYTES], limit=limit), Frame(MSG_A)]


def test_oversize_reported_as_soon_as_limit_is_passed() -> None:
    decoder = MLLPDecoder(max_frame_bytes=100)
    assert decoder.feed(VT + b"y" * 100) == []  # exactly at the limit is fine
    events = decoder.feed(b"y")
    assert events == [FrameTooLarge(b"y" * 101, 100)]
    assert decoder.buffered_bytes == 0
    assert decoder.feed(b"y" * 1000) == []
    assert decoder.eof() is None  # already reported


def test_frame_exactly_at_limit_is_accepted() -> None:
    assert MLLPDecoder(max_frame_bytes=5).feed(encode_frame(b"12345")) == [Frame(b"12345")]


def test_complete_oversize_frame_in_one_feed() -> None:
    decoder = MLLPDecoder(max_frame_bytes=5)
    events = decoder.feed(encode_frame(b"123456") + encode_frame(b"ok"))
    assert events == [FrameTooLarge(b"123456", 5), Frame(b"ok")]


def test_oversize_frame_with_end_block_split_from_carriage_return() -> None:
    decoder = MLLPDecoder(max_frame_bytes=5)
    assert decoder.feed(VT + b"1234567" + FS) == [FrameTooLarge(b"123456", 5)]
    assert decoder.feed(CR + encode_frame(b"ok")) == [Frame(b"ok")]


def test_start_block_while_discarding_starts_a_new_frame() -> None:
    decoder = MLLPDecoder(max_frame_bytes=5)
    assert decoder.feed(VT + b"1234567") == [FrameTooLarge(b"123456", 5)]
    assert decoder.feed(b"89" + VT + b"ok" + FS + CR) == [Frame(b"ok")]


def test_restarted_frame_over_the_limit_is_too_large_not_garbage() -> None:
    decoder = MLLPDecoder(max_frame_bytes=5)
    events = decoder.feed(VT + b"1234567" + VT + b"ok" + FS + CR)
    assert events == [FrameTooLarge(b"123456", 5), Frame(b"ok")]


def test_head_is_capped() -> None:
    decoder = MLLPDecoder(max_frame_bytes=HEAD_BYTES * 2)
    [event] = decoder.feed(VT + b"h" * (HEAD_BYTES * 3))
    assert isinstance(event, FrameTooLarge)
    assert len(event.head) == HEAD_BYTES


def test_max_frame_bytes_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_frame_bytes"):
        MLLPDecoder(max_frame_bytes=0)
    assert MLLPDecoder().max_frame_bytes == DEFAULT_MAX_FRAME_BYTES


def test_many_small_feeds_of_a_large_frame_stay_linear() -> None:
    # 1 MiB delivered 1 byte ... would be slow if each feed rescanned the buffer;
    # 64 KiB in 16-byte feeds is 4096 feeds: quadratic rescans would be 128 M
    # byte comparisons, linear ones 64 K. Correctness is checked, not timing.
    payload = b"z" * 65_536
    stream = encode_frame(payload)
    decoder = MLLPDecoder()
    events = feed_all(decoder, [stream[i : i + 16] for i in range(0, len(stream), 16)])
    assert events == [Frame(payload)]


# -- properties ---------------------------------------------------------------

CONTROL = set(VT + FS)
payloads_st = st.lists(
    st.binary(max_size=300).map(lambda b: bytes(c for c in b if c not in CONTROL)),
    max_size=20,
)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=300, deadline=None)
@given(payloads=payloads_st, cuts=st.lists(st.integers(min_value=0), max_size=30))
def test_property_any_chunking_gives_the_same_frames(
    payloads: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(encode_frame(p) for p in payloads)
    decoder = MLLPDecoder()
    events = feed_all(decoder, chunked(stream, cuts))
    assert events == [Frame(p) for p in payloads]
    assert decoder.buffered_bytes == 0


@settings(max_examples=300, deadline=None)
@given(
    payloads=payloads_st,
    garbage=st.lists(
        st.binary(max_size=20).map(lambda b: bytes(c for c in b if c != VT[0])), max_size=21
    ),
    cuts=st.lists(st.integers(min_value=0), max_size=30),
)
def test_property_garbage_between_frames_is_skipped_and_counted(
    payloads: list[bytes], garbage: list[bytes], cuts: list[int]
) -> None:
    garbage = garbage + [b""] * (len(payloads) + 1 - len(garbage))
    stream = garbage[0] + b"".join(
        encode_frame(p) + g for p, g in zip(payloads, garbage[1:], strict=False)
    )
    decoder = MLLPDecoder()
    events = feed_all(decoder, chunked(stream, cuts))
    assert frames_of(events) == payloads
    # Every byte is either framing, payload or reported garbage.
    assert garbage_of(events) == len(stream) - sum(len(p) + 3 for p in payloads)


# Mostly framing bytes, so restarts, missing CRs and oversize frames all occur.
framing_heavy_st = st.lists(
    st.sampled_from([VT, FS, CR, b"a", b"bb", b"MSH|", b"\n", b"x" * 40]), max_size=200
).map(b"".join)


@settings(max_examples=400, deadline=None)
@given(
    data=st.one_of(st.binary(max_size=2000), framing_heavy_st),
    cuts=st.lists(st.integers(min_value=0), max_size=30),
    limit=st.integers(min_value=1, max_value=200),
)
def test_property_arbitrary_bytes_never_crash_and_stay_bounded(
    data: bytes, cuts: list[int], limit: int
) -> None:
    decoder = MLLPDecoder(max_frame_bytes=limit)
    for chunk in chunked(data, cuts):
        for event in decoder.feed(chunk):
            if isinstance(event, Frame):
                assert len(event.payload) <= limit
            elif isinstance(event, FrameTooLarge):
                assert len(event.head) <= HEAD_BYTES
        assert decoder.buffered_bytes <= limit + 1 + len(chunk)
    # Whatever the chunking, the events are those of one feed (garbage reports may
    # be split differently, so adjacent ones are merged before comparing).
    chunked_events = feed_all(MLLPDecoder(limit), chunked(data, cuts))
    assert merge_garbage(chunked_events) == merge_garbage(MLLPDecoder(limit).feed(data))


def merge_garbage(events: list[DecodedEvent]) -> list[DecodedEvent]:
    merged: list[DecodedEvent] = []
    for event in events:
        if isinstance(event, GarbageSkipped) and merged and isinstance(merged[-1], GarbageSkipped):
            merged[-1] = GarbageSkipped(merged[-1].byte_count + event.byte_count)
        else:
            merged.append(event)
    return merged


def reference_decode(data: bytes, limit: int) -> list[DecodedEvent]:
    """The documented semantics, one byte at a time: slow, obviously right."""
    head_len = min(HEAD_BYTES, limit + 1)
    events: list[DecodedEvent] = []
    state = "out"
    payload = bytearray()
    too_large = False
    for byte in data:
        if state == "fs":  # just after an FS: a CR is its trailer
            state = "out"
            if byte == CR[0]:
                continue
        if state == "out":
            if byte == VT[0]:
                state, payload, too_large = "in", bytearray(), False
            else:
                events.append(GarbageSkipped(1))
        elif byte == VT[0]:
            if not too_large:
                events.append(GarbageSkipped(1 + len(payload)))
            payload, too_large = bytearray(), False
        elif byte == FS[0]:
            if not too_large:
                events.append(Frame(bytes(payload)))
            state = "fs"
        else:
            payload.append(byte)
            if len(payload) > limit and not too_large:
                too_large = True
                events.append(FrameTooLarge(bytes(payload[:head_len]), limit))
    return merge_garbage(events)


@settings(max_examples=400, deadline=None)
@given(
    data=st.one_of(st.binary(max_size=2000), framing_heavy_st),
    cuts=st.lists(st.integers(min_value=0), max_size=30),
    limit=st.integers(min_value=1, max_value=200),
)
def test_property_matches_byte_at_a_time_reference(
    data: bytes, cuts: list[int], limit: int
) -> None:
    events = feed_all(MLLPDecoder(limit), chunked(data, cuts))
    assert merge_garbage(events) == reference_decode(data, limit)
