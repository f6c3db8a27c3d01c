"""osqueue: a distributed job queue whose whole state is one JSON document on object storage.

Producers submit jobs, workers claim them, heartbeat while they run, and complete or fail
them; one broker batches every change into a single compare-and-swap write. Delivery is at
least once: a job may run again when its worker dies or loses its lease.
"""

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
from osqueue.registry import JobRegistry
from osqueue.retries import ExponentialBackoff, FixedBackoff
from osqueue.storage import MemoryStorage, Storage
from osqueue.worker import FailureAction, JobContext, Worker

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
