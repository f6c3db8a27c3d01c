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
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
import orjson
from rich.console import Console
from rich.table import Table

from osqueue.errors import ConfigError, OsqueueError

if TYPE_CHECKING:
    from osqueue.client import AsyncOsqueueClient

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
    """Run a command's coroutine, turning osqueue errors into exit codes and messages."""
    try:
        return asyncio.run(coro)
    except ConfigError as exc:
        console.print(f"[red]configuration error:[/red] {exc.message}")
        sys.exit(EXIT_CONFIG)
    except OsqueueError as exc:
        console.print(f"[red]{exc.tag}:[/red] {exc.message}")
        sys.exit(EXIT_UNAVAILABLE if exc.retryable else EXIT_FAILED)
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _storage(url: str | None) -> Any:
    from osqueue.storage import open_storage, storage_from_env

    return open_storage(url) if url else storage_from_env(os.environ)


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


@main.command(
    epilog="""\b
Examples:
  osqueue worker                              # built-in echo, sleep, fail, file-stats
  osqueue worker -H resize=myapp.jobs:resize -c 8
  osqueue worker --transport ws --types echo
  osqueue worker --discover --storage s3://bucket/q   # follows the leader through failovers
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
    log_level: str,
) -> None:
    """Claim and run jobs until SIGINT or SIGTERM, then stop gracefully."""
    from osqueue.handlers import BUILTIN_HANDLERS
    from osqueue.worker import Worker

    _setup_logging(log_level)

    async def run() -> None:
        table = dict(_load_handler(h) for h in handlers) if handlers else dict(BUILTIN_HANDLERS)
        wanted = [t.strip() for t in types.split(",") if t.strip()] if types else list(table)
        connect = _client(url, token, transport, discover=discover, storage=storage)
        async with connect as client:
            runner = Worker(
                client,
                table,
                concurrency=concurrency,
                types=wanted,
                shutdown_grace_s=shutdown_grace_s,
            )
            console.print(f"worker {runner.worker_id} on {client.url} handling {', '.join(wanted)}")
            await runner.run()

    _run(run())


# -- producer and inspection ----------------------------------------------------------


def _parse_payload(text: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ConfigError(
            f"PAYLOAD is not valid JSON ({exc}); quote it like '{{\"a\": 1}}'"
        ) from None


@main.command(
    epilog="""\b
Examples:
  osqueue submit '{"msg": "hello"}' --type echo
  osqueue submit '{"seconds": 5}' --type sleep --delay-s 30 --priority 10
  osqueue submit '{"path": "README.md"}' --type file-stats --key readme-once
"""
)
@click.argument("payload")
@url_option
@token_option
@transport_option
@discover_option
@storage_option
@click.option("--type", "job_type", default=None, help="Job type.")
@click.option("--max-attempts", type=click.IntRange(1, 1000), default=None)
@click.option("--delay-s", type=click.FloatRange(0), default=None, help="Not claimable before.")
@click.option("--priority", type=int, default=0, help="Higher runs first.")
@click.option("--key", "idempotency_key", default=None, help="Idempotency key.")
def submit(
    payload: str,
    url: str,
    token: str | None,
    transport: str,
    discover: bool,
    storage: str | None,
    job_type: str | None,
    max_attempts: int | None,
    delay_s: float | None,
    priority: int,
    idempotency_key: str | None,
) -> None:
    """Submit one job with a JSON PAYLOAD and print its id."""

    async def run() -> None:
        body = _parse_payload(payload)
        async with _client(url, token, transport, discover=discover, storage=storage) as client:
            receipt = await client.submit_with_receipt(
                body,
                type=job_type,
                max_attempts=max_attempts,
                delay_s=delay_s,
                priority=priority,
                idempotency_key=idempotency_key,
            )
        suffix = " (duplicate of an earlier submit)" if receipt.duplicate else ""
        out.print(f"{receipt.job_id}{suffix}")

    _run(run())


@main.command()
@url_option
@token_option
@transport_option
@click.option("--json", "as_json", is_flag=True, help="Print raw JSON.")
def stats(url: str, token: str | None, transport: str, as_json: bool) -> None:
    """Show queue counters and the broker's leadership state."""
    from osqueue.client import AsyncOsqueueClient

    async def run() -> None:
        async with AsyncOsqueueClient(url, token=token, transport=transport) as client:
            numbers = await client.stats()
        if as_json:
            out.print_json(orjson.dumps(numbers).decode())
            return
        table = Table(title=f"osqueue at {url}")
        table.add_column("counter")
        table.add_column("value", justify="right")
        for key, value in numbers.items():
            table.add_row(key, str(value))
        out.print(table)

    _run(run())


@main.command()
@url_option
@token_option
@transport_option
@click.option("--limit", type=click.IntRange(1), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print raw JSON.")
def jobs(url: str, token: str | None, transport: str, limit: int, as_json: bool) -> None:
    """List live jobs (oldest first)."""
    from osqueue.client import AsyncOsqueueClient

    async def run() -> None:
        async with AsyncOsqueueClient(url, token=token, transport=transport) as client:
            listing = await client.list_jobs()
        if as_json:
            out.print_json(orjson.dumps(listing).decode())
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

    _run(run())


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
    import httpx

    from osqueue.client.rest import normalize_base_url
    from osqueue.errors import error_from_body

    base = normalize_base_url(url)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        async with httpx.AsyncClient(timeout=5.0) as http:
            response = await http.get(f"{base}/readyz", headers=headers)
        body = response.json()
    except (httpx.HTTPError, ValueError) as exc:
        return {"url": base, "role": "unreachable", "error": repr(exc)}
    if response.status_code == 200:
        role, leader = "leader", body.get("leaderAddress")
    elif isinstance(body, dict) and body.get("_tag") == "BrokerLeadershipError":
        role, leader = "standby", body.get("leader")
    else:
        raise error_from_body(body, status=response.status_code, method="GET", path="/readyz")
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
