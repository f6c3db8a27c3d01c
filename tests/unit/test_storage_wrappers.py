"""ThrottledStorage and FaultyStorage, over the memory store (F10 and F12 at storage level)."""

from __future__ import annotations

import asyncio
import time

import pytest

from osqueue.errors import CASConflictError, StorageBackendError
from osqueue.storage import FaultyStorage, MemoryStorage, ThrottledStorage, Versioned

KEY = "queue.json"


class FakeTime:
    """A clock and a sleep for the wrappers: sleeping moves the clock, instantly."""

    def __init__(self) -> None:
        self.now_s = 1_000.0
        self.sleeps_s: list[float] = []

    def clock(self) -> float:
        return self.now_s

    async def sleep(self, seconds: float) -> None:
        self.sleeps_s.append(seconds)
        self.now_s += seconds
        await asyncio.sleep(0)


class FrozenTime(FakeTime):
    """Sleeping records the wait but the clock stands still (to inspect reservations)."""

    async def sleep(self, seconds: float) -> None:
        self.sleeps_s.append(seconds)
        await asyncio.sleep(0)


def throttled(inner: object = None, *, fake: FakeTime, **limits: int) -> ThrottledStorage:
    store = inner if inner is not None else MemoryStorage()
    assert isinstance(store, (MemoryStorage, FaultyStorage))
    return ThrottledStorage(store, **limits, clock=fake.clock, sleep=fake.sleep)


async def write_n(store: ThrottledStorage | FaultyStorage, n: int) -> str:
    version = await store.create_if_not_exists(KEY, b"0")
    for i in range(1, n):
        version = await store.write(KEY, str(i).encode(), version)
    return version


# -- ThrottledStorage ------------------------------------------------------------------------


async def test_without_limits_nothing_waits() -> None:
    fake = FakeTime()
    store = throttled(fake=fake)

    await write_n(store, 50)

    assert fake.sleeps_s == []
    assert store.stats()["throttling"] is False


async def test_writes_are_paced_to_the_per_minute_limit() -> None:
    fake = FakeTime()
    store = throttled(fake=fake, writes_per_minute=60)

    await write_n(store, 10)

    assert fake.sleeps_s == pytest.approx([1.0] * 9)
    assert store.stats()["writes"] == {
        "perMinute": 60,
        "count": 10,
        "delayed": 9,
        "delayedMs": 9000,
    }


async def test_a_burst_of_a_sixtieth_of_the_limit_goes_through_at_once() -> None:
    fake = FakeTime()
    store = throttled(fake=fake, writes_per_minute=600)

    await write_n(store, 10)
    assert fake.sleeps_s == []
    await store.create_if_not_exists("other.json", b"x")
    assert fake.sleeps_s == pytest.approx([0.1])


async def test_reads_and_writes_have_buckets_of_their_own() -> None:
    fake = FakeTime()
    store = throttled(fake=fake, reads_per_minute=60)
    await write_n(store, 5)
    assert fake.sleeps_s == []

    for _ in range(3):
        await store.read(KEY)

    assert fake.sleeps_s == pytest.approx([1.0, 1.0])
    assert store.stats()["reads"]["delayed"] == 2


async def test_the_daily_budget_paces_writes_after_its_burst() -> None:
    fake = FakeTime()
    store = throttled(fake=fake, writes_per_day=1_440)  # one a minute, a burst of 24

    await write_n(store, 26)

    assert fake.sleeps_s == pytest.approx([60.0, 60.0])
    assert store.stats()["dailyWrites"] == {"perDay": 1_440, "count": 26}


async def test_concurrent_callers_wait_in_turn_and_none_is_rejected() -> None:
    frozen = FrozenTime()
    store = throttled(fake=frozen, writes_per_minute=60)

    versions = await asyncio.gather(
        *(store.create_if_not_exists(f"k{i}.json", b"x") for i in range(5))
    )

    assert len(set(versions)) == 5
    assert sorted(frozen.sleeps_s) == pytest.approx([1.0, 2.0, 3.0, 4.0])


async def test_a_delayed_write_is_only_a_slower_call_of_its_caller() -> None:
    """No background write, no overlap: cancelled while waiting means never written."""
    fake = FakeTime()
    inner = FaultyStorage(MemoryStorage())
    store = throttled(inner, fake=fake, writes_per_minute=60)
    await write_n(store, 5)
    assert inner.max_writes_in_flight == 1

    sleeping = asyncio.Event()

    async def stuck_sleep(seconds: float) -> None:
        sleeping.set()
        await asyncio.Event().wait()

    store._sleep = stuck_sleep
    task = asyncio.create_task(store.create_if_not_exists("late.json", b"x"))
    await sleeping.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert inner.calls["create"] == 1  # only write_n's own create reached the store
    assert await inner.read("late.json") is None


async def test_stats_shape() -> None:
    store = ThrottledStorage(MemoryStorage(), 600, 120, 50_000)
    await store.create_if_not_exists(KEY, b"x")
    await store.read(KEY)

    assert store.stats() == {
        "throttling": True,
        "reads": {"perMinute": 600, "count": 1, "delayed": 0, "delayedMs": 0},
        "writes": {"perMinute": 120, "count": 1, "delayed": 0, "delayedMs": 0},
        "dailyWrites": {"perDay": 50_000, "count": 1},
        "delayedMs": 0,
    }
    assert store.describe()["throttle"] == {
        "readsPerMinute": 600,
        "writesPerMinute": 120,
        "writesPerDay": 50_000,
    }


