"""The REST transport's request mapping and error mapping, and the client's retries,
against scripted brokers on loopback (tests/unit/scripted_broker.py)."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import aiohttp
import pytest

from osqueue.client import (
    METHODS,
    AsyncOsqueueClient,
    ClientRetry,
    JobSpec,
    OsqueueClient,
    RestTransport,
    SubmitReceipt,
    follow_leader_hint,
)
from osqueue.client.rest import ROUTES
from osqueue.errors import (
    AuthenticationError,
    BrokerLeadershipError,
    BrokerProtocolError,
    EngineStateError,
    JobNotFoundError,
    LeaseLostError,
    OsqueueError,
    PayloadTooLargeError,
    StorageBackendError,
    TransportConfigError,
    TransportConnectionError,
    TransportRequestError,
)
from osqueue.model import decode_json
from tests.unit.scripted_broker import (
    FAST_RETRY,
    Responder,
    ScriptedBroker,
    answer,
    garbage,
    hang,
    later,
    raw,
    refuse,
)

Scripted = Callable[..., ScriptedBroker]


# -- request mapping ---------------------------------------------------------------------


def test_every_protocol_method_has_a_route() -> None:
    assert set(ROUTES) == METHODS


@pytest.mark.parametrize(
    ("method", "params", "verb", "path", "body"),
    [
        ("submitJob", {"payload": 1}, "POST", "/v1/jobs", {"payload": 1}),
        ("submitBatch", {"jobs": []}, "POST", "/v1/jobs/batch", {"jobs": []}),
        ("claimJob", {"workerId": "w"}, "POST", "/v1/jobs/claim", {"workerId": "w"}),
        (
            "heartbeat",
            {"jobId": "j/1", "workerId": "w", "attempt": 2},
            "POST",
            "/v1/jobs/j%2F1/heartbeat",
            {"workerId": "w", "attempt": 2},
        ),
        (
            "completeJob",
            {"jobId": "j", "workerId": "w"},
            "POST",
            "/v1/jobs/j/complete",
            {"workerId": "w"},
        ),
        (
            "failJob",
            {"jobId": "j", "workerId": "w", "reason": "failed"},
            "POST",
            "/v1/jobs/j/fail",
            {"workerId": "w", "reason": "failed"},
        ),
        ("getStats", {}, "GET", "/v1/stats", None),
        ("listJobs", {}, "GET", "/v1/jobs", None),
        ("getJob", {"jobId": "j"}, "GET", "/v1/jobs/j", None),
        ("cancelJob", {"jobId": "j"}, "POST", "/v1/jobs/j/cancel", {}),
        ("listDead", {}, "GET", "/v1/dead", None),
        ("requeueDead", {"type": "t"}, "POST", "/v1/dead/requeue", {"type": "t"}),
        ("purgeDead", {}, "DELETE", "/v1/dead", None),
    ],
)
async def test_methods_map_to_rest_requests(
    method: str, params: dict[str, Any], verb: str, path: str, body: Any, scripted: Scripted
) -> None:
    broker = scripted(answer(204))
    transport = broker.transport(token="s3cret")
    try:
        assert await transport.call(method, params) == {}
    finally:
        await transport.aclose()
    (request,) = broker.requests
    assert (request.method, request.raw_path) == (verb, path)
    assert request.headers["authorization"] == "Bearer s3cret"
    if body is None:
        assert request.content == b""
    else:
        assert decode_json(request.content) == body
        assert request.headers["content-type"] == "application/json"


async def test_no_token_no_authorization_header(scripted: Scripted) -> None:
    broker = scripted(answer(200, {"total": 0}))
    async with AsyncOsqueueClient(transport=broker.transport()) as client:
        assert await client.stats() == {"total": 0}
    assert "authorization" not in broker.requests[0].headers


async def test_unknown_method_and_missing_job_id_are_refused_locally(scripted: Scripted) -> None:
    broker = scripted(answer(204))
    transport = broker.transport()
    try:
        with pytest.raises(BrokerProtocolError, match="unknown method"):
            await transport.call("explode", {})
        with pytest.raises(BrokerProtocolError, match="needs a string jobId"):
            await transport.call("heartbeat", {"workerId": "w"})
    finally:
        await transport.aclose()
    assert broker.requests == []


async def test_claim_waits_extend_the_request_timeout(scripted: Scripted) -> None:
    # The answer comes after the transport's own time-out, within the claim's wait.
    broker = scripted(later(0.6, answer(200, {})))
    transport = broker.transport(timeout_s=0.2)
    try:
        await transport.call("claimJob", {"workerId": "w", "waitMs": 5000})
        with pytest.raises(TransportConnectionError):
            await transport.call("claimJob", {"workerId": "w"})
    finally:
        await transport.aclose()
    assert len(broker.requests) == 2
    slow = RestTransport("http://b", timeout_s=1.0)
    assert slow._http.timeout(5000).total == pytest.approx(6.0)
    await slow.aclose()


# -- error mapping -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "tag", "error_type"),
    [
        (400, "BrokerProtocolError", BrokerProtocolError),
        (401, "AuthenticationError", AuthenticationError),
        (404, "JobNotFoundError", JobNotFoundError),
        (409, "LeaseLostError", LeaseLostError),
        (413, "PayloadTooLargeError", PayloadTooLargeError),
        (503, "BrokerLeadershipError", BrokerLeadershipError),
        (503, "StorageBackendError", StorageBackendError),
        (500, "EngineStateError", EngineStateError),
    ],
)
async def test_error_bodies_become_their_classes(
    status: int, tag: str, error_type: type[OsqueueError], scripted: Scripted
) -> None:
    body = {"_tag": tag, "message": f"the {tag}", "jobId": "j1"}
    broker = scripted(answer(status, body))
    transport = broker.transport()
    try:
        with pytest.raises(error_type) as caught:
            await transport.call("getJob", {"jobId": "j1"})
    finally:
        await transport.aclose()
    assert type(caught.value) is error_type
    assert caught.value.message == f"the {tag}"
    assert caught.value.fields["jobId"] == "j1"


async def test_leadership_error_keeps_the_leader(scripted: Scripted) -> None:
    body = {"_tag": "BrokerLeadershipError", "message": "not leader", "leader": "b2:8080"}
    broker = scripted(answer(503, body))
    async with broker.client(retry=ClientRetry(deadline_s=0)) as client:
        with pytest.raises(BrokerLeadershipError) as caught:
            await client.claim("w")
    assert caught.value.leader == "b2:8080"


async def test_unknown_tag_becomes_transport_request_error(scripted: Scripted) -> None:
    broker = scripted(answer(418, {"_tag": "TeapotError", "message": "short and stout"}))
    async with broker.client() as client:
        with pytest.raises(TransportRequestError) as caught:
            await client.stats()
    assert caught.value.fields == {
        "method": "GET",
        "path": "/v1/stats",
        "status": 418,
        "remote_tag": "TeapotError",
    }


async def test_a_body_that_is_not_json_becomes_transport_request_error(scripted: Scripted) -> None:
    broker = scripted(raw(502, "<html>bad gateway</html>"))
    async with broker.client() as client:
        with pytest.raises(TransportRequestError) as caught:
            await client.cancel("j1")
    assert caught.value.fields["status"] == 502
    assert caught.value.fields["path"] == "/v1/jobs/j1/cancel"


async def test_a_success_that_is_not_json_is_a_protocol_error(scripted: Scripted) -> None:
    broker = scripted(raw(200, "ok"))
    async with broker.client() as client:
        with pytest.raises(BrokerProtocolError, match="not JSON"):
            await client.stats()


@contextmanager
def unanswered_url() -> Iterator[str]:
    """A loopback port whose queue of connections is full: a connect gets no answer."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):  # takes the only place
            yield f"http://127.0.0.1:{port}"


