"""The Connect schema and its conversions: the generated code matches the .proto, the field
numbers match the contract (section 7), and REST bodies survive the trip through messages."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from osqueue import _connect_wire as wire
from osqueue._proto.osqueue.v1 import queue_pb as pb
from osqueue.errors import (
    AuthenticationError,
    BrokerLeadershipError,
    BrokerProtocolError,
    LeaseLostError,
    PayloadTooLargeError,
    TransportRequestError,
)

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ROOT / "src" / "osqueue" / "_proto"


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*.py"))
        if "__pycache__" not in path.parts
    }


def test_checked_in_code_is_what_the_proto_generates(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    fresh, checked_in = _tree(tmp_path), _tree(GENERATED)
    assert sorted(fresh) == sorted(checked_in)
    stale = [name for name in fresh if fresh[name] != checked_in[name]]
    assert stale == [], f"run scripts/gen_proto.py: {stale} differ from proto/"


# The contract's table, section 7: (field, number, type, label). Nothing here may change.
CONTRACT: dict[str, list[tuple[str, int, str, str]]] = {
    "SubmitJobRequest": [
        ("payload", 1, "BYTES", ""),
        ("max_attempts", 2, "INT32", "optional"),
        ("type", 3, "STRING", ""),
    ],
    "SubmitJobResponse": [("job_id", 1, "STRING", "")],
    "ClaimJobRequest": [("worker_id", 1, "STRING", ""), ("types", 2, "STRING", "repeated")],
    "ClaimJobResponse": [
        ("job_id", 1, "STRING", "optional"),
        ("payload", 2, "BYTES", "optional"),
        ("type", 3, "STRING", ""),
    ],
    "HeartbeatRequest": [("job_id", 1, "STRING", ""), ("worker_id", 2, "STRING", "")],
    "CompleteJobRequest": [("job_id", 1, "STRING", ""), ("worker_id", 2, "STRING", "")],
    "HeartbeatResponse": [],
    "CompleteJobResponse": [],
    "GetStatsRequest": [],
    "ListJobsRequest": [],
    "GetStatsResponse": [
        ("total", 1, "INT32", ""),
        ("unclaimed", 2, "INT32", ""),
        ("in_progress", 3, "INT32", ""),
        ("broker_address", 4, "STRING", ""),
    ],
    "JobInfo": [
        ("id", 1, "STRING", ""),
        ("status", 2, "STRING", ""),
        ("payload", 3, "BYTES", ""),
        ("type", 4, "STRING", ""),
        ("worker_id", 5, "STRING", ""),
        ("created_at", 6, "INT64", ""),
        ("attempts", 7, "INT32", ""),
        ("max_attempts", 8, "INT32", ""),
        ("heartbeat", 9, "INT64", ""),
    ],
    "ListJobsResponse": [
        ("jobs", 1, "MESSAGE", "repeated"),
        ("total", 2, "INT32", ""),
        ("unclaimed", 3, "INT32", ""),
        ("in_progress", 4, "INT32", ""),
        ("completed_total", 5, "INT32", ""),
        ("broker_address", 6, "STRING", ""),
    ],
}
EMPTY_BY_CONTRACT = {
    "HeartbeatResponse",
    "CompleteJobResponse",
    "GetStatsRequest",
    "ListJobsRequest",
}


def _shape(field: Any) -> tuple[str, int, str, str]:
    proto = field.proto
    label = "repeated" if proto.label.name == "REPEATED" else ""
    if proto.proto3_optional:
        label = "optional"
    return (field.name, field.number, proto.type.name, label)


@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_field_numbers_keep_the_contract(name: str) -> None:
    fields = [_shape(f) for f in getattr(pb, name).desc().fields]
    contract = CONTRACT[name]
    assert fields[: len(contract)] == contract
    if name in EMPTY_BY_CONTRACT:
        assert fields == []
    newest = max((n for _, n, _, _ in contract), default=0)
    assert all(number > newest for _, number, _, _ in fields[len(contract) :])


def test_service_keeps_the_original_rpcs() -> None:
    service = pb.desc().services[0]
    assert service.type_name == "osqueue.v1.QueueService"
    methods = {m.name: (m.input.name, m.output.name) for m in service.methods}
    for rpc in ("SubmitJob", "ClaimJob", "Heartbeat", "CompleteJob", "GetStats", "ListJobs"):
        assert methods[rpc] == (f"{rpc}Request", f"{rpc}Response")
    assert {rpc.name for rpc in wire.RPCS.values()} == set(methods)


# -- REST body -> message -> REST body -----------------------------------------------------

ROUND_TRIPS: list[tuple[str, dict[str, Any]]] = [
    ("submitJob", {"payload": {"a": [1, -0.0, "\u2028"]}}),
    (
        "submitJob",
        {
            "payload": None,
            "type": "t",
            "maxAttempts": 4,
            "delayMs": 0,
            "runAt": 2**50,
            "priority": -2,
            "idempotencyKey": "k",
        },
    ),
    ("claimJob", {"workerId": "w", "types": ["a", "b"], "waitMs": 0}),
    ("heartbeat", {"jobId": "j", "workerId": "w", "attempt": 2}),
    ("completeJob", {"jobId": "j", "workerId": "w"}),
    (
        "failJob",
        {
            "jobId": "j",
            "workerId": "w",
            "attempt": 1,
            "error": "boom",
            "retryDelayMs": 0,
            "reason": "failed",
        },
    ),
    ("getJob", {"jobId": "j"}),
    ("cancelJob", {"jobId": "j"}),
    ("requeueDead", {}),
    ("requeueDead", {"jobIds": []}),
    ("requeueDead", {"jobIds": ["a"], "type": "t"}),
    ("getStats", {}),
    ("listJobs", {}),
    ("listDead", {}),
    ("purgeDead", {}),
]


@pytest.mark.parametrize(("method", "params"), ROUND_TRIPS)
def test_request_bodies_survive_both_codecs(method: str, params: dict[str, Any]) -> None:
    request, refused = wire.encode_params(method, params)
    assert refused == {}
    rpc = wire.RPCS[method]
    for decoded in (
        rpc.request.from_binary(request.to_binary()),
        rpc.request.from_json(request.to_json()),
    ):
        assert wire.decode_request(method, decoded) == (params, {})


def test_batch_refusals_are_spliced_back_in_order() -> None:
    jobs = [{"payload": 1}, {"payload": 2, "priority": "high"}, {"payload": 3}, "not a job"]
    request, refused = wire.encode_params("submitBatch", {"jobs": jobs})
    assert len(request.jobs) == 2 and sorted(refused) == [1, 3]
    assert refused[1]["_tag"] == "BrokerProtocolError" and "priority" in refused[1]["message"]
    spliced = wire.splice_batch([{"jobId": "a"}, {"jobId": "c"}], refused)
    assert [next(iter(item)) for item in spliced] == ["jobId", "error", "jobId", "error"]
    assert spliced[2] == {"jobId": "c"}


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"payload": 1, "maxAttempts": "3"}, "maxAttempts"),
        ({"payload": 1, "maxAttempts": True}, "maxAttempts"),
        ({"payload": 1, "maxAttempts": 2**40}, "maxAttempts"),
        ({"payload": 1, "type": 5}, "type"),
        ({"payload": {"n": 2**64}}, "JSON"),
    ],
)
def test_values_a_message_cannot_hold_are_protocol_errors(
    params: dict[str, Any], field: str
) -> None:
    with pytest.raises(BrokerProtocolError, match=field):
        wire.encode_params("submitJob", params)


def test_broker_parses_payload_text_strictly() -> None:
    request = pb.SubmitJobRequest(payload=b'{"n": 123456789012345678901234567890}')
    with pytest.raises(BrokerProtocolError, match=r"payload: integer at \$\.n"):
        wire.decode_request("submitJob", request)
    with pytest.raises(BrokerProtocolError, match=r"payload: .*not valid JSON"):
        wire.decode_request("submitJob", pb.SubmitJobRequest(payload=b"{nope"))


def test_results_survive_the_trip() -> None:
    job = {
        "id": "j",
        "status": "dead",
        "payload": {"x": [1.5, None]},
        "createdAt": 10,
        "attempts": 3,
        "maxAttempts": 3,
        "type": "t",
        "workerId": "w",
        "lastError": "e",
        "reason": "exhausted",
        "deadAt": 20,
        "futureField": {"kept": True},
    }
    response = wire.encode_result("getJob", job)
    again = pb.GetJobResponse.from_binary(response.to_binary())
    assert wire.decode_response("getJob", again) == job

    stats = {
        "total": 1,
        "unclaimed": 1,
        "inProgress": 0,
        "completedTotal": 2**40,
        "brokerAddress": "h:1",
        "dead": 0,
        "deadTotal": 0,
    }
    listed = {**stats, "jobs": [{**job, "heartbeat": 0}]}
    decoded = wire.decode_response("listJobs", wire.encode_result("listJobs", listed))
    # ListJobsResponse keeps the TypeScript int32 for completed_total: capped, not refused.
    assert decoded == {**listed, "completedTotal": 2**31 - 1}
    assert wire.decode_response("getStats", wire.encode_result("getStats", stats)) == stats
    assert wire.decode_response("claimJob", wire.encode_result("claimJob", {})) == {}
    assert wire.decode_response("heartbeat", wire.encode_result("heartbeat", {})) == {}


def test_connect_errors_become_osqueue_errors() -> None:
    lost = LeaseLostError("gone", jobId="j")
    detail = wire.error_detail(lost)
    body = {
        "code": "failed_precondition",
        "message": "LeaseLostError: gone",
        "details": [
            {
                "type": "osqueue.v1.ErrorDetail",
                "value": base64.b64encode(detail.to_binary()).decode().rstrip("="),
            }
        ],
    }
    error = wire.error_from_connect(body, status=400)
    assert isinstance(error, LeaseLostError) and error.fields == {"jobId": "j"}
    assert wire.error_code(lost) == "failed_precondition"
    assert wire.error_code(BrokerLeadershipError("x", leader="h:1")) == "unavailable"

    untagged = [
        ("unauthenticated", AuthenticationError),
        ("resource_exhausted", PayloadTooLargeError),
        ("invalid_argument", BrokerProtocolError),
        ("unimplemented", BrokerProtocolError),
        ("data_loss", TransportRequestError),
    ]
    for code, cls in untagged:
        assert isinstance(wire.error_from_connect({"code": code}, status=400), cls)
    rest_body = {"_tag": "AuthenticationError", "message": "token"}
    assert isinstance(wire.error_from_connect(rest_body, status=401), AuthenticationError)
    assert isinstance(wire.error_from_connect(b"junk", status=502), TransportRequestError)
