"""Servers under test, each in its own process: the broker, and a trivial JSON handler on
the same HTTP stack (Starlette on uvicorn) as the yardstick for P1.

Run as ``python -m benchmarks.servers broker|baseline [options]``; the process prints
``PORT <n>`` once it listens. ``document --prefill N`` prints a state document of N queued
jobs instead.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from osqueue.broker.server import BrokerConfig, run_broker_in_background, tune_gc
from osqueue.engine import EngineConfig
from osqueue.state import SubmitSpec
from osqueue.storage import MemoryStorage, open_storage


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


async def _serve_baseline() -> None:
    import uvicorn

    async def echo(request: Request) -> Response:
        body = orjson.loads(await request.body())
        return Response(
            orjson.dumps({"jobId": str(uuid.uuid4()), "n": len(body)}),
            media_type="application/json",
        )

    app = Starlette(routes=[Route("/v1/jobs", echo, methods=["POST"])])
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error", access_log=False)
    server = uvicorn.Server(config)
    from osqueue.broker.server import _bind

    sock = _bind("127.0.0.1", 0)
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    await server.serve(sockets=[sock])


async def _serve_broker(args: argparse.Namespace) -> None:
    storage: Any = (
        open_storage(args.storage) if args.storage else MemoryStorage(latency_ms=args.latency_ms)
    )
    if args.prefill:
        await _prefill(storage, args.prefill)
    config = BrokerConfig(
        host="127.0.0.1",
        port=0,
        max_body_bytes=64 * 1024 * 1024,
        engine=EngineConfig(commit_interval_ms=args.commit_interval_ms, job_timeout_ms=600_000),
        log_level="error",
    )
    tune_gc()  # as `osqueue broker` does (serve)
    async with run_broker_in_background(storage, config) as handle:
        engine = handle.engine

        async def bench_stats(request: Request) -> Response:
            stats = engine.stats
            body = {
                "writes": stats.writes,
                "largestBatch": stats.largest_batch,
                "lastWriteBytes": engine.committed_size,
                "rss": rss_bytes(os.getpid()),
                "queued": len(engine.state.jobs),
            }
            return Response(orjson.dumps(body), media_type="application/json")

        handle.broker.app.router.routes.append(Route("/bench/stats", bench_stats))
        print(f"PORT {handle.url.rsplit(':', 1)[1]}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()


async def _prefill(storage: Any, count: int) -> None:
    """Store a document that already holds ``count`` queued jobs (of type "bulk").

    The document is built in a process of its own, so that the memory of building it is
    not counted in the broker's RSS (P5m): the broker holds only the document's bytes in
    its memory store and the state it reads from them.
    """
    from osqueue.storage.base import STATE_KEY

    maker = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "benchmarks.servers", "document", "--prefill", str(count)),
        stdout=asyncio.subprocess.PIPE,
    )
    document, _ = await maker.communicate()
    if maker.returncode != 0:
        raise RuntimeError(f"building the prefilled document failed ({maker.returncode})")
    await storage.create_if_not_exists(STATE_KEY, document)


def _write_document(count: int) -> None:
    """Print the encoded document of ``count`` queued jobs to stdout (see ``_prefill``)."""
    from osqueue.model import encode_state
    from osqueue.state import QueueState

    state = QueueState()
    spec = SubmitSpec(payload={"n": 1, "pad": "x" * 64}, type="bulk")
    for i in range(count):
        state.submit(spec, str(uuid.UUID(int=i)), now_ms=1)
    sys.stdout.buffer.write(encode_state(state.to_document()))
    sys.stdout.buffer.flush()


@dataclass
class Running:
    process: subprocess.Popen[str]
    port: int

    @property
    def pid(self) -> int:
        return self.process.pid


@contextlib.contextmanager
def start(kind: str, *options: str, env: dict[str, str] | None = None) -> Iterator[Running]:
    """Start a server process and yield it once it listens; stop it afterwards."""
    process = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.servers", kind, *options],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line.startswith("PORT "):
            raise RuntimeError(f"{kind} server did not start: {line!r}")
        yield Running(process, int(line.split()[1]))
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["broker", "baseline", "document"])
    parser.add_argument("--latency-ms", type=float, default=0.0)
    # 0 on the memory store, whose writes cost nothing but their encoding: one write in
    # flight and the gap of three times the last encode (see Engine._pace) do the batching.
    # P6 and the S3 row pass the contract's default of 50 ms.
    parser.add_argument("--commit-interval-ms", type=int, default=0)
    parser.add_argument("--prefill", type=int, default=0)
    parser.add_argument("--storage", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    if args.kind == "document":
        _write_document(args.prefill)
        return
    runner = _serve_baseline() if args.kind == "baseline" else _serve_broker(args)
    try:
        import uvloop
    except ImportError:
        asyncio.run(runner)
    else:
        uvloop.run(runner)


if __name__ == "__main__":
    main()
