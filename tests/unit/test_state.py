"""Pure state transitions: every test drives time by hand through ``now_ms``."""

from __future__ import annotations

import heapq
from types import SimpleNamespace
from typing import Any

import pytest

from osqueue import state as state_module
from osqueue.errors import JobNotFoundError, LeaseLostError
from osqueue.model import decode_state, empty_document, encode_state, thaw_payload
from osqueue.state import (
    DEFAULT_MAX_ATTEMPTS,
    QueueState,
    SubmitSpec,
    default_retry_delay_ms,
)

T0 = 1_700_000_000_000
TIMEOUT_MS = 2_000


def submit(
    state: QueueState, job_id: str, now_ms: int = T0, payload: Any = None, **spec: Any
) -> str:
    return state.submit(SubmitSpec(payload=payload, **spec), job_id, now_ms).job_id


def claimed_id(state: QueueState, worker: str, types: list[str] | None, now_ms: int) -> str | None:
    result = state.claim(worker, types, now_ms)
    return None if result is None else result.job_id


def reloaded(state: QueueState, **options: Any) -> QueueState:
    """The state as another broker would read it back from the store."""
    return QueueState.from_document(decode_state(encode_state(state.to_document())), **options)


# -- submit -----------------------------------------------------------------------------


def test_submit_appends_an_unclaimed_job_with_defaults() -> None:
    state = QueueState()
    result = state.submit(SubmitSpec(payload={"n": 1}), "j1", T0)

    assert result.job_id == "j1"
    assert not result.duplicate
    assert decode_state(state.encode())["jobs"] == [
        {
            "id": "j1",
            "status": "unclaimed",
            "payload": {"n": 1},
            "createdAt": T0,
            "attempts": 0,
            "maxAttempts": DEFAULT_MAX_ATTEMPTS,
        }
    ]
    assert state.changes == 1


def test_submit_records_type_priority_and_delay() -> None:
    state = QueueState()
    submit(state, "j1", type="email", priority=5, delay_ms=1_000, max_attempts=7)
    job = state.jobs["j1"]
    assert (job["type"], job["priority"], job["runAt"], job["maxAttempts"]) == (
        "email",
        5,
        T0 + 1_000,
        7,
    )


def test_submit_with_run_at_in_the_past_is_claimable_at_once() -> None:
    state = QueueState()
    submit(state, "j1", run_at_ms=T0 - 5)
    assert "runAt" not in state.jobs["j1"]
    assert claimed_id(state, "w", None, T0) == "j1"


# -- claim ------------------------------------------------------------------------------


def test_claim_takes_priority_first_then_submission_order() -> None:
    state = QueueState()
    submit(state, "low-1")
    submit(state, "high-1", priority=10)
    submit(state, "low-2")
    submit(state, "high-2", priority=10)
    submit(state, "neg", priority=-1)

    order = [claimed_id(state, "w", None, T0 + i) for i in range(6)]
    assert order == ["high-1", "high-2", "low-1", "low-2", "neg", None]


def test_claim_sets_lease_fields_from_the_claim_time() -> None:
    state = QueueState()
    submit(state, "j1", payload=[1, 2], type="A", max_attempts=4)
    result = state.claim("w1", ["A"], T0 + 50)

    assert result is not None
    assert (result.job_id, thaw_payload(result.payload), result.type) == ("j1", [1, 2], "A")
    assert (result.attempts, result.max_attempts) == (1, 4)
    job = state.jobs["j1"]
    assert (job["status"], job["workerId"], job["heartbeat"], job["attempts"]) == (
        "in_progress",
        "w1",
        T0 + 50,
        1,
    )


def test_type_filters() -> None:
    state = QueueState()
    submit(state, "untyped")
    submit(state, "a", type="A")
    submit(state, "b", type="B")

    assert claimed_id(state, "w", ["C"], T0) is None
    assert claimed_id(state, "w", ["B", "C"], T0) == "b"
    assert claimed_id(state, "w", ["A", "B"], T0) == "a"
    # A non-empty filter never matches an untyped job ...
    assert claimed_id(state, "w", ["A", "B", ""], T0) is None
    # ... while an empty or absent filter matches every job.
    assert claimed_id(state, "w", [], T0) == "untyped"