@pytest.mark.parametrize(
    ("failure", "cause", "sent"),
    [
        ("refused", aiohttp.ClientConnectorError, False),
        ("connect time-out", aiohttp.ConnectionTimeoutError, False),
        ("read time-out", TimeoutError, True),
        ("not HTTP", aiohttp.ClientResponseError, True),
    ],
)
async def test_network_failures_become_connection_errors(
    failure: str, cause: type[Exception], sent: bool, scripted: Scripted
) -> None:
    with unanswered_url() as unanswered:
        transport = {
            "refused": lambda: scripted(refuse).transport(),
            "connect time-out": lambda: RestTransport(unanswered, connect_timeout_s=0.2),
            "read time-out": lambda: scripted(hang).transport(),
            "not HTTP": lambda: scripted(garbage).transport(),
        }[failure]()
        try:
            with pytest.raises(TransportConnectionError) as caught:
                await transport.call("getStats", {})
        finally:
            await transport.aclose()
    assert isinstance(caught.value.__cause__, cause)
    assert caught.value.fields["request_sent"] is sent
    assert caught.value.retryable


async def test_a_real_refused_connection_is_a_connection_error() -> None:
    # Port 1 on loopback: nothing listens there.
    transport = RestTransport("http://127.0.0.1:1", timeout_s=2.0)
    try:
        with pytest.raises(TransportConnectionError) as caught:
            await transport.call("getStats", {})
    finally:
        await transport.aclose()
    assert caught.value.fields["request_sent"] is False


