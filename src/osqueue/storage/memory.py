"""An in-process store: for tests, demos and users' own unit tests."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from osqueue.errors import CASConflictError, StorageBackendError
from osqueue.storage.base import Storage, Versioned

__all__ = ["MemoryStorage"]


@dataclass
class _Faults:
    latency_s: float = 0.0
    jitter_s: float = 0.0
    failure_rate: float = 0.0
    rng: random.Random = field(default_factory=random.Random)


class MemoryStorage(Storage):
    """A dict of versioned objects with a counter as version.

    A document written in parts is kept as those parts (the engine's cached pieces, so
    nothing is copied) and joined only when it is read.

    ``latency_ms`` (plus up to ``jitter_ms``) is slept before every call, and
    ``failure_rate`` is the chance that a call raises StorageBackendError before touching
    anything, so tests and demos can feel a slow or flaky store.
    """

    name = "memory"

    def __init__(
        self,
        *,
        latency_ms: float = 0.0,
        jitter_ms: float = 0.0,
        failure_rate: float = 0.0,
        seed: int | None = None,
    ) -> None:
        self._objects: dict[str, tuple[bytes | tuple[bytes, ...], int]] = {}
        self._counter = 0
        self.faults = _Faults(
            latency_ms / 1000, jitter_ms / 1000, failure_rate, random.Random(seed)
        )
        self.reads = 0
        self.writes = 0

    async def _delay_and_maybe_fail(self) -> None:
        f = self.faults
        if f.latency_s or f.jitter_s:
            await asyncio.sleep(f.latency_s + f.rng.random() * f.jitter_s)
        if f.failure_rate and f.rng.random() < f.failure_rate:
            raise StorageBackendError("injected memory-store failure")

    async def read(self, key: str) -> Versioned | None:
        await self._delay_and_maybe_fail()
        self.reads += 1
        entry = self._objects.get(key)
        if entry is None:
            return None
        data, version = entry
        if isinstance(data, tuple):
            data = b"".join(data)
            self._objects[key] = (data, version)
        return Versioned(data, str(version))

    def peek(self, key: str) -> bytes | None:
        """What is stored under ``key`` now, without latency or faults (for tests)."""
        entry = self._objects.get(key)
        if entry is None:
            return None
        data = entry[0]
        return b"".join(data) if isinstance(data, tuple) else data

    async def write(self, key: str, data: bytes, expected_version: str) -> str:
        return await self._replace(key, bytes(data), expected_version)

    async def write_parts(self, key: str, parts: Sequence[bytes], expected_version: str) -> str:
        return await self._replace(key, tuple(parts), expected_version)  # bytes: immutable

    async def _replace(
        self, key: str, data: bytes | tuple[bytes, ...], expected_version: str
    ) -> str:
        await self._delay_and_maybe_fail()
        entry = self._objects.get(key)
        if entry is None or str(entry[1]) != expected_version:
            raise CASConflictError(f"version of {key!r} is not {expected_version!r}")
        return self._store(key, data)

    async def create_if_not_exists(self, key: str, data: bytes) -> str:
        await self._delay_and_maybe_fail()
        if key in self._objects:
            raise CASConflictError(f"{key!r} already exists")
        return self._store(key, bytes(data))

    def _store(self, key: str, data: bytes | tuple[bytes, ...]) -> str:
        self._counter += 1
        self.writes += 1
        self._objects[key] = (data, self._counter)
        return str(self._counter)
