"""The worker runtime: claim jobs, run their handlers, keep their leases, report the outcome.

A job's life in a worker, one named step each:

1. **claim**: ask the broker for a job of a type this worker handles. A new claim goes out
   as soon as a slot is free; an empty queue is polled with exponential backoff and jitter.
2. **validate**: with a registry, check the payload against the type's model. A payload that
   does not fit is sent to ``dead`` with reason ``invalid_payload``.
3. **run**: call the handler with a :class:`JobContext`; async handlers are awaited, sync
   ones in a daemon thread (threads are kept for the next jobs).
4. **heartbeat**: while the handler runs, refresh the lease every ``heartbeat_interval_s``
   (by default a third of the job timeout the broker announces with the claim).
   If the broker answers LeaseLostError (the job expired, was reclaimed or cancelled), the
   handler is cancelled and nothing is reported: the job is no longer this worker's.
5. **report**: complete the job, or fail it with the error text ``"ExcType: message"``.
   How long the job waits before its next attempt is the retry policy's call (see
   :mod:`osqueue.retries`): the policy of the job's type in ``retry_policies``, else
   ``retry_policy``, else the broker's exponential backoff.

Every claimed job ends with exactly one of the ``on_complete`` or ``on_failure`` hooks.

Stopping (``await worker.stop()``, or SIGINT/SIGTERM while :meth:`Worker.run` runs): no new
claims; jobs in flight get ``shutdown_grace_s`` to finish, then their handlers are cancelled
and the jobs given back with ``fail(retry_delay_ms=0)`` so another worker can claim them at
once. Giving a job back uses up the attempt it was claimed with. A second signal skips the
rest of the grace period.

Delivery is at least once: a job whose lease is lost runs again elsewhere, possibly while
the first run is still finishing (a sync handler's thread cannot be stopped from outside; it
is told through :attr:`JobContext.cancel_event`). Handlers should be safe to run twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import enum
import inspect
import logging
import os
import queue
import random
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Generic, TypeVar

from osqueue.client.async_client import AsyncOsqueueClient, ClaimedJob, FailReason
from osqueue.errors import (
    BrokerProtocolError,
    ConfigError,
    JobNotFoundError,
    LeaseLostError,
    OsqueueError,
    WorkerExecutionError,
)
from osqueue.registry import JobRegistry
from osqueue.retries import FailureAction, RetryPolicy

__all__ = [
    "DEFAULT_HEARTBEAT_INTERVAL_S",
    "FailureAction",
    "Handler",
    "JobContext",
    "RetryPolicy",
    "Worker",
]

log = logging.getLogger("osqueue.worker")

P = TypeVar("P")

#: Heartbeat interval when the broker does not announce its job timeout (a third of 30 s).
DEFAULT_HEARTBEAT_INTERVAL_S: Final = 10.0
DEFAULT_POLL_MIN_S: Final = 0.05
DEFAULT_POLL_MAX_S: Final = 2.0
#: How long an idle worker's claim waits at the broker for a job (0: plain polling).
DEFAULT_CLAIM_WAIT_MS: Final = 5_000
DEFAULT_SHUTDOWN_GRACE_S: Final = 30.0
DEFAULT_GIVE_BACK_TIMEOUT_S: Final = 5.0
#: Handler keys: the job type, or this one for every other type (untyped jobs included).
ANY_TYPE: Final = "*"
#: At most this many claims of one worker are in flight at once.
MAX_PARALLEL_CLAIMS: Final = 16
#: Error texts sent to the broker are cut to this many characters (they live in the state).
MAX_ERROR_CHARS: Final = 2000


@dataclass(frozen=True, slots=True)
class JobContext(Generic[P]):
    """What a handler gets: the job, its payload (the validated model when the type is
    registered, else the JSON value) and a way to learn the worker gave up on it."""

    job_id: str
    type: str | None
    attempt: int
    max_attempts: int
    payload: P
    raw_payload: Any
    worker_id: str
    #: Set when the worker stops waiting for this run (lease lost, or shutdown past grace).
    #: Sync handlers doing long work should check it.
    cancel_event: threading.Event = field(default_factory=threading.Event)
    claimed_at_s: float = field(default_factory=time.monotonic)
    #: The broker's job timeout for this lease, when it said (ms).
    lease_timeout_ms: int | None = None

    @property
    def cancelled(self) -> bool:
        """Whether the worker has given up on this run."""
        return self.cancel_event.is_set()

    def elapsed_s(self) -> float:
        """Seconds since the job was claimed."""
        return time.monotonic() - self.claimed_at_s


#: A handler takes the job's context; it may be a coroutine function or a plain function.
Handler = Callable[[JobContext[Any]], Any]
ClaimHook = Callable[[JobContext[Any]], Any]
CompleteHook = Callable[[JobContext[Any], Any], Any]
FailureHook = Callable[[JobContext[Any], BaseException], Any]


class _Ending(enum.Enum):
    COMPLETED = "completed"
    RAISED = "raised"
    LEASE_LOST = "lease lost"
    SHUTDOWN = "shutdown"


@dataclass(slots=True)
class _Run:
    """A job in flight: its context, its handler task and why that task was cancelled."""

    ctx: JobContext[Any]
    handler_task: asyncio.Task[Any] | None = None
    lease_lost: LeaseLostError | None = None
    shut_down: bool = False

    def cancel(self) -> None:
        self.ctx.cancel_event.set()
        if self.handler_task is not None:
            self.handler_task.cancel()


def default_worker_id() -> str:
    """``host-pid-random``: unique per worker, readable in the broker's logs."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def error_text(exc: BaseException) -> str:
    """``"ExcType: message"``, cut to :data:`MAX_ERROR_CHARS`."""
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


