"""The broker's ASGI application: REST routes, errors, auth and body limits.

Every error leaves as ``{"_tag", "message", ...}`` with the status code of its class; an
unexpected exception is logged and answered as EngineStateError (500), which only a bug
can cause. Invalid input never reaches the engine, so it never changes the stored state.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from osqueue.broker.validation import parse_body
from osqueue.errors import (
    AuthenticationError,
    BrokerProtocolError,
    EngineStateError,
    OsqueueError,
    PayloadTooLargeError,
)

if TYPE_CHECKING:
    from osqueue.broker.server import Broker

__all__ = ["build_app", "error_response", "json_response"]

log = logging.getLogger("osqueue.broker")

Handler = Callable[[Request], Awaitable[Response]]


def json_response(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def error_response(error: OsqueueError) -> Response:
    return json_response(error.to_body(), error.status)


class AuthMiddleware:
    """Requires ``Authorization: Bearer <token>`` on every path except ``/healthz``."""

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode() if token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.expected is None or scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        if scope["path"] == "/healthz":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        error = AuthenticationError("missing or wrong bearer token; set OSQUEUE_TOKEN")
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": error.message})
            return None
        await error_response(error)(scope, receive, send)
        return None


async def read_json(
    request: Request, limit_bytes: int, *, empty: Any = ..., lenient: bool = False
) -> Any:
    """The request body decoded as JSON, refusing bodies over ``limit_bytes``."""
    content_type = request.headers.get("content-type")
    if content_type and "json" not in content_type.lower():
        raise BrokerProtocolError(
            f"content type {content_type!r} is not JSON; send application/json"
        )
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit_bytes:
        raise PayloadTooLargeError(
            f"body of {declared} bytes is over the limit of {limit_bytes} bytes (MAX_BODY_BYTES)",
            limitBytes=limit_bytes,
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit_bytes:
            raise PayloadTooLargeError(
                f"body is over the limit of {limit_bytes} bytes (MAX_BODY_BYTES)",
                limitBytes=limit_bytes,
            )
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        if empty is not ...:
            return empty
        raise BrokerProtocolError("request body is empty; send a JSON object")
    return parse_body(raw, lenient=lenient)


async def _disconnected(request: Request) -> None:
    """Return when the client closes the connection (the body was already read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def claim_unless_gone(request: Request, claim: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    """Run a waiting claim, cancelling it if the client goes away while it waits.

    A claim cancelled while it waits has taken nothing; the client is gone, so what is
    returned then is never sent.
    """
    claiming = asyncio.ensure_future(claim)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((claiming, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not claiming.done():
        claiming.cancel()
        log.debug("waiting claim released: the client went away")
        with contextlib.suppress(asyncio.CancelledError):
            await claiming
        return {}
    return claiming.result()


def build_app(broker: Broker) -> Starlette:
    """The REST application of one broker (WebSocket and Connect mount beside it)."""
    service = broker.service
    limit = broker.config.max_body_bytes

    def guarded(handler: Handler) -> Handler:
        async def endpoint(request: Request) -> Response:
            try:
                return await handler(request)
            except OsqueueError as exc:
                return error_response(exc)
            except ClientDisconnect:  # nobody is left to answer: not the broker's fault
                log.debug("client went away during %s %s", request.method, request.url.path)
                return error_response(BrokerProtocolError("the client went away"))
            except Exception:
                log.exception("unexpected error on %s %s", request.method, request.url.path)
                return error_response(EngineStateError("internal error; see the broker log"))

        return endpoint

    def leader_only() -> None:
        if not broker.leads_now():
            raise broker.not_leader_error()

    async def healthz(request: Request) -> Response:
        return json_response({"status": "ok", "leader": broker.engine.leader})

    async def readyz(request: Request) -> Response:
        leader_only()
        return json_response(broker.describe())

    async def state(request: Request) -> Response:
        return Response(broker.engine.committed_bytes, media_type="application/json")

    async def submit(request: Request) -> Response:
        return json_response(await service.submit(await read_json(request, limit)))

    async def submit_batch(request: Request) -> Response:
        # Lenient: a NaN or undecodable text inside one submit fails that submit alone.
        body = await read_json(request, limit, lenient=True)
        return json_response(await service.submit_batch(body))

    async def claim(request: Request) -> Response:
        body = await read_json(request, limit)
        if not (isinstance(body, dict) and body.get("waitMs")):
            return json_response(await service.claim(body))
        return json_response(await claim_unless_gone(request, service.claim(body)))

    async def heartbeat(request: Request) -> Response:
        body = await read_json(request, limit)
        await service.heartbeat(request.path_params["job_id"], body)
        return Response(status_code=204)

    async def complete(request: Request) -> Response:
        body = await read_json(request, limit)
        await service.complete(request.path_params["job_id"], body)
        return Response(status_code=204)

    async def fail(request: Request) -> Response:
        body = await read_json(request, limit)
        await service.fail(request.path_params["job_id"], body)
        return Response(status_code=204)

    async def cancel(request: Request) -> Response:
        await service.cancel(request.path_params["job_id"])
        return Response(status_code=204)

    async def get_job(request: Request) -> Response:
        leader_only()
        return json_response(service.get_job(request.path_params["job_id"]))

    async def stats(request: Request) -> Response:
        leader_only()
        return json_response(service.stats())

    async def list_jobs(request: Request) -> Response:
        leader_only()
        return json_response(service.list_jobs())

    async def throttle_stats(request: Request) -> Response:
        return json_response(broker.throttle_stats())

    async def dead(request: Request) -> Response:
        leader_only()
        return json_response(service.dead())

    async def requeue(request: Request) -> Response:
        body = await read_json(request, limit, empty={})
        return json_response(await service.requeue_dead(body))

    async def purge(request: Request) -> Response:
        return json_response(await service.purge_dead())

    # The hot paths come first: Starlette tries routes in order.
    routes: list[BaseRoute] = [
        Route("/v1/jobs", guarded(submit), methods=["POST"]),
        Route("/v1/jobs/claim", guarded(claim), methods=["POST"]),
        Route("/v1/jobs/{job_id}/complete", guarded(complete), methods=["POST"]),
        Route("/v1/jobs/{job_id}/heartbeat", guarded(heartbeat), methods=["POST"]),
        Route("/v1/jobs/{job_id}/fail", guarded(fail), methods=["POST"]),
        Route("/v1/jobs/batch", guarded(submit_batch), methods=["POST"]),
        Route("/v1/jobs", guarded(list_jobs), methods=["GET"]),
        Route("/v1/jobs/{job_id}", guarded(get_job), methods=["GET"]),
        Route("/v1/jobs/{job_id}/cancel", guarded(cancel), methods=["POST"]),
        Route("/v1/stats", guarded(stats), methods=["GET"]),
        Route("/healthz", guarded(healthz), methods=["GET"]),
        Route("/readyz", guarded(readyz), methods=["GET"]),
        Route("/state", guarded(state), methods=["GET"]),
        Route("/v1/throttle-stats", guarded(throttle_stats), methods=["GET"]),
        Route("/v1/dead", guarded(dead), methods=["GET"]),
        Route("/v1/dead", guarded(purge), methods=["DELETE"]),
        Route("/v1/dead/requeue", guarded(requeue), methods=["POST"]),
    ]
    routes.extend(broker.extra_routes())

    async def http_error(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        if status == 404:
            return json_response(
                BrokerProtocolError(f"no such path: {request.url.path}").to_body(), 404
            )
        if status == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
            return json_response(BrokerProtocolError(message).to_body(), 405)
        return error_response(EngineStateError(f"HTTP error {status}"))

    return Starlette(
        routes=routes,
        middleware=[Middleware(AuthMiddleware, token=broker.config.token)]
        if broker.config.token
        else [],
        exception_handlers={HTTPException: http_error},
    )
