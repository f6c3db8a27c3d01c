"""The broker process: storage, engine, leadership and the HTTP server around them."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable, Generator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.routing import BaseRoute

from osqueue.broker.app import build_app
from osqueue.broker.service import QueueService
from osqueue.engine import Engine, EngineConfig
from osqueue.errors import BrokerLeadershipError, ConfigError
from osqueue.leadership import Leadership, LeadershipConfig
from osqueue.storage.base import Storage

__all__ = [
    "BROKER_GC_THRESHOLDS",
    "Broker",
    "BrokerConfig",
    "BrokerHandle",
    "run_broker_in_background",
    "serve",
    "tune_gc",
]

log = logging.getLogger("osqueue.broker")

WILDCARD_HOSTS = frozenset(("0.0.0.0", "::", "", "[::]"))


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    """How one broker process runs. See the contract's section 9 for the variables."""

    host: str = "0.0.0.0"
    port: int = 8080
    advertise_address: str | None = None
    token: str | None = None
    max_body_bytes: int = 1024 * 1024
    standby: bool = False
    heartbeat_timeout_ms: int = 10_000
    engine: EngineConfig = field(default_factory=EngineConfig)
    log_level: str = "warning"


def advertised_address(config: BrokerConfig, port: int) -> str:
    """``host:port`` others can reach: the configured one, else never a wildcard."""
    if config.advertise_address:
        if config.advertise_address.split(":")[0] in WILDCARD_HOSTS:
            raise ConfigError("BROKER_ADVERTISE_ADDRESS must not be a wildcard address")
        return config.advertise_address
    host = config.host
    if host in WILDCARD_HOSTS:
        host = socket.gethostname()
    return f"{host}:{port}"


