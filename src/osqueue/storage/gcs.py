"""Google Cloud Storage, through google-cloud-storage (a blocking library, run in threads).

Compare-and-swap uses object generations: a write uploads with ``ifGenerationMatch=<the
generation read>``, a create with ``ifGenerationMatch=0``. A read downloads the object and
takes the generation from the ``x-goog-generation`` header of that same download response
(the library stores it on the blob), so the version always belongs to the bytes returned;
there is no separate metadata call that could race with a writer.

Uploads always go out as one multipart request, whatever the size: the library's public
upload calls switch to a resumable session above 8 MiB, which costs more operations and
which the fake-gcs-server emulator does not check preconditions on.

How answers map:

=====================================  ======================================================
412 Precondition Failed                :class:`CASConflictError`
429, 5xx, network errors               retried with jittered backoff, bounded; then
                                       :class:`StorageBackendError`
404 on read                            None (absent)
anything else                          :class:`StorageBackendError`
=====================================  ======================================================

As in :mod:`osqueue.storage.s3`, the library's own retries are off, and a 412 that follows an
attempt whose outcome is unknown (5xx, lost connection) is reported as StorageBackendError,
since the first attempt may have landed. GCS accepts about one write per second to one
object, so :attr:`GCSStorage.min_write_interval_ms` defaults to 1,000 and the commit engine
paces its writes by it.
"""

from __future__ import annotations

import asyncio
import importlib
import io
import logging
import mimetypes
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from osqueue.errors import CASConflictError, ConfigError, StorageBackendError
from osqueue.storage._backoff import Backoff
from osqueue.storage.base import Storage, Versioned, join_key

