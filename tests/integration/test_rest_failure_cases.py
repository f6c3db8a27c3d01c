"""The failure cases F01-F05, F13 and F19 at the REST level, with the short timings of
the case list (job timeout 2 s, worker heartbeat every 0.5 s, leader timeout 3 s).

Where a case only needs "a timeout", a shorter one keeps the suite fast; each test says
which timings it uses. Waiting for time to pass is the point of these scenarios, so they
poll an observable condition (the stored document, a count of requests) with a bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable
from typing import Any

import pytest

from osqueue.storage.gcs import DEFAULT_MIN_WRITE_INTERVAL_MS
from tests.integration.rest_support import (
    BrokerFactory,
    BrokerStore,
    RecordingStorage,
    RestBroker,
    strict_json,
)

WORKER_HEARTBEAT_S = 0.5


async def poll_until(condition: Callable[[], bool], timeout_s: float, step_s: float = 0.02) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(step_s)


def stored_job(broker: RestBroker, job_id: str) -> dict[str, Any] | None:
    for job in broker.storage.document()["jobs"]:
        if job["id"] == job_id:
            return dict(job)
    return None


def now_ms() -> int:
    return int(time.time() * 1000)


async def test_f01_crashed_worker_job_expires_without_other_traffic(broker: RestBroker) -> None:
    """Job timeout 2 s. J: W1 heartbeats once, then dies. K (the variant): W1b dies before
    its first heartbeat. Nothing talks to the broker until both have expired."""
    timeout_s = broker.engine.config.job_timeout_ms / 1000
    assert timeout_s == 2
    j, k = await broker.submit("j"), await broker.submit("k")
    assert (await broker.claim("w1"))["jobId"] == j
    assert (await broker.claim("w1b"))["jobId"] == k
    k_claimed = time.monotonic()
    await asyncio.sleep(WORKER_HEARTBEAT_S)
    assert (await broker.lease("heartbeat", j, "w1")).status_code == 204
    j_beat = time.monotonic()

    # From here on only the store is watched: no request reaches the broker.
    expired: dict[str, float] = {}

    def both_expired() -> bool:
        for job_id in (j, k):
            job = stored_job(broker, job_id)
            if job_id not in expired and job is not None and job["status"] == "unclaimed":
                expired[job_id] = time.monotonic()
        return len(expired) == 2

    operations = broker.engine.stats.operations
    await poll_until(both_expired, timeout_s + 2)
    assert timeout_s - 0.05 <= expired[k] - k_claimed <= timeout_s + 1
    assert timeout_s - 0.05 <= expired[j] - j_beat <= timeout_s + 1
    assert broker.engine.stats.operations <= operations + 2  # the expiries themselves

    first, second = await broker.claim("w2"), await broker.claim("w2")
    assert [(c["jobId"], c["attempts"]) for c in (first, second)] == [(j, 2), (k, 2)]
    for job_id in (j, k):
        assert (await broker.lease("complete", job_id, "w2")).status_code == 204
    await broker.check_invariants()


async def test_f02_long_job_kept_alive_by_heartbeats_is_never_handed_out(
    broker: RestBroker,
) -> None:
    """Job timeout 2 s; W1 holds J for 5 s (the case says 10 s: 2.5 timeouts is enough to
    show the lease is renewed), heartbeating every 0.5 s; W2 claims every 100 ms."""
    job_id = await broker.submit("long")
    assert (await broker.claim("w1"))["jobId"] == job_id
    done = asyncio.Event()
    w2_got: list[Any] = []
    w2_polls = 0

    async def w2() -> None:
        nonlocal w2_polls
        while not done.is_set():
            claimed = await broker.claim("w2")
            w2_polls += 1
            if claimed:
                w2_got.append(claimed)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 0.1)

    poller = asyncio.create_task(w2())
    held_until = time.monotonic() + 5
    while time.monotonic() < held_until:
        await asyncio.sleep(WORKER_HEARTBEAT_S)
        assert (await broker.lease("heartbeat", job_id, "w1")).status_code == 204
    assert (await broker.lease("complete", job_id, "w1")).status_code == 204
    done.set()
    await poller

    assert w2_got == []
    assert w2_polls >= 25
    doc = await broker.state()
    assert (doc["jobs"], doc["completedTotal"]) == ([], 1)
    assert broker.ledger.claims[job_id] == 1
    await broker.check_invariants()


async def test_f03_the_claim_itself_starts_the_lease(start_broker: BrokerFactory) -> None:
    """Job timeout 1 s. J expires from W1; W2 claims it and first heartbeats at 0.9 x the
    timeout; W3 polls every 50 ms from W2's claim on and never gets J."""
    broker = await start_broker(job_timeout_ms=1_000)
    job_id = await broker.submit("j")
    await broker.claim("w1")
    await poll_until(lambda: (stored_job(broker, job_id) or {})["status"] == "unclaimed", 3)

    before = now_ms()
    claimed = await broker.claim("w2")
    after = now_ms()
    assert (claimed["jobId"], claimed["attempts"]) == (job_id, 2)
    job = stored_job(broker, job_id)
    assert job is not None
    assert before <= job["heartbeat"] <= after  # the broker's time at the claim
    assert job["workerId"] == "w2"

    done = asyncio.Event()
    w3_got: list[Any] = []

    async def w3() -> None:
        while not done.is_set():
            if got := await broker.claim("w3"):
                w3_got.append(got)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 0.05)

    poller = asyncio.create_task(w3())
    await asyncio.sleep(0.9)  # the late first heartbeat is the scenario
    assert (await broker.lease("heartbeat", job_id, "w2")).status_code == 204
    await asyncio.sleep(0.5)
    assert (await broker.lease("complete", job_id, "w2")).status_code == 204
    done.set()
    await poller
    assert w3_got == []
    await broker.check_invariants()


