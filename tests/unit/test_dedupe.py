"""Duplicate detection: window, bound, fingerprint, and in-flight coalescing."""

from __future__ import annotations

import pytest

from bridge.dedupe import DuplicateFilter, content_fingerprint

pytestmark = pytest.mark.timeout(30)

KEY = ("APP|FAC", "CTRL1")
FP = b"fingerprint-one!"
OTHER_FP = b"fingerprint-two!"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(window_s: float = 60.0, max_entries: int = 100) -> tuple[DuplicateFilter, FakeClock]:
    clock = FakeClock()
    return DuplicateFilter(window_s=window_s, max_entries=max_entries, clock=clock), clock


def key(n: int) -> tuple[str, str]:
    return ("APP|FAC", f"CTRL{n}")


# --- the window -------------------------------------------------------------------------


async def test_accepted_message_is_remembered_for_the_window() -> None:
    dedupe, clock = make(window_s=60)
    assert dedupe.lookup(KEY, FP) is None
    dedupe.begin(KEY, FP)
    dedupe.finish(KEY, FP, "AA")
    assert dedupe.lookup(KEY, FP) == "AA"
    clock.now += 59.9
    assert dedupe.lookup(KEY, FP) == "AA"
    clock.now += 0.1
    assert dedupe.lookup(KEY, FP) is None


async def test_expired_entries_are_dropped_on_the_next_finish() -> None:
    dedupe, clock = make(window_s=10)
    dedupe.finish(key(1), FP, "AA")
    dedupe.finish(key(2), FP, "AA")
    clock.now += 10
    dedupe.finish(key(3), FP, "AA")
    assert len(dedupe) == 1
    assert dedupe.lookup(key(3), FP) == "AA"
    assert not dedupe.reused(key(1), OTHER_FP)


async def test_max_entries_evicts_oldest_first() -> None:
    dedupe, _ = make(max_entries=3)
    for n in range(1, 5):
        dedupe.finish(key(n), FP, "AA")
    assert len(dedupe) == 3
    assert [dedupe.lookup(key(n), FP) for n in range(1, 5)] == [None, "AA", "AA", "AA"]


async def test_accepting_again_makes_an_entry_the_newest() -> None:
    dedupe, _ = make(max_entries=2)
    dedupe.finish(key(1), FP, "AA")
    dedupe.finish(key(2), FP, "AA")
    dedupe.finish(key(1), FP, "AA")
    dedupe.finish(key(3), FP, "AA")
    assert [dedupe.lookup(key(n), FP) for n in (1, 2, 3)] == ["AA", None, "AA"]


@pytest.mark.parametrize(("window_s", "max_entries"), [(0, 100), (60, 0)])
async def test_zero_window_or_bound_disables_remembering(window_s: float, max_entries: int) -> None:
    dedupe, _ = make(window_s=window_s, max_entries=max_entries)
    assert dedupe.enabled is False
    future = dedupe.begin(KEY, FP)
    assert dedupe.pending(KEY, FP) is future
    dedupe.finish(KEY, FP, "AA")
    assert future.result() == "AA"  # in-flight coalescing still works
    assert dedupe.lookup(KEY, FP) is None
    assert len(dedupe) == 0
    assert dedupe.reused(KEY, OTHER_FP) is False


# --- identity ---------------------------------------------------------------------------


async def test_lookup_requires_the_same_fingerprint_and_key() -> None:
    dedupe, _ = make()
    dedupe.finish(KEY, FP, "AA")
    assert dedupe.lookup(KEY, FP) == "AA"
    assert dedupe.lookup(KEY, OTHER_FP) is None
    assert dedupe.lookup(("APP|OTHERFAC", "CTRL1"), FP) is None
    assert dedupe.lookup(("APP|FAC", "CTRL2"), FP) is None


