"""Brokers that answer from a script, on real loopback ports, for the client's unit tests.

A :class:`ScriptedBroker` is a small aiohttp web app that records every request and answers
each with the next step of its script (the last step repeats). The apps run in an event
loop of their own, in a thread, so that the blocking client can be tested against them as
well as the async one. Besides answers, a step can be :data:`HANG` (no answer until the
test ends: the client's read time-out), :data:`GARBAGE` (bytes that are not HTTP, then the
connection closes) or :data:`REFUSE` (the connection is refused: only at the start of a
script, see :meth:`ScriptedBroker.transport`). Use the fixture :func:`scripted`.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import pytest
from aiohttp import web
from multidict import CIMultiDict

from osqueue.client import AsyncOsqueueClient, ClientRetry, RestTransport

T = TypeVar("T")


class _Action:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


HANG: Final = _Action("HANG")
GARBAGE: Final = _Action("GARBAGE")
REFUSE: Final = _Action("REFUSE")

Step = web.StreamResponse | _Action
FAST_RETRY: Final = ClientRetry(deadline_s=2.0, base_s=0.001, cap_s=0.005)
#: The time-out of the transports made here: a HANG step costs this long.
SHORT_TIMEOUT_S: Final = 0.5


@dataclass(frozen=True, slots=True)
class Received:
    """One request as the broker received it."""

    method: str
    raw_path: str  # as sent, percent-escapes kept
    path: str
    headers: CIMultiDict[str]
    content: bytes


Responder = Callable[[Received], Step]


def answer(status: int, body: Any = None) -> Responder:
    if body is None:
        return lambda request: web.Response(status=status)
    return lambda request: web.json_response(body, status=status)


def raw(status: int, text: str) -> Responder:
    return lambda request: web.Response(status=status, text=text)


def later(delay_s: float, responder: Responder) -> Responder:
    """``responder``'s answer, ``delay_s`` after the request came (for time-out tests)."""
    return lambda request: _Later(delay_s, responder(request))


class _Later(_Action):
    def __init__(self, delay_s: float, outcome: Step) -> None:
        super().__init__(f"LATER({delay_s})")
        self.delay_s = delay_s
        self.outcome = outcome


def _step(action: _Action) -> Responder:
    return lambda request: action


hang: Final = _step(HANG)
garbage: Final = _step(GARBAGE)
refuse: Final = _step(REFUSE)


@dataclass
class ScriptedBroker:
    """One scripted broker. ``requests`` holds what it received, in order; a refused
    connection is recorded as a request with the method ``REFUSED``."""

    url: str
    responders: list[Responder]
    refused_url: str
    requests: list[Received] = field(default_factory=list)

    def transport(self, token: str | None = None, **kwargs: Any) -> Any:
        """A RestTransport to this broker. When the script starts with REFUSE steps, the
        first calls go instead to a port where nothing listens, so that they are refused
        for real."""
        kwargs.setdefault("timeout_s", SHORT_TIMEOUT_S)
        inner = RestTransport(self.url, token, **kwargs)
        refusals = 0
        while refusals < len(self.responders) and self.responders[refusals] is refuse:
            refusals += 1
        if not refusals:
            return inner
        return _RefusedFirst(self, refusals, RestTransport(self.refused_url, token), inner)

    def client(self, **kwargs: Any) -> AsyncOsqueueClient:
        kwargs.setdefault("retry", FAST_RETRY)
        return AsyncOsqueueClient(transport=self.transport(), **kwargs)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        received = Received(
            request.method,
            request.raw_path,
            request.path,
            CIMultiDict(request.headers),
            await request.read(),
        )
        self.requests.append(received)
        index = min(len(self.requests), len(self.responders)) - 1
        outcome = self.responders[index](received)
        if isinstance(outcome, _Later):
            await asyncio.sleep(outcome.delay_s)
            outcome = outcome.outcome
        if outcome is HANG:
            await asyncio.Event().wait()  # cancelled when the broker stops
        if outcome is GARBAGE:
            assert request.transport is not None
            request.transport.write(b"NOT HTTP AT ALL\r\n\r\n")
            request.transport.close()
            raise asyncio.CancelledError
        assert isinstance(outcome, web.StreamResponse), outcome
        return outcome


class _RefusedFirst:
    """Sends the first ``refusals`` calls to a refusing port, then the rest to ``inner``."""

    def __init__(
        self, broker: ScriptedBroker, refusals: int, refused: RestTransport, inner: RestTransport
    ) -> None:
        self.broker = broker
        self.refusals = refusals
        self.refused = refused
        self.inner = inner

    async def call(self, method: str, params: dict[str, Any]) -> Any:
        if self.refusals:
            self.refusals -= 1
            self.broker.requests.append(Received("REFUSED", "", "", CIMultiDict(), b""))
            return await self.refused.call(method, params)
        return await self.inner.call(method, params)

    async def aclose(self) -> None:
        await self.refused.aclose()
        await self.inner.aclose()


class BrokerThread:
    """An event loop in a thread that serves scripted brokers on loopback."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="scripted-brokers", daemon=True
        )
        self._thread.start()
        self._runners: list[web.AppRunner] = []
        # Bound but not listening: connections to it are refused, and no one else gets it.
        self._refusing = socket.socket()
        self._refusing.bind(("127.0.0.1", 0))
        self.refused_url = f"http://127.0.0.1:{self._refusing.getsockname()[1]}"

    def _run(self, coro: Any) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout=10)

    def start(self, *responders: Responder) -> ScriptedBroker:
        return self._run(self._start(list(responders)))  # type: ignore[no-any-return]

    async def _start(self, responders: list[Responder]) -> ScriptedBroker:
        broker = ScriptedBroker("", responders, self.refused_url)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", broker.handle)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        broker.url = f"http://127.0.0.1:{port}"
        self._runners.append(runner)
        return broker

    def stop_all(self) -> None:
        runners, self._runners = self._runners, []
        for runner in runners:
            self._run(runner.cleanup())

    def close(self) -> None:
        self.stop_all()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()
        self._refusing.close()


@pytest.fixture(scope="session")
def broker_thread() -> Iterator[BrokerThread]:
    thread = BrokerThread()
    yield thread
    thread.close()


@pytest.fixture
def scripted(broker_thread: BrokerThread) -> Iterator[Callable[..., ScriptedBroker]]:
    """Starts a scripted broker: ``scripted(answer(200, {...}), hang, ...)``."""
    yield broker_thread.start
    broker_thread.stop_all()
