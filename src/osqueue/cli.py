"""The ``osqueue`` command line.

Every option can also be set by the environment variable named in its help; flags win.
Exit codes: 0 success, 1 a job or command failed, 2 bad configuration or usage,
3 the broker or store could not be reached, 130 interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

import click
import orjson
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from osqueue.broker.validation import parse_body
from osqueue.errors import BrokerProtocolError, ConfigError, OsqueueError

if TYPE_CHECKING:
    from osqueue.client import AsyncOsqueueClient, JobSpec, SubmitReceipt
    from osqueue.retries import RetryPolicy

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_UNAVAILABLE = 3
EXIT_INTERRUPTED = 130

T = TypeVar("T")
console = Console(stderr=True)
out = Console()


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine, turning osqueue errors into exit codes and messages.

    The loop is uvloop's where it is installed (uvicorn's ``standard`` extra brings it on
    Linux and macOS): an ``osqueue worker`` spent a fifth of its time in asyncio's own loop.
    """
    try:
        import uvloop
    except ImportError:
        runner: Callable[[Coroutine[Any, Any, T]], T] = asyncio.run
    else:
        runner = uvloop.run
    try:
        return runner(coro)
    except ConfigError as exc:
        console.print(f"[red]configuration error:[/red] {escape(exc.message)}")
        sys.exit(EXIT_CONFIG)
    except OsqueueError as exc:
        console.print(f"[red]{exc.tag}:[/red] {escape(exc.message)}")
        sys.exit(EXIT_UNAVAILABLE if exc.retryable else EXIT_FAILED)
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _storage(url: str | None) -> Any:
    """The store ``--storage`` (or ``STORAGE_URL``) names, else the one the environment
    configures. Either way the backend's variables apply (``S3_REGION``,
    ``S3_ENDPOINT_URL``, ``STORAGE_EMULATOR_HOST``, the ``S3_MAX_*`` throttles); a URL
    takes precedence over ``STORAGE_BACKEND``."""
    from osqueue.storage import storage_from_env

    if not url:
        return storage_from_env(os.environ)
    return storage_from_env({**os.environ, "STORAGE_URL": url, "STORAGE_BACKEND": ""})


url_option = click.option(
    "--url",
    envvar="BROKER_URL",
    show_envvar=True,
    default="http://localhost:8080",
    show_default=True,
    help="Broker to talk to.",
)
token_option = click.option(
    "--token", envvar="OSQUEUE_TOKEN", show_envvar=True, default=None, help="Bearer token."
)
transport_option = click.option(
    "--transport",
    envvar="OSQUEUE_TRANSPORT",
    show_envvar=True,
    type=click.Choice(["rest", "ws", "connect"]),
    default="rest",
    show_default=True,
    help="How the client reaches the broker.",
)
storage_option = click.option(
    "--storage",
    envvar="STORAGE_URL",
    show_envvar=True,
    default=None,
    help="Store URL: file:///path, s3://bucket/prefix, gs://bucket/prefix, memory://. "
    "Without it STORAGE_BACKEND and friends apply; the default is the file store in "
    "STORAGE_DIR (.osqueue).",
)
log_option = click.option(
    "--log-level",
    envvar="OSQUEUE_LOG_LEVEL",
    show_envvar=True,
    default="info",
    type=click.Choice(["debug", "info", "warning", "error"]),
    show_default=True,
)


discover_option = click.option(
    "--discover/--no-discover",
    envvar="OSQUEUE_DISCOVER",
    show_envvar=True,
    default=False,
    help="Find the leading broker in the store (--storage) instead of --url, and follow "
    "it through failovers.",
)


@contextlib.asynccontextmanager
async def _client(
    url: str, token: str | None, transport: str, *, discover: bool, storage: str | None
) -> AsyncIterator[AsyncOsqueueClient]:
    """A client of the broker at ``url``, or with ``discover`` of the one the store names."""
    from osqueue.client import AsyncOsqueueClient
    from osqueue.client.discovery import StoreDiscovery

    if not discover:
        async with AsyncOsqueueClient(url, token=token, transport=transport) as client:
            yield client
        return
    store = _storage(storage)
    try:
        discovery = StoreDiscovery(store)
        leader_url = await discovery.broker_url()
        async with AsyncOsqueueClient(
            leader_url, token=token, transport=transport, discover=discovery
        ) as client:
            yield client
    finally:
        await store.close()


