"""S3Storage and GCSStorage against scripted answers: error mapping, retries, ETag quoting.

The S3 backend gets a fake aiobotocore client; the GCS backend gets its two blocking calls
replaced. Both run against the real emulators in tests/integration.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError  # type: ignore[import-untyped]
from google.api_core.exceptions import ServiceUnavailable

from osqueue.errors import CASConflictError, ConfigError, StorageBackendError
from osqueue.storage import Backoff, GCSStorage, S3Storage, Versioned
from osqueue.storage.gcs import _UploadFailed

KEY = "queue.json"
FAST = Backoff(base_ms=1, cap_ms=2)


@pytest.fixture(autouse=True)
def no_endpoint_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "STORAGE_EMULATOR_HOST"):
        monkeypatch.delenv(name, raising=False)


# -- S3 ----------------------------------------------------------------------------------------


def s3_error(status: int, code: str) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "PutObject",
    )


class FakeBody:
    def __init__(self, data: bytes) -> None:
        self.data = data

    async def __aenter__(self) -> FakeBody:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def read(self) -> bytes:
        return self.data


class FakeS3Client:
    """Answers each call with the next scripted answer: a dict, or an exception to raise."""

    def __init__(self, *answers: dict[str, Any] | Exception) -> None:
        self.answers = list(answers)
        self.calls: list[tuple[str, dict[str, Any]]] = []

    async def put_object(self, **kwargs: Any) -> dict[str, Any]:
        return self._answer("put", kwargs)

    async def get_object(self, **kwargs: Any) -> dict[str, Any]:
        return self._answer("get", kwargs)

    def _answer(self, op: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        self.calls.append((op, kwargs))
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def s3_with(*answers: dict[str, Any] | Exception, **options: Any) -> tuple[S3Storage, FakeS3Client]:
    options.setdefault("backoff", FAST)
    storage = S3Storage("bkt", "pre", region="us-east-1", **options)
    client = FakeS3Client(*answers)
    storage._client = client
    return storage, client


@pytest.mark.parametrize("etag", ['"abc"', "abc", 'W/"abc"'])
async def test_f11_the_etag_goes_back_exactly_as_it_came(etag: str) -> None:
    storage, client = s3_with(
        {"Body": FakeBody(b"doc"), "ETag": etag},
        {"ETag": '"next"'},
    )

    read = await storage.read(KEY)
    assert read == Versioned(b"doc", etag)
    assert await storage.write(KEY, b"doc2", read.version) == '"next"'

    assert client.calls[0] == ("get", {"Bucket": "bkt", "Key": "pre/queue.json"})
    _, put = client.calls[1]
    assert put["IfMatch"] == etag
    assert "IfNoneMatch" not in put


async def test_create_sends_if_none_match_star() -> None:
    storage, client = s3_with({"ETag": '"e"'})
    assert await storage.create_if_not_exists(KEY, b"{}") == '"e"'
    _, put = client.calls[0]
    assert put["IfNoneMatch"] == "*" and "IfMatch" not in put
    assert put["ContentType"] == "application/json"


@pytest.mark.parametrize(
    "answer", [s3_error(412, "PreconditionFailed"), s3_error(404, "NoSuchKey")]
)
async def test_412_and_404_on_a_conditional_write_are_conflicts(answer: Exception) -> None:
    storage, client = s3_with(answer)
    with pytest.raises(CASConflictError):
        await storage.write(KEY, b"x", '"v"')
    assert len(client.calls) == 1  # not retried, and never written without a condition


async def test_409_is_retried_with_the_same_condition() -> None:
    conflict = s3_error(409, "ConditionalRequestConflict")
    storage, client = s3_with(conflict, conflict, {"ETag": '"won"'})

    assert await storage.write(KEY, b"x", '"v"') == '"won"'
    assert [put["IfMatch"] for _, put in client.calls] == ['"v"'] * 3


async def test_409_forever_gives_up_after_a_bounded_number_of_tries() -> None:
    conflict = s3_error(409, "ConditionalRequestConflict")
    storage, client = s3_with(*[conflict] * 10, max_conflict_retries=3)

    with pytest.raises(StorageBackendError, match="409"):
        await storage.write(KEY, b"x", '"v"')
    assert len(client.calls) == 4


async def test_a_5xx_then_success_is_a_success() -> None:
    storage, client = s3_with(s3_error(500, "InternalError"), {"ETag": '"ok"'})
    assert await storage.write(KEY, b"x", '"v"') == '"ok"'
    assert len(client.calls) == 2


async def test_a_412_after_an_unknown_outcome_is_not_reported_as_a_conflict() -> None:
    """The first attempt may have landed and made the resend's precondition fail."""
    storage, _ = s3_with(s3_error(503, "ServiceUnavailable"), s3_error(412, "PreconditionFailed"))
    with pytest.raises(StorageBackendError, match="outcome unknown"):
        await storage.write(KEY, b"x", '"v"')