def test_no_filter_and_empty_filter_match_typed_jobs() -> None:
    state = QueueState()
    submit(state, "a", type="A")
    submit(state, "b", type="B")
    assert claimed_id(state, "w", None, T0) == "a"
    assert claimed_id(state, "w", [], T0) == "b"


def test_typed_claim_respects_priority_across_types() -> None:
    state = QueueState()
    submit(state, "a", type="A")
    submit(state, "b", type="B", priority=1)
    assert claimed_id(state, "w", ["A", "B"], T0) == "b"


def test_delayed_job_is_not_claimable_before_run_at() -> None:
    state = QueueState()
    submit(state, "later", delay_ms=1_000)
    submit(state, "now")

    assert claimed_id(state, "w", None, T0) == "now"
    assert claimed_id(state, "w", None, T0 + 999) is None
    assert state.next_run_at_ms() == T0 + 1_000
    assert claimed_id(state, "w", None, T0 + 1_000) == "later"
    assert "runAt" not in state.jobs["later"]
    assert state.next_run_at_ms() is None


def test_delayed_job_keeps_its_submission_order_once_due() -> None:
    state = QueueState()
    submit(state, "first", delay_ms=100)
    submit(state, "second")
    # Once due, "first" was submitted earlier, so it comes first.
    assert claimed_id(state, "w", None, T0 + 100) == "first"


def test_two_claims_never_get_the_same_job() -> None:
    state = QueueState()
    submit(state, "j1")
    assert claimed_id(state, "w1", None, T0) == "j1"
    assert claimed_id(state, "w2", None, T0) is None


def test_empty_claim_changes_nothing() -> None:
    state = QueueState()
    before = state.changes
    assert state.claim("w", None, T0) is None
    assert state.changes == before


# -- heartbeat, complete, fail ----------------------------------------------------------


def claimed_state(max_attempts: int = 3) -> QueueState:
    state = QueueState()
    submit(state, "j1", max_attempts=max_attempts)
    assert claimed_id(state, "w1", None, T0) == "j1"
    return state


def test_heartbeat_by_holder_refreshes_the_lease() -> None:
    state = claimed_state()
    state.heartbeat("j1", "w1", None, T0 + 1_500)
    assert state.jobs["j1"]["heartbeat"] == T0 + 1_500
    assert state.expire(T0 + 3_000, TIMEOUT_MS) == []
    assert state.oldest_lease_heartbeat_ms() == T0 + 1_500


@pytest.mark.parametrize("action", ["heartbeat", "complete", "fail"])
@pytest.mark.parametrize(
    ("job_id", "worker_id"), [("j1", "w2"), ("nope", "w1")], ids=["other-worker", "unknown-job"]
)
def test_non_holder_gets_lease_lost_and_nothing_changes(
    action: str, job_id: str, worker_id: str
) -> None:
    state = claimed_state()
    before, changes = encode_state(state.to_document()), state.changes
    with pytest.raises(LeaseLostError):
        lease_action(state, action, job_id, worker_id, None, T0 + 10)
    assert encode_state(state.to_document()) == before
    assert state.changes == changes


@pytest.mark.parametrize("action", ["heartbeat", "complete", "fail"])
def test_unclaimed_job_has_no_holder(action: str) -> None:
    state = QueueState()
    submit(state, "j1")
    with pytest.raises(LeaseLostError):
        lease_action(state, action, "j1", "w1", None, T0)


def lease_action(
    state: QueueState, action: str, job_id: str, worker_id: str, attempt: int | None, now_ms: int
) -> None:
    if action == "heartbeat":
        state.heartbeat(job_id, worker_id, attempt, now_ms)
    elif action == "complete":
        state.complete(job_id, worker_id, attempt)
    else:
        state.fail(job_id, worker_id, attempt, now_ms)


