"""Pure state transitions over the queue document, with the indexes that make them cheap.

Nothing here does I/O or reads a clock: every transition takes ``now_ms`` (and any random
jitter) as an argument, so the engine can replay a batch against a freshly read document
and tests can drive time by hand.

Indexes (rebuilt by :meth:`QueueState.from_document`):

* ``_ready_any`` and ``_ready_by_type``: heaps of claimable jobs ordered by
  (-priority, submission order). A claim with a type filter only looks at the heads of the
  heaps of those types, so its cost does not grow with the backlog of other types.
* ``_delayed``: a heap of jobs whose ``runAt`` is in the future, promoted when due.
* ``_leases``: in-progress job ids in heartbeat order, so expiry looks only at the front.
* ``_job_blocks``, ``_key_blocks``: the jobs and the idempotency keys cut into blocks of
  consecutive entries, each with its JSON cached until a transition touches one of its
  entries, so a commit re-encodes only what changed.

Heap entries are invalidated lazily: each carries the job's generation, bumped whenever the
job leaves or re-enters the claimable set, and stale entries are dropped when they surface.
Heads alone would never shed the stale entries of a heap nobody claims from, so every heap is
swept now and then (see :meth:`QueueState._compact`).
"""

from __future__ import annotations

import heapq
import sys
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from heapq import heappush
from typing import Any

import orjson

from osqueue.errors import JobNotFoundError, LeaseLostError
from osqueue.model import encode_state, freeze_payload

__all__ = [
    "DEFAULT_DEAD_LIMIT",
    "DEFAULT_IDEMPOTENCY_RETENTION_MS",
    "DEFAULT_MAX_ATTEMPTS",
    "ClaimResult",
    "QueueState",
    "SubmitResult",
    "SubmitSpec",
    "default_retry_delay_ms",
]

DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_DEAD_LIMIT = 1000
DEFAULT_IDEMPOTENCY_RETENTION_MS = 24 * 3600 * 1000
#: Idempotency keys remembered at most, whatever the retention: the oldest go first.
MAX_IDEMPOTENCY_KEYS = 100_000
#: Keys a client made up only to make its own retries safe ("auto:..."): they need to
#: outlive a retry, not a day.
AUTO_KEY_PREFIX = "auto:"
AUTO_KEY_RETENTION_MS = 10 * 60 * 1000
RETRY_BASE_MS = 1000
RETRY_CAP_MS = 5 * 60 * 1000
#: Heap entries pushed (beyond twice the live jobs) before stale entries are swept out.
COMPACTION_MIN_PUSHES = 1024
#: Bits of a job's generation in its meta int. A generation wraps after 2**20 bumps (two per
#: attempt); a stale heap entry never lives that long, as the heaps are compacted.
GEN_BITS = 20
GEN_MASK = (1 << GEN_BITS) - 1
#: Jobs per encoding block. A block is re-encoded whole when one of its jobs changes, and a
#: commit joins one piece per block: 256 keeps both the re-encoding (about 50 KB) and the
#: number of pieces (400 for 100,000 jobs) small.
JOBS_PER_BLOCK = 256
#: Idempotency keys per encoding block (the keys are cached in blocks like the jobs).
KEYS_PER_BLOCK = 512

_Entry = tuple[int, int, str, int]  # (-priority, seq, job id, generation)
_DelayedEntry = tuple[int, int, str, int]  # (runAt, seq, job id, generation)


def default_retry_delay_ms(attempts: int, jitter: float) -> int:
    """Exponential backoff from 1 s, doubling per attempt, capped at 5 min, with jitter.

    ``jitter`` in [0, 1) takes up to half of the delay away ("equal jitter").
    """
    base = min(RETRY_CAP_MS, RETRY_BASE_MS * (2 ** max(0, attempts - 1)))
    return int(base / 2 + (base / 2) * jitter)


