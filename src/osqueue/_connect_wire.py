"""The Connect wire form of the queue's methods, shared by the broker and the client.

Every method has a REST body (the ``params`` of :class:`~osqueue.client.transport.Transport`)
and a REST answer. On the Connect wire both travel as the protobuf messages of
``proto/osqueue/v1/queue.proto``. This module turns one into the other in both directions,
and osqueue errors into Connect errors and back, so that a Connect call means exactly what
the same REST call means:

* client: :func:`encode_params`, then :func:`decode_response` or :func:`error_from_connect`;
* broker: :func:`decode_request`, then :func:`encode_result` or :func:`error_code` and
  :func:`error_detail`.

Payloads travel as bytes holding their JSON text. The broker parses them with
:func:`~osqueue.broker.validation.parse_body`, so they meet the same strict rules as REST.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from protobuf import Message

from osqueue._proto.osqueue.v1 import queue_pb as pb
from osqueue.errors import BrokerProtocolError, OsqueueError, TransportRequestError, error_from_body
from osqueue.model import decode_json, encode_json

__all__ = [
    "RPCS",
    "SERVICE",
    "Rpc",
    "decode_request",
    "decode_response",
    "encode_params",
    "encode_result",
    "error_code",
    "error_detail",
    "error_from_connect",
    "splice_batch",
]

SERVICE: Final = "osqueue.v1.QueueService"
ERROR_DETAIL_TYPE: Final = "osqueue.v1.ErrorDetail"


@dataclass(frozen=True, slots=True)
class Rpc:
    """One RPC of the service: its name and its request and response messages."""

    name: str
    request: type[Message]
    response: type[Message]

    @property
    def path(self) -> str:
        return f"/{SERVICE}/{self.name}"


#: The transport interface's method names and their RPCs.
RPCS: Final[dict[str, Rpc]] = {
    "submitJob": Rpc("SubmitJob", pb.SubmitJobRequest, pb.SubmitJobResponse),
    "submitBatch": Rpc("SubmitBatch", pb.SubmitBatchRequest, pb.SubmitBatchResponse),
    "claimJob": Rpc("ClaimJob", pb.ClaimJobRequest, pb.ClaimJobResponse),
    "heartbeat": Rpc("Heartbeat", pb.HeartbeatRequest, pb.HeartbeatResponse),
    "completeJob": Rpc("CompleteJob", pb.CompleteJobRequest, pb.CompleteJobResponse),
    "failJob": Rpc("FailJob", pb.FailJobRequest, pb.FailJobResponse),
    "getStats": Rpc("GetStats", pb.GetStatsRequest, pb.GetStatsResponse),
    "listJobs": Rpc("ListJobs", pb.ListJobsRequest, pb.ListJobsResponse),
    "getJob": Rpc("GetJob", pb.GetJobRequest, pb.GetJobResponse),
    "cancelJob": Rpc("CancelJob", pb.CancelJobRequest, pb.CancelJobResponse),
    "listDead": Rpc("ListDead", pb.ListDeadRequest, pb.ListDeadResponse),
    "requeueDead": Rpc("RequeueDead", pb.RequeueDeadRequest, pb.RequeueDeadResponse),
    "purgeDead": Rpc("PurgeDead", pb.PurgeDeadRequest, pb.PurgeDeadResponse),
}

# -- scalar fields ------------------------------------------------------------------------

I32: Final = (-(2**31), 2**31 - 1)
I64: Final = (-(2**63), 2**63 - 1)


@dataclass(frozen=True, slots=True)
class _Field:
    proto: str
    rest: str
    kind: str  # "str", "strs", "i32" or "i64"

    def fits(self, value: Any) -> bool:
        if self.kind == "str":
            return isinstance(value, str)
        if self.kind == "strs":
            return isinstance(value, list) and all(isinstance(v, str) for v in value)
        low, high = I32 if self.kind == "i32" else I64
        return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high

    def check(self, value: Any) -> Any:
        """``value`` if it fits the field, else the BrokerProtocolError REST would answer."""
        if self.fits(value):
            return value
        if self.kind == "str":
            raise BrokerProtocolError(f"{self.rest} must be a string, got {type(value).__name__}")
        if self.kind == "strs":
            raise BrokerProtocolError(f"{self.rest} must be a list of strings")
        if isinstance(value, bool) or not isinstance(value, int):
            raise BrokerProtocolError(f"{self.rest} must be an integer, got {value!r:.50}")
        low, high = I32 if self.kind == "i32" else I64
        raise BrokerProtocolError(f"{self.rest} must be between {low} and {high}, got {value}")


def _fields(*specs: tuple[str, str, str]) -> tuple[_Field, ...]:
    return tuple(_Field(*spec) for spec in specs)


_LEASE = _fields(
    ("job_id", "jobId", "str"), ("worker_id", "workerId", "str"), ("attempt", "attempt", "i32")
)
_REQUEST_FIELDS: Final[dict[str, tuple[_Field, ...]]] = {
    "submitJob": _fields(
        ("max_attempts", "maxAttempts", "i32"),
        ("type", "type", "str"),
        ("delay_ms", "delayMs", "i64"),
        ("run_at", "runAt", "i64"),
        ("priority", "priority", "i32"),
        ("idempotency_key", "idempotencyKey", "str"),
    ),
    "claimJob": _fields(
        ("worker_id", "workerId", "str"), ("types", "types", "strs"), ("wait_ms", "waitMs", "i32")
    ),
    "heartbeat": _LEASE,
    "completeJob": _LEASE,
    "failJob": _LEASE
    + _fields(
        ("error", "error", "str"),
        ("retry_delay_ms", "retryDelayMs", "i64"),
        ("reason", "reason", "str"),
    ),
    "getJob": _fields(("job_id", "jobId", "str")),
    "cancelJob": _fields(("job_id", "jobId", "str")),
    "requeueDead": _fields(("job_ids", "jobIds", "strs"), ("type", "type", "str")),
}
_STATS = _fields(
    ("total", "total", "i32"),
    ("unclaimed", "unclaimed", "i32"),
    ("in_progress", "inProgress", "i32"),
    ("broker_address", "brokerAddress", "str"),
    ("completed_total", "completedTotal", "i64"),
    ("dead", "dead", "i32"),
    ("dead_total", "deadTotal", "i64"),
)
# ListJobsResponse keeps the TypeScript int32 for completed_total (field 5).
_LIST_STATS = tuple(
    _Field(f.proto, f.rest, "i32") if f.proto == "completed_total" else f for f in _STATS
)
# Job fields every job has, those absent from a job until set, and the optional ones.
_JOB_ALWAYS = _fields(
    ("id", "id", "str"),
    ("status", "status", "str"),
    ("created_at", "createdAt", "i64"),
    ("attempts", "attempts", "i32"),
    ("max_attempts", "maxAttempts", "i32"),
)
_JOB_SOMETIMES = _fields(
    ("type", "type", "str"), ("worker_id", "workerId", "str"), ("heartbeat", "heartbeat", "i64")
)
_JOB_OPTIONAL = _fields(
    ("run_at", "runAt", "i64"),
    ("priority", "priority", "i32"),
    ("last_error", "lastError", "str"),
    ("idempotency_key", "idempotencyKey", "str"),
    ("reason", "reason", "str"),
    ("dead_at", "deadAt", "i64"),
)
_JOB_KNOWN = frozenset(f.rest for f in _JOB_ALWAYS + _JOB_SOMETIMES + _JOB_OPTIONAL) | {"payload"}


def _clamp(value: Any, kind: str) -> Any:
    """Counters that outgrow a TypeScript-era int32 field are capped, not refused."""
    if kind in ("i32", "i64") and isinstance(value, int) and not isinstance(value, bool):
        low, high = I32 if kind == "i32" else I64
        return min(max(value, low), high)
    return value


def _to_message(cls: type[Message], fields: tuple[_Field, ...], body: dict[str, Any]) -> Any:
    """A message from the REST-named values of ``body`` (missing or None: left unset)."""
    kwargs = {f.proto: f.check(body[f.rest]) for f in fields if body.get(f.rest) is not None}
    return cls(**kwargs)


def _from_message(message: Any, fields: tuple[_Field, ...]) -> dict[str, Any]:
    """The REST-named values of the fields ``message`` has (proto3: set or not default)."""
    return {f.rest: _plain(getattr(message, f.proto)) for f in fields if message.has_field(f.proto)}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, list) else value


def _parse_payload(raw: bytes) -> Any:
    # Imported here: the client side of this module must not need the broker package.
    from osqueue.broker.validation import parse_body

    try:
        return parse_body(raw)
    except BrokerProtocolError as exc:
        raise BrokerProtocolError(f"payload: {exc.message}") from exc


# -- client: REST body -> request message --------------------------------------------------


def _params(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BrokerProtocolError(f"params must be a JSON object, got {type(value).__name__}")
    return value


def _submit_request(body: Any) -> Any:
    body = _params(body)
    request = _to_message(pb.SubmitJobRequest, _REQUEST_FIELDS["submitJob"], body)
    if "payload" in body:
        request.payload = encode_json(body["payload"])
    return request


def encode_params(method: str, params: dict[str, Any]) -> tuple[Any, dict[int, dict[str, Any]]]:
    """The request message of ``method`` for the REST body ``params``.

    The second item is only for ``submitBatch``: the error bodies of the jobs that could not
    be encoded, by position, to put back with :func:`splice_batch`. Raises
    BrokerProtocolError where the broker would refuse the body for a wrong type.
    """
    params = _params(params)
    if method == "submitJob":
        return _submit_request(params), {}
    if method == "submitBatch":
        jobs = params.get("jobs")
        if not isinstance(jobs, list):
            raise BrokerProtocolError('batch body must be {"jobs": [submit bodies]}')
        encoded: list[Any] = []
        refused: dict[int, dict[str, Any]] = {}
        for index, job in enumerate(jobs):
            try:
                encoded.append(_submit_request(job))
            except BrokerProtocolError as exc:
                refused[index] = exc.to_body()
        return pb.SubmitBatchRequest(jobs=encoded), refused
    rpc = RPCS[method]
    request = _to_message(rpc.request, _REQUEST_FIELDS.get(method, ()), params)
    if method == "requeueDead" and params.get("jobIds") is not None:
        request.only_listed = True
    return request, {}


def splice_batch(
    results: list[dict[str, Any]], refused: dict[int, dict[str, Any]]
) -> list[dict[str, Any]]:
    """Put the refused jobs' errors back among the results, in submission order."""
    if not refused:
        return results
    answered = iter(results)
    total = len(results) + len(refused)
    return [{"error": refused[i]} if i in refused else next(answered) for i in range(total)]


