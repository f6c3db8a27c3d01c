"""The group-commit engine against the memory store with injected latency and faults."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import pytest

from osqueue.engine import Engine, EngineConfig
from osqueue.errors import BrokerLeadershipError, LeaseLostError, StorageBackendError
from osqueue.leadership import Leadership
from osqueue.model import decode_state, encode_state
from osqueue.state import QueueState, SubmitSpec
from osqueue.storage.base import STATE_KEY
from osqueue.storage.memory import MemoryStorage

BROKER_ID = "broker-engine-test"
ADDRESS = "127.0.0.1:1"


class ProbeStorage(MemoryStorage):
    """A memory store that watches the engine's writes and can hold, fail or lose them.

    * ``gate``: while not None, every write waits for this event before touching anything;
    * ``failing``: every write raises StorageBackendError before storing;
    * ``lose_replies``: that many writes store their bytes and then raise, as when the
      store's answer is lost on the way back.
    """

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.active = 0
        self.max_active = 0
        self.write_starts: list[float] = []
        self.written: list[bytes] = []
        self.write_started = asyncio.Event()
        self.gate: asyncio.Event | None = None
        self.failing = False
        self.lose_replies = 0

    async def write(self, key: str, data: bytes, expected_version: str) -> str:
        return await self._observe(lambda: MemoryStorage.write(self, key, data, expected_version))

    async def write_parts(self, key: str, parts: Sequence[bytes], expected_version: str) -> str:
        return await self._observe(
            lambda: MemoryStorage.write_parts(self, key, parts, expected_version)
        )

    async def create_if_not_exists(self, key: str, data: bytes) -> str:
        return await self._observe(lambda: MemoryStorage.create_if_not_exists(self, key, data))

    async def _observe(self, call: Callable[[], Awaitable[str]]) -> str:
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        self.write_starts.append(time.monotonic())
        self.write_started.set()
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.failing:
                raise StorageBackendError("injected write failure")
            version = await call()
            self.written.append(self.peek(STATE_KEY) or b"")
            if self.lose_replies:
                self.lose_replies -= 1
                raise StorageBackendError("injected: stored, but the reply was lost")
            return version
        finally:
            self.active -= 1

    def document(self) -> dict[str, Any]:
        return decode_state(self.peek(STATE_KEY) or b"")


EngineFactory = Callable[..., Awaitable[Engine]]


@pytest.fixture
async def make_engine() -> AsyncIterator[EngineFactory]:
    """Start leading engines on a given store; all are stopped at teardown."""
    started: list[tuple[Engine, ProbeStorage]] = []

    async def factory(storage: ProbeStorage, **config: Any) -> Engine:
        config.setdefault("broker_heartbeat_interval_ms", 60_000)
        config.setdefault("commit_interval_ms", 5)
        engine = Engine(storage, EngineConfig(**config))
        await Leadership(engine, ADDRESS, broker_id=BROKER_ID).acquire(wait=False)
        engine.start()
        started.append((engine, storage))
        return engine

    yield factory
    for engine, storage in started:
        storage.failing = False  # a test that failed half-way must not hang the stop
        if storage.gate is not None:
            storage.gate.set()
        await asyncio.wait_for(engine.stop(), 5)


def submit_op(payload: Any = None, **spec: Any) -> Callable[[QueueState, int], str]:
    """A submit whose job id is fixed outside the operation, as the broker does it."""
    job_id = str(uuid.uuid4())
    submit_spec = SubmitSpec(payload, **spec)
    return lambda state, now_ms: state.submit(submit_spec, job_id, now_ms).job_id


def fresh_id_submit_op() -> Callable[[QueueState, int], str]:
    """A submit that draws a new id each time it runs: applying it twice shows."""
    return lambda state, now_ms: state.submit(SubmitSpec(None), str(uuid.uuid4()), now_ms).job_id


def claim_op(worker: str) -> Callable[[QueueState, int], str | None]:
    def op(state: QueueState, now_ms: int) -> str | None:
        result = state.claim(worker, None, now_ms)
        return None if result is None else result.job_id

    return op


async def foreign_write(storage: MemoryStorage, **changes: Any) -> None:
    """Another writer changes the stored document behind the engine's back."""
    stored = await MemoryStorage.read(storage, STATE_KEY)
    assert stored is not None
    doc = decode_state(stored.data)
    doc.update(changes, commitId=uuid.uuid4().hex)
    await MemoryStorage.write(storage, STATE_KEY, encode_state(doc), stored.version)


