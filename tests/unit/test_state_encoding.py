"""The incremental encoder must always produce the document a full encode would."""

from __future__ import annotations

import random

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from osqueue.errors import OsqueueError
from osqueue.state import QueueState, SubmitSpec

OPS = (
    "submit",
    "submit_key",
    "claim",
    "heartbeat",
    "complete",
    "fail",
    "expire",
    "cancel",
    "takeover",
)


def full_encode(state: QueueState) -> bytes:
    return orjson.dumps(state.to_document())


def step(state: QueueState, op: str, now: int, rng: random.Random) -> None:
    ids = list(state.jobs)
    job_id = rng.choice(ids) if ids else "none"
    job = state.jobs.get(job_id, {})
    worker = job.get("workerId", "w")
    try:
        if op == "submit":
            state.submit(SubmitSpec({"n": now}, type=rng.choice(["a", "b", None])), f"j{now}", now)
        elif op == "submit_key":
            key = rng.choice(["k1", "k2", "k3", "auto:a", "auto:b"])
            state.submit(SubmitSpec({"n": now}, idempotency_key=key), f"j{now}", now)
        elif op == "claim":
            state.claim(f"w{now % 3}", None, now)
        elif op == "heartbeat":
            state.heartbeat(job_id, worker, None, now)
        elif op == "complete":
            state.complete(job_id, worker, None)
        elif op == "fail":
            state.fail(job_id, worker, None, now, error="boom", retry_delay_ms=rng.choice([0, 5]))
        elif op == "expire":
            state.expire(now, 10)
            state.prune_idempotency(now)
        elif op == "cancel":
            state.cancel(job_id)
        else:
            state.register("b:1", "b", now, takeover=True)
    except OsqueueError:
        pass


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(OPS), max_size=60), st.integers(0, 2**32))
def test_incremental_encoding_matches_a_full_encode(ops: list[str], seed: int) -> None:
    rng = random.Random(seed)
    block = rng.choice([1, 3, 256])
    state = QueueState(jobs_per_block=block, keys_per_block=block, idempotency_retention_ms=7)
    for now, op in enumerate(ops, start=1):
        step(state, op, now, rng)
        assert orjson.loads(state.encode()) == orjson.loads(full_encode(state)), op


def test_a_touched_job_is_re_encoded() -> None:
    state = QueueState()
    state.submit(SubmitSpec({"n": 1}), "j1", 0)
    state.encode()
    claimed = state.claim("w", None, 5)
    assert claimed is not None
    job = orjson.loads(state.encode())["jobs"][0]
    assert (job["status"], job["workerId"], job["heartbeat"]) == ("in_progress", "w", 5)