# -- broker: request message -> REST body --------------------------------------------------


def _submit_body(request: Any) -> dict[str, Any]:
    body = _from_message(request, _REQUEST_FIELDS["submitJob"])
    if request.payload:
        body["payload"] = _parse_payload(request.payload)
    return body


def decode_request(method: str, request: Any) -> tuple[dict[str, Any], dict[int, dict[str, Any]]]:
    """The REST body of a request message (and, for ``submitBatch``, the refused jobs)."""
    if method == "submitJob":
        return _submit_body(request), {}
    if method == "submitBatch":
        jobs: list[dict[str, Any]] = []
        refused: dict[int, dict[str, Any]] = {}
        for index, job in enumerate(request.jobs):
            try:
                jobs.append(_submit_body(job))
            except OsqueueError as exc:
                refused[index] = exc.to_body()
        return {"jobs": jobs}, refused
    body = _from_message(request, _REQUEST_FIELDS.get(method, ()))
    if method == "requeueDead" and request.only_listed:
        body.setdefault("jobIds", [])
    return body, {}


# -- broker: REST answer -> response message -----------------------------------------------


def _job_info(job: dict[str, Any]) -> Any:
    """A job of the state document as JobInfo; fields of unexpected shape go to ``extra``."""
    kwargs: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for field in _JOB_ALWAYS + _JOB_SOMETIMES + _JOB_OPTIONAL:
        value = job.get(field.rest)
        if value is None:
            continue
        if field.fits(value):
            kwargs[field.proto] = value
        else:
            extra[field.rest] = value
    extra.update((k, v) for k, v in job.items() if k not in _JOB_KNOWN)
    info = pb.JobInfo(payload=encode_json(job.get("payload")), **kwargs)
    if extra:
        info.extra = encode_json(extra)
    return info