async def poll_until(condition: Callable[[], bool], timeout_s: float, step_s: float = 0.01) -> None:
    """Wait for time to pass until ``condition`` holds; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(step_s)


# -- group commit -------------------------------------------------------------------------


async def test_exactly_one_write_in_flight_under_concurrent_load(
    make_engine: EngineFactory,
) -> None:
    storage = ProbeStorage(latency_ms=20)
    engine = await make_engine(storage, commit_interval_ms=0)
    writes_before = len(storage.written)

    async def client(i: int) -> list[str]:
        await asyncio.sleep(i % 20 / 1000)  # arrivals spread over the first writes
        return [await engine.execute(submit_op((i, n))) for n in range(3)]

    ids = [job_id for done in await asyncio.gather(*map(client, range(200))) for job_id in done]

    assert storage.max_active == 1
    assert len(set(ids)) == 600
    assert len(storage.document()["jobs"]) == 600
    # 600 operations against a 20 ms store: group commit makes a handful of writes.
    assert len(storage.written) - writes_before <= 20


async def test_no_acknowledgement_before_the_store_acknowledges(
    make_engine: EngineFactory,
) -> None:
    storage = ProbeStorage()
    engine = await make_engine(storage)
    storage.gate = asyncio.Event()
    storage.write_started.clear()

    task = asyncio.create_task(engine.execute(submit_op("held")))
    await storage.write_started.wait()
    await asyncio.sleep(0)  # give the task every chance to finish early
    assert not task.done()
    assert storage.document()["jobs"] == []

    storage.gate.set()
    job_id = await task
    assert [j["id"] for j in storage.document()["jobs"]] == [job_id]


async def test_a_batch_that_changes_nothing_causes_no_write(make_engine: EngineFactory) -> None:
    storage = ProbeStorage()
    engine = await make_engine(storage)
    writes = len(storage.written)

    results = await asyncio.gather(*(engine.execute(claim_op(f"w{i}")) for i in range(100)))

    assert results == [None] * 100
    assert len(storage.written) == writes
    assert engine.stats.writes == 0


async def test_operations_that_waited_for_a_write_but_changed_nothing_cause_no_write(
    make_engine: EngineFactory,
) -> None:
    storage = ProbeStorage()
    engine = await make_engine(storage)
    storage.gate = asyncio.Event()
    storage.write_started.clear()
    submit = asyncio.create_task(engine.execute(submit_op(delay_ms=60_000)))
    await storage.write_started.wait()
    writes = len(storage.write_starts)

    # Nothing is claimable, but the claims saw a state not yet durable: they wait.
    claims = [asyncio.create_task(engine.execute(claim_op(f"w{i}"))) for i in range(10)]
    await asyncio.sleep(0)
    assert not any(claim.done() for claim in claims)
    storage.gate.set()
    await submit
    assert await asyncio.gather(*claims) == [None] * 10
    assert engine.stats.batches_without_write == 1
    assert len(storage.write_starts) == writes


async def test_read_only_operations_wait_for_the_write_in_flight(
    make_engine: EngineFactory,
) -> None:
    """A claim that saw an uncommitted submit is answered only once that submit is durable."""
    storage = ProbeStorage()
    engine = await make_engine(storage)
    storage.gate = asyncio.Event()
    storage.write_started.clear()
    submit = asyncio.create_task(engine.execute(submit_op()))
    await storage.write_started.wait()

    claim = asyncio.create_task(engine.execute(claim_op("w1")))
    await asyncio.sleep(0)
    assert not claim.done()
    storage.gate.set()
    assert await claim == await submit


async def test_minimum_gap_between_write_starts(make_engine: EngineFactory) -> None:
    storage = ProbeStorage()
    engine = await make_engine(storage, commit_interval_ms=100)
    first = len(storage.write_starts)

    for i in range(5):
        await engine.execute(submit_op(i))

    starts = storage.write_starts[first - 1 :]  # the takeover write counts too
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert len(gaps) == 5
    assert min(gaps) >= 0.1 - 0.005


async def test_every_write_has_a_distinct_commit_id(make_engine: EngineFactory) -> None:
    storage = ProbeStorage()
    engine = await make_engine(storage)
    op = claim_op("w")
    await engine.execute(submit_op())
    await engine.execute(op)
    for _ in range(5):
        engine.request_write()  # writes of an otherwise unchanged document
        await engine.flush()
    storage.lose_replies = 1
    await engine.execute(submit_op())

    ids = [decode_state(data)["commitId"] for data in storage.written]
    assert len(ids) >= 8
    assert len(set(ids)) == len(ids)


# -- conflicts and fencing ------------------------------------------------------------


async def test_conflict_with_a_write_by_the_same_broker_replays_the_batch(
    make_engine: EngineFactory,
) -> None:
    storage = ProbeStorage()
    engine = await make_engine(storage)
    await engine.execute(submit_op("before"))
    await foreign_write(storage, operatorNote="kept")

    job_id = await engine.execute(submit_op("after"))

    assert engine.leader
    assert (engine.stats.conflicts, engine.stats.replays) == (1, 1)
    doc = storage.document()
    assert doc["operatorNote"] == "kept"
    assert [j["payload"] for j in doc["jobs"]] == ["before", "after"]
    assert doc["jobs"][1]["id"] == job_id


async def test_conflict_with_another_leader_fences_the_engine_for_good(
    make_engine: EngineFactory,
) -> None:
    """F07 at the engine: the old leader's write fails, it steps down and never writes."""
    storage = ProbeStorage()
    engine = await make_engine(
        storage, broker_heartbeat_interval_ms=50, job_timeout_ms=100, commit_interval_ms=5
    )
    await engine.execute(submit_op())
    assert await engine.execute(claim_op("w1")) is not None
    await foreign_write(storage, broker="b2:2", brokerId="broker-2", epoch=5)
    stored_after_takeover = storage.peek(STATE_KEY)

    with pytest.raises(BrokerLeadershipError) as caught:
        await engine.execute(submit_op("lost"))
    assert caught.value.leader == "b2:2"
    assert not engine.leader
    with pytest.raises(BrokerLeadershipError):
        await engine.execute(submit_op("refused"))

    # Leader heartbeats (every 50 ms) and the job's expiry (100 ms) would both write
    # if the engine still thought it led: give them time to try.
    writes = len(storage.write_starts)
    await asyncio.sleep(0.4)
    assert len(storage.write_starts) == writes
    assert storage.peek(STATE_KEY) == stored_after_takeover