def client_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--url``, ``--token`` and ``--transport``: how a command reaches the broker."""
    return url_option(token_option(transport_option(command)))


def _with_client(
    url: str, token: str | None, transport: str, use: Callable[[AsyncOsqueueClient], Awaitable[T]]
) -> T:
    """``use(client)`` with a client of the broker at ``url``; errors become exit codes."""

    async def run() -> T:
        async with _client(url, token, transport, discover=False, storage=None) as client:
            return await use(client)

    return _run(run())


def _print_json(value: Any) -> None:
    out.print_json(orjson.dumps(value).decode())


json_option = click.option("--json", "as_json", is_flag=True, help="Print raw JSON.")


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog="""\b
Examples:
  osqueue demo                      # a broker, workers and a job per file, on .osqueue/
  osqueue broker                    # serve on :8080 with the file store in .osqueue/
  osqueue worker                    # run the built-in handlers against BROKER_URL
  osqueue submit '{"msg": "hi"}' --type echo
  osqueue stats
  osqueue status                    # who leads; exits 3 unless this broker does
  osqueue job ID                    # one job, queued, running or dead
  osqueue dead list                 # jobs that will not run again; requeue, purge
""",
)
@click.version_option(package_name="osqueue")
def main() -> None:
    """osqueue: a job queue whose whole state is one JSON document on object storage."""


# -- broker ---------------------------------------------------------------------------


@main.command(
    epilog="""\b
Examples:
  osqueue broker --port 8080
  osqueue broker --storage s3://my-bucket/queues/prod --standby
  STORAGE_URL=gs://bucket/q BROKER_ADVERTISE_ADDRESS=10.0.0.5:8080 osqueue broker
"""
)
@click.option("--host", default=None, help="Listen address. [env BROKER_HOST; default 0.0.0.0]")
@click.option("--port", type=int, default=None, help="Listen port. [env BROKER_PORT; default 8080]")
@click.option(
    "--advertise", default=None, help="host:port others reach. [env BROKER_ADVERTISE_ADDRESS]"
)
@click.option(
    "--standby/--no-standby",
    default=None,
    help="Wait for the current leader to go away instead of refusing. [env BROKER_STANDBY]",
)
@click.option(
    "--commit-interval-ms", type=int, default=None, help="[env GROUP_COMMIT_INTERVAL_MS; 50]"
)
@click.option("--job-timeout-ms", type=int, default=None, help="[env JOB_HEARTBEAT_TIMEOUT_MS]")
@storage_option
@log_option
def broker(
    host: str | None,
    port: int | None,
    advertise: str | None,
    standby: bool | None,
    commit_interval_ms: int | None,
    job_timeout_ms: int | None,
    storage: str | None,
    log_level: str,
) -> None:
    """Run a broker: the one process that commits every change to the store."""
    from osqueue.broker.server import serve
    from osqueue.config import broker_config

    _setup_logging(log_level)

    async def run() -> None:
        config = broker_config(
            {
                "host": host,
                "port": port,
                "advertise": advertise,
                "standby": standby,
                "commit_interval": commit_interval_ms,
                "job_timeout": job_timeout_ms,
            }
        )
        store = _storage(storage)
        console.print(f"osqueue broker on {config.host}:{config.port}, store {store.describe()}")
        await serve(store, config)

    _run(run())


# -- worker ---------------------------------------------------------------------------


def _load_handler(spec: str) -> tuple[str, Callable[..., Any]]:
    """``TYPE=module:function`` to (type, callable)."""
    job_type, sep, target = spec.partition("=")
    module_name, colon, attr = target.partition(":")
    if not sep or not colon or not job_type or not module_name or not attr:
        raise ConfigError(f"--handler must look like TYPE=module:function, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"--handler {spec}: cannot import {module_name}: {exc}") from exc
    handler = getattr(module, attr, None)
    if not callable(handler):
        raise ConfigError(f"--handler {spec}: {module_name} has no callable {attr!r}")
    return job_type, handler


def _parse_retry(spec: str) -> tuple[str, RetryPolicy]:
    """``TYPE=fixed:DELAY_S`` or ``TYPE=exponential:BASE_S[:CAP_S]`` to (type, policy)."""
    from osqueue.retries import ExponentialBackoff, FixedBackoff

    job_type, sep, policy = spec.partition("=")
    kind, _, numbers = policy.partition(":")
    usage = "TYPE=fixed:DELAY_S or TYPE=exponential:BASE_S[:CAP_S] (TYPE * for every type)"
    try:
        values = [float(n) for n in numbers.split(":")] if numbers else []
    except ValueError:
        values = []
    if not sep or not job_type:
        raise ConfigError(f"--retry must look like {usage}, got {spec!r}")
    if kind == "fixed" and len(values) == 1:
        return job_type, FixedBackoff(values[0])
    if kind == "exponential" and len(values) == 1:
        return job_type, ExponentialBackoff(base_s=values[0])
    if kind == "exponential" and len(values) == 2:
        return job_type, ExponentialBackoff(base_s=values[0], cap_s=values[1])
    raise ConfigError(f"--retry must look like {usage}, got {spec!r}")


@main.command(
    epilog="""\b