def _error_message(body: dict[str, Any]) -> Any:
    fields = {k: v for k, v in body.items() if k not in ("_tag", "message")}
    return pb.ErrorDetail(
        tag=str(body.get("_tag", "")),
        message=str(body.get("message", "")),
        fields=encode_json(fields) if fields else b"",
    )


def _batch_result(item: dict[str, Any]) -> Any:
    if "error" in item:
        return pb.SubmitBatchResult(error=_error_message(item["error"]))
    return pb.SubmitBatchResult(job_id=item["jobId"], duplicate=bool(item.get("duplicate")))


def _stats_kwargs(result: dict[str, Any], fields: tuple[_Field, ...]) -> dict[str, Any]:
    return {f.proto: _clamp(result[f.rest], f.kind) for f in fields if f.rest in result}


def encode_result(method: str, result: dict[str, Any]) -> Any:
    """The response message of ``method`` for the REST answer ``result``."""
    rpc = RPCS[method]
    encoder = _RESULT_ENCODERS.get(method)
    return encoder(result) if encoder is not None else rpc.response()


def _encode_claim(result: dict[str, Any]) -> Any:
    if "jobId" not in result:
        return pb.ClaimJobResponse()
    return pb.ClaimJobResponse(
        job_id=result["jobId"],
        payload=encode_json(result.get("payload")),
        type=result.get("type") or "",
        attempts=_clamp(result.get("attempts", 0), "i32"),
        max_attempts=_clamp(result.get("maxAttempts", 0), "i32"),
        timeout_ms=_clamp(result.get("timeoutMs", 0), "i64"),
    )