async def test_lost_reply_is_recognised_by_commit_id_and_not_applied_twice(
    make_engine: EngineFactory,
) -> None:
    storage = ProbeStorage()
    engine = await make_engine(storage, retry_base_ms=1)
    storage.lose_replies = 1

    job_id = await engine.execute(fresh_id_submit_op())

    assert [j["id"] for j in storage.document()["jobs"]] == [job_id]
    assert engine.stats.replays == 0
    assert engine.leader


async def test_lost_reply_of_a_complete_is_answered_as_success(
    make_engine: EngineFactory,
) -> None:
    storage = ProbeStorage()
    engine = await make_engine(storage, retry_base_ms=1)
    await engine.execute(submit_op())
    job_id = await engine.execute(claim_op("w1"))
    assert job_id is not None
    storage.lose_replies = 1

    await engine.execute(lambda state, now_ms: state.complete(job_id, "w1", None))

    doc = storage.document()
    assert (doc["jobs"], doc["completedTotal"]) == ([], 1)


async def test_storage_failing_past_the_deadline_fails_the_batch_then_reloads(
    make_engine: EngineFactory,
) -> None:
    storage = ProbeStorage()
    engine = await make_engine(storage, retry_deadline_ms=200, retry_base_ms=5, retry_cap_ms=20)
    await engine.execute(submit_op("j"))
    storage.failing = True

    started = time.monotonic()
    with pytest.raises(StorageBackendError):
        await engine.execute(claim_op("w1"))
    assert 0.2 <= time.monotonic() - started < 2

    storage.failing = False
    reads = storage.reads
    # w1 was told its claim failed, so the job must still be there for w2.
    assert await engine.execute(claim_op("w2")) is not None
    assert storage.reads > reads  # reloaded before writing
    [job] = storage.document()["jobs"]
    assert (job["workerId"], job["attempts"]) == ("w2", 1)


async def test_lease_checks_after_a_failed_write_see_the_durable_state(
    make_engine: EngineFactory,
) -> None:
    storage = ProbeStorage()
    engine = await make_engine(storage, retry_deadline_ms=100, retry_base_ms=5, retry_cap_ms=20)
    await engine.execute(submit_op())
    job_id = await engine.execute(claim_op("w1"))
    assert job_id is not None
    storage.failing = True
    with pytest.raises(StorageBackendError):
        await engine.execute(lambda state, now_ms: state.complete(job_id, "w1", None))
    storage.failing = False

    # The failed complete never became durable: w1 still holds the job and may retry.
    await engine.execute(lambda state, now_ms: state.complete(job_id, "w1", None))
    assert storage.document()["completedTotal"] == 1
    with pytest.raises(LeaseLostError):
        await engine.execute(lambda state, now_ms: state.complete(job_id, "w1", None))


# -- timers -----------------------------------------------------------------------------


async def test_expiry_runs_on_its_own_timer(make_engine: EngineFactory) -> None:
    """F01 at the engine: nothing but the timer writes the expired job back."""
    storage = ProbeStorage()
    engine = await make_engine(storage, job_timeout_ms=300)
    await engine.execute(submit_op())
    job_id = await engine.execute(claim_op("w1"))
    claimed_at = time.monotonic()

    def requeued() -> bool:
        return storage.document()["jobs"][0]["status"] == "unclaimed"

    await poll_until(requeued, timeout_s=2)
    assert time.monotonic() - claimed_at >= 0.3 - 0.01
    [job] = storage.document()["jobs"]
    assert (job["id"], job["attempts"]) == (job_id, 1)
    assert "w1" in job["lastError"]