async def test_f04_late_heartbeat_and_complete_are_refused(start_broker: BrokerFactory) -> None:
    """Job timeout 1 s. J: W1 pauses past the timeout, W2 takes J over. K (the variant):
    W1 itself reclaims K, then the first attempt's delayed complete arrives."""
    broker = await start_broker(job_timeout_ms=1_000)
    j = await broker.submit("j", type="J")
    k = await broker.submit("k", type="K")
    assert (await broker.claim("w1", ["J"]))["attempts"] == 1
    assert (await broker.claim("w1", ["K"]))["attempts"] == 1

    def both_expired() -> bool:
        return all((stored_job(broker, x) or {})["status"] == "unclaimed" for x in (j, k))

    await poll_until(both_expired, 3)  # W1 is paused past the timeout
    assert (await broker.claim("w2", ["J"]))["jobId"] == j
    assert (await broker.lease("heartbeat", j, "w2")).status_code == 204
    reclaimed = await broker.claim("w1", ["K"])
    assert (reclaimed["jobId"], reclaimed["attempts"]) == (k, 2)

    # W1 resumes.
    for action in ("heartbeat", "complete"):
        response = await broker.lease(action, j, "w1")
        assert (response.status_code, response.json()["_tag"]) == (409, "LeaseLostError")
        stale = await broker.lease(action, k, "w1", attempt=1)
        assert (stale.status_code, stale.json()["_tag"]) == (409, "LeaseLostError")
    assert (stored_job(broker, j) or {})["workerId"] == "w2"

    assert (await broker.lease("complete", j, "w2")).status_code == 204
    assert (await broker.lease("complete", k, "w1", attempt=2)).status_code == 204
    assert (await broker.state())["completedTotal"] == 2
    await broker.check_invariants()


async def test_f05_poison_job_goes_dead_after_max_attempts(
    start_broker: BrokerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Job timeout 0.5 s (three expiries in a row). J (maxAttempts 3) and J1 (maxAttempts 1)
    kill every worker that claims them; K behind them is fine."""
    caplog.set_level(logging.INFO, logger="osqueue")
    broker = await start_broker(job_timeout_ms=500)
    poison = await broker.submit("poison", maxAttempts=3)
    once = await broker.submit("poison-once", maxAttempts=1)
    fine = await broker.submit("fine")
    workers = 0

    def buried() -> bool:
        dead = {d["id"] for d in broker.storage.document().get("dead", [])}
        return {poison, once} <= dead

    deadline = time.monotonic() + 8
    while not buried():
        assert time.monotonic() < deadline, "poison jobs never reached dead"
        workers += 1
        claimed = await broker.claim(f"worker-{workers}")
        if claimed.get("jobId") == fine:
            assert (await broker.lease("complete", fine, f"worker-{workers}")).status_code == 204
        await asyncio.sleep(0.05)  # a crashed worker's claim: no heartbeat, no complete

    assert broker.ledger.claims[poison] == 3
    assert broker.ledger.claims[once] == 1
    assert broker.ledger.completions[fine] == 1
    dead = {d["id"]: d for d in (await broker.http.get("/v1/dead")).json()["jobs"]}
    assert (dead[poison]["reason"], dead[poison]["attempts"]) == ("heartbeat_timeout", 3)
    assert (dead[once]["reason"], dead[once]["attempts"]) == ("heartbeat_timeout", 1)
    assert dead[poison]["lastError"]
    stats = (await broker.http.get("/v1/stats")).json()
    assert (stats["dead"], stats["total"], stats["completedTotal"]) == (2, 0, 1)
    logged = [r.getMessage() for r in caplog.records if "dead" in r.getMessage()]
    assert any(poison in line for line in logged), logged
    await broker.check_invariants()


async def test_f13_idle_pollers_cause_no_writes_then_one_gets_the_job(
    broker: RestBroker,
) -> None:
    """200 workers claim every 100 ms on an empty queue, for about 3 s here instead of the
    case's 60 s, then one job arrives. Leader heartbeats every 0.5 s are the only writes."""
    pollers, period_s, idle_s = 200, 0.1, 3.0
    stop = asyncio.Event()
    polls = 0
    got: list[tuple[str, str]] = []

    async def poll(name: str) -> None:
        nonlocal polls
        async with broker.new_client() as http:
            while not stop.is_set():
                claimed = await broker.claim(name, http=http)
                polls += 1
                if claimed:
                    got.append((name, claimed["jobId"]))
                    # Done at once: a redelivery after the job timeout is not the point.
                    await broker.lease("complete", claimed["jobId"], name)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), period_s)

    first_write = len(broker.storage.history)
    before = broker.storage.document()
    started = time.monotonic()
    tasks = [asyncio.create_task(poll(f"poller-{i}")) for i in range(pollers)]
    await poll_until(lambda: time.monotonic() - started >= idle_s and polls >= 2_000, 20, 0.1)
    idle_elapsed = time.monotonic() - started

    idle_writes = broker.storage.history[first_write:]
    assert len(idle_writes) <= idle_elapsed / 0.5 + 2
    for data in idle_writes:
        written = strict_json(data)
        changed = {k for k in written.keys() | before.keys() if written.get(k) != before.get(k)}
        assert changed <= {"brokerHeartbeat", "commitId"}, changed

    job_id = await broker.submit("the one")
    await poll_until(lambda: bool(got), 5)
    seen = polls
    await poll_until(lambda: polls >= seen + 2 * pollers, 10)  # everyone polled again
    stop.set()
    await asyncio.gather(*tasks)
    assert len(got) == 1
    assert got[0][1] == job_id
    await broker.check_invariants()