def test_throttled_keeps_the_inner_write_interval_and_refuses_negative_limits() -> None:
    inner = MemoryStorage()
    inner.min_write_interval_ms = 1_000
    assert ThrottledStorage(inner, writes_per_minute=10).min_write_interval_ms == 1_000
    with pytest.raises(ValueError, match="writes_per_day"):
        ThrottledStorage(inner, writes_per_day=-1)


async def test_f12_pacing_keeps_a_gcs_like_store_from_answering_429() -> None:
    """A store that refuses a second write within 1 s: a writes-per-minute limit of 60
    keeps every write clear of it; without the limit the same writes are refused."""
    fake = FakeTime()
    gcs_like = FaultyStorage(MemoryStorage(), clock=fake.clock)
    gcs_like.reject_writes_within(1_000)

    await write_n(throttled(gcs_like, fake=fake, writes_per_minute=60), 20)
    assert gcs_like.injected["rate_limit"] == 0

    with pytest.raises(StorageBackendError, match="429"):
        await write_n(gcs_like, 2)
    assert gcs_like.injected["rate_limit"] == 1


# -- FaultyStorage ---------------------------------------------------------------------------


@pytest.fixture
async def faulty() -> FaultyStorage:
    store = FaultyStorage(MemoryStorage())
    await store.create_if_not_exists(KEY, b"v1")
    return store


async def current(store: FaultyStorage) -> Versioned:
    stored = await store.inner.read(KEY)
    assert stored is not None
    return stored


@pytest.mark.parametrize(
    ("fault", "error", "text"),
    [
        ("conflict", CASConflictError, "412"),
        ("not_found", CASConflictError, "404"),
        ("backend", StorageBackendError, "injected"),
        ("rate_limit", StorageBackendError, "429"),
    ],
)
async def test_f10_a_scheduled_fault_answers_the_next_write_and_stores_nothing(
    faulty: FaultyStorage, fault: str, error: type[Exception], text: str
) -> None:
    before = await current(faulty)
    faulty.fail_next("write", fault)  # type: ignore[arg-type]

    with pytest.raises(error, match=text):
        await faulty.write(KEY, b"v2", before.version)
    assert await current(faulty) == before
    assert faulty.injected[fault] == 1

    assert await faulty.write(KEY, b"v2", before.version)  # the fault was used up


async def test_a_404_on_read_looks_like_an_absent_object(faulty: FaultyStorage) -> None:
    faulty.fail_next("read", "not_found")
    assert await faulty.read(KEY) is None
    assert await faulty.read(KEY) is not None


async def test_faults_are_taken_in_order_by_kind_and_count(faulty: FaultyStorage) -> None:
    faulty.fail_next("read", "backend", times=2)
    faulty.fail_next("any", RuntimeError("custom"))

    version = (await current(faulty)).version
    with pytest.raises(RuntimeError, match="custom"):  # reads are taken, writes skip ahead
        await faulty.write(KEY, b"x", version)
    for _ in range(2):
        with pytest.raises(StorageBackendError):
            await faulty.read(KEY)
    assert await faulty.read(KEY) is not None
    assert faulty.calls == {"read": 3, "write": 1, "create": 1}
    assert faulty.injected == {"backend": 2, "RuntimeError": 1}


async def test_a_lost_reply_lands_but_the_caller_sees_an_error(faulty: FaultyStorage) -> None:
    before = await current(faulty)
    faulty.lose_next_reply("write")

    with pytest.raises(StorageBackendError, match="lost reply"):
        await faulty.write(KEY, b"v2", before.version)

    after = await current(faulty)
    assert after.data == b"v2"
    with pytest.raises(CASConflictError):  # retrying blindly now conflicts with itself
        await faulty.write(KEY, b"v2-again", before.version)


async def test_a_second_write_within_the_interval_is_refused_like_gcs() -> None:
    fake = FakeTime()
    store = FaultyStorage(MemoryStorage(), clock=fake.clock)
    store.reject_writes_within(1_000)
    version = await store.create_if_not_exists(KEY, b"1")

    fake.now_s += 0.5
    with pytest.raises(StorageBackendError, match="429"):
        await store.write(KEY, b"2", version)
    fake.now_s += 0.5
    version = await store.write(KEY, b"2", version)

    store.reject_writes_within(None)
    assert await store.write(KEY, b"3", version)
    assert store.injected["rate_limit"] == 1


async def test_latency_and_the_in_flight_counter() -> None:
    store = FaultyStorage(MemoryStorage(), latency_ms=30)
    started = time.monotonic()
    await asyncio.gather(*(store.create_if_not_exists(f"k{i}", b"x") for i in range(3)))

    assert time.monotonic() - started >= 0.03
    assert store.max_writes_in_flight == 3
    store.clear()
    assert store.latency_ms == 0


def test_unknown_fault_names_are_refused() -> None:
    store = FaultyStorage(MemoryStorage())
    with pytest.raises(ValueError, match="unknown fault"):
        store.fail_next("write", "explode")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown call kind"):
        store.fail_next("delete", "conflict")  # type: ignore[arg-type]