async def test_transient_failures_give_up_after_max_attempts() -> None:
    storage, client = s3_with(*[s3_error(503, "SlowDown")] * 5, max_attempts=3)
    with pytest.raises(StorageBackendError, match="transient"):
        await storage.write(KEY, b"x", '"v"')
    assert len(client.calls) == 3


async def test_other_errors_are_backend_errors_at_once() -> None:
    storage, client = s3_with(s3_error(403, "AccessDenied"))
    with pytest.raises(StorageBackendError, match="AccessDenied"):
        await storage.create_if_not_exists(KEY, b"x")
    assert len(client.calls) == 1


async def test_reads_retry_network_errors_and_map_missing_keys_and_buckets() -> None:
    storage, _ = s3_with(
        EndpointConnectionError(endpoint_url="http://x"),
        {"Body": FakeBody(b"d"), "ETag": '"e"'},
        s3_error(404, "NoSuchKey"),
        s3_error(404, "NoSuchBucket"),
    )
    assert await storage.read(KEY) == Versioned(b"d", '"e"')
    assert await storage.read(KEY) is None
    with pytest.raises(StorageBackendError, match="NoSuchBucket"):
        await storage.read(KEY)


def test_s3_describe_shows_no_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    storage = S3Storage(
        "bkt",
        "/team/",
        endpoint_url="https://user:hunter2@minio.local:9000",
        aws_access_key_id="AKIDEXAMPLE",
        aws_secret_access_key="wJalrXUtnFEMI",
    )
    described = json.dumps(storage.describe())
    for secret in ("hunter2", "user", "AKIDEXAMPLE", "wJalrXUtnFEMI"):
        assert secret not in described
    assert storage.describe()["endpointUrl"] == "https://minio.local:9000"
    assert storage.prefix == "team"


@pytest.mark.parametrize("variable", ["S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"])
def test_s3_endpoint_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    monkeypatch.setenv(variable, "http://127.0.0.1:9000")
    assert S3Storage("bkt").endpoint_url == "http://127.0.0.1:9000"


def test_a_bad_s3_endpoint_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="S3_ENDPOINT_URL"):
        S3Storage("bkt", endpoint_url="minio.local:9000")
    with pytest.raises(ConfigError, match="S3_BUCKET"):
        S3Storage("")


# -- GCS ---------------------------------------------------------------------------------------


def gcs_with(
    monkeypatch: pytest.MonkeyPatch, *answers: str | Exception, **options: Any
) -> tuple[GCSStorage, list[int]]:
    """A GCSStorage whose uploads answer from ``answers``; returns the generations sent."""
    options.setdefault("backoff", FAST)
    storage = GCSStorage("bkt", "pre", emulator_host="127.0.0.1:1", **options)
    sent: list[int] = []
    script = list(answers)

    def upload(name: str, data: bytes, generation: int) -> str:
        assert name == "pre/queue.json"
        sent.append(generation)
        answer = script.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(storage, "_upload_sync", upload)
    return storage, sent


