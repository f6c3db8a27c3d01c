"""The osqueue error tree.

Every error osqueue raises derives from :class:`OsqueueError` and carries a stable ``tag``
(sent on the wire as ``_tag``) and an HTTP ``status``. A broker turns an error into the body
``{"_tag": ..., "message": ..., **fields}``; a client turns that body back into the same class
with :func:`error_from_body`.

    OsqueueError
    ├── CASConflictError          a conditional write lost to another writer
    ├── ConfigError               a bad setting; the message names the variable or flag
    ├── DiscoveryError            no broker address could be found in the store
    ├── TransportConfigError      a client was given an unusable transport setting
    ├── TransportRequestError     the broker answered with an error the client does not know
    ├── TransportConnectionError  the broker could not be reached
    ├── StorageBackendError       the store kept failing past the retry deadline
    ├── BrokerLeadershipError     this broker is not the leader (``leader`` names who is)
    ├── BrokerProtocolError       a malformed request (bad JSON, wrong types, unknown path)
    ├── EngineStateError          a bug inside the broker; never caused by input
    ├── WorkerExecutionError      a job handler failed
    ├── LeaseLostError            the worker no longer holds the job
    ├── AuthenticationError       a token is required and was missing or wrong
    ├── PayloadTooLargeError      a request body over the configured limit
    └── JobNotFoundError          no job with that id
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "AuthenticationError",
    "BrokerLeadershipError",
    "BrokerProtocolError",
    "CASConflictError",
    "ConfigError",
    "DiscoveryError",
    "EngineStateError",
    "JobNotFoundError",
    "LeaseLostError",
    "OsqueueError",
    "PayloadTooLargeError",
    "StorageBackendError",
    "TransportConfigError",
    "TransportConnectionError",
    "TransportRequestError",
    "WorkerExecutionError",
    "error_from_body",
]


class OsqueueError(Exception):
    """Base class of every osqueue error.

    ``fields`` are extra JSON-serialisable attributes sent beside ``_tag`` and ``message``
    (for example ``leader`` on :class:`BrokerLeadershipError`).
    """

    tag: ClassVar[str] = "OsqueueError"
    status: ClassVar[int] = 500
    retryable: ClassVar[bool] = False

    def __init__(self, message: str, **fields: Any) -> None:
        super().__init__(message)
        self.message = message
        self.fields = fields

    def __getattr__(self, name: str) -> Any:
        fields = self.__dict__.get("fields", {})
        if name in fields:
            return fields[name]
        raise AttributeError(name)

    def to_body(self) -> dict[str, Any]:
        """The wire form: ``{"_tag", "message", **fields}``."""
        return {**self.fields, "_tag": self.tag, "message": self.message}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class CASConflictError(OsqueueError):
    """A conditional write or create lost: the stored version is not the expected one."""

    tag = "CASConflictError"
    status = 409


class ConfigError(OsqueueError):
    """A setting is missing or invalid. The message names the variable or flag to fix."""

    tag = "ConfigError"
    status = 400


class DiscoveryError(OsqueueError):
    """The store names no live broker, so a client cannot find one."""

    tag = "DiscoveryError"
    status = 503
    retryable = True


class TransportConfigError(OsqueueError):
    """A client was configured with a transport it cannot use."""

    tag = "TransportConfigError"
    status = 400


class TransportRequestError(OsqueueError):
    """The broker answered with an error this client has no class for.

    Fields: ``method``, ``path``, ``status`` and ``remote_tag``.
    """

    tag = "TransportRequestError"
    status = 502


class TransportConnectionError(OsqueueError):
    """The broker could not be reached, or the connection dropped mid-request."""

    tag = "TransportConnectionError"
    status = 503
    retryable = True


class StorageBackendError(OsqueueError):
    """The object store kept failing past the retry deadline. Safe to retry later."""

    tag = "StorageBackendError"
    status = 503
    retryable = True


class BrokerLeadershipError(OsqueueError):
    """This broker does not lead the queue; ``leader`` is the leader's address or None."""

    tag = "BrokerLeadershipError"
    status = 503
    retryable = True


class BrokerProtocolError(OsqueueError):
    """The request was malformed: bad JSON, wrong field types, an unknown path or method."""

    tag = "BrokerProtocolError"
    status = 400


class EngineStateError(OsqueueError):
    """The broker reached a state it should never reach: a bug, never bad input."""

    tag = "EngineStateError"
    status = 500


class WorkerExecutionError(OsqueueError):
    """A job handler raised; the job was reported failed with the error text."""

    tag = "WorkerExecutionError"
    status = 500


class LeaseLostError(OsqueueError):
    """The worker no longer holds the job (expired, reclaimed, cancelled or completed)."""

    tag = "LeaseLostError"
    status = 409


class AuthenticationError(OsqueueError):
    """The broker requires ``Authorization: Bearer <OSQUEUE_TOKEN>`` and it was missing or wrong."""

    tag = "AuthenticationError"
    status = 401


class PayloadTooLargeError(OsqueueError):
    """The request body is larger than the broker's ``MAX_BODY_BYTES``."""

    tag = "PayloadTooLargeError"
    status = 413


class JobNotFoundError(OsqueueError):
    """The queue holds no job (queued, in progress or dead) with that id."""

    tag = "JobNotFoundError"
    status = 404


_BY_TAG: dict[str, type[OsqueueError]] = {
    cls.tag: cls
    for cls in (
        CASConflictError,
        ConfigError,
        DiscoveryError,
        TransportConfigError,
        TransportRequestError,
        TransportConnectionError,
        StorageBackendError,
        BrokerLeadershipError,
        BrokerProtocolError,
        EngineStateError,
        WorkerExecutionError,
        LeaseLostError,
        AuthenticationError,
        PayloadTooLargeError,
        JobNotFoundError,
    )
}


def error_from_body(
    body: Any, *, status: int = 0, method: str = "", path: str = ""
) -> OsqueueError:
    """Turn a broker's error body back into the matching error class.

    A body without a known ``_tag`` becomes a :class:`TransportRequestError` that keeps the
    status, the request's method and path, and whatever tag the broker sent.
    """
    if isinstance(body, dict):
        tag = body.get("_tag")
        message = body.get("message")
        fields = {k: v for k, v in body.items() if k not in ("_tag", "message")}
        text = message if isinstance(message, str) else f"broker answered {status}"
        cls = _BY_TAG.get(tag) if isinstance(tag, str) else None
        if cls is not None:
            return cls(text, **fields)
        remote_tag = tag if isinstance(tag, str) else None
    else:
        text, remote_tag = f"broker answered {status} with a body osqueue cannot read", None
    return TransportRequestError(
        text, method=method, path=path, status=status, remote_tag=remote_tag
    )
