"""The broker's ASGI application: REST routes, errors, auth and body limits.

The hot routes (submit, batch, claim, heartbeat, complete, fail) are bare ASGI endpoints
that :class:`~osqueue.broker.asgi.BrokerApp` dispatches before Starlette; the rest are
Starlette routes.

Every error leaves as ``{"_tag", "message", ...}`` with the status code of its class; an
unexpected exception is logged and answered as EngineStateError (500), which only a bug
can cause. Invalid input never reaches the engine, so it never changes the stored state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import Receive

from osqueue.broker.asgi import AuthMiddleware, BrokerApp, JsonEndpoint, decode_json, read_body
from osqueue.errors import BrokerProtocolError, EngineStateError, OsqueueError

if TYPE_CHECKING:
    from osqueue.broker.server import Broker

__all__ = ["build_app", "error_response", "json_response"]

log = logging.getLogger("osqueue.broker")

Handler = Callable[[Request], Awaitable[Response]]

#: The hot routes' paths (POST), dispatched by :class:`BrokerApp` before Starlette.
JOBS = "/v1/jobs"
JOB_PREFIX = "/v1/jobs/"


def json_response(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def error_response(error: OsqueueError) -> Response:
    return json_response(error.to_body(), error.status)


async def read_json(request: Request, limit_bytes: int, *, empty: Any = ...) -> Any:
    """The request body decoded as JSON, refusing bodies over ``limit_bytes``."""
    raw = await read_body(request.scope, request.receive, limit_bytes)
    return decode_json(raw, empty=empty)


async def _disconnected(receive: Receive) -> None:
    """Return when the client closes the connection (the body was already read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def claim_unless_gone(receive: Receive, claim: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    """Run a waiting claim, cancelling it if the client goes away while it waits.

    A claim cancelled while it waits has taken nothing; the client is gone, so what is
    returned then is never sent.
    """
    claiming = asyncio.ensure_future(claim)
    gone = asyncio.ensure_future(_disconnected(receive))
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


def build_app(broker: Broker) -> BrokerApp:
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

    # The hot routes: bare ASGI endpoints (see osqueue.broker.asgi). They hand back the
    # service's coroutine rather than await it, one frame less on every resume.
    def submit(job_id: str, body: Any, receive: Receive) -> Awaitable[Any]:
        return service.submit(body)

    def submit_batch(job_id: str, body: Any, receive: Receive) -> Awaitable[Any]:
        return service.submit_batch(body)

    def claim(job_id: str, body: Any, receive: Receive) -> Awaitable[Any]:
        if not (isinstance(body, dict) and body.get("waitMs")):
            return service.claim(body)
        return claim_unless_gone(receive, service.claim(body))

    def heartbeat(job_id: str, body: Any, receive: Receive) -> Awaitable[None]:
        return service.heartbeat(job_id, body)

    def complete(job_id: str, body: Any, receive: Receive) -> Awaitable[None]:
        return service.complete(job_id, body)

    def fail(job_id: str, body: Any, receive: Receive) -> Awaitable[None]:
        return service.fail(job_id, body)

    exact = {
        JOBS: JsonEndpoint(submit, limit),
        f"{JOB_PREFIX}claim": JsonEndpoint(claim, limit),
        # Lenient: a NaN or undecodable text inside one submit fails that submit alone.
        f"{JOB_PREFIX}batch": JsonEndpoint(submit_batch, limit, lenient=True),
    }
    per_job = {
        "complete": JsonEndpoint(complete, limit),
        "heartbeat": JsonEndpoint(heartbeat, limit),
        "fail": JsonEndpoint(fail, limit),
    }

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

    # The hot routes are here too, for requests BrokerApp does not dispatch itself; they
    # come first, as Starlette tries routes in order.
    routes: list[BaseRoute] = [
        *(Route(path, endpoint, methods=["POST"]) for path, endpoint in exact.items()),
        *(
            Route(f"{JOB_PREFIX}{{job_id}}/{segment}", endpoint, methods=["POST"])
            for segment, endpoint in per_job.items()
        ),
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

    return BrokerApp(
        exact=exact,
        per_job=per_job,
        job_prefix=JOB_PREFIX,
        token=broker.config.token,
        routes=routes,
        middleware=[Middleware(AuthMiddleware, token=broker.config.token)]
        if broker.config.token
        else [],
        exception_handlers={HTTPException: http_error},
    )
