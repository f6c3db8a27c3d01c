"""Fixtures for the REST tests: a real broker on loopback and an HTTP client on it.

``start_broker`` serves a broker over a recording memory store with the failure cases'
short timings and returns a :class:`~tests.integration.rest_support.RestBroker`; brokers and
clients are stopped on teardown.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import httpx
import pytest

from osqueue.broker.server import run_broker_in_background
from tests.integration.rest_support import (
    BrokerFactory,
    RecordingStorage,
    RestBroker,
    broker_config,
)


@pytest.fixture
async def start_broker() -> AsyncIterator[BrokerFactory]:
    """Start brokers on loopback (each on its own store unless one is given)."""
    async with AsyncExitStack() as stack:

        async def start(storage: RecordingStorage | None = None, **options: Any) -> RestBroker:
            storage = storage or RecordingStorage()
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
