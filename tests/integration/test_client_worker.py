"""Clients and workers against a real broker on loopback, on each backend of ``store``
(memory, S3 on moto, GCS on fake-gcs-server: see tests/integration/conftest.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from pydantic import BaseModel

from osqueue.broker.server import BrokerConfig, BrokerHandle, run_broker_in_background
from osqueue.client import AsyncOsqueueClient, ClaimedJob, JobSpec, OsqueueClient, SubmitReceipt
from osqueue.engine import EngineConfig
from osqueue.errors import (
    BrokerProtocolError,
    JobNotFoundError,
    LeaseLostError,
    OsqueueError,
    WorkerExecutionError,
)
from osqueue.registry import JobRegistry
from osqueue.worker import FailureAction, JobContext, Worker
from tests.integration.rest_support import BrokerStore

WAIT_S = 10.0  # upper bound on any single wait; the tests normally finish in milliseconds


async def until(event: asyncio.Event, what: str) -> None:
    """Wait for ``event``, failing the test after WAIT_S."""
    try:
        await asyncio.wait_for(event.wait(), WAIT_S)
    except TimeoutError:
        pytest.fail(f"timed out waiting for {what}")


def broker_config(job_timeout_ms: int = 30_000) -> BrokerConfig:
    engine = EngineConfig(commit_interval_ms=2, job_timeout_ms=job_timeout_ms)
    return BrokerConfig(host="127.0.0.1", port=0, engine=engine)


@pytest.fixture
async def broker(store: BrokerStore) -> AsyncIterator[BrokerHandle]:
    async with run_broker_in_background(store.new(), broker_config()) as handle:
        yield handle


@pytest.fixture
async def client(broker: BrokerHandle) -> AsyncIterator[AsyncOsqueueClient]:
    async with AsyncOsqueueClient(broker.url) as c:
        yield c


@dataclass
class Journal:
    """What hooks and handlers saw, with an event per count reached."""

    claimed: list[JobContext[Any]] = field(default_factory=list)
    completed: list[tuple[str, Any]] = field(default_factory=list)
    failed: list[tuple[str, BaseException]] = field(default_factory=list)
    _waits: list[tuple[Callable[[], bool], asyncio.Event]] = field(default_factory=list)

    def on_claim(self, ctx: JobContext[Any]) -> None:
        self.claimed.append(ctx)
        self._check()

    async def on_complete(self, ctx: JobContext[Any], result: Any) -> None:
        self.completed.append((ctx.job_id, result))
        self._check()

    def on_failure(self, ctx: JobContext[Any], error: BaseException) -> None:
        self.failed.append((ctx.job_id, error))
        self._check()

    def when(self, condition: Callable[[], bool]) -> asyncio.Event:
        event = asyncio.Event()
        self._waits.append((condition, event))
        self._check()
        return event

    def _check(self) -> None:
        for condition, event in self._waits:
            if condition():
                event.set()

    def hooks(self) -> dict[str, Any]:
        return {
            "on_claim": self.on_claim,
            "on_complete": self.on_complete,
            "on_failure": self.on_failure,
        }


@pytest.fixture
async def start_worker(
    client: AsyncOsqueueClient,
) -> AsyncIterator[Callable[..., Awaitable[Worker]]]:
    """Start workers running in tasks; each is stopped on teardown."""
    running: list[tuple[Worker, asyncio.Task[None]]] = []

    async def start(handlers: Any, **kwargs: Any) -> Worker:
        kwargs.setdefault("poll_min_s", 0.01)
        kwargs.setdefault("poll_max_s", 0.05)
        kwargs.setdefault("heartbeat_interval_s", 0.1)
        kwargs.setdefault("shutdown_grace_s", 1.0)
        worker = Worker(kwargs.pop("client", client), handlers, **kwargs)
        task = asyncio.create_task(worker.run(install_signal_handlers=False))
        running.append((worker, task))
        return worker

    yield start
    for worker, task in running:
        await asyncio.wait_for(worker.stop(), WAIT_S)
        await task


# -- clients -----------------------------------------------------------------------------


async def test_async_round_trip(client: AsyncOsqueueClient) -> None:
    job_id = await client.submit({"n": 1}, type="email", max_attempts=5, priority=3)
    assert (await client.get_job(job_id))["status"] == "unclaimed"

    assert await client.claim("w1", types=["other"]) is None
    job = await client.claim("w1", types=["email"])
    assert job == ClaimedJob(job_id, {"n": 1}, "email", 1, 5, timeout_ms=30_000)
    await client.heartbeat(job_id, "w1", attempt=1)
    with pytest.raises(LeaseLostError):
        await client.heartbeat(job_id, "w2", attempt=1)
    with pytest.raises(LeaseLostError):
        await client.complete(job_id, "w1", attempt=2)
    await client.complete(job_id, "w1", attempt=1)

    with pytest.raises(JobNotFoundError):
        await client.get_job(job_id)
    stats = await client.stats()
    assert (stats["total"], stats["completedTotal"]) == (0, 1)


async def test_async_submit_variants(client: AsyncOsqueueClient) -> None:
    first = await client.submit_with_receipt({"v": 1}, idempotency_key="order-7")
    again = await client.submit_with_receipt({"v": 2}, idempotency_key="order-7")
    assert again == SubmitReceipt(first.job_id, duplicate=True) and not first.duplicate
    assert (await client.get_job(first.job_id))["payload"] == {"v": 1}

    delayed = await client.submit("later", delay_s=60)
    assert (await client.get_job(delayed))["runAt"] > 0

    results = await client.submit_batch(
        [JobSpec("a", type="t"), JobSpec("b", max_attempts=0), JobSpec("c", type="t")]
    )
    assert isinstance(results[0], SubmitReceipt) and isinstance(results[2], SubmitReceipt)
    assert isinstance(results[1], BrokerProtocolError)
    listed = await client.list_jobs()
    assert [j["payload"] for j in listed["jobs"]] == [{"v": 1}, "later", "a", "c"]

    with pytest.raises(BrokerProtocolError):
        await client.submit(1, max_attempts=0)


async def test_dead_letter_admin(client: AsyncOsqueueClient) -> None:
    job_id = await client.submit("p", type="t", max_attempts=1)
    job = await client.claim("w")
    assert job is not None
    await client.fail(job_id, "w", error="Boom: x", attempt=1, reason="failed")
    dead = await client.dead()
    assert [(j["id"], j["reason"], j["lastError"]) for j in dead["jobs"]] == [
        (job_id, "failed", "Boom: x")
    ]
    assert await client.requeue_dead([job_id]) == 1
    assert (await client.get_job(job_id))["attempts"] == 0
    job = await client.claim("w")
    assert job is not None
    await client.fail(job_id, "w", attempt=1)  # no attempts left: exhausted
    assert await client.purge_dead() == 1
    await client.submit("q")
    other = await client.claim("w")
    assert other is not None
    await client.cancel(other.job_id)
    with pytest.raises(LeaseLostError):
        await client.heartbeat(other.job_id, "w", attempt=1)


async def test_sync_round_trip(broker: BrokerHandle) -> None:
    def blocking_producer_and_consumer() -> tuple[str, ClaimedJob | None, dict[str, Any]]:
        with OsqueueClient(broker.url) as sync:
            job_id = sync.submit({"x": 1}, type="sync")
            job = sync.claim("sync-worker")
            assert job is not None
            sync.heartbeat(job.job_id, "sync-worker", attempt=job.attempts)
            sync.complete(job.job_id, "sync-worker", attempt=job.attempts)
            return job_id, job, sync.stats()

    # The broker serves on this loop, so the blocking client runs in a thread.
    job_id, job, stats = await asyncio.to_thread(blocking_producer_and_consumer)
    assert job == ClaimedJob(job_id, {"x": 1}, "sync", 1, 3, timeout_ms=30_000)
    assert stats["completedTotal"] == 1


# -- workers -----------------------------------------------------------------------------


class Greeting(BaseModel):
    name: str


async def test_worker_runs_async_and_sync_handlers_concurrently(
    client: AsyncOsqueueClient, start_worker: Callable[..., Awaitable[Worker]]
) -> None:
    journal = Journal()
    registry = JobRegistry()
    registry.register("greet", Greeting)
    running = 0
    peak = 0
    four_running = asyncio.Event()
    sync_threads: set[str] = set()

    @registry.handler("slow")
    async def slow(ctx: JobContext[Any]) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        if running == 4:
            four_running.set()
        # The first four jobs wait for each other: only possible when four run at once.
        await until(four_running, "four jobs running at once")
        running -= 1
        return int(ctx.payload)

    @registry.handler("greet")
    def greet(ctx: JobContext[Greeting]) -> str:
        sync_threads.add(threading.current_thread().name)
        return f"hello {ctx.payload.name}"

    n_slow, n_greet = 12, 6
    for i in range(n_slow):
        await client.submit(i, type="slow")
    for i in range(n_greet):
        await client.submit({"name": f"n{i}"}, type="greet")
    all_done = journal.when(lambda: len(journal.completed) == n_slow + n_greet)

    await start_worker(registry, concurrency=4, **journal.hooks())
    await until(all_done, "every job completed")

    assert peak == 4
    results = sorted(map(str, (r for _, r in journal.completed)))
    assert results == sorted([str(i) for i in range(n_slow)] + [f"hello n{i}" for i in range(6)])
    assert len(journal.claimed) == n_slow + n_greet and journal.failed == []
    assert {type(c.payload) for c in journal.claimed if c.type == "greet"} == {Greeting}
    assert sync_threads and threading.current_thread().name not in sync_threads
    stats = await client.stats()
    assert (stats["total"], stats["completedTotal"]) == (0, n_slow + n_greet)


async def test_free_slot_claims_at_once(
    client: AsyncOsqueueClient, start_worker: Callable[..., Awaitable[Worker]]
) -> None:
    # Long idle backoff: if a freed slot waited for the poll timer, 5 jobs would take > 5 s.
    journal = Journal()
    done = journal.when(lambda: len(journal.completed) == 5)
    for i in range(5):
        await client.submit(i)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await start_worker({"*": lambda ctx: ctx.payload}, concurrency=1, poll_min_s=2.0,
                       poll_max_s=4.0, **journal.hooks())  # fmt: skip
    await until(done, "five jobs completed one after another")
    assert loop.time() - started < 1.5


async def test_failing_handler_is_retried_then_dead(
    client: AsyncOsqueueClient, start_worker: Callable[..., Awaitable[Worker]]
) -> None:
    journal = Journal()
    attempts_seen: list[int] = []

    def flaky(ctx: JobContext[Any]) -> None:
        attempts_seen.append(ctx.attempt)
        raise ValueError(f"boom {ctx.attempt}")

    job_id = await client.submit({}, type="flaky", max_attempts=3)
    three_failures = journal.when(lambda: len(journal.failed) == 3)
    await start_worker(
        {"flaky": flaky},
        retry_policy=lambda ctx, exc: FailureAction(retry_delay_ms=20),
        **journal.hooks(),
    )
    await until(three_failures, "three failures")

    assert attempts_seen == [1, 2, 3]
    assert all(isinstance(err, ValueError) for _, err in journal.failed)
    job = await client.get_job(job_id)
    assert (job["status"], job["reason"], job["attempts"]) == ("dead", "exhausted", 3)
    assert job["lastError"] == "ValueError: boom 3"
    assert journal.completed == []


async def test_retry_policy_can_send_straight_to_dead(
    client: AsyncOsqueueClient, start_worker: Callable[..., Awaitable[Worker]]
) -> None:
    journal = Journal()
    failed = journal.when(lambda: len(journal.failed) == 1)

    def permanent(ctx: JobContext[Any]) -> None:
        raise PermissionError("no access")

    job_id = await client.submit({}, type="p", max_attempts=5)
    await start_worker(
        {"p": permanent},
        retry_policy=lambda ctx, exc: FailureAction(dead=isinstance(exc, PermissionError)),
        **journal.hooks(),
    )
    await until(failed, "the failure")
    job = await client.get_job(job_id)
    assert (job["status"], job["reason"], job["attempts"]) == ("dead", "failed", 1)


async def test_invalid_payload_goes_to_dead(
    client: AsyncOsqueueClient, start_worker: Callable[..., Awaitable[Worker]]
) -> None:
    journal = Journal()
    registry = JobRegistry()
    registry.register("greet", Greeting)
    called: list[Any] = []
    failed = journal.when(lambda: len(journal.failed) == 1)

    # The producer has no registry, so the bad payload reaches the queue.
    job_id = await client.submit({"nom": "x"}, type="greet", max_attempts=3)
    await start_worker({"greet": called.append}, registry=registry, **journal.hooks())
    await until(failed, "the invalid payload to be reported")

    assert called == []
    assert isinstance(journal.failed[0][1], BrokerProtocolError)
    job = await client.get_job(job_id)
    assert (job["status"], job["reason"], job["attempts"]) == ("dead", "invalid_payload", 1)
    assert job["lastError"].startswith("BrokerProtocolError: payload of job type 'greet'")
    assert "name: Field required" in job["lastError"]


async def test_cancelled_job_cancels_its_handler_without_a_report(
    client: AsyncOsqueueClient, start_worker: Callable[..., Awaitable[Worker]]
) -> None:
    journal = Journal()
    started, cancelled = asyncio.Event(), asyncio.Event()
    fail_calls: list[str] = []
    real_fail = client.fail

    async def spy_fail(job_id: str, *args: Any, **kwargs: Any) -> None:
        fail_calls.append(job_id)
        await real_fail(job_id, *args, **kwargs)

    client.fail = spy_fail  # type: ignore[method-assign]

    async def blocks(ctx: JobContext[Any]) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    job_id = await client.submit({}, type="block")
    await start_worker({"block": blocks}, heartbeat_interval_s=0.05, **journal.hooks())
    await until(started, "the handler to start")
    await client.cancel(job_id)
    await until(cancelled, "the handler to be cancelled")
    failed = journal.when(lambda: len(journal.failed) == 1)
    await until(failed, "the failure hook")

    assert isinstance(journal.failed[0][1], LeaseLostError)
    assert fail_calls == [] and journal.completed == []
    stats = await client.stats()
    assert (stats["total"], stats["completedTotal"], stats["dead"]) == (0, 0, 0)


async def test_expired_lease_is_fenced_by_attempt(store: BrokerStore) -> None:
    # Job timeout 1 s, heartbeats every 1.5 s: the first run's lease expires and the same
    # worker claims the job again (attempt 2). The first run's heartbeat carries attempt 1
    # and the same worker id: it must be refused (fenced by attempt) and its handler
    # cancelled, and only then does the second run finish and complete the job.
    async with (
        run_broker_in_background(store.new(), broker_config(job_timeout_ms=1000)) as broker,
        AsyncOsqueueClient(broker.url) as client,
    ):
        journal = Journal()
        first_cancelled = asyncio.Event()

        async def handler(ctx: JobContext[Any]) -> str:
            if ctx.attempt == 2:
                await until(first_cancelled, "the first run's handler to be cancelled")
                return "second"
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                first_cancelled.set()
                raise
            return "first"

        job_id = await client.submit({}, max_attempts=3)
        settled = journal.when(lambda: bool(journal.completed) and bool(journal.failed))
        worker = Worker(client, {"*": handler}, concurrency=2, heartbeat_interval_s=1.5,
                        poll_min_s=0.01, poll_max_s=0.05, **journal.hooks())  # fmt: skip
        task = asyncio.create_task(worker.run(install_signal_handlers=False))
        try:
            await until(settled, "the second run to complete and the first to be fenced")
        finally:
            await worker.stop()
            await task
        assert journal.completed == [(job_id, "second")]
        assert [(j, type(e)) for j, e in journal.failed] == [(job_id, LeaseLostError)]
        assert [c.attempt for c in journal.claimed] == [1, 2]
        assert (await client.stats())["completedTotal"] == 1


async def test_stop_lets_quick_jobs_finish_and_gives_back_the_rest(
    client: AsyncOsqueueClient,
) -> None:
    journal = Journal()
    quick_started, stuck_started, release_quick = asyncio.Event(), asyncio.Event(), asyncio.Event()
    claims_after_stop: list[str] = []
    stopping = False
    real_claim = client.claim

    async def spy_claim(*args: Any, **kwargs: Any) -> ClaimedJob | None:
        if stopping:
            claims_after_stop.append("claim")
        return await real_claim(*args, **kwargs)

    client.claim = spy_claim  # type: ignore[method-assign]

    async def quick(ctx: JobContext[Any]) -> str:
        quick_started.set()
        await until(release_quick, "the test to release the quick job")
        return "quick done"

    async def stuck(ctx: JobContext[Any]) -> None:
        stuck_started.set()
        await asyncio.Event().wait()

    quick_id = await client.submit({}, type="quick")
    stuck_id = await client.submit({}, type="stuck", max_attempts=3)
    worker = Worker(client, {"quick": quick, "stuck": stuck}, concurrency=2,
                    shutdown_grace_s=0.3, poll_min_s=0.01, poll_max_s=0.05,
                    **journal.hooks())  # fmt: skip
    task = asyncio.create_task(worker.run(install_signal_handlers=False))
    await until(quick_started, "the quick job")
    await until(stuck_started, "the stuck job")

    stopping = True
    stop = asyncio.create_task(worker.stop())
    release_quick.set()  # finishes inside the grace period
    await asyncio.wait_for(stop, WAIT_S)
    await task

    assert claims_after_stop == []
    assert journal.completed == [(quick_id, "quick done")]
    assert [(j, type(e)) for j, e in journal.failed] == [(stuck_id, WorkerExecutionError)]
    job = await client.get_job(stuck_id)
    assert (job["status"], job["attempts"], job.get("runAt")) == ("unclaimed", 1, None)
    assert "stopped before the job finished" in job["lastError"]
    again = await real_claim("another-worker")
    assert again is not None and (again.job_id, again.attempts) == (stuck_id, 2)


async def test_sigterm_stops_the_worker_and_gives_back_a_sync_job(
    client: AsyncOsqueueClient,
) -> None:
    if threading.current_thread() is not threading.main_thread():
        pytest.fail("signal handlers need the main thread")
    started = threading.Event()
    journal = Journal()

    def long_sync_job(ctx: JobContext[Any]) -> None:
        started.set()
        ctx.cancel_event.wait(WAIT_S)  # a cooperative sync handler

    job_id = await client.submit({}, max_attempts=2)
    worker = Worker(client, {"*": long_sync_job}, shutdown_grace_s=0.2, poll_min_s=0.01,
                    poll_max_s=0.05, **journal.hooks())  # fmt: skip
    task = asyncio.create_task(worker.run())
    await asyncio.wait_for(asyncio.to_thread(started.wait, WAIT_S), WAIT_S)
    assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    loop = asyncio.get_running_loop()
    begun = loop.time()
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(task, WAIT_S)

    assert loop.time() - begun < 0.2 + 1.0
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert [type(e) for _, e in journal.failed] == [WorkerExecutionError]
    job = await client.get_job(job_id)
    assert (job["status"], job["attempts"]) == ("unclaimed", 1)


async def test_a_hook_that_raises_does_not_change_the_outcome(
    client: AsyncOsqueueClient, start_worker: Callable[..., Awaitable[Worker]]
) -> None:
    done = asyncio.Event()

    def bad_hook(ctx: JobContext[Any], *rest: Any) -> None:
        raise RuntimeError("hook bug")

    async def handler(ctx: JobContext[Any]) -> None:
        return None

    async def on_complete(ctx: JobContext[Any], result: Any) -> None:
        done.set()
        raise OsqueueError("also a hook bug")

    job_id = await client.submit({})
    await start_worker({"*": handler}, on_claim=bad_hook, on_complete=on_complete)
    await until(done, "the job to complete")
    with pytest.raises(JobNotFoundError):
        await client.get_job(job_id)
    assert (await client.stats())["completedTotal"] == 1
