"""The group-commit engine: every mutation of the queue goes through here.

How a request becomes durable:

1. The broker calls :meth:`Engine.execute` with an operation, a function of
   ``(state, now_ms)``. The operation is applied to the live state at once, so the next
   request already sees its effect (two claims in one batch never get the same job).
2. The operation joins the batch that is forming. Its caller waits.
3. The commit loop keeps exactly one write in flight. When the previous write is done and
   the minimum gap (``commit_interval_ms``) since it started has passed, it takes the whole
   forming batch, encodes the document once and writes it with compare-and-swap.
4. When the store acknowledges the write, every caller of the batch gets its result.

A batch whose operations changed nothing is answered without a write. On a conflict the
engine re-reads the document: if its own write landed (the reply was lost, recognised by
``commitId``) the batch is done; if another broker now leads, the engine fences itself and
fails the batch with BrokerLeadershipError; otherwise it rebuilds the state from what it read
and replays the batch's operations on it before writing again. Storage errors are retried
with jittered backoff until ``retry_deadline_ms``, then the batch fails with
StorageBackendError and the state is reloaded before the next write; operations that arrive
in between are applied to the reloaded state only, never to what the failed batch left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from osqueue.errors import (
    BrokerLeadershipError,
    CASConflictError,
    EngineStateError,
    OsqueueError,
    StorageBackendError,
)
from osqueue.model import decode_state, empty_document, encode_state
from osqueue.state import DEFAULT_DEAD_LIMIT, DEFAULT_IDEMPOTENCY_RETENTION_MS, QueueState
from osqueue.storage.base import STATE_KEY, Storage, Versioned

__all__ = ["Engine", "EngineConfig", "EngineStats"]

log = logging.getLogger(__name__)

#: The gap between two writes is at least this many times the last encode took, so that
#: encoding a large document never takes more than about a quarter of the broker's time.
ENCODE_GAP_FACTOR = 3
#: Before a batch is written, the loop yields at most this many times to let requests that
#: have already arrived join it (see :meth:`Engine._gather_arrivals`).
MAX_GATHER_YIELDS = 32
#: After a write that took W seconds, the next batch may keep gathering arrivals for up to
#: ``GATHER_SHARE * W`` (at most ``GATHER_MAX_S``), while no gap of ``GATHER_QUIET_S`` passes
#: without a new request.
GATHER_SHARE = 0.25
GATHER_MAX_S = 0.05
GATHER_QUIET_S = 0.002

T = TypeVar("T")
Operation = Callable[[QueueState, int], T]


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Timings of the commit loop. All durations in milliseconds."""

    commit_interval_ms: int = 50
    job_timeout_ms: int = 30_000
    broker_heartbeat_interval_ms: int = 3_000
    retry_deadline_ms: int = 10_000
    retry_base_ms: int = 50
    retry_cap_ms: int = 2_000
    dead_limit: int = DEFAULT_DEAD_LIMIT
    idempotency_retention_ms: int = DEFAULT_IDEMPOTENCY_RETENTION_MS


@dataclass(slots=True)
class EngineStats:
    """Counters for ``/healthz``, logs and benchmarks."""

    writes: int = 0
    write_failures: int = 0
    conflicts: int = 0
    replays: int = 0
    reads: int = 0
    batches_without_write: int = 0
    operations: int = 0
    largest_batch: int = 0
    last_write_bytes: int = 0


@dataclass(slots=True)
class _Pending(Generic[T]):
    op: Operation[T]
    future: asyncio.Future[T]
    result: Any = None
    error: OsqueueError | None = None


@dataclass(slots=True)
class _Batch:
    entries: list[_Pending[Any]] = field(default_factory=list)
    changed: bool = False


def _now_ms() -> int:
    return int(time.time() * 1000)


