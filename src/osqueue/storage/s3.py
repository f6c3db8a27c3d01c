"""Amazon S3 and S3-compatible stores, through aiobotocore (async all the way).

Compare-and-swap uses S3's conditional writes: ``PutObject`` with ``If-Match: <ETag>`` to
replace and ``If-None-Match: *`` to create. The version is the ETag exactly as S3 sent it,
quotes included, and it is sent back unchanged.

How answers map:

==========================================  =============================================
412 PreconditionFailed                      :class:`CASConflictError`
404 NoSuchKey on a conditional write        :class:`CASConflictError` (never recreated)
409 ConditionalRequestConflict              retried with jittered backoff, bounded
5xx, 429, SlowDown, network errors          retried with jittered backoff, bounded
anything else, or retries exhausted         :class:`StorageBackendError`
==========================================  =============================================

botocore's own retries are switched off, so that a conditional write is never resent
behind this module's back. When a write is resent after an attempt whose outcome is unknown
(a 5xx or a lost connection), a 412 on the resend may be the first attempt's own success,
so it is reported as StorageBackendError ("outcome unknown"), not as a conflict.

An ETag is a hash of the content: two writes of identical bytes share an ETag, so a caller
must make every write's bytes unique (osqueue's state carries a ``commitId`` for this).
"""

from __future__ import annotations

import asyncio
import enum
import importlib
import logging
import mimetypes
import os
from contextlib import AsyncExitStack
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from osqueue.errors import CASConflictError, ConfigError, StorageBackendError
from osqueue.storage._backoff import Backoff
from osqueue.storage.base import Storage, Versioned, join_key

__all__ = ["S3Storage"]

logger = logging.getLogger(__name__)

#: Error codes that S3 and S3-compatible stores use for "slow down, try again".
_THROTTLE_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests"}
)
_TRANSIENT_CODES = _THROTTLE_CODES | {"RequestTimeout", "InternalError", "ServiceUnavailable"}


class _Failure(enum.Enum):
    PRECONDITION = "412 precondition failed"
    NOT_FOUND = "404 no such key"
    CONCURRENT = "409 conditional request conflict"
    TRANSIENT = "transient failure"
    OTHER = "error"


