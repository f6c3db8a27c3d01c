"""The broker's Connect transport: service ``osqueue.v1.QueueService`` (protocol.md, section 7).

Unary RPCs at ``/osqueue.v1.QueueService/<Method>``, POST, with the binary protobuf codec
(``application/proto``) or the JSON one (``application/json``); gzip request and response
compression. The ``connectrpc`` library's ASGI application speaks the protocol; every RPC
turns its message into the REST body, runs the same operation as REST through
:func:`~osqueue.broker.methods.call_method`, and turns the REST answer back into a message.

Errors are Connect errors ``{"code", "message", "details"}``: the message starts with the
osqueue tag (``LeaseLostError: ...``) and the details hold an ``osqueue.v1.ErrorDetail`` with
the tag, message and fields, so the Python client raises the same class as over REST. Codes:
BrokerProtocolError invalid_argument, AuthenticationError unauthenticated, LeaseLostError
failed_precondition, BrokerLeadershipError and StorageBackendError unavailable,
JobNotFoundError not_found, PayloadTooLargeError resource_exhausted, EngineStateError
internal. A request the protocol layer refuses (unknown method, wrong HTTP method or content
type, a body over ``max_body_bytes``, bytes that are not the message) gets a 4xx Connect
error before it reaches the library, never a 500.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final, TypeVar

import orjson
from connectrpc.code import Code
from connectrpc.codec import Codec, proto_binary_codec, proto_json_codec
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext
from protobuf import Message
from starlette.routing import BaseRoute, Mount
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.types import Message as AsgiMessage

from osqueue import _connect_wire as wire
from osqueue._proto.osqueue.v1 import queue_pb as pb
from osqueue._proto.osqueue.v1.queue_connect import QueueService, QueueServiceASGIApplication
from osqueue.broker.methods import call_method
from osqueue.errors import (
    BrokerProtocolError,
    EngineStateError,
    OsqueueError,
    PayloadTooLargeError,
)

if TYPE_CHECKING:
    from osqueue.broker.server import Broker

__all__ = ["PREFIX", "routes"]

log = logging.getLogger("osqueue.broker")

PREFIX: Final = f"/{wire.SERVICE}"
CODECS: Final = ("proto", "json")
ENCODINGS: Final = ("", "identity", "gzip")
_METHOD_BY_PATH: Final = {rpc.path: method for method, rpc in wire.RPCS.items()}

R = TypeVar("R", bound=Message)


def routes(broker: Broker) -> list[BaseRoute]:
    """The Connect service of ``broker``, mounted beside REST by the broker's app."""
    limit = broker.config.max_body_bytes
    app = QueueServiceASGIApplication(
        _QueueHandlers(broker),
        read_max_bytes=limit,
        codecs=[_TaggedCodec(proto_binary_codec()), _TaggedCodec(proto_json_codec())],
    )
    return [Mount(PREFIX, app=_Gate(app, limit))]


def to_connect_error(error: OsqueueError) -> ConnectError:
    """The Connect error for an osqueue error: the code of its class, its tag kept."""
    return ConnectError(
        Code(wire.error_code(error)),
        f"{error.tag}: {error.message}",
        details=[wire.error_detail(error)],
    )


class _TaggedCodec:
    """A codec whose decoding failures are tagged BrokerProtocolErrors (invalid_argument)."""

    def __init__(self, inner: Codec) -> None:
        self.inner = inner

    def name(self) -> str:
        return self.inner.name()

    def encode(self, message: Any) -> bytes:
        return self.inner.encode(message)

    def decode(self, data: bytes | bytearray, message_class: type[Any]) -> Any:
        try:
            return self.inner.decode(data, message_class)
        except Exception as exc:
            error = BrokerProtocolError(
                f"request is not a valid {message_class.__name__} (codec {self.name()}): {exc}"
            )
            raise to_connect_error(error) from exc


