"""The asyncio client. :class:`~osqueue.client.sync_client.OsqueueClient` is its sync twin.

Every method builds the REST body of its operation and hands it to a
:class:`~osqueue.client.transport.Transport`; retries and broker discovery happen here, once,
for every transport.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any, Final, Literal, Self

from pydantic import BaseModel

from osqueue.client.rest import DEFAULT_TIMEOUT_S, RestTransport, normalize_base_url
from osqueue.client.retry import ClientRetry, may_retry
from osqueue.client.transport import IDEMPOTENT_METHODS, Transport
from osqueue.errors import (
    BrokerLeadershipError,
    BrokerProtocolError,
    OsqueueError,
    TransportConfigError,
    TransportConnectionError,
    error_from_body,
)
from osqueue.registry import JobRegistry, dump_payload

__all__ = [
    "DEFAULT_BROKER_URL",
    "AsyncOsqueueClient",
    "ClaimedJob",
    "Discover",
    "FailReason",
    "JobSpec",
    "SubmitReceipt",
    "follow_leader_hint",
]

log = logging.getLogger("osqueue.client")

DEFAULT_BROKER_URL: Final = "http://localhost:8080"
DEFAULT_MAX_ATTEMPTS: Final = 3
#: Keys the client makes up for submits without one; the broker keeps them only briefly.
AUTO_KEY_PREFIX: Final = "auto:"

FailReason = Literal["failed", "invalid_payload"]

#: A discovery hook: given the URL in use and the error that made it look unusable, the URL
#: of the broker to use from now on, or None to keep the current one.
Discover = Callable[[str, OsqueueError], Awaitable[str | None]]


async def follow_leader_hint(url: str, error: OsqueueError) -> str | None:
    """A :data:`Discover` hook that follows the ``leader`` a non-leading broker names.

    Use it when the brokers' advertised addresses are reachable from the client.
    """
    leader = error.fields.get("leader") if isinstance(error, BrokerLeadershipError) else None
    return leader if isinstance(leader, str) and leader else None


@dataclass(frozen=True, slots=True)
class ClaimedJob:
    """A job handed to a worker by a claim. ``attempts`` counts this claim (1 on the first);
    pass it back as ``attempt`` to heartbeat, complete and fail."""

    job_id: str
    payload: Any
    type: str | None
    attempts: int
    max_attempts: int
    #: The broker's job timeout, when it says (heartbeat well within it), in ms.
    timeout_ms: int | None = None

    @classmethod
    def from_wire(cls, body: Any) -> ClaimedJob | None:
        """Parse a claim answer; ``{}`` (nothing claimable) is None."""
        if not isinstance(body, dict):
            raise BrokerProtocolError(f"claim answered {type(body).__name__}, not an object")
        job_id = body.get("jobId")
        if job_id is None:
            return None
        job_type = body.get("type")
        attempts = body.get("attempts", 1)
        max_attempts = body.get("maxAttempts", DEFAULT_MAX_ATTEMPTS)
        if (
            not isinstance(job_id, str)
            or not isinstance(job_type, str | None)
            or not isinstance(attempts, int)
            or not isinstance(max_attempts, int)
        ):
            raise BrokerProtocolError(f"claim answered a malformed job: {body!r:.200}")
        timeout_ms = body.get("timeoutMs")
        if not isinstance(timeout_ms, int) or isinstance(timeout_ms, bool) or timeout_ms <= 0:
            timeout_ms = None
        return cls(
            job_id, body.get("payload"), job_type or None, attempts, max_attempts, timeout_ms
        )


@dataclass(frozen=True, slots=True)
class SubmitReceipt:
    """The answer to a submit: the job's id, and whether the idempotency key was known
    (then ``job_id`` is the job submitted first, with its payload)."""

    job_id: str
    duplicate: bool = False

    @classmethod
    def from_wire(cls, body: Any) -> SubmitReceipt:
        """Parse ``{"jobId", "duplicate"?}``."""
        job_id = body.get("jobId") if isinstance(body, dict) else None
        if not isinstance(job_id, str):
            raise BrokerProtocolError(f"submit answered without a jobId: {body!r:.200}")
        return cls(job_id, body.get("duplicate") is True)


#: The optional fields of a submit body (the REST names) and of :class:`JobSpec`.
_SUBMIT_FIELDS: Final = {
    "type": "type",
    "maxAttempts": "max_attempts",
    "delayMs": "delay_ms",
    "runAt": "run_at",
    "priority": "priority",
    "idempotencyKey": "idempotency_key",
}


@dataclass(frozen=True, slots=True)
class JobSpec:
    """One job to submit. ``run_at`` is an aware datetime or milliseconds since the epoch;
    ``delay_ms`` counts from the broker's clock when it receives the job."""

    payload: Any
    type: str | None = None
    max_attempts: int | None = None
    delay_ms: int | None = None
    run_at: datetime | int | None = None
    priority: int | None = None
    idempotency_key: str | None = None

    @classmethod
    def from_body(cls, body: Any) -> JobSpec:
        """The spec of a REST submit body (``{"payload", "type"?, "maxAttempts"?, ...}``).

        Raises BrokerProtocolError for a body that is not an object, lacks ``payload`` or
        has a field a submit does not know; the values are checked by the broker.
        """
        if not isinstance(body, dict):
            raise BrokerProtocolError(f"a submit body is a JSON object, not {type(body).__name__}")
        if "payload" not in body:
            raise BrokerProtocolError("payload is required (any JSON value, null included)")
        unknown = sorted(set(body) - set(_SUBMIT_FIELDS) - {"payload"})
        if unknown:
            known = ", ".join(["payload", *_SUBMIT_FIELDS])
            raise BrokerProtocolError(f"unknown field {unknown[0]!r}; the fields are {known}")
        options = {_SUBMIT_FIELDS[k]: v for k, v in body.items() if k != "payload"}
        return cls(body["payload"], **options)


