"""open_storage (URLs) and storage_from_env (protocol section 9), without any network."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from osqueue.errors import ConfigError
from osqueue.storage import (
    FileStorage,
    GCSStorage,
    MemoryStorage,
    S3Storage,
    ThrottledStorage,
    open_storage,
    storage_from_env,
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "STORAGE_EMULATOR_HOST"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


# -- open_storage ------------------------------------------------------------------------------


def test_memory_url() -> None:
    assert isinstance(open_storage("memory://"), MemoryStorage)
    assert open_storage("memory://", latency_ms=5).faults.latency_s == 0.005  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("url", "relative"),
    [
        ("file:///srv/queue", "/srv/queue"),
        ("file://localhost/srv/queue", "/srv/queue"),
        ("file://data/queue", "data/queue"),
        ("file://.osqueue", ".osqueue"),
        ("file:///srv/my%20queue", "/srv/my queue"),
    ],
)
def test_file_urls(url: str, relative: str, tmp_path: Path) -> None:
    storage = open_storage(url)
    assert isinstance(storage, FileStorage)
    assert storage.directory == tmp_path / relative


def test_bucket_urls() -> None:
    s3 = open_storage("s3://my-bucket/team/a/", region="eu-west-1")
    assert isinstance(s3, S3Storage)
    assert (s3.bucket, s3.prefix, s3.region) == ("my-bucket", "team/a", "eu-west-1")

    gcs = open_storage("gs://my-bucket")
    assert isinstance(gcs, GCSStorage)
    assert (gcs.bucket, gcs.prefix) == ("my-bucket", "")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://host/x", "unsupported storage URL"),
        ("/just/a/path", "unsupported storage URL"),
        ("file://", "names no directory"),
        ("s3://", "names no bucket"),
        ("gs:///prefix", "names no bucket"),
        ("s3://bucket/p?region=eu-west-1", "query"),
    ],
)
def test_bad_urls(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        open_storage(url)


# -- storage_from_env --------------------------------------------------------------------------


def test_the_default_is_the_file_store_in_dot_osqueue(tmp_path: Path) -> None:
    storage = storage_from_env({})
    assert isinstance(storage, FileStorage)
    assert storage.directory == tmp_path / ".osqueue"


def test_backends_by_name(tmp_path: Path) -> None:
    assert isinstance(storage_from_env({"STORAGE_BACKEND": "memory"}), MemoryStorage)

    file = storage_from_env({"STORAGE_BACKEND": "FILE", "STORAGE_DIR": "/var/q"})
    assert isinstance(file, FileStorage) and file.directory == Path("/var/q")

    s3 = storage_from_env(
        {
            "STORAGE_BACKEND": "s3",
            "S3_BUCKET": "b",
            "S3_PREFIX": "p",
            "S3_REGION": "eu-central-1",
            "S3_ENDPOINT_URL": "http://127.0.0.1:9000",
        }
    )
    assert isinstance(s3, S3Storage)
    assert (s3.bucket, s3.prefix, s3.region, s3.endpoint_url) == (
        "b",
        "p",
        "eu-central-1",
        "http://127.0.0.1:9000",
    )

    gcs = storage_from_env(
        {
            "STORAGE_BACKEND": "gcs",
            "GCS_BUCKET": "g",
            "GCS_PREFIX": "q",
            "STORAGE_EMULATOR_HOST": "h:1",
        }
    )
    assert isinstance(gcs, GCSStorage)
    assert (gcs.bucket, gcs.prefix, gcs.emulator_host) == ("g", "q", "http://h:1")


def test_aws_endpoint_url_s3_is_understood_too() -> None:
    s3 = storage_from_env(
        {"STORAGE_BACKEND": "s3", "S3_BUCKET": "b", "AWS_ENDPOINT_URL_S3": "https://r2.example"}
    )
    assert isinstance(s3, S3Storage) and s3.endpoint_url == "https://r2.example"


def test_storage_url_takes_the_backend_variables_along() -> None:
    s3 = storage_from_env(
        {"STORAGE_URL": "s3://b/p", "S3_REGION": "us-west-2", "S3_BUCKET": "ignored"}
    )
    assert isinstance(s3, S3Storage)
    assert (s3.bucket, s3.prefix, s3.region) == ("b", "p", "us-west-2")

    assert isinstance(storage_from_env({"STORAGE_URL": "memory://"}), MemoryStorage)
    same = storage_from_env({"STORAGE_URL": "memory://", "STORAGE_BACKEND": "memory"})
    assert isinstance(same, MemoryStorage)


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"STORAGE_BACKEND": "redis"}, "STORAGE_BACKEND"),
        ({"STORAGE_BACKEND": "s3"}, "S3_BUCKET"),
        ({"STORAGE_BACKEND": "gcs", "S3_BUCKET": "b"}, "GCS_BUCKET"),
        ({"STORAGE_URL": "ftp://x"}, "STORAGE_URL"),
        ({"STORAGE_URL": "s3://b", "STORAGE_BACKEND": "gcs"}, "STORAGE_BACKEND"),
        (
            {"STORAGE_BACKEND": "s3", "S3_BUCKET": "b", "S3_ENDPOINT_URL": "host:9000"},
            "S3_ENDPOINT_URL",
        ),
        ({"STORAGE_URL": "s3://b", "AWS_ENDPOINT_URL_S3": "r2.example"}, "AWS_ENDPOINT_URL_S3"),
        ({"S3_MAX_READS_PER_MINUTE": "many"}, "S3_MAX_READS_PER_MINUTE"),
        ({"S3_MAX_WRITES_PER_MINUTE": "-1"}, "S3_MAX_WRITES_PER_MINUTE"),
        ({"S3_MAX_WRITES_PER_DAY": "1.5"}, "S3_MAX_WRITES_PER_DAY"),
    ],
)
def test_bad_values_name_their_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        storage_from_env(env)


def test_throttle_variables_wrap_any_backend() -> None:
    assert isinstance(storage_from_env({"S3_MAX_WRITES_PER_MINUTE": "0"}), FileStorage)

    storage = storage_from_env(
        {
            "STORAGE_BACKEND": "memory",
            "S3_MAX_WRITES_PER_MINUTE": "120",
            "S3_MAX_WRITES_PER_DAY": " ",
        }
    )
    assert isinstance(storage, ThrottledStorage)
    assert isinstance(storage.inner, MemoryStorage)
    stats = storage.stats()
    assert stats["writes"]["perMinute"] == 120
    assert stats["reads"]["perMinute"] == 0
    assert stats["dailyWrites"]["perDay"] == 0


# -- optional dependencies ---------------------------------------------------------------------


def test_a_missing_s3_extra_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "aiobotocore", None)
    monkeypatch.setitem(sys.modules, "aiobotocore.session", None)

    with pytest.raises(ConfigError, match=r"pip install 'osqueue\[s3\]'"):
        open_storage("s3://bucket")
    with pytest.raises(ConfigError, match=r"pip install 'osqueue\[s3\]'"):
        storage_from_env({"STORAGE_BACKEND": "s3", "S3_BUCKET": "b"})


def test_a_missing_gcs_extra_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "google.cloud.storage", None)

    with pytest.raises(ConfigError, match=r"pip install 'osqueue\[gcs\]'"):
        open_storage("gs://bucket")
    with pytest.raises(ConfigError, match=r"STORAGE_URL.*pip install 'osqueue\[gcs\]'"):
        storage_from_env({"STORAGE_URL": "gs://bucket"})


def test_other_backends_work_without_the_extras(monkeypatch: pytest.MonkeyPatch) -> None:
    for module in ("aiobotocore", "aiobotocore.session", "google.cloud.storage"):
        monkeypatch.setitem(sys.modules, module, None)
    assert isinstance(storage_from_env({}), FileStorage)
    assert isinstance(open_storage("memory://"), MemoryStorage)
