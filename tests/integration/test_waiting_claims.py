"""Waiting claims (``waitMs``): answered by the commit that makes a job claimable, free of
storage writes while they wait, and released when their client goes away."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx

from tests.integration.rest_support import BrokerFactory, RestBroker


async def until(condition: Callable[[], bool], timeout_s: float = 5) -> None:
    """Poll an observable condition of the broker, failing after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def test_waiting_claim_gets_a_job_submitted_while_it_waits(broker: RestBroker) -> None:
    waiting = asyncio.create_task(broker.claim("w1", waitMs=10_000))
    await until(lambda: broker.handle.broker.service.waiting_claims == 1)
    started = time.monotonic()
    job_id = await broker.submit({"n": 1})
    claimed = await asyncio.wait_for(waiting, 5)
    assert claimed["jobId"] == job_id
    assert time.monotonic() - started < 2, "answered by the submit's commit, not a timeout"


async def test_waiting_claim_returns_empty_after_its_wait(broker: RestBroker) -> None:
    started = time.monotonic()
    assert await broker.claim("w1", waitMs=300) == {}
    assert 0.25 <= time.monotonic() - started < 3


async def test_waiting_claim_wakes_when_a_delayed_job_falls_due(broker: RestBroker) -> None:
    job_id = await broker.submit({"n": 1}, delayMs=400)
    started = time.monotonic()
    claimed = await broker.claim("w1", waitMs=5_000)
    assert claimed["jobId"] == job_id
    assert 0.35 <= time.monotonic() - started < 3


async def test_waiting_claims_cost_no_writes(broker: RestBroker) -> None:
    writes_before = broker.engine.stats.writes
    await asyncio.gather(*(broker.claim(f"w{i}", waitMs=500) for i in range(50)))
    # leader heartbeats may write meanwhile (interval 0.5 s in these tests), claims do not
    assert broker.engine.stats.writes - writes_before <= 2


async def test_claim_of_a_client_that_went_away_takes_nothing(
    start_broker: BrokerFactory,
) -> None:
    broker = await start_broker()
    async with httpx.AsyncClient(base_url=broker.handle.url) as gone:
        request = asyncio.create_task(
            gone.post("/v1/jobs/claim", json={"workerId": "gone", "waitMs": 20_000}, timeout=30)
        )
        service = broker.handle.broker.service
        await until(lambda: service.waiting_claims == 1)
        request.cancel()
        await asyncio.gather(request, return_exceptions=True)
    await until(lambda: service.waiting_claims == 0)  # the broker saw the client go
    job_id = await broker.submit({"n": 1})
    claimed = await broker.claim("present", waitMs=2_000)
    assert claimed["jobId"] == job_id, "the departed client's claim did not take the job"