def test_complete_removes_the_job_once() -> None:
    state = claimed_state()
    state.complete("j1", "w1", None)
    assert state.jobs == {}
    assert state.completed_total == 1
    assert state.in_progress_count == 0
    with pytest.raises(LeaseLostError):
        state.complete("j1", "w1", None)
    assert state.completed_total == 1


@pytest.mark.parametrize("action", ["heartbeat", "complete", "fail"])
def test_attempt_fences_a_stale_holder_with_the_same_worker_id(action: str) -> None:
    """F04 variant: the same worker reclaims; the first attempt's late call is refused."""
    state = claimed_state()
    assert state.expire(T0 + TIMEOUT_MS, TIMEOUT_MS) == [("j1", "retry")]
    assert claimed_id(state, "w1", None, T0 + TIMEOUT_MS) == "j1"
    assert state.jobs["j1"]["attempts"] == 2

    with pytest.raises(LeaseLostError, match="attempt 1"):
        lease_action(state, action, "j1", "w1", 1, T0 + TIMEOUT_MS + 1)
    assert state.jobs["j1"]["status"] == "in_progress"
    lease_action(state, action, "j1", "w1", 2, T0 + TIMEOUT_MS + 1)


def test_fail_with_attempts_left_retries_after_the_delay() -> None:
    state = claimed_state()
    outcome = state.fail("j1", "w1", 1, T0 + 10, error="boom", retry_delay_ms=500)
    assert outcome == "retry"
    job = state.jobs["j1"]
    assert (job["status"], job["runAt"], job["lastError"]) == ("unclaimed", T0 + 510, "boom")
    assert "workerId" not in job and "heartbeat" not in job
    assert claimed_id(state, "w2", None, T0 + 509) is None
    assert claimed_id(state, "w2", None, T0 + 510) == "j1"
    assert state.jobs["j1"]["attempts"] == 2


def test_fail_with_zero_delay_is_claimable_at_once() -> None:
    state = claimed_state()
    state.fail("j1", "w1", None, T0, retry_delay_ms=0)
    assert "runAt" not in state.jobs["j1"]
    assert claimed_id(state, "w2", None, T0) == "j1"


def test_fail_default_delay_is_exponential_with_jitter() -> None:
    state = claimed_state()
    state.fail("j1", "w1", None, T0, jitter=0.0)
    assert state.jobs["j1"]["runAt"] == T0 + 500  # 1 s base, up to half taken by jitter
    assert default_retry_delay_ms(1, 0.999) <= 1_000
    assert default_retry_delay_ms(2, 0.0) == 1_000
    assert default_retry_delay_ms(3, 0.0) == 2_000
    assert default_retry_delay_ms(50, 0.999) <= 5 * 60 * 1000


def test_fail_on_the_last_attempt_moves_the_job_to_dead() -> None:
    state = claimed_state(max_attempts=1)
    assert state.fail("j1", "w1", 1, T0 + 7, error="boom") == "exhausted"
    assert state.jobs == {}
    [dead] = state.dead
    assert (dead["id"], dead["reason"], dead["deadAt"], dead["lastError"]) == (
        "j1",
        "exhausted",
        T0 + 7,
        "boom",
    )
    assert dead["attempts"] == 1
    assert state.dead_total == 1
    assert state.stats()["dead"] == 1


@pytest.mark.parametrize("reason", ["invalid_payload", "failed"])
def test_fail_with_a_reason_goes_straight_to_dead(reason: str) -> None:
    state = claimed_state(max_attempts=5)
    assert state.fail("j1", "w1", None, T0, dead_reason=reason) == reason
    assert [d["reason"] for d in state.dead] == [reason]
    assert state.find("j1")["status"] == "dead"


# -- expiry -----------------------------------------------------------------------------


