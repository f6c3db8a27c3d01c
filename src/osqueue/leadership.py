"""Leader election on the state document, standby watching and clean hand-over.

A broker becomes leader by writing its ``brokerId`` and address into the document with
compare-and-swap. It may do so when the document names no broker, or when the named
leader's ``brokerHeartbeat`` has stayed the same for ``heartbeat_timeout_ms`` on this
process's own monotonic clock: wall clocks of different machines are never compared.
Every takeover bumps ``epoch`` and resets the heartbeat of in-progress jobs, so workers get
a full job timeout to reach the new leader. The compare-and-swap fences the old leader: its
next write conflicts, it reads the document, sees another ``brokerId`` and steps down.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from osqueue.engine import Engine
from osqueue.errors import BrokerLeadershipError, CASConflictError
from osqueue.model import encode_state
from osqueue.storage.base import STATE_KEY

__all__ = ["Leadership", "LeadershipConfig", "new_broker_id"]

log = logging.getLogger(__name__)


def new_broker_id() -> str:
    return f"broker-{uuid.uuid4().hex[:12]}"


@dataclass(frozen=True, slots=True)
class LeadershipConfig:
    heartbeat_timeout_ms: int = 10_000
    poll_interval_ms: int = 500


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
        self.known_leader: str | None = None
        self.takeover_ms: float | None = None

    async def acquire(self, *, wait: bool) -> None:
        """Become leader. Without ``wait``, refuse while another leader is alive."""
        observed: tuple[Any, float] | None = None
        while True:
            doc, stored = await self.engine.read_document()
            other = doc.get("brokerId")
            if doc.get("broker") is None or other == self.broker_id:
                if await self._take_over(doc, stored):
                    return
                continue
            self.known_leader = doc.get("broker")
            beat = doc.get("brokerHeartbeat")
            now = time.monotonic()
            if observed is None or observed[0] != beat:
                if observed is not None and not wait:
                    raise BrokerLeadershipError(
                        f"broker {self.known_leader} ({other}) is leading and alive; "
                        "start this one with --standby to wait for it",
                        leader=self.known_leader,
                    )
                observed = (beat, now)
            elif (now - observed[1]) * 1000 >= self.config.heartbeat_timeout_ms:
                log.warning(
                    "leader %s silent for %d ms; taking over",
                    self.known_leader,
                    self.config.heartbeat_timeout_ms,
                )
                if await self._take_over(doc, stored):
                    return
                observed = None
                continue
            await asyncio.sleep(self.config.poll_interval_ms / 1000)

    async def _take_over(self, doc: dict[str, Any], stored: Any) -> bool:
        """Write this broker into the document. False if another writer got there first."""
        engine = self.engine
        engine.adopt(doc, stored)
        now_ms = engine.clock_ms()
        engine.state.register(self.address, self.broker_id, now_ms, takeover=True)
        engine.state.commit_id = uuid.uuid4().hex
        data = encode_state(engine.state.to_document())
        try:
            if stored is None:
                version = await engine.storage.create_if_not_exists(STATE_KEY, data)
            else:
                version = await engine.storage.write(STATE_KEY, data, stored.version)
        except CASConflictError:
            log.info("lost the race to lead; reading again")
            return False
        engine.version = version
        engine.committed_bytes = data
        engine.leader = True
        self.known_leader = self.address
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
        except Exception as exc:  # a failed resignation only delays the standby
            log.warning("could not clear the leader field: %s", exc)
        engine.leader = False
        log.info("broker %s stepped down cleanly", self.broker_id)
