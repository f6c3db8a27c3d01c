"""A fault-injecting wrapper for tests: the failures real object stores produce, on demand.

::

    store = FaultyStorage(MemoryStorage())
    store.fail_next("write", "conflict")        # the next write answers 412
    store.fail_next("write", "not_found")       # then a 404-style conflict
    store.lose_next_reply("write")              # lands, but the caller sees an error
    store.reject_writes_within(1_000)           # a GCS-like 429 for a 2nd write within 1 s

Every call is counted in :attr:`FaultyStorage.calls`, every injected fault in
:attr:`FaultyStorage.injected`.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, get_args

from osqueue.errors import CASConflictError, StorageBackendError
from osqueue.storage.base import Storage, Versioned

__all__ = ["CallKind", "FaultKind", "FaultyStorage"]

#: The calls a fault can target; "any" matches all three.
CallKind = Literal["read", "write", "create", "any"]

#: The canned faults: ``"conflict"`` a 412 (CASConflictError); ``"not_found"`` a 404, which is
#: a CASConflictError for a write or create and an absent object (None) for a read;
#: ``"backend"`` a StorageBackendError; ``"rate_limit"`` a 429-like StorageBackendError.
FaultKind = Literal["conflict", "not_found", "backend", "rate_limit"]


@dataclass
class _Scheduled:
    kinds: frozenset[str]
    fault: FaultKind | BaseException | Literal["lose_reply"]
    remaining: int


class FaultyStorage(Storage):
    """Wraps ``inner``; injects latency and scheduled faults, and counts calls.

    Scheduled faults are consumed in the order they were added, each by the first calls of
    a matching kind. A fault answers without touching ``inner``, except a lost reply, which
    lets the inner write land and then raises StorageBackendError.
    """

    name = "faulty"

    def __init__(
        self,
        inner: Storage,
        *,
        latency_ms: float = 0.0,
        jitter_ms: float = 0.0,
        seed: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.inner = inner
        self.min_write_interval_ms = inner.min_write_interval_ms
        self.latency_ms = latency_ms
        self.jitter_ms = jitter_ms
        #: Calls received, by kind ("read", "write", "create"), faulty or not.
        self.calls: Counter[str] = Counter()
        #: Faults injected, by fault name ("conflict", "lose_reply", "rate_limit"...).
        self.injected: Counter[str] = Counter()
        #: The most writes and creates that were ever in progress at once.
        self.max_writes_in_flight = 0
        self._writes_in_flight = 0
        self._schedule: list[_Scheduled] = []
        self._reject_within_s: float | None = None
        self._last_write_at: float | None = None
        self._rng = random.Random(seed)
        self._clock = clock

    # -- arranging faults ------------------------------------------------------------------

    def fail_next(self, kind: CallKind, fault: FaultKind | BaseException, times: int = 1) -> None:
        """Answer the next ``times`` calls of ``kind`` with ``fault`` (a name or an error)."""
        if not isinstance(fault, BaseException) and fault not in get_args(FaultKind):
            raise ValueError(f"unknown fault {fault!r}: use one of {get_args(FaultKind)}")
        self._schedule.append(_Scheduled(_kinds(kind), fault, times))

    def lose_next_reply(
        self, kind: Literal["write", "create", "any"] = "write", times: int = 1
    ) -> None:
        """Let the next ``times`` writes land in ``inner``, then raise StorageBackendError."""
        kinds = _kinds(kind) - {"read"}
        self._schedule.append(_Scheduled(kinds, "lose_reply", times))

    def reject_writes_within(self, interval_ms: float | None) -> None:
        """Answer a write or create with a 429-like StorageBackendError when it comes less
        than ``interval_ms`` after the last write that landed (as GCS does for one object).
        None turns this off."""
        self._reject_within_s = None if interval_ms is None else interval_ms / 1000

    def set_latency(self, latency_ms: float, jitter_ms: float = 0.0) -> None:
        """Sleep ``latency_ms`` plus up to ``jitter_ms`` before every call."""
        self.latency_ms, self.jitter_ms = latency_ms, jitter_ms

    def clear(self) -> None:
        """Drop every scheduled fault, the 429 rule and the latency; keep the counters."""
        self._schedule.clear()
        self._reject_within_s = None
        self.latency_ms = self.jitter_ms = 0.0

    # -- the Storage interface -------------------------------------------------------------

    async def read(self, key: str) -> Versioned | None:
        fault = await self._begin("read")
        if fault == "not_found":
            return None
        return await self.inner.read(key)

    async def write(self, key: str, data: bytes, expected_version: str) -> str:
        return await self._write(
            "write", key, lambda: self.inner.write(key, data, expected_version)
        )

    async def create_if_not_exists(self, key: str, data: bytes) -> str:
        return await self._write("create", key, lambda: self.inner.create_if_not_exists(key, data))

    async def close(self) -> None:
        await self.inner.close()

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "inner": self.inner.describe()}

    # -- steps -----------------------------------------------------------------------------

    async def _write(self, kind: str, key: str, call: Callable[[], Awaitable[str]]) -> str:
        self._writes_in_flight += 1
        self.max_writes_in_flight = max(self.max_writes_in_flight, self._writes_in_flight)
        try:
            fault = await self._begin(kind)
            if fault == "not_found":
                raise CASConflictError(f"injected 404: {key!r} does not exist")
            self._check_write_rate(key)
            version = await call()
            self._last_write_at = self._clock()
            if fault == "lose_reply":
                raise StorageBackendError(f"injected lost reply: the {kind} of {key!r} landed")
            return version
        finally:
            self._writes_in_flight -= 1

    async def _begin(self, kind: str) -> str | None:
        """Count the call, sleep the latency, and raise or return its scheduled fault."""
        self.calls[kind] += 1
        if self.latency_ms or self.jitter_ms:
            await asyncio.sleep((self.latency_ms + self._rng.random() * self.jitter_ms) / 1000)
        fault = self._take_fault(kind)
        if fault is None:
            return None
        if isinstance(fault, BaseException):
            self.injected[type(fault).__name__] += 1
            raise fault
        self.injected[fault] += 1
        if fault == "conflict":
            raise CASConflictError("injected 412: precondition failed")
        if fault == "backend":
            raise StorageBackendError("injected storage failure")
        if fault == "rate_limit":
            raise StorageBackendError("injected 429: rate limit exceeded")
        return fault  # "not_found" and "lose_reply" depend on the call

    def _take_fault(self, kind: str) -> FaultKind | BaseException | str | None:
        for entry in self._schedule:
            if kind in entry.kinds:
                entry.remaining -= 1
                if entry.remaining <= 0:
                    self._schedule.remove(entry)
                return entry.fault
        return None

    def _check_write_rate(self, key: str) -> None:
        if self._reject_within_s is None or self._last_write_at is None:
            return
        if self._clock() - self._last_write_at < self._reject_within_s:
            self.injected["rate_limit"] += 1
            raise StorageBackendError(
                f"injected 429: {key!r} was written less than "
                f"{self._reject_within_s * 1000:.0f} ms ago"
            )


def _kinds(kind: str) -> frozenset[str]:
    if kind == "any":
        return frozenset({"read", "write", "create"})
    if kind not in ("read", "write", "create"):
        raise ValueError(f"unknown call kind {kind!r}: use read, write, create or any")
    return frozenset({kind})