class Engine:
    """Owns the live state, the batch and the single write in flight.

    Start it with :meth:`load` (read the document) and :meth:`start` (run the loops) once
    leadership is settled; stop it with :meth:`stop`.
    """

    def __init__(
        self,
        storage: Storage,
        config: EngineConfig | None = None,
        *,
        clock_ms: Callable[[], int] = _now_ms,
        rng: random.Random | None = None,
    ) -> None:
        self.storage = storage
        self.config = config or EngineConfig()
        self.clock_ms = clock_ms
        self.stats = EngineStats()
        self.state = self._new_state(None)
        self.version: str | None = None
        self._committed: bytes | list[bytes] = encode_state(empty_document())
        self.broker_id: str | None = None
        self._leading = asyncio.Event()
        #: The leader's address as this broker last saw it in the store (its own while it
        #: leads). A broker that does not lead names it in BrokerLeadershipError.
        self.known_leader: str | None = None
        #: Called with the new leader's address when a conflict shows another broker leads.
        self.on_fenced: Callable[[str | None], Awaitable[None] | None] | None = None
        #: Called after each durable write (used by waiting claims and standby bookkeeping).
        self.on_commit: Callable[[], None] | None = None
        self._rng = rng or random.Random()
        self._batch = _Batch()
        self._in_flight = False
        self._need_reload = False
        self._force_write = False
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._last_write_start = 0.0
        self._last_write_end = 0.0
        self._last_encode_s = 0.0
        #: Monotonic time at which the last write known to have landed was sent (the takeover
        #: write included). No standby can replace this broker before the leader timeout has
        #: passed since: standbys count the timeout from when they first read that write.
        self.confirmed_at = 0.0
        self._stopping = False

    @property
    def committed_bytes(self) -> bytes:
        """The document as last written (joined from the written pieces on first use)."""
        committed = self._committed
        if isinstance(committed, list):
            committed = self._committed = b"".join(committed)
        return committed

    @committed_bytes.setter
    def committed_bytes(self, data: bytes | list[bytes]) -> None:
        self._committed = data

    @property
    def committed_size(self) -> int:
        """The size in bytes of the document as last written (without joining it)."""
        committed = self._committed
        return len(committed) if isinstance(committed, bytes) else sum(map(len, committed))

    @property
    def leader(self) -> bool:
        """Whether this engine leads: only then does it accept operations and write."""
        return self._leading.is_set()

    @leader.setter
    def leader(self, value: bool) -> None:
        if value:
            if not self._leading.is_set():
                # Leadership is won by a write made just now: pace from it, and let the
                # leader heartbeat count it, instead of writing again at once.
                self._last_write_start = self._last_write_end = time.monotonic()
            self._leading.set()
        else:
            self._leading.clear()

    # -- state loading ------------------------------------------------------------------

    def _new_state(self, doc: dict[str, Any] | None) -> QueueState:
        options = {
            "dead_limit": self.config.dead_limit,
            "idempotency_retention_ms": self.config.idempotency_retention_ms,
        }
        if doc is None:
            return QueueState(**options)
        return QueueState.from_document(doc, **options)

    async def read_document(self) -> tuple[dict[str, Any], Versioned | None]:
        """Read and decode the stored document (an absent one is the empty queue)."""
        stored = await self._retry("read", lambda: self.storage.read(STATE_KEY))
        self.stats.reads += 1
        if stored is None:
            return empty_document(), None
        return decode_state(stored.data), stored

    async def load(self) -> dict[str, Any]:
        """Replace the live state with the stored document; returns the decoded document."""
        doc, stored = await self.read_document()
        self.adopt(doc, stored)
        return doc

    def adopt(self, doc: dict[str, Any], stored: Versioned | None) -> None:
        self.state = self._new_state(doc)
        self.version = stored.version if stored else None
        self.committed_bytes = stored.data if stored else encode_state(empty_document())
        self._need_reload = False

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Run the commit loop, the expiry timer and the leader heartbeat."""
        self._stopping = False
        self._tasks = [
            asyncio.create_task(self._commit_loop(), name="osqueue-commit"),
            asyncio.create_task(self._expiry_loop(), name="osqueue-expiry"),
            asyncio.create_task(self._heartbeat_loop(), name="osqueue-heartbeat"),
        ]

    async def flush(self) -> None:
        """Wait until everything applied so far is durable (or has failed)."""
        if not self._dirty() and not self._batch.entries:
            return
        marker: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._batch.entries.append(_Pending(lambda state, now_ms: None, marker))
        self._wake.set()
        with contextlib.suppress(OsqueueError):
            await marker

    async def stop(self) -> None:
        """Flush pending work, then stop the loops."""
        if self.leader:
            await self.flush()
        self._stopping = True
        self._wake.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        self._fail_batch(self._batch, self.not_leader_error("broker is shutting down"))
        self._batch = _Batch()

    # -- executing operations -----------------------------------------------------------

    async def execute(self, op: Operation[T]) -> T:
        """Apply ``op`` now and return its result once the state holding it is durable."""
        if not self.leader:
            raise self.not_leader_error()
        self.stats.operations += 1
        if self._need_reload:
            # The live state may still show a failed batch's effects: the reload applies op.
            return await self._enqueue(op)
        before = self.state.changes
        try:
            result = op(self.state, self.clock_ms())
        except OsqueueError as exc:  # a refusal changed nothing
            if not self._dirty():
                raise
            # It rests on a state not yet durable (a complete in flight, say): answer it
            # with that write, and judge it again if the write fails and state is reloaded.
            error_future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
            self._batch.entries.append(_Pending(op, error_future, error=exc))
            return await error_future
        changed = self.state.changes != before
        if not changed and not self._dirty():
            return result
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._batch.entries.append(_Pending(op, future, result))
        if changed:
            self._batch.changed = True
            self._wake.set()
        return await future

    async def _enqueue(self, op: Operation[T]) -> T:
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._batch.entries.append(_Pending(op, future))
        self._wake.set()
        return await future

    def not_leader_error(
        self, message: str = "this broker is not the leader"
    ) -> BrokerLeadershipError:
        """The error a broker that does not lead answers with, naming the known leader."""
        return BrokerLeadershipError(message, leader=self.known_leader)

    def _dirty(self) -> bool:
        return self._in_flight or self._batch.changed or self._force_write

    def request_write(self) -> None:
        """Write the document at the next opportunity even if no operation changed it."""
        self._force_write = True
        self._wake.set()

    # -- the commit loop ------------------------------------------------------------

    async def _commit_loop(self) -> None:
        while not self._stopping:
            await self._wake.wait()
            self._wake.clear()
            if not self.leader:
                self._fail_batch(self._batch, self.not_leader_error())
                self._batch = _Batch()
                continue
            if self._batch.changed or self._force_write or self._need_reload:
                await self._pace()  # everything that arrives inside the gap joins this write
                await self._gather_arrivals()
            batch, self._batch = self._batch, _Batch()
            force, self._force_write = self._force_write, False
            self._in_flight = True
            try:
                await self._settle(batch, force=force)
            except Exception as exc:  # never let the loop die: fail the batch, reload later
                log.exception("commit failed unexpectedly")
                self._need_reload = True
                self._fail_batch(batch, EngineStateError(f"commit failed: {exc!r}"))
            finally:
                self._in_flight = False
            if self._batch.entries or self._force_write:
                self._wake.set()

    async def _pace(self) -> None:
        """Wait until the minimum gap since the last write's start has passed.

        The gap is the commit interval (or the store's own minimum), stretched to
        ``ENCODE_GAP_FACTOR`` times the last encode when the document is large.
        """
        gap_ms = max(self.config.commit_interval_ms, self.storage.min_write_interval_ms)
        gap_s = max(gap_ms / 1000, ENCODE_GAP_FACTOR * self._last_encode_s)
        wait_s = self._last_write_start + gap_s - time.monotonic()
        if wait_s > 0:
            await asyncio.sleep(wait_s)

    async def _gather_arrivals(self) -> None:
        """Let requests that are on their way join the batch before it is written.

        When a slow write ends, its whole batch is answered at once and those clients send
        their next requests a moment later. A write started the moment the previous one
        ended would carry none of them, so each would wait for two writes. The loop first
        yields to the event loop while the batch still grows (requests already being
        read), then, after a slow write, keeps gathering for up to ``GATHER_SHARE`` of that
        write's duration as long as requests keep arriving.
        """
        for _ in range(MAX_GATHER_YIELDS):
            size = len(self._batch.entries)
            await asyncio.sleep(0)
            if len(self._batch.entries) == size:
                break
        last_write_s = self._last_write_end - self._last_write_start
        deadline = time.monotonic() + min(GATHER_SHARE * last_write_s, GATHER_MAX_S)
        while time.monotonic() + GATHER_QUIET_S < deadline:
            size = len(self._batch.entries)
            await asyncio.sleep(GATHER_QUIET_S)
            if len(self._batch.entries) == size:
                return

    async def _settle(self, batch: _Batch, *, force: bool) -> None:
        """Write the batch if it changed anything, else answer it without a write.

        After a failed batch the live state is first rebuilt from the store and the batch
        replayed on it, so nothing a failed write carried is acknowledged later.
        """
        changed = batch.changed
        if self._need_reload:
            if not await self._reload_and_replay(batch):
                return
            changed = self.state.changes > 0
        if not changed and not force:
            self.stats.batches_without_write += len(batch.entries) > 0
            self._resolve(batch)
            return
        await self._commit(batch)

    async def _commit(self, batch: _Batch) -> None:
        if len(batch.entries) > self.stats.largest_batch:
            self.stats.largest_batch = len(batch.entries)
        attempted: set[str] = set()
        deadline = time.monotonic() + self.config.retry_deadline_ms / 1000
        attempt = 0
        while True:
            await self._pace()  # a retry after a conflict is a write like any other
            parts = self._encode_for_write(attempted)
            started = self._last_write_start = time.monotonic()
            try:
                if self.version is None:
                    data = b"".join(parts)
                    version = await self.storage.create_if_not_exists(STATE_KEY, data)
                else:
                    version = await self.storage.write_parts(STATE_KEY, parts, self.version)
            except CASConflictError:
                self.stats.conflicts += 1
                try:
                    if await self._after_conflict(batch, attempted):
                        return
                except StorageBackendError as exc:
                    self._need_reload = True
                    self._fail_batch(batch, exc)
                    return
                continue
            except StorageBackendError as exc:
                self.stats.write_failures += 1
                attempt += 1
                if time.monotonic() >= deadline:
                    log.error("giving up on a write after %d attempts: %s", attempt, exc)
                    self._need_reload = True
                    self._fail_batch(batch, StorageBackendError(f"store kept failing: {exc}"))
                    return
                await self._backoff(attempt, deadline)
                continue
            self.confirmed_at = started
            self._on_written(batch, parts, version)
            return

    def _encode_for_write(self, attempted: set[str]) -> list[bytes]:
        state = self.state
        state.commit_id = uuid.uuid4().hex
        attempted.add(state.commit_id)
        state.broker_heartbeat = self.clock_ms()
        started = time.perf_counter()
        parts = state.encode_parts()
        self._last_encode_s = time.perf_counter() - started
        return parts

    def _on_written(self, batch: _Batch, data: bytes | list[bytes], version: str) -> None:
        self.version = version
        self._committed = data
        self._last_write_end = time.monotonic()
        self.stats.writes += 1
        self.stats.last_write_bytes = len(data) if isinstance(data, bytes) else sum(map(len, data))
        self._resolve(batch)
        if self.on_commit is not None:
            self.on_commit()

    async def _after_conflict(self, batch: _Batch, attempted: set[str]) -> bool:
        """Handle a lost CAS. True when the batch is settled (landed or failed)."""
        doc, stored = await self.read_document()
        if stored is not None and doc.get("commitId") in attempted:
            log.debug("a write whose reply was lost had landed; batch is durable")
            self._on_written(batch, stored.data, stored.version)
            return True
        if doc.get("brokerId") != self.broker_id:
            leader = doc.get("broker")
            log.warning("broker %s (epoch %s) now leads; stepping down", leader, doc.get("epoch"))
            await self._fence(batch, leader)
            return True
        log.info("state changed under this broker; replaying %d operations", len(batch.entries))
        self.adopt(doc, stored)
        self._replay(batch)
        return False

    async def _reload_and_replay(self, batch: _Batch) -> bool:
        """Rebuild from the store after a failed batch. False when this broker was fenced."""
        try:
            doc, stored = await self.read_document()
        except StorageBackendError as exc:
            self._fail_batch(batch, exc)
            return False
        if doc.get("brokerId") != self.broker_id:
            await self._fence(batch, doc.get("broker"))
            return False
        self.adopt(doc, stored)
        self._replay(batch)
        return True

    def _replay(self, batch: _Batch) -> None:
        """Re-apply the batch in flight and the one forming on the freshly read state."""
        self.stats.replays += 1
        for group in (batch, self._batch):
            for entry in group.entries:
                try:
                    entry.result = entry.op(self.state, self.clock_ms())
                    entry.error = None
                except OsqueueError as exc:
                    entry.error = exc

    async def _fence(self, batch: _Batch, leader: str | None) -> None:
        self.leader = False
        self.known_leader = leader
        error = BrokerLeadershipError(
            f"broker {leader} took over; this broker stepped down", leader=leader
        )
        self._fail_batch(batch, error)
        self._fail_batch(self._batch, error)
        self._batch = _Batch()
        if self.on_fenced is not None:
            outcome = self.on_fenced(leader)
            if outcome is not None:
                await outcome

    def _resolve(self, batch: _Batch) -> None:
        for entry in batch.entries:
            if entry.future.done():
                continue
            if entry.error is not None:
                entry.future.set_exception(entry.error)
            else:
                entry.future.set_result(entry.result)

    @staticmethod
    def _fail_batch(batch: _Batch, error: OsqueueError) -> None:
        for entry in batch.entries:
            if not entry.future.done():
                entry.future.set_exception(error)

    async def _backoff(self, attempt: int, deadline: float) -> None:
        cap = min(self.config.retry_cap_ms, self.config.retry_base_ms * 2**attempt)
        delay_s = self._rng.uniform(cap / 2, cap) / 1000
        await asyncio.sleep(max(0.0, min(delay_s, deadline - time.monotonic())))

    async def _retry(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        deadline = time.monotonic() + self.config.retry_deadline_ms / 1000
        attempt = 0
        while True:
            try:
                return await call()
            except StorageBackendError as exc:
                attempt += 1
                if time.monotonic() >= deadline:
                    raise StorageBackendError(f"{what} kept failing: {exc}") from exc
                log.debug("%s failed (attempt %d): %s", what, attempt, exc)
                await self._backoff(attempt, deadline)

    # -- timers -------------------------------------------------------------------------

    async def _expiry_loop(self) -> None:
        """Expire leases on a timer of its own, so expiry needs no other traffic."""
        timeout_ms = self.config.job_timeout_ms
        check_s = min(1.0, timeout_ms / 4000)
        while not self._stopping:
            if not self.leader:
                await self._leading.wait()
                continue
            oldest = self.state.oldest_lease_heartbeat_ms()
            now = self.clock_ms()
            if oldest is not None and oldest + timeout_ms <= now:
                try:
                    await self.execute(self._expire)
                except OsqueueError as exc:
                    log.warning("expiry write failed: %s", exc)
                continue
            wait_s = check_s
            if oldest is not None:
                wait_s = min(wait_s, max(0.01, (oldest + timeout_ms - now) / 1000))
            await asyncio.sleep(wait_s)

    def _expire(self, state: QueueState, now_ms: int) -> list[tuple[str, str]]:
        expired = state.expire(now_ms, self.config.job_timeout_ms)
        for job_id, outcome in expired:
            if outcome == "retry":
                log.info(
                    "job %s expired: heartbeat older than %d ms, requeued",
                    job_id,
                    self.config.job_timeout_ms,
                )
            else:
                log.info("job %s expired on its last attempt: moved to dead", job_id)
        return expired

    async def _heartbeat_loop(self) -> None:
        """Write at least every heartbeat interval so standbys see the leader alive."""
        interval_s = self.config.broker_heartbeat_interval_ms / 1000
        while not self._stopping:
            if not self.leader:
                await self._leading.wait()
                continue
            since_s = time.monotonic() - max(self._last_write_start, self._last_write_end)
            if since_s >= interval_s:
                self.request_write()
                await asyncio.sleep(interval_s)
            else:
                await asyncio.sleep(max(0.01, interval_s - since_s))
