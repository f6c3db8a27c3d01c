"""The WebSocket transport: every call is one JSON frame on a single long-lived connection.

Frames are ``{"id", "method", "params"}``; the broker answers each with ``{"id", "ok",
"result" | "error"}``, possibly out of order, and a reader task hands every reply to the call
waiting for that id. Many calls can be in flight at once on the one connection.

The connection opens on the first call. When it drops, the calls waiting on it fail with
:class:`~osqueue.errors.TransportConnectionError` (``request_sent`` True: the broker may have
acted on them), and the next call opens a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from osqueue.client.rest import DEFAULT_CONNECT_TIMEOUT_S, DEFAULT_TIMEOUT_S, USER_AGENT
from osqueue.errors import (
    AuthenticationError,
    OsqueueError,
    TransportConfigError,
    TransportConnectionError,
    error_from_body,
)
from osqueue.model import encode_json

__all__ = ["DEFAULT_MAX_MESSAGE_BYTES", "WS_PATH", "WebSocketTransport", "websocket_url"]

log = logging.getLogger("osqueue.client")

WS_PATH: Final = "/v1/ws"
#: Largest reply accepted (a ``listJobs`` of a big queue can be large).
DEFAULT_MAX_MESSAGE_BYTES: Final = 64 * 1024 * 1024


def websocket_url(url: str) -> str:
    """``ws(s)://host:port/v1/ws`` for a broker URL given as http(s), ws(s) or ``host:port``.

    A ws(s) URL with a path is used as it is.
    """
    url = url.strip()
    if "://" not in url:
        url = f"http://{url}"
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme.lower())
    if scheme is None or not parts.netloc:
        raise TransportConfigError(
            f"broker URL {url!r} is not usable: give http://host:port or ws://host:port/v1/ws"
        )
    path = parts.path.rstrip("/")
    if parts.scheme.lower() in ("http", "https") or not path:
        path = f"{path}{WS_PATH}"
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


class WebSocketTransport:
    """Carries client calls as WebSocket frames (protocol section 6).

    ``url`` is the broker's URL (``http://host:port`` or ``ws://host:port/v1/ws``).
    ``token`` is sent as ``Authorization: Bearer <token>`` on the upgrade request.
    ``timeout_s`` bounds each call from sending to its reply (a claim that waits gets its
    ``waitMs`` on top); ``connect_timeout_s`` bounds opening the connection.
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self.url = websocket_url(url)
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.max_message_bytes = max_message_bytes
        self._headers = {"authorization": f"Bearer {token}"} if token else {}
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._connection: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._connecting = asyncio.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"WebSocketTransport({self.url!r})"

    async def call(self, method: str, params: dict[str, Any]) -> Any:
        """Send one request frame and wait for its reply; answer its ``result``."""
        if self._closed:
            raise TransportConfigError("this WebSocketTransport is closed; make a new one")
        request_id = next(self._ids)
        frame = encode_json({"id": request_id, "method": method, "params": params}).decode()
        connection = await self._connect()
        timeout_s = self._timeout_s(method, params)
        reply_future = asyncio.get_running_loop().create_future()
        self._pending[request_id] = reply_future
        try:
            async with asyncio.timeout(timeout_s):
                try:
                    await connection.send(frame)
                except ConnectionClosed as exc:
                    raise self._dropped(exc, request_sent=False) from exc
                reply = await reply_future
        except TimeoutError as exc:
            raise TransportConnectionError(
                f"no reply to {method} from {self.url} within {timeout_s:g} s",
                method=method,
                path=WS_PATH,
                request_sent=True,
            ) from exc
        finally:
            self._pending.pop(request_id, None)
        return self._result(reply, method)

    def _timeout_s(self, method: str, params: dict[str, Any]) -> float:
        wait_ms = params.get("waitMs") if method == "claimJob" else None
        extra_s = wait_ms / 1000 if isinstance(wait_ms, int | float) and wait_ms > 0 else 0.0
        return self.timeout_s + extra_s

    @staticmethod
    def _result(reply: dict[str, Any], method: str) -> Any:
        if reply.get("ok") is True:
            return reply.get("result", {})
        raise error_from_body(reply.get("error"), status=0, method=method, path=WS_PATH)

    # -- the connection ---------------------------------------------------------------

    async def _connect(self) -> ClientConnection:
        async with self._connecting:
            reader = self._reader
            if self._connection is not None and reader is not None and not reader.done():
                return self._connection
            try:
                connection = await connect(
                    self.url,
                    additional_headers=self._headers,
                    user_agent_header=USER_AGENT,
                    open_timeout=self.connect_timeout_s,
                    max_size=self.max_message_bytes,
                )
            except InvalidStatus as exc:
                status = exc.response.status_code
                if status in (401, 403):
                    raise AuthenticationError(
                        f"{self.url} refused the WebSocket upgrade (HTTP {status}): the token "
                        "is missing or wrong (OSQUEUE_TOKEN), or the URL is not an osqueue broker"
                    ) from exc
                raise TransportConnectionError(
                    f"{self.url} refused the WebSocket upgrade (HTTP {status})",
                    method="GET",
                    path=WS_PATH,
                    request_sent=False,
                ) from exc
            except (OSError, TimeoutError, WebSocketException) as exc:
                raise TransportConnectionError(
                    f"cannot connect to {self.url}: {type(exc).__name__}: {exc}",
                    method="GET",
                    path=WS_PATH,
                    request_sent=False,
                ) from exc
            self._connection = connection
            self._reader = asyncio.create_task(self._read(connection), name="osqueue-ws-reader")
            return connection

    async def _read(self, connection: ClientConnection) -> None:
        """Hand every reply to its call; when the connection ends, fail the calls left."""
        error: OsqueueError | None = None
        try:
            async for message in connection:
                self._deliver(message)
        except ConnectionClosed as exc:
            error = self._dropped(exc, request_sent=True)
        finally:
            if error is None:
                error = TransportConnectionError(
                    f"the connection to {self.url} closed",
                    method="GET",
                    path=WS_PATH,
                    request_sent=True,
                )
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(error)
            self._pending.clear()

    def _deliver(self, message: str | bytes) -> None:
        try:
            reply = orjson.loads(message)
        except orjson.JSONDecodeError:
            log.warning("broker sent a frame that is not JSON: %.200r", message)
            return
        request_id = reply.get("id") if isinstance(reply, dict) else None
        future = self._pending.get(request_id) if isinstance(request_id, int) else None
        if future is None:
            # Replies to frames this transport did not send, or to calls that timed out.
            log.debug("broker reply with no waiting call: %.200r", message)
            return
        if not future.done():
            future.set_result(reply)

    def _dropped(self, exc: ConnectionClosed, *, request_sent: bool) -> TransportConnectionError:
        self._connection = None
        return TransportConnectionError(
            f"the connection to {self.url} closed ({exc})",
            method="GET",
            path=WS_PATH,
            request_sent=request_sent,
        )

    async def aclose(self) -> None:
        """Close the connection; calls still waiting fail with TransportConnectionError."""
        self._closed = True
        connection, reader = self._connection, self._reader
        self._connection = self._reader = None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        if self._pending:
            error = TransportConnectionError(
                "the WebSocket transport was closed", request_sent=True
            )
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(error)
            self._pending.clear()
