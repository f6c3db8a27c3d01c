"""A durable store in a local directory: the embedded default backend.

Layout of a key ``queue.json`` under the store's directory::

    queue.json                         -> .versions/queue.json.12-9f3a0c1b2d4e   (symlink)
    .versions/queue.json.12-9f3a0c1b2d4e   the bytes of the current version
    .versions/queue.json.lock              the per-key lock file (fcntl.flock)

The bytes of every version live in a file of their own that is never modified once written.
The key itself is a symbolic link to the current version, so ``cat queue.json`` shows the
document, and the version token is the link target's suffix: a counter plus a random nonce,
new on every write even for identical bytes and never reused after the directory is wiped.

A write takes the key's lock exclusively, checks the link, writes and fsyncs the new version
file, swaps the link with ``os.replace`` and fsyncs the directory. The link is the commit
point: a process killed at any instant leaves the link on a complete version (the old or the
new one) and at worst an orphan version file, which the next write removes. Readers take the
lock shared, so a version file is never removed under a reader.

POSIX only (``fcntl``). Safe between threads and processes on one machine; not on network
file systems whose ``flock`` is not shared between hosts.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from osqueue.errors import CASConflictError, StorageBackendError
from osqueue.storage.base import Storage, Versioned

__all__ = ["FileStorage"]

logger = logging.getLogger(__name__)

#: The hidden folder, beside each key, that holds version files and lock files.
VERSIONS_DIR = ".versions"

_VERSION_RE = re.compile(r"(\d+)-[0-9a-f]{12}")


class FileStorage(Storage):
    """Versioned objects in ``directory``, compare-and-swap safe between processes.

    Guarantees, beyond the :class:`~osqueue.storage.base.Storage` contract: a successful
    write is on disk (file and directory fsynced) before it returns; ``kill -9`` at any point
    never leaves a torn or missing document; two processes racing a conditional write on the
    same version get exactly one winner. Blocking file I/O runs in worker threads.

    Keys are relative paths (``"queue.json"``, ``"team-a/queue.json"``); segments may not be
    empty, ``.`` or ``..``, nor start with a dot (dot names are the store's own).
    """

    name = "file"

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory).expanduser().absolute()

    async def read(self, key: str) -> Versioned | None:
        return await asyncio.to_thread(self._read_sync, key)

    async def write(self, key: str, data: bytes, expected_version: str) -> str:
        return await asyncio.to_thread(self._commit_sync, key, bytes(data), expected_version)

    async def create_if_not_exists(self, key: str, data: bytes) -> str:
        return await asyncio.to_thread(self._commit_sync, key, bytes(data), None)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "directory": str(self.directory)}

    # -- blocking parts, run in threads ---------------------------------------------------

    def _read_sync(self, key: str) -> Versioned | None:
        paths = _KeyPaths(self.directory, key)
        if not paths.lock_file.exists():
            return None  # never written; a create racing with us is ordered after this read
        try:
            with paths.locked(exclusive=False):
                version = paths.current_version()
                if version is None:
                    return None
                return Versioned(paths.version_file(version).read_bytes(), version)
        except OSError as exc:
            raise StorageBackendError(f"cannot read {key!r} in {self.directory}: {exc}") from exc

    def _commit_sync(self, key: str, data: bytes, expected_version: str | None) -> str:
        """Store ``data`` if the key is at ``expected_version`` (None: if the key is absent)."""
        paths = _KeyPaths(self.directory, key)
        try:
            paths.versions_dir.mkdir(parents=True, exist_ok=True)
            with paths.locked(exclusive=True):
                current = paths.current_version()
                _check_expected(key, current, expected_version)
                new_version = _next_version(current)
                paths.publish(new_version, data)
                paths.remove_stale_versions(keep=new_version)
        except OSError as exc:
            raise StorageBackendError(f"cannot write {key!r} in {self.directory}: {exc}") from exc
        return new_version


class _KeyPaths:
    """The file names that belong to one key, and the steps that act on them."""

    def __init__(self, directory: Path, key: str) -> None:
        segments = key.split("/")
        if any(not s or s.startswith(".") for s in segments):
            raise ValueError(f"invalid storage key {key!r} for the file store")
        self.link = directory.joinpath(*segments)
        self.name = segments[-1]
        self.versions_dir = self.link.parent / VERSIONS_DIR
        self.lock_file = self.versions_dir / f"{self.name}.lock"
        self.temp_link = self.link.parent / f".{self.name}.tmp-link"

    def version_file(self, version: str) -> Path:
        return self.versions_dir / f"{self.name}.{version}"

    @contextmanager
    def locked(self, *, exclusive: bool) -> Iterator[None]:
        """Hold the key's flock, exclusive for writers and shared for readers."""
        flags = os.O_RDWR | os.O_CREAT if exclusive else os.O_RDONLY
        fd = os.open(self.lock_file, flags | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def current_version(self) -> str | None:
        """The version the link points at, or None when the key does not exist."""
        try:
            target = os.readlink(self.link)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                raise StorageBackendError(
                    f"{self.link} is not a link written by osqueue's file store; "
                    "move it away or point STORAGE_DIR elsewhere"
                ) from exc
            raise
        prefix = f"{VERSIONS_DIR}/{self.name}."
        version = target[len(prefix) :] if target.startswith(prefix) else ""
        if not _VERSION_RE.fullmatch(version):
            raise StorageBackendError(f"{self.link} points at an unexpected target {target!r}")
        return version

    def publish(self, version: str, data: bytes) -> None:
        """Write the version file durably, then switch the link to it (the commit point)."""
        fd = os.open(self.version_file(version), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        _fsync_dir(self.versions_dir)

        self.temp_link.unlink(missing_ok=True)  # left over by a process killed mid-swap
        os.symlink(f"{VERSIONS_DIR}/{self.name}.{version}", self.temp_link)
        os.replace(self.temp_link, self.link)
        _fsync_dir(self.link.parent)

    def remove_stale_versions(self, *, keep: str) -> None:
        """Delete this key's version files other than ``keep`` (old ones and crash orphans)."""
        prefix = f"{self.name}."
        for entry in os.scandir(self.versions_dir):
            version = entry.name[len(prefix) :] if entry.name.startswith(prefix) else ""
            if version != keep and _VERSION_RE.fullmatch(version):
                Path(entry.path).unlink(missing_ok=True)


def _check_expected(key: str, current: str | None, expected: str | None) -> None:
    if expected is None and current is not None:
        raise CASConflictError(f"{key!r} already exists")
    if expected is not None and current is None:
        raise CASConflictError(f"{key!r} does not exist; create it first")
    if current != expected:
        logger.debug("conflict on %s: stored %s, expected %s", key, current, expected)
        raise CASConflictError(f"version of {key!r} is not {expected!r}")


def _next_version(current: str | None) -> str:
    match = _VERSION_RE.fullmatch(current) if current else None
    counter = int(match.group(1)) + 1 if match else 1
    return f"{counter}-{secrets.token_hex(6)}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
