"""The storage contract, run against every backend: memory, file, S3 (moto), GCS (fake-gcs).

Each test gets a fresh store. ``Backend.another()`` opens a second client of the same store
(another process would do the same), so races run between clients, not inside one.
Failure cases F08 and F09 of shared/cases/failure-cases.md are here; F11's single-writer
half is here too (the exact-ETag half is a unit test of the S3 backend).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from osqueue.errors import CASConflictError
from osqueue.storage import FileStorage, MemoryStorage, Storage, Versioned

KEY = "queue.json"
RACERS = 32
CLIENTS = 4
#: F09 asks for 1,000 rounds; every backend runs them all (moto takes ~25 s of it).
F09_ROUNDS = 1_000


@dataclass
class Backend:
    name: str
    storage: Storage
    another: Callable[[], Storage]


@pytest.fixture(params=["memory", "file", "s3", "gcs"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    name: str = request.param
    if name == "memory":
        memory = MemoryStorage()
        return Backend(name, memory, lambda: memory)
    if name == "file":
        directory = tmp_path / "store"
        return Backend(name, FileStorage(directory), lambda: FileStorage(directory))
    factory = request.getfixturevalue(f"{name}_storage_factory")
    return Backend(name, factory(), factory)


def body(label: str, size: int = 64 * 1024) -> bytes:
    """A JSON-ish body of about ``size`` bytes, unique to ``label``."""
    return f'{{"label": "{label}", "pad": "{"x" * size}"}}'.encode()


async def test_read_of_a_missing_key_is_none(backend: Backend) -> None:
    assert await backend.storage.read(KEY) is None


async def test_read_your_writes(backend: Backend) -> None:
    store = backend.storage
    first = await store.create_if_not_exists(KEY, b'{"n": 1}')
    assert await store.read(KEY) == Versioned(b'{"n": 1}', first)

    second = await store.write(KEY, b'{"n": 2}', first)
    assert second != first
    assert await store.read(KEY) == Versioned(b'{"n": 2}', second)
    assert await backend.another().read(KEY) == Versioned(b'{"n": 2}', second)


async def test_a_stale_write_conflicts_and_stores_nothing(backend: Backend) -> None:
    store = backend.storage
    first = await store.create_if_not_exists(KEY, b"first")
    second = await store.write(KEY, b"second", first)

    with pytest.raises(CASConflictError):
        await store.write(KEY, b"stale", first)
    assert await store.read(KEY) == Versioned(b"second", second)


async def test_create_of_an_existing_key_conflicts(backend: Backend) -> None:
    store = backend.storage
    version = await store.create_if_not_exists(KEY, b"first")

    with pytest.raises(CASConflictError):
        await store.create_if_not_exists(KEY, b"again")
    assert await store.read(KEY) == Versioned(b"first", version)


async def test_a_write_to_a_missing_key_conflicts_and_creates_nothing(backend: Backend) -> None:
    store = backend.storage
    real_version = await store.create_if_not_exists("other.json", b"other")

    with pytest.raises(CASConflictError):
        await store.write(KEY, b"ghost", real_version)
    assert await store.read(KEY) is None


async def test_keys_are_independent(backend: Backend) -> None:
    store = backend.storage
    a = await store.create_if_not_exists("a.json", b"a")
    await store.create_if_not_exists("b.json", b"b")

    assert await store.write("a.json", b"a2", a)
    assert (await store.read("b.json")) is not None
    assert (await store.read("b.json")).data == b"b"  # type: ignore[union-attr]


async def test_f08_racing_writers_have_exactly_one_winner(backend: Backend) -> None:
    clients = [backend.another() for _ in range(CLIENTS)]
    v0 = await backend.storage.create_if_not_exists(KEY, body("v0"))

    async def write(i: int) -> tuple[int, str | None]:
        try:
            return i, await clients[i % CLIENTS].write(KEY, body(f"writer-{i}"), v0)
        except CASConflictError:
            return i, None

    results = await asyncio.gather(*(write(i) for i in range(RACERS)))

    winners = [(i, version) for i, version in results if version is not None]
    assert len(winners) == 1, f"winners: {[i for i, _ in winners]}"
    winner, version = winners[0]
    assert await backend.storage.read(KEY) == Versioned(body(f"writer-{winner}"), version)


async def test_f08_racing_creators_have_exactly_one_winner(backend: Backend) -> None:
    clients = [backend.another() for _ in range(CLIENTS)]

    async def create(i: int) -> tuple[int, str | None]:
        try:
            return i, await clients[i % CLIENTS].create_if_not_exists(KEY, body(f"creator-{i}"))
        except CASConflictError:
            return i, None

    results = await asyncio.gather(*(create(i) for i in range(RACERS)))

    winners = [(i, version) for i, version in results if version is not None]
    assert len(winners) == 1, f"winners: {[i for i, _ in winners]}"
    winner, version = winners[0]
    assert await backend.storage.read(KEY) == Versioned(body(f"creator-{winner}"), version)


async def test_f09_a_stale_version_never_wins(backend: Backend) -> None:
    """F09, 1,000 rounds of: S0 is stored at v0; S1 is written with v0; S2 written with v0
    must fail. Each round's S1 is the next round's S0, so a round costs two writes."""
    store = backend.storage
    v0 = await store.create_if_not_exists(KEY, b"S-0")
    stale_wins: list[int] = []

    for i in range(1, F09_ROUNDS + 1):
        v1 = await store.write(KEY, f"S-{i}".encode(), v0)
        try:
            await store.write(KEY, f"stale-{i}".encode(), v0)
        except CASConflictError:
            pass
        else:
            stale_wins.append(i)
        v0 = v1

    assert stale_wins == []
    assert await store.read(KEY) == Versioned(f"S-{F09_ROUNDS}".encode(), v0)


async def test_f09_identical_bytes_and_versions(backend: Backend) -> None:
    """Rewriting identical bytes: every backend but S3 gives a new version, so an old
    version stays stale. S3's ETag is a content hash and comes back the same: callers must
    make each write's bytes unique (the engine's ``commitId``)."""
    store = backend.storage
    first_a = await store.create_if_not_exists(KEY, b"A")
    b = await store.write(KEY, b"B", first_a)
    second_a = await store.write(KEY, b"A", b)

    if backend.name == "s3":
        assert second_a == first_a
        return
    assert second_a != first_a
    with pytest.raises(CASConflictError):
        await store.write(KEY, b"C", first_a)
    assert await store.read(KEY) == Versioned(b"A", second_a)


async def test_f11_a_single_writer_never_conflicts(backend: Backend) -> None:
    """The version handed out is accepted back as is, by the same and by another client."""
    store, other = backend.storage, backend.another()
    version = await store.create_if_not_exists(KEY, b"0")
    for i in range(1, 30):
        writer = store if i % 2 else other
        version = await writer.write(KEY, str(i).encode(), version)
        read = await (other if i % 2 else store).read(KEY)
        assert read == Versioned(str(i).encode(), version)


async def test_a_read_returns_the_version_of_its_own_bytes(backend: Backend) -> None:
    """While one client writes, another reads: each (bytes, version) it gets is a pair
    that a write produced, never the bytes of one write with the version of another."""
    writer, reader = backend.storage, backend.another()
    written = {await writer.create_if_not_exists(KEY, b"w-0"): b"w-0"}
    version = next(iter(written))
    done = asyncio.Event()

    async def write_many() -> None:
        nonlocal version
        for i in range(1, 40):
            data = f"w-{i}".encode()
            version = await writer.write(KEY, data, version)
            written[version] = data
            await asyncio.sleep(0)  # let the reader in, even on the in-process store
        done.set()

    async def read_until_done() -> list[Versioned]:
        reads = []
        while not done.is_set():
            read = await reader.read(KEY)
            assert read is not None
            reads.append(read)
            await asyncio.sleep(0)
        return reads

    _, reads = await asyncio.gather(write_many(), read_until_done())

    assert reads
    assert [r for r in reads if written.get(r.version) != r.data] == []