def test_expiry_requeues_a_silent_job() -> None:
    state = claimed_state()
    assert state.expire(T0 + TIMEOUT_MS - 1, TIMEOUT_MS) == []
    assert state.expire(T0 + TIMEOUT_MS, TIMEOUT_MS) == [("j1", "retry")]
    job = state.jobs["j1"]
    assert job["status"] == "unclaimed"
    assert "workerId" not in job and "heartbeat" not in job
    assert "w1" in job["lastError"]
    assert state.in_progress_count == 0
    with pytest.raises(LeaseLostError):
        state.heartbeat("j1", "w1", None, T0 + TIMEOUT_MS)


def test_expiry_on_the_last_attempt_buries_with_heartbeat_timeout() -> None:
    state = claimed_state(max_attempts=1)
    assert state.expire(T0 + TIMEOUT_MS, TIMEOUT_MS) == [("j1", "heartbeat_timeout")]
    assert [d["reason"] for d in state.dead] == ["heartbeat_timeout"]
    assert state.jobs == {}


def test_expiry_follows_heartbeats_not_claim_order() -> None:
    state = QueueState()
    submit(state, "a")
    submit(state, "b")
    claimed_id(state, "w1", None, T0)
    claimed_id(state, "w2", None, T0 + 100)
    state.heartbeat("a", "w1", None, T0 + 1_000)
    assert state.expire(T0 + 100 + TIMEOUT_MS, TIMEOUT_MS) == [("b", "retry")]


def test_expiry_after_reload_follows_heartbeats_not_submission_order() -> None:
    """A reloaded document must index leases by heartbeat, whatever the job order."""
    state = QueueState()
    submit(state, "a")
    submit(state, "b")
    claimed_id(state, "w1", None, T0)
    claimed_id(state, "w2", None, T0 + 100)
    state.heartbeat("a", "w1", None, T0 + 1_000)

    again = reloaded(state)
    assert again.oldest_lease_heartbeat_ms() == T0 + 100
    assert again.expire(T0 + 100 + TIMEOUT_MS, TIMEOUT_MS) == [("b", "retry")]


# -- cancel and the dead list -----------------------------------------------------------


def test_cancel_removes_queued_and_running_jobs() -> None:
    state = claimed_state()
    submit(state, "j2")
    state.cancel("j2")
    state.cancel("j1")
    assert state.jobs == {}
    assert claimed_id(state, "w", None, T0) is None
    with pytest.raises(LeaseLostError):
        state.heartbeat("j1", "w1", None, T0)
    with pytest.raises(JobNotFoundError):
        state.cancel("j1")


def bury(state: QueueState, job_id: str, type_: str | None = None) -> None:
    submit(state, job_id, type=type_, max_attempts=1)
    while claimed_id(state, "w", None, T0) not in (job_id, None):
        pass
    state.fail(job_id, "w", None, T0, error="x")


def test_requeue_dead_starts_over_with_attempts_zero() -> None:
    state = QueueState()
    bury(state, "a", "A")
    bury(state, "b", "B")
    bury(state, "c", "B")

    assert state.requeue_dead(["a"], None, T0 + 1) == 1
    assert state.requeue_dead(None, "B", T0 + 1) == 2
    assert state.requeue_dead(None, None, T0 + 1) == 0
    assert list(state.dead) == []
    for job_id in ("a", "b", "c"):
        job = state.jobs[job_id]
        assert (job["status"], job["attempts"]) == ("unclaimed", 0)
        assert not {"reason", "deadAt", "workerId", "heartbeat"} & job.keys()
    assert claimed_id(state, "w", ["B"], T0 + 1) == "b"


def test_purge_dead_empties_the_list_but_keeps_the_total() -> None:
    state = QueueState()
    bury(state, "a")
    bury(state, "b")
    assert state.purge_dead() == 2
    assert list(state.dead) == []
    assert state.dead_total == 2
    assert state.purge_dead() == 0


def test_dead_list_is_bounded_newest_last() -> None:
    state = QueueState(dead_limit=3)
    for i in range(5):
        bury(state, f"j{i}")
    assert [d["id"] for d in state.dead] == ["j2", "j3", "j4"]
    assert state.dead_total == 5
    with pytest.raises(JobNotFoundError):
        state.find("j0")


