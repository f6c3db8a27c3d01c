"""Leader election on the state document, standby watching and clean hand-over.

A broker becomes leader by writing its ``brokerId`` and address into the document with
compare-and-swap. It may do so when the document names no broker, or when the named
leader's heartbeat (``brokerId``, ``epoch`` and ``brokerHeartbeat`` together) has stayed the
same for ``heartbeat_timeout_ms`` on this process's own monotonic clock: wall clocks of
different machines are never compared. Every takeover bumps ``epoch`` and resets the
heartbeat of in-progress jobs, so workers get a full job timeout to reach the new leader.
The compare-and-swap fences the old leader: its next write conflicts, it reads the
document, sees another ``brokerId`` and steps down (see :mod:`osqueue.engine`).

A broker that does not lead keeps watching: it reads the document every
``poll_interval_ms`` and remembers what it saw in :attr:`Leadership.view`, which is also
what it answers with (503 BrokerLeadershipError naming the leader) until it leads itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from osqueue.engine import Engine
from osqueue.errors import (
    BrokerLeadershipError,
    CASConflictError,
    EngineStateError,
    OsqueueError,
    StorageBackendError,
)
from osqueue.storage.base import STATE_KEY, Versioned

__all__ = ["LeaderView", "Leadership", "LeadershipConfig", "new_broker_id"]

log = logging.getLogger(__name__)


def new_broker_id() -> str:
    return f"broker-{uuid.uuid4().hex[:12]}"


@dataclass(frozen=True, slots=True)
class LeadershipConfig:
    heartbeat_timeout_ms: int = 10_000
    poll_interval_ms: int = 500


@dataclass(frozen=True, slots=True)
class LeaderView:
    """The leader as a watching broker last read it from the store.

    ``seen_at`` is this process's monotonic time when it first read this exact heartbeat;
    the heartbeat counts as silent once it has stayed the same for the leader timeout.
    """

    address: str | None
    broker_id: str | None
    epoch: int
    heartbeat_ms: int
    seen_at: float

    @classmethod
    def of(cls, doc: dict[str, Any], seen_at: float) -> LeaderView:
        return cls(
            doc.get("broker"),
            doc.get("brokerId"),
            int(doc.get("epoch") or 0),
            int(doc.get("brokerHeartbeat") or 0),
            seen_at,
        )

    def same_heartbeat(self, other: LeaderView) -> bool:
        return (self.address, self.broker_id, self.epoch, self.heartbeat_ms) == (
            other.address,
            other.broker_id,
            other.epoch,
            other.heartbeat_ms,
        )

    def silent_ms(self, now: float | None = None) -> int:
        """How long this heartbeat has stayed unchanged, on this process's clock."""
        return int(((time.monotonic() if now is None else now) - self.seen_at) * 1000)


class Leadership:
    """Wins, keeps and gives up leadership for one engine."""

    def __init__(
        self,
        engine: Engine,
        address: str,
        config: LeadershipConfig | None = None,
        broker_id: str | None = None,
    ) -> None:
        self.engine = engine
        self.address = address
        self.config = config or LeadershipConfig()
        self.broker_id = broker_id or new_broker_id()
        engine.broker_id = self.broker_id
        #: What the store said the last time this broker looked (None before the first look
        #: and while it leads).
        self.view: LeaderView | None = None
        #: Wall-clock milliseconds of this broker's latest takeover write.
        self.takeover_ms: int | None = None
        self._stop_watching = asyncio.Event()

    def stop_watching(self) -> None:
        """Make :meth:`acquire` give up at its next step (the broker is shutting down)."""
        self._stop_watching.set()

    async def acquire(self, *, wait: bool) -> bool:
        """Become leader; False when :meth:`stop_watching` ended the wait first.

        With ``wait`` (a standby) this watches until the leader goes silent or away, riding
        out store failures. Without it, it raises BrokerLeadershipError as soon as it sees
        another leader's heartbeat move, and raises store failures.
        """
        poll_s = self.config.poll_interval_ms / 1000
        while not self._stop_watching.is_set():
            try:
                doc, stored = await self.engine.read_document()
                takeover = self._may_lead(doc, wait=wait)
                if takeover is not None and await self._take_over(doc, stored, takeover=takeover):
                    return True
            except (StorageBackendError, EngineStateError) as exc:
                if not wait:
                    raise
                log.warning(
                    "broker %s cannot check the leader: %s; trying again", self.broker_id, exc
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_watching.wait(), poll_s)
        return False

    def _may_lead(self, doc: dict[str, Any], *, wait: bool) -> bool | None:
        """Whether to write this broker in: None to keep watching, else the ``takeover``
        flag (False when the document already names this broker: its own write landed)."""
        now = time.monotonic()
        seen = LeaderView.of(doc, now)
        previous = self.view
        if previous is None or not previous.same_heartbeat(seen):
            self.view = seen
        else:
            seen = previous
        self.engine.known_leader = seen.address
        if seen.address is None:
            log.info("no broker leads; broker %s takes over", self.broker_id)
            return True
        if seen.broker_id == self.broker_id:
            return False
        if not wait and previous is not None and seen is not previous:
            raise BrokerLeadershipError(
                f"broker {seen.address} ({seen.broker_id}) is leading and alive; "
                "start this one with --standby to wait for it",
                leader=seen.address,
            )
        silent_ms = seen.silent_ms(now)
        if silent_ms < self.config.heartbeat_timeout_ms:
            return None
        log.warning(
            "leader %s (%s, epoch %d) silent for %d ms; broker %s takes over",
            seen.address, seen.broker_id, seen.epoch, silent_ms, self.broker_id,
        )  # fmt: skip
        return True

    async def _take_over(
        self, doc: dict[str, Any], stored: Versioned | None, *, takeover: bool
    ) -> bool:
        """Write this broker into the document. False if another writer got there first.

        A store failure propagates: the write may have landed, which the next read shows
        (the document then names this broker, and the takeover is not counted twice).
        """
        engine = self.engine
        engine.adopt(doc, stored)
        now_ms = engine.clock_ms()
        engine.state.register(self.address, self.broker_id, now_ms, takeover=takeover)
        engine.state.commit_id = uuid.uuid4().hex
        # In pieces, like every commit: the memory store keeps them, so a large document is
        # not held twice (the engine's block cache and one joined copy).
        parts = engine.state.encode_parts()
        data: bytes | list[bytes] = parts
        started = time.monotonic()
        try:
            if stored is None:
                data = b"".join(parts)
                version = await engine.storage.create_if_not_exists(STATE_KEY, data)
            else:
                version = await engine.storage.write_parts(STATE_KEY, parts, stored.version)
        except CASConflictError:
            log.info("broker %s lost the race to lead; reading again", self.broker_id)
            return False
        engine.version = version
        engine.committed_bytes = data
        engine.confirmed_at = started
        engine.known_leader = self.address
        engine.leader = True
        self.view = None
        self.takeover_ms = now_ms
        log.info(
            "broker %s leads at %s, epoch %d", self.broker_id, self.address, engine.state.epoch
        )
        return True

    async def resign(self) -> None:
        """Flush, then clear ``broker`` so that a standby takes over at once."""
        engine = self.engine
        if not engine.leader:
            return
        await engine.flush()
        try:
            await engine.execute(lambda state, now_ms: state.resign())
        except OsqueueError as exc:  # a failed resignation only delays the standby
            log.warning("broker %s could not clear the leader field: %s", self.broker_id, exc)
            engine.leader = False
            return
        engine.leader = False
        engine.known_leader = None
        log.info("broker %s stepped down cleanly", self.broker_id)
