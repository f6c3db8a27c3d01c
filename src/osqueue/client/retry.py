"""When and how often a client sends a request again.

A retry is only safe when sending the request twice cannot do the work twice:

* **idempotent methods** (reads and heartbeats, see
  :data:`~osqueue.client.transport.IDEMPOTENT_METHODS`) and **submits that carry an
  idempotency key** are retried after any retryable error: the broker could not be reached
  (:class:`~osqueue.errors.TransportConnectionError`), it does not lead
  (:class:`~osqueue.errors.BrokerLeadershipError`) or its store kept failing
  (:class:`~osqueue.errors.StorageBackendError`);
* **every other method** (a claim, a complete, a submit without a key, ...) is retried only
  when the request surely took no effect: the connection was never made, or the broker
  answered that it does not lead (a broker that does not lead applies nothing).

Waits grow exponentially with full jitter and stop at a deadline.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from osqueue.errors import (
    BrokerLeadershipError,
    OsqueueError,
    StorageBackendError,
    TransportConnectionError,
)

__all__ = ["RETRYABLE_ERRORS", "ClientRetry", "may_retry"]

#: The errors a client may answer by sending the request again.
RETRYABLE_ERRORS: tuple[type[OsqueueError], ...] = (
    TransportConnectionError,
    BrokerLeadershipError,
    StorageBackendError,
)


@dataclass(frozen=True, slots=True)
class ClientRetry:
    """Backoff between attempts: ``base_s`` doubling up to ``cap_s``, full jitter, and no
    new attempt that would start after ``deadline_s`` from the first. ``deadline_s=0``
    turns retries off."""

    #: Longer than a failover with default timings (leader timeout 10 s plus discovery).
    deadline_s: float = 30.0
    base_s: float = 0.05
    cap_s: float = 2.0

    def delay_s(self, attempt: int, rng: random.Random | None = None) -> float:
        """The wait before retry number ``attempt`` (1 for the first retry)."""
        ceiling = min(self.cap_s, self.base_s * 2 ** max(0, attempt - 1))
        return (rng or random).uniform(0.0, ceiling)


def may_retry(error: OsqueueError, *, idempotent: bool) -> bool:
    """Whether a request that failed with ``error`` may be sent again (see module doc)."""
    if not isinstance(error, RETRYABLE_ERRORS):
        return False
    if idempotent or isinstance(error, BrokerLeadershipError):
        return True
    return isinstance(error, TransportConnectionError) and error.fields.get("request_sent") is False