Examples:
  osqueue worker                              # built-in echo, sleep, fail, file-stats
  osqueue worker -H resize=myapp.jobs:resize -c 8
  osqueue worker --transport ws --types echo
  osqueue worker --discover --storage s3://bucket/q   # follows the leader through failovers
  osqueue worker --retry 'fail=exponential:1:60' --retry '*=fixed:5'
  WORKER_RETRY='resize=fixed:30 email=exponential:2' osqueue worker -H ...
"""
)
@url_option
@token_option
@transport_option
@discover_option
@storage_option
@click.option(
    "-H", "--handler", "handlers", multiple=True, help="TYPE=module:function (repeatable)."
)
@click.option(
    "-c", "--concurrency", envvar="WORKER_CONCURRENCY", show_envvar=True, default=4,
    type=click.IntRange(1, 10_000), show_default=True,
)  # fmt: skip
@click.option(
    "--types", default=None, help="Comma-separated job types to claim (default: all handled)."
)
@click.option(
    "--shutdown-grace-s", envvar="WORKER_SHUTDOWN_GRACE_S", show_envvar=True, default=10.0,
    type=click.FloatRange(0), show_default=True,
)  # fmt: skip
@click.option(
    "--retry", "retries", multiple=True, envvar="WORKER_RETRY", show_envvar=True,
    help="Retry policy of a job type (repeatable; the variable takes several, space-separated): "
    "TYPE=fixed:DELAY_S or TYPE=exponential:BASE_S[:CAP_S], TYPE * for every other type. "
    "Default: the broker's backoff (1 s doubling to 5 min, with jitter).",
)  # fmt: skip
@click.option(
    "--heartbeat-interval-s", envvar="WORKER_HEARTBEAT_INTERVAL_S", show_envvar=True,
    default=10.0, type=click.FloatRange(0.01), show_default=True,
    help="How often a running job's lease is refreshed; keep it well under the broker's "
    "JOB_HEARTBEAT_TIMEOUT_MS. A cancelled job's handler stops at the next one.",
)  # fmt: skip
@click.option(
    "--claim-wait-ms", envvar="WORKER_CLAIM_WAIT_MS", show_envvar=True, default=5_000,
    type=click.IntRange(0, 60_000), show_default=True,
    help="How long an idle worker's claim waits at the broker for a job (0: plain polling).",
)  # fmt: skip
@log_option
def worker(
    url: str,
    token: str | None,
    transport: str,
    discover: bool,
    storage: str | None,
    handlers: tuple[str, ...],
    concurrency: int,
    types: str | None,
    shutdown_grace_s: float,
    retries: tuple[str, ...],
    heartbeat_interval_s: float,
    claim_wait_ms: int,
    log_level: str,
) -> None:
    """Claim and run jobs until SIGINT or SIGTERM, then stop gracefully."""
    from osqueue.handlers import BUILTIN_HANDLERS
    from osqueue.worker import Worker

    _setup_logging(log_level)

    async def run() -> None:
        table = dict(_load_handler(h) for h in handlers) if handlers else dict(BUILTIN_HANDLERS)
        wanted = [t.strip() for t in types.split(",") if t.strip()] if types else list(table)
        policies = dict(_parse_retry(spec) for spec in retries)
        default_policy = policies.pop("*", None)
        connect = _client(url, token, transport, discover=discover, storage=storage)
        async with connect as client:
            runner = Worker(
                client,
                table,
                concurrency=concurrency,
                types=wanted,
                shutdown_grace_s=shutdown_grace_s,
                heartbeat_interval_s=heartbeat_interval_s,
                claim_wait_ms=claim_wait_ms,
                retry_policy=default_policy,
                retry_policies=policies,
            )
            console.print(f"worker {runner.worker_id} on {client.url} handling {', '.join(wanted)}")
            await runner.run()

    _run(run())


# -- producer and inspection ----------------------------------------------------------


def _parse_payload(text: str) -> Any:
    """PAYLOAD decoded as strictly as the broker decodes a body: an integer beyond 64 bits
    is refused, not turned into a float."""
    try:
        return parse_body(text.encode())
    except BrokerProtocolError as exc:
        raise ConfigError(
            f"PAYLOAD is refused ({exc.message}); quote JSON like '{{\"a\": 1}}'"
        ) from None


def _parse_run_at(ctx: click.Context, param: click.Parameter, text: str | None) -> int | None:
    """``--run-at``: epoch milliseconds, or ISO 8601 with a timezone."""
    if text is None:
        return None
    if text.isdigit():
        return int(text)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        when = None
    if when is None or when.tzinfo is None:
        raise click.BadParameter(
            f"{text!r} needs a time with a timezone, like 2026-12-24T18:00:00Z or "
            "2026-12-24T19:00:00+01:00, or epoch milliseconds"
        )
    return int(when.timestamp() * 1000)


def _read_batch(lines: TextIO, defaults: JobSpec) -> list[tuple[int, JobSpec | OsqueueError]]:
    """The jobs of a JSON Lines file, by line number; a line that is not a submit body is
    its error. ``defaults`` fills what a line leaves out."""
    import dataclasses

    from osqueue.client import JobSpec

    entries: list[tuple[int, JobSpec | OsqueueError]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            spec = JobSpec.from_body(parse_body(line.encode()))
        except BrokerProtocolError as exc:
            entries.append((number, exc))
            continue
        unset = {
            field.name: getattr(defaults, field.name)
            for field in dataclasses.fields(spec)
            if getattr(spec, field.name) is None and field.name != "payload"
        }
        entries.append((number, dataclasses.replace(spec, **unset)))
    return entries


async def _submit_in_chunks(
    client: AsyncOsqueueClient, specs: list[JobSpec], chunk_size: int
) -> list[SubmitReceipt | OsqueueError]:
    """Submit ``specs`` in batches of ``chunk_size`` (one durable write each).

    A batch the broker refuses as a whole (too large, say) counts as refused job by job;
    an error worth retrying later stops the submission, saying how far it got.
    """
    results: list[SubmitReceipt | OsqueueError] = []
    for start in range(0, len(specs), chunk_size):
        chunk = specs[start : start + chunk_size]
        try:
            results.extend(await client.submit_batch(chunk))
        except OsqueueError as exc:
            if exc.retryable:
                console.print(
                    f"[yellow]stopped after {start} of {len(specs)} jobs;[/yellow] jobs with "
                    "an idempotency key can be sent again safely"
                )
                raise
            results.extend([exc] * len(chunk))
    return results


def _batch_report(
    entries: list[tuple[int, JobSpec | OsqueueError]], results: list[SubmitReceipt | OsqueueError]
) -> list[dict[str, Any]]:
    """One answer per line: ``{"line", "jobId", "duplicate"}`` or ``{"line", "error"}``."""
    answers = iter(results)
    report: list[dict[str, Any]] = []
    for number, entry in entries:
        outcome = entry if isinstance(entry, OsqueueError) else next(answers)
        if isinstance(outcome, OsqueueError):
            report.append({"line": number, "error": outcome.to_body()})
        else:
            report.append({"line": number, "jobId": outcome.job_id, "duplicate": outcome.duplicate})
    return report


def _print_batch_report(source: str, report: list[dict[str, Any]]) -> None:
    refused = sum("error" in r for r in report)
    duplicates = sum(bool(r.get("duplicate")) for r in report)
    submitted = len(report) - refused - duplicates
    table = Table(
        title=f"{source}: {submitted} submitted, {duplicates} duplicates, {refused} refused"
    )
    table.add_column("line", justify="right")
    table.add_column("job id", min_width=36, no_wrap=True)
    table.add_column("result", overflow="fold")
    for row in report:
        if "error" in row:
            error = row["error"]
            table.add_row(str(row["line"]), "", f"[red]{error['_tag']}[/red]: {error['message']}")
        else:
            result = "duplicate of an earlier submit" if row["duplicate"] else "submitted"
            table.add_row(str(row["line"]), row["jobId"], result)
    out.print(table)


@main.command(
    epilog="""\b