# -- retries -----------------------------------------------------------------------------

STORAGE_DOWN = answer(503, {"_tag": "StorageBackendError", "message": "store down"})
NOT_LEADER = answer(503, {"_tag": "BrokerLeadershipError", "message": "no", "leader": "b2:81"})


async def test_idempotent_calls_are_retried_until_they_succeed(scripted: Scripted) -> None:
    broker = scripted(STORAGE_DOWN, hang, answer(200, {"total": 3}))
    async with broker.client() as client:
        assert await client.stats() == {"total": 3}
    assert len(broker.requests) == 3


async def test_keyed_submit_is_retried_and_reports_duplicate(scripted: Scripted) -> None:
    broker = scripted(STORAGE_DOWN, answer(200, {"jobId": "j1", "duplicate": True}))
    async with broker.client() as client:
        receipt = await client.submit_with_receipt({"a": 1}, idempotency_key="k")
    assert receipt == SubmitReceipt("j1", duplicate=True)
    assert len(broker.requests) == 2


@pytest.mark.parametrize("failure", [STORAGE_DOWN, hang])
async def test_submit_without_key_is_not_retried_when_it_may_have_landed(
    failure: Responder, scripted: Scripted
) -> None:
    broker = scripted(failure, answer(200, {"jobId": "j2"}))
    async with broker.client(auto_idempotency=False) as client:
        with pytest.raises((StorageBackendError, TransportConnectionError)):
            await client.submit({"a": 1})
    assert len(broker.requests) == 1


@pytest.mark.parametrize("failure", [STORAGE_DOWN, hang])
async def test_submit_gets_a_key_of_its_own_so_a_retry_is_safe(
    failure: Responder, scripted: Scripted
) -> None:
    broker = scripted(failure, answer(200, {"jobId": "j2", "duplicate": True}))
    async with broker.client() as client:
        receipt = await client.submit_with_receipt({"a": 1})
    keys = [json.loads(request.content)["idempotencyKey"] for request in broker.requests]
    assert len(keys) == 2 and keys[0] == keys[1] and keys[0].startswith("auto:")
    # the broker found the first attempt's job: to the caller that is one submit
    assert receipt == SubmitReceipt("j2", duplicate=False)


