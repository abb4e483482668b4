"""Fixtures shared by the unit tests: an in-memory publisher and fresh metrics."""

from __future__ import annotations

import pytest

from bridge.metrics import BridgeMetrics
from tests.fakes import FakePublisher


@pytest.fixture
def publisher() -> FakePublisher:
    return FakePublisher()


@pytest.fixture
def metrics() -> BridgeMetrics:
    return BridgeMetrics()
