"""Handlers that ship with osqueue, so a worker started from the CLI has work it can do.

Each takes the job's :class:`~osqueue.worker.JobContext`. ``echo`` logs the payload,
``sleep`` waits ``{"seconds": n}``, ``noop`` does nothing, ``fail`` raises with
``{"message": ...}`` (to try retries and dead letters), and ``file-stats`` is the demo's
job: size, line count, word count and SHA-256 of ``{"path": ...}``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from pathlib import Path
from typing import Any

from osqueue.worker import Handler, JobContext

__all__ = ["BUILTIN_HANDLERS", "file_stats"]

log = logging.getLogger(__name__)

CHUNK_BYTES = 1024 * 1024


def echo(job: JobContext[Any]) -> Any:
    log.info("echo: %r", job.payload)
    return job.payload


async def sleep(job: JobContext[Any]) -> None:
    payload = job.payload
    seconds = float(payload.get("seconds", 1)) if isinstance(payload, dict) else float(payload)
    await asyncio.sleep(seconds)


def fail(job: JobContext[Any]) -> None:
    payload = job.payload
    message = payload.get("message") if isinstance(payload, dict) else None
    raise RuntimeError(message or "job asked to fail")


def file_stats(payload: Any) -> dict[str, Any]:
    """Read one file in chunks and count its bytes, lines and words, and hash it."""
    if not isinstance(payload, dict) or not isinstance(payload.get("path"), str):
        raise ValueError('file-stats needs a payload {"path": "..."}')
    digest = hashlib.sha256()
    size = lines = words = 0
    in_word = False
    with Path(payload["path"]).open("rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
            lines += chunk.count(b"\n")
            words += len(chunk.split())
            # a word cut by the chunk boundary was counted twice
            if in_word and chunk[:1] and not chunk[:1].isspace():
                words -= 1
            in_word = not chunk[-1:].isspace()
    return {"size": size, "lines": lines, "words": words, "sha256": digest.hexdigest()}


def noop(job: JobContext[Any]) -> None:
    """Does nothing: for measuring the worker runtime itself."""


def file_stats_handler(job: JobContext[Any]) -> dict[str, Any]:
    return file_stats(job.payload)


BUILTIN_HANDLERS: dict[str, Handler] = {
    "echo": echo,
    "noop": noop,
    "sleep": sleep,
    "fail": fail,
    "file-stats": file_stats_handler,
}
