"""The storage interface every backend implements, and the key layout.

A backend stores opaque bytes under string keys with compare-and-swap semantics. The broker
keeps the whole queue in one object, :data:`STATE_KEY`, under the backend's prefix.

What an implementation must guarantee:

* **read-your-writes**: a ``read`` after a successful ``write`` or ``create_if_not_exists``
  returns those bytes and the version that call returned;
* **conditional writes**: ``write`` succeeds only if the stored version still equals
  ``expected_version``; otherwise it raises :class:`~osqueue.errors.CASConflictError`
  and stores nothing. Writing to a key that does not exist is a conflict too: a missing
  object is only ever created through ``create_if_not_exists``;
* **one winner**: of any number of concurrent writers holding the same version (or creating
  the same missing key), exactly one succeeds;
* **opaque versions**: the version is returned to the backend byte for byte as it was
  received (an S3 ETag keeps its quotes);
* **typed failures**: anything that is not a conflict is raised as
  :class:`~osqueue.errors.StorageBackendError`; callers retry those with backoff;
* **known and unknown outcomes**: a CASConflictError means the call stored nothing. A
  StorageBackendError from ``write`` or ``create_if_not_exists`` means the outcome is unknown
  (the request may have landed and its reply been lost): re-read, and recognise your own
  write by its content (osqueue's ``commitId``), before writing again.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["STATE_KEY", "Storage", "Versioned", "join_key"]

#: The one object that holds the queue, relative to the backend's prefix.
STATE_KEY = "queue.json"


def join_key(prefix: str, key: str) -> str:
    """The full object name of ``key`` under ``prefix`` (``"a/b"`` + ``"queue.json"``)."""
    prefix = prefix.strip("/")
    return f"{prefix}/{key}" if prefix else key


@dataclass(frozen=True, slots=True)
class Versioned:
    """Bytes read from a backend, with the version token that identifies them."""

    data: bytes
    version: str


class Storage(ABC):
    """A key-value store with compare-and-swap writes. See the module docstring."""

    #: Short backend name for logs and stats (``"memory"``, ``"file"``, ``"s3"``...).
    name: str = "storage"

    #: The smallest gap between two writes of one object that the backend tolerates,
    #: in milliseconds. The commit engine never writes faster than this.
    min_write_interval_ms: int = 0

    @abstractmethod
    async def read(self, key: str) -> Versioned | None:
        """The bytes stored under ``key`` and their version, or None if absent."""

    @abstractmethod
    async def write(self, key: str, data: bytes, expected_version: str) -> str:
        """Replace ``key`` if its version is ``expected_version``; return the new version.

        Raises CASConflictError if the version differs or the key is absent.
        """

    async def write_parts(self, key: str, parts: Sequence[bytes], expected_version: str) -> str:
        """:meth:`write` of the concatenation of ``parts``.

        The engine hands the document over in the pieces it caches; a backend that can
        store them without one contiguous copy (the memory store) overrides this.
        """
        return await self.write(key, b"".join(parts), expected_version)

    @abstractmethod
    async def create_if_not_exists(self, key: str, data: bytes) -> str:
        """Create ``key`` if it is absent; return its version. CASConflictError otherwise."""

    async def close(self) -> None:
        """Release connections and files. Idempotent."""
        return None

    def describe(self) -> dict[str, Any]:
        """A JSON-safe description for logs and ``/healthz`` (never credentials)."""
        return {"backend": self.name}
