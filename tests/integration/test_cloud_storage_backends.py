"""What only the S3 and GCS backends do, checked against moto and fake-gcs-server."""

from __future__ import annotations

import pytest

from osqueue.errors import CASConflictError, StorageBackendError
from osqueue.storage import GCSStorage, S3Storage, Versioned, storage_from_env
from tests.plugins.emulators import (
    GCS_PROJECT,
    MOTO_KEY_ID,
    MOTO_REGION,
    MOTO_SECRET,
    FakeGCSServer,
    GCSFactory,
    MotoS3Server,
)

KEY = "queue.json"
NINE_MIB = 9 * 1024 * 1024


# -- S3 (moto) ---------------------------------------------------------------------------------


async def test_s3_versions_are_etags_as_s3_sent_them(s3_storage: S3Storage) -> None:
    version = await s3_storage.create_if_not_exists(KEY, b"{}")
    assert version.startswith('"') and version.endswith('"')
    assert await s3_storage.read(KEY) == Versioned(b"{}", version)


async def test_s3_a_missing_bucket_is_a_backend_error(moto_s3: MotoS3Server) -> None:
    storage = S3Storage(
        "osq-no-such-bucket",
        region=MOTO_REGION,
        endpoint_url=moto_s3.url,
        aws_access_key_id=MOTO_KEY_ID,
        aws_secret_access_key=MOTO_SECRET,
    )
    try:
        with pytest.raises(StorageBackendError, match="NoSuchBucket"):
            await storage.read(KEY)
        with pytest.raises(StorageBackendError, match="NoSuchBucket"):
            await storage.create_if_not_exists(KEY, b"{}")
    finally:
        await storage.close()


async def test_s3_from_the_environment(
    moto_s3: MotoS3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", MOTO_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", MOTO_SECRET)
    env = {
        "STORAGE_URL": f"s3://{s3_bucket}/from-env",
        "S3_REGION": MOTO_REGION,
        "S3_ENDPOINT_URL": moto_s3.url,
    }
    storage = storage_from_env(env)
    try:
        version = await storage.create_if_not_exists(KEY, b"hello")
        assert await storage.read(KEY) == Versioned(b"hello", version)
    finally:
        await storage.close()


# -- GCS (fake-gcs-server) ---------------------------------------------------------------------


async def test_gcs_large_documents_still_go_out_in_one_conditional_request(
    gcs_storage: GCSStorage,
) -> None:
    """Above 8 MiB the library's public upload turns resumable, and the emulator ignores
    preconditions there; osqueue's single-request upload keeps the check."""
    big = b"x" * NINE_MIB
    first = await gcs_storage.create_if_not_exists(KEY, big)
    second = await gcs_storage.write(KEY, big + b"2", first)

    with pytest.raises(CASConflictError):
        await gcs_storage.write(KEY, big + b"stale", first)
    with pytest.raises(CASConflictError):
        await gcs_storage.create_if_not_exists(KEY, big)
    assert await gcs_storage.read(KEY) == Versioned(big + b"2", second)


async def test_gcs_honours_storage_emulator_host(
    fake_gcs: FakeGCSServer, gcs_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", fake_gcs.url)
    storage = storage_from_env({"STORAGE_BACKEND": "gcs", "GCS_BUCKET": gcs_bucket})
    assert isinstance(storage, GCSStorage)
    try:
        version = await storage.create_if_not_exists(KEY, b"hello")
        assert await storage.read(KEY) == Versioned(b"hello", version)
    finally:
        await storage.close()


async def test_gcs_a_missing_bucket_is_a_backend_error(fake_gcs: FakeGCSServer) -> None:
    storage = GCSStorage("osq-no-such-bucket", project=GCS_PROJECT, emulator_host=fake_gcs.url)
    try:
        with pytest.raises(StorageBackendError, match="404"):
            await storage.create_if_not_exists(KEY, b"{}")
    finally:
        await storage.close()


async def test_gcs_generations_are_new_for_every_write(gcs_storage_factory: GCSFactory) -> None:
    storage = gcs_storage_factory()
    versions = [await storage.create_if_not_exists(KEY, b"same")]
    for _ in range(5):
        versions.append(await storage.write(KEY, b"same", versions[-1]))
    assert len(set(versions)) == 6
    assert all(v.isdigit() for v in versions)
