"""The blocking client, for code without an event loop.

:class:`OsqueueClient` owns an event loop in a background thread and runs an
:class:`~osqueue.client.async_client.AsyncOsqueueClient` there, so both clients share one
implementation of the requests, retries and discovery.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterable
from concurrent.futures import Future
from datetime import datetime
from types import TracebackType
from typing import Any, Self, TypeVar

from osqueue.client.async_client import (
    AsyncOsqueueClient,
    ClaimedJob,
    Discover,
    FailReason,
    JobSpec,
    SubmitReceipt,
)
from osqueue.client.rest import DEFAULT_TIMEOUT_S
from osqueue.client.retry import ClientRetry
from osqueue.client.transport import Transport
from osqueue.errors import OsqueueError, TransportConfigError
from osqueue.registry import JobRegistry

__all__ = ["OsqueueClient"]

T = TypeVar("T")


class _LoopThread:
    """An event loop running forever in a daemon thread, until :meth:`close`."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="osqueue-client-loop", daemon=True
        )
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self._thread:
            coro.close()
            raise TransportConfigError(
                "OsqueueClient was called from its own loop thread; use AsyncOsqueueClient"
            )
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # KeyboardInterrupt while waiting: stop the request too
            raise

    def close(self) -> None:
        for cleanup in (self.loop.shutdown_asyncgens, self.loop.shutdown_default_executor):
            asyncio.run_coroutine_threadsafe(cleanup(), self.loop).result()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class OsqueueClient:
    """Talks to an osqueue broker from blocking code; the same methods as
    :class:`~osqueue.client.async_client.AsyncOsqueueClient`, with the same arguments.

    Safe to share between threads. Close it (or use ``with``) to stop its loop thread.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        token: str | None = None,
        transport: str | Transport | Callable[[str], Transport] = "rest",
        registry: JobRegistry | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        retry: ClientRetry | None = None,
        discover: Discover | None = None,
        auto_idempotency: bool = True,
    ) -> None:
        self._loop = _LoopThread()
        self._closed = False

        async def build() -> AsyncOsqueueClient:
            return AsyncOsqueueClient(
                url,
                token=token,
                transport=transport,
                registry=registry,
                timeout_s=timeout_s,
                retry=retry,
                discover=discover,
                auto_idempotency=auto_idempotency,
            )

        try:
            self._client = self._loop.run(build())
        except BaseException:
            self._loop.close()
            raise

    def __repr__(self) -> str:
        return f"OsqueueClient({self.url!r})"

    @property
    def url(self) -> str:
        """The broker URL in use (it changes when ``discover`` finds another broker)."""
        return self._client.url

    @property
    def registry(self) -> JobRegistry | None:
        """The job registry payloads are validated with, if any."""
        return self._client.registry

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._closed:
            coro.close()
            raise TransportConfigError("this client is closed; create a new one")
        return self._loop.run(coro)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections and stop the loop thread. Calling it twice is harmless."""
        if self._closed:
            return
        try:
            self._loop.run(self._client.close())
        finally:
            self._closed = True
            self._loop.close()

    def call(self, method: str, params: dict[str, Any], *, idempotent: bool | None = None) -> Any:
        """Send one protocol method (see :meth:`AsyncOsqueueClient.call`)."""
        return self._run(self._client.call(method, params, idempotent=idempotent))

    def submit(
        self,
        payload: Any,
        *,
        type: str | None = None,
        max_attempts: int | None = None,
        delay_s: float | None = None,
        delay_ms: int | None = None,
        run_at: datetime | int | None = None,
        priority: int | None = None,
        idempotency_key: str | None = None,
    ) -> str:
        """Submit one job and return its id."""
        return self.submit_with_receipt(
            payload,
            type=type,
            max_attempts=max_attempts,
            delay_s=delay_s,
            delay_ms=delay_ms,
            run_at=run_at,
            priority=priority,
            idempotency_key=idempotency_key,
        ).job_id

    def submit_with_receipt(
        self,
        payload: Any,
        *,
        type: str | None = None,
        max_attempts: int | None = None,
        delay_s: float | None = None,
        delay_ms: int | None = None,
        run_at: datetime | int | None = None,
        priority: int | None = None,
        idempotency_key: str | None = None,
    ) -> SubmitReceipt:
        """Submit one job; the receipt says whether ``idempotency_key`` was already known."""
        return self._run(
            self._client.submit_with_receipt(
                payload,
                type=type,
                max_attempts=max_attempts,
                delay_s=delay_s,
                delay_ms=delay_ms,
                run_at=run_at,
                priority=priority,
                idempotency_key=idempotency_key,
            )
        )

    def submit_batch(self, jobs: Iterable[JobSpec]) -> list[SubmitReceipt | OsqueueError]:
        """Submit several jobs in one durable write; a receipt or an error for each."""
        return self._run(self._client.submit_batch(list(jobs)))

    def claim(
        self, worker_id: str, types: Iterable[str] | None = None, wait_ms: int = 0
    ) -> ClaimedJob | None:
        """Claim the next claimable job, or None."""
        return self._run(self._client.claim(worker_id, types, wait_ms))

    def heartbeat(self, job_id: str, worker_id: str, attempt: int | None = None) -> None:
        """Keep the lease on a job alive. Raises LeaseLostError when it is no longer held."""
        self._run(self._client.heartbeat(job_id, worker_id, attempt))

    def complete(self, job_id: str, worker_id: str, attempt: int | None = None) -> None:
        """Report a job done. Raises LeaseLostError when it is no longer held."""
        self._run(self._client.complete(job_id, worker_id, attempt))

    def fail(
        self,
        job_id: str,
        worker_id: str,
        error: str | None = None,
        retry_delay_ms: int | None = None,
        attempt: int | None = None,
        reason: FailReason | None = None,
    ) -> None:
        """Give a job back after a failure (see :meth:`AsyncOsqueueClient.fail`)."""
        self._run(self._client.fail(job_id, worker_id, error, retry_delay_ms, attempt, reason))

    def stats(self) -> dict[str, Any]:
        """Queue counters."""
        return self._run(self._client.stats())

    def list_jobs(self) -> dict[str, Any]:
        """The stats fields plus every live job."""
        return self._run(self._client.list_jobs())

    def get_job(self, job_id: str) -> dict[str, Any]:
        """One job, queued, in progress or dead. Raises JobNotFoundError."""
        return self._run(self._client.get_job(job_id))

    def cancel(self, job_id: str) -> None:
        """Remove a live job. Raises JobNotFoundError."""
        self._run(self._client.cancel(job_id))

    def dead(self) -> dict[str, Any]:
        """``{"jobs": [dead jobs], "deadTotal"}``."""
        return self._run(self._client.dead())

    def requeue_dead(self, job_ids: Iterable[str] | None = None, *, type: str | None = None) -> int:
        """Put dead jobs back in the queue; returns how many."""
        ids = list(job_ids) if job_ids is not None else None
        return self._run(self._client.requeue_dead(ids, type=type))

    def purge_dead(self) -> int:
        """Forget every dead job; returns how many."""
        return self._run(self._client.purge_dead())
