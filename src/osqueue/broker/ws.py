"""The broker's WebSocket transport at ``/v1/ws`` (protocol.md, section 6).

Each text frame is one request ``{"id", "method", "params"}``; each gets one reply
``{"id", "ok": true, "result"}`` or ``{"id", "ok": false, "error": {"_tag", "message"}}``.
Requests run concurrently, a task each, at most :data:`MAX_IN_FLIGHT` per connection (past
that the broker stops reading the socket until one finishes), so replies may come out of
order; clients match them by ``id``. A frame that is not a JSON object, a binary frame and an
unknown method are answered with BrokerProtocolError; a frame over the broker's
``max_body_bytes`` with PayloadTooLargeError. Authentication is the bearer token of REST,
checked on the upgrade request by the app's auth middleware (it closes with 1008).

When the client goes away, its requests still in progress are cancelled: a claim that is
still waiting for work takes nothing. A claim whose write was already under way when the
connection closed holds its job until the job times out, as for any worker that vanishes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

import orjson
from starlette.routing import BaseRoute, WebSocketRoute
from starlette.websockets import WebSocket

from osqueue.broker.methods import call_method
from osqueue.broker.validation import parse_body
from osqueue.errors import (
    BrokerProtocolError,
    EngineStateError,
    OsqueueError,
    PayloadTooLargeError,
)

if TYPE_CHECKING:
    from osqueue.broker.server import Broker

__all__ = ["MAX_IN_FLIGHT", "PATH", "routes"]

log = logging.getLogger("osqueue.broker")

PATH: Final = "/v1/ws"
#: Requests of one connection handled at once.
MAX_IN_FLIGHT: Final = 64


def routes(broker: Broker) -> list[BaseRoute]:
    """The WebSocket route of ``broker``, mounted beside REST by the broker's app."""

    async def endpoint(websocket: WebSocket) -> None:
        await _Connection(websocket, broker).serve()

    return [WebSocketRoute(PATH, endpoint)]


class _Request:
    """One frame's identity while it is handled: its id and method, once known."""

    __slots__ = ("id", "method")

    def __init__(self) -> None:
        self.id: Any = None
        self.method: str | None = None


class _Connection:
    """One client connection: reads frames, runs a task per request, writes replies."""

    def __init__(self, websocket: WebSocket, broker: Broker) -> None:
        self.websocket = websocket
        self.broker = broker
        self.limit_bytes = broker.config.max_body_bytes
        self.tasks: set[asyncio.Task[None]] = set()
        self.slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        self.send_lock = asyncio.Lock()
        self.open = True

    async def serve(self) -> None:
        await self.websocket.accept()
        try:
            while True:
                message = await self.websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                await self.slots.acquire()
                task = asyncio.create_task(self._handle(message), name="osqueue-ws-request")
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
        finally:
            self.open = False
            for task in list(self.tasks):
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _handle(self, message: Mapping[str, Any]) -> None:
        request = _Request()
        try:
            reply = await self._answer(message, request)
        finally:
            self.slots.release()
        await self._send(reply, request)

    async def _answer(self, message: Mapping[str, Any], request: _Request) -> dict[str, Any]:
        try:
            result = await self._run(message, request)
        except OsqueueError as exc:
            return {"id": request.id, "ok": False, "error": exc.to_body()}
        except Exception:
            log.exception("unexpected error on WebSocket method %s", request.method)
            error = EngineStateError("internal error; see the broker log")
            return {"id": request.id, "ok": False, "error": error.to_body()}
        return {"id": request.id, "ok": True, "result": result}

    async def _run(self, message: Mapping[str, Any], request: _Request) -> dict[str, Any]:
        text = message.get("text")
        if text is None:
            raise BrokerProtocolError(
                "binary frames are not supported; send each request as a JSON text frame"
            )
        raw = text.encode()
        if len(raw) > self.limit_bytes:
            request.id = _peek_id(raw)
            raise PayloadTooLargeError(
                f"frame of {len(raw)} bytes is over the limit of {self.limit_bytes} bytes "
                "(MAX_BODY_BYTES)",
                limitBytes=self.limit_bytes,
            )
        try:
            frame = parse_body(raw)
        except BrokerProtocolError:
            request.id = _peek_id(raw)  # valid JSON refused for its content keeps its id
            raise
        if not isinstance(frame, dict):
            raise BrokerProtocolError(
                'a request frame must be a JSON object {"id", "method", "params"}, '
                f"got {type(frame).__name__}"
            )
        request.id = _valid_id(frame.get("id"))
        method = frame.get("method")
        request.method = method if isinstance(method, str) else None
        return await call_method(self.broker, method, frame.get("params"))

    async def _send(self, reply: dict[str, Any], request: _Request) -> None:
        if self.open:
            data = orjson.dumps(reply).decode()
            async with self.send_lock:
                try:
                    await self.websocket.send_text(data)
                    return
                except Exception as exc:  # the socket is gone; the reader will see it too
                    log.debug("WebSocket send failed: %s", exc)
                    self.open = False
        if request.method == "claimJob" and reply.get("ok") and reply["result"]:
            log.warning(
                "claimed job %s could not be delivered (connection closed); "
                "it is handed out again after the job timeout",
                reply["result"].get("jobId"),
            )


def _valid_id(value: Any) -> Any:
    """The request id if it is a string or a number (echoed as sent), else None."""
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        return value
    if value is None:
        return None
    raise BrokerProtocolError("id must be a string or a number")


def _peek_id(raw: bytes) -> Any:
    """The id of an oversized frame, so the client can match the refusal; None if unreadable."""
    with contextlib.suppress(orjson.JSONDecodeError):
        frame = orjson.loads(raw)
        if isinstance(frame, dict):
            with contextlib.suppress(BrokerProtocolError):
                return _valid_id(frame.get("id"))
    return None
