"""Choosing a backend from a URL or from the environment (protocol section 9)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

from osqueue.errors import ConfigError
from osqueue.storage.base import Storage
from osqueue.storage.file import FileStorage
from osqueue.storage.gcs import GCSStorage
from osqueue.storage.memory import MemoryStorage
from osqueue.storage.s3 import S3Storage
from osqueue.storage.throttled import ThrottledStorage

__all__ = ["DEFAULT_STORAGE_DIR", "open_storage", "storage_from_env"]

logger = logging.getLogger(__name__)

#: Where the file backend keeps the queue when ``STORAGE_DIR`` is not set.
DEFAULT_STORAGE_DIR = ".osqueue"

_BACKENDS = ("memory", "file", "s3", "gcs")
_SCHEME_BACKENDS = {"memory": "memory", "file": "file", "s3": "s3", "gs": "gcs"}
_URL_FORMS = (
    "memory://, file:///abs/path, file://relative/path, s3://bucket/prefix, gs://bucket/prefix"
)


def open_storage(url: str, **options: Any) -> Storage:
    """The backend a URL names; ``options`` go to its constructor.

    ``memory://``; ``file:///abs/path`` or ``file://relative/path`` (relative to the working
    directory); ``s3://bucket/prefix``; ``gs://bucket/prefix``. Raises ConfigError for any
    other form, and when the backend's optional dependency is not installed.
    """
    parts = urlsplit(url.strip())
    backend = _SCHEME_BACKENDS.get(parts.scheme.lower())
    if backend is None:
        raise ConfigError(f"unsupported storage URL {url!r}: use {_URL_FORMS}")
    if parts.query or parts.fragment:
        raise ConfigError(f"storage URL {url!r} may not carry a query or a fragment")
    if backend == "memory":
        return MemoryStorage(**options)
    if backend == "file":
        host = "" if parts.netloc == "localhost" else parts.netloc
        path = unquote(host + parts.path)
        if not path:
            raise ConfigError(f"storage URL {url!r} names no directory: use {_URL_FORMS}")
        return FileStorage(path, **options)
    bucket, prefix = parts.netloc, unquote(parts.path).strip("/")
    if not bucket:
        raise ConfigError(f"storage URL {url!r} names no bucket: use {_URL_FORMS}")
    if backend == "s3":
        return S3Storage(bucket, prefix, **options)
    return GCSStorage(bucket, prefix, **options)


def storage_from_env(env: Mapping[str, str]) -> Storage:
    """The backend configured by ``env`` (usually ``os.environ``), as protocol section 9 says.

    ``STORAGE_URL`` if set, else ``STORAGE_BACKEND`` (default ``file``) with ``STORAGE_DIR``
    (default ``.osqueue``), ``S3_BUCKET``/``S3_PREFIX``/``S3_REGION``/``S3_ENDPOINT_URL``
    (or ``AWS_ENDPOINT_URL_S3``), ``GCS_BUCKET``/``GCS_PREFIX``/``STORAGE_EMULATOR_HOST``.
    Any of ``S3_MAX_READS_PER_MINUTE``, ``S3_MAX_WRITES_PER_MINUTE``, ``S3_MAX_WRITES_PER_DAY``
    above 0 wraps the backend, whichever it is, in :class:`ThrottledStorage`. Empty values
    count as unset. A bad value raises ConfigError naming the variable.
    """
    storage = _backend_from_env(env)
    reads_per_minute = _count(env, "S3_MAX_READS_PER_MINUTE")
    writes_per_minute = _count(env, "S3_MAX_WRITES_PER_MINUTE")
    writes_per_day = _count(env, "S3_MAX_WRITES_PER_DAY")
    if reads_per_minute or writes_per_minute or writes_per_day:
        storage = ThrottledStorage(storage, reads_per_minute, writes_per_minute, writes_per_day)
    logger.debug("storage from environment: %s", storage.describe())
    return storage


def _backend_from_env(env: Mapping[str, str]) -> Storage:
    url = _get(env, "STORAGE_URL")
    named = _get(env, "STORAGE_BACKEND")
    if named is not None and named.lower() not in _BACKENDS:
        raise ConfigError(f"STORAGE_BACKEND={named!r} is not one of {', '.join(_BACKENDS)}")
    if url is None:
        return _named_backend(env, (named or "file").lower())

    backend = _SCHEME_BACKENDS.get(urlsplit(url).scheme.lower())
    if named is not None and backend is not None and named.lower() != backend:
        raise ConfigError(
            f"STORAGE_URL={url!r} and STORAGE_BACKEND={named!r} disagree: unset one of them"
        )
    options = _s3_options(env) if backend == "s3" else _gcs_options(env) if backend == "gcs" else {}
    try:
        return open_storage(url, **options)
    except ConfigError as exc:
        raise ConfigError(f"STORAGE_URL: {exc.message}") from exc


def _named_backend(env: Mapping[str, str], backend: str) -> Storage:
    if backend == "memory":
        return MemoryStorage()
    if backend == "file":
        return FileStorage(_get(env, "STORAGE_DIR") or DEFAULT_STORAGE_DIR)
    if backend == "s3":
        bucket = _required(env, "S3_BUCKET", backend)
        return S3Storage(bucket, _get(env, "S3_PREFIX") or "", **_s3_options(env))
    bucket = _required(env, "GCS_BUCKET", backend)
    return GCSStorage(bucket, _get(env, "GCS_PREFIX") or "", **_gcs_options(env))


def _s3_options(env: Mapping[str, str]) -> dict[str, Any]:
    endpoint_var = "S3_ENDPOINT_URL" if _get(env, "S3_ENDPOINT_URL") else "AWS_ENDPOINT_URL_S3"
    endpoint = _get(env, endpoint_var)
    if endpoint is not None and urlsplit(endpoint).scheme not in ("http", "https"):
        raise ConfigError(f"{endpoint_var} must be an http:// or https:// URL, got {endpoint!r}")
    return {"region": _get(env, "S3_REGION"), "endpoint_url": endpoint}


def _gcs_options(env: Mapping[str, str]) -> dict[str, Any]:
    return {"emulator_host": _get(env, "STORAGE_EMULATOR_HOST")}


def _get(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name, "").strip()
    return value or None


def _required(env: Mapping[str, str], name: str, backend: str) -> str:
    value = _get(env, name)
    if value is None:
        raise ConfigError(f"{name} is required when STORAGE_BACKEND={backend}")
    return value


def _count(env: Mapping[str, str], name: str) -> int:
    raw = _get(env, name)
    if raw is None:
        return 0
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ConfigError(f"{name} must be a whole number, 0 or more (0 = off), got {raw!r}")
    return value
