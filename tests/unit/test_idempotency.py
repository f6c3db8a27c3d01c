"""Idempotency keys: duplicates inside the window, and a window that is enforced."""

from __future__ import annotations

import pytest

from osqueue import state as state_module
from osqueue.model import thaw_payload
from osqueue.state import QueueState, SubmitSpec


def spec(key: str, payload: object = None) -> SubmitSpec:
    return SubmitSpec(payload=payload, idempotency_key=key)


def test_duplicate_inside_window_keeps_first_job_and_payload() -> None:
    state = QueueState(idempotency_retention_ms=1000)
    first = state.submit(spec("k", {"v": 1}), "job-1", now_ms=0)
    again = state.submit(spec("k", {"v": 2}), "job-2", now_ms=999)
    assert (first.duplicate, again.duplicate) == (False, True)
    assert again.job_id == "job-1"
    assert thaw_payload(state.jobs["job-1"]["payload"]) == {"v": 1}
    assert "job-2" not in state.jobs


def test_keys_past_retention_are_forgotten_on_the_next_submit() -> None:
    state = QueueState(idempotency_retention_ms=1000)
    for i in range(50):
        state.submit(spec(f"old-{i}"), f"old-{i}", now_ms=i)
    state.submit(spec("new"), "new", now_ms=5000)
    assert list(state.idempotency) == ["new"]
    # the same key after the window is a new job
    assert not state.submit(spec("old-0"), "again", now_ms=5001).duplicate


def test_key_count_is_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(state_module, "MAX_IDEMPOTENCY_KEYS", 10)
    state = QueueState()
    for i in range(25):
        state.submit(spec(f"k{i}"), f"j{i}", now_ms=i)
    assert len(state.idempotency) <= 10
    assert "k24" in state.idempotency and "k0" not in state.idempotency


def test_keys_survive_a_document_round_trip() -> None:
    state = QueueState()
    state.submit(spec("k"), "job-1", now_ms=0)
    reloaded = QueueState.from_document(state.to_document())
    assert reloaded.submit(spec("k"), "job-2", now_ms=1).job_id == "job-1"


def test_client_made_keys_are_kept_only_briefly() -> None:
    state = QueueState(idempotency_retention_ms=24 * 3600 * 1000)
    state.submit(spec("auto:abc"), "j1", now_ms=0)
    assert state.idempotency["auto:abc"][1] == state_module.AUTO_KEY_RETENTION_MS
    state.submit(spec("mine"), "j2", now_ms=0)
    assert state.idempotency["mine"][1] == 24 * 3600 * 1000
