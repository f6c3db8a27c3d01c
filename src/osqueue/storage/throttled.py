"""A wrapper that paces reads and writes of any backend with token buckets.

It delays callers and never rejects them: a call that finds its bucket empty sleeps until a
token is due, then runs. Nothing is queued or run in the background, so a delayed write is
just a slower call by the same caller and can never overlap with that caller's next write.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from osqueue.storage.base import Storage, Versioned

__all__ = ["ThrottledStorage", "TokenBucket"]

logger = logging.getLogger(__name__)

SECONDS_PER_MINUTE = 60.0
SECONDS_PER_DAY = 86_400.0


class TokenBucket:
    """``limit`` operations per ``window_s`` seconds, with a burst of ``limit // 60`` (min 1).

    So in any stretch of ``t`` seconds at most ``burst + limit * t / window_s`` operations
    start. Tokens are reserved in call order (a balance below zero is a queue of waiters),
    so concurrent callers are served first come, first served.
    """

    def __init__(self, limit: int, window_s: float, clock: Callable[[], float]) -> None:
        self.limit = limit
        self.rate_per_s = limit / window_s
        self.capacity = float(max(1, limit // 60))
        self._clock = clock
        self._tokens = self.capacity
        self._updated = clock()

    def reserve(self) -> float:
        """Take one token; return how many seconds the caller must wait before using it."""
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._updated) * self.rate_per_s)
        self._updated = now
        self._tokens -= 1
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate_per_s

    def refund(self) -> None:
        """Give back a token whose caller gave up (was cancelled) before using it."""
        self._tokens += 1


class _Counter:
    """What one kind of call has cost: calls, how many were delayed, and for how long."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0
        self.delayed = 0
        self.delayed_s = 0.0

    def snapshot(self, limit_name: str) -> dict[str, int]:
        return {
            limit_name: self.limit,
            "count": self.count,
            "delayed": self.delayed,
            "delayedMs": round(self.delayed_s * 1000),
        }


class ThrottledStorage(Storage):
    """Wraps ``inner`` and caps its read and write rates; a limit of 0 is no limit.

    ``reads_per_minute`` and ``writes_per_minute`` pace reads and writes (``write`` and
    ``create_if_not_exists`` both count as writes); ``writes_per_day`` is a daily write budget
    spent at most ``writes_per_day / 60`` at a time. Calls are delayed, never rejected, and
    delays never make calls overlap that the caller did not overlap itself.

    :meth:`stats` is what ``GET /v1/throttle-stats`` serves.
    """

    name = "throttled"

    def __init__(
        self,
        inner: Storage,
        reads_per_minute: int = 0,
        writes_per_minute: int = 0,
        writes_per_day: int = 0,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        for label, value in (
            ("reads_per_minute", reads_per_minute),
            ("writes_per_minute", writes_per_minute),
            ("writes_per_day", writes_per_day),
        ):
            if value < 0:
                raise ValueError(f"{label} must be 0 (off) or positive, got {value}")
        self.inner = inner
        self.min_write_interval_ms = inner.min_write_interval_ms
        self._sleep = sleep
        self._read_buckets = _buckets(clock, (reads_per_minute, SECONDS_PER_MINUTE))
        self._write_buckets = _buckets(
            clock, (writes_per_minute, SECONDS_PER_MINUTE), (writes_per_day, SECONDS_PER_DAY)
        )
        self._reads = _Counter(reads_per_minute)
        self._writes = _Counter(writes_per_minute)
        self._writes_per_day = writes_per_day

    async def read(self, key: str) -> Versioned | None:
        await self._wait_turn(self._read_buckets, self._reads)
        return await self.inner.read(key)

    async def write(self, key: str, data: bytes, expected_version: str) -> str:
        await self._wait_turn(self._write_buckets, self._writes)
        return await self.inner.write(key, data, expected_version)

    async def create_if_not_exists(self, key: str, data: bytes) -> str:
        await self._wait_turn(self._write_buckets, self._writes)
        return await self.inner.create_if_not_exists(key, data)

    async def close(self) -> None:
        await self.inner.close()

    def describe(self) -> dict[str, Any]:
        return {
            **self.inner.describe(),
            "throttle": {
                "readsPerMinute": self._reads.limit,
                "writesPerMinute": self._writes.limit,
                "writesPerDay": self._writes_per_day,
            },
        }

    def stats(self) -> dict[str, Any]:
        """The throttle counters, as served at ``GET /v1/throttle-stats``::

            {
              "throttling": true,          # at least one limit is set
              "reads":  {"perMinute": 600, "count": 12, "delayed": 0, "delayedMs": 0},
              "writes": {"perMinute": 120, "count": 40, "delayed": 3, "delayedMs": 950},
              "dailyWrites": {"perDay": 50000, "count": 40},
              "delayedMs": 950             # time callers spent waiting, reads and writes
            }

        ``count`` is calls since start (writes include creates), ``delayed`` those that had to
        wait, ``delayedMs`` the total wait. Limits are 0 when off.
        """
        return {
            "throttling": bool(self._read_buckets or self._write_buckets),
            "reads": self._reads.snapshot("perMinute"),
            "writes": self._writes.snapshot("perMinute"),
            "dailyWrites": {"perDay": self._writes_per_day, "count": self._writes.count},
            "delayedMs": round((self._reads.delayed_s + self._writes.delayed_s) * 1000),
        }

    async def _wait_turn(self, buckets: list[TokenBucket], counter: _Counter) -> None:
        counter.count += 1
        waits = [bucket.reserve() for bucket in buckets]
        wait_s = max(waits, default=0.0)
        if wait_s <= 0:
            return
        counter.delayed += 1
        counter.delayed_s += wait_s
        logger.debug("throttled: waiting %.3f s for a token", wait_s)
        try:
            await self._sleep(wait_s)
        except asyncio.CancelledError:
            for bucket in buckets:
                bucket.refund()
            raise


def _buckets(clock: Callable[[], float], *limits: tuple[int, float]) -> list[TokenBucket]:
    return [TokenBucket(limit, window_s, clock) for limit, window_s in limits if limit > 0]
