"""osqueue: a distributed job queue whose whole state is one JSON document on object storage.

Producers submit jobs, workers claim them, heartbeat while they run, and complete or fail
them; one broker batches every change into a single compare-and-swap write. Delivery is at
least once: a job may run again when its worker dies or loses its lease.
"""

from typing import TYPE_CHECKING, Any

from osqueue.errors import (
    AuthenticationError,
    BrokerLeadershipError,
    BrokerProtocolError,
    CASConflictError,
    ConfigError,
    DiscoveryError,
    EngineStateError,
    JobNotFoundError,
    LeaseLostError,
    OsqueueError,
    PayloadTooLargeError,
    StorageBackendError,
    TransportConfigError,
    TransportConnectionError,
    TransportRequestError,
    WorkerExecutionError,
)

if TYPE_CHECKING:
    from osqueue.broker.server import BrokerConfig, run_broker_in_background
    from osqueue.client import (
        AsyncOsqueueClient,
        ClaimedJob,
        JobSpec,
        OsqueueClient,
        SubmitReceipt,
        Transport,
    )
    from osqueue.engine import EngineConfig
    from osqueue.registry import JobRegistry
    from osqueue.retries import ExponentialBackoff, FixedBackoff
    from osqueue.storage import MemoryStorage, Storage
    from osqueue.worker import FailureAction, JobContext, Worker

# The rest of the public API is imported on first use, so that `import osqueue` (and every
# CLI command) does not pay for the broker's web stack or the clients it does not use.
_LAZY = {
    "BrokerConfig": "osqueue.broker.server",
    "run_broker_in_background": "osqueue.broker.server",
    "AsyncOsqueueClient": "osqueue.client",
    "ClaimedJob": "osqueue.client",
    "JobSpec": "osqueue.client",
    "OsqueueClient": "osqueue.client",
    "SubmitReceipt": "osqueue.client",
    "Transport": "osqueue.client",
    "EngineConfig": "osqueue.engine",
    "JobRegistry": "osqueue.registry",
    "ExponentialBackoff": "osqueue.retries",
    "FixedBackoff": "osqueue.retries",
    "MemoryStorage": "osqueue.storage",
    "Storage": "osqueue.storage",
    "FailureAction": "osqueue.worker",
    "JobContext": "osqueue.worker",
    "Worker": "osqueue.worker",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'osqueue' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "AsyncOsqueueClient",
    "AuthenticationError",
    "BrokerConfig",
    "BrokerLeadershipError",
    "BrokerProtocolError",
    "CASConflictError",
    "ClaimedJob",
    "ConfigError",
    "DiscoveryError",
    "EngineConfig",
    "EngineStateError",
    "ExponentialBackoff",
    "FailureAction",
    "FixedBackoff",
    "JobContext",
    "JobNotFoundError",
    "JobRegistry",
    "JobSpec",
    "LeaseLostError",
    "MemoryStorage",
    "OsqueueClient",
    "OsqueueError",
    "PayloadTooLargeError",
    "Storage",
    "StorageBackendError",
    "SubmitReceipt",
    "Transport",
    "TransportConfigError",
    "TransportConnectionError",
    "TransportRequestError",
    "Worker",
    "WorkerExecutionError",
    "run_broker_in_background",
]