class _QueueHandlers(QueueService):
    """The generated service, each RPC one operation of the queue service."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    async def _call(self, method: str, request: Message, response: type[R]) -> R:
        try:
            params, refused = wire.decode_request(method, request)
            result = await call_method(self.broker, method, params)
            if refused:
                result = {"results": wire.splice_batch(result["results"], refused)}
            message = wire.encode_result(method, result)
        except OsqueueError as exc:
            raise to_connect_error(exc) from None
        except Exception:
            log.exception("unexpected error on Connect method %s", method)
            raise to_connect_error(EngineStateError("internal error; see the broker log")) from None
        if not isinstance(message, response):
            raise to_connect_error(EngineStateError(f"{method} built the wrong message"))
        return message

    async def submit_job(
        self,
        request: pb.SubmitJobRequest,
        ctx: RequestContext[pb.SubmitJobRequest, pb.SubmitJobResponse],
        /,
    ) -> pb.SubmitJobResponse:
        return await self._call("submitJob", request, pb.SubmitJobResponse)

    async def submit_batch(
        self,
        request: pb.SubmitBatchRequest,
        ctx: RequestContext[pb.SubmitBatchRequest, pb.SubmitBatchResponse],
        /,
    ) -> pb.SubmitBatchResponse:
        return await self._call("submitBatch", request, pb.SubmitBatchResponse)

    async def claim_job(
        self,
        request: pb.ClaimJobRequest,
        ctx: RequestContext[pb.ClaimJobRequest, pb.ClaimJobResponse],
        /,
    ) -> pb.ClaimJobResponse:
        return await self._call("claimJob", request, pb.ClaimJobResponse)

    async def heartbeat(
        self,
        request: pb.HeartbeatRequest,
        ctx: RequestContext[pb.HeartbeatRequest, pb.HeartbeatResponse],
        /,
    ) -> pb.HeartbeatResponse:
        return await self._call("heartbeat", request, pb.HeartbeatResponse)

    async def complete_job(
        self,
        request: pb.CompleteJobRequest,
        ctx: RequestContext[pb.CompleteJobRequest, pb.CompleteJobResponse],
        /,
    ) -> pb.CompleteJobResponse:
        return await self._call("completeJob", request, pb.CompleteJobResponse)

    async def fail_job(
        self,
        request: pb.FailJobRequest,
        ctx: RequestContext[pb.FailJobRequest, pb.FailJobResponse],
        /,
    ) -> pb.FailJobResponse:
        return await self._call("failJob", request, pb.FailJobResponse)

    async def get_stats(
        self,
        request: pb.GetStatsRequest,
        ctx: RequestContext[pb.GetStatsRequest, pb.GetStatsResponse],
        /,
    ) -> pb.GetStatsResponse:
        return await self._call("getStats", request, pb.GetStatsResponse)

    async def list_jobs(
        self,
        request: pb.ListJobsRequest,
        ctx: RequestContext[pb.ListJobsRequest, pb.ListJobsResponse],
        /,
    ) -> pb.ListJobsResponse:
        return await self._call("listJobs", request, pb.ListJobsResponse)

    async def get_job(
        self,
        request: pb.GetJobRequest,
        ctx: RequestContext[pb.GetJobRequest, pb.GetJobResponse],
        /,
    ) -> pb.GetJobResponse:
        return await self._call("getJob", request, pb.GetJobResponse)

    async def cancel_job(
        self,
        request: pb.CancelJobRequest,
        ctx: RequestContext[pb.CancelJobRequest, pb.CancelJobResponse],
        /,
    ) -> pb.CancelJobResponse:
        return await self._call("cancelJob", request, pb.CancelJobResponse)

    async def list_dead(
        self,
        request: pb.ListDeadRequest,
        ctx: RequestContext[pb.ListDeadRequest, pb.ListDeadResponse],
        /,
    ) -> pb.ListDeadResponse:
        return await self._call("listDead", request, pb.ListDeadResponse)

    async def requeue_dead(
        self,
        request: pb.RequeueDeadRequest,
        ctx: RequestContext[pb.RequeueDeadRequest, pb.RequeueDeadResponse],
        /,
    ) -> pb.RequeueDeadResponse:
        return await self._call("requeueDead", request, pb.RequeueDeadResponse)

    async def purge_dead(
        self,
        request: pb.PurgeDeadRequest,
        ctx: RequestContext[pb.PurgeDeadRequest, pb.PurgeDeadResponse],
        /,
    ) -> pb.PurgeDeadResponse:
        return await self._call("purgeDead", request, pb.PurgeDeadResponse)


# -- the gate in front of the library ------------------------------------------------------


class _Refusal(Exception):
    def __init__(self, status: int, error: OsqueueError, code: str) -> None:
        super().__init__(error.message)
        self.status = status
        self.error = error
        self.code = code


class _Gate:
    """Checks what the library would refuse with an empty body or a 5xx, and buffers the body.

    It answers unknown methods (404), other HTTP methods than POST (405), other content
    types than Connect unary proto or JSON (415, which also keeps gRPC, whose trailers
    uvicorn cannot send, out), unknown content encodings (415) and bodies over the limit
    (413), each as a Connect error with the osqueue tag.
    """

    def __init__(self, app: ASGIApp, limit_bytes: int) -> None:
        self.app = app
        self.limit_bytes = limit_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            return
        try:
            self._check(scope)
            body = await self._read(scope, receive)
        except _Refusal as refusal:
            await _send_error(send, refusal)
            return
        await self.app(scope, _replay(body, receive), send)

    def _check(self, scope: Scope) -> None:
        path: str = scope["path"]
        if path not in _METHOD_BY_PATH:
            raise _Refusal(
                404,
                BrokerProtocolError(f"no such Connect method: {path}", method=path.rsplit("/")[-1]),
                "unimplemented",
            )
        if scope["method"] != "POST":
            raise _Refusal(
                405,
                BrokerProtocolError(f"{scope['method']} is not allowed; Connect unary is POST"),
                "unimplemented",
            )
        headers = _headers(scope)
        content_type = headers.get("content-type", "").partition(";")[0].strip().lower()
        if content_type.removeprefix("application/") not in CODECS:
            raise _Refusal(
                415,
                BrokerProtocolError(
                    f"content type {content_type!r} is not supported; "
                    "send application/proto or application/json"
                ),
                "invalid_argument",
            )
        encoding = headers.get("content-encoding", "").strip().lower()
        if encoding not in ENCODINGS:
            raise _Refusal(
                415,
                BrokerProtocolError(f"content encoding {encoding!r} is not supported; use gzip"),
                "invalid_argument",
            )

    async def _read(self, scope: Scope, receive: Receive) -> bytes:
        declared = _headers(scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.limit_bytes:
            raise self._too_large(f"body of {declared} bytes")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit_bytes:
                raise self._too_large("body")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    def _too_large(self, what: str) -> _Refusal:
        error = PayloadTooLargeError(
            f"{what} is over the limit of {self.limit_bytes} bytes (MAX_BODY_BYTES)",
            limitBytes=self.limit_bytes,
        )
        return _Refusal(413, error, "resource_exhausted")


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}


def _replay(body: bytes, receive: Receive) -> Callable[[], Awaitable[AsgiMessage]]:
    """A receive() that hands over the buffered body, then waits for the disconnect."""
    delivered = False

    async def replay() -> AsgiMessage:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _send_error(send: Send, refusal: _Refusal) -> None:
    error = refusal.error
    detail = wire.error_detail(error)
    body = {
        "code": refusal.code,
        "message": f"{error.tag}: {error.message}",
        "details": [
            {
                "type": wire.ERROR_DETAIL_TYPE,
                "value": _unpadded_base64(detail.to_binary()),
                "debug": orjson.loads(detail.to_json()),
            }
        ],
    }
    await send(
        {
            "type": "http.response.start",
            "status": refusal.status,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": orjson.dumps(body)})


def _unpadded_base64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")