__all__ = ["GCSStorage"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: GCS's sustained limit is about one write per second to one object name.
DEFAULT_MIN_WRITE_INTERVAL_MS = 1_000


class GCSStorage(Storage):
    """Objects in a GCS bucket under ``prefix``; the version is the object's generation.

    ``emulator_host`` (default: the ``STORAGE_EMULATOR_HOST`` variable, as the Google client
    reads it) points at an emulator such as fake-gcs-server and uses anonymous credentials.
    Otherwise credentials are Google's application default credentials, or ``credentials``.
    Each call may take up to ``max_attempts`` tries on 429, 5xx and network failures.
    """

    name = "gcs"

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        project: str | None = None,
        emulator_host: str | None = None,
        credentials: Any = None,
        min_write_interval_ms: int = DEFAULT_MIN_WRITE_INTERVAL_MS,
        timeout_s: float = 30.0,
        max_attempts: int = 5,
        backoff: Backoff | None = None,
    ) -> None:
        _require_google_cloud_storage()
        if not bucket:
            raise ConfigError("the GCS bucket name is empty: set GCS_BUCKET or STORAGE_URL")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.project = project
        host = emulator_host or os.environ.get("STORAGE_EMULATOR_HOST") or None
        if host and "://" not in host:
            host = f"http://{host}"
        self.emulator_host = host
        self.min_write_interval_ms = min_write_interval_ms
        self.timeout_s = timeout_s
        self.max_attempts = max(1, max_attempts)
        self.backoff = backoff or Backoff(base_ms=250, cap_ms=8_000)
        self._credentials = credentials
        self._errors = _gcs_errors()
        self._local = threading.local()
        self._clients: list[Any] = []
        self._clients_lock = threading.Lock()

    # -- the Storage interface -------------------------------------------------------------

    async def read(self, key: str) -> Versioned | None:
        """Download the object; its generation comes from the same response."""
        name = join_key(self.prefix, key)
        return await self._with_retries("read", name, lambda: self._download_sync(name))

    async def write(self, key: str, data: bytes, expected_version: str) -> str:
        """Upload with ``ifGenerationMatch=expected_version``."""
        try:
            generation = int(expected_version)
        except ValueError:
            generation = 0
        if generation <= 0:  # 0 would mean "create"; no stored object has that version
            raise CASConflictError(f"{expected_version!r} is not a generation of {key!r}")
        return await self._upload(key, bytes(data), generation)

    async def create_if_not_exists(self, key: str, data: bytes) -> str:
        """Upload with ``ifGenerationMatch=0``."""
        return await self._upload(key, bytes(data), 0)

    async def close(self) -> None:
        with self._clients_lock:
            clients, self._clients = self._clients, []
            self._local = threading.local()
        for client in clients:
            await asyncio.to_thread(client.close)

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "bucket": self.bucket,
            "prefix": self.prefix,
            "emulatorHost": self.emulator_host,
            "minWriteIntervalMs": self.min_write_interval_ms,
        }

    # -- steps -----------------------------------------------------------------------------

    async def _upload(self, key: str, data: bytes, generation: int) -> str:
        name = join_key(self.prefix, key)
        outcome_unknown = False
        attempt = 0
        while True:
            try:
                return await asyncio.to_thread(self._upload_sync, name, data, generation)
            except self._errors as exc:
                status, error = _status_of(exc), exc

            if status == 412 and not outcome_unknown:
                raise CASConflictError(f"{self._where(name)} is not at generation {generation}")
            if status == 412:
                raise StorageBackendError(
                    f"GCS write of {self._where(name)}: outcome unknown, an earlier attempt "
                    "may have landed; re-read before retrying"
                ) from error
            if _is_transient(status) and attempt + 1 < self.max_attempts:
                outcome_unknown = outcome_unknown or status != 429  # a 429 stored nothing
                await self._pause("write", name, attempt, error)
                attempt += 1
                continue
            raise StorageBackendError(
                f"GCS write of {self._where(name)} failed ({status or 'network'}): {error}"
            ) from error

    async def _with_retries(self, op: str, name: str, call: Callable[[], T]) -> T:
        """Run the idempotent ``call`` in a thread, retrying transient failures."""
        attempt = 0
        while True:
            try:
                return await asyncio.to_thread(call)
            except self._errors as exc:
                status, error = _status_of(exc), exc
            if _is_transient(status) and attempt + 1 < self.max_attempts:
                await self._pause(op, name, attempt, error)
                attempt += 1
                continue
            raise StorageBackendError(
                f"GCS {op} of {self._where(name)} failed ({status or 'network'}): {error}"
            ) from error

    async def _pause(self, op: str, name: str, attempt: int, error: BaseException) -> None:
        delay_s = self.backoff.delay_s(attempt)
        logger.debug("gcs %s of %s: %s; retrying in %.3f s", op, name, error, delay_s)
        await asyncio.sleep(delay_s)

    def _where(self, name: str) -> str:
        return f"gs://{self.bucket}/{name}"

    # -- blocking parts, run in threads ----------------------------------------------------

    def _download_sync(self, name: str) -> Versioned | None:
        from google.api_core.exceptions import NotFound

        blob = self._client_sync().bucket(self.bucket).blob(name)
        try:
            data = blob.download_as_bytes(timeout=self.timeout_s, retry=None)
        except NotFound:
            return None
        if blob.generation is None:
            raise StorageBackendError(f"{self._where(name)}: the download carried no generation")
        return Versioned(bytes(data), str(blob.generation))

    def _upload_sync(self, name: str, data: bytes, generation: int) -> str:
        from google.cloud.storage.exceptions import InvalidResponse  # type: ignore[import-untyped]

        client = self._client_sync()
        blob = client.bucket(self.bucket).blob(name)
        content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        try:
            # NOTE: a private method of google-cloud-storage 3.17 (pinned): the public upload
            # calls go resumable above 8 MiB. tests/integration checks a 9 MiB conflict.
            response = blob._do_multipart_upload(
                client,
                io.BytesIO(data),
                content_type,
                len(data),
                None,  # predefined_acl
                generation,  # if_generation_match
                None,
                None,
                None,
                timeout=self.timeout_s,
                retry=None,
            )
        except InvalidResponse as exc:
            raise _UploadFailed(exc.response.status_code, str(exc)) from exc
        return str(response.json()["generation"])

    def _client_sync(self) -> Any:
        """This thread's client (the Google client is not shared between threads)."""
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._new_client()
            self._local.client = client
            with self._clients_lock:
                self._clients.append(client)
        return client

    def _new_client(self) -> Any:
        from google.cloud import storage  # type: ignore[import-untyped]

        if self.emulator_host:
            from google.auth.credentials import AnonymousCredentials

            return storage.Client(
                project=self.project or "osqueue",
                credentials=self._credentials or AnonymousCredentials(),  # type: ignore[no-untyped-call]
                client_options={"api_endpoint": self.emulator_host},
            )
        from google.auth.exceptions import DefaultCredentialsError

        try:
            return storage.Client(project=self.project, credentials=self._credentials)
        except DefaultCredentialsError as exc:
            raise StorageBackendError(
                "no Google credentials found: set GOOGLE_APPLICATION_CREDENTIALS or run "
                "'gcloud auth application-default login' (or STORAGE_EMULATOR_HOST for an "
                "emulator)"
            ) from exc


class _UploadFailed(Exception):
    """An upload answered with an HTTP error status (the media layer's error, re-wrapped)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _require_google_cloud_storage() -> None:
    try:
        importlib.import_module("google.cloud.storage")
    except ImportError as exc:
        raise ConfigError(
            "the GCS backend needs google-cloud-storage, which is not installed: "
            "pip install 'osqueue[gcs]'"
        ) from exc


def _gcs_errors() -> tuple[type[BaseException], ...]:
    """The exception types a GCS call can raise for reasons outside this program."""
    import requests
    from google.api_core.exceptions import GoogleAPICallError
    from google.auth.exceptions import GoogleAuthError
    from google.cloud.storage.exceptions import DataCorruption

    return (
        _UploadFailed,
        GoogleAPICallError,
        GoogleAuthError,  # transport failures and token refresh failures
        DataCorruption,
        requests.exceptions.RequestException,
        OSError,
    )


def _status_of(exc: BaseException) -> int:
    """The HTTP status behind ``exc``, or 0 for network and data-corruption failures."""
    if isinstance(exc, _UploadFailed):
        return exc.status
    code = getattr(exc, "code", None)
    return code if isinstance(code, int) and 100 <= code < 600 else 0


def _is_transient(status: int) -> bool:
    return status in (0, 408, 429) or status >= 500