_RESULT_ENCODERS: Final[dict[str, Callable[[dict[str, Any]], Any]]] = {
    "submitJob": lambda r: pb.SubmitJobResponse(
        job_id=r["jobId"], duplicate=bool(r.get("duplicate"))
    ),
    "submitBatch": lambda r: pb.SubmitBatchResponse(
        results=[_batch_result(item) for item in r["results"]]
    ),
    "claimJob": _encode_claim,
    "getStats": lambda r: pb.GetStatsResponse(**_stats_kwargs(r, _STATS)),
    "listJobs": lambda r: pb.ListJobsResponse(
        jobs=[_job_info(job) for job in r["jobs"]], **_stats_kwargs(r, _LIST_STATS)
    ),
    "getJob": lambda r: pb.GetJobResponse(job=_job_info(r)),
    "listDead": lambda r: pb.ListDeadResponse(
        jobs=[_job_info(job) for job in r["jobs"]], dead_total=_clamp(r["deadTotal"], "i64")
    ),
    "requeueDead": lambda r: pb.RequeueDeadResponse(requeued=_clamp(r["requeued"], "i32")),
    "purgeDead": lambda r: pb.PurgeDeadResponse(purged=_clamp(r["purged"], "i32")),
}

# -- client: response message -> REST answer -----------------------------------------------


def _job_dict(info: Any, *, listed: bool) -> dict[str, Any]:
    """A JobInfo as REST shows it: GET /v1/jobs fills every base field (``listed``), the
    other answers show the fields the job has."""
    job = {f.rest: getattr(info, f.proto) for f in _JOB_ALWAYS}
    for field in _JOB_SOMETIMES:
        if listed or info.has_field(field.proto):
            job[field.rest] = getattr(info, field.proto)
    job.update(_from_message(info, _JOB_OPTIONAL))
    job["payload"] = decode_json(info.payload) if info.payload else None
    if info.extra:
        job.update(decode_json(info.extra))
    return job


def _error_body(detail: Any) -> dict[str, Any]:
    fields = decode_json(detail.fields) if detail.fields else {}
    return {**fields, "_tag": detail.tag, "message": detail.message}


def _decode_claim(response: Any) -> dict[str, Any]:
    if not response.has_field("job_id"):
        return {}
    return {
        "jobId": response.job_id,
        "payload": decode_json(response.payload) if response.payload else None,
        "type": response.type or None,
        "attempts": response.attempts,
        "maxAttempts": response.max_attempts,
        "timeoutMs": response.timeout_ms,
    }


