"""P8: the same submit and drain loops through ``AsyncOsqueueClient`` on each transport.

The client library is heavier than the raw load generator, so these figures compare the
transports with each other, not with P1 and P3.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from typing import Any

from benchmarks import servers


async def _measure(url: str, transport: str, jobs: int) -> dict[str, float]:
    from osqueue.client import AsyncOsqueueClient

    async with AsyncOsqueueClient(url, transport=transport) as client:
        per_task = jobs // 64
        started = time.monotonic()

        async def submitter() -> None:
            for n in range(per_task):
                await client.submit({"n": n}, type="bench")

        await asyncio.gather(*(submitter() for _ in range(64)))
        submit_rate = per_task * 64 / (time.monotonic() - started)

        done = 0
        started = time.monotonic()

        async def drainer(index: int) -> None:
            nonlocal done
            while done < per_task * 64:
                job = await client.claim(f"bench-{index}", ["bench"])
                if job is None:
                    continue
                await client.complete(job.job_id, f"bench-{index}", job.attempts)
                done += 1

        await asyncio.gather(*(drainer(i) for i in range(8)))
        drain_rate = done / (time.monotonic() - started)
    return {"submit": submit_rate, "drain": drain_rate}


def compare_transports(jobs: int) -> dict[str, dict[str, float]]:
    """Figures per transport, each against a fresh broker, the client in its own process."""
    results: dict[str, dict[str, float]] = {}
    for transport in ("rest", "ws", "connect"):
        with servers.start("broker") as broker:
            out = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "benchmarks.transports",
                    str(broker.port),
                    transport,
                    str(jobs),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            results[transport] = json.loads(out.stdout)
    return results


def main() -> None:
    port, transport, jobs = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    figures: Any = asyncio.run(_measure(f"http://127.0.0.1:{port}", transport, jobs))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
