"""The broker process: storage, engine, leadership and the HTTP server around them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import AsyncIterator, Callable, Generator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.routing import BaseRoute

from osqueue.broker.app import build_app
from osqueue.broker.service import QueueService
from osqueue.engine import Engine, EngineConfig
from osqueue.errors import ConfigError
from osqueue.leadership import Leadership, LeadershipConfig
from osqueue.storage.base import Storage

__all__ = ["Broker", "BrokerConfig", "BrokerHandle", "run_broker_in_background", "serve"]

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
        routes: list[BaseRoute] = []
        for module in ("osqueue.broker.ws", "osqueue.broker.connect"):
            with contextlib.suppress(ImportError):
                routes.extend(__import__(module, fromlist=["routes"]).routes(self))
        return routes

    def leader_address(self) -> str | None:
        return self.leadership.known_leader if not self.engine.leader else self.address

    def describe(self) -> dict[str, Any]:
        state = self.engine.state
        return {
            "leader": self.engine.leader,
            "brokerId": self.broker_id,
            "address": self.address,
            "leaderAddress": self.leader_address(),
            "epoch": state.epoch,
            "brokerHeartbeat": state.broker_heartbeat,
            "storage": self.storage.describe(),
        }

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
            self._watch = asyncio.create_task(self._acquire_forever(), name="osqueue-standby")
        else:
            await self.leadership.acquire(wait=False)

    async def _acquire_forever(self) -> None:
        log.info("broker %s is standby; watching the leader", self.broker_id)
        await self.leadership.acquire(wait=True)

    async def _on_fenced(self, leader: str | None) -> None:
        self.leadership.known_leader = leader
        if self._watch is None or self._watch.done():
            self._watch = asyncio.create_task(self._acquire_forever(), name="osqueue-standby")

    async def stop(self) -> None:
        """Flush, clear ``broker`` so a standby takes over at once, and close the store."""
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        await self.leadership.resign()
        await self.engine.stop()
        await self.storage.close()


class _Server(uvicorn.Server):
    """Uvicorn without its own signal handling: osqueue shuts down in its own order."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
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


async def serve(
    storage: Storage,
    config: BrokerConfig,
    *,
    on_ready: Callable[[Broker], None] | None = None,
) -> None:
    """Run a broker until SIGINT or SIGTERM, then hand over cleanly."""
    sock = _bind(config.host, config.port)
    port = sock.getsockname()[1]
    broker = Broker(storage, config, advertised_address(config, port))
    server = _uvicorn(broker.app, config)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await broker.start()
        task = asyncio.create_task(server.serve(sockets=[sock]), name="osqueue-http")
        log.info(
            "broker %s serving on %s:%d as %s", broker.broker_id, config.host, port, broker.address
        )
        if on_ready is not None:
            on_ready(broker)
        await asyncio.wait(
            [task, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED
        )
        log.info("broker %s shutting down", broker.broker_id)
        # Stop taking requests first, then flush and clear the leader field.
        server.should_exit = True
        await asyncio.gather(task, return_exceptions=True)
    finally:
        await broker.stop()
        sock.close()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
