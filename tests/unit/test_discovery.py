"""StoreDiscovery: reading the leading broker from the state document."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from osqueue.client.discovery import LeaderRecord, StoreDiscovery, read_leader
from osqueue.errors import BrokerLeadershipError, DiscoveryError, TransportConnectionError
from osqueue.storage import STATE_KEY, FaultyStorage, FileStorage, MemoryStorage, Storage


async def put(storage: Storage, **fields: object) -> None:
    doc = {"broker": None, "brokerHeartbeat": 0, "jobs": [], "completedTotal": 0, **fields}
    found = await storage.read(STATE_KEY)
    data = orjson.dumps(doc)
    if found is None:
        await storage.create_if_not_exists(STATE_KEY, data)
    else:
        await storage.write(STATE_KEY, data, found.version)


async def test_read_leader_of_an_absent_document_names_nobody() -> None:
    assert await read_leader(MemoryStorage()) == LeaderRecord(None, None, 0, 0)


async def test_read_leader_reports_address_id_epoch_and_heartbeat() -> None:
    store = MemoryStorage()
    await put(store, broker="10.0.0.5:8080", brokerId="broker-a", epoch=4, brokerHeartbeat=99)
    assert await read_leader(store) == LeaderRecord("10.0.0.5:8080", "broker-a", 4, 99)


async def test_read_leader_from_a_url_opens_and_closes_the_store(tmp_path: Path) -> None:
    await put(FileStorage(tmp_path), broker="h:1", brokerId="b", epoch=1)
    record = await read_leader(f"file://{tmp_path}")
    assert record.address == "h:1"


async def test_broker_url_names_the_leader_or_raises_discovery_error() -> None:
    store = MemoryStorage()
    discovery = StoreDiscovery(store, min_interval_s=0)
    with pytest.raises(DiscoveryError):
        await discovery.broker_url()
    await put(store, broker="127.0.0.1:9000", brokerId="b", epoch=1)
    assert await discovery.broker_url() == "http://127.0.0.1:9000"


async def test_hook_prefers_the_store_and_falls_back_to_the_hint() -> None:
    store = MemoryStorage()
    discovery = StoreDiscovery(store, min_interval_s=0)
    standby_said = BrokerLeadershipError("standby", leader="127.0.0.1:9001")
    refused = TransportConnectionError("down")

    # No leader in the store (a hand-over in progress): follow the hint, if any.
    assert await discovery("http://127.0.0.1:9000", standby_said) == "http://127.0.0.1:9001"
    assert await discovery("http://127.0.0.1:9000", refused) is None

    # The store names the leader: that wins over a hint that may be stale.
    await put(store, broker="127.0.0.1:9002", brokerId="b", epoch=2)
    assert await discovery("http://127.0.0.1:9000", standby_said) == "http://127.0.0.1:9002"


async def test_callers_close_in_time_share_one_read() -> None:
    store = FaultyStorage(MemoryStorage())
    await put(store, broker="h:1", brokerId="b", epoch=1)
    reads_before = store.calls["read"]
    discovery = StoreDiscovery(store, min_interval_s=60)
    for _ in range(10):
        assert await discovery.broker_url() == "http://h:1"
    assert store.calls["read"] - reads_before == 1