def _is_async(func: Callable[..., Any]) -> bool:
    call = getattr(func, "__call__", None)  # noqa: B004 - async callable objects too
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(call)


class _DaemonThreads:
    """Daemon threads that run sync handlers, kept between jobs.

    Not :func:`asyncio.to_thread`: a handler that ignores cancellation would keep the
    default executor, and so the process, alive past the shutdown grace period. A thread is
    reused once its call returns; when none is free a new one starts, so a handler stuck in
    an abandoned run never holds up the next job.
    """

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._free = 0

    async def run(self, func: Callable[[Any], Any], arg: Any) -> Any:
        """Run ``func(arg)`` in one of the threads and await its result."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        context = contextvars.copy_context()

        def settle(ok: bool, value: Any) -> None:
            if future.done():  # the worker stopped waiting (lease lost, shutdown)
                return
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

        def call() -> None:
            try:
                outcome = (True, context.run(func, arg))
            except BaseException as exc:
                outcome = (False, exc)
            with contextlib.suppress(RuntimeError):  # the loop closed while the thread ran
                loop.call_soon_threadsafe(settle, *outcome)

        with self._lock:
            start = self._free == 0
            if not start:
                self._free -= 1
        if start:
            threading.Thread(target=self._serve, name="osqueue-job", daemon=True).start()
        self._calls.put(call)
        return await future

    def _serve(self) -> None:
        while True:
            self._calls.get()()
            with self._lock:
                self._free += 1


class Worker:
    """Runs job handlers for jobs claimed from a broker.

    ``handlers`` maps job types to handlers (``"*"`` catches every other type), or is a
    :class:`~osqueue.registry.JobRegistry` whose handlers and models are used. ``registry``
    (default: the registry of ``handlers`` or of the client) validates payloads. ``types``
    defaults to the handlers' types, or every type when there is a ``"*"`` handler.

    Hooks may be sync or async: ``on_claim(ctx)``, ``on_complete(ctx, result)`` and
    ``on_failure(ctx, error)``; an error in a hook is logged and does not change the job's
    outcome.

    ``retry_policies`` maps job types to the policy for their failures, and
    ``retry_policy`` is the policy of every other type; a policy is a function
    ``(ctx, error) -> FailureAction``, such as :class:`~osqueue.retries.ExponentialBackoff`
    or :class:`~osqueue.retries.FixedBackoff`. Without one the broker picks the delay.
    """

    def __init__(
        self,
        client: AsyncOsqueueClient,
        handlers: Mapping[str, Handler] | JobRegistry,
        *,
        concurrency: int = 4,
        worker_id: str | None = None,
        types: Iterable[str] | None = None,
        registry: JobRegistry | None = None,
        heartbeat_interval_s: float | None = None,
        poll_min_s: float = DEFAULT_POLL_MIN_S,
        poll_max_s: float = DEFAULT_POLL_MAX_S,
        claim_wait_ms: int = DEFAULT_CLAIM_WAIT_MS,
        shutdown_grace_s: float = DEFAULT_SHUTDOWN_GRACE_S,
        give_back_timeout_s: float = DEFAULT_GIVE_BACK_TIMEOUT_S,
        on_claim: ClaimHook | None = None,
        on_complete: CompleteHook | None = None,
        on_failure: FailureHook | None = None,
        retry_policy: RetryPolicy | None = None,
        retry_policies: Mapping[str, RetryPolicy] | None = None,
    ) -> None:
        if isinstance(handlers, JobRegistry):
            registry = registry or handlers
            handlers = handlers.handlers
        _check_settings(
            concurrency, heartbeat_interval_s or DEFAULT_HEARTBEAT_INTERVAL_S,
            poll_min_s, poll_max_s, handlers,
        )  # fmt: skip
        _check_retry_policies(retry_policies or {}, handlers)
        self.client = client
        self.handlers: dict[str, Handler] = dict(handlers)
        self.registry = registry or client.registry
        self.concurrency = concurrency
        self.worker_id = worker_id or default_worker_id()
        self.types = self._claim_types(types)
        self.heartbeat_interval_s = heartbeat_interval_s
        self.poll_min_s = poll_min_s
        self.poll_max_s = poll_max_s
        self.claim_wait_ms = claim_wait_ms
        self.shutdown_grace_s = shutdown_grace_s
        self.give_back_timeout_s = give_back_timeout_s
        self.on_claim = on_claim
        self.on_complete = on_complete
        self.on_failure = on_failure
        self.retry_policy = retry_policy
        self.retry_policies: dict[str, RetryPolicy] = dict(retry_policies or {})
        self._runs: dict[asyncio.Task[None], _Run] = {}
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._work_seen = asyncio.Event()
        self._claiming = 0
        self._long_polls: set[asyncio.Task[Any]] = set()
        self._stopped = asyncio.Event()
        self._started = False
        self._rng = random.Random()
        self._threads = _DaemonThreads()

    def _claim_types(self, types: Iterable[str] | None) -> list[str] | None:
        if types is not None:
            return list(types)
        if ANY_TYPE in self.handlers:
            return None
        return list(self.handlers)

    def __repr__(self) -> str:
        return f"Worker({self.worker_id!r}, types={self.types!r})"

    @property
    def in_flight(self) -> int:
        """How many jobs this worker is running now."""
        return len(self._runs)

    # -- lifecycle ----------------------------------------------------------------------

    async def run(self, *, install_signal_handlers: bool = True) -> None:
        """Claim and run jobs until :meth:`stop` (or SIGINT/SIGTERM), then drain.

        Signal handlers are installed only from the main thread, and removed on return.
        """
        if self._started:
            raise ConfigError("a Worker runs once; create a new one to run again")
        self._started = True
        log.info(
            "worker %s started: types %s, concurrency %d",
            self.worker_id, self.types or "all", self.concurrency,
        )  # fmt: skip
        try:
            with self._signal_handlers(install_signal_handlers):
                try:
                    await self._claim_loop()
                finally:
                    await self._drain()
        finally:
            self._stopped.set()
        log.info("worker %s stopped", self.worker_id)

    def request_stop(self) -> None:
        """Stop claiming and start the shutdown; returns at once (see :meth:`stop`)."""
        self._stop.set()
        self._slot_freed.set()

    async def stop(self) -> None:
        """Stop claiming, let jobs in flight finish within the grace period, give back the
        rest, and return when :meth:`run` has finished."""
        self.request_stop()
        if self._started:
            await self._stopped.wait()

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self._stop.is_set():
            log.warning("%s again: cancelling %d jobs in flight now", name, len(self._runs))
            self._force.set()
            return
        log.info(
            "%s: no new claims; %d jobs in flight get %.1fs to finish",
            name, len(self._runs), self.shutdown_grace_s,
        )  # fmt: skip
        self.request_stop()

    @contextlib.contextmanager
    def _signal_handlers(self, install: bool) -> Iterator[None]:
        installed: list[signal.Signals] = []
        if install and threading.current_thread() is threading.main_thread():
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.add_signal_handler(signum, self._on_signal, signum)
                    installed.append(signum)
        try:
            yield
        finally:
            for installed_signum in installed:
                asyncio.get_running_loop().remove_signal_handler(installed_signum)

    # -- step 1: claim ------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        """Claim with several requests in flight, so free slots fill at the broker's pace.

        Each claim waits for a commit, so one claim at a time would cap a worker at one job
        per commit interval. Claimer 0 always polls; the others park while the queue looks
        empty (``_work_seen`` cleared) so an idle worker sends one poll at a time.
        """
        count = min(self.concurrency, MAX_PARALLEL_CLAIMS)
        claimers = [
            asyncio.create_task(self._claimer(i), name=f"osqueue-claimer-{i}") for i in range(count)
        ]
        stopping = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait([*claimers, stopping], return_when=asyncio.FIRST_COMPLETED)
            for claimer in claimers:
                if claimer.done() and not claimer.cancelled():
                    claimer.result()  # a claimer that crashed re-raises here
            # A claim waiting at the broker is abandoned: the broker releases a waiting
            # claim when its client goes away. A plain claim may already be committing,
            # so it is awaited, and a job it brings is given back at once.
            for claimer in self._long_polls:
                claimer.cancel()
            await asyncio.wait(claimers, timeout=self.give_back_timeout_s)
        finally:
            stopping.cancel()
            for claimer in claimers:
                claimer.cancel()
            await asyncio.gather(*claimers, return_exceptions=True)

    async def _claimer(self, index: int) -> None:
        idle_polls = 0
        while not self._stop.is_set():
            if index > 0:
                await self._wait_for_work_seen()
            await self._wait_for_slot()
            if self._stop.is_set():
                return
            # An idle claimer 0 waits at the broker instead of sleeping between polls: it
            # hears of a new or newly due job as soon as it is committed.
            wait_ms = self.claim_wait_ms if index == 0 and idle_polls else 0
            asked_at_s = time.monotonic()
            job = await self._counted_claim(wait_ms)
            if job is None:
                self._work_seen.clear()
                if index > 0:
                    continue
                idle_polls += 1
                if time.monotonic() - asked_at_s < self.claim_wait_ms / 2000:  # at once: back off
                    await self._idle_wait(idle_polls)
                continue
            if self._stop.is_set():
                await self._give_back_unstarted(job)
                return
            idle_polls = 0
            self._work_seen.set()
            self._start(job)

    async def _counted_claim(self, wait_ms: int) -> ClaimedJob | None:
        """One claim, counted against the free slots; a waiting one is cancellable on stop."""
        current = asyncio.current_task()
        self._claiming += 1
        if wait_ms and current is not None:
            self._long_polls.add(current)
        try:
            return await self._claim(wait_ms)
        finally:
            self._claiming -= 1
            if current is not None:
                self._long_polls.discard(current)

    async def _give_back_unstarted(self, job: ClaimedJob) -> None:
        """A claim answered after the stop: hand the job straight back."""
        log.info("gave back job %s unstarted: worker stopping", job.job_id)
        try:
            await self.client.fail(
                job.job_id, self.worker_id, f"worker {self.worker_id} stopped before starting it",
                0, job.attempts,
            )  # fmt: skip
        except OsqueueError as exc:
            log.warning("could not give back job %s: %r", job.job_id, exc)

    async def _wait_for_work_seen(self) -> None:
        while not self._work_seen.is_set() and not self._stop.is_set():
            stop = asyncio.ensure_future(self._stop.wait())
            seen = asyncio.ensure_future(self._work_seen.wait())
            await asyncio.wait((stop, seen), return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            seen.cancel()

    async def _wait_for_slot(self) -> None:
        while len(self._runs) + self._claiming >= self.concurrency and not self._stop.is_set():
            self._slot_freed.clear()
            await self._slot_freed.wait()

    async def _claim(self, wait_ms: int = 0) -> ClaimedJob | None:
        try:
            return await self.client.claim(self.worker_id, self.types, wait_ms=wait_ms)
        except OsqueueError as exc:
            level = logging.WARNING if exc.retryable else logging.ERROR
            log.log(level, "worker %s could not claim: %r", self.worker_id, exc)
            return None

    async def _idle_wait(self, idle_polls: int) -> None:
        ceiling_s = min(self.poll_max_s, self.poll_min_s * 2 ** min(idle_polls - 1, 30))
        delay_s = ceiling_s * (0.5 + 0.5 * self._rng.random())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), delay_s)

    def _start(self, job: ClaimedJob) -> None:
        ctx = JobContext(
            job.job_id, job.type, job.attempts, job.max_attempts,
            job.payload, job.payload, self.worker_id, lease_timeout_ms=job.timeout_ms,
        )  # fmt: skip
        log.info(
            "claimed job %s (%s) attempt %d/%d",
            job.job_id, job.type or "untyped", job.attempts, job.max_attempts,
        )  # fmt: skip
        run = _Run(ctx)
        task = asyncio.create_task(self._process(run), name=f"osqueue-job-{job.job_id}")
        self._runs[task] = run
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._runs.pop(task, None)
        self._slot_freed.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("job task failed unexpectedly", exc_info=task.exception())

    async def _process(self, run: _Run) -> None:
        """One job's life after its claim: validate, run with heartbeats, report."""
        invalid: BrokerProtocolError | None = None
        try:
            run.ctx = self._validate(run.ctx)
        except BrokerProtocolError as exc:
            invalid = exc
        await self._hook(self.on_claim, run.ctx)
        if invalid is not None:
            await self._report_invalid(run.ctx, invalid)
            return
        handler = self.handlers.get(run.ctx.type or "", self.handlers.get(ANY_TYPE))
        if handler is None:
            missing = WorkerExecutionError(
                f"worker {self.worker_id} has no handler for job type {run.ctx.type!r}"
            )
            await self._report_failure(run.ctx, missing)
            return
        ending, value = await self._run_with_heartbeats(run, handler)
        await self._report(run.ctx, ending, value)

    # -- step 2: validate ---------------------------------------------------------------

    def _validate(self, ctx: JobContext[Any]) -> JobContext[Any]:
        """The context with the payload as the registered model's instance, when there is
        one; raises BrokerProtocolError when the payload does not fit it."""
        if self.registry is None or self.registry.model_for(ctx.type) is None:
            return ctx
        model = self.registry.validate(ctx.type, ctx.raw_payload)
        return JobContext(
            ctx.job_id, ctx.type, ctx.attempt, ctx.max_attempts, model, ctx.raw_payload,
            ctx.worker_id, ctx.cancel_event, ctx.claimed_at_s,
        )  # fmt: skip

    # -- steps 3 and 4: run, heartbeat --------------------------------------------------

    async def _run_with_heartbeats(self, run: _Run, handler: Handler) -> tuple[_Ending, Any]:
        run.handler_task = asyncio.create_task(self._call_handler(handler, run.ctx))
        interval_s = self._heartbeat_interval_s(run.ctx)
        beats: list[asyncio.Task[None]] = []

        def start_beating() -> None:
            beats.append(asyncio.create_task(self._heartbeat_loop(run, interval_s)))

        # Most jobs end before their first heartbeat is due: a timer costs less than a task.
        first_beat = asyncio.get_running_loop().call_later(interval_s, start_beating)
        try:
            await asyncio.wait({run.handler_task})
        finally:
            first_beat.cancel()
            for beat in beats:
                beat.cancel()
            run.handler_task.cancel()
            await asyncio.gather(*beats, return_exceptions=True)
        return self._ending(run, run.handler_task)

    @staticmethod
    def _ending(run: _Run, task: asyncio.Task[Any]) -> tuple[_Ending, Any]:
        if task.cancelled():
            if run.lease_lost is not None:
                return _Ending.LEASE_LOST, run.lease_lost
            if run.shut_down:
                return _Ending.SHUTDOWN, None
            return _Ending.RAISED, asyncio.CancelledError("the handler was cancelled")
        error = task.exception()
        if error is not None:
            return _Ending.RAISED, error
        return _Ending.COMPLETED, task.result()

    async def _call_handler(self, handler: Handler, ctx: JobContext[Any]) -> Any:
        if _is_async(handler):
            return await handler(ctx)
        result = await self._threads.run(handler, ctx)
        if inspect.isawaitable(result):
            result = await result
        return result

    def _heartbeat_interval_s(self, ctx: JobContext[Any]) -> float:
        if self.heartbeat_interval_s is not None:
            return self.heartbeat_interval_s
        # a third of the broker's timeout leaves room for two lost heartbeats
        lease_s = (ctx.lease_timeout_ms or 0) / 1000
        return lease_s / 3 if lease_s else DEFAULT_HEARTBEAT_INTERVAL_S

    async def _heartbeat_loop(self, run: _Run, interval_s: float) -> None:
        """Heartbeat now, then every ``interval_s``, until the lease is lost."""
        ctx = run.ctx
        while True:
            try:
                await self.client.heartbeat(ctx.job_id, self.worker_id, ctx.attempt)
            except (LeaseLostError, JobNotFoundError) as exc:
                run.lease_lost = (
                    exc if isinstance(exc, LeaseLostError) else LeaseLostError(exc.message)
                )
                log.warning(
                    "lost the lease on job %s after %.3fs; cancelling its handler: %s",
                    ctx.job_id, ctx.elapsed_s(), exc.message,
                )  # fmt: skip
                run.cancel()
                return
            except OsqueueError as exc:
                log.warning("heartbeat of job %s failed, will try again: %r", ctx.job_id, exc)
            await asyncio.sleep(interval_s)

    # -- step 5: report -----------------------------------------------------------------

    async def _report(self, ctx: JobContext[Any], ending: _Ending, value: Any) -> None:
        if ending is _Ending.COMPLETED:
            await self._report_success(ctx, value)
        elif ending is _Ending.RAISED:
            await self._report_failure(ctx, value)
        elif ending is _Ending.LEASE_LOST:
            await self._hook(self.on_failure, ctx, value)
        else:
            await self._give_back(ctx)

    async def _report_success(self, ctx: JobContext[Any], result: Any) -> None:
        try:
            await self.client.complete(ctx.job_id, self.worker_id, ctx.attempt)
        except OsqueueError as exc:
            log.warning(
                "job %s finished in %.3fs but could not be reported complete; "
                "it will run again: %r",
                ctx.job_id, ctx.elapsed_s(), exc,
            )  # fmt: skip
            await self._hook(self.on_failure, ctx, exc)
            return
        log.info("completed job %s in %.3fs", ctx.job_id, ctx.elapsed_s())
        await self._hook(self.on_complete, ctx, result)

    async def _report_failure(self, ctx: JobContext[Any], error: BaseException) -> None:
        action = self._failure_action(ctx, error)
        text = error_text(error)
        last = action.dead or ctx.attempt >= ctx.max_attempts
        log.info(
            "failed job %s attempt %d/%d in %.3fs%s: %s",
            ctx.job_id, ctx.attempt, ctx.max_attempts, ctx.elapsed_s(),
            " (to dead)" if last else "", text,
        )  # fmt: skip
        reason: FailReason | None = "failed" if action.dead else None
        await self._send_fail(ctx, text, retry_delay_ms=action.retry_delay_ms, reason=reason)
        await self._hook(self.on_failure, ctx, error)

    async def _report_invalid(self, ctx: JobContext[Any], error: BrokerProtocolError) -> None:
        text = error_text(error)
        log.info(
            "job %s has an invalid payload, sending it to dead after %.3fs: %s",
            ctx.job_id, ctx.elapsed_s(), text,
        )  # fmt: skip
        await self._send_fail(ctx, text, reason="invalid_payload")
        await self._hook(self.on_failure, ctx, error)

    async def _give_back(self, ctx: JobContext[Any]) -> None:
        # NOTE: the protocol has no "release" that leaves the attempt uncounted, so a job
        # given back on its last attempt goes to dead (reason "exhausted").
        text = f"worker {self.worker_id} stopped before the job finished"
        log.info("gave back job %s after %.3fs: worker stopping", ctx.job_id, ctx.elapsed_s())
        await self._send_fail(ctx, text, retry_delay_ms=0)
        await self._hook(self.on_failure, ctx, WorkerExecutionError(text))

    async def _send_fail(
        self,
        ctx: JobContext[Any],
        text: str,
        *,
        retry_delay_ms: int | None = None,
        reason: FailReason | None = None,
    ) -> None:
        try:
            await self.client.fail(
                ctx.job_id, self.worker_id, text, retry_delay_ms, ctx.attempt, reason
            )
        except LeaseLostError as exc:
            log.warning("could not report job %s failed, lease lost: %s", ctx.job_id, exc.message)
        except OsqueueError as exc:
            log.warning(
                "could not report job %s failed; it runs again when its lease expires: %r",
                ctx.job_id, exc,
            )  # fmt: skip

    def _failure_action(self, ctx: JobContext[Any], error: BaseException) -> FailureAction:
        policy = self.retry_policies.get(ctx.type or "", self.retry_policy)
        if policy is None:
            return FailureAction()
        try:
            return policy(ctx, error)
        except Exception:
            log.exception("retry policy raised for job %s; using the default", ctx.job_id)
            return FailureAction()

    async def _hook(self, hook: Callable[..., Any] | None, *args: Any) -> None:
        if hook is None:
            return
        try:
            result = hook(*args)
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("hook %s raised", getattr(hook, "__name__", hook))

    # -- shutdown -----------------------------------------------------------------------

    async def _drain(self) -> None:
        """Wait for jobs in flight up to the grace period, then cancel and give back."""
        if self._runs:
            await self._wait_for_runs(self.shutdown_grace_s, until_forced=True)
        if self._runs:
            log.info("grace period over: giving back %d jobs", len(self._runs))
            for run in self._runs.values():
                run.shut_down = True
                run.cancel()
            await self._wait_for_runs(self.give_back_timeout_s, until_forced=False)
        for task in list(self._runs):
            task.cancel()
        await asyncio.gather(*self._runs, return_exceptions=True)

    async def _wait_for_runs(self, timeout_s: float, *, until_forced: bool) -> None:
        """Wait until no job is in flight, ``timeout_s`` passes, or (``until_forced``) a
        second signal arrives."""
        all_done = asyncio.ensure_future(asyncio.wait(set(self._runs)))
        forced = asyncio.ensure_future(self._force.wait())
        waiters: set[asyncio.Future[Any]] = {all_done, forced} if until_forced else {all_done}
        try:
            await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            all_done.cancel()  # cancels the waiting only, not the jobs
            forced.cancel()