Examples:
  osqueue submit '{"msg": "hello"}' --type echo
  osqueue submit '{"seconds": 5}' --type sleep --delay-s 30 --priority 10
  osqueue submit '{"msg": "at noon"}' --type echo --run-at 2026-12-24T12:00:00Z
  osqueue submit '{"path": "README.md"}' --type file-stats --key readme-once
  osqueue submit --batch jobs.jsonl --type echo     # --type for lines without one
  generate-jobs | osqueue submit --batch - --json

\b
A batch file has one submit body per line, as POST /v1/jobs takes it:
  {"payload": {"msg": "hi"}, "type": "echo", "priority": 5, "idempotencyKey": "hi-1"}
  {"payload": 42, "delayMs": 60000, "maxAttempts": 5}
Each chunk of --chunk-size lines is one durable write; a line the broker refuses is
reported on its own and the others are submitted (exit code 1 when any was refused).
"""
)
@click.argument("payload", required=False)
@url_option
@token_option
@transport_option
@discover_option
@storage_option
@click.option("--type", "job_type", default=None, help="Job type.")
@click.option("--max-attempts", type=click.IntRange(1, 1000), default=None)
@click.option("--delay-s", type=click.FloatRange(0), default=None, help="Not claimable before.")
@click.option(
    "--run-at", "run_at_ms", default=None, callback=_parse_run_at,
    help="Not claimable before this time: ISO 8601 with a timezone, or epoch milliseconds.",
)  # fmt: skip
@click.option("--priority", type=int, default=None, help="Higher runs first (default 0).")
@click.option("--key", "idempotency_key", default=None, help="Idempotency key.")
@click.option(
    "--batch", "batch_file", type=click.File("r"), default=None,
    help="Submit every line of this JSON Lines file (- for stdin) instead of PAYLOAD; the "
    "options above fill what a line leaves out.",
)  # fmt: skip
@click.option(
    "--chunk-size", envvar="OSQUEUE_BATCH_CHUNK", show_envvar=True, default=1000,
    type=click.IntRange(1, 10_000), show_default=True, help="Jobs per batch request.",
)  # fmt: skip
@json_option
def submit(
    payload: str | None,
    url: str,
    token: str | None,
    transport: str,
    discover: bool,
    storage: str | None,
    job_type: str | None,
    max_attempts: int | None,
    delay_s: float | None,
    run_at_ms: int | None,
    priority: int | None,
    idempotency_key: str | None,
    batch_file: TextIO | None,
    chunk_size: int,
    as_json: bool,
) -> None:
    """Submit one job with a JSON PAYLOAD and print its id, or many with --batch FILE."""
    from osqueue.client import JobSpec

    if (payload is None) == (batch_file is None):
        raise click.UsageError("give a PAYLOAD or --batch FILE (one of them)")
    if batch_file is not None and idempotency_key is not None:
        raise click.UsageError("--key names one job; put idempotencyKey in the lines of --batch")

    if batch_file is not None:
        delay_ms = None if delay_s is None else round(delay_s * 1000)
        defaults = JobSpec(None, job_type, max_attempts, delay_ms, run_at_ms, priority)
        sys.exit(
            _submit_batch_file(
                batch_file,
                defaults,
                chunk_size,
                as_json,
                _client(url, token, transport, discover=discover, storage=storage),
            )
        )

    async def run() -> None:
        body = _parse_payload(payload or "")
        async with _client(url, token, transport, discover=discover, storage=storage) as client:
            receipt = await client.submit_with_receipt(
                body,
                type=job_type,
                max_attempts=max_attempts,
                delay_s=delay_s,
                run_at=run_at_ms,
                priority=priority,
                idempotency_key=idempotency_key,
            )
        if as_json:
            _print_json({"jobId": receipt.job_id, "duplicate": receipt.duplicate})
        else:
            suffix = " (duplicate of an earlier submit)" if receipt.duplicate else ""
            out.print(f"{receipt.job_id}{suffix}")

    _run(run())


def _submit_batch_file(
    batch_file: TextIO,
    defaults: JobSpec,
    chunk_size: int,
    as_json: bool,
    connect: contextlib.AbstractAsyncContextManager[AsyncOsqueueClient],
) -> int:
    """``submit --batch``: send the file's jobs, print one result per line, return the
    exit code (1 when the broker refused any line)."""
    entries = _read_batch(batch_file, defaults)
    specs = [entry for _, entry in entries if not isinstance(entry, OsqueueError)]

    async def run() -> list[SubmitReceipt | OsqueueError]:
        async with connect as client:
            return await _submit_in_chunks(client, specs, chunk_size)

    report = _batch_report(entries, _run(run()))
    if as_json:
        _print_json({"results": report})
    else:
        _print_batch_report(batch_file.name, report)
    return EXIT_FAILED if any("error" in row for row in report) else EXIT_OK


@main.command()
@client_options
@json_option
def stats(url: str, token: str | None, transport: str, as_json: bool) -> None:
    """Show queue counters: jobs queued and running, completed, dead (kept and ever)."""
    numbers = _with_client(url, token, transport, lambda client: client.stats())
    if as_json:
        _print_json(numbers)
        return
    table = Table(title=f"osqueue at {url}")
    table.add_column("counter")
    table.add_column("value", justify="right")
    for key, value in numbers.items():
        table.add_row(key, str(value))
    out.print(table)


@main.command()
@client_options
@click.option("--limit", type=click.IntRange(1), default=50, show_default=True)
@json_option
def jobs(url: str, token: str | None, transport: str, limit: int, as_json: bool) -> None:
    """List live jobs (oldest first)."""
    listing = _with_client(url, token, transport, lambda client: client.list_jobs())
    if as_json:
        _print_json(listing)
        return
    table = Table(title=f"{listing['total']} jobs, {listing['inProgress']} in progress")
    for column in ("id", "type", "status", "attempts", "worker"):
        table.add_column(column)
    for job in listing["jobs"][:limit]:
        table.add_row(
            job["id"], job["type"], job["status"],
            f"{job['attempts']}/{job['maxAttempts']}", job["workerId"],
        )  # fmt: skip
    out.print(table)


@main.command(
    epilog="""\b
