"""Load scenarios, run in a process of their own: ``python -m benchmarks.loadproc SPEC``.

SPEC is JSON: ``{"scenario", "port", "connections", ...}``; the result is printed as JSON.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import orjson

from benchmarks.load import LoadResult, _read_response, request_bytes, run_load


def _summary(result: LoadResult, **extra: Any) -> dict[str, Any]:
    return {
        "requests": result.requests,
        "errors": result.errors,
        "elapsed_s": result.elapsed_s,
        "rps": result.rps,
        "p50_ms": result.percentile_ms(0.50),
        "p99_ms": result.percentile_ms(0.99),
        "statuses": result.statuses,
        **extra,
    }


async def submit(spec: dict[str, Any]) -> dict[str, Any]:
    def make(conn: int, n: int) -> bytes:
        body = orjson.dumps({"payload": {"c": conn, "n": n}, "type": spec.get("type", "bench")})
        return request_bytes("POST", "/v1/jobs", body)

    result = await run_load(
        spec["port"],
        make,
        connections=spec["connections"],
        total=spec.get("total"),
        duration_s=spec.get("duration_s"),
        rate_per_s=spec.get("rate"),
    )
    return _summary(result, jobs_per_s=result.rps)


async def batch(spec: dict[str, Any]) -> dict[str, Any]:
    size = spec["batch_size"]
    body = orjson.dumps({"jobs": [{"payload": {"n": i}, "type": "bench"} for i in range(size)]})
    request = request_bytes("POST", "/v1/jobs/batch", body)
    result = await run_load(
        spec["port"], lambda c, n: request, connections=spec["connections"], total=spec["total"]
    )
    return _summary(result, jobs_per_s=result.rps * size)


async def drain(spec: dict[str, Any]) -> dict[str, Any]:
    """Each connection: claim, then complete what it got; stop after ``total`` jobs."""
    port, target = spec["port"], spec["total"]
    stop_at = time.monotonic() + spec.get("max_s", 120)
    types = spec.get("types")
    done = 0
    latencies: list[float] = []
    requests = 0

    async def worker(index: int) -> None:
        nonlocal done, requests
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        body: dict[str, Any] = {"workerId": f"bench-{index}"}
        if types:
            body["types"] = types
        claim = request_bytes("POST", "/v1/jobs/claim", orjson.dumps(body))
        lease = orjson.dumps({"workerId": f"bench-{index}"})
        try:
            while done < target and time.monotonic() < stop_at:
                sent = time.monotonic()
                writer.write(claim)
                _status, answer = await _read_response(reader)
                requests += 1
                job = orjson.loads(answer)
                if not job:
                    await asyncio.sleep(0.01)
                    continue
                writer.write(request_bytes("POST", f"/v1/jobs/{job['jobId']}/complete", lease))
                status, _ = await _read_response(reader)
                requests += 1
                if status == 204:
                    done += 1
                    latencies.append(time.monotonic() - sent)
        finally:
            writer.close()

    started = time.monotonic()
    await asyncio.gather(*(worker(i) for i in range(spec["connections"])))
    elapsed = time.monotonic() - started
    result = LoadResult(requests=requests, elapsed_s=elapsed, latencies_s=latencies)
    return _summary(result, jobs_per_s=done / elapsed, jobs=done)


async def consume(spec: dict[str, Any]) -> dict[str, Any]:
    """Consumers as a deployment runs them: each connection claims with ``waitMs`` (the
    broker answers as soon as a job is there) and completes what it got. They stop once
    ``until_s`` has passed and a claim finds the queue empty."""
    port, wait_ms = spec["port"], spec.get("wait_ms", 1000)
    until = time.monotonic() + spec["until_s"]
    done = 0
    latencies: list[float] = []
    requests = 0

    async def consumer(index: int) -> None:
        nonlocal done, requests
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        worker = f"consumer-{index}"
        claim = request_bytes(
            "POST", "/v1/jobs/claim", orjson.dumps({"workerId": worker, "waitMs": wait_ms})
        )
        lease = orjson.dumps({"workerId": worker})
        try:
            while True:
                sent = time.monotonic()
                writer.write(claim)
                _status, answer = await _read_response(reader)
                requests += 1
                job = orjson.loads(answer)
                if not job:
                    if time.monotonic() >= until:
                        return
                    continue
                writer.write(request_bytes("POST", f"/v1/jobs/{job['jobId']}/complete", lease))
                status, _ = await _read_response(reader)
                requests += 1
                if status == 204:
                    done += 1
                    latencies.append(time.monotonic() - sent)
        finally:
            writer.close()

    started = time.monotonic()
    await asyncio.gather(*(consumer(i) for i in range(spec["connections"])))
    elapsed = time.monotonic() - started
    result = LoadResult(requests=requests, elapsed_s=elapsed, latencies_s=latencies)
    return _summary(result, jobs_per_s=done / elapsed, jobs=done)


async def poll_idle(spec: dict[str, Any]) -> dict[str, Any]:
    """Workers polling an empty queue (claims every ``interval_s``)."""
    port, interval = spec["port"], spec["interval_s"]
    stop_at = time.monotonic() + spec["duration_s"]
    claims = 0

    async def poller(index: int) -> None:
        nonlocal claims
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        claim = request_bytes("POST", "/v1/jobs/claim", orjson.dumps({"workerId": f"idle-{index}"}))
        try:
            while time.monotonic() < stop_at:
                writer.write(claim)
                await _read_response(reader)
                claims += 1
                await asyncio.sleep(interval)
        finally:
            writer.close()

    await asyncio.gather(*(poller(i) for i in range(spec["connections"])))
    return {"claims": claims}


SCENARIOS = {
    "submit": submit,
    "batch": batch,
    "drain": drain,
    "consume": consume,
    "poll_idle": poll_idle,
}


def main() -> None:
    spec = json.loads(sys.argv[1])
    try:
        import uvloop

        result = uvloop.run(SCENARIOS[spec["scenario"]](spec))
    except ImportError:
        result = asyncio.run(SCENARIOS[spec["scenario"]](spec))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
