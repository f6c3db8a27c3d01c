"""Support for the REST tests: a recording wrapper around any store, a strict JSON reader, and
:class:`RestBroker`, an HTTP client on a broker with a ledger that checks I1-I4.

The ledger notes every acknowledged submit, every claim handed out and every completion,
so that a scenario can end with ``await broker.check_invariants()``.
"""

from __future__ import annotations

import itertools
import json
import math
import ssl
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from osqueue.broker.server import BrokerConfig, BrokerHandle
from osqueue.engine import Engine, EngineConfig
from osqueue.errors import StorageBackendError
from osqueue.storage.base import STATE_KEY, Storage, Versioned
from osqueue.storage.memory import MemoryStorage

_TLS = ssl.create_default_context()

#: The failure cases' short timings: job timeout 2 s, leader timeout 3 s.
JOB_TIMEOUT_MS = 2_000
LEADER_TIMEOUT_MS = 3_000
BROKER_HEARTBEAT_MS = 500


class RecordingStorage(Storage):
    """Wraps any store and keeps the bytes of every successful write, in order.

    ``history`` holds what was written (creates too), ``write_starts`` the monotonic time
    each write or create was sent, and ``failing = True`` makes every write raise
    StorageBackendError before it reaches the store. Reads pass straight through.

    :meth:`document` is the last document written through this wrapper (synchronous, for
    polled conditions); :meth:`stored_document` reads the store itself and checks that it
    holds exactly one of the writes recorded here, bytes and version.
    """

    def __init__(self, inner: Storage | None = None) -> None:
        self.inner = inner if inner is not None else MemoryStorage()
        self.name = self.inner.name
        self.min_write_interval_ms = self.inner.min_write_interval_ms
        self.history: list[bytes] = []
        self.write_starts: list[float] = []
        self.failing = False
        self._by_version: dict[str, bytes] = {}
        #: The body of the write sent last: a read may see it land before its reply does.
        self._in_flight: bytes | None = None

    async def read(self, key: str) -> Versioned | None:
        return await self.inner.read(key)

    async def write(self, key: str, data: bytes, expected_version: str) -> str:
        self._start_write(data)
        return self._record(data, await self.inner.write(key, data, expected_version))

    async def create_if_not_exists(self, key: str, data: bytes) -> str:
        self._start_write(data)
        return self._record(data, await self.inner.create_if_not_exists(key, data))

    async def close(self) -> None:
        await self.inner.close()

    def describe(self) -> dict[str, Any]:
        return self.inner.describe()

    def _start_write(self, data: bytes) -> None:
        if self.failing:
            raise StorageBackendError("injected write failure")
        self.write_starts.append(time.monotonic())
        self._in_flight = bytes(data)

    def _record(self, data: bytes, version: str) -> str:
        self.history.append(bytes(data))
        self._by_version[version] = bytes(data)
        return version

    def stored_bytes(self) -> bytes:
        """The bytes of the last write recorded here."""
        assert self.history, "nothing has been written through this store"
        return self.history[-1]

    def document(self) -> dict[str, Any]:
        """The last document written through this wrapper, parsed strictly."""
        return strict_json(self.stored_bytes())

    async def read_stored_bytes(self) -> bytes:
        """What the store holds now, checked to be a write recorded here."""
        stored = await self.inner.read(STATE_KEY)
        assert stored is not None, "the store holds no queue document"
        recorded = self._by_version.get(stored.version, self._in_flight)
        assert recorded == stored.data, (
            f"the store holds version {stored.version!r}, which is not a write recorded here"
        )
        return stored.data

    async def stored_document(self) -> dict[str, Any]:
        """The document the store holds now, parsed strictly (see read_stored_bytes)."""
        return strict_json(await self.read_stored_bytes())


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise AssertionError(f"duplicate keys in stored JSON: {keys}")
    return dict(pairs)


def _no_constant(name: str) -> Any:
    raise AssertionError(f"stored JSON holds the non-standard token {name}")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise AssertionError(f"stored JSON holds the non-finite number {text}")
    return value


def strict_json(data: bytes) -> Any:
    """Parse like the strictest reader: no NaN/Infinity, no duplicate keys, UTF-8 only."""
    return json.loads(
        data.decode("utf-8"),
        parse_constant=_no_constant,
        parse_float=_finite,
        object_pairs_hook=_no_duplicate_keys,
    )


@dataclass
class Ledger:
    """What the clients were told: acknowledged submits, claims handed out, completions."""

    max_attempts: dict[str, int] = field(default_factory=dict)
    claims: Counter[str] = field(default_factory=Counter)
    completions: Counter[str] = field(default_factory=Counter)
    removed: set[str] = field(default_factory=set)  # cancelled or purged


