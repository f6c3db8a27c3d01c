"""``osqueue demo --storage s3://...`` and ``gs://...`` as a user runs them: the CLI in a
subprocess, pointed at the emulators through the environment only (``S3_ENDPOINT_URL`` and
AWS test credentials; ``STORAGE_EMULATOR_HOST``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from osqueue.storage import STATE_KEY, Storage
from tests.acceptance.conftest import Processes
from tests.plugins.emulators import (
    MOTO_KEY_ID,
    MOTO_SECRET,
    FakeGCSServer,
    GCSFactory,
    MotoS3Server,
    S3Factory,
)

FILES = 6
PREFIX = "demo"
#: Not the emulator's (nor botocore's fallback) region: the demo must take S3_REGION.
REGION = "eu-west-3"


def make_files(root: Path) -> dict[str, int]:
    """A few files in two directories; their word counts by name."""
    words: dict[str, int] = {}
    for i in range(FILES):
        directory = root / f"d{i % 2}"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"f{i}.txt").write_text("word " * (i + 1) + "\n")
        words[f"f{i}.txt"] = i + 1
    return words


def run_demo(procs: Processes, tmp_path: Path, url: str, env: dict[str, str]) -> str:
    """Run the demo on a few files; check its results; return its output."""
    files = tmp_path / "files"
    words = make_files(files)
    env = {"STORAGE_URL": "", "STORAGE_DIR": str(tmp_path / "results"), **env}
    result = procs.run("demo", str(files), "--storage", url, "-c", "4", env=env, timeout_s=120)
    assert result.returncode == 0, result.stdout + result.stderr

    [log] = (tmp_path / "results").glob("demo-results-*.jsonl")
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    assert sorted(Path(r["path"]).name for r in records) == sorted(words)
    assert {Path(r["path"]).name: r["words"] for r in records} == words
    assert str(FILES) in result.stdout
    return "".join(result.stdout.split())  # the console wraps long lines


async def stored_document(storage: Storage) -> dict[str, Any]:
    stored = await storage.read(STATE_KEY)
    assert stored is not None, "the demo left no queue document in the bucket"
    document: dict[str, Any] = json.loads(stored.data)
    return document


async def test_demo_on_s3(
    procs: Processes,
    tmp_path: Path,
    moto_s3: MotoS3Server,
    s3_bucket: str,
    s3_storage_factory: S3Factory,
) -> None:
    env = {
        "S3_ENDPOINT_URL": moto_s3.url,
        "AWS_ACCESS_KEY_ID": MOTO_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": MOTO_SECRET,
        "S3_REGION": REGION,
        "AWS_DEFAULT_REGION": "",
    }
    output = run_demo(procs, tmp_path, f"s3://{s3_bucket}/{PREFIX}", env)
    # the store the demo names is the one the variables configure, next to the URL
    assert f"'region':'{REGION}'" in output, output
    assert f"'endpointUrl':'{moto_s3.url}'" in output, output
    document = await stored_document(s3_storage_factory(PREFIX))
    assert (document["jobs"], document["completedTotal"]) == ([], FILES)


async def test_demo_on_gcs(
    procs: Processes,
    tmp_path: Path,
    fake_gcs: FakeGCSServer,
    gcs_bucket: str,
    gcs_storage_factory: GCSFactory,
) -> None:
    env = {"STORAGE_EMULATOR_HOST": fake_gcs.url}
    output = run_demo(procs, tmp_path, f"gs://{gcs_bucket}/{PREFIX}", env)
    assert f"'emulatorHost':'{fake_gcs.url}'" in output, output
    document = await stored_document(gcs_storage_factory(PREFIX))
    assert (document["jobs"], document["completedTotal"]) == ([], FILES)