def _check_settings(
    concurrency: int,
    heartbeat_interval_s: float,
    poll_min_s: float,
    poll_max_s: float,
    handlers: Mapping[str, Handler],
) -> None:
    if concurrency < 1:
        raise ConfigError(f"concurrency must be at least 1, not {concurrency}")
    if heartbeat_interval_s <= 0:
        raise ConfigError(f"heartbeat_interval_s must be positive, not {heartbeat_interval_s}")
    if not 0 < poll_min_s <= poll_max_s:
        raise ConfigError(
            f"need 0 < poll_min_s <= poll_max_s, got poll_min_s={poll_min_s}, "
            f"poll_max_s={poll_max_s}"
        )
    if not handlers:
        raise ConfigError("a Worker needs at least one handler (a dict of type -> function)")
    for type_, handler in handlers.items():
        if not callable(handler):
            raise ConfigError(f"handler of job type {type_!r} is not callable: {handler!r}")


def _check_retry_policies(
    policies: Mapping[str, RetryPolicy], handlers: Mapping[str, Handler]
) -> None:
    for type_, policy in policies.items():
        if type_ == ANY_TYPE:
            raise ConfigError(
                "retry_policies maps job types; give the policy of every other type as "
                "retry_policy="
            )
        if type_ not in handlers and ANY_TYPE not in handlers:
            raise ConfigError(
                f"retry_policies names job type {type_!r}, which this worker has no handler "
                f"for (handlers: {', '.join(sorted(handlers))})"
            )
        if not callable(policy):
            raise ConfigError(f"retry policy of job type {type_!r} is not callable: {policy!r}")
