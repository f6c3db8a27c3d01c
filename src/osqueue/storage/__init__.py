"""Storage backends: the interface, and memory, file, S3, GCS, throttled and fault stores."""

from osqueue.storage.base import STATE_KEY, Storage, Versioned, join_key
from osqueue.storage.memory import MemoryStorage

__all__ = ["STATE_KEY", "MemoryStorage", "Storage", "Versioned", "join_key"]