@pytest.mark.parametrize("failure", [NOT_LEADER, refuse])
async def test_any_call_is_retried_when_it_surely_did_not_land(
    failure: Responder, scripted: Scripted
) -> None:
    broker = scripted(failure, answer(200, {"jobId": "j3", "payload": 1, "attempts": 1}))
    async with broker.client() as client:
        job = await client.claim("w")
    assert job is not None and job.job_id == "j3"
    assert len(broker.requests) == 2


async def test_claim_is_not_retried_after_a_read_timeout(scripted: Scripted) -> None:
    broker = scripted(hang, answer(200, {}))
    async with broker.client() as client:
        with pytest.raises(TransportConnectionError):
            await client.claim("w")
    assert len(broker.requests) == 1


async def test_retries_stop_at_the_deadline(scripted: Scripted) -> None:
    broker = scripted(STORAGE_DOWN)
    retry = ClientRetry(deadline_s=0.1, base_s=0.01, cap_s=0.02)
    async with broker.client(retry=retry) as client:
        with pytest.raises(StorageBackendError):
            await client.stats()
    assert 3 <= len(broker.requests) <= 30


async def test_non_retryable_errors_are_raised_at_once(scripted: Scripted) -> None:
    broker = scripted(answer(409, {"_tag": "LeaseLostError", "message": "gone"}))
    async with broker.client() as client:
        with pytest.raises(LeaseLostError):
            await client.heartbeat("j", "w", attempt=1)
    assert len(broker.requests) == 1


async def test_discover_hook_switches_broker(scripted: Scripted) -> None:
    # The client's URLs name b1 and b2; their transports reach the scripted brokers.
    by_host = {"b1": scripted(NOT_LEADER), "b2": scripted(answer(200, {"total": 7}))}
    made: list[str] = []
    seen: list[tuple[str, str]] = []

    def factory(url: str) -> RestTransport:
        made.append(url)
        host = url.split("://", 1)[1].split(":", 1)[0]
        return by_host[host].transport()

    async def discover(url: str, error: OsqueueError) -> str | None:
        seen.append((url, error.tag))
        return await follow_leader_hint(url, error)

    client = AsyncOsqueueClient(
        "http://b1:80", transport=factory, retry=FAST_RETRY, discover=discover
    )
    async with client:
        assert await client.stats() == {"total": 7}
    assert made == ["http://b1:80", "http://b2:81"]
    assert seen == [("http://b1:80", "BrokerLeadershipError")]
    assert client.url == "http://b2:81"


async def test_discover_is_not_asked_after_storage_errors(scripted: Scripted) -> None:
    broker = scripted(STORAGE_DOWN, answer(200, {}))
    asked: list[str] = []

    async def discover(url: str, error: OsqueueError) -> str | None:
        asked.append(url)
        return None

    transport = broker.transport()
    async with AsyncOsqueueClient(
        transport=lambda url: transport, retry=FAST_RETRY, discover=discover
    ) as client:
        await client.stats()
    assert asked == []


# -- results and configuration -----------------------------------------------------------


async def test_batch_results_keep_errors_in_place(scripted: Scripted) -> None:
    results = {
        "results": [
            {"jobId": "a"},
            {"error": {"_tag": "BrokerProtocolError", "message": "maxAttempts must be >= 1"}},
        ]
    }
    broker = scripted(answer(200, results))
    async with broker.client() as client:
        out = await client.submit_batch([JobSpec(1), JobSpec(2, max_attempts=0)])
    assert out[0] == SubmitReceipt("a")
    assert isinstance(out[1], BrokerProtocolError)
    assert "maxAttempts" in out[1].message