@dataclass
class RestBroker:
    """One broker under test: its handle, its store, an HTTP client and the ledger."""

    handle: BrokerHandle
    storage: RecordingStorage
    http: httpx.AsyncClient
    ledger: Ledger = field(default_factory=Ledger)

    @property
    def engine(self) -> Engine:
        return self.handle.engine

    async def submit(self, payload: Any = None, **fields: Any) -> str:
        response = await self.http.post("/v1/jobs", json={"payload": payload, **fields})
        assert response.status_code == 200, response.text
        job_id: str = response.json()["jobId"]
        self.ledger.max_attempts.setdefault(job_id, fields.get("maxAttempts", 3))
        return job_id

    def new_client(self) -> httpx.AsyncClient:
        """A client of its own, as a separate worker process has (close it when done).

        Many concurrent requests should not share one client: httpx's connection pool
        spends time quadratic in the requests it juggles. The clients share one TLS
        context, which httpx would otherwise build (tens of ms) for each.
        """
        return httpx.AsyncClient(base_url=self.handle.url, timeout=10, verify=_TLS)

    async def claim(
        self,
        worker_id: str,
        types: list[str] | None = None,
        *,
        http: httpx.AsyncClient | None = None,
        **fields: Any,
    ) -> Any:
        """The claim's body (``{}`` when nothing was claimable)."""
        body: dict[str, Any] = {"workerId": worker_id, **fields}
        if types is not None:
            body["types"] = types
        response = await (http or self.http).post("/v1/jobs/claim", json=body)
        assert response.status_code == 200, response.text
        claimed = response.json()
        if claimed:
            self.ledger.claims[claimed["jobId"]] += 1
        return claimed

    async def lease(self, action: str, job_id: str, worker_id: str, **fields: Any) -> Any:
        """POST heartbeat/complete/fail; the response (204 or an error)."""
        response = await self.http.post(
            f"/v1/jobs/{job_id}/{action}", json={"workerId": worker_id, **fields}
        )
        if action == "complete" and response.status_code == 204:
            self.ledger.completions[job_id] += 1
        return response

    async def state(self) -> dict[str, Any]:
        response = await self.http.get("/state")
        assert response.status_code == 200
        return strict_json(response.content)

    async def check_invariants(self) -> None:
        """I1-I4 of the failure cases, against the stored document and the ledger."""
        # I3: the stored state parses strictly and the broker still answers. It is read from
        # the store itself (S3, GCS...), and must be one of this test's recorded writes.
        doc = await self.storage.stored_document()
        assert (await self.http.get("/healthz")).status_code == 200
        live = {job["id"]: job for job in doc["jobs"]}
        dead = {job["id"]: job for job in doc.get("dead", [])}
        # I2: no id twice, no job completed twice.
        assert len(live) == len(doc["jobs"])
        assert len(dead) == len(doc.get("dead", []))
        assert not live.keys() & dead.keys()
        assert all(n == 1 for n in self.ledger.completions.values()), self.ledger.completions
        for job_id, max_attempts in self.ledger.max_attempts.items():
            claims = self.ledger.claims[job_id]
            # I4: never handed out more than maxAttempts times.
            assert claims <= max_attempts, (job_id, claims, max_attempts)
            # I1: queued, completed exactly once, or dead after exactly maxAttempts claims.
            if job_id in live:
                assert self.ledger.completions[job_id] == 0
                assert live[job_id]["attempts"] == claims
            elif job_id in dead:
                assert self.ledger.completions[job_id] == 0
                assert dead[job_id]["attempts"] == claims
                if dead[job_id]["reason"] in ("exhausted", "heartbeat_timeout"):
                    assert claims == max_attempts, (job_id, claims, max_attempts)
            elif job_id not in self.ledger.removed:
                assert self.ledger.completions[job_id] == 1, f"job {job_id} was lost"


BrokerFactory = Callable[..., Awaitable[RestBroker]]


@dataclass
class BrokerStore:
    """The backend a test runs on; :meth:`new` opens an empty store on it."""

    name: str
    _open: Callable[..., Storage]
    _count: itertools.count[int] = field(default_factory=itertools.count)

    def new(self, **options: Any) -> Storage:
        """A new, empty store (a prefix of its own in this test's bucket).

        ``options`` go to the backend's constructor (``latency_ms`` for memory,
        ``min_write_interval_ms`` for GCS...).
        """
        return self._open(f"broker-{next(self._count)}", **options)


def broker_config(
    *, max_body_bytes: int = 1024 * 1024, token: str | None = None, **engine: Any
) -> BrokerConfig:
    engine.setdefault("commit_interval_ms", 5)
    engine.setdefault("job_timeout_ms", JOB_TIMEOUT_MS)
    engine.setdefault("broker_heartbeat_interval_ms", BROKER_HEARTBEAT_MS)
    engine.setdefault("retry_deadline_ms", 2_000)
    return BrokerConfig(
        host="127.0.0.1",
        port=0,
        token=token,
        max_body_bytes=max_body_bytes,
        heartbeat_timeout_ms=LEADER_TIMEOUT_MS,
        engine=EngineConfig(**engine),
    )