async def test_f19_redelivered_job_keeps_its_id_and_counts_attempts(
    start_broker: BrokerFactory,
) -> None:
    """Job timeout 0.5 s: the first worker crashes, the job comes back with attempt 2."""
    broker = await start_broker(job_timeout_ms=500)
    job_id = await broker.submit({"order": 42})
    first = await broker.claim("w1")
    second: dict[str, Any] = {}

    async def second_claim() -> bool:
        nonlocal second
        second = await broker.claim("w2")
        return bool(second)

    deadline = time.monotonic() + 3
    while not await second_claim():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert (first["jobId"], first["attempts"]) == (job_id, 1)
    assert (second["jobId"], second["attempts"]) == (job_id, 2)
    assert second["payload"] == first["payload"] == {"order": 42}
    assert (await broker.lease("complete", job_id, "w2")).status_code == 204
    await broker.check_invariants()


@pytest.mark.stores(
    "gcs", reason="GCS's own limit: about one write a second to one object (F12, real pacing)"
)
async def test_f12_gcs_broker_writes_the_queue_at_most_once_a_second(
    store: BrokerStore, start_broker: BrokerFactory
) -> None:
    """GCSStorage at its default pacing, 1 s (the rest of the suite uses 20 ms on the
    emulator).
    20 producers submit as fast as they are answered for about 3.5 s: the broker never
    starts two writes of the queue less than a second apart, every submit is answered
    within about one write interval, and each write carries many of them."""
    assert DEFAULT_MIN_WRITE_INTERVAL_MS == 1_000
    gcs = store.new(min_write_interval_ms=DEFAULT_MIN_WRITE_INTERVAL_MS)
    broker = await start_broker(RecordingStorage(gcs))
    producers, load_s = 20, 3.5
    latencies: list[float] = []

    async def produce(n: int) -> None:
        async with broker.new_client() as http:
            deadline = time.monotonic() + load_s
            while time.monotonic() < deadline:
                sent = time.monotonic()
                response = await http.post("/v1/jobs", json={"payload": n})
                assert response.status_code == 200, response.text
                latencies.append(time.monotonic() - sent)
                broker.ledger.max_attempts[response.json()["jobId"]] = 3

    first_write = len(broker.storage.write_starts)
    started = time.monotonic()
    await asyncio.gather(*(produce(n) for n in range(producers)))
    elapsed = time.monotonic() - started

    starts = broker.storage.write_starts
    gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
    assert min(gaps) >= 0.98, gaps  # every write, the takeover and heartbeats included
    load_writes = len(starts) - first_write
    assert load_writes <= elapsed + 1, (load_writes, elapsed)
    assert len(latencies) >= 5 * load_writes  # batched: many submits per write
    assert max(latencies) < 2.5, max(latencies)  # a submit waits at most ~one interval
    stored = await broker.storage.stored_document()
    assert len(stored["jobs"]) == len(latencies)
    await broker.check_invariants()
