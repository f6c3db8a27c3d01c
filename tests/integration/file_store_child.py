"""A child process for the file-store tests: races a write, or writes in a tight loop.

python file_store_child.py race DIR KEY VERSION GO_FILE NAME
    wait until GO_FILE exists, then write NAME's bytes with VERSION; print "won" or
    "conflict".
python file_store_child.py loop DIR KEY
    print "ready", then write document 1, 2, 3... (each read-then-write) until killed.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

from osqueue.errors import CASConflictError
from osqueue.storage import FileStorage


def document(n: int) -> bytes:
    """Document ``n``: self-checking, and 1 MiB so that a write is long enough to be hit."""
    return json.dumps({"n": n, "pad": f"{n:08d}" * 131_072, "check": n * 7919}).encode()


async def race(directory: str, key: str, version: str, go_file: str, name: str) -> None:
    store = FileStorage(directory)
    print("ready", flush=True)
    await asyncio.to_thread(_wait_for, go_file)
    try:
        await store.write(key, name.encode(), version)
    except CASConflictError:
        print("conflict", flush=True)
    else:
        print("won", flush=True)


async def loop(directory: str, key: str) -> None:
    store = FileStorage(directory)
    print("ready", flush=True)
    while True:
        current = await store.read(key)
        if current is None:
            await store.create_if_not_exists(key, document(1))
            continue
        n = json.loads(current.data)["n"]
        await store.write(key, document(n + 1), current.version)


def _wait_for(path: str) -> None:
    while not os.path.exists(path):
        time.sleep(0.001)  # a busy-ish wait, so that all children start within a millisecond


def main(argv: list[str]) -> None:
    command, *args = argv
    if command == "race":
        asyncio.run(race(*args))
    elif command == "loop":
        asyncio.run(loop(*args))
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
