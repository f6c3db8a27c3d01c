"""Leadership between brokers in one process: two real brokers on loopback sharing a store.

A leader is "silenced" by giving its own view of the shared store a long latency, so that
its heartbeat stops moving while it still believes it leads: the in-process twin of a
paused leader. The subprocess scenarios (kill -9, SIGSTOP, SIGTERM) are in
``tests/acceptance/test_failover.py``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack

import httpx
import orjson
import pytest

from osqueue.broker.server import BrokerConfig, BrokerHandle, run_broker_in_background
from osqueue.client import AsyncOsqueueClient, ClientRetry
from osqueue.engine import EngineConfig
from osqueue.errors import BrokerLeadershipError
from osqueue.storage import FaultyStorage, MemoryStorage, Storage
from osqueue.storage.base import STATE_KEY

LEADER_TIMEOUT_MS = 500
WAIT_S = 10.0


def config(*, standby: bool, timeout_ms: int = LEADER_TIMEOUT_MS) -> BrokerConfig:
    return BrokerConfig(
        host="127.0.0.1",
        port=0,
        standby=standby,
        heartbeat_timeout_ms=timeout_ms,
        engine=EngineConfig(
            commit_interval_ms=10,
            job_timeout_ms=60_000,
            broker_heartbeat_interval_ms=100,
            retry_deadline_ms=300,
        ),
    )


async def until(predicate: Callable[[], object], what: str, timeout_s: float = WAIT_S) -> None:
    """Poll ``predicate`` until it holds; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.01)


async def stored(store: Storage) -> dict[str, object]:
    found = await store.read(STATE_KEY)
    assert found is not None
    doc: dict[str, object] = orjson.loads(found.data)
    return doc


def raw_client(url: str) -> AsyncOsqueueClient:
    return AsyncOsqueueClient(url, retry=ClientRetry(deadline_s=0))


@pytest.fixture
async def stack() -> AsyncIterator[AsyncExitStack]:
    async with AsyncExitStack() as exits:
        yield exits


async def start(stack: AsyncExitStack, store: Storage, cfg: BrokerConfig) -> BrokerHandle:
    return await stack.enter_async_context(run_broker_in_background(store, cfg))


async def test_standby_answers_503_naming_the_leader(stack: AsyncExitStack) -> None:
    store = MemoryStorage()
    leader = await start(stack, store, config(standby=False))
    standby = await start(stack, store, config(standby=True))
    await until(lambda: standby.broker.leader_address() == leader.broker.address, "standby to look")

    async with raw_client(standby.url) as client:
        with pytest.raises(BrokerLeadershipError) as caught:
            await client.submit({"n": 1})
    assert caught.value.fields["leader"] == leader.broker.address

    async with httpx.AsyncClient() as http:
        ready = await http.get(f"{standby.url}/readyz")
        leading = await http.get(f"{leader.url}/readyz")
    assert ready.status_code == 503
    body = ready.json()
    assert body["_tag"] == "BrokerLeadershipError"
    assert body["leader"] == leader.broker.address
    assert body["brokerId"] == standby.broker.broker_id
    assert body["leaderBrokerId"] == leader.broker.broker_id
    assert body["epoch"] == 1
    assert 0 <= body["heartbeatAgeMs"] < LEADER_TIMEOUT_MS
    assert leading.status_code == 200
    facts = leading.json()
    assert facts["leader"] is True
    assert facts["brokerId"] == leader.broker.broker_id
    assert facts["epoch"] == 1
    assert 0 <= facts["heartbeatAgeMs"] < LEADER_TIMEOUT_MS
    assert facts["takeoverAt"] > 0


