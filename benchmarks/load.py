"""A small HTTP/1.1 keep-alive load generator on raw asyncio streams.

Each connection sends one request at a time and reads the answer (Content-Length framed).
It is much lighter than a full HTTP client, so on a 2-core machine the figures are about
the server, not the load generator. It runs in its own process (see ``loadproc``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["LoadResult", "request_bytes", "run_load"]


def request_bytes(method: str, path: str, body: bytes = b"", host: str = "127.0.0.1") -> bytes:
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


@dataclass
class LoadResult:
    requests: int = 0
    errors: int = 0
    elapsed_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.requests / self.elapsed_s if self.elapsed_s else 0.0

    def percentile_ms(self, q: float) -> float:
        if not self.latencies_s:
            return 0.0
        ordered = sorted(self.latencies_s)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
            break
    body = await reader.readexactly(length) if length else b""
    return status, body


async def run_load(
    port: int,
    make_request: Callable[[int, int], bytes],
    *,
    connections: int,
    total: int | None = None,
    duration_s: float | None = None,
    rate_per_s: float | None = None,
    on_response: Callable[[int, bytes], None] | None = None,
) -> LoadResult:
    """Send requests on ``connections`` keep-alive connections.

    ``make_request(connection, n)`` builds the n-th request of a connection. Stops after
    ``total`` requests or ``duration_s``; ``rate_per_s`` paces the whole load (open loop).
    """
    result = LoadResult()
    counter = 0
    deadline = time.monotonic() + duration_s if duration_s else None
    started = time.monotonic()

    def next_slot() -> int | None:
        nonlocal counter
        if total is not None and counter >= total:
            return None
        if deadline is not None and time.monotonic() >= deadline:
            return None
        counter += 1
        return counter

    async def connection(index: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        n = 0
        try:
            while (slot := next_slot()) is not None:
                if rate_per_s:
                    due = started + slot / rate_per_s
                    delay = due - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                sent = time.monotonic()
                writer.write(make_request(index, n))
                n += 1
                status, body = await _read_response(reader)
                result.latencies_s.append(time.monotonic() - sent)
                result.requests += 1
                result.statuses[status] = result.statuses.get(status, 0) + 1
                if status >= 400:
                    result.errors += 1
                if on_response is not None:
                    on_response(status, body)
        finally:
            writer.close()

    await asyncio.gather(*(connection(i) for i in range(connections)))
    result.elapsed_s = time.monotonic() - started
    return result
