"""A broker process collects cycles less often than Python's default."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from osqueue.broker.server import BROKER_GC_THRESHOLDS, tune_gc


@pytest.fixture
def restore_gc() -> Iterator[None]:
    saved = gc.get_threshold()
    yield
    gc.set_threshold(*saved)


@pytest.mark.usefixtures("restore_gc")
def test_tune_gc_raises_the_young_generation_threshold() -> None:
    gc.set_threshold(700, 10, 10)
    tune_gc()
    assert gc.get_threshold() == BROKER_GC_THRESHOLDS
    assert BROKER_GC_THRESHOLDS[0] > 700
