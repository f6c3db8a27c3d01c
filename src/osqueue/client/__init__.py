"""Clients of the osqueue broker: :class:`AsyncOsqueueClient` and its blocking twin
:class:`OsqueueClient`, over a pluggable :class:`Transport` (REST today)."""

from osqueue.client.async_client import (
    DEFAULT_BROKER_URL,
    AsyncOsqueueClient,
    ClaimedJob,
    Discover,
    FailReason,
    JobSpec,
    SubmitReceipt,
    follow_leader_hint,
)
from osqueue.client.rest import RestTransport
from osqueue.client.retry import ClientRetry
from osqueue.client.sync_client import OsqueueClient
from osqueue.client.transport import METHODS, Transport

__all__ = [
    "DEFAULT_BROKER_URL",
    "METHODS",
    "AsyncOsqueueClient",
    "ClaimedJob",
    "ClientRetry",
    "Discover",
    "FailReason",
    "JobSpec",
    "OsqueueClient",
    "RestTransport",
    "SubmitReceipt",
    "Transport",
    "follow_leader_hint",
]