async def test_gcs_write_and_create_send_the_generation(monkeypatch: pytest.MonkeyPatch) -> None:
    storage, sent = gcs_with(monkeypatch, "11", "12")
    assert await storage.create_if_not_exists(KEY, b"a") == "11"
    assert await storage.write(KEY, b"b", "11") == "12"
    assert sent == [0, 11]


@pytest.mark.parametrize("version", ["0", "-3", "abc", ""])
async def test_gcs_a_version_that_is_no_generation_conflicts_without_a_call(
    monkeypatch: pytest.MonkeyPatch, version: str
) -> None:
    storage, sent = gcs_with(monkeypatch)
    with pytest.raises(CASConflictError):
        await storage.write(KEY, b"x", version)
    assert sent == []


async def test_gcs_412_is_a_conflict(monkeypatch: pytest.MonkeyPatch) -> None:
    storage, sent = gcs_with(monkeypatch, _UploadFailed(412, "precondition"))
    with pytest.raises(CASConflictError):
        await storage.write(KEY, b"x", "5")
    assert sent == [5]


async def test_f12_gcs_429_backs_off_and_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    delays: list[int] = []
    backoff = Backoff(base_ms=1, cap_ms=2)

    def delay_s(attempt: int) -> float:
        delays.append(attempt)
        return 0.001

    monkeypatch.setattr(backoff, "delay_s", delay_s)
    storage, sent = gcs_with(
        monkeypatch,
        _UploadFailed(429, "rate"),
        _UploadFailed(429, "rate"),
        "9",
        backoff=backoff,
    )

    assert await storage.write(KEY, b"x", "8") == "9"
    assert sent == [8, 8, 8]
    assert delays == [0, 1]


async def test_gcs_a_429_stored_nothing_so_a_later_412_is_a_conflict(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    storage, _ = gcs_with(monkeypatch, _UploadFailed(429, "rate"), _UploadFailed(412, "pre"))
    with pytest.raises(CASConflictError):
        await storage.write(KEY, b"x", "8")


async def test_gcs_a_412_after_a_5xx_is_an_unknown_outcome(monkeypatch: pytest.MonkeyPatch) -> None:
    storage, _ = gcs_with(monkeypatch, _UploadFailed(503, "unavailable"), _UploadFailed(412, "pre"))
    with pytest.raises(StorageBackendError, match="outcome unknown"):
        await storage.write(KEY, b"x", "8")


async def test_gcs_429_forever_becomes_a_backend_error(monkeypatch: pytest.MonkeyPatch) -> None:
    storage, sent = gcs_with(monkeypatch, *[_UploadFailed(429, "rate")] * 9, max_attempts=4)
    with pytest.raises(StorageBackendError, match="429"):
        await storage.write(KEY, b"x", "8")
    assert len(sent) == 4


async def test_gcs_reads_retry_5xx(monkeypatch: pytest.MonkeyPatch) -> None:
    storage = GCSStorage("bkt", emulator_host="http://127.0.0.1:1", backoff=FAST)
    script: list[Versioned | Exception] = [
        ServiceUnavailable("down"),  # type: ignore[no-untyped-call]
        Versioned(b"d", "7"),
    ]

    def download(name: str) -> Versioned | None:
        answer = script.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(storage, "_download_sync", download)
    assert await storage.read(KEY) == Versioned(b"d", "7")
    assert script == []


def test_gcs_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    assert GCSStorage("bkt").min_write_interval_ms == 1_000
    assert GCSStorage("bkt", min_write_interval_ms=250).min_write_interval_ms == 250
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "localhost:4443")
    storage = GCSStorage("bkt", "p/", credentials=object())
    assert storage.emulator_host == "http://localhost:4443"
    assert storage.describe() == {
        "backend": "gcs",
        "bucket": "bkt",
        "prefix": "p",
        "emulatorHost": "http://localhost:4443",
        "minWriteIntervalMs": 1_000,
    }
    with pytest.raises(ConfigError, match="GCS_BUCKET"):
        GCSStorage("")
