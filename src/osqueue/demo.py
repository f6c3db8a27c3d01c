"""``osqueue demo``: a broker, workers and one ``file-stats`` job per file, on real files.

The broker and the workers run in this process, against the configured store (the file
store in ``.osqueue`` by default). Each file is submitted with an idempotency key derived
from its path, so a demo that is interrupted (Ctrl-C or ``kill -9``) and run again submits
nothing twice and finishes only the work that was left. Workers append each result to a
JSON-lines file, flushed to disk before the job is completed, so a completed job always
has its result; the summary reads that file, one row per file.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from osqueue.broker.server import BrokerConfig, run_broker_in_background
from osqueue.client import AsyncOsqueueClient, JobSpec
from osqueue.engine import EngineConfig
from osqueue.handlers import file_stats
from osqueue.storage.base import Storage
from osqueue.worker import JobContext, Worker

__all__ = ["DemoSummary", "run_demo", "walk_files"]

log = logging.getLogger(__name__)

JOB_TYPE = "file-stats"
SUBMIT_BATCH = 500
# Short timings, so that a demo restarted after kill -9 takes over and redelivers quickly.
DEMO_ENGINE = EngineConfig(
    commit_interval_ms=20, job_timeout_ms=5_000, broker_heartbeat_interval_ms=500
)
DEMO_BROKER = BrokerConfig(host="127.0.0.1", port=0, engine=DEMO_ENGINE, heartbeat_timeout_ms=2_000)


def walk_files(root: Path, *, include_hidden: bool = False) -> Iterator[Path]:
    """Regular files under ``root`` in a stable order, without following symlinks."""
    for directory, dirnames, filenames in os.walk(root):
        if not include_hidden:
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        dirnames.sort()
        for name in sorted(filenames):
            if not include_hidden and name.startswith("."):
                continue
            path = Path(directory, name)
            if path.is_file() and not path.is_symlink():
                yield path


@dataclass
class DemoSummary:
    files: int = 0
    bytes: int = 0
    completed: int = 0
    retries: int = 0
    dead: int = 0
    elapsed_s: float = 0.0
    results: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def jobs_per_s(self) -> float:
        return self.completed / self.elapsed_s if self.elapsed_s > 0 else 0.0


class ResultLog:
    """Append-only JSON lines, fsynced per record, read back as one record per path."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = path.open("ab")

    def append(self, record: dict[str, Any]) -> None:
        self._handle.write(orjson.dumps(record) + b"\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()

    def read(self) -> dict[str, dict[str, Any]]:
        records: dict[str, dict[str, Any]] = {}
        with self.path.open("rb") as handle:
            for line in handle:
                try:
                    record = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue  # a line torn by kill -9; its job was not completed
                records[record["path"]] = record
        return records


def _results_path(root: Path) -> Path:
    state_dir = Path(os.environ.get("STORAGE_DIR") or ".osqueue")
    tag = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]
    return state_dir / f"demo-results-{tag}.jsonl"


async def run_demo(
    root: Path,
    storage: Storage,
    *,
    concurrency: int = 8,
    include_hidden: bool = False,
    console: Console | None = None,
) -> DemoSummary:
    """Process every file under ``root``; resumable after any interruption."""
    console = console or Console()
    files = [str(p.resolve()) for p in walk_files(root, include_hidden=include_hidden)]
    results = ResultLog(_results_path(root))
    started = time.monotonic()
    console.print(
        f"[bold]osqueue demo[/bold]: {len(files)} files under {root}, {storage.describe()}"
    )
    async with (
        run_broker_in_background(storage, DEMO_BROKER) as broker,
        AsyncOsqueueClient(broker.url) as client,
    ):
        progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), console=console,
        )  # fmt: skip
        with progress:
            await _submit_all(client, files, progress)
            retries = await _work(client, results, progress, len(files), concurrency)
        stats = await client.stats()
    results.close()
    summary = _summarise(results.read(), set(files), stats, retries, time.monotonic() - started)
    _print_summary(console, summary)
    return summary


async def _work(
    client: AsyncOsqueueClient, results: ResultLog, progress: Progress, total: int, concurrency: int
) -> int:
    """Run workers until the queue is empty; returns how many jobs ran on a retry."""
    task = progress.add_task("files", total=total, completed=len(results.read()))
    retries = 0

    def record(job: JobContext[Any]) -> None:
        nonlocal retries
        stats = file_stats(job.payload)
        results.append(
            {"path": job.payload["path"], "jobId": job.job_id, "attempt": job.attempt, **stats}
        )
        retries += job.attempt > 1
        progress.advance(task)

    async def handle(job: JobContext[Any]) -> None:
        await asyncio.to_thread(record, job)

    worker = Worker(client, {JOB_TYPE: handle}, concurrency=concurrency, types=[JOB_TYPE])
    runner = asyncio.create_task(worker.run(install_signal_handlers=False))
    try:
        await _wait_until_drained(client, runner)
    finally:
        await worker.stop()
        await asyncio.gather(runner, return_exceptions=True)
    return retries


async def _submit_all(client: AsyncOsqueueClient, files: list[str], progress: Progress) -> None:
    task = progress.add_task("submit", total=len(files))
    for start in range(0, len(files), SUBMIT_BATCH):
        chunk = files[start : start + SUBMIT_BATCH]
        specs = [
            JobSpec({"path": p}, type=JOB_TYPE, idempotency_key=f"demo:{p}", max_attempts=3)
            for p in chunk
        ]
        await client.submit_batch(specs)
        progress.advance(task, len(chunk))
    progress.remove_task(task)


async def _wait_until_drained(client: AsyncOsqueueClient, runner: asyncio.Task[None]) -> None:
    """Until no job is queued or running (a worker that died is reported, not hidden)."""
    while True:
        stats = await client.stats()
        if stats["total"] == 0:
            return
        if runner.done():
            runner.result()
            return
        await asyncio.sleep(0.2)


def _summarise(
    records: dict[str, dict[str, Any]],
    files: set[str],
    stats: dict[str, Any],
    retries: int,
    elapsed_s: float,
) -> DemoSummary:
    mine = {p: r for p, r in records.items() if p in files}
    return DemoSummary(
        files=len(files),
        bytes=sum(r["size"] for r in mine.values()),
        completed=len(mine),
        retries=retries,
        dead=int(stats.get("dead", 0)),
        elapsed_s=elapsed_s,
        results=mine,
    )


def _print_summary(console: Console, summary: DemoSummary) -> None:
    table = Table(title="osqueue demo summary")
    table.add_column("files")
    table.add_column("completed", justify="right")
    table.add_column("bytes", justify="right")
    table.add_column("jobs/s", justify="right")
    table.add_column("retries", justify="right")
    table.add_column("dead", justify="right")
    table.add_row(
        str(summary.files), str(summary.completed), f"{summary.bytes:,}",
        f"{summary.jobs_per_s:.1f}", str(summary.retries), str(summary.dead),
    )  # fmt: skip
    console.print(table)
