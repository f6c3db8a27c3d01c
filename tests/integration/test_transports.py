"""One end-to-end suite for the three transports: REST, WebSocket and Connect (both codecs).

Every test that takes ``transport`` runs once per transport against a real broker on
loopback, through the transport interface the clients use, and asserts the same answers and
the same error classes. The malformed-input tests speak each wire by hand.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import orjson
import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.asyncio.server import ServerConnection
from websockets.asyncio.server import serve as ws_serve

from osqueue import _connect_wire as wire
from osqueue._proto.osqueue.v1 import queue_pb as pb
from osqueue.broker.server import BrokerConfig, BrokerHandle, run_broker_in_background
from osqueue.client import AsyncOsqueueClient
from osqueue.client.connect import ConnectTransport
from osqueue.client.rest import RestTransport
from osqueue.client.transport import Transport
from osqueue.client.ws import WebSocketTransport
from osqueue.engine import EngineConfig
from osqueue.errors import (
    AuthenticationError,
    BrokerLeadershipError,
    BrokerProtocolError,
    JobNotFoundError,
    LeaseLostError,
    OsqueueError,
    PayloadTooLargeError,
    TransportConnectionError,
    error_from_body,
)
from osqueue.storage.memory import MemoryStorage
from osqueue.worker import JobContext, Worker

TRANSPORTS = ["rest", "ws", "connect", "connect-json"]
WAIT_S = 10.0  # upper bound on any wait; the tests normally finish in milliseconds
LIMIT_BYTES = 64 * 1024
TOKEN = "s3cret-token"

Call = Callable[[str, dict[str, Any]], Awaitable[Any]]


def config(*, job_timeout_ms: int = 30_000, token: str | None = None) -> BrokerConfig:
    # No leader heartbeat during a test, so the write counter moves only for requests.
    engine = EngineConfig(
        commit_interval_ms=2, job_timeout_ms=job_timeout_ms, broker_heartbeat_interval_ms=600_000
    )
    return BrokerConfig(
        host="127.0.0.1", port=0, engine=engine, max_body_bytes=LIMIT_BYTES, token=token
    )


def make_transport(name: str, url: str, token: str | None = None) -> Transport:
    if name == "rest":
        return RestTransport(url, token, timeout_s=WAIT_S)
    if name == "ws":
        return WebSocketTransport(url, token, timeout_s=WAIT_S)
    codec = "json" if name == "connect-json" else "proto"
    return ConnectTransport(url, codec, token, timeout_s=WAIT_S)


@pytest.fixture
async def broker() -> AsyncIterator[BrokerHandle]:
    async with run_broker_in_background(MemoryStorage(), config()) as handle:
        yield handle


@pytest.fixture(params=TRANSPORTS)
def transport_name(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
async def transport(broker: BrokerHandle, transport_name: str) -> AsyncIterator[Transport]:
    made = make_transport(transport_name, broker.url)
    try:
        yield made
    finally:
        await made.aclose()


@pytest.fixture
def call(transport: Transport) -> Call:
    return transport.call


@pytest.fixture
async def rest(broker: BrokerHandle) -> AsyncIterator[RestTransport]:
    made = RestTransport(broker.url, timeout_s=WAIT_S)
    try:
        yield made
    finally:
        await made.aclose()


async def eventually(
    check: Callable[[], Awaitable[bool]], what: str, timeout_s: float = WAIT_S
) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


# -- every operation -----------------------------------------------------------------------


async def test_submit_claim_heartbeat_complete(call: Call) -> None:
    submitted = await call("submitJob", {"payload": {"n": 1}, "type": "email", "maxAttempts": 5})
    job_id = submitted["jobId"]
    assert submitted == {"jobId": job_id}

    job = await call("getJob", {"jobId": job_id})
    assert job["status"] == "unclaimed" and job["attempts"] == 0 and job["maxAttempts"] == 5
    assert job["payload"] == {"n": 1} and job["type"] == "email"
    assert "workerId" not in job and "heartbeat" not in job

    assert await call("claimJob", {"workerId": "w1", "types": ["other"]}) == {}
    claimed = await call("claimJob", {"workerId": "w1", "types": ["email"]})
    assert claimed == {
        "jobId": job_id,
        "payload": {"n": 1},
        "type": "email",
        "attempts": 1,
        "maxAttempts": 5,
        "timeoutMs": 30_000,  # the broker tells workers its job timeout
    }
    assert await call("heartbeat", {"jobId": job_id, "workerId": "w1", "attempt": 1}) == {}
    running = await call("getJob", {"jobId": job_id})
    assert running["status"] == "in_progress" and running["workerId"] == "w1"
    assert isinstance(running["heartbeat"], int) and running["heartbeat"] > 0

    assert await call("completeJob", {"jobId": job_id, "workerId": "w1", "attempt": 1}) == {}
    assert await call("claimJob", {"workerId": "w1"}) == {}
    stats = await call("getStats", {})
    assert stats == {
        "total": 0,
        "unclaimed": 0,
        "inProgress": 0,
        "completedTotal": 1,
        "brokerAddress": stats["brokerAddress"],
        "dead": 0,
        "deadTotal": 0,
    }
    assert stats["brokerAddress"].startswith("127.0.0.1:")
    with pytest.raises(JobNotFoundError):
        await call("getJob", {"jobId": job_id})


async def test_untyped_job_and_submit_options(call: Call) -> None:
    first = await call("submitJob", {"payload": None, "idempotencyKey": "k1", "priority": 7})
    again = await call("submitJob", {"payload": "other", "idempotencyKey": "k1"})
    assert again == {"jobId": first["jobId"], "duplicate": True}
    later = await call("submitJob", {"payload": 2, "delayMs": 60_000})

    claimed = await call("claimJob", {"workerId": "w"})
    assert claimed["jobId"] == first["jobId"]
    assert claimed["payload"] is None and claimed["type"] is None
    job = await call("getJob", {"jobId": later["jobId"]})
    assert job["runAt"] > job["createdAt"] and "type" not in job
    assert await call("claimJob", {"workerId": "w", "waitMs": 50}) == {}


async def test_batch_submit_answers_each_job_in_order(call: Call) -> None:
    answer = await call(
        "submitBatch",
        {
            "jobs": [
                {"payload": 1, "type": "a"},
                {"payload": 2, "maxAttempts": 0},
                {"payload": 3, "maxAttempts": "3"},
                {"type": "no payload"},
                {"payload": 5, "priority": 2},
            ]
        },
    )
    results = answer["results"]
    assert len(results) == 5
    assert set(results[0]) == {"jobId"} and set(results[4]) == {"jobId"}
    for refused in results[1:4]:
        assert refused["error"]["_tag"] == "BrokerProtocolError"
    assert "maxAttempts" in results[1]["error"]["message"]
    assert "maxAttempts" in results[2]["error"]["message"]
    assert "payload" in results[3]["error"]["message"]

    listed = await call("listJobs", {})
    assert listed["total"] == 2
    assert [j["payload"] for j in listed["jobs"]] == [1, 5]
    assert await call("submitBatch", {"jobs": []}) == {"results": []}
    with pytest.raises(BrokerProtocolError):
        await call("submitBatch", {"jobs": "not a list"})


async def test_fail_retry_dead_letters_requeue_and_purge(call: Call) -> None:
    retried = (await call("submitJob", {"payload": "r", "type": "r"}))["jobId"]
    await call("claimJob", {"workerId": "w", "types": ["r"]})
    failed = {"jobId": retried, "workerId": "w", "error": "boom", "retryDelayMs": 0}
    assert await call("failJob", failed) == {}
    job = await call("getJob", {"jobId": retried})
    assert (job["status"], job["lastError"], job["attempts"]) == ("unclaimed", "boom", 1)

    once = (await call("submitJob", {"payload": "x", "type": "once", "maxAttempts": 1}))["jobId"]
    await call("claimJob", {"workerId": "w", "types": ["once"]})
    await call("failJob", {"jobId": once, "workerId": "w", "error": "fatal"})
    dead = await call("getJob", {"jobId": once})
    assert (dead["status"], dead["reason"], dead["lastError"]) == ("dead", "exhausted", "fatal")
    listed = await call("listDead", {})
    assert listed["deadTotal"] == 1 and [j["id"] for j in listed["jobs"]] == [once]
    assert listed["jobs"][0]["deadAt"] >= listed["jobs"][0]["createdAt"]
    assert (await call("getStats", {}))["dead"] == 1

    assert await call("requeueDead", {"jobIds": []}) == {"requeued": 0}
    assert await call("requeueDead", {"jobIds": [once]}) == {"requeued": 1}
    claimed = await call("claimJob", {"workerId": "w", "types": ["once"]})
    assert (claimed["jobId"], claimed["attempts"]) == (once, 1)
    await call("failJob", {"jobId": once, "workerId": "w", "reason": "invalid_payload"})
    assert (await call("getJob", {"jobId": once}))["reason"] == "invalid_payload"
    assert await call("requeueDead", {"type": "nothing-has-this-type"}) == {"requeued": 0}
    assert await call("purgeDead", {}) == {"purged": 1}
    assert await call("listDead", {}) == {"jobs": [], "deadTotal": 2}


async def test_cancel_fences_the_worker(call: Call) -> None:
    job_id = (await call("submitJob", {"payload": 1}))["jobId"]
    await call("claimJob", {"workerId": "w"})
    assert await call("cancelJob", {"jobId": job_id}) == {}
    with pytest.raises(LeaseLostError):
        await call("heartbeat", {"jobId": job_id, "workerId": "w"})
    with pytest.raises(JobNotFoundError):
        await call("getJob", {"jobId": job_id})
    with pytest.raises(JobNotFoundError):
        await call("cancelJob", {"jobId": job_id})


async def test_answers_equal_the_rest_answers(call: Call, rest: RestTransport) -> None:
    """The inspection answers are the REST answers, field for field."""
    a = (await call("submitJob", {"payload": {"a": [1, 2.5, None]}, "type": "t"}))["jobId"]
    await call("submitJob", {"payload": "b", "priority": -3, "idempotencyKey": "key"})
    await call("submitJob", {"payload": "c", "delayMs": 60_000})
    await call("claimJob", {"workerId": "w", "types": ["t"]})
    d = (await call("submitJob", {"payload": "d", "type": "d", "maxAttempts": 1}))["jobId"]
    await call("claimJob", {"workerId": "w", "types": ["d"]})
    await call("failJob", {"jobId": d, "workerId": "w", "error": "e", "attempt": 1})

    for method, params in [
        ("getStats", {}),
        ("listJobs", {}),
        ("getJob", {"jobId": a}),
        ("getJob", {"jobId": d}),
        ("listDead", {}),
    ]:
        assert await call(method, params) == await rest.call(method, params), method


async def test_errors_raise_the_same_class(call: Call) -> None:
    with pytest.raises(LeaseLostError):
        await call("heartbeat", {"jobId": "no-such-job", "workerId": "w"})
    with pytest.raises(LeaseLostError):
        await call("completeJob", {"jobId": "no-such-job", "workerId": "w"})
    with pytest.raises(LeaseLostError):
        await call("failJob", {"jobId": "no-such-job", "workerId": "w"})
    with pytest.raises(JobNotFoundError) as not_found:
        await call("getJob", {"jobId": "no-such-job"})
    assert not_found.value.fields.get("jobId") == "no-such-job"
    for bad in [
        {},  # no payload
        {"payload": 1, "maxAttempts": 0},
        {"payload": 1, "maxAttempts": "3"},
        {"payload": 1, "maxAttempts": 3.5},
        {"payload": 1, "type": 123},
        {"payload": 1, "type": "t" * 10_000},
    ]:
        with pytest.raises(BrokerProtocolError):
            await call("submitJob", bad)
    with pytest.raises(BrokerProtocolError):
        await call("claimJob", {})
    with pytest.raises(BrokerProtocolError):
        await call("claimJob", {"workerId": "w", "types": "email"})
    with pytest.raises(BrokerProtocolError):
        await call("noSuchMethod", {})
    assert (await call("getStats", {}))["total"] == 0


async def test_wrong_token_is_an_authentication_error(transport_name: str) -> None:
    async with run_broker_in_background(MemoryStorage(), config(token=TOKEN)) as handle:
        for token in (None, "wrong"):
            anonymous = make_transport(transport_name, handle.url, token)
            try:
                with pytest.raises(AuthenticationError):
                    await anonymous.call("getStats", {})
            finally:
                await anonymous.aclose()
        allowed = make_transport(transport_name, handle.url, TOKEN)
        try:
            assert (await allowed.call("getStats", {}))["total"] == 0
        finally:
            await allowed.aclose()


async def test_standby_refuses_with_the_leaders_address(transport_name: str) -> None:
    store = MemoryStorage()
    leading = config()
    standby_config = BrokerConfig(
        host="127.0.0.1", port=0, standby=True, engine=leading.engine, heartbeat_timeout_ms=60_000
    )
    async with (
        run_broker_in_background(store, leading) as leader,
        run_broker_in_background(store, standby_config) as standby,
    ):

        async def standby_knows_the_leader() -> bool:
            return standby.broker.leader_address() == leader.broker.address

        await eventually(standby_knows_the_leader, "the standby to read the leader")
        made = make_transport(transport_name, standby.url)
        try:
            for method, params in [("getStats", {}), ("submitJob", {"payload": 1})]:
                with pytest.raises(BrokerLeadershipError) as refused:
                    await made.call(method, params)
                assert refused.value.fields["leader"] == leader.broker.address, method
        finally:
            await made.aclose()


# -- F04: a late complete after the lease expired ------------------------------------------


async def test_f04_late_heartbeat_and_complete_are_refused(transport_name: str) -> None:
    async with run_broker_in_background(MemoryStorage(), config(job_timeout_ms=1500)) as handle:
        call = make_transport(transport_name, handle.url)
        try:
            job_id = (await call.call("submitJob", {"payload": "j"}))["jobId"]
            first = await call.call("claimJob", {"workerId": "w1"})
            assert first["attempts"] == 1

            async def expired() -> bool:
                job = await call.call("getJob", {"jobId": job_id})
                return bool(job["status"] == "unclaimed")

            await eventually(expired, "the lease to expire")
            second = await call.call("claimJob", {"workerId": "w2"})
            assert (second["jobId"], second["attempts"]) == (job_id, 2)
            await call.call("heartbeat", {"jobId": job_id, "workerId": "w2"})

            with pytest.raises(LeaseLostError):
                await call.call("heartbeat", {"jobId": job_id, "workerId": "w1"})
            with pytest.raises(LeaseLostError):
                await call.call("completeJob", {"jobId": job_id, "workerId": "w1"})
            await call.call("completeJob", {"jobId": job_id, "workerId": "w2", "attempt": 2})
            assert (await call.call("getStats", {}))["completedTotal"] == 1

            # Variant: the same worker id reclaims; the first attempt's complete is fenced.
            again = (await call.call("submitJob", {"payload": "k"}))["jobId"]
            await call.call("claimJob", {"workerId": "w1"})

            async def again_expired() -> bool:
                job = await call.call("getJob", {"jobId": again})
                return bool(job["status"] == "unclaimed")

            await eventually(again_expired, "the second lease to expire")
            reclaimed = await call.call("claimJob", {"workerId": "w1"})
            assert reclaimed["attempts"] == 2
            stale = {"jobId": again, "workerId": "w1", "attempt": 1}
            with pytest.raises(LeaseLostError):
                await call.call("completeJob", stale)
            await call.call("completeJob", {**stale, "attempt": 2})
            assert (await call.call("getStats", {}))["completedTotal"] == 2
        finally:
            await call.aclose()


# -- payload fidelity ----------------------------------------------------------------------


def _nested(depth: int) -> Any:
    value: Any = "bottom"
    for level in range(depth):
        value = {"d": value} if level % 2 else [value]
    return value


PAYLOADS: list[Any] = [
    -0.0,
    0.1,
    1e308,
    2**64 - 1,
    -(2**63),
    "h\u00e9llo \u2713 \u65e5\u672c \U0001f600",
    "line\u2028separator\u2029paragraph",
    "nul\u0000inside",
    {"": "empty key", "\u043a\u043b\u044e\u0447": [True, False, None]},
    _nested(100),
    None,
    [],
    "",
]


async def test_payloads_round_trip_exactly(call: Call) -> None:
    ids = [(await call("submitJob", {"payload": p}))["jobId"] for p in PAYLOADS]
    listed = {job["id"]: job["payload"] for job in (await call("listJobs", {}))["jobs"]}
    for job_id, sent in zip(ids, PAYLOADS, strict=True):
        expected = orjson.dumps(sent)
        claimed = await call("claimJob", {"workerId": "w"})
        assert claimed["jobId"] == job_id
        assert orjson.dumps(claimed["payload"]) == expected
        assert orjson.dumps(listed[job_id]) == expected
        got = (await call("getJob", {"jobId": job_id}))["payload"]
        assert orjson.dumps(got) == expected


async def test_integer_beyond_64_bits_is_refused_before_sending(call: Call) -> None:
    with pytest.raises(BrokerProtocolError):
        await call("submitJob", {"payload": {"n": 2**64}})


BIG = b"123456789012345678901234567890"


async def raw_submit(name: str, handle: BrokerHandle, payload_text: bytes) -> OsqueueError:
    """Submit ``payload_text`` as the payload on the wire itself; the error answered."""
    if name == "rest":
        async with httpx.AsyncClient(base_url=handle.url) as http:
            body = b'{"payload": ' + payload_text + b"}"
            response = await http.post("/v1/jobs", content=body)
        assert response.status_code == 400
        return error_from_body(response.json(), status=response.status_code)
    if name == "ws":
        frame = b'{"id": "big", "method": "submitJob", "params": {"payload": ' + payload_text
        async with ws_connect(handle.url.replace("http", "ws") + "/v1/ws") as socket:
            await socket.send((frame + b"}}").decode())
            reply = orjson.loads(await socket.recv())
        assert reply["id"] == "big" and reply["ok"] is False
        return error_from_body(reply["error"])
    request = pb.SubmitJobRequest(payload=payload_text)
    if name == "connect":
        content, content_type = request.to_binary(), "application/proto"
    else:
        content, content_type = str(request.to_json()).encode(), "application/json"
    async with httpx.AsyncClient(base_url=handle.url) as http:
        response = await http.post(
            "/osqueue.v1.QueueService/SubmitJob",
            content=content,
            headers={"content-type": content_type},
        )
    assert response.status_code == 400
    assert response.json()["code"] == "invalid_argument"
    return wire.error_from_connect(response.json(), status=response.status_code)


async def test_integer_beyond_64_bits_on_the_wire_is_a_4xx_naming_the_field(
    broker: BrokerHandle, transport_name: str
) -> None:
    writes = broker.engine.stats.writes
    error = await raw_submit(transport_name, broker, b'{"ok": 1, "big": ' + BIG + b"}")
    assert isinstance(error, BrokerProtocolError)
    assert "big" in error.message and "64 bits" in error.message
    error = await raw_submit(transport_name, broker, b"[1, 2, " + BIG + b"]")
    assert isinstance(error, BrokerProtocolError) and "[2]" in error.message
    assert broker.engine.stats.writes == writes
    assert (await raw_submit_ok(transport_name, broker)) is None


async def raw_submit_ok(name: str, handle: BrokerHandle) -> None:
    """A valid submit right after invalid traffic works."""
    made = make_transport(name, handle.url)
    try:
        assert "jobId" in await made.call("submitJob", {"payload": 2**63 - 1})
    finally:
        await made.aclose()


# -- a worker over each transport ----------------------------------------------------------


async def test_worker_runs_a_job(broker: BrokerHandle, transport_name: str) -> None:
    results: list[tuple[str, Any]] = []
    done = asyncio.Event()

    async def double(ctx: JobContext[Any]) -> int:
        return int(ctx.payload["n"]) * 2

    def on_complete(ctx: JobContext[Any], result: Any) -> None:
        results.append((ctx.job_id, result))
        done.set()

    async with AsyncOsqueueClient(broker.url, transport=transport_name) as client:
        worker = Worker(
            client,
            {"double": double},
            poll_min_s=0.01,
            poll_max_s=0.05,
            heartbeat_interval_s=0.1,
            on_complete=on_complete,
        )
        running = asyncio.create_task(worker.run(install_signal_handlers=False))
        try:
            job_id = await client.submit({"n": 21}, type="double")
            await asyncio.wait_for(done.wait(), WAIT_S)
        finally:
            await asyncio.wait_for(worker.stop(), WAIT_S)
            await running
        assert results == [(job_id, 42)]
        assert (await client.stats())["completedTotal"] == 1


# -- WebSocket: malformed frames, concurrency, drops ---------------------------------------


@pytest.fixture
async def socket(broker: BrokerHandle) -> AsyncIterator[Any]:
    async with ws_connect(broker.url.replace("http", "ws") + "/v1/ws", max_size=None) as conn:
        yield conn


async def exchange(socket: Any, frame: str | bytes) -> dict[str, Any]:
    await socket.send(frame)
    reply: dict[str, Any] = orjson.loads(await asyncio.wait_for(socket.recv(), WAIT_S))
    return reply


def refused(reply: dict[str, Any], tag: str = "BrokerProtocolError") -> str:
    assert reply["ok"] is False and reply["error"]["_tag"] == tag, reply
    message: str = reply["error"]["message"]
    return message


async def test_ws_malformed_frames_get_error_replies(
    broker: BrokerHandle, socket: Any, rest: RestTransport
) -> None:
    writes = broker.engine.stats.writes
    reply = await exchange(socket, '{"id": 1, "method": "submitJob", "params": ')
    assert reply["id"] is None and "JSON" in refused(reply)
    reply = await exchange(socket, b'{"id": 2, "method": "getStats"}')
    assert reply["id"] is None and "binary" in refused(reply)
    reply = await exchange(socket, '{"id": 3, "method": "dropTables", "params": {}}')
    assert reply["id"] == 3 and "dropTables" in refused(reply)
    assert reply["error"]["method"] == "dropTables"
    reply = await exchange(socket, '[{"id": 4}]')
    assert reply["id"] is None and "object" in refused(reply)
    reply = await exchange(socket, '{"id": {"x": 5}, "method": "getStats"}')
    assert reply["id"] is None and "id" in refused(reply)
    reply = await exchange(socket, '{"id": 6, "method": "claimJob", "params": [1]}')
    assert reply["id"] == 6 and "params" in refused(reply)
    reply = await exchange(socket, '{"id": 7, "method": "submitJob", "params": {"payload": 1e309}}')
    assert reply["id"] is None and "JSON" in refused(reply)
    huge = orjson.dumps(
        {"id": "huge", "method": "submitJob", "params": {"payload": "x" * 2 * LIMIT_BYTES}}
    )
    reply = await exchange(socket, huge.decode())
    assert reply["id"] == "huge"
    assert "MAX_BODY_BYTES" in refused(reply, "PayloadTooLargeError")
    assert broker.engine.stats.writes == writes

    reply = await exchange(socket, '{"id": 8, "method": "submitJob", "params": {"payload": 8}}')
    assert reply["id"] == 8 and reply["ok"] is True and "jobId" in reply["result"]
    assert (await rest.call("getStats", {}))["total"] == 1


async def test_ws_requests_run_concurrently_and_replies_match_ids(
    broker: BrokerHandle, socket: Any
) -> None:
    # A claim that waits must not hold up the requests behind it on the same socket.
    await socket.send(
        '{"id": "wait", "method": "claimJob", "params": {"workerId": "w", "waitMs": 5000}}'
    )
    reply = await exchange(socket, '{"id": 1.5, "method": "getStats"}')
    assert reply["id"] == 1.5 and reply["result"]["total"] == 0
    reply = await exchange(socket, '{"id": 2, "method": "submitJob", "params": {"payload": "p"}}')
    assert reply["id"] == 2
    job_id = reply["result"]["jobId"]
    claimed = orjson.loads(await asyncio.wait_for(socket.recv(), WAIT_S))
    assert claimed["id"] == "wait" and claimed["result"]["jobId"] == job_id

    transport = WebSocketTransport(broker.url, timeout_s=WAIT_S)
    try:
        answers = await asyncio.gather(
            *(transport.call("submitJob", {"payload": i}) for i in range(50))
        )
        assert len({a["jobId"] for a in answers}) == 50
        got = await asyncio.gather(
            *(transport.call("getJob", {"jobId": a["jobId"]}) for a in answers)
        )
        assert [g["payload"] for g in got] == list(range(50))
    finally:
        await transport.aclose()


def ws_request_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == "osqueue-ws-request"]


async def test_ws_close_in_the_middle_of_a_claim(broker: BrokerHandle, rest: RestTransport) -> None:
    url = broker.url.replace("http", "ws") + "/v1/ws"
    async with ws_connect(url) as socket:
        await socket.send(
            '{"id": 1, "method": "claimJob", "params": {"workerId": "gone", "waitMs": 60000}}'
        )

        async def claim_waiting() -> bool:
            return bool(ws_request_tasks())

        await eventually(claim_waiting, "the claim to start waiting")

    async def no_requests_left() -> bool:
        return not ws_request_tasks()

    # Well before the claim's own 60 s wait could end.
    await eventually(no_requests_left, "the abandoned claim to be cancelled", timeout_s=2.0)
    job_id = (await rest.call("submitJob", {"payload": "after"}))["jobId"]
    claimed = await rest.call("claimJob", {"workerId": "alive"})
    assert (claimed["jobId"], claimed["attempts"]) == (job_id, 1)


async def test_ws_transport_fails_pending_calls_on_drop_and_reconnects() -> None:
    connections = 0

    async def handler(conn: ServerConnection) -> None:
        nonlocal connections
        connections += 1
        frame = orjson.loads(await conn.recv())
        if connections == 1:
            await conn.close()  # drop with the call pending
            return
        await conn.send(orjson.dumps({"id": frame["id"], "ok": True, "result": {"n": 2}}).decode())
        await conn.wait_closed()

    async with ws_serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        transport = WebSocketTransport(f"http://127.0.0.1:{port}", timeout_s=WAIT_S)
        try:
            with pytest.raises(TransportConnectionError) as dropped:
                await transport.call("getStats", {})
            assert dropped.value.fields["request_sent"] is True
            assert await transport.call("getStats", {}) == {"n": 2}
            assert connections == 2
        finally:
            await transport.aclose()


async def test_ws_transport_times_out_a_call_without_reply() -> None:
    async def silent(conn: ServerConnection) -> None:
        await conn.wait_closed()

    async with ws_serve(silent, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        transport = WebSocketTransport(f"ws://127.0.0.1:{port}/v1/ws", timeout_s=0.2)
        try:
            with pytest.raises(TransportConnectionError, match="no reply"):
                await transport.call("getStats", {})
        finally:
            await transport.aclose()


async def test_ws_transport_cannot_connect() -> None:
    transport = WebSocketTransport("http://127.0.0.1:9", timeout_s=1.0)
    with pytest.raises(TransportConnectionError) as error:
        await transport.call("getStats", {})
    assert error.value.fields["request_sent"] is False
    await transport.aclose()


# -- Connect: malformed requests -----------------------------------------------------------


async def connect_post(
    handle: BrokerHandle,
    path: str,
    content: bytes,
    content_type: str = "application/proto",
    **kw: Any,
) -> httpx.Response:
    async with httpx.AsyncClient(base_url=handle.url) as http:
        return await http.request(
            kw.pop("method", "POST"),
            path,
            content=content,
            headers={"content-type": content_type, **kw.pop("headers", {})},
        )


def connect_error(response: httpx.Response) -> OsqueueError:
    assert 400 <= response.status_code < 500, response.text
    body = response.json()
    assert set(body) >= {"code", "message"}
    return wire.error_from_connect(body, status=response.status_code)


async def test_connect_malformed_requests_get_4xx_connect_errors(
    broker: BrokerHandle, rest: RestTransport
) -> None:
    writes = broker.engine.stats.writes
    service = "/osqueue.v1.QueueService"
    submit = f"{service}/SubmitJob"
    cases: list[tuple[str, bytes, str, dict[str, Any], int, type[OsqueueError]]] = [
        (f"{service}/DropTables", b"", "application/proto", {}, 404, BrokerProtocolError),
        (f"{service}/", b"", "application/proto", {}, 404, BrokerProtocolError),
        (submit, b"\xff\xff\xff\xff", "application/proto", {}, 400, BrokerProtocolError),
        (submit, b"\x0a\x50abc", "application/proto", {}, 400, BrokerProtocolError),
        (submit, b'{"payload": 5}', "application/json", {}, 400, BrokerProtocolError),
        (submit, b'{"payload": ', "application/json", {}, 400, BrokerProtocolError),
        (submit, b"[]", "application/json", {}, 400, BrokerProtocolError),
        (submit, b"", "application/proto", {}, 400, BrokerProtocolError),  # no payload
        (submit, b"x", "text/plain", {}, 415, BrokerProtocolError),
        (submit, b"x", "application/grpc", {}, 415, BrokerProtocolError),
        (submit, b"x", "application/proto", {"method": "GET"}, 405, BrokerProtocolError),
        (
            submit,
            b"x",
            "application/proto",
            {"headers": {"content-encoding": "br"}},
            415,
            BrokerProtocolError,
        ),
        (submit, b"\x0a" * (LIMIT_BYTES + 1), "application/proto", {}, 413, PayloadTooLargeError),
    ]
    for path, content, content_type, extra, status, error_class in cases:
        response = await connect_post(broker, path, content, content_type, **extra)
        assert response.status_code == status, (path, content_type, response.text)
        error = connect_error(response)
        assert isinstance(error, error_class), (path, content_type, error)
        assert response.json()["message"].startswith(error_class.tag), response.text

    claim = pb.ClaimJobRequest(worker_id="w", wait_ms=10**9).to_binary()
    response = await connect_post(broker, f"{service}/ClaimJob", claim)
    assert isinstance(connect_error(response), BrokerProtocolError)
    assert "waitMs" in response.json()["message"]
    assert broker.engine.stats.writes == writes

    good = pb.SubmitJobRequest(payload=b'{"ok": true}').to_binary()
    response = await connect_post(broker, submit, good)
    assert response.status_code == 200
    assert pb.SubmitJobResponse.from_binary(response.content).job_id
    assert (await rest.call("getStats", {}))["total"] == 1


async def test_connect_lease_lost_keeps_its_tag_and_code(broker: BrokerHandle) -> None:
    heartbeat = pb.HeartbeatRequest(job_id="nope", worker_id="w").to_binary()
    response = await connect_post(broker, "/osqueue.v1.QueueService/Heartbeat", heartbeat)
    body = response.json()
    assert response.status_code == 400 and body["code"] == "failed_precondition"
    assert body["message"].startswith("LeaseLostError: ")
    assert body["details"][0]["type"] == "osqueue.v1.ErrorDetail"
    error = wire.error_from_connect(body, status=400)
    assert isinstance(error, LeaseLostError) and error.fields == {"jobId": "nope"}


async def test_connect_gzip_request_and_response(broker: BrokerHandle) -> None:
    import gzip

    request = pb.SubmitJobRequest(payload=b'"zipped"', type="z").to_binary()
    response = await connect_post(
        broker,
        "/osqueue.v1.QueueService/SubmitJob",
        gzip.compress(request),
        headers={"content-encoding": "gzip", "accept-encoding": "gzip"},
    )
    assert response.status_code == 200, response.text
    assert pb.SubmitJobResponse.from_binary(response.content).job_id


async def test_connect_json_wire_is_plain_connect_json(broker: BrokerHandle) -> None:
    """A Connect JSON client needs nothing but base64 for the payload bytes."""
    payload = base64.b64encode(b'{"hello": "world"}').decode()
    response = await connect_post(
        broker,
        "/osqueue.v1.QueueService/SubmitJob",
        orjson.dumps({"payload": payload, "maxAttempts": 2, "type": "t"}),
        "application/json",
    )
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    response = await connect_post(
        broker, "/osqueue.v1.QueueService/ClaimJob", b'{"workerId": "w"}', "application/json"
    )
    body = response.json()
    assert base64.b64decode(body["payload"]) == b'{"hello":"world"}'
    assert (body["type"], body["attempts"], body["maxAttempts"]) == ("t", 1, 2)


async def test_connectrpc_generated_client_interoperates(broker: BrokerHandle) -> None:
    """The official Connect client (connectrpc's generated stub) talks to the broker."""
    from connectrpc.code import Code
    from connectrpc.codec import proto_json_codec
    from connectrpc.errors import ConnectError

    from osqueue._proto.osqueue.v1.queue_connect import QueueServiceClient

    for codec in (None, proto_json_codec()):
        async with QueueServiceClient(broker.url, codec=codec) as client:
            submitted = await client.submit_job(pb.SubmitJobRequest(payload=b"[1]", type="t"))
            claimed = await client.claim_job(pb.ClaimJobRequest(worker_id="w", types=["t"]))
            assert (claimed.job_id, claimed.payload) == (submitted.job_id, b"[1]")
            with pytest.raises(ConnectError) as lost:
                await client.heartbeat(pb.HeartbeatRequest(job_id="nope", worker_id="w"))
            assert lost.value.code == Code.FAILED_PRECONDITION
            detail = lost.value.details[0].value(pb.ErrorDetail)
            assert detail is not None and detail.tag == "LeaseLostError"
            await client.complete_job(pb.CompleteJobRequest(job_id=claimed.job_id, worker_id="w"))