async def test_submit_sends_optional_fields_only_when_given(scripted: Scripted) -> None:
    broker = scripted(answer(200, {"jobId": "j"}))
    async with broker.client(auto_idempotency=False) as client:
        await client.submit("p")
        await client.submit("p", type="t", max_attempts=5, delay_s=1.5, priority=2)
        await client.submit("p", delay_ms=20, run_at=1_700_000_000_000, idempotency_key="k")
        with pytest.raises(BrokerProtocolError, match="not both"):
            await client.submit("p", delay_s=1, delay_ms=1)
    assert [decode_json(r.content) for r in broker.requests] == [
        {"payload": "p"},
        {"payload": "p", "type": "t", "maxAttempts": 5, "delayMs": 1500, "priority": 2},
        {"payload": "p", "delayMs": 20, "runAt": 1_700_000_000_000, "idempotencyKey": "k"},
    ]


async def test_claim_answers_parse(scripted: Scripted) -> None:
    job = {"jobId": "j", "payload": {"x": 1}, "type": "t", "attempts": 2, "maxAttempts": 4}
    broker = scripted(answer(200, {}), answer(200, job), answer(200, {"jobId": 5}))
    async with broker.client() as client:
        assert await client.claim("w", types=["t"], wait_ms=10) is None
        claimed = await client.claim("w")
        assert claimed is not None
        assert (claimed.job_id, claimed.payload, claimed.type) == ("j", {"x": 1}, "t")
        assert (claimed.attempts, claimed.max_attempts) == (2, 4)
        with pytest.raises(BrokerProtocolError, match="malformed"):
            await client.claim("w")
    assert decode_json(broker.requests[0].content) == {
        "workerId": "w",
        "types": ["t"],
        "waitMs": 10,
    }


async def test_transport_settings_are_checked(
    monkeypatch: pytest.MonkeyPatch, scripted: Scripted
) -> None:
    for name in ("ws", "connect", "connect-json"):
        await AsyncOsqueueClient(transport=name).close()  # built by name, nothing sent
    with pytest.raises(TransportConfigError, match="unknown transport"):
        AsyncOsqueueClient(transport="carrier-pigeon")
    with pytest.raises(TransportConfigError, match="BROKER_URL"):
        AsyncOsqueueClient("ftp://x")
    with pytest.raises(TransportConfigError, match="does not implement Transport"):
        AsyncOsqueueClient(transport=lambda url: object())  # type: ignore[arg-type,return-value]
    with pytest.raises(TransportConfigError, match="discover="):
        AsyncOsqueueClient(transport=scripted().transport(), discover=follow_leader_hint)


async def test_url_and_token_default_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROKER_URL", "broker.internal:9000")
    monkeypatch.setenv("OSQUEUE_TOKEN", "from-env")
    client = AsyncOsqueueClient()
    assert client.url == "http://broker.internal:9000"
    assert isinstance(client._transport, RestTransport)
    assert client._transport._headers["authorization"] == "Bearer from-env"
    await client.close()
    monkeypatch.delenv("BROKER_URL")
    assert AsyncOsqueueClient().url == "http://localhost:8080"


async def test_a_closed_client_refuses_calls(scripted: Scripted) -> None:
    client = scripted(answer(200, {})).client()
    await client.close()
    await client.close()
    with pytest.raises(TransportConfigError, match="closed"):
        await client.stats()


def test_sync_client_shares_the_mapping_and_errors(scripted: Scripted) -> None:
    broker = scripted(
        answer(200, {"jobId": "j1"}),
        answer(409, {"_tag": "LeaseLostError", "message": "gone"}),
        answer(200, {"purged": 4}),
    )
    with OsqueueClient(transport=broker.transport()) as client:
        assert client.submit({"a": 1}) == "j1"
        with pytest.raises(LeaseLostError):
            client.complete("j1", "w", attempt=1)
        assert client.purge_dead() == 4
    assert [r.path for r in broker.requests] == [
        "/v1/jobs",
        "/v1/jobs/j1/complete",
        "/v1/dead",
    ]
    assert not any(t.name == "osqueue-client-loop" for t in threading.enumerate())
    with pytest.raises(TransportConfigError, match="closed"):
        client.stats()