@dataclass(slots=True)
class SubmitSpec:
    """A validated submit request. Not frozen: a frozen dataclass costs ten times as much
    to build, and a batch submit builds one per job; nothing changes one after validation."""

    payload: Any
    type: str | None = None
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    run_at_ms: int | None = None
    delay_ms: int | None = None
    priority: int = 0
    idempotency_key: str | None = None


@dataclass(slots=True)
class SubmitResult:
    job_id: str
    duplicate: bool = False


@dataclass(slots=True)
class ClaimResult:
    job_id: str
    payload: Any  # its JSON text, an orjson.Fragment (see model.freeze_payload)
    type: str | None
    attempts: int
    max_attempts: int


class _Blocks:
    """Entries of a large part of the document (job ids, idempotency keys) in blocks.

    An entry goes into the block ``seq // size`` of its sequence number, so blocks hold
    consecutive entries in document order. Each block's JSON is cached, with a trailing
    comma, until one of its entries changes; :meth:`pieces` re-encodes only the blocks
    marked dirty since the last call and gathers the rest in one pass in C.
    """

    __slots__ = ("cache", "dirty", "members", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        #: block -> its entries, in order. A list (8 bytes an entry, where a dict takes
        #: about 50): removing one of at most ``size`` entries is a short scan.
        self.members: dict[int, list[str]] = {}
        self.cache: dict[int, bytes] = {}
        self.dirty: set[int] = set()

    def add(self, seq: int, name: str) -> None:
        block = seq // self.size
        members = self.members.get(block)
        if members is None:
            members = self.members[block] = []
        members.append(name)
        self.touch(seq)

    def remove(self, seq: int, name: str) -> None:
        block = seq // self.size
        members = self.members[block]
        members.remove(name)
        if not members:
            del self.members[block]
        self.touch(seq)

    def touch(self, seq: int) -> None:
        """The entry numbered ``seq`` changed: its block must be encoded again."""
        block = seq // self.size
        self.cache.pop(block, None)
        self.dirty.add(block)

    def pieces(self, encode: Callable[[list[str]], bytes]) -> list[bytes]:
        """The blocks' JSON in order, comma-separated, ``encode`` giving a block's entries
        without brackets."""
        if self.dirty:
            for block in self.dirty:
                members = self.members.get(block)
                if members is not None:
                    self.cache[block] = encode(members) + b","
            self.dirty.clear()
        pieces = list(map(self.cache.__getitem__, self.members))
        if pieces:
            pieces[-1] = pieces[-1][:-1]
        return pieces


def _resident(job: dict[str, Any]) -> dict[str, Any]:
    """A decoded job rebuilt in the form the broker keeps: payload frozen, objects fresh.

    Decoding a document allocates each job's fields and payload side by side. Were the
    decoded jobs kept with only their payloads swapped for frozen text, the freed payload
    objects would leave holes in every memory arena, and a large queue would hold its
    decoded size in memory for good. Copying every job (through its own JSON) before the
    decoded ones are let go leaves whole arenas free to return to the system.
    """
    payload = freeze_payload(job.get("payload"))
    # The decoded job is left as it is: freeing anything of it now would leave a hole
    # that the copies fill, pinning the decoded jobs' memory. Payload None keeps its place.
    resident: dict[str, Any] = orjson.loads(orjson.dumps({**job, "payload": None}))
    resident["payload"] = payload
    resident.setdefault("attempts", 0)
    resident.setdefault("maxAttempts", DEFAULT_MAX_ATTEMPTS)
    if isinstance(resident.get("type"), str):
        resident["type"] = sys.intern(resident["type"])  # a handful of types, many jobs
    return resident


class QueueState:
    """The live queue: the document plus its indexes. Mutated in place by transitions."""

    def __init__(
        self,
        *,
        dead_limit: int = DEFAULT_DEAD_LIMIT,
        idempotency_retention_ms: int = DEFAULT_IDEMPOTENCY_RETENTION_MS,
        jobs_per_block: int = JOBS_PER_BLOCK,
        keys_per_block: int = KEYS_PER_BLOCK,
    ) -> None:
        self.dead_limit = dead_limit
        self.idempotency_retention_ms = idempotency_retention_ms
        self.extra: dict[str, Any] = {}
        self.broker: str | None = None
        self.broker_heartbeat = 0
        self.broker_id: str | None = None
        self.epoch = 0
        self.completed_total = 0
        self.dead_total = 0
        self.commit_id: str | None = None
        #: Bumped by every transition that changed the document; the engine compares it
        #: before and after an operation to know whether the batch needs a write.
        self.changes = 0
        self.jobs: dict[str, dict[str, Any]] = {}
        self.dead: deque[dict[str, Any]] = deque()
        #: key -> [job id, expiresAt], in the order the keys were given. Change it only
        #: through _remember_key and _forget_key, which keep its encoding blocks.
        self.idempotency: dict[str, list[Any]] = {}
        self._key_seq: dict[str, int] = {}
        self._next_key_seq = 0
        self._key_blocks = _Blocks(keys_per_block)
        #: job id -> seq << GEN_BITS | generation: the job's place in submission order
        #: (its block, and its tie-break in the heaps) and the generation that tells its
        #: live heap entry from stale ones. One int per job, where two dicts took twice.
        self._meta: dict[str, int] = {}
        self._next_seq = 0
        self._ready_any: list[_Entry] = []
        self._ready_by_type: dict[str | None, list[_Entry]] = {}
        self._delayed: list[_DelayedEntry] = []
        self._leases: dict[str, None] = {}
        self._job_blocks = _Blocks(jobs_per_block)
        self._pushes_since_compaction = 0

    # -- loading and saving -------------------------------------------------------------

    @classmethod
    def from_document(cls, doc: dict[str, Any], **options: Any) -> QueueState:
        """Build the state and its indexes from a decoded document.

        The document is taken over: its jobs are rebuilt one by one (see :func:`_resident`)
        and the decoded ones released, so the caller must not use ``doc["jobs"]`` after.
        """
        state = cls(**options)
        known = {
            "broker", "brokerHeartbeat", "brokerId", "epoch", "jobs", "completedTotal",
            "dead", "deadTotal", "commitId", "idempotencyKeys",
        }  # fmt: skip
        state.extra = {k: v for k, v in doc.items() if k not in known}
        state.broker = doc.get("broker")
        state.broker_heartbeat = int(doc.get("brokerHeartbeat") or 0)
        state.broker_id = doc.get("brokerId")
        state.epoch = int(doc.get("epoch") or 0)
        state.completed_total = int(doc.get("completedTotal") or 0)
        state.dead_total = int(doc.get("deadTotal") or 0)
        state.commit_id = doc.get("commitId")
        state.dead = deque(doc.get("dead") or [])
        for dead in state.dead:
            if "payload" in dead:
                dead["payload"] = freeze_payload(dead["payload"])
        for key, entry in (doc.get("idempotencyKeys") or {}).items():
            state._remember_key(key, entry)
        decoded = doc.get("jobs") or []
        doc["jobs"] = []
        for job in decoded:
            state._add(_resident(job), now_ms=None)
        del decoded  # the decoded jobs go all at once, returning whole arenas
        # Expiry reads leases front to back and stops at the first live one, so they must
        # be in heartbeat order, which the document's submission order is not.
        by_heartbeat = sorted(state._leases, key=lambda j: int(state.jobs[j].get("heartbeat") or 0))
        state._leases = dict.fromkeys(by_heartbeat)
        return state

    def to_document(self, *, whole: bool = True) -> dict[str, Any]:
        """The document as plain JSON-ready values (shares the job dicts; encode at once).

        ``whole=False`` leaves out the two large parts, the jobs and the idempotency keys,
        which :meth:`encode_parts` splices in from its cached blocks.
        """
        doc: dict[str, Any] = dict(self.extra)
        doc.update(broker=self.broker, brokerHeartbeat=self.broker_heartbeat)
        if whole:
            doc["jobs"] = list(self.jobs.values())
        doc.update(
            completedTotal=self.completed_total,
            epoch=self.epoch,
            dead=list(self.dead),
            deadTotal=self.dead_total,
        )
        if self.broker_id is not None:
            doc["brokerId"] = self.broker_id
        if self.idempotency and whole:
            doc["idempotencyKeys"] = self.idempotency
        if self.commit_id is not None:
            doc["commitId"] = self.commit_id
        return doc

    def encode(self) -> bytes:
        """The document's bytes (see :meth:`encode_parts`)."""
        return b"".join(self.encode_parts())

    def encode_parts(self) -> list[bytes]:
        """The document's bytes in pieces, re-encoding only the blocks that changed.

        Jobs live in blocks of ``jobs_per_block`` consecutive jobs, idempotency keys in
        blocks of ``keys_per_block``; each block's JSON is cached until a transition
        touches one of its entries, and the blocks are spliced into the encoded rest of
        the document. So a commit costs the encoding of the blocks
        that changed plus, for a store that needs one contiguous body, one join, whatever
        the queue's size.
        """
        head = encode_state(self.to_document(whole=False))
        parts = [head[:-1]]  # the head is never empty: it holds "broker"
        if self.idempotency:
            keys = self.idempotency
            parts.append(b',"idempotencyKeys":{')
            parts += self._key_blocks.pieces(
                lambda members: encode_state({k: keys[k] for k in members})[1:-1]
            )
            parts.append(b"}")
        jobs = self.jobs
        parts.append(b',"jobs":[')
        parts += self._job_blocks.pieces(
            lambda members: encode_state([jobs[j] for j in members])[1:-1]
        )
        parts.append(b"]}")
        return parts

    def _stale(self, job_id: str) -> None:
        self._job_blocks.touch(self._meta[job_id] >> GEN_BITS)

    # -- index upkeep ---------------------------------------------------------------

    def _add(self, job: dict[str, Any], now_ms: int | None) -> None:
        job_id = job["id"]
        self.jobs[job_id] = job
        seq = self._next_seq
        self._next_seq += 1
        self._meta[job_id] = seq << GEN_BITS
        self._job_blocks.add(seq, job_id)
        if job.get("status") == "in_progress":
            self._leases[job_id] = None
        else:
            job["status"] = "unclaimed"
            self._make_claimable(job, now_ms)

    def _make_claimable(self, job: dict[str, Any], now_ms: int | None) -> None:
        job_id = job["id"]
        gen = self._bump(job_id)
        seq = self._meta[job_id] >> GEN_BITS
        run_at = job.get("runAt")
        if isinstance(run_at, int) and (now_ms is None or run_at > now_ms):
            heapq.heappush(self._delayed, (run_at, seq, job_id, gen))
        else:
            entry = (-int(job.get("priority") or 0), seq, job_id, gen)
            heappush(self._ready_any, entry)
            type_ = job.get("type")
            by_type = self._ready_by_type.get(type_)
            if by_type is None:
                by_type = self._ready_by_type[type_] = []
            heappush(by_type, entry)
        self._pushes_since_compaction += 1
        if self._pushes_since_compaction > COMPACTION_MIN_PUSHES + 2 * len(self.jobs):
            self._compact()

    def _compact(self) -> None:
        """Drop stale entries from every heap, in place.

        A heap only sheds stale entries at its head, so the heap of a filter that no worker
        uses (or the all-jobs heap, when every worker filters) would keep one entry per job
        ever queued. Compacting after a number of pushes proportional to the live jobs
        keeps the heaps proportional to the queue at an amortised constant cost per push.
        """
        self._pushes_since_compaction = 0
        heaps: list[list[Any]] = [self._ready_any, self._delayed]
        for type_, heap in list(self._ready_by_type.items()):
            heap[:] = [e for e in heap if self._is_live(e[2], e[3])]
            if heap:
                heapq.heapify(heap)
            else:
                del self._ready_by_type[type_]
        for heap in heaps:
            heap[:] = [e for e in heap if self._is_live(e[2], e[3])]
            heapq.heapify(heap)

    def _is_live(self, job_id: str, gen: int) -> bool:
        job = self.jobs.get(job_id)
        if job is None or job["status"] != "unclaimed":
            return False
        return self._meta[job_id] & GEN_MASK == gen

    def _bump(self, job_id: str) -> int:
        """Start a new generation of the job's heap entries; returns it."""
        meta = self._meta[job_id]
        gen = (meta + 1) & GEN_MASK
        self._meta[job_id] = meta - (meta & GEN_MASK) + gen
        return gen

    def _promote_due(self, now_ms: int) -> None:
        delayed = self._delayed
        while delayed and delayed[0][0] <= now_ms:
            _run_at, _seq, job_id, gen = heapq.heappop(delayed)
            if self._is_live(job_id, gen):
                self._make_claimable(self.jobs[job_id], now_ms)

    def _head(self, heap: list[_Entry]) -> _Entry | None:
        while heap and not self._is_live(heap[0][2], heap[0][3]):
            heapq.heappop(heap)
        return heap[0] if heap else None

    def _forget(self, job_id: str) -> dict[str, Any]:
        job = self.jobs.pop(job_id)
        self._job_blocks.remove(self._meta.pop(job_id) >> GEN_BITS, job_id)
        self._leases.pop(job_id, None)
        return job

    # -- queries ------------------------------------------------------------------------

    @property
    def in_progress_count(self) -> int:
        return len(self._leases)

    def next_run_at_ms(self) -> int | None:
        """When the earliest delayed job becomes claimable, if any is waiting."""
        delayed = self._delayed
        while delayed and not self._is_live(delayed[0][2], delayed[0][3]):
            heapq.heappop(delayed)
        return delayed[0][0] if delayed else None

    def oldest_lease_heartbeat_ms(self) -> int | None:
        """The oldest heartbeat among in-progress jobs (the next to expire)."""
        for job_id in self._leases:
            return int(self.jobs[job_id].get("heartbeat") or 0)
        return None

    def stats(self) -> dict[str, Any]:
        total = len(self.jobs)
        return {
            "total": total,
            "unclaimed": total - len(self._leases),
            "inProgress": len(self._leases),
            "completedTotal": self.completed_total,
            "brokerAddress": self.broker or "",
            "dead": len(self.dead),
            "deadTotal": self.dead_total,
        }

    def find(self, job_id: str) -> dict[str, Any]:
        """A job by id, live or dead (a dead one gets ``status`` ``"dead"``)."""
        job = self.jobs.get(job_id)
        if job is not None:
            return job
        for dead in reversed(self.dead):
            if dead.get("id") == job_id:
                return {**dead, "status": "dead"}
        raise JobNotFoundError(f"no job with id {job_id!r}", jobId=job_id)

    # -- transitions ----------------------------------------------------------------

    def submit(self, spec: SubmitSpec, job_id: str, now_ms: int) -> SubmitResult:
        """Append a job, or return the existing one for a known idempotency key."""
        key = spec.idempotency_key
        if key is not None:
            self._expire_keys(now_ms)
            known = self.idempotency.get(key)
            if known is not None and known[1] > now_ms:
                return SubmitResult(str(known[0]), duplicate=True)
        job: dict[str, Any] = {
            "id": job_id,
            "status": "unclaimed",
            "payload": freeze_payload(spec.payload),
            "createdAt": now_ms,
            "attempts": 0,
            "maxAttempts": spec.max_attempts,
        }
        if spec.type is not None:
            job["type"] = sys.intern(spec.type)  # a handful of types, many jobs
        run_at = spec.run_at_ms
        if spec.delay_ms:
            run_at = now_ms + spec.delay_ms
        if run_at is not None and run_at > now_ms:
            job["runAt"] = run_at
        if spec.priority:
            job["priority"] = spec.priority
        if key is not None:
            job["idempotencyKey"] = key
            retention_ms = self.idempotency_retention_ms
            if key.startswith(AUTO_KEY_PREFIX):
                retention_ms = min(retention_ms, AUTO_KEY_RETENTION_MS)
            self._remember_key(key, [job_id, now_ms + retention_ms])
        self._add(job, now_ms)
        self.changes += 1
        return SubmitResult(job_id)

    def claim(self, worker_id: str, types: Iterable[str] | None, now_ms: int) -> ClaimResult | None:
        """Hand the best claimable job to ``worker_id``; None when nothing matches."""
        self._promote_due(now_ms)
        wanted = set(types) if types else None
        if wanted is None:
            best = self._head(self._ready_any)
        else:
            heads = [self._head(self._ready_by_type.get(t, [])) for t in wanted]
            best = min((h for h in heads if h is not None), default=None)
        if best is None:
            return None
        job = self.jobs[best[2]]
        self._bump(job["id"])
        self._stale(job["id"])
        job["status"] = "in_progress"
        job["workerId"] = worker_id
        job["heartbeat"] = now_ms
        job["attempts"] = int(job.get("attempts") or 0) + 1
        job.pop("runAt", None)
        self._leases[job["id"]] = None
        self.changes += 1
        return ClaimResult(
            job["id"], job["payload"], job.get("type"), job["attempts"], job["maxAttempts"]
        )

    def _held(self, job_id: str, worker_id: str, attempt: int | None) -> dict[str, Any]:
        job = self.jobs.get(job_id)
        if job is None or job["status"] != "in_progress" or job.get("workerId") != worker_id:
            raise LeaseLostError(f"worker {worker_id!r} does not hold job {job_id!r}", jobId=job_id)
        if attempt is not None and job["attempts"] != attempt:
            raise LeaseLostError(
                f"attempt {attempt} of job {job_id!r} is over (now at {job['attempts']})",
                jobId=job_id,
            )
        return job

    def heartbeat(self, job_id: str, worker_id: str, attempt: int | None, now_ms: int) -> None:
        job = self._held(job_id, worker_id, attempt)
        job["heartbeat"] = now_ms
        self._stale(job_id)
        self.changes += 1
        leases = self._leases
        leases.pop(job_id, None)
        leases[job_id] = None

    def complete(self, job_id: str, worker_id: str, attempt: int | None) -> None:
        self._held(job_id, worker_id, attempt)
        self._forget(job_id)
        self.completed_total += 1
        self.changes += 1

    def fail(
        self,
        job_id: str,
        worker_id: str,
        attempt: int | None,
        now_ms: int,
        *,
        error: str | None = None,
        retry_delay_ms: int | None = None,
        dead_reason: str | None = None,
        jitter: float = 0.5,
    ) -> str:
        """Give a job back. Returns ``"retry"`` or the dead reason it was buried with."""
        job = self._held(job_id, worker_id, attempt)
        self._stale(job_id)
        self.changes += 1
        if error is not None:
            job["lastError"] = error
        if dead_reason is None and job["attempts"] >= job["maxAttempts"]:
            dead_reason = "exhausted"
        if dead_reason is not None:
            self._bury(job_id, dead_reason, now_ms)
            return dead_reason
        delay = retry_delay_ms
        if delay is None:
            delay = default_retry_delay_ms(job["attempts"], jitter)
        self._release(job, now_ms + delay if delay > 0 else None, now_ms)
        return "retry"

    def _release(self, job: dict[str, Any], run_at_ms: int | None, now_ms: int) -> None:
        self._stale(job["id"])
        job["status"] = "unclaimed"
        job.pop("workerId", None)
        job.pop("heartbeat", None)
        if run_at_ms is not None:
            job["runAt"] = run_at_ms
        self._leases.pop(job["id"], None)
        self._make_claimable(job, now_ms)

    def _bury(self, job_id: str, reason: str, now_ms: int) -> dict[str, Any]:
        job = self._forget(job_id)
        job.pop("heartbeat", None)
        job.pop("runAt", None)
        job["status"] = "dead"
        job["reason"] = reason
        job["deadAt"] = now_ms
        self.dead.append(job)
        self.dead_total += 1
        while len(self.dead) > self.dead_limit:
            self.dead.popleft()
        return job

    def expire(self, now_ms: int, job_timeout_ms: int) -> list[tuple[str, str]]:
        """Release or bury every in-progress job whose heartbeat is older than the timeout.

        Returns (job id, ``"retry"`` or ``"heartbeat_timeout"``) for each expired job.
        """
        expired: list[tuple[str, str]] = []
        for job_id in list(self._leases):
            job = self.jobs[job_id]
            if int(job.get("heartbeat") or 0) + job_timeout_ms > now_ms:
                break
            self._stale(job_id)
            job["lastError"] = f"heartbeat timed out on worker {job.get('workerId')}"
            if job["attempts"] >= job["maxAttempts"]:
                self._bury(job_id, "heartbeat_timeout", now_ms)
                expired.append((job_id, "heartbeat_timeout"))
            else:
                self._release(job, None, now_ms)
                expired.append((job_id, "retry"))
        self.changes += len(expired)
        return expired

    def cancel(self, job_id: str) -> None:
        """Remove a queued or running job; its worker learns at the next heartbeat."""
        if job_id not in self.jobs:
            raise JobNotFoundError(f"no live job with id {job_id!r}", jobId=job_id)
        self._forget(job_id)
        self.changes += 1

    def requeue_dead(self, job_ids: Iterable[str] | None, type_: str | None, now_ms: int) -> int:
        """Move matching dead jobs back to the queue with ``attempts`` 0."""
        wanted = set(job_ids) if job_ids is not None else None
        keep: deque[dict[str, Any]] = deque()
        moved = 0
        for dead in self.dead:
            match = (wanted is None or dead.get("id") in wanted) and (
                type_ is None or dead.get("type") == type_
            )
            if not match or dead.get("id") in self.jobs:
                keep.append(dead)
                continue
            job = {k: v for k, v in dead.items() if k not in ("reason", "deadAt", "workerId")}
            job["status"] = "unclaimed"
            job["attempts"] = 0
            self._add(job, now_ms)
            moved += 1
        self.dead = keep
        self.changes += moved
        return moved

    def purge_dead(self) -> int:
        purged = len(self.dead)
        self.dead.clear()
        self.changes += purged
        return purged

    def _expire_keys(self, now_ms: int) -> None:
        """Forget keys past retention, oldest first, and keep at most MAX_IDEMPOTENCY_KEYS.

        Keys are stored in the order they were given, and the retention is the same for
        all, so the expired ones are at the front: this costs only what it removes.
        """
        keys = self.idempotency
        while keys:
            oldest = next(iter(keys))
            if keys[oldest][1] > now_ms and len(keys) < MAX_IDEMPOTENCY_KEYS:
                return
            self._forget_key(oldest)
            self.changes += 1

    def _remember_key(self, key: str, entry: list[Any]) -> None:
        """Store a key (a key given again moves to the end, with its new expiry)."""
        if key in self.idempotency:
            self._forget_key(key)
        self.idempotency[key] = entry
        seq = self._key_seq[key] = self._next_key_seq
        self._next_key_seq += 1
        self._key_blocks.add(seq, key)

    def _forget_key(self, key: str) -> None:
        del self.idempotency[key]
        self._key_blocks.remove(self._key_seq.pop(key), key)

    def prune_idempotency(self, now_ms: int) -> int:
        """Drop idempotency keys past their retention window."""
        stale = [k for k, (_job, expires_at) in self.idempotency.items() if expires_at <= now_ms]
        for key in stale:
            self._forget_key(key)
        self.changes += len(stale)
        return len(stale)

    def register(self, address: str, broker_id: str, now_ms: int, *, takeover: bool) -> None:
        """Record this broker as leader. A takeover bumps the epoch and resets leases."""
        if takeover:
            self.epoch += 1
            for job_id in self._leases:
                self.jobs[job_id]["heartbeat"] = now_ms
                self._stale(job_id)
        self.broker = address
        self.broker_id = broker_id
        self.broker_heartbeat = now_ms
        self.changes += 1

    def resign(self) -> None:
        """Clear ``broker`` so that a standby takes over at once."""
        self.broker = None
        self.changes += 1
