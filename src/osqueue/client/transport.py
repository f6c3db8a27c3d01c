"""The transport interface: how a client talks to a broker.

A transport carries one request at a time to the broker and brings back its answer. The
clients (:mod:`osqueue.client.async_client`, :mod:`osqueue.client.sync_client`) speak only
this interface, so REST, WebSocket and Connect transports can sit side by side without the
clients knowing which one they hold.

Methods are named as in the WebSocket protocol (``submitJob``, ``claimJob``, ...), and
``params`` are the REST request bodies. Per-job methods (``heartbeat``, ``completeJob``,
``failJob``, ``getJob``, ``cancelJob``) carry the job id as ``params["jobId"]``. A transport
answers the decoded JSON result (``{}`` where REST answers 204) and raises osqueue errors:

* the broker's error bodies as their classes (through :func:`osqueue.errors.error_from_body`);
* :class:`~osqueue.errors.TransportConnectionError` when the broker cannot be reached or the
  connection drops; its ``request_sent`` field is False only when the request surely never
  reached the broker, so that even a call that is not idempotent may be sent again;
* :class:`~osqueue.errors.TransportConfigError` for an unusable address or setting.
"""

from __future__ import annotations

from typing import Any, Final, Literal, Protocol, get_args, runtime_checkable

__all__ = ["IDEMPOTENT_METHODS", "METHODS", "MethodName", "Transport"]

MethodName = Literal[
    "submitJob",
    "submitBatch",
    "claimJob",
    "heartbeat",
    "completeJob",
    "failJob",
    "getStats",
    "listJobs",
    "getJob",
    "cancelJob",
    "listDead",
    "requeueDead",
    "purgeDead",
]

#: Every method a transport must carry.
METHODS: Final[frozenset[str]] = frozenset(get_args(MethodName))

#: Methods that may be sent twice with the same effect and the same answer. A client
#: retries these after any retryable error; other methods only when the request surely
#: never took effect.
IDEMPOTENT_METHODS: Final[frozenset[str]] = frozenset(
    ("getStats", "listJobs", "getJob", "listDead", "heartbeat")
)


@runtime_checkable
class Transport(Protocol):
    """What a client needs from a transport. Implementations must be safe to call
    concurrently from one event loop (several requests in flight at once)."""

    async def call(self, method: str, params: dict[str, Any]) -> Any:
        """Send ``method`` with ``params`` and return the broker's decoded answer.

        Raises the osqueue error the broker answered with, or
        :class:`~osqueue.errors.TransportConnectionError` when it could not be reached.
        """
        ...

    async def aclose(self) -> None:
        """Release connections. The transport is not used after this."""
        ...
