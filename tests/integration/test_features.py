"""What users of a job queue expect, from the Python clients and the worker, over every
transport: delayed and scheduled jobs, priorities, retries with backoff, dead letters,
idempotent submits, batch submits, waiting claims, job lookup and cancellation.

Each test that takes ``client`` runs once per transport (``rest``, ``ws``, ``connect``)
against a real broker on loopback, with the memory store.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from osqueue.broker.server import BrokerConfig, BrokerHandle, run_broker_in_background
from osqueue.client import AsyncOsqueueClient, JobSpec, OsqueueClient, SubmitReceipt
from osqueue.client.connect import ConnectTransport
from osqueue.client.rest import RestTransport
from osqueue.client.transport import Transport
from osqueue.client.ws import WebSocketTransport
from osqueue.engine import EngineConfig
from osqueue.errors import (
    BrokerProtocolError,
    JobNotFoundError,
    LeaseLostError,
    TransportConnectionError,
)
from osqueue.retries import ExponentialBackoff, FixedBackoff
from osqueue.state import QueueState
from osqueue.storage.memory import MemoryStorage
from osqueue.worker import JobContext, Worker

TRANSPORTS = ["rest", "ws", "connect"]
WAIT_S = 10.0  # upper bound on any wait; the tests normally finish in milliseconds
#: A job due at runAt reaches a waiting claim within this (the claims wait 20 s or more).
LATE_MS = 3_000

StartWorker = Callable[..., Awaitable[Worker]]
MakeServer = Callable[..., Awaitable[BrokerHandle]]


def now_ms() -> int:
    """The broker's clock: it runs in this process."""
    return int(time.time() * 1000)


async def eventually(
    check: Callable[[], bool | Awaitable[bool]], what: str, timeout_s: float = WAIT_S
) -> None:
    """Poll an observable condition (a function or a coroutine function), failing the test
    after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        holds = check()
        if holds if isinstance(holds, bool) else await holds:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def make_transport(name: str, url: str) -> Transport:
    if name == "rest":
        return RestTransport(url, timeout_s=WAIT_S)
    if name == "ws":
        return WebSocketTransport(url, timeout_s=WAIT_S)
    return ConnectTransport(url, "proto", timeout_s=WAIT_S)


def config(**engine: Any) -> BrokerConfig:
    # No leader heartbeat during a test, so the write counter moves only for requests.
    settings: dict[str, Any] = {"commit_interval_ms": 2, "broker_heartbeat_interval_ms": 600_000}
    return BrokerConfig(host="127.0.0.1", port=0, engine=EngineConfig(**{**settings, **engine}))


@pytest.fixture
async def make_server() -> AsyncIterator[MakeServer]:
    """Start brokers with engine settings of the test's choosing; stopped on teardown."""
    handles: list[Any] = []

    async def make(**engine: Any) -> BrokerHandle:
        context = run_broker_in_background(MemoryStorage(), config(**engine))
        handles.append(context)
        return await context.__aenter__()

    yield make
    for context in reversed(handles):
        await context.__aexit__(None, None, None)


@pytest.fixture
async def server(make_server: MakeServer) -> BrokerHandle:
    return await make_server()


