"""Fixtures for the broker tests: a real broker on loopback, on a real store, and an HTTP
client on it.

Every test that uses ``store`` (directly, or through ``start_broker`` / ``broker``) runs
once per backend in :data:`STORES`: the in-process memory store, the file store in a
temporary directory, S3 (moto in server mode)
and GCS (fake-gcs-server), each a fresh bucket per test. A test that only makes sense on
some of them says so, with its reason, as ``@pytest.mark.stores("memory", reason="...")``;
it is then generated for those backends only.

``start_broker`` serves a broker over a :class:`RecordingStorage` around a new, empty store
with the failure cases' short timings and returns a
:class:`~tests.integration.rest_support.RestBroker`; brokers and clients are stopped on
teardown.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import httpx
import pytest

from osqueue.broker.server import run_broker_in_background
from osqueue.storage import FileStorage, MemoryStorage, Storage
from tests.integration.rest_support import (
    BrokerFactory,
    BrokerStore,
    RecordingStorage,
    RestBroker,
    broker_config,
)

#: The backends the broker tests run on.
STORES = ("memory", "file", "s3", "gcs")

#: GCS paces writes to one a second by default (its per-object limit). The emulator has no
#: such limit, so the suite uses this instead to stay fast; one test keeps the real pacing.
EMULATOR_GCS_WRITE_INTERVAL_MS = 20


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "stores(*names, reason): run this broker test on these backends only (from "
        f"{', '.join(STORES)}), for the reason given",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "store" not in metafunc.fixturenames:
        return
    stores: tuple[str, ...] = STORES
    marker = metafunc.definition.get_closest_marker("stores")
    if marker is not None:
        reason = marker.kwargs.get("reason")
        unknown = set(marker.args) - set(STORES)
        if not marker.args or unknown or not isinstance(reason, str) or not reason.strip():
            raise pytest.UsageError(
                f"{metafunc.definition.nodeid}: @pytest.mark.stores needs backends from "
                f"{STORES} and a reason=..., got {marker.args} {marker.kwargs}"
            )
        stores = tuple(marker.args)
    metafunc.parametrize("store", stores, indirect=True)


@pytest.fixture
def store(request: pytest.FixtureRequest) -> BrokerStore:
    """The backend of this run of the test (see the module docstring)."""
    name: str = request.param
    if name == "memory":
        return BrokerStore(name, lambda _prefix, **options: MemoryStorage(**options))
    if name == "file":
        root = request.getfixturevalue("tmp_path")
        return BrokerStore(name, lambda prefix, **options: FileStorage(root / prefix, **options))
    factory = request.getfixturevalue(f"{name}_storage_factory")
    if name == "s3":
        return BrokerStore(name, factory)

    def open_gcs(prefix: str, **options: Any) -> Storage:
        options.setdefault("min_write_interval_ms", EMULATOR_GCS_WRITE_INTERVAL_MS)
        return factory(prefix, **options)  # type: ignore[no-any-return]

    return BrokerStore(name, open_gcs)


@pytest.fixture
async def start_broker(store: BrokerStore) -> AsyncIterator[BrokerFactory]:
    """Start brokers on loopback, each on a new store of the test's backend unless one is
    given (a standby shares its leader's)."""
    async with AsyncExitStack() as stack:

        async def start(storage: RecordingStorage | None = None, **options: Any) -> RestBroker:
            if storage is None:
                storage = RecordingStorage(store.new())
                stack.push_async_callback(storage.close)
            standby = options.pop("standby", False)
            config = broker_config(**options)
            if standby:
                config = dataclasses.replace(config, standby=True)
            handle = await stack.enter_async_context(run_broker_in_background(storage, config))
            http = await stack.enter_async_context(
                httpx.AsyncClient(base_url=handle.url, timeout=10)
            )
            return RestBroker(handle, storage, http)

        yield start


@pytest.fixture
async def broker(start_broker: BrokerFactory) -> RestBroker:
    """A leading broker with the failure cases' timings (job timeout 2 s)."""
    return await start_broker()