Examples:
  osqueue status                              # the broker at BROKER_URL
  osqueue status --url http://10.0.0.6:8080   # is this one a standby?
  osqueue status --storage s3://bucket/q      # and what the store says
  until osqueue status >/dev/null; do sleep 1; done   # wait for a leader
"""
)
@url_option
@token_option
@click.option(
    "--storage",
    "store_url",
    envvar="STORAGE_URL",
    show_envvar=True,
    default=None,
    help="Also read the leader from this store (file:///path, s3://bucket/prefix, ...).",
)
@click.option("--json", "as_json", is_flag=True, help="Print raw JSON.")
def status(url: str, token: str | None, store_url: str | None, as_json: bool) -> None:
    """Show who leads: whether the broker at URL is the leader or a standby, the epoch and
    the age of the leader's heartbeat. Exits 0 when that broker leads, 3 when it is a
    standby or cannot be reached, so it serves as a readiness check."""

    async def run() -> int:
        report = {"broker": await _broker_status(url, token)}
        if store_url:
            report["store"] = await _store_status(store_url)
        if as_json:
            out.print_json(orjson.dumps(report).decode())
        else:
            table = Table(title=f"osqueue leadership, {report['broker']['url']}")
            table.add_column("")
            table.add_column("value")
            for section, facts in report.items():
                for key, value in facts.items():
                    table.add_row(f"{section} {key}", "" if value is None else str(value))
            out.print(table)
        return EXIT_OK if report["broker"]["role"] == "leader" else EXIT_UNAVAILABLE

    sys.exit(_run(run()))


async def _broker_status(url: str, token: str | None) -> dict[str, Any]:
    """The broker's own answer on ``/readyz``: leader, standby or unreachable."""
    import aiohttp

    from osqueue.client.rest import normalize_base_url
    from osqueue.errors import error_from_body

    base = normalize_base_url(url)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    timeout = aiohttp.ClientTimeout(total=5.0)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout, trust_env=True) as http,
            http.get(f"{base}/readyz", headers=headers) as response,
        ):
            status, body = response.status, orjson.loads(await response.read())
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        return {"url": base, "role": "unreachable", "error": repr(exc)}
    if status == 200:
        role, leader = "leader", body.get("leaderAddress")
    elif isinstance(body, dict) and body.get("_tag") == "BrokerLeadershipError":
        role, leader = "standby", body.get("leader")
    else:
        raise error_from_body(body, status=status, method="GET", path="/readyz")
    return {
        "url": base,
        "role": role,
        "brokerId": body.get("brokerId"),
        "leader": leader,
        "leaderBrokerId": body.get("leaderBrokerId"),
        "epoch": body.get("epoch"),
        "heartbeatAgeMs": body.get("heartbeatAgeMs"),
    }