async def test_silent_leader_is_replaced_fenced_and_watches_again(stack: AsyncExitStack) -> None:
    shared = MemoryStorage()
    old_view = FaultyStorage(shared)
    old = await start(stack, old_view, config(standby=False))
    new = await start(stack, shared, config(standby=True))
    async with raw_client(old.url) as client:
        job_id = await client.submit({"n": 1})
        claimed = await client.claim("w1")
    assert claimed is not None and claimed.job_id == job_id

    old_view.set_latency(4 * LEADER_TIMEOUT_MS)  # its heartbeat stops moving
    await until(lambda: new.engine.leader, "the standby to take over")

    # The old leader still believes it leads (its write is stuck), but its last write is
    # older than the leader timeout, so it no longer claims readiness.
    assert old.engine.leader
    async with httpx.AsyncClient() as http:
        ready = await http.get(f"{old.url}/readyz")
    assert ready.status_code == 503
    assert ready.json()["leader"] is None

    doc = await stored(shared)
    assert doc["brokerId"] == new.broker.broker_id
    assert doc["epoch"] == 2
    takeover_ms = new.broker.leadership.takeover_ms
    assert takeover_ms is not None
    # Takeover grace: the in-progress job's lease starts again at the takeover.
    [job] = [j for j in doc["jobs"] if j["id"] == job_id]  # type: ignore[attr-defined]
    assert job["heartbeat"] == takeover_ms

    # The old leader's next write conflicts; it steps down and answers with the new leader.
    await until(lambda: not old.engine.leader, "the old leader to be fenced", 3 * WAIT_S)
    old_view.clear()
    async with raw_client(old.url) as client:
        with pytest.raises(BrokerLeadershipError) as caught:
            await client.submit({"n": 2})
    assert caught.value.fields["leader"] == new.broker.address

    def watching_new_leader() -> bool:
        view = old.broker.leadership.view
        return view is not None and view.broker_id == new.broker.broker_id

    await until(watching_new_leader, "the fenced broker to watch the new leader")

    # It never writes itself back: across many of its polls the store keeps the new leader.
    for _ in range(20):
        doc = await stored(shared)
        assert doc["brokerId"] == new.broker.broker_id
        assert doc["broker"] == new.broker.address
        await asyncio.sleep(LEADER_TIMEOUT_MS / 10_000)
    assert not old.engine.leader


async def watched_pair(
    stack: AsyncExitStack,
) -> tuple[FaultyStorage, FaultyStorage, BrokerHandle]:
    """A leader and a standby, each with its own faulty view of one shared store; returns
    (leader's view, standby's view, standby) once the standby has looked at the store."""
    shared = MemoryStorage()
    leader_view, standby_view = FaultyStorage(shared), FaultyStorage(shared)
    await start(stack, leader_view, config(standby=False))
    standby = await start(stack, standby_view, config(standby=True))
    await until(lambda: standby.broker.leadership.view is not None, "the standby to look")
    return leader_view, standby_view, standby


async def test_standby_rides_out_a_failing_store(stack: AsyncExitStack) -> None:
    leader_view, standby_view, standby = await watched_pair(stack)
    standby_view.fail_next("read", "backend", times=1_000_000)  # every read fails
    await until(
        lambda: standby_view.injected["backend"] >= 10, "failed reads past the retry deadline"
    )
    standby_view.clear()
    leader_view.set_latency(2 * LEADER_TIMEOUT_MS)
    await until(lambda: standby.engine.leader, "the standby to take over after the outage")
    leader_view.clear()


async def test_takeover_whose_reply_was_lost_counts_once(stack: AsyncExitStack) -> None:
    leader_view, standby_view, standby = await watched_pair(stack)
    standby_view.lose_next_reply("write")  # its first write is the takeover
    leader_view.set_latency(2 * LEADER_TIMEOUT_MS)
    await until(lambda: standby.engine.leader, "the standby to take over")
    leader_view.clear()

    assert standby_view.injected["lose_reply"] == 1
    doc = await stored(standby_view)
    assert doc["brokerId"] == standby.broker.broker_id
    assert doc["epoch"] == 2


async def test_clean_stop_hands_over_at_once(stack: AsyncExitStack) -> None:
    store = MemoryStorage()
    slow_timeout_ms = 20_000
    async with AsyncExitStack() as leader_stack:
        leader = await start(leader_stack, store, config(standby=False, timeout_ms=slow_timeout_ms))
        standby = await start(stack, store, config(standby=True, timeout_ms=slow_timeout_ms))
        async with raw_client(leader.url) as client:
            ids = [await client.submit({"n": n}) for n in range(5)]
    stopped_at = time.monotonic()
    await until(lambda: standby.engine.leader, "the standby to take over", 5.0)
    assert time.monotonic() - stopped_at < slow_timeout_ms / 10_000

    doc = await stored(store)
    assert doc["epoch"] == 2
    assert [j["id"] for j in doc["jobs"]] == ids  # type: ignore[attr-defined]