def _epoch_ms(run_at: datetime | int) -> int:
    if isinstance(run_at, datetime):
        if run_at.tzinfo is None:
            raise BrokerProtocolError("run_at must be timezone-aware (or epoch milliseconds)")
        return int(run_at.timestamp() * 1000)
    return run_at


def _delay_ms(delay_s: float | None, delay_ms: int | None) -> int | None:
    if delay_s is not None and delay_ms is not None:
        raise BrokerProtocolError("give delay_s or delay_ms, not both")
    return round(delay_s * 1000) if delay_s is not None else delay_ms


class AsyncOsqueueClient:
    """Talks to an osqueue broker from asyncio code.

    ``url`` defaults to ``BROKER_URL``, else ``http://localhost:8080``; ``token`` to
    ``OSQUEUE_TOKEN``. ``transport`` is ``"rest"``, ``"ws"``, ``"connect"`` or
    ``"connect-json"`` (see ``docs/transports.md``), any object implementing
    :class:`~osqueue.client.transport.Transport`, or a function that makes one for a broker
    URL. With a ``registry`` payloads of registered
    types are validated before they are sent. Retryable failures are retried as described in
    :mod:`osqueue.client.retry`; after a connection failure or a leadership error the
    ``discover`` hook may name another broker (not with a Transport object, which is bound
    to its broker).

    Delivery is at least once: a claimed job can be handed out again when its worker loses
    the lease, so handlers should be safe to run twice.
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
        self.auto_idempotency = auto_idempotency
        self.url = normalize_base_url(url or os.environ.get("BROKER_URL") or DEFAULT_BROKER_URL)
        self.registry = registry
        self.retry = retry or ClientRetry()
        self.discover = discover
        self._token = token if token is not None else os.environ.get("OSQUEUE_TOKEN") or None
        self._timeout_s = timeout_s
        self._rng = random.Random()
        self._closed = False
        self._factory = self._transport_factory(transport)
        made = self._factory(self.url) if self._factory else transport
        if not isinstance(made, Transport):
            raise TransportConfigError(f"{made!r} does not implement Transport")
        self._transport: Transport = made
        if discover is not None and self._factory is None:
            raise TransportConfigError(
                "discover= needs a transport that can be pointed at another broker: "
                "transport='rest' or a function of the URL, not a Transport object"
            )

    def _transport_factory(
        self, transport: str | Transport | Callable[[str], Transport]
    ) -> Callable[[str], Transport] | None:
        if isinstance(transport, Transport):
            return None
        if not isinstance(transport, str):
            if callable(transport):
                return transport
            raise TransportConfigError(
                f"transport must be 'rest', a Transport or a function of the broker URL, "
                f"not {transport!r}"
            )
        if transport == "rest":
            return lambda url: RestTransport(url, self._token, timeout_s=self._timeout_s)
        if transport == "ws":
            from osqueue.client.ws import WebSocketTransport

            return lambda url: WebSocketTransport(url, self._token, timeout_s=self._timeout_s)
        if transport in ("connect", "connect-json"):
            try:
                from osqueue.client.connect import ConnectTransport
            except ImportError as exc:
                raise TransportConfigError(str(exc)) from exc
            codec: Literal["proto", "json"] = "json" if transport == "connect-json" else "proto"
            return lambda url: ConnectTransport(url, codec, self._token, timeout_s=self._timeout_s)
        raise TransportConfigError(
            f"unknown transport {transport!r}; use 'rest', 'ws', 'connect' or 'connect-json'"
        )

    def __repr__(self) -> str:
        return f"AsyncOsqueueClient({self.url!r})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the transport's connections. Calling it twice is harmless."""
        if not self._closed:
            self._closed = True
            await self._transport.aclose()

    aclose = close

    # -- sending, retrying, discovering -------------------------------------------------

    async def call(
        self, method: str, params: dict[str, Any], *, idempotent: bool | None = None
    ) -> Any:
        """Send one protocol method through the transport, retrying what is safe to retry.

        ``idempotent`` overrides whether ``method`` is safe to send twice.
        """
        if self._closed:
            raise TransportConfigError("this client is closed; create a new one")
        if idempotent is None:
            idempotent = method in IDEMPOTENT_METHODS
        deadline = time.monotonic() + self.retry.deadline_s
        retries = 0
        while True:
            try:
                return await self._transport.call(method, params)
            except OsqueueError as exc:
                retries += 1
                delay_s = self.retry.delay_s(retries, self._rng)
                if not may_retry(exc, idempotent=idempotent) or (
                    time.monotonic() + delay_s > deadline
                ):
                    raise
                log.debug("%s failed (%r); retry %d in %.3fs", method, exc, retries, delay_s)
                await self._rediscover(exc)
                await asyncio.sleep(delay_s)

    async def _rediscover(self, error: OsqueueError) -> None:
        if self.discover is None or self._factory is None:
            return
        if not isinstance(error, TransportConnectionError | BrokerLeadershipError):
            return
        try:
            found = await self.discover(self.url, error)
        except OsqueueError as exc:
            log.warning("broker discovery failed: %r", exc)
            return
        if found is None or normalize_base_url(found) == self.url:
            return
        old, self.url = self._transport, normalize_base_url(found)
        self._transport = self._factory(self.url)
        log.info("switched to broker %s", self.url)
        await old.aclose()

    # -- submitting ---------------------------------------------------------------------

    def _submit_body(self, spec: JobSpec) -> dict[str, Any]:
        job_type, payload = spec.type, spec.payload
        if self.registry is not None:
            job_type, payload = self.registry.prepare(job_type, payload)
        elif isinstance(payload, BaseModel):
            payload = dump_payload(payload)
        optional = {name: getattr(spec, attribute) for name, attribute in _SUBMIT_FIELDS.items()}
        optional["type"] = job_type
        if spec.run_at is not None:
            optional["runAt"] = _epoch_ms(spec.run_at)
        body: dict[str, Any] = {"payload": payload}
        body.update({k: v for k, v in optional.items() if v is not None})
        return body

    async def submit(
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
        """Submit one job and return its id. See :meth:`submit_with_receipt` to learn
        whether an idempotency key was already known."""
        receipt = await self.submit_with_receipt(
            payload,
            type=type,
            max_attempts=max_attempts,
            delay_s=delay_s,
            delay_ms=delay_ms,
            run_at=run_at,
            priority=priority,
            idempotency_key=idempotency_key,
        )
        return receipt.job_id

    async def submit_with_receipt(
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
        """Submit one job; the receipt says whether ``idempotency_key`` was already known.

        ``payload`` is any JSON value, or a pydantic model instance (sent as its JSON dump;
        with a registry its type is found from its class).
        """
        key = idempotency_key or self._auto_key()
        spec = JobSpec(
            payload, type, max_attempts, _delay_ms(delay_s, delay_ms), run_at, priority, key
        )
        answer = await self.call("submitJob", self._submit_body(spec), idempotent=key is not None)
        receipt = SubmitReceipt.from_wire(answer)
        if idempotency_key is None and receipt.duplicate:
            # our own retry found the first attempt's job: to the caller it is one submit
            receipt = dataclasses.replace(receipt, duplicate=False)
        return receipt

    def _auto_key(self) -> str | None:
        """A fresh key for a submit without one, so that a retry cannot make a second job."""
        return f"{AUTO_KEY_PREFIX}{uuid.uuid4().hex}" if self.auto_idempotency else None

    async def submit_batch(self, jobs: Iterable[JobSpec]) -> list[SubmitReceipt | OsqueueError]:
        """Submit several jobs in one durable write. Results come back in order: a receipt
        for each accepted job, the error (not raised) for each refused one."""
        specs = [
            spec
            if spec.idempotency_key or not self.auto_idempotency
            else dataclasses.replace(spec, idempotency_key=self._auto_key())
            for spec in jobs
        ]
        body = {"jobs": [self._submit_body(spec) for spec in specs]}
        keyed = bool(specs) and all(spec.idempotency_key is not None for spec in specs)
        answer = await self.call("submitBatch", body, idempotent=keyed)
        results = answer.get("results") if isinstance(answer, dict) else None
        if not isinstance(results, list) or len(results) != len(specs):
            raise BrokerProtocolError(f"batch answered {len(specs)} jobs with {answer!r:.200}")
        return [_batch_result(item) for item in results]

    # -- working on jobs ----------------------------------------------------------------

    async def claim(
        self, worker_id: str, types: Iterable[str] | None = None, wait_ms: int = 0
    ) -> ClaimedJob | None:
        """Claim the next claimable job for ``worker_id`` (of one of ``types`` when given),
        waiting up to ``wait_ms`` for one; None when there is none."""
        body: dict[str, Any] = {"workerId": worker_id}
        if types is not None:
            body["types"] = list(types)
        if wait_ms > 0:
            body["waitMs"] = wait_ms
        return ClaimedJob.from_wire(await self.call("claimJob", body))

    @staticmethod
    def _lease_body(
        job_id: str, worker_id: str, attempt: int | None, **extra: Any
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"jobId": job_id, "workerId": worker_id}
        if attempt is not None:
            body["attempt"] = attempt
        body.update({k: v for k, v in extra.items() if v is not None})
        return body

    async def heartbeat(self, job_id: str, worker_id: str, attempt: int | None = None) -> None:
        """Keep the lease on a job alive. Raises LeaseLostError when it is no longer held."""
        await self.call("heartbeat", self._lease_body(job_id, worker_id, attempt))

    async def complete(self, job_id: str, worker_id: str, attempt: int | None = None) -> None:
        """Report a job done; it leaves the queue. Raises LeaseLostError when not held."""
        await self.call("completeJob", self._lease_body(job_id, worker_id, attempt))

    async def fail(
        self,
        job_id: str,
        worker_id: str,
        error: str | None = None,
        retry_delay_ms: int | None = None,
        attempt: int | None = None,
        reason: FailReason | None = None,
    ) -> None:
        """Give a job back after a failure: it runs again after ``retry_delay_ms`` (the
        broker's backoff when None) while attempts remain, else it goes to ``dead``. A
        ``reason`` sends it to ``dead`` at once."""
        body = self._lease_body(
            job_id, worker_id, attempt, error=error, retryDelayMs=retry_delay_ms, reason=reason
        )
        await self.call("failJob", body)

    # -- inspecting and administering -----------------------------------------------------

    async def stats(self) -> dict[str, Any]:
        """Queue counters: total, unclaimed, inProgress, completedTotal, dead, brokerAddress."""
        return _object(await self.call("getStats", {}), "getStats")

    async def list_jobs(self) -> dict[str, Any]:
        """The stats fields plus ``jobs``, every live job."""
        return _object(await self.call("listJobs", {}), "listJobs")

    async def get_job(self, job_id: str) -> dict[str, Any]:
        """One job, queued, in progress or dead. Raises JobNotFoundError."""
        return _object(await self.call("getJob", {"jobId": job_id}), "getJob")

    async def cancel(self, job_id: str) -> None:
        """Remove a live job; a worker holding it loses its lease. Raises JobNotFoundError."""
        await self.call("cancelJob", {"jobId": job_id})

    async def dead(self) -> dict[str, Any]:
        """``{"jobs": [dead jobs], "deadTotal"}``."""
        return _object(await self.call("listDead", {}), "listDead")

    async def requeue_dead(
        self, job_ids: Iterable[str] | None = None, *, type: str | None = None
    ) -> int:
        """Put dead jobs back in the queue with attempts 0 (all, or those with the given
        ids and/or type); returns how many."""
        body: dict[str, Any] = {}
        if job_ids is not None:
            body["jobIds"] = list(job_ids)
        if type is not None:
            body["type"] = type
        return _count(await self.call("requeueDead", body), "requeued")

    async def purge_dead(self) -> int:
        """Forget every dead job; returns how many."""
        return _count(await self.call("purgeDead", {}), "purged")


def _batch_result(item: Any) -> SubmitReceipt | OsqueueError:
    if isinstance(item, dict) and "error" in item:
        return error_from_body(item["error"], method="POST", path="/v1/jobs/batch")
    return SubmitReceipt.from_wire(item)


def _object(answer: Any, method: str) -> dict[str, Any]:
    if not isinstance(answer, dict):
        raise BrokerProtocolError(f"{method} answered {answer!r:.200}, not an object")
    return answer


def _count(answer: Any, field: str) -> int:
    value = answer.get(field) if isinstance(answer, dict) else None
    if not isinstance(value, int):
        raise BrokerProtocolError(f"answer without an integer {field!r}: {answer!r:.200}")
    return value
