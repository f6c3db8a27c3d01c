"""Finding the leading broker from the store, for clients and workers.

The state document names the leader in ``broker`` (``host:port``). A client that can read
the store needs no configured broker URL and follows a failover by itself::

    from osqueue.client import AsyncOsqueueClient
    from osqueue.client.discovery import StoreDiscovery

    discovery = StoreDiscovery("s3://my-bucket/queues/prod")
    url = await discovery.broker_url()                     # DiscoveryError if none leads
    async with AsyncOsqueueClient(url, discover=discovery) as client:
        ...

After a connection failure or a BrokerLeadershipError the client calls the hook; it reads
the store again and names the broker the document names now. While the document names no
broker (a clean hand-over in progress) it follows the ``leader`` the error carried, if any.
Reads are shared: callers within ``min_interval_s`` of the last read get its answer, so a
crowd of clients retrying through a failover costs the store a few reads per second.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from osqueue.client.async_client import follow_leader_hint
from osqueue.errors import DiscoveryError, OsqueueError
from osqueue.model import decode_state
from osqueue.storage import STATE_KEY, Storage, open_storage

__all__ = ["DEFAULT_MIN_INTERVAL_S", "LeaderRecord", "StoreDiscovery", "read_leader"]

#: Callers within this many seconds of the last store read share its answer.
DEFAULT_MIN_INTERVAL_S = 0.2


@dataclass(frozen=True, slots=True)
class LeaderRecord:
    """What the state document says about the leader.

    ``heartbeat_ms`` is the leader's wall clock at its last write; comparing it with
    another machine's clock gives only a rough age (see ``docs/leadership.md``).
    """

    address: str | None
    broker_id: str | None
    epoch: int
    heartbeat_ms: int

    @classmethod
    def from_document(cls, doc: dict[str, Any]) -> LeaderRecord:
        broker = doc.get("broker")
        broker_id = doc.get("brokerId")
        return cls(
            broker if isinstance(broker, str) and broker else None,
            broker_id if isinstance(broker_id, str) else None,
            int(doc.get("epoch") or 0),
            int(doc.get("brokerHeartbeat") or 0),
        )


async def read_leader(storage: Storage | str, **options: Any) -> LeaderRecord:
    """Read the leader from the store: a :class:`Storage`, or a storage URL (opened with
    ``options``, read once and closed). An absent document is a queue with no leader."""
    if isinstance(storage, Storage):
        return await _read(storage)
    opened = open_storage(storage, **options)
    try:
        return await _read(opened)
    finally:
        await opened.close()


async def _read(storage: Storage) -> LeaderRecord:
    found = await storage.read(STATE_KEY)
    if found is None:
        return LeaderRecord(None, None, 0, 0)
    return LeaderRecord.from_document(decode_state(found.data))


class StoreDiscovery:
    """A :data:`~osqueue.client.Discover` hook that reads the leader from the store.

    ``storage`` is a :class:`Storage` (the caller closes it) or a storage URL such as
    ``s3://bucket/prefix`` (opened for each read with ``options`` and closed again).
    ``scheme`` is put in front of the ``host:port`` the document holds.
    """

    def __init__(
        self,
        storage: Storage | str,
        *,
        scheme: str = "http",
        min_interval_s: float = DEFAULT_MIN_INTERVAL_S,
        **options: Any,
    ) -> None:
        self.storage = storage
        self.scheme = scheme
        self.min_interval_s = min_interval_s
        self._options = options
        self._lock = asyncio.Lock()
        self._last: tuple[float, LeaderRecord] | None = None

    def __repr__(self) -> str:
        return f"StoreDiscovery({self.storage!r})"

    async def leader(self) -> LeaderRecord:
        """The leader as the store names it (a read shared with callers close in time)."""
        async with self._lock:
            if self._last is not None and time.monotonic() - self._last[0] < self.min_interval_s:
                return self._last[1]
            record = await read_leader(self.storage, **self._options)
            self._last = (time.monotonic(), record)
            return record

    async def broker_url(self) -> str:
        """The leader's URL. Raises DiscoveryError while the store names no broker."""
        record = await self.leader()
        if record.address is None:
            raise DiscoveryError(
                f"the store {self.storage!r} names no leading broker; start one "
                "(osqueue broker) or wait for a standby to take over"
            )
        return f"{self.scheme}://{record.address}"

    async def __call__(self, url: str, error: OsqueueError) -> str | None:
        """The broker to use after ``error`` at ``url``, or None to keep ``url``."""
        try:
            return await self.broker_url()
        except DiscoveryError:
            hint = await follow_leader_hint(url, error)
            return f"{self.scheme}://{hint}" if hint and "://" not in hint else hint