async def _store_status(store_url: str) -> dict[str, Any]:
    """What the state document says; the age compares the leader's clock with this one."""
    import time

    from osqueue.client.discovery import read_leader

    record = await read_leader(store_url)
    age_ms = int(time.time() * 1000) - record.heartbeat_ms if record.heartbeat_ms else None
    return {
        "leader": record.address,
        "brokerId": record.broker_id,
        "epoch": record.epoch,
        "heartbeatAgeMs": age_ms,
    }


# -- one job, dead letters --------------------------------------------------------------

#: The job fields in the order a person reads them; any others follow.
_JOB_FIELDS = (
    "id", "status", "type", "payload", "attempts", "priority", "createdAt", "runAt",
    "workerId", "heartbeat", "lastError", "reason", "deadAt", "idempotencyKey",
)  # fmt: skip
_TIME_FIELDS = frozenset(("createdAt", "runAt", "heartbeat", "deadAt"))


def _when(epoch_ms: int) -> str:
    """Epoch milliseconds as ISO 8601 UTC, to the millisecond."""
    moment = datetime.fromtimestamp(epoch_ms / 1000, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _short_when(epoch_ms: Any) -> str:
    """Epoch milliseconds as ``YYYY-MM-DD HH:MM:SS`` UTC, for table columns."""
    if not isinstance(epoch_ms, int) or epoch_ms <= 0:
        return ""
    return datetime.fromtimestamp(epoch_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _job_value(job: dict[str, Any], field: str) -> str:
    value = job[field]
    if field == "attempts":
        return f"{value} of {job.get('maxAttempts', '?')}"
    if field in _TIME_FIELDS and isinstance(value, int) and value > 0:
        return _when(value)
    if field == "payload" or not isinstance(value, str):
        return orjson.dumps(value).decode()
    return value


def _print_job(job: dict[str, Any]) -> None:
    table = Table(title=f"job {job.get('id')}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    others = sorted(set(job) - set(_JOB_FIELDS) - {"maxAttempts"})
    for field in (*_JOB_FIELDS, *others):
        if field in job:
            table.add_row(field, _job_value(job, field))
    out.print(table)


@main.command(
    epilog="""\b
Examples:
  osqueue job 3f0c1a4e-...            # queued, in progress or dead
  osqueue job 3f0c1a4e-... --json | jq .payload
"""
)
@click.argument("job_id")
@client_options
@json_option
def job(job_id: str, url: str, token: str | None, transport: str, as_json: bool) -> None:
    """Show one job by id, whether queued, in progress or dead (exit 1 when the queue
    does not hold it: completed, cancelled, purged or never submitted)."""
    found = _with_client(url, token, transport, lambda client: client.get_job(job_id))
    if as_json:
        _print_json(found)
    else:
        _print_job(found)


@main.command(
    epilog="""\b
Examples:
  osqueue cancel 3f0c1a4e-...
  osqueue jobs --json | jq -r '.jobs[] | select(.type == "resize") | .id' \\
    | xargs -n1 osqueue cancel
"""
)
@click.argument("job_id")
@client_options
@json_option
def cancel(job_id: str, url: str, token: str | None, transport: str, as_json: bool) -> None:
    """Remove a queued or running job. A worker running it learns at its next heartbeat
    and stops the handler; work already done is not undone."""
    _with_client(url, token, transport, lambda client: client.cancel(job_id))
    if as_json:
        _print_json({"jobId": job_id, "cancelled": True})
    else:
        out.print(f"cancelled job {job_id}")


@main.group(
    epilog="""\b
Examples:
  osqueue dead list
  osqueue dead show 3f0c1a4e-...
  osqueue dead requeue --type resize
  osqueue dead purge --yes
"""
)
def dead() -> None:
    """Dead letters: jobs that will not run again (attempts used up, failed for good,
    invalid payload, or timed out on their last attempt). The newest DEAD_LETTER_LIMIT
    (1000) are kept; `osqueue stats` counts them (dead) and every one ever (deadTotal)."""


@dead.command(
    "list",
    epilog="""\b
Examples:
  osqueue dead list --type resize --limit 10
  osqueue dead list --json | jq -r '.jobs[].lastError' | sort | uniq -c
""",
)
@click.option("--type", "job_type", default=None, help="Only dead jobs of this type.")
@click.option(
    "--limit",
    type=click.IntRange(1),
    default=50,
    show_default=True,
    help="Show the newest this many.",
)
@client_options
@json_option
def dead_list(
    job_type: str | None, limit: int, url: str, token: str | None, transport: str, as_json: bool
) -> None:
    """List dead jobs, oldest first, with why they died and their last error."""
    listing = _with_client(url, token, transport, lambda client: client.dead())
    jobs = [j for j in listing["jobs"] if job_type is None or j.get("type") == job_type]
    if as_json:
        _print_json({"jobs": jobs[-limit:], "deadTotal": listing["deadTotal"]})
        return
    table = Table(
        title=f"{len(jobs)} dead {job_type + ' ' if job_type else ''}jobs kept, "
        f"{listing['deadTotal']} ever",
        caption=f"the newest {limit}" if len(jobs) > limit else None,
    )
    table.add_column("id", min_width=36, no_wrap=True)
    for column in ("type", "reason", "attempts"):
        table.add_column(column)
    table.add_column("dead at (UTC)", no_wrap=True)
    table.add_column("last error", overflow="fold")
    for entry in jobs[-limit:]:
        table.add_row(
            entry["id"], entry.get("type", ""), entry.get("reason", ""),
            f"{entry.get('attempts')}/{entry.get('maxAttempts')}", _short_when(entry.get("deadAt")),
            entry.get("lastError", ""),
        )  # fmt: skip
    out.print(table)


@dead.command(
    "show",
    epilog="""\b
Examples:
  osqueue dead show 3f0c1a4e-...
  osqueue dead show 3f0c1a4e-... --json | jq -r .lastError
""",
)
@click.argument("job_id")
@client_options
@json_option
def dead_show(job_id: str, url: str, token: str | None, transport: str, as_json: bool) -> None:
    """Show one dead job: its payload, reason, last error and when it died."""
    found = _with_client(url, token, transport, lambda client: client.get_job(job_id))
    if found.get("status") != "dead":
        console.print(
            f"[red]job {job_id} is not dead[/red] (status {found.get('status')}); "
            f"see osqueue job {job_id}"
        )
        sys.exit(EXIT_FAILED)
    if as_json:
        _print_json(found)
    else:
        _print_job(found)


@dead.command(
    "requeue",
    epilog="""\b
Examples:
  osqueue dead requeue --id 3f0c1a4e-... --id 9b2d...
  osqueue dead requeue --type resize                # every dead resize job
  osqueue dead requeue --id 3f0c1a4e-... --type resize   # only if it is a resize job
  osqueue dead requeue --all
""",
)
@click.option("--id", "job_ids", multiple=True, help="A dead job to requeue (repeatable).")
@click.option("--type", "job_type", default=None, help="Requeue the dead jobs of this type.")
@click.option("--all", "everything", is_flag=True, help="Requeue every dead job.")
@client_options
@json_option
def dead_requeue(
    job_ids: tuple[str, ...],
    job_type: str | None,
    everything: bool,
    url: str,
    token: str | None,
    transport: str,
    as_json: bool,
) -> None:
    """Put dead jobs back in the queue. They keep their id and payload and start again
    with attempts 0. With --id and --type, a job must match both."""
    if everything and (job_ids or job_type):
        raise click.UsageError("--all requeues every dead job; leave out --id and --type")
    if not (everything or job_ids or job_type):
        raise click.UsageError("say which dead jobs to requeue: --id ID, --type TYPE or --all")
    moved = _with_client(
        url, token, transport,
        lambda client: client.requeue_dead(list(job_ids) or None, type=job_type),
    )  # fmt: skip
    if as_json:
        _print_json({"requeued": moved})
    else:
        out.print(f"requeued {moved} dead jobs")


@dead.command(
    "purge",
    epilog="""\b
Examples:
  osqueue dead purge            # asks first
  osqueue dead purge --yes --json
""",
)
@click.confirmation_option(
    "--yes", "-y", prompt="Forget every dead job for good?", help="Do not ask first."
)
@client_options
@json_option
def dead_purge(url: str, token: str | None, transport: str, as_json: bool) -> None:
    """Forget every dead job. deadTotal keeps counting them."""
    purged = _with_client(url, token, transport, lambda client: client.purge_dead())
    if as_json:
        _print_json({"purged": purged})
    else:
        out.print(f"purged {purged} dead jobs")


# -- demo -------------------------------------------------------------------------------


@main.command(
    epilog="""\b
Examples:
  osqueue demo                 # every file under the current directory
  osqueue demo ~/photos -c 16  # kill it with Ctrl-C or kill -9, run it again: it resumes
  osqueue demo src --storage memory://
"""
)
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path), default=".")
@storage_option
@click.option("-c", "--concurrency", type=click.IntRange(1, 256), default=8, show_default=True)
@click.option("--include-hidden", is_flag=True, help="Also walk dot-directories like .git.")
@log_option
def demo(
    path: Path, storage: str | None, concurrency: int, include_hidden: bool, log_level: str
) -> None:
    """Start a broker and workers, submit one job per file under PATH, and summarise."""
    from osqueue.demo import run_demo

    _setup_logging("warning" if log_level == "info" else log_level)
    _run(run_demo(path, _storage(storage), concurrency=concurrency, include_hidden=include_hidden))


if __name__ == "__main__":
    main()
