"""The REST app's bare ASGI layer: the hot routes served without Starlette's machinery.

Submits, claims, heartbeats, completes and fails are nearly all of a broker's requests.
Through Starlette each one passed two or three middleware layers, a search of the routes, and
a Request and a Response object: about as much CPU as the queue operation itself.
:class:`BrokerApp` answers those routes straight from the ASGI scope instead (the body read
with ``receive``, the answer sent with two ``send`` calls) and hands every other request to
the Starlette application it extends. That application holds the same routes with the same
:class:`JsonEndpoint` objects, so a request answers the same whichever way it goes.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from osqueue.broker.validation import parse_body
from osqueue.errors import (
    AuthenticationError,
    BrokerProtocolError,
    EngineStateError,
    OsqueueError,
    PayloadTooLargeError,
)

__all__ = [
    "AuthMiddleware",
    "BrokerApp",
    "JsonEndpoint",
    "decode_json",
    "read_body",
    "send_error",
    "send_json",
]

log = logging.getLogger("osqueue.broker")

#: An endpoint's work: (job id from the path or "", decoded body, receive) -> the JSON
#: answer, or None for 204. ``receive`` lets a waiting claim notice the client leave.
Handler = Callable[[str, Any, Receive], Awaitable[Any]]

_JSON_TYPE = (b"content-type", b"application/json")
_UNAUTHORIZED = "missing or wrong bearer token; set OSQUEUE_TOKEN"


async def send_json(send: Send, status: int, body: bytes) -> None:
    """Answer with ``body``, already encoded JSON (the headers Starlette's Response sends)."""
    headers = [(b"content-length", b"%d" % len(body)), _JSON_TYPE]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Send, error: OsqueueError) -> None:
    await send_json(send, error.status, orjson.dumps(error.to_body()))


async def _send_no_content(send: Send) -> None:
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def _bearer_ok(scope: Scope, expected: bytes) -> bool:
    given = dict(scope["headers"]).get(b"authorization", b"")
    return hmac.compare_digest(given, expected)


def _expected_header(token: str | None) -> bytes | None:
    return f"Bearer {token}".encode() if token else None


class AuthMiddleware:
    """Requires ``Authorization: Bearer <token>`` on every path except ``/healthz``."""

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.expected = _expected_header(token)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.expected is None or scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        if scope["path"] == "/healthz" or _bearer_ok(scope, self.expected):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": _UNAUTHORIZED})
            return None
        await send_error(send, AuthenticationError(_UNAUTHORIZED))
        return None


def _content_headers(scope: Scope) -> tuple[str | None, str | None]:
    """The first Content-Type and Content-Length of the request, as Starlette reads them."""
    content_type = length = None
    for name, value in scope["headers"]:
        if name == b"content-type":
            if content_type is None:
                content_type = value.decode("latin-1")
        elif name == b"content-length" and length is None:
            length = value.decode("latin-1")
    return content_type, length


async def read_body(scope: Scope, receive: Receive, limit_bytes: int) -> bytes:
    """The whole request body, refusing a type that is not JSON and bodies over
    ``limit_bytes`` (by their Content-Length first, then as they arrive).

    Raises ClientDisconnect when the client leaves before the body ends.
    """
    content_type, declared = _content_headers(scope)
    if content_type and "json" not in content_type.lower():
        raise BrokerProtocolError(
            f"content type {content_type!r} is not JSON; send application/json"
        )
    if declared and declared.isdigit() and int(declared) > limit_bytes:
        raise PayloadTooLargeError(
            f"body of {declared} bytes is over the limit of {limit_bytes} bytes (MAX_BODY_BYTES)",
            limitBytes=limit_bytes,
        )
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit_bytes:
            raise PayloadTooLargeError(
                f"body is over the limit of {limit_bytes} bytes (MAX_BODY_BYTES)",
                limitBytes=limit_bytes,
            )
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def decode_json(raw: bytes, *, empty: Any = ..., lenient: bool = False) -> Any:
    """A request body decoded strictly; an empty one is refused unless ``empty`` is given."""
    if not raw or raw.isspace():
        if empty is not ...:
            return empty
        raise BrokerProtocolError("request body is empty; send a JSON object")
    return parse_body(raw, lenient=lenient)


class JsonEndpoint:
    """One REST route that takes a JSON body: an ASGI app for Starlette's router, and
    :meth:`serve` for :class:`BrokerApp`'s direct dispatch.

    Errors leave as their ``{"_tag", "message"}`` body and status; a client that leaves
    mid-body is logged at DEBUG; anything unexpected is logged and answered as
    EngineStateError (500).
    """

    __slots__ = ("handler", "lenient", "limit_bytes")

    def __init__(self, handler: Handler, limit_bytes: int, *, lenient: bool = False) -> None:
        self.handler = handler
        self.limit_bytes = limit_bytes
        self.lenient = lenient

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.serve(scope, receive, send, scope.get("path_params", {}).get("job_id", ""))

    async def serve(self, scope: Scope, receive: Receive, send: Send, job_id: str) -> None:
        try:
            body = decode_json(
                await read_body(scope, receive, self.limit_bytes), lenient=self.lenient
            )
            answer = await self.handler(job_id, body, receive)
        except OsqueueError as exc:
            await send_error(send, exc)
            return
        except ClientDisconnect:  # nobody is left to answer: not the broker's fault
            log.debug("client went away during %s %s", scope["method"], scope["path"])
            await send_error(send, BrokerProtocolError("the client went away"))
            return
        except Exception:
            log.exception("unexpected error on %s %s", scope["method"], scope["path"])
            await send_error(send, EngineStateError("internal error; see the broker log"))
            return
        if answer is None:
            await _send_no_content(send)
        else:
            await send_json(send, 200, orjson.dumps(answer))


class BrokerApp(Starlette):
    """Starlette with the hot POST routes dispatched before it.

    ``exact`` maps whole paths to endpoints; ``per_job`` maps the last segment of
    ``{job_prefix}{job_id}/{segment}`` paths. Anything else, and any request whose scope
    has a ``root_path``, goes through Starlette, whose router must hold the same endpoints.
    """

    def __init__(
        self,
        *,
        exact: Mapping[str, JsonEndpoint],
        per_job: Mapping[str, JsonEndpoint],
        job_prefix: str,
        token: str | None,
        **starlette: Any,
    ) -> None:
        super().__init__(**starlette)
        self._exact = dict(exact)
        self._per_job = dict(per_job)
        self._job_prefix = job_prefix
        self._expected = _expected_header(token)

    def _match(self, path: str) -> tuple[JsonEndpoint | None, str]:
        endpoint = self._exact.get(path)
        if endpoint is not None or not path.startswith(self._job_prefix):
            return endpoint, ""
        job_id, slash, segment = path[len(self._job_prefix) :].partition("/")
        if not (slash and job_id):
            return None, ""
        return self._per_job.get(segment), job_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and not scope.get("root_path"):
            endpoint, job_id = self._match(scope["path"])
            if endpoint is not None:
                if self._expected is not None and not _bearer_ok(scope, self._expected):
                    await send_error(send, AuthenticationError(_UNAUTHORIZED))
                    return
                await endpoint.serve(scope, receive, send, job_id)
                return
        await super().__call__(scope, receive, send)