class Broker:
    """One broker: it serves while leader and answers 503 with the leader while standby."""

    def __init__(self, storage: Storage, config: BrokerConfig, address: str) -> None:
        self.storage = storage
        self.config = config
        self.address = address
        self.engine = Engine(storage, config.engine)
        self.leadership = Leadership(
            self.engine,
            address,
            LeadershipConfig(
                heartbeat_timeout_ms=config.heartbeat_timeout_ms,
                poll_interval_ms=max(50, min(500, config.heartbeat_timeout_ms // 10)),
            ),
        )
        self.engine.on_fenced = self._on_fenced
        self.service = QueueService(self.engine)
        self._route_factories: list[Callable[[Broker], list[BaseRoute]]] = []
        self._watch: asyncio.Task[None] | None = None
        self.app = build_app(self)

    @property
    def broker_id(self) -> str:
        return self.leadership.broker_id

    def extra_routes(self) -> list[BaseRoute]:
        """Routes of the other transports (WebSocket, Connect) mounted beside REST."""
        from osqueue.broker import ws

        routes: list[BaseRoute] = list(ws.routes(self))
        try:
            from osqueue.broker import connect
        except ImportError as exc:
            # INFO, not WARNING: REST and WebSocket serve everyone; the demo need not say it.
            log.info(
                "Connect is not served (%s): install the broker with 'osqueue[connect]'",
                exc,
            )
        else:
            routes.extend(connect.routes(self))
        return routes

    def leader_address(self) -> str | None:
        """The leader's address: this broker's own while it leads, else the one it last
        read from the store (None while no broker leads)."""
        return self.engine.known_leader

    def describe(self) -> dict[str, Any]:
        """Who leads, in which epoch, and how old the leader's heartbeat is.

        On the leader ``heartbeatAgeMs`` is the age of the last heartbeat it wrote; on a
        broker that does not lead it is how long the heartbeat it reads from the store has
        stayed unchanged on this broker's clock (what the takeover decision compares).
        """
        engine = self.engine
        body: dict[str, Any] = {
            "leader": engine.leader,
            "brokerId": self.broker_id,
            "address": self.address,
            "leaderAddress": self.leader_address(),
        }
        view = self.leadership.view
        if engine.leader:
            state = engine.state
            body.update(
                leaderBrokerId=state.broker_id,
                epoch=state.epoch,
                brokerHeartbeat=state.broker_heartbeat,
                heartbeatAgeMs=max(0, engine.clock_ms() - state.broker_heartbeat),
            )
        elif view is None:  # it has not read the store yet
            body.update(leaderBrokerId=None, epoch=None, brokerHeartbeat=None, heartbeatAgeMs=None)
        else:
            body.update(
                leaderBrokerId=view.broker_id,
                epoch=view.epoch,
                brokerHeartbeat=view.heartbeat_ms,
                heartbeatAgeMs=view.silent_ms(),
            )
        body.update(takeoverAt=self.leadership.takeover_ms, storage=self.storage.describe())
        return body

    def leads_now(self) -> bool:
        """Whether this broker leads and no standby can have replaced it yet: its last write
        that landed was sent less than the leader timeout ago.

        A leader that was paused, or cut off from the store, for longer than that answers
        as a non-leader until a write lands again or a conflict tells it who leads now, so
        it never serves stale reads as the leader after a standby may have taken over.
        """
        return self.engine.leader and self._unconfirmed_ms() < self.config.heartbeat_timeout_ms

    def _unconfirmed_ms(self) -> int:
        """Milliseconds since the last write known to have landed was sent."""
        return int((time.monotonic() - self.engine.confirmed_at) * 1000)

    def not_leader_error(self) -> BrokerLeadershipError:
        """The 503 of a broker that does not lead (see :meth:`leads_now`): the leader's
        address in ``leader``, and this broker's view of the leadership beside it."""
        facts = self.describe()
        if self.engine.leader:
            message = (
                f"this broker's last write landed {self._unconfirmed_ms()} ms ago, longer than the "
                "leader timeout: another broker may lead now; ask again shortly"
            )
            leader = None
        else:
            message = "this broker is a standby, not the leader; send requests to the leader"
            leader = facts["leaderAddress"]
        return BrokerLeadershipError(
            message,
            leader=leader,
            brokerId=self.broker_id,
            leaderBrokerId=facts["leaderBrokerId"],
            epoch=facts["epoch"],
            heartbeatAgeMs=facts["heartbeatAgeMs"],
        )

    def throttle_stats(self) -> dict[str, Any]:
        stats = getattr(self.storage, "stats", None)
        if callable(stats):
            result: dict[str, Any] = stats()
            return result
        return {"throttling": False}

    async def start(self) -> None:
        """Win leadership (or, as a standby, start watching for the chance to)."""
        self.engine.start()
        if self.config.standby:
            self._start_watching()
        else:
            await self.leadership.acquire(wait=False)

    def _start_watching(self) -> None:
        if self._watch is None or self._watch.done():
            self._watch = asyncio.create_task(self._acquire_forever(), name="osqueue-standby")

    async def _acquire_forever(self) -> None:
        log.info("broker %s is standby; watching the leader", self.broker_id)
        await self.leadership.acquire(wait=True)

    async def _on_fenced(self, leader: str | None) -> None:
        log.warning("broker %s is standby again; %s leads", self.broker_id, leader)
        self._start_watching()

    async def stop(self) -> None:
        """Flush, clear ``broker`` so a standby takes over at once, and close the store."""
        self.leadership.stop_watching()
        if self._watch is not None:
            await asyncio.gather(self._watch, return_exceptions=True)
        await self.leadership.resign()
        await self.engine.stop()
        if self._watch is not None:  # a fence during the flush may have started one
            await asyncio.gather(self._watch, return_exceptions=True)
        await self.storage.close()


class _Server(uvicorn.Server):
    """Uvicorn without its own signal handling: osqueue shuts down in its own order."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP matters: asyncio turns Nagle off only on accepted sockets of such a listener.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} (BROKER_PORT): {exc}") from exc
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def _uvicorn(app: Any, config: BrokerConfig) -> _Server:
    return _Server(
        uvicorn.Config(
            app,
            lifespan="off",
            log_level=config.log_level,
            access_log=False,
            # The broker never reads the client's address; skip X-Forwarded-For parsing.
            proxy_headers=False,
            timeout_graceful_shutdown=30,
        )
    )


@dataclass
class BrokerHandle:
    """A running broker: its URL and its parts, for tests and embedding."""

    url: str
    broker: Broker
    server: _Server

    @property
    def engine(self) -> Engine:
        return self.broker.engine


@contextlib.asynccontextmanager
async def run_broker_in_background(
    storage: Storage, config: BrokerConfig | None = None
) -> AsyncIterator[BrokerHandle]:
    """Serve a broker on this event loop until the block ends (port 0 picks a free port)."""
    config = config or BrokerConfig(host="127.0.0.1", port=0)
    sock = _bind(config.host, config.port)
    port = sock.getsockname()[1]
    broker = Broker(storage, config, advertised_address(config, port))
    await broker.start()
    server = _uvicorn(broker.app, config)
    # The socket already listens, so connections queue until uvicorn accepts them.
    task = asyncio.create_task(server.serve(sockets=[sock]), name="osqueue-http")
    try:
        yield BrokerHandle(f"http://{broker.address}", broker, server)
    finally:
        server.should_exit = True
        await asyncio.gather(task, return_exceptions=True)
        await broker.stop()
        sock.close()


#: The cyclic garbage collector's thresholds in a broker process (``gc.set_threshold``).
#: Each submit allocates a handful of containers and the broker makes almost no cycles;
#: at Python's default of 700 the collector ran every few submits and took 18 % of a
#: batch submit's CPU (52,750 jobs/s in process, 71,400 with these thresholds).
BROKER_GC_THRESHOLDS = (50_000, 20, 20)


def tune_gc() -> None:
    """Let the cycle collector run less often, for a process that is a broker.

    :func:`serve` calls it; an application embedding a broker with
    :func:`run_broker_in_background` decides for its own process.
    """
    gc.set_threshold(*BROKER_GC_THRESHOLDS)


async def serve(
    storage: Storage,
    config: BrokerConfig,
    *,
    on_ready: Callable[[Broker], None] | None = None,
) -> None:
    """Run a broker until SIGINT or SIGTERM, then hand over cleanly."""
    tune_gc()
    sock = _bind(config.host, config.port)
    port = sock.getsockname()[1]
    broker = Broker(storage, config, advertised_address(config, port))
    server = _uvicorn(broker.app, config)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal() -> None:
        stop.set()
        broker.leadership.stop_watching()  # a broker still waiting to lead gives up

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal)
    try:
        await broker.start()
        if stop.is_set():
            return
        task = asyncio.create_task(server.serve(sockets=[sock]), name="osqueue-http")
        log.info(
            "broker %s serving on %s:%d as %s", broker.broker_id, config.host, port, broker.address
        )
        if on_ready is not None:
            on_ready(broker)
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait([task, stopped], return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        log.info("broker %s shutting down", broker.broker_id)
        # Stop taking requests first (requests in flight are answered), then flush and
        # clear the leader field so that a standby takes over at once.
        server.should_exit = True
        await asyncio.gather(task, return_exceptions=True)
    finally:
        await broker.stop()
        sock.close()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