class S3Storage(Storage):
    """Objects in an S3 bucket under ``prefix``; the version is the object's ETag.

    ``endpoint_url`` selects an S3-compatible store (MinIO, R2, moto...); when omitted,
    ``S3_ENDPOINT_URL`` and then ``AWS_ENDPOINT_URL_S3`` are used, else AWS itself.
    Credentials come from the arguments or the usual AWS sources (environment, profile,
    instance role). Each call may take up to ``max_attempts`` tries on transient failures
    and ``max_conflict_retries`` more on 409 answers. The client is created on first use in
    the running event loop: use one instance per event loop, and ``close()`` it.
    """

    name = "s3"

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        region: str | None = None,
        endpoint_url: str | None = None,
        *,
        aws_access_key_id: str | None = None,
        aws_secret_access_key: str | None = None,
        aws_session_token: str | None = None,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 30.0,
        max_attempts: int = 4,
        max_conflict_retries: int = 8,
        backoff: Backoff | None = None,
    ) -> None:
        _require_aiobotocore()
        if not bucket:
            raise ConfigError("the S3 bucket name is empty: set S3_BUCKET or STORAGE_URL")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.region = region or None
        self.endpoint_url = (
            endpoint_url
            or os.environ.get("S3_ENDPOINT_URL")
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or None
        )
        if self.endpoint_url and urlsplit(self.endpoint_url).scheme not in ("http", "https"):
            raise ConfigError(
                f"S3_ENDPOINT_URL must be an http:// or https:// URL, got {self.endpoint_url!r}"
            )
        self._credentials = {
            "aws_access_key_id": aws_access_key_id,
            "aws_secret_access_key": aws_secret_access_key,
            "aws_session_token": aws_session_token,
        }
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.max_attempts = max(1, max_attempts)
        self.max_conflict_retries = max(0, max_conflict_retries)
        self.backoff = backoff or Backoff(base_ms=50, cap_ms=2_000)
        self._errors = _s3_errors()
        self._client: Any = None
        self._exit_stack: AsyncExitStack | None = None
        self._client_lock = asyncio.Lock()

    # -- the Storage interface -------------------------------------------------------------

    async def read(self, key: str) -> Versioned | None:
        """GetObject: the body and the ETag of that same response, or None on NoSuchKey."""
        name = join_key(self.prefix, key)
        attempt = 0
        while True:
            try:
                client = await self._get_client()
                response = await client.get_object(Bucket=self.bucket, Key=name)
                async with response["Body"] as body:
                    data = await body.read()
                return Versioned(bytes(data), str(response["ETag"]))
            except self._errors as exc:
                failure = _classify(exc)
                if failure is _Failure.NOT_FOUND:
                    return None
                if failure is _Failure.TRANSIENT and attempt + 1 < self.max_attempts:
                    await self._pause("read", name, attempt, exc)
                    attempt += 1
                    continue
                raise StorageBackendError(f"S3 read of {self._where(name)} failed: {exc}") from exc

    async def write(self, key: str, data: bytes, expected_version: str) -> str:
        """PutObject with ``If-Match: expected_version`` (sent exactly as given)."""
        return await self._put(key, data, {"IfMatch": expected_version})

    async def create_if_not_exists(self, key: str, data: bytes) -> str:
        """PutObject with ``If-None-Match: *``."""
        return await self._put(key, data, {"IfNoneMatch": "*"})

    async def close(self) -> None:
        async with self._client_lock:
            stack, self._exit_stack, self._client = self._exit_stack, None, None
            if stack is not None:
                await stack.aclose()

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "bucket": self.bucket,
            "prefix": self.prefix,
            "region": self.region,
            "endpointUrl": _without_userinfo(self.endpoint_url),
        }

    # -- steps -----------------------------------------------------------------------------

    async def _put(self, key: str, data: bytes, condition: dict[str, str]) -> str:
        name = join_key(self.prefix, key)
        outcome_unknown = False
        attempt = conflicts = 0
        while True:
            try:
                client = await self._get_client()
                response = await client.put_object(
                    Bucket=self.bucket,
                    Key=name,
                    Body=bytes(data),
                    ContentType=_content_type(name),
                    **condition,
                )
                return str(response["ETag"])
            except self._errors as exc:
                failure = _classify(exc)
                error = exc

            if failure is _Failure.NOT_FOUND:
                raise CASConflictError(f"{self._where(name)} does not exist; create it first")
            if failure is _Failure.PRECONDITION and not outcome_unknown:
                raise CASConflictError(f"{self._where(name)} changed: {condition}")
            if failure is _Failure.PRECONDITION:
                raise StorageBackendError(
                    f"S3 write of {self._where(name)}: outcome unknown, an earlier attempt "
                    "may have landed; re-read before retrying"
                ) from error
            if failure is _Failure.CONCURRENT and conflicts < self.max_conflict_retries:
                await self._pause("write", name, conflicts, error)
                conflicts += 1
                continue
            if failure is _Failure.TRANSIENT and attempt + 1 < self.max_attempts:
                outcome_unknown = True
                await self._pause("write", name, attempt, error)
                attempt += 1
                continue
            raise StorageBackendError(
                f"S3 write of {self._where(name)} failed ({failure.value}): {error}"
            ) from error

    async def _pause(self, op: str, name: str, attempt: int, error: BaseException) -> None:
        delay_s = self.backoff.delay_s(attempt)
        logger.debug("s3 %s of %s: %s; retrying in %.3f s", op, name, error, delay_s)
        await asyncio.sleep(delay_s)

    async def _get_client(self) -> Any:
        if self._client is not None:
            return self._client
        async with self._client_lock:
            if self._client is None:
                from aiobotocore.config import AioConfig  # type: ignore[import-untyped]
                from aiobotocore.session import get_session  # type: ignore[import-untyped]

                config = AioConfig(
                    connect_timeout=self.connect_timeout_s,
                    read_timeout=self.read_timeout_s,
                    retries={"total_max_attempts": 1, "mode": "standard"},
                )
                stack = AsyncExitStack()
                creator = get_session().create_client(
                    "s3",
                    region_name=self.region,
                    endpoint_url=self.endpoint_url,
                    config=config,
                    **self._credentials,
                )
                self._client = await stack.enter_async_context(creator)
                self._exit_stack = stack
        return self._client

    def _where(self, name: str) -> str:
        return f"s3://{self.bucket}/{name}"


def _require_aiobotocore() -> None:
    try:
        importlib.import_module("aiobotocore.session")
    except ImportError as exc:
        raise ConfigError(
            "the S3 backend needs aiobotocore, which is not installed: pip install 'osqueue[s3]'"
        ) from exc


def _s3_errors() -> tuple[type[BaseException], ...]:
    """The exception types an S3 call can raise for reasons outside this program."""
    import aiohttp
    from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped]

    return (ClientError, BotoCoreError, aiohttp.ClientError, asyncio.TimeoutError, OSError)


def _classify(exc: BaseException) -> _Failure:
    from botocore.exceptions import (
        BotoCoreError,
        ChecksumError,
        ClientError,
        ConnectionError,
        HTTPClientError,
        IncompleteReadError,
    )

    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
        if status == 412 or code == "PreconditionFailed":
            return _Failure.PRECONDITION
        if code == "NoSuchKey":
            return _Failure.NOT_FOUND
        if status == 409 and code == "ConditionalRequestConflict":
            return _Failure.CONCURRENT
        if status >= 500 or status == 429 or code in _TRANSIENT_CODES:
            return _Failure.TRANSIENT
        return _Failure.OTHER
    if isinstance(exc, (HTTPClientError, ConnectionError, IncompleteReadError, ChecksumError)):
        return _Failure.TRANSIENT
    if isinstance(exc, BotoCoreError):  # credentials, configuration, parameters
        return _Failure.OTHER
    return _Failure.TRANSIENT  # aiohttp, socket and time-out errors


def _content_type(name: str) -> str:
    return mimetypes.guess_type(name)[0] or "application/octet-stream"


def _without_userinfo(url: str | None) -> str | None:
    """``url`` without any ``user:password@`` part, for logs."""
    if not url:
        return url
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