def _decode_submit(response: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"jobId": response.job_id}
    if response.duplicate:
        body["duplicate"] = True
    return body


def _decode_batch_item(item: Any) -> dict[str, Any]:
    if item.has_field("error"):
        return {"error": _error_body(item.error)}
    return _decode_submit(item)


def _stats_dict(response: Any, fields: tuple[_Field, ...]) -> dict[str, Any]:
    return {f.rest: getattr(response, f.proto) for f in fields}


_RESULT_DECODERS: Final[dict[str, Callable[[Any], dict[str, Any]]]] = {
    "submitJob": _decode_submit,
    "submitBatch": lambda r: {"results": [_decode_batch_item(i) for i in r.results]},
    "claimJob": _decode_claim,
    "getStats": lambda r: _stats_dict(r, _STATS),
    "listJobs": lambda r: {
        **_stats_dict(r, _LIST_STATS),
        "jobs": [_job_dict(j, listed=True) for j in r.jobs],
    },
    "getJob": lambda r: _job_dict(r.job, listed=False) if r.job is not None else {},
    "listDead": lambda r: {
        "jobs": [_job_dict(j, listed=False) for j in r.jobs],
        "deadTotal": r.dead_total,
    },
    "requeueDead": lambda r: {"requeued": r.requeued},
    "purgeDead": lambda r: {"purged": r.purged},
}


def decode_response(method: str, response: Any) -> dict[str, Any]:
    """The REST answer for the response message of ``method`` (``{}`` where REST has 204)."""
    decoder = _RESULT_DECODERS.get(method)
    return decoder(response) if decoder is not None else {}


# -- errors --------------------------------------------------------------------------------

#: Connect code of each error the broker answers with; anything else is ``internal``.
CODES: Final[dict[str, str]] = {
    "BrokerProtocolError": "invalid_argument",
    "AuthenticationError": "unauthenticated",
    "LeaseLostError": "failed_precondition",
    "BrokerLeadershipError": "unavailable",
    "StorageBackendError": "unavailable",
    "JobNotFoundError": "not_found",
    "PayloadTooLargeError": "resource_exhausted",
    "EngineStateError": "internal",
    "CASConflictError": "aborted",
}
# Errors without an osqueue detail (a proxy, a library-level refusal) by their code.
_UNTAGGED: Final[dict[str, str]] = {
    "invalid_argument": "BrokerProtocolError",
    "unimplemented": "BrokerProtocolError",
    "unauthenticated": "AuthenticationError",
    "resource_exhausted": "PayloadTooLargeError",
}


def error_code(error: OsqueueError) -> str:
    return CODES.get(error.tag, "internal")


def error_detail(error: OsqueueError) -> Any:
    """The ErrorDetail that carries ``error`` through a Connect error."""
    return _error_message(error.to_body())


def error_from_connect(body: Any, *, status: int, method: str = "", path: str = "") -> OsqueueError:
    """The osqueue error for a Connect error body ``{"code", "message", "details"}``.

    The osqueue detail wins; then a REST-style ``_tag`` body (the broker's auth layer and
    unknown paths answer those); then the code alone.
    """
    if isinstance(body, dict) and "_tag" in body:
        return error_from_body(body, status=status, method=method, path=path)
    if not isinstance(body, dict) or not isinstance(body.get("code"), str):
        return error_from_body(None, status=status, method=method, path=path)
    details = body.get("details")
    for detail in details if isinstance(details, list) else ():
        if isinstance(detail, dict) and detail.get("type") == ERROR_DETAIL_TYPE:
            try:
                raw = base64.b64decode(str(detail.get("value", "")) + "==")
                return error_from_body(
                    _error_body(pb.ErrorDetail.from_binary(raw)),
                    status=status,
                    method=method,
                    path=path,
                )
            except (binascii.Error, ValueError, TypeError, BrokerProtocolError):
                break
    code = body["code"]
    message = body.get("message") if isinstance(body.get("message"), str) else code
    tag = _UNTAGGED.get(code)
    if tag is not None:
        return error_from_body(
            {"_tag": tag, "message": message}, status=status, method=method, path=path
        )
    return TransportRequestError(
        f"{message} (Connect code {code})", method=method, path=path, status=status, remote_tag=code
    )