async def test_leader_heartbeat_writes_without_traffic(make_engine: EngineFactory) -> None:
    storage = ProbeStorage()
    engine = await make_engine(storage, broker_heartbeat_interval_ms=100)
    beat = storage.document()["brokerHeartbeat"]

    await poll_until(lambda: storage.document()["brokerHeartbeat"] > beat, timeout_s=1)
    assert storage.document()["brokerId"] == BROKER_ID
    assert engine.leader


async def test_stop_flushes_pending_operations(make_engine: EngineFactory) -> None:
    storage = ProbeStorage(latency_ms=20)
    engine = await make_engine(storage)
    pending = [asyncio.create_task(engine.execute(submit_op(i))) for i in range(10)]
    await asyncio.sleep(0)
    await engine.stop()
    ids = await asyncio.gather(*pending)
    assert {j["id"] for j in storage.document()["jobs"]} == set(ids)


async def test_minimum_gap_holds_for_the_write_after_a_conflict(
    make_engine: EngineFactory,
) -> None:
    storage = ProbeStorage()
    engine = await make_engine(storage, commit_interval_ms=100)
    await engine.execute(submit_op())
    await foreign_write(storage)
    first = len(storage.write_starts)

    await engine.execute(submit_op())

    conflicted, replayed = storage.write_starts[first:]
    assert engine.stats.conflicts == 1
    assert replayed - conflicted >= 0.1 - 0.005


async def test_a_refusal_based_on_a_write_in_flight_waits_for_that_write(
    make_engine: EngineFactory,
) -> None:
    """A duplicate complete is refused only once the first complete is durable; if the
    first one's write fails, the duplicate is judged again on the reloaded state."""
    storage = ProbeStorage()
    engine = await make_engine(storage, retry_deadline_ms=100, retry_base_ms=5, retry_cap_ms=20)
    await engine.execute(submit_op())
    job_id = await engine.execute(claim_op("w1"))
    assert job_id is not None

    def complete(state: QueueState, now_ms: int) -> None:
        state.complete(job_id, "w1", None)

    storage.gate = asyncio.Event()
    storage.write_started.clear()
    first = asyncio.create_task(engine.execute(complete))
    await storage.write_started.wait()
    duplicate = asyncio.create_task(engine.execute(complete))
    await asyncio.sleep(0)
    assert not duplicate.done()  # its refusal rests on a write not yet durable

    storage.failing = True
    storage.gate.set()
    with pytest.raises(StorageBackendError):
        await first
    storage.failing = False
    storage.gate = None
    await duplicate  # judged again on the durable state: w1 still held the job
    assert storage.document()["completedTotal"] == 1


async def test_a_refusal_waits_for_the_write_then_stands(make_engine: EngineFactory) -> None:
    storage = ProbeStorage()
    engine = await make_engine(storage)
    await engine.execute(submit_op())
    job_id = await engine.execute(claim_op("w1"))
    assert job_id is not None
    storage.gate = asyncio.Event()
    storage.write_started.clear()
    first = asyncio.create_task(
        engine.execute(lambda state, now_ms: state.complete(job_id, "w1", None))
    )
    await storage.write_started.wait()
    duplicate = asyncio.create_task(
        engine.execute(lambda state, now_ms: state.complete(job_id, "w1", None))
    )
    await asyncio.sleep(0)
    assert not duplicate.done()
    storage.gate.set()
    await first
    with pytest.raises(LeaseLostError):
        await duplicate


async def test_requests_sent_on_the_answer_to_a_write_join_the_next_write(
    make_engine: EngineFactory,
) -> None:
    """A client answered by write 1 that submits again at once rides in write 2, with the
    submit that waited during write 1, instead of waiting for a write 3 of its own."""
    storage = ProbeStorage()
    engine = await make_engine(storage, commit_interval_ms=0)
    storage.gate = asyncio.Event()
    storage.write_started.clear()

    async def client() -> str:
        await engine.execute(submit_op("first"))
        return await engine.execute(submit_op("next"))  # sent the moment it is answered

    chained = asyncio.create_task(client())
    await storage.write_started.wait()
    waiting = asyncio.create_task(engine.execute(submit_op("waited")))
    await asyncio.sleep(0)  # the waiting submit joins the forming batch
    writes_before = len(storage.written)
    storage.gate.set()
    await asyncio.gather(chained, waiting)

    second = decode_state(storage.written[writes_before + 1])
    assert len(storage.written) == writes_before + 2
    assert [j["payload"] for j in second["jobs"]] == ["first", "waited", "next"]
