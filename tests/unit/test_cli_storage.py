"""The CLI's ``--storage URL`` configures the store exactly as ``STORAGE_URL`` does for
``storage_from_env``: the backend's variables and the throttles apply to it too."""

from __future__ import annotations

from pathlib import Path

import pytest

from osqueue.cli import _storage
from osqueue.storage import FileStorage, GCSStorage, MemoryStorage, S3Storage, ThrottledStorage


def test_a_url_gets_the_s3_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("S3_REGION", "eu-west-3")
    monkeypatch.setenv("S3_ENDPOINT_URL", "http://127.0.0.1:9")
    storage = _storage("s3://bucket/prefix")
    assert isinstance(storage, S3Storage)
    assert (storage.bucket, storage.prefix) == ("bucket", "prefix")
    assert (storage.region, storage.endpoint_url) == ("eu-west-3", "http://127.0.0.1:9")


def test_a_url_gets_the_gcs_emulator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "127.0.0.1:4443")
    storage = _storage("gs://bucket/q")
    assert isinstance(storage, GCSStorage)
    assert storage.emulator_host == "http://127.0.0.1:4443"


def test_a_url_is_throttled_by_the_s3_max_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("S3_MAX_WRITES_PER_MINUTE", "600")
    storage = _storage("memory://")
    assert isinstance(storage, ThrottledStorage)
    assert isinstance(storage.inner, MemoryStorage)
    assert storage.stats()["writes"]["perMinute"] == 600


def test_a_url_wins_over_storage_backend(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("STORAGE_BACKEND", "file")
    assert isinstance(_storage("memory://"), MemoryStorage)
    monkeypatch.setenv("STORAGE_BACKEND", "memory")
    monkeypatch.delenv("STORAGE_URL", raising=False)
    assert isinstance(_storage(None), MemoryStorage)
    monkeypatch.setenv("STORAGE_BACKEND", "file")
    monkeypatch.setenv("STORAGE_DIR", str(tmp_path))
    assert isinstance(_storage(None), FileStorage)