# -- idempotency ------------------------------------------------------------------------


def test_idempotency_key_returns_the_first_job_and_keeps_its_payload() -> None:
    state = QueueState(idempotency_retention_ms=10_000)
    first = state.submit(SubmitSpec(payload=1, idempotency_key="k"), "j1", T0)
    changes = state.changes
    second = state.submit(SubmitSpec(payload=2, idempotency_key="k"), "j2", T0 + 1)

    assert (second.job_id, second.duplicate) == (first.job_id, True)
    assert list(state.jobs) == ["j1"]
    assert thaw_payload(state.jobs["j1"]["payload"]) == 1
    assert state.changes == changes  # a duplicate causes no write


def test_idempotency_key_survives_a_reload_and_expires_after_retention() -> None:
    state = QueueState(idempotency_retention_ms=10_000)
    submit(state, "j1", idempotency_key="k")
    state = reloaded(state, idempotency_retention_ms=10_000)
    assert state.submit(SubmitSpec(payload=None, idempotency_key="k"), "j2", T0 + 9_999).duplicate

    assert state.prune_idempotency(T0 + 9_999) == 0
    assert state.prune_idempotency(T0 + 10_000) == 1
    assert state.idempotency == {}
    assert "idempotencyKeys" not in state.to_document()
    result = state.submit(SubmitSpec(payload=None, idempotency_key="k"), "j2", T0 + 10_000)
    assert (result.job_id, result.duplicate) == ("j2", False)


def test_idempotency_key_past_retention_is_reused_without_pruning() -> None:
    state = QueueState(idempotency_retention_ms=10)
    submit(state, "j1", idempotency_key="k")
    assert not state.submit(SubmitSpec(payload=None, idempotency_key="k"), "j2", T0 + 10).duplicate


# -- leadership fields ------------------------------------------------------------------


def test_takeover_bumps_epoch_and_resets_running_heartbeats() -> None:
    state = claimed_state()
    submit(state, "queued")
    state.register("b2:1", "broker-2", T0 + 5_000, takeover=True)

    doc = state.to_document()
    assert (doc["broker"], doc["brokerId"], doc["epoch"], doc["brokerHeartbeat"]) == (
        "b2:1",
        "broker-2",
        1,
        T0 + 5_000,
    )
    assert state.jobs["j1"]["heartbeat"] == T0 + 5_000
    assert "heartbeat" not in state.jobs["queued"]
    # The worker gets a full timeout counted from the takeover.
    assert state.expire(T0 + 5_000 + TIMEOUT_MS - 1, TIMEOUT_MS) == []


def test_register_without_takeover_keeps_the_epoch_and_resign_clears_broker() -> None:
    state = claimed_state()
    state.register("b1:1", "broker-1", T0 + 10, takeover=False)
    assert state.epoch == 0
    assert state.jobs["j1"]["heartbeat"] == T0
    state.resign()
    assert state.to_document()["broker"] is None


# -- the document -----------------------------------------------------------------------


def test_round_trip_keeps_unknown_top_level_and_job_fields() -> None:
    doc = {
        **empty_document(),
        "futureTopLevel": {"nested": [1, 2]},
        "jobs": [
            {
                "id": "j1",
                "status": "unclaimed",
                "payload": "p",
                "createdAt": T0,
                "attempts": 0,
                "maxAttempts": 3,
                "futureJobField": "kept",
            },
            {
                "id": "j2",
                "status": "in_progress",
                "payload": None,
                "createdAt": T0,
                "attempts": 1,
                "maxAttempts": 3,
                "workerId": "w",
                "heartbeat": T0,
                "tsOnly": 7,
            },
        ],
    }
    state = QueueState.from_document(decode_state(encode_state(doc)))
    out = decode_state(encode_state(state.to_document()))
    assert out["futureTopLevel"] == {"nested": [1, 2]}
    assert [j.get("futureJobField") for j in out["jobs"]] == ["kept", None]
    assert out["jobs"][1]["tsOnly"] == 7

    # The unknown job field also survives the job's own transitions.
    state.claim("w2", None, T0 + 1)
    state.fail("j1", "w2", None, T0 + 1, retry_delay_ms=0)
    assert state.jobs["j1"]["futureJobField"] == "kept"


