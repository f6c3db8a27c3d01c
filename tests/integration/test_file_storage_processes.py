"""The file store between real processes: racing writers, and ``kill -9`` mid-write.

The children run tests/integration/file_store_child.py with this interpreter.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
from pathlib import Path

from osqueue.storage import FileStorage
from osqueue.storage.file import VERSIONS_DIR
from tests.integration.file_store_child import document

CHILD = Path(__file__).with_name("file_store_child.py")
KEY = "queue.json"
RACE_ROUNDS = 2
RACERS = 4
KILLS = 12


async def spawn(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        str(CHILD),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def expect_line(child: asyncio.subprocess.Process, expected: str) -> None:
    assert child.stdout is not None
    line = await asyncio.wait_for(child.stdout.readline(), timeout=30)
    if line.decode().strip() != expected:
        _, stderr = await child.communicate()
        raise AssertionError(f"child said {line!r}, not {expected!r}; stderr:\n{stderr.decode()}")


async def test_processes_racing_a_conditional_write_have_one_winner(tmp_path: Path) -> None:
    directory = tmp_path / "store"
    store = FileStorage(directory)
    version = await store.create_if_not_exists(KEY, b"start")

    for round_ in range(RACE_ROUNDS):
        go_file = tmp_path / f"go-{round_}"
        children = [
            await spawn("race", str(directory), KEY, version, str(go_file), f"p{i}")
            for i in range(RACERS)
        ]
        for child in children:
            await expect_line(child, "ready")
        go_file.touch()
        outputs = [(await child.communicate())[0].decode().split() for child in children]

        winners = [f"p{i}" for i, out in enumerate(outputs) if out == ["won"]]
        assert len(winners) == 1, outputs
        assert sorted(o for out in outputs for o in out) == ["conflict"] * (RACERS - 1) + ["won"]
        stored = await store.read(KEY)
        assert stored is not None and stored.data == winners[0].encode()
        version = stored.version


async def test_kill_9_never_leaves_a_torn_or_lost_document(tmp_path: Path) -> None:
    directory = tmp_path / "store"
    store = FileStorage(directory)
    rng = random.Random(20260309)
    last_n = 0

    for _ in range(KILLS):
        child = await spawn("loop", str(directory), KEY)
        await expect_line(child, "ready")
        await asyncio.sleep(rng.uniform(0.03, 0.2))
        child.kill()
        await child.wait()

        stored = await store.read(KEY)
        assert stored is not None, "the document was lost"
        n = json.loads(stored.data)["n"]  # parses: never torn
        assert stored.data == document(n), "the bytes are not exactly a version that was written"
        assert n >= last_n, "an acknowledged version was rolled back"
        last_n = n

    assert last_n > KILLS, "the children hardly wrote; the kills did not land mid-loop"
    stored = await store.read(KEY)
    assert stored is not None
    version = await store.write(KEY, document(last_n + 1), stored.version)
    leftovers = sorted(p.name for p in (directory / VERSIONS_DIR).iterdir())
    assert leftovers == [f"{KEY}.{version}", f"{KEY}.lock"], "orphans were not cleaned up"