async def test_reused_means_same_control_id_other_content() -> None:
    dedupe, _ = make()
    assert dedupe.reused(KEY, FP) is False
    dedupe.finish(KEY, FP, "AA")
    assert dedupe.reused(KEY, FP) is False
    assert dedupe.reused(KEY, OTHER_FP) is True
    assert dedupe.reused(("APP|FAC", "CTRL2"), OTHER_FP) is False
    dedupe.finish(KEY, OTHER_FP, "AA")
    assert dedupe.reused(KEY, FP) is True  # the latest content is the reference now
    assert dedupe.reused(KEY, OTHER_FP) is False
    assert dedupe.lookup(KEY, FP) == "AA"  # both remain remembered
    assert dedupe.lookup(KEY, OTHER_FP) == "AA"


async def test_failed_attempt_is_neither_remembered_nor_reuse() -> None:
    dedupe, _ = make()
    dedupe.begin(KEY, FP)
    dedupe.finish(KEY, FP, None)
    assert dedupe.lookup(KEY, FP) is None
    assert dedupe.reused(KEY, OTHER_FP) is False
    assert len(dedupe) == 0


# --- in flight --------------------------------------------------------------------------


async def test_pending_future_resolves_with_the_ack_code() -> None:
    dedupe, _ = make()
    assert dedupe.pending(KEY, FP) is None
    future = dedupe.begin(KEY, FP)
    assert dedupe.pending(KEY, FP) is future
    assert dedupe.pending(KEY, OTHER_FP) is None
    assert not future.done()
    dedupe.finish(KEY, FP, "AA")
    assert await future == "AA"
    assert dedupe.pending(KEY, FP) is None


async def test_pending_future_resolves_with_none_when_the_attempt_failed() -> None:
    dedupe, _ = make()
    future = dedupe.begin(KEY, FP)
    dedupe.finish(KEY, FP, None)
    assert await future is None
    assert dedupe.pending(KEY, FP) is None


async def test_finish_of_other_content_leaves_the_pending_attempt() -> None:
    dedupe, _ = make()
    future = dedupe.begin(KEY, FP)
    dedupe.finish(KEY, OTHER_FP, "AA")
    assert not future.done()
    assert dedupe.pending(KEY, FP) is future


# --- fingerprint ------------------------------------------------------------------------

BASE = [
    "MSH|^~\\&|APP|FAC|RAPP|RFAC|20240101120000||ADT^A01|CTRL1|P|2.5.1",
    "EVN|A01|20240101120000",
    "PID|1||123^^^HOSP^MR||DOE^JANE",
]


def fingerprint_of(segments: list[str]) -> bytes:
    return content_fingerprint("\r".join(segments) + "\r")


def with_msh_field(n: int, value: str) -> list[str]:
    fields = BASE[0].split("|")
    fields[n - 1] = value  # MSH-n is at index n-1: MSH-1 is the separator itself
    return ["|".join(fields), *BASE[1:]]


def test_fingerprint_is_16_bytes_and_stable() -> None:
    assert len(fingerprint_of(BASE)) == 16
    assert fingerprint_of(BASE) == fingerprint_of(list(BASE))


def test_fingerprint_ignores_msh7() -> None:
    assert with_msh_field(7, "20240101120000")[0] == BASE[0]
    assert fingerprint_of(with_msh_field(7, "20250606060606+0200")) == fingerprint_of(BASE)
    assert fingerprint_of(with_msh_field(7, "")) == fingerprint_of(BASE)


@pytest.mark.parametrize(
    "changed",
    [
        with_msh_field(9, "ADT^A08"),
        with_msh_field(10, "CTRL2"),
        with_msh_field(3, "OTHERAPP"),
        with_msh_field(12, "2.5"),
        [BASE[0], "EVN|A01|20240101120001", BASE[2]],
        [BASE[0], BASE[1], "PID|1||124^^^HOSP^MR||DOE^JANE"],
        [*BASE, "PV1|1|I"],
        BASE[:2],
    ],
    ids=["msh9", "msh10", "msh3", "msh12", "evn", "pid", "extra-segment", "missing-segment"],
)
def test_fingerprint_covers_everything_but_msh7(changed: list[str]) -> None:
    assert fingerprint_of(changed) != fingerprint_of(BASE)


def test_fingerprint_of_a_short_msh_does_not_fail() -> None:
    assert content_fingerprint("MSH|^~\\&|A\r") != content_fingerprint("MSH|^~\\&|B\r")
