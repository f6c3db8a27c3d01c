"""Storage backends: the interface, and memory, file, S3, GCS, throttled and fault stores.

Pick one with :func:`storage_from_env` (the broker's way, from ``STORAGE_URL`` or
``STORAGE_BACKEND`` and friends) or :func:`open_storage` (from a URL). The S3 and GCS
backends import their client libraries only when constructed, so ``pip install osqueue``
works without them; constructing one without its extra raises ConfigError naming it.
"""

from osqueue.storage._backoff import Backoff
from osqueue.storage._open import DEFAULT_STORAGE_DIR, open_storage, storage_from_env
from osqueue.storage.base import STATE_KEY, Storage, Versioned, join_key
from osqueue.storage.faults import CallKind, FaultKind, FaultyStorage
from osqueue.storage.file import FileStorage
from osqueue.storage.gcs import GCSStorage
from osqueue.storage.memory import MemoryStorage
from osqueue.storage.s3 import S3Storage
from osqueue.storage.throttled import ThrottledStorage, TokenBucket

__all__ = [
    "DEFAULT_STORAGE_DIR",
    "STATE_KEY",
    "Backoff",
    "CallKind",
    "FaultKind",
    "FaultyStorage",
    "FileStorage",
    "GCSStorage",
    "MemoryStorage",
    "S3Storage",
    "Storage",
    "ThrottledStorage",
    "TokenBucket",
    "Versioned",
    "join_key",
    "open_storage",
    "storage_from_env",
]
