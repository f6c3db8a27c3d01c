"""The queue's operations as the broker serves them, independent of the transport.

REST, WebSocket and Connect all parse their requests into the same calls here, so every
operation behaves the same whichever way it arrives. Bodies are the REST bodies of the
contract (section 5); results are the REST answers.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import logging
import os
import random
import time
from typing import Any

from osqueue.broker import validation as v
from osqueue.engine import Engine
from osqueue.errors import BrokerProtocolError, OsqueueError
from osqueue.state import ClaimResult, QueueState, SubmitResult, SubmitSpec

__all__ = ["JobIds", "QueueService"]

log = logging.getLogger("osqueue.broker")

_LIST_DEFAULTS = {
    "type": "",
    "workerId": "",
    "createdAt": 0,
    "attempts": 0,
    "maxAttempts": 0,
    "heartbeat": 0,
}


#: Byte maps that set a version 4 UUID's version nibble (byte 6) and variant bits (byte 8).
_VERSION_4 = bytes((b & 0x0F) | 0x40 for b in range(256))
_VARIANT_RFC_4122 = bytes((b & 0x3F) | 0x80 for b in range(256))
#: Where each of a UUID's 32 hex digits goes in its text (dashes after the 8th, 12th,
#: 16th and 20th digit).
_TEXT_POSITIONS = [i + (i >= 8) + (i >= 12) + (i >= 16) + (i >= 20) for i in range(32)]


class JobIds:
    """Fresh job ids: version 4 UUID strings from ``os.urandom``, many per system call
    (``uuid.uuid4()`` makes one call and one UUID object per id)."""

    __slots__ = ("_spare",)

    PER_DRAW = 256

    def __init__(self) -> None:
        self._spare: list[str] = []

    def next(self) -> str:
        if not self._spare:
            self._spare = self.take(self.PER_DRAW)
        return self._spare.pop()

    @staticmethod
    def take(count: int) -> list[str]:
        raw = bytearray(os.urandom(16 * count))
        raw[6::16] = raw[6::16].translate(_VERSION_4)
        raw[8::16] = raw[8::16].translate(_VARIANT_RFC_4122)
        digits = binascii.hexlify(raw)
        # All ids at once, as lines of 36 characters: the dashes are there from the start
        # and each of the 32 digit columns is one strided copy (no Python code per id).
        text = bytearray(b"-" * 36 + b"\n") * count
        for digit, at in enumerate(_TEXT_POSITIONS):
            text[at::37] = digits[digit::32]
        return text.decode("ascii").splitlines()


def _submit_body(result: SubmitResult) -> dict[str, Any]:
    if result.duplicate:
        return {"jobId": result.job_id, "duplicate": True}
    return {"jobId": result.job_id}


def _claim_body(result: ClaimResult | None, timeout_ms: int) -> dict[str, Any]:
    """The claim answer; ``timeoutMs`` tells the worker how often it must heartbeat."""
    if result is None:
        return {}
    return {
        "timeoutMs": timeout_ms,
        "jobId": result.job_id,
        "payload": result.payload,
        "type": result.type,
        "attempts": result.attempts,
        "maxAttempts": result.max_attempts,
    }


class QueueService:
    """Validated queue operations on top of the engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._rng = random.Random()
        self._job_ids = JobIds()
        self._commit_signal = asyncio.Event()
        #: Claims now waiting for work (observable by tests and metrics).
        self.waiting_claims = 0
        engine.on_commit = self._after_commit

    # -- producers ----------------------------------------------------------------------

    async def submit(self, body: Any) -> dict[str, Any]:
        spec = v.parse_submit(body)
        job_id = self._job_ids.next()
        result = await self.engine.execute(lambda state, now_ms: state.submit(spec, job_id, now_ms))
        self._log_submit(spec, result)
        return _submit_body(result)

    async def submit_batch(self, body: Any) -> dict[str, Any]:
        """Submit many jobs in one durable write; invalid ones are answered one by one."""
        if not isinstance(body, dict) or not isinstance(body.get("jobs"), list):
            raise BrokerProtocolError('batch body must be {"jobs": [submit bodies]}')
        specs: list[SubmitSpec | OsqueueError] = []
        for item in body["jobs"]:
            try:
                specs.append(v.parse_submit(item))
            except OsqueueError as exc:
                specs.append(exc)
        valid = [s for s in specs if isinstance(s, SubmitSpec)]
        job_ids = self._job_ids.take(len(valid))

        def batch_op(state: QueueState, now_ms: int) -> list[SubmitResult]:
            submit = state.submit
            pairs = zip(valid, job_ids, strict=True)
            return [submit(spec, job_id, now_ms) for spec, job_id in pairs]

        results = iter(await self.engine.execute(batch_op) if valid else [])
        logged = log.isEnabledFor(logging.INFO)  # checked once, not once per job
        answers: list[dict[str, Any]] = []
        for spec in specs:
            if isinstance(spec, OsqueueError):
                answers.append({"error": spec.to_body()})
                continue
            result = next(results)
            if logged:
                self._log_submit(spec, result)
            answers.append(_submit_body(result))
        return {"results": answers}

    @staticmethod
    def _log_submit(spec: SubmitSpec, result: SubmitResult) -> None:
        if result.duplicate:
            log.info("submit with key %s matched job %s", spec.idempotency_key, result.job_id)
        else:
            log.info("submitted job %s (%s)", result.job_id, spec.type or "untyped")

    # -- workers ------------------------------------------------------------------------

    async def claim(self, body: Any) -> dict[str, Any]:
        worker_id, types, wait_ms = v.parse_claim(body)

        def op(state: QueueState, now_ms: int) -> ClaimResult | None:
            return state.claim(worker_id, types, now_ms)

        deadline = time.monotonic() + wait_ms / 1000
        while True:
            signal = self._commit_signal
            result = await self.engine.execute(op)
            if result is not None:
                log.info(
                    "claimed job %s (%s) by %s, attempt %d",
                    result.job_id, result.type or "untyped", worker_id, result.attempts,
                )  # fmt: skip
                return _claim_body(result, self.engine.config.job_timeout_ms)
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                return {}
            self.waiting_claims += 1
            try:
                await self._wait_for_work(signal, remaining_s)
            finally:
                self.waiting_claims -= 1

    async def _wait_for_work(self, signal: asyncio.Event, remaining_s: float) -> None:
        """Sleep until a commit happens, a delayed job falls due, or time runs out."""
        next_run = self.engine.state.next_run_at_ms()
        if next_run is not None:
            due_s = (next_run - self.engine.clock_ms()) / 1000
            remaining_s = min(remaining_s, max(0.001, due_s))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(signal.wait(), remaining_s)

    def _after_commit(self) -> None:
        signal, self._commit_signal = self._commit_signal, asyncio.Event()
        signal.set()

    async def heartbeat(self, job_id: Any, body: Any) -> None:
        job_id = v.parse_job_id(job_id)
        worker_id, attempt = v.parse_lease(body)
        await self.engine.execute(
            lambda state, now_ms: state.heartbeat(job_id, worker_id, attempt, now_ms)
        )

    async def complete(self, job_id: Any, body: Any) -> None:
        job_id = v.parse_job_id(job_id)
        worker_id, attempt = v.parse_lease(body)
        await self.engine.execute(lambda state, now_ms: state.complete(job_id, worker_id, attempt))
        log.info("completed job %s by %s", job_id, worker_id)

    async def fail(self, job_id: Any, body: Any) -> None:
        job_id = v.parse_job_id(job_id)
        worker_id, attempt = v.parse_lease(body)
        error, delay_ms, reason = v.parse_fail(body)
        jitter = self._rng.random()

        def op(state: QueueState, now_ms: int) -> str:
            return state.fail(
                job_id, worker_id, attempt, now_ms,
                error=error, retry_delay_ms=delay_ms, dead_reason=reason, jitter=jitter,
            )  # fmt: skip

        outcome = await self.engine.execute(op)
        if outcome == "retry":
            log.info("failed job %s by %s, will retry: %s", job_id, worker_id, error)
        else:
            log.warning("job %s moved to dead (%s): %s", job_id, outcome, error)

    # -- inspection and administration ---------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return self.engine.state.stats()

    def list_jobs(self) -> dict[str, Any]:
        """The stats plus every live job with every field present (TS clients need ints)."""
        jobs = [{**_LIST_DEFAULTS, **job} for job in self.engine.state.jobs.values()]
        for job in jobs:
            if job["type"] is None:
                job["type"] = ""
        return {**self.stats(), "jobs": jobs}

    def get_job(self, job_id: Any) -> dict[str, Any]:
        return dict(self.engine.state.find(v.parse_job_id(job_id)))

    async def cancel(self, job_id: Any) -> None:
        job_id = v.parse_job_id(job_id)
        await self.engine.execute(lambda state, now_ms: state.cancel(job_id))
        log.info("cancelled job %s", job_id)

    def dead(self) -> dict[str, Any]:
        state = self.engine.state
        return {"jobs": list(state.dead), "deadTotal": state.dead_total}

    async def requeue_dead(self, body: Any) -> dict[str, Any]:
        job_ids, type_ = v.parse_requeue(body)
        moved = await self.engine.execute(
            lambda state, now_ms: state.requeue_dead(job_ids, type_, now_ms)
        )
        log.info("requeued %d dead jobs", moved)
        return {"requeued": moved}

    async def purge_dead(self) -> dict[str, Any]:
        purged = await self.engine.execute(lambda state, now_ms: state.purge_dead())
        log.info("purged %d dead jobs", purged)
        return {"purged": purged}