@pytest.fixture(params=TRANSPORTS)
def transport_name(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
async def client(server: BrokerHandle, transport_name: str) -> AsyncIterator[AsyncOsqueueClient]:
    async with AsyncOsqueueClient(server.url, transport=transport_name, timeout_s=WAIT_S) as c:
        yield c


@pytest.fixture
async def start_worker(client: AsyncOsqueueClient) -> AsyncIterator[StartWorker]:
    """Start workers on ``client`` in tasks; each is stopped on teardown."""
    running: list[tuple[Worker, asyncio.Task[None]]] = []

    async def start(handlers: Any, **kwargs: Any) -> Worker:
        kwargs.setdefault("poll_min_s", 0.01)
        kwargs.setdefault("poll_max_s", 0.05)
        kwargs.setdefault("heartbeat_interval_s", 0.05)
        kwargs.setdefault("shutdown_grace_s", 1.0)
        worker = Worker(client, handlers, **kwargs)
        running.append((worker, asyncio.create_task(worker.run(install_signal_handlers=False))))
        return worker

    yield start
    for worker, task in running:
        await asyncio.wait_for(worker.stop(), WAIT_S)
        await task


async def bury(client: AsyncOsqueueClient, job_type: str, *payloads: Any) -> list[str]:
    """Submit jobs with one attempt and fail each: they end in dead, reason exhausted."""
    ids = []
    for payload in payloads:
        job_id = await client.submit(payload, type=job_type, max_attempts=1)
        claimed = await client.claim("burier", [job_type])
        assert claimed is not None and claimed.job_id == job_id
        await client.fail(job_id, "burier", f"failed {payload}", attempt=1)
        ids.append(job_id)
    return ids


# -- 1. delayed and scheduled jobs ---------------------------------------------------------


async def test_delayed_job_is_claimable_only_when_due(client: AsyncOsqueueClient) -> None:
    before = now_ms()
    job_id = await client.submit({"n": 1}, delay_ms=400)
    after = now_ms()
    job = await client.get_job(job_id)
    assert before + 400 <= job["runAt"] <= after + 400
    assert job["status"] == "unclaimed"

    assert await client.claim("w") is None
    claimed = await client.claim("w", wait_ms=20_000)  # the waiting claim wakes when due
    assert claimed is not None and claimed.job_id == job_id and claimed.attempts == 1
    assert job["runAt"] <= now_ms() < job["runAt"] + LATE_MS
    assert "runAt" not in await client.get_job(job_id), "a claim clears runAt"


async def test_scheduled_job_runs_at_its_time_and_past_times_run_now(
    client: AsyncOsqueueClient,
) -> None:
    run_at = datetime.now(UTC) + timedelta(milliseconds=300)
    scheduled = await client.submit("later", run_at=run_at)
    assert (await client.get_job(scheduled))["runAt"] == int(run_at.timestamp() * 1000)
    overdue = await client.submit("overdue", run_at=now_ms() - 60_000)
    assert "runAt" not in await client.get_job(overdue)

    first = await client.claim("w")
    assert first is not None and first.job_id == overdue
    assert await client.claim("w") is None
    second = await client.claim("w", wait_ms=20_000)
    assert second is not None and second.job_id == scheduled
    assert 0 <= now_ms() - int(run_at.timestamp() * 1000) < LATE_MS

    with pytest.raises(BrokerProtocolError, match="timezone"):
        await client.submit("naive", run_at=datetime.now())
    with pytest.raises(BrokerProtocolError, match="not both"):
        await client.submit("twice", delay_s=1, delay_ms=1000)


async def test_idle_worker_long_poll_wakes_when_a_delayed_job_falls_due(
    client: AsyncOsqueueClient, server: BrokerHandle, start_worker: StartWorker
) -> None:
    ran_at: list[int] = []

    async def record(ctx: JobContext[Any]) -> None:
        ran_at.append(now_ms())

    # The idle worker's claim waits at the broker for up to 30 s; only the broker waking
    # it at runAt makes the job run on time.
    await start_worker({"due": record}, claim_wait_ms=30_000, poll_max_s=30)
    service = server.broker.service
    await eventually(lambda: service.waiting_claims == 1, "the worker's claim to wait")
    job_id = await client.submit({}, type="due", delay_ms=300)
    run_at = (await client.get_job(job_id))["runAt"]
    await eventually(lambda: len(ran_at) == 1, "the delayed job to run")
    assert run_at <= ran_at[0] < run_at + LATE_MS


# -- 2. priorities -------------------------------------------------------------------------


async def test_higher_priority_first_then_submission_order(client: AsyncOsqueueClient) -> None:
    specs = [
        JobSpec("a"),
        JobSpec("b", priority=5),
        JobSpec("c", priority=5, type="x"),
        JobSpec("d", priority=-1),
        JobSpec("e"),
        JobSpec("f", priority=5),
        JobSpec("g", priority=99, delay_ms=60_000),  # not due: does not jump the queue
    ]
    await client.submit_batch(specs)
    order = []
    while (job := await client.claim("w")) is not None:
        order.append(job.payload)
    assert order == ["b", "c", "f", "a", "e", "d"]

    await client.submit_batch([JobSpec(n, type=t, priority=p) for n, t, p in [
        ("low-x", "x", 0), ("low-y", "y", 0), ("high-y", "y", 3), ("high-z", "z", 9),
    ]])  # fmt: skip
    typed = [await client.claim("w", ["x", "y"]) for _ in range(4)]
    assert [j.payload if j else None for j in typed] == ["high-y", "low-x", "low-y", None]


async def test_f14_type_filter_does_not_pay_for_other_types_backlog(
    make_server: MakeServer, transport_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """F14: 10,000 jobs of type A, then one of B. A claim for ["B"] looks at as many queue
    entries as it does behind a backlog of 10 A jobs; ["C"] is empty; no filter (and an
    empty filter) gets the oldest A."""
    looked_at = 0
    is_live = QueueState._is_live

    def counting(self: QueueState, job_id: str, gen: int) -> bool:
        nonlocal looked_at
        looked_at += 1
        return is_live(self, job_id, gen)

    monkeypatch.setattr(QueueState, "_is_live", counting)

    async def claim_b_behind(backlog: int) -> tuple[AsyncOsqueueClient, list[str]]:
        nonlocal looked_at
        server = await make_server()
        client = AsyncOsqueueClient(server.url, transport=transport_name, timeout_s=WAIT_S)
        receipts = await client.submit_batch([JobSpec(i, type="A") for i in range(backlog)])
        await client.submit("b", type="B")
        looked_at = 0
        claimed = await client.claim("w", ["B"])
        assert claimed is not None and claimed.payload == "b"
        assert looked_at == 1, "only the head of B's queue"
        return client, [r.job_id for r in receipts if isinstance(r, SubmitReceipt)]

    small, _ = await claim_b_behind(10)
    await small.close()
    client, a_ids = await claim_b_behind(10_000)
    try:
        assert len(a_ids) == 10_000
        assert await client.claim("w", ["C"]) is None
        oldest = await client.claim("w")
        assert oldest is not None and (oldest.job_id, oldest.payload) == (a_ids[0], 0)
        next_oldest = await client.claim("w", [])
        assert next_oldest is not None and next_oldest.job_id == a_ids[1]
    finally:
        await client.close()


# -- 3. retries ------------------------------------------------------------------------------


async def test_max_attempts_per_job(client: AsyncOsqueueClient, start_worker: StartWorker) -> None:
    runs: dict[str, list[int]] = {}

    def always_fails(ctx: JobContext[Any]) -> None:
        runs.setdefault(ctx.payload, []).append(ctx.attempt)
        raise RuntimeError(f"attempt {ctx.attempt}")

    twice = await client.submit("twice", type="f", max_attempts=2)
    four = await client.submit("four", type="f", max_attempts=4)
    await start_worker({"f": always_fails}, retry_policy=FixedBackoff(0))

    async def both_dead() -> bool:
        return (await client.stats())["dead"] == 2

    await eventually(both_dead, "both jobs to end in dead")
    assert runs == {"twice": [1, 2], "four": [1, 2, 3, 4]}
    for job_id, attempts in ((twice, 2), (four, 4)):
        job = await client.get_job(job_id)
        assert (job["status"], job["reason"], job["attempts"]) == ("dead", "exhausted", attempts)
        assert job["lastError"] == f"RuntimeError: attempt {attempts}"


async def test_retry_policy_per_job_type(
    client: AsyncOsqueueClient, start_worker: StartWorker
) -> None:
    """Each type's policy picks the delay the worker sends, and the broker holds the job
    back that long: exponential 100, 200, then capped at 300 ms; fixed 0 for the rest."""
    sent: list[tuple[str, int | None]] = []
    real_fail = client.fail

    async def spy_fail(job_id: str, worker_id: str, error: str | None = None,
                       retry_delay_ms: int | None = None, *args: Any) -> None:  # fmt: skip
        sent.append((error or "", retry_delay_ms))
        await real_fail(job_id, worker_id, error, retry_delay_ms, *args)

    client.fail = spy_fail  # type: ignore[method-assign]
    ran_at: dict[tuple[str, int], int] = {}

    def fails(ctx: JobContext[Any]) -> None:
        ran_at[ctx.payload, ctx.attempt] = now_ms()
        raise ValueError(f"{ctx.payload} {ctx.attempt}")

    await client.submit("resize", type="resize", max_attempts=4)
    await client.submit("email", type="email", max_attempts=3)
    await start_worker(
        {"resize": fails, "email": fails},
        retry_policy=FixedBackoff(0),
        retry_policies={"resize": ExponentialBackoff(base_s=0.1, cap_s=0.3, jitter=0)},
    )
    await eventually(lambda: len(sent) == 7, "seven failures")

    by_job = {
        job: [delay for error, delay in sent if error.startswith(f"ValueError: {job}")]
        for job in ("resize", "email")
    }
    assert by_job == {"resize": [100, 200, 300, 300], "email": [0, 0, 0]}
    for attempt, delay in ((1, 100), (2, 200), (3, 300)):
        waited = ran_at["resize", attempt + 1] - ran_at["resize", attempt]
        assert waited >= delay, f"attempt {attempt + 1} ran {waited} ms after, not {delay}"


async def test_fail_with_a_retry_delay_and_the_brokers_default_backoff(
    client: AsyncOsqueueClient,
) -> None:
    job_id = await client.submit("j", max_attempts=5)
    await client.claim("w")
    before = now_ms()
    await client.fail(job_id, "w", "try later", retry_delay_ms=250, attempt=1)
    after = now_ms()
    job = await client.get_job(job_id)
    assert (job["status"], job["lastError"], job["attempts"]) == ("unclaimed", "try later", 1)
    assert before + 250 <= job["runAt"] <= after + 250
    assert await client.claim("w") is None
    again = await client.claim("w", wait_ms=20_000)
    assert again is not None and again.attempts == 2
    assert job["runAt"] <= now_ms() < job["runAt"] + LATE_MS

    # No delay given: the broker's backoff, 1 s doubling per attempt, up to half jitter.
    before = now_ms()
    await client.fail(job_id, "w", "boom", attempt=2)
    after = now_ms()
    run_at = (await client.get_job(job_id))["runAt"]
    assert before + 1_000 <= run_at <= after + 2_000


# -- 4. dead letters -------------------------------------------------------------------------


async def test_dead_letters_list_inspect_requeue_and_purge(client: AsyncOsqueueClient) -> None:
    a, b = await bury(client, "x", "a", "b")
    c, d = await bury(client, "y", "c", "d")
    e = await client.submit("e", type="z", max_attempts=3)
    await client.claim("w", ["z"])
    await client.fail(e, "w", "permanent", reason="failed")

    stats = await client.stats()
    assert (stats["dead"], stats["deadTotal"], stats["total"]) == (5, 5, 0)
    listed = await client.dead()
    assert [j["id"] for j in listed["jobs"]] == [a, b, c, d, e]
    assert [j["reason"] for j in listed["jobs"]] == ["exhausted"] * 4 + ["failed"]
    job = await client.get_job(a)
    assert (job["status"], job["payload"], job["lastError"]) == ("dead", "a", "failed a")
    assert job["deadAt"] >= job["createdAt"] and job["attempts"] == 1

    assert await client.requeue_dead([a]) == 1
    back = await client.get_job(a)
    assert (back["status"], back["attempts"], back["payload"]) == ("unclaimed", 0, "a")
    assert await client.requeue_dead(type="y") == 2
    assert await client.requeue_dead([b], type="y") == 0, "both filters must match"
    assert await client.requeue_dead() == 2
    assert (await client.dead())["jobs"] == []
    claimed = [await client.claim("w") for _ in range(5)]
    assert sorted(j.payload for j in claimed if j) == ["a", "b", "c", "d", "e"]
    assert {j.attempts for j in claimed if j} == {1}

    await client.fail(a, "w", "again", attempt=1, reason="failed")
    await client.fail(b, "w", "again", attempt=1, reason="failed")
    assert await client.purge_dead() == 2
    stats = await client.stats()
    assert (stats["dead"], stats["deadTotal"], stats["inProgress"]) == (0, 7, 3)
    with pytest.raises(JobNotFoundError):
        await client.get_job(a)


async def test_dead_letters_are_bounded(make_server: MakeServer, transport_name: str) -> None:
    server = await make_server(dead_limit=3)
    async with AsyncOsqueueClient(server.url, transport=transport_name) as client:
        ids = await bury(client, "t", *range(5))
        listed = await client.dead()
        assert [j["id"] for j in listed["jobs"]] == ids[2:], "the oldest dropped first"
        assert listed["deadTotal"] == 5
        assert (await client.stats())["dead"] == 3
        with pytest.raises(JobNotFoundError):
            await client.get_job(ids[0])


# -- 5. idempotent submits (F15) -------------------------------------------------------------


async def test_same_key_twice_keeps_the_first_job(client: AsyncOsqueueClient) -> None:
    first = await client.submit_with_receipt({"v": 1}, type="t", idempotency_key="order-1")
    again = await client.submit_with_receipt({"v": 2}, type="u", priority=9,
                                             idempotency_key="order-1")  # fmt: skip
    assert first == SubmitReceipt(first.job_id, duplicate=False)
    assert again == SubmitReceipt(first.job_id, duplicate=True)
    job = await client.get_job(first.job_id)
    assert (job["payload"], job["type"], job["idempotencyKey"]) == ({"v": 1}, "t", "order-1")
    assert "priority" not in job
    assert (await client.stats())["total"] == 1

    # Within the window the key still names the job after it completed.
    await client.claim("w")
    await client.complete(first.job_id, "w")
    late = await client.submit_with_receipt({"v": 3}, idempotency_key="order-1")
    assert late == SubmitReceipt(first.job_id, duplicate=True)
    assert (await client.stats())["total"] == 0


async def test_twenty_concurrent_submits_with_one_key_make_one_job(
    client: AsyncOsqueueClient,
) -> None:
    receipts = await asyncio.gather(
        *(client.submit_with_receipt({"n": n}, idempotency_key="k") for n in range(20))
    )
    assert len({r.job_id for r in receipts}) == 1
    originals = [n for n, r in enumerate(receipts) if not r.duplicate]
    assert len(originals) == 1
    listing = await client.list_jobs()
    assert listing["total"] == 1
    assert listing["jobs"][0]["payload"] == {"n": originals[0]}


class LoseFirstReply:
    """A transport whose first submit reaches the broker but whose reply is lost."""

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self.calls: list[str] = []

    async def call(self, method: str, params: dict[str, Any]) -> Any:
        self.calls.append(method)
        answer = await self.inner.call(method, params)
        if self.calls.count("submitJob") == 1 and method == "submitJob":
            raise TransportConnectionError("connection reset before the reply", request_sent=True)
        return answer

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_committed_submit_whose_reply_is_lost_is_retried_into_one_job(
    server: BrokerHandle, transport_name: str
) -> None:
    keyed = LoseFirstReply(make_transport(transport_name, server.url))
    async with AsyncOsqueueClient(server.url, transport=keyed) as client:
        receipt = await client.submit_with_receipt({"order": 7}, idempotency_key="order-7")
        assert keyed.calls == ["submitJob", "submitJob"], "the client sent it again"
        assert receipt.duplicate, "the retry found the job its lost attempt made"
        listing = await client.list_jobs()
        assert [j["id"] for j in listing["jobs"]] == [receipt.job_id]
        assert listing["jobs"][0]["payload"] == {"order": 7}

    # Without a key of the caller's, the client makes one up: the retry is just as safe.
    auto = LoseFirstReply(make_transport(transport_name, server.url))
    async with AsyncOsqueueClient(server.url, transport=auto) as client:
        receipt = await client.submit_with_receipt({"order": 8})
        assert auto.calls == ["submitJob", "submitJob"]
        assert not receipt.duplicate, "one submit, as far as the caller knows"
        assert (await client.stats())["total"] == 2

    # With keys turned off the client cannot know whether the job was made: no resend.
    unkeyed = LoseFirstReply(make_transport(transport_name, server.url))
    async with AsyncOsqueueClient(server.url, transport=unkeyed, auto_idempotency=False) as client:
        with pytest.raises(TransportConnectionError):
            await client.submit({"order": 9})
        assert unkeyed.calls == ["submitJob"]
        assert (await client.stats())["total"] == 3


async def test_idempotency_keys_expire_after_the_retention_window(
    make_server: MakeServer, transport_name: str
) -> None:
    server = await make_server(idempotency_retention_ms=300)
    async with AsyncOsqueueClient(server.url, transport=transport_name) as client:
        first = await client.submit_with_receipt("first", idempotency_key="k")
        assert (await client.submit_with_receipt("dup", idempotency_key="k")).duplicate
        expires_at = server.engine.state.idempotency["k"][1]
        assert first.job_id == server.engine.state.idempotency["k"][0]
        await eventually(lambda: now_ms() > expires_at, "the key's window to pass")
        later = await client.submit_with_receipt("later", idempotency_key="k")
        assert not later.duplicate and later.job_id != first.job_id
        assert server.engine.state.idempotency["k"][0] == later.job_id
        assert (await client.stats())["total"] == 2


# -- 6. batch submits ------------------------------------------------------------------------


async def test_batch_is_one_write_and_refuses_jobs_one_by_one(
    client: AsyncOsqueueClient, server: BrokerHandle
) -> None:
    known = await client.submit("known", idempotency_key="known")
    writes = server.engine.stats.writes
    results = await client.submit_batch([
        JobSpec({"n": 1}, type="a", priority=2),
        JobSpec({"n": 2}, max_attempts=0),
        JobSpec({"n": 3}, type="b", delay_ms=60_000, max_attempts=7),
        JobSpec({"n": 4}, type="t" * 1000),
        JobSpec("dup", idempotency_key="known"),
    ])  # fmt: skip
    assert server.engine.stats.writes - writes == 1, "the whole batch is one durable write"

    ok_a, bad_attempts, ok_b, bad_type, dup = results
    assert isinstance(ok_a, SubmitReceipt) and isinstance(ok_b, SubmitReceipt)
    assert isinstance(bad_attempts, BrokerProtocolError) and "maxAttempts" in str(bad_attempts)
    assert isinstance(bad_type, BrokerProtocolError) and "type" in str(bad_type)
    assert dup == SubmitReceipt(known, duplicate=True)
    b = await client.get_job(ok_b.job_id)
    assert (b["maxAttempts"], b["type"], b["runAt"] > b["createdAt"]) == (7, "b", True)
    assert (await client.get_job(ok_a.job_id))["priority"] == 2
    assert (await client.stats())["total"] == 3
    assert await client.submit_batch([]) == []


async def test_sync_client_does_the_same(server: BrokerHandle, transport_name: str) -> None:
    def blocking() -> None:
        with OsqueueClient(server.url, transport=transport_name) as sync:
            receipts = sync.submit_batch([JobSpec("low"), JobSpec("high", priority=1)])
            assert all(isinstance(r, SubmitReceipt) for r in receipts)
            later = sync.submit("later", delay_s=60, idempotency_key="s")
            assert sync.submit_with_receipt("x", idempotency_key="s").job_id == later
            job = sync.claim("w", wait_ms=100)
            assert job is not None and job.payload == "high"
            sync.fail(job.job_id, "w", "bad", attempt=1, reason="failed")
            assert sync.get_job(job.job_id)["status"] == "dead"
            assert [j["id"] for j in sync.dead()["jobs"]] == [job.job_id]
            assert sync.requeue_dead([job.job_id]) == 1
            sync.cancel(later)
            with pytest.raises(JobNotFoundError):
                sync.get_job(later)
            assert sync.purge_dead() == 0
            assert sync.stats()["total"] == 2

    # The broker serves on this loop, so the blocking client runs in a thread.
    await asyncio.to_thread(blocking)


# -- 7. waiting claims (F13) -----------------------------------------------------------------


async def test_f13_waiting_claims_cost_no_writes_and_one_gets_the_job(
    server: BrokerHandle, transport_name: str
) -> None:
    service = server.broker.service
    clients = [AsyncOsqueueClient(server.url, transport=transport_name) for _ in range(20)]
    claims = [asyncio.create_task(c.claim(f"w{i}", wait_ms=30_000)) for i, c in enumerate(clients)]
    try:
        await eventually(lambda: service.waiting_claims == 20, "20 waiting claims")
        writes = server.engine.stats.writes
        async with AsyncOsqueueClient(server.url) as producer:
            job_id = await producer.submit({"n": 1})
            done, _ = await asyncio.wait(
                claims, timeout=WAIT_S, return_when=asyncio.FIRST_COMPLETED
            )
            assert [t.result().job_id for t in done if t.result()] == [job_id]
            await eventually(lambda: service.waiting_claims == 19, "the others to wait again")
            assert server.engine.stats.writes - writes == 2, "the submit and the claim only"

            # Clients that go away take their waiting claims with them.
            for task in claims:
                task.cancel()
            await asyncio.gather(*claims, return_exceptions=True)
            for gone in clients:
                await gone.close()
            await eventually(lambda: service.waiting_claims == 0, "the claims to be released", 3)
            later = await producer.submit({"n": 2})
            claimed = await producer.claim("alive")
            assert claimed is not None and claimed.job_id == later
            assert server.engine.stats.writes - writes == 4
    finally:
        for task in claims:
            task.cancel()
        for gone in clients:
            await gone.close()


# -- 8. lookup and cancellation --------------------------------------------------------------


async def test_lookup_and_cancel_with_a_running_worker(
    client: AsyncOsqueueClient, start_worker: StartWorker
) -> None:
    started: dict[str, JobContext[Any]] = {}
    cancelled: set[str] = set()
    failures: list[tuple[str, BaseException]] = []
    completed: list[str] = []

    async def blocks_async(ctx: JobContext[Any]) -> None:
        started[ctx.job_id] = ctx
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.add(ctx.job_id)
            raise

    def blocks_sync(ctx: JobContext[Any]) -> None:
        started[ctx.job_id] = ctx
        if ctx.cancel_event.wait(WAIT_S):
            cancelled.add(ctx.job_id)

    queued = await client.submit({"q": 1}, type="nobody-handles-this")
    running_async = await client.submit({"r": 1}, type="async")
    running_sync = await client.submit({"r": 2}, type="sync")
    worker = await start_worker(
        {"async": blocks_async, "sync": blocks_sync},
        on_failure=lambda ctx, exc: failures.append((ctx.job_id, exc)),
        on_complete=lambda ctx, result: completed.append(ctx.job_id),
    )
    await eventually(lambda: len(started) == 2, "both handlers to start")

    job = await client.get_job(queued)
    assert (job["status"], job["attempts"], job["payload"]) == ("unclaimed", 0, {"q": 1})
    for job_id in (running_async, running_sync):
        job = await client.get_job(job_id)
        assert (job["status"], job["workerId"], job["attempts"]) == (
            "in_progress", worker.worker_id, 1,
        )  # fmt: skip

    await client.cancel(queued)
    await client.cancel(running_async)
    await client.cancel(running_sync)
    await eventually(lambda: len(failures) == 2, "the worker to learn of both cancellations")
    # The sync handler notices its cancel_event in its own thread, which the worker does
    # not wait for before reporting the lost lease.
    await eventually(lambda: len(cancelled) == 2, "both handlers to see the cancellation")
    assert cancelled == {running_async, running_sync}
    assert completed == []
    assert all(isinstance(exc, LeaseLostError) for _, exc in failures)
    assert worker.in_flight == 0
    for job_id in (queued, running_async, running_sync):
        with pytest.raises(JobNotFoundError):
            await client.get_job(job_id)
    stats = await client.stats()
    assert (stats["total"], stats["completedTotal"], stats["dead"]) == (0, 0, 0)
    with pytest.raises(JobNotFoundError) as unknown:
        await client.cancel(queued)
    assert unknown.value.fields["jobId"] == queued