def test_typescript_document_without_new_fields_loads() -> None:
    ts_doc = (
        b'{"broker":"h:8080","brokerHeartbeat":5,"completedTotal":2,"jobs":['
        b'{"id":"x","status":"unclaimed","payload":{"a":1},"createdAt":1,"attempts":0}]}'
    )
    state = QueueState.from_document(decode_state(ts_doc))
    assert state.jobs["x"]["maxAttempts"] == DEFAULT_MAX_ATTEMPTS
    assert (state.epoch, state.completed_total, state.dead_total) == (0, 2, 0)
    assert claimed_id(state, "w", None, T0) == "x"


def test_reload_rebuilds_every_index() -> None:
    state = QueueState()
    submit(state, "delayed", delay_ms=1_000)
    submit(state, "typed", type="A")
    submit(state, "prio", priority=3)
    submit(state, "running")
    claimed_id(state, "w", None, T0)  # prio
    again = reloaded(state)
    assert again.in_progress_count == 1
    assert again.stats() == state.stats()
    assert claimed_id(again, "w", ["A"], T0) == "typed"
    assert claimed_id(again, "w", None, T0) == "running"
    assert claimed_id(again, "w", None, T0 + 999) is None
    assert claimed_id(again, "w", None, T0 + 1_000) == "delayed"


# -- F14: a typed claim does not scan other types' backlog ------------------------------


class CountingHeapq:
    """Stands in for :mod:`heapq` inside osqueue.state and counts every heap operation."""

    def __init__(self) -> None:
        self.ops = 0

    def heappush(self, heap: list[Any], item: Any) -> None:
        self.ops += 1
        heapq.heappush(heap, item)

    def heappop(self, heap: list[Any]) -> Any:
        self.ops += 1
        return heapq.heappop(heap)


def test_f14_typed_claim_does_not_touch_the_backlog_of_other_types(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    state = QueueState()
    for i in range(10_000):
        submit(state, f"a{i}", type="A")
    submit(state, "b", type="B")
    a_heap = state._ready_by_type["A"]
    a_before = list(a_heap)
    counter = CountingHeapq()
    monkeypatch.setattr(state_module, "heapq", SimpleNamespace(**vars(heapq)))
    monkeypatch.setattr(state_module.heapq, "heappush", counter.heappush)
    monkeypatch.setattr(state_module.heapq, "heappop", counter.heappop)

    assert claimed_id(state, "w", ["B"], T0) == "b"
    assert counter.ops == 0  # the head of B's heap is the answer: no pops, no pushes
    assert a_heap == a_before
    assert claimed_id(state, "w", ["C"], T0) is None
    assert claimed_id(state, "w", ["B"], T0) is None
    # Each of these pops at most the one stale B entry at the head of the all-jobs heap.
    assert claimed_id(state, "w", None, T0) == "a0"
    assert claimed_id(state, "w", [], T0) == "a1"
    assert counter.ops <= 4


def test_claimed_jobs_do_not_pile_up_in_the_heaps_of_filters_nobody_uses() -> None:
    """Workers that never filter must not leave every job ever queued in the type heaps."""
    state = QueueState()
    for i in range(5_000):
        submit(state, f"j{i}", type="A", now_ms=T0 + i)
        assert claimed_id(state, "w", None, T0 + i) == f"j{i}"
        state.complete(f"j{i}", "w", None)
    for i in range(5_000):
        submit(state, f"k{i}", type="B", now_ms=T0 + i)
        assert claimed_id(state, "w", ["B"], T0 + i) == f"k{i}"
        state.complete(f"k{i}", "w", None)
    sizes = [len(state._ready_any)] + [len(h) for h in state._ready_by_type.values()]
    assert sum(sizes) <= 2_000
