"""Property test: random operation sequences keep the queue's invariants.

Each claim and each expiry is checked against a brute-force scan of the jobs, so the lazy
heaps and the lease index can never disagree with the document they index.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from osqueue.errors import JobNotFoundError, LeaseLostError
from osqueue.model import decode_state, encode_state
from osqueue.state import QueueState, SubmitSpec

T0 = 1_700_000_000_000
TIMEOUT_MS = 1_000
WORKERS = ("w1", "w2", "w3")
FILTERS: tuple[list[str] | None, ...] = (None, [], ["A"], ["B"], ["A", "B"], ["C"])

submits = st.tuples(
    st.just("submit"),
    st.sampled_from([None, "A", "B"]),
    st.integers(-1, 1),  # priority
    st.integers(1, 3),  # maxAttempts
    st.sampled_from([0, 0, 300, 1_500]),  # delayMs
    st.sampled_from([None, None, "k1", "k2"]),  # idempotency key
)
claims = st.tuples(st.just("claim"), st.sampled_from(WORKERS), st.sampled_from(FILTERS))
leases = st.tuples(
    st.sampled_from(["heartbeat", "complete", "fail", "fail-dead"]),
    st.integers(0, 30),  # which job, modulo the ids seen so far
    st.sampled_from(["holder", "holder", "w1", "w2"]),
    st.sampled_from(["none", "current", "stale"]),  # the attempt sent along
)
ticks = st.tuples(st.just("tick"), st.integers(1, 700))
expiries = st.just(("expire",))
reloads = st.just(("reload",))
admin = st.tuples(
    st.sampled_from(["cancel", "requeue-all", "requeue-A", "purge", "takeover", "prune"]),
    st.integers(0, 30),
)
# Mostly queue traffic and time passing, with some reloads, expiries and admin.
WEIGHTED = [submits] * 3 + [claims] * 3 + [leases] * 3 + [ticks] * 3 + [expiries] * 2
WEIGHTED += [reloads, admin]
operations = st.lists(
    st.integers(0, len(WEIGHTED) - 1).flatmap(lambda i: WEIGHTED[i]), min_size=10, max_size=60
)


class Model:
    """What the test remembers besides the state: ids seen and claims per life of a job."""

    def __init__(self) -> None:
        self.state = QueueState(dead_limit=5, idempotency_retention_ms=5_000)
        self.now = T0
        self.ids: list[str] = []
        self.handed_out: Counter[str] = Counter()

    def pick(self, index: int) -> str:
        return self.ids[index % len(self.ids)] if self.ids else "missing"


def expected_claim(state: QueueState, types: list[str] | None, now_ms: int) -> str | None:
    best: tuple[int, int, str] | None = None
    for order, job in enumerate(state.jobs.values()):
        if job["status"] != "unclaimed" or job.get("runAt", now_ms) > now_ms:
            continue
        if types and job.get("type") not in types:
            continue
        key = (-int(job.get("priority") or 0), order, job["id"])
        if best is None or key < best:
            best = key
    return None if best is None else best[2]


def do_submit(m: Model, op: tuple[Any, ...]) -> None:
    _, type_, priority, max_attempts, delay_ms, key = op
    job_id = f"j{len(m.ids)}"
    spec = SubmitSpec(None, type_, max_attempts, None, delay_ms, priority, key)
    result = m.state.submit(spec, job_id, m.now)
    if not result.duplicate:
        m.ids.append(job_id)


def do_claim(m: Model, op: tuple[Any, ...]) -> None:
    _, worker, types = op
    expected = expected_claim(m.state, types, m.now)
    result = m.state.claim(worker, types, m.now)
    assert (None if result is None else result.job_id) == expected
    if result is not None:
        m.handed_out[result.job_id] += 1
        assert result.attempts == m.handed_out[result.job_id]


def do_lease(m: Model, op: tuple[Any, ...]) -> None:
    action, index, who, attempt_kind = op
    job_id = m.pick(index)
    job = m.state.jobs.get(job_id)
    worker = (job or {}).get("workerId", "w1") if who == "holder" else who
    current = (job or {}).get("attempts", 0)
    attempt = {"none": None, "current": current, "stale": current - 1}[attempt_kind]
    holds = (
        job is not None
        and job["status"] == "in_progress"
        and job.get("workerId") == worker
        and attempt in (None, current)
    )
    before = encode_state(m.state.to_document())
    try:
        if action == "heartbeat":
            m.state.heartbeat(job_id, worker, attempt, m.now)
        elif action == "complete":
            m.state.complete(job_id, worker, attempt)
        else:
            reason = "invalid_payload" if action == "fail-dead" else None
            m.state.fail(job_id, worker, attempt, m.now, dead_reason=reason, jitter=0.3)
    except LeaseLostError:
        assert not holds
        assert encode_state(m.state.to_document()) == before
    else:
        assert holds


def do_expire(m: Model) -> None:
    expected = {
        job["id"]: "heartbeat_timeout" if job["attempts"] >= job["maxAttempts"] else "retry"
        for job in m.state.jobs.values()
        if job["status"] == "in_progress" and job["heartbeat"] + TIMEOUT_MS <= m.now
    }
    assert dict(m.state.expire(m.now, TIMEOUT_MS)) == expected


def do_requeue(m: Model, type_: str | None) -> None:
    dead_before = {d["id"] for d in m.state.dead}
    moved = m.state.requeue_dead(None, type_, m.now)
    back = dead_before - {d["id"] for d in m.state.dead}
    assert moved == len(back)
    for job_id in back:
        m.handed_out[job_id] = 0


def apply(m: Model, op: tuple[Any, ...]) -> None:
    kind = op[0]
    state = m.state
    if kind == "submit":
        do_submit(m, op)
    elif kind == "claim":
        do_claim(m, op)
    elif kind in ("heartbeat", "complete", "fail", "fail-dead"):
        do_lease(m, op)
    elif kind == "tick":
        m.now += op[1]
    elif kind == "expire":
        do_expire(m)
    elif kind == "cancel":
        try:
            state.cancel(m.pick(op[1]))
        except JobNotFoundError:
            assert m.pick(op[1]) not in state.jobs
    elif kind.startswith("requeue"):
        do_requeue(m, "A" if kind == "requeue-A" else None)
    elif kind == "purge":
        state.purge_dead()
    elif kind == "reload":
        doc = decode_state(encode_state(state.to_document()))
        m.state = QueueState.from_document(doc, dead_limit=5, idempotency_retention_ms=5_000)
    elif kind == "takeover":
        state.register("b:1", "broker-x", m.now, takeover=True)
    elif kind == "prune":
        state.prune_idempotency(m.now)


def check_invariants(m: Model) -> None:
    state = m.state
    doc = decode_state(encode_state(state.to_document()))
    # The incremental encoding (cached job bytes) says exactly what the document says.
    assert decode_state(state.encode()) == doc
    live_ids = [j["id"] for j in doc["jobs"]]
    dead_ids = [d["id"] for d in doc["dead"]]
    # I2: no id twice in the state.
    assert len(live_ids) == len(set(live_ids))
    assert len(dead_ids) == len(set(dead_ids))
    assert not set(live_ids) & set(dead_ids)
    assert len(dead_ids) <= 5
    # I4: no job handed out more than maxAttempts times (per life: a requeue starts over).
    for job in [*doc["jobs"], *doc["dead"]]:
        assert 0 <= job["attempts"] <= job["maxAttempts"]
        assert job["attempts"] == m.handed_out[job["id"]]
    # The indexes agree with a scan of the document.
    running = {j["id"] for j in doc["jobs"] if j["status"] == "in_progress"}
    assert set(state._leases) == running
    for job in doc["jobs"]:
        assert (job["status"] == "in_progress") == ("workerId" in job) == ("heartbeat" in job)
    stats = state.stats()
    assert (stats["total"], stats["inProgress"]) == (len(live_ids), len(running))
    future = [
        j["runAt"]
        for j in doc["jobs"]
        if j["status"] == "unclaimed" and j.get("runAt", m.now) > m.now
    ]
    next_run = state.next_run_at_ms()
    if next_run is None or next_run > m.now:
        assert next_run == min(future, default=None)
    if running:
        oldest = min(state.jobs[j]["heartbeat"] for j in running)
        assert state.oldest_lease_heartbeat_ms() == oldest


@settings(max_examples=300, deadline=None, database=None)
@given(operations)
def test_random_operations_keep_the_invariants(ops: list[tuple[Any, ...]]) -> None:
    m = Model()
    for op in ops:
        apply(m, op)
        check_invariants(m)
