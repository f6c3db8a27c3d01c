"""Every REST endpoint and status code of the contract (section 5), over loopback.

The timed failure scenarios (F01-F05, F13, F19) are in test_rest_failure_cases.py.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from osqueue.errors import StorageBackendError
from tests.integration.rest_support import BrokerFactory, RestBroker, strict_json


def assert_error(response: httpx.Response, status: int, tag: str) -> dict[str, Any]:
    """The response is ``status`` with a JSON error body ``{_tag, message}``."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    assert body["_tag"] == tag, body
    assert isinstance(body["message"], str) and body["message"], body
    return body


async def poll_until(condition: Any, timeout_s: float, step_s: float = 0.01) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(step_s)


# -- health, state, readiness -------------------------------------------------------------


async def test_healthz_readyz_and_throttle_stats(broker: RestBroker) -> None:
    health = await broker.http.get("/healthz")
    assert health.status_code == 200
    assert health.json()["status"] == "ok"
    ready = await broker.http.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["leader"] is True
    throttle = await broker.http.get("/v1/throttle-stats")
    assert (throttle.status_code, throttle.json()) == (200, {"throttling": False})


async def test_state_is_the_document_as_last_committed(broker: RestBroker) -> None:
    job_id = await broker.submit({"n": 1})
    response = await broker.http.get("/state")
    assert response.status_code == 200
    assert response.content == await broker.storage.read_stored_bytes()
    doc = strict_json(response.content)
    assert [j["id"] for j in doc["jobs"]] == [job_id]
    assert doc["broker"] == broker.handle.broker.address
    assert doc["brokerId"] == broker.handle.broker.broker_id


# -- producers ------------------------------------------------------------------------------


async def test_submit_stores_every_field(broker: RestBroker) -> None:
    future = int(time.time() * 1000) + 60_000
    job_id = await broker.submit(
        {"to": "a@b"}, type="email", maxAttempts=5, priority=2, runAt=future, idempotencyKey="k"
    )
    response = await broker.http.get(f"/v1/jobs/{job_id}")
    assert response.status_code == 200
    job = response.json()
    assert job["payload"] == {"to": "a@b"}
    assert (job["type"], job["maxAttempts"], job["priority"], job["runAt"]) == (
        "email",
        5,
        2,
        future,
    )
    assert (job["status"], job["attempts"], job["idempotencyKey"]) == ("unclaimed", 0, "k")
    delayed = await broker.submit(None, delayMs=60_000)
    assert (await broker.http.get(f"/v1/jobs/{delayed}")).json()["runAt"] >= future - 1_000
    assert await broker.claim("w") == {}  # both wait for their time
    await broker.check_invariants()


async def test_duplicate_idempotency_key_names_the_first_job(broker: RestBroker) -> None:
    first = await broker.submit("first", idempotencyKey="once")
    writes = len(broker.storage.history)
    again = await broker.http.post("/v1/jobs", json={"payload": "second", "idempotencyKey": "once"})
    assert again.status_code == 200
    assert again.json() == {"jobId": first, "duplicate": True}
    assert len(broker.storage.history) == writes  # nothing new to write
    assert [j["payload"] for j in (await broker.state())["jobs"]] == ["first"]


async def test_concurrent_submits_with_one_key_make_one_job(broker: RestBroker) -> None:
    responses = await asyncio.gather(
        *(
            broker.http.post("/v1/jobs", json={"payload": i, "idempotencyKey": "same"})
            for i in range(20)
        )
    )
    assert {r.status_code for r in responses} == {200}
    assert len({r.json()["jobId"] for r in responses}) == 1
    assert len((await broker.state())["jobs"]) == 1


async def test_batch_submit_is_one_write_with_answers_in_order(broker: RestBroker) -> None:
    writes = len(broker.storage.history)
    response = await broker.http.post(
        "/v1/jobs/batch",
        json={"jobs": [{"payload": 1}, {"payload": 2, "maxAttempts": 0}, {"payload": 3}]},
    )
    assert response.status_code == 200
    first, bad, third = response.json()["results"]
    assert bad["error"]["_tag"] == "BrokerProtocolError"
    assert "maxAttempts" in bad["error"]["message"]
    assert len(broker.storage.history) == writes + 1
    jobs = (await broker.state())["jobs"]
    assert [(j["id"], j["payload"]) for j in jobs] == [(first["jobId"], 1), (third["jobId"], 3)]


# -- workers --------------------------------------------------------------------------------


async def test_claim_answers_the_job_with_attempts(broker: RestBroker) -> None:
    job_id = await broker.submit({"x": 1}, type="A", maxAttempts=5)
    claimed = await broker.claim("w1", ["A"])
    assert claimed == {
        "jobId": job_id,
        "payload": {"x": 1},
        "type": "A",
        "attempts": 1,
        "maxAttempts": 5,
        "timeoutMs": 2_000,
    }
    assert await broker.claim("w2") == {}


async def test_claim_with_wait_gets_a_job_submitted_meanwhile(broker: RestBroker) -> None:
    operations = broker.engine.stats.operations
    started = time.monotonic()
    waiting = asyncio.create_task(broker.claim("w1", waitMs=5_000))
    await poll_until(lambda: broker.engine.stats.operations > operations, 5)
    job_id = await broker.submit("late")
    claimed = await waiting
    assert claimed["jobId"] == job_id
    assert time.monotonic() - started < 4


async def test_claim_with_wait_answers_empty_after_the_wait(broker: RestBroker) -> None:
    started = time.monotonic()
    assert await broker.claim("w1", waitMs=300) == {}
    assert time.monotonic() - started >= 0.3 - 0.01


async def test_heartbeat_complete_and_fail_answer_204(broker: RestBroker) -> None:
    done, retried = await broker.submit("a"), await broker.submit("b")
    assert (await broker.claim("w1"))["jobId"] == done
    assert (await broker.claim("w2"))["jobId"] == retried
    assert (await broker.lease("heartbeat", done, "w1")).status_code == 204
    assert (await broker.lease("heartbeat", done, "w1", attempt=1)).status_code == 204
    assert (await broker.lease("complete", done, "w1", attempt=1)).status_code == 204
    failed = await broker.lease("fail", retried, "w2", error="boom", retryDelayMs=0)
    assert failed.status_code == 204

    doc = await broker.state()
    assert doc["completedTotal"] == 1
    [job] = doc["jobs"]
    assert (job["id"], job["status"], job["lastError"]) == (retried, "unclaimed", "boom")
    again = await broker.claim("w3")
    assert (again["jobId"], again["attempts"]) == (retried, 2)
    await broker.check_invariants()


@pytest.mark.parametrize("action", ["heartbeat", "complete", "fail"])
async def test_a_worker_that_does_not_hold_the_job_gets_409(
    broker: RestBroker, action: str
) -> None:
    job_id = await broker.submit()
    await broker.claim("w1")
    held = (await broker.storage.stored_document())["jobs"]
    body = assert_error(await broker.lease(action, job_id, "w2"), 409, "LeaseLostError")
    assert body["jobId"] == job_id
    assert_error(await broker.lease(action, job_id, "w1", attempt=2), 409, "LeaseLostError")
    # Leader heartbeats may write meanwhile; the refusals must leave the job as it was.
    assert (await broker.storage.stored_document())["jobs"] == held
    assert (await broker.lease("heartbeat", job_id, "w1")).status_code == 204


async def test_fail_with_a_reason_buries_the_job(broker: RestBroker) -> None:
    job_id = await broker.submit("bad", maxAttempts=5)
    await broker.claim("w1")
    response = await broker.lease("fail", job_id, "w1", reason="invalid_payload", error="no")
    assert response.status_code == 204
    dead = (await broker.http.get("/v1/dead")).json()
    assert [(j["id"], j["reason"], j["attempts"]) for j in dead["jobs"]] == [
        (job_id, "invalid_payload", 1)
    ]
    assert dead["deadTotal"] == 1
    await broker.check_invariants()


# -- inspection -----------------------------------------------------------------------------


async def test_stats_and_job_list_have_every_field(broker: RestBroker) -> None:
    queued = await broker.submit("q")
    running = await broker.submit("r", type="T")
    await broker.claim("w1", ["T"])

    stats = (await broker.http.get("/v1/stats")).json()
    assert stats["total"] == 2
    assert (stats["unclaimed"], stats["inProgress"], stats["completedTotal"]) == (1, 1, 0)
    assert stats["brokerAddress"] == broker.handle.broker.address
    assert stats["dead"] == 0

    listing = (await broker.http.get("/v1/jobs")).json()
    assert listing["total"] == 2
    by_id = {j["id"]: j for j in listing["jobs"]}
    fields = {"id", "status", "payload", "type", "workerId", "createdAt", "attempts"}
    fields |= {"maxAttempts", "heartbeat"}
    for job in by_id.values():
        assert fields <= job.keys()
        assert isinstance(job["createdAt"], int) and isinstance(job["heartbeat"], int)
    assert (by_id[queued]["type"], by_id[queued]["workerId"], by_id[queued]["heartbeat"]) == (
        "",
        "",
        0,
    )
    assert by_id[running]["workerId"] == "w1" and by_id[running]["heartbeat"] > 0


async def test_get_job_in_each_state_and_404(broker: RestBroker) -> None:
    job_id = await broker.submit(maxAttempts=1)
    assert (await broker.http.get(f"/v1/jobs/{job_id}")).json()["status"] == "unclaimed"
    await broker.claim("w1")
    assert (await broker.http.get(f"/v1/jobs/{job_id}")).json()["status"] == "in_progress"
    await broker.lease("fail", job_id, "w1", error="x")
    dead = (await broker.http.get(f"/v1/jobs/{job_id}")).json()
    assert (dead["status"], dead["reason"]) == ("dead", "exhausted")
    body = assert_error(await broker.http.get("/v1/jobs/nope"), 404, "JobNotFoundError")
    assert body["jobId"] == "nope"


async def test_cancel_removes_the_job_and_its_holder_loses_the_lease(broker: RestBroker) -> None:
    queued, running = await broker.submit(), await broker.submit()
    await broker.claim("w1")
    for job_id in (queued, running):
        response = await broker.http.post(f"/v1/jobs/{job_id}/cancel", json={})
        assert response.status_code == 204
        broker.ledger.removed.add(job_id)
    assert (await broker.state())["jobs"] == []
    assert_error(await broker.lease("heartbeat", running, "w1"), 409, "LeaseLostError")
    assert_error(
        await broker.http.post(f"/v1/jobs/{queued}/cancel", json={}), 404, "JobNotFoundError"
    )
    await broker.check_invariants()


async def bury(broker: RestBroker, type_: str | None = None) -> str:
    fields: dict[str, Any] = {"type": type_} if type_ else {}
    job_id = await broker.submit(maxAttempts=1, **fields)
    claimed = await broker.claim("undertaker", [type_] if type_ else None)
    assert claimed["jobId"] == job_id
    assert (await broker.lease("fail", job_id, "undertaker", error="x")).status_code == 204
    return job_id


async def test_dead_list_requeue_and_purge(broker: RestBroker) -> None:
    a, b, c, d = [await bury(broker, t) for t in ("A", "B", "B", None)]
    dead = (await broker.http.get("/v1/dead")).json()
    assert [j["id"] for j in dead["jobs"]] == [a, b, c, d]
    assert dead["deadTotal"] == 4

    requeue = "/v1/dead/requeue"
    assert (await broker.http.post(requeue, json={"jobIds": [a]})).json() == {"requeued": 1}
    assert (await broker.http.post(requeue, json={"type": "B"})).json() == {"requeued": 2}
    job = (await broker.http.get(f"/v1/jobs/{b}")).json()
    assert (job["status"], job["attempts"]) == ("unclaimed", 0)
    purged = await broker.http.delete("/v1/dead")
    assert (purged.status_code, purged.json()) == (200, {"purged": 1})
    broker.ledger.removed.add(d)
    dead = (await broker.http.get("/v1/dead")).json()
    assert (dead["jobs"], dead["deadTotal"]) == ([], 4)

    await bury(broker, "Z")
    response = await broker.http.post(requeue, content=b"")  # no body: requeue all
    assert response.json() == {"requeued": 1}
    # Requeued jobs start again: handed out afresh, up to maxAttempts more times.
    broker.ledger.claims.clear()
    await broker.check_invariants()


# -- errors ---------------------------------------------------------------------------------


async def test_unknown_path_is_404_and_wrong_method_405(broker: RestBroker) -> None:
    assert_error(await broker.http.get("/v2/nothing"), 404, "BrokerProtocolError")
    assert_error(await broker.http.put("/v1/jobs", json={}), 405, "BrokerProtocolError")


async def test_token_is_required_except_for_healthz(start_broker: BrokerFactory) -> None:
    broker = await start_broker(token="s3cret")
    assert (await broker.http.get("/healthz")).status_code == 200
    assert_error(await broker.http.get("/v1/stats"), 401, "AuthenticationError")
    wrong = {"Authorization": "Bearer nope"}
    response = await broker.http.post("/v1/jobs", json={}, headers=wrong)
    assert_error(response, 401, "AuthenticationError")
    right = {"Authorization": "Bearer s3cret"}
    assert (await broker.http.get("/v1/stats", headers=right)).status_code == 200


async def test_body_over_the_limit_is_413(start_broker: BrokerFactory) -> None:
    broker = await start_broker(max_body_bytes=10_000, broker_heartbeat_interval_ms=60_000)
    version = broker.engine.version
    body = assert_error(
        await broker.http.post("/v1/jobs", json={"payload": "x" * 20_000}),
        413,
        "PayloadTooLargeError",
    )
    assert "10000" in body["message"]

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted while read
        yield b'{"payload": "'
        for _ in range(20):
            yield b"x" * 1_000
        yield b'"}'

    chunked = await broker.http.post(
        "/v1/jobs", content=chunks(), headers={"content-type": "application/json"}
    )
    assert_error(chunked, 413, "PayloadTooLargeError")
    assert broker.engine.version == version
    assert await broker.submit("x" * 9_900)  # just under the limit


async def test_standby_answers_503_naming_the_leader(start_broker: BrokerFactory) -> None:
    leader = await start_broker()
    standby = await start_broker(leader.storage, standby=True)
    address = leader.handle.broker.address
    await poll_until(lambda: standby.handle.broker.leader_address() == address, 5)

    body = assert_error(
        await standby.http.post("/v1/jobs", json={"payload": 1}), 503, "BrokerLeadershipError"
    )
    assert body["leader"] == address
    assert_error(await standby.http.get("/readyz"), 503, "BrokerLeadershipError")


async def test_storage_failing_past_the_deadline_is_503(start_broker: BrokerFactory) -> None:
    broker = await start_broker(retry_deadline_ms=200, retry_base_ms=5, retry_cap_ms=20)
    broker.storage.failing = True
    response = await broker.http.post("/v1/jobs", json={"payload": "lost"})
    assert_error(response, 503, StorageBackendError.tag)
    broker.storage.failing = False
    job_id = await broker.submit("kept")
    assert [j["id"] for j in (await broker.state())["jobs"]] == [job_id]
    await broker.check_invariants()


async def test_a_bug_is_500_engine_state_error(
    broker: RestBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(broker.handle.broker.service, "stats", broken)
    body = assert_error(await broker.http.get("/v1/stats"), 500, "EngineStateError")
    assert "simulated" not in body["message"]
    assert (await broker.http.get("/healthz")).status_code == 200


# -- F09: every commit's bytes differ ------------------------------------------------------


async def test_f09_every_committed_state_has_a_distinct_commit_id(broker: RestBroker) -> None:
    seen: list[str] = []
    for round_ in range(5):
        job_id = await broker.submit(round_)
        seen.append((await broker.state())["commitId"])
        await broker.http.post(f"/v1/jobs/{job_id}/cancel", json={})
        broker.ledger.removed.add(job_id)
        # The document is now what it was before the submit, but for commitId.
        seen.append((await broker.state())["commitId"])
    written = broker.storage.history
    ids = [strict_json(data)["commitId"] for data in written]
    assert len(set(ids)) == len(ids)
    assert len(set(written)) == len(written)
    assert len(set(seen)) == len(seen) == 10
    await broker.check_invariants()


# -- F14: type filters over a large backlog --------------------------------------------------


async def test_f14_typed_claim_finds_b_behind_10000_a(broker: RestBroker) -> None:
    a_ids: list[str] = []
    for chunk in range(10):
        response = await broker.http.post(
            "/v1/jobs/batch",
            json={"jobs": [{"payload": chunk * 1_000 + i, "type": "A"} for i in range(1_000)]},
        )
        a_ids += [r["jobId"] for r in response.json()["results"]]
    for job_id in a_ids:
        broker.ledger.max_attempts[job_id] = 3
    b_id = await broker.submit("b", type="B")

    assert (await broker.claim("w1", ["B"]))["jobId"] == b_id
    assert await broker.claim("w2", ["C"]) == {}
    assert (await broker.claim("w3", []))["jobId"] == a_ids[0]
    assert (await broker.claim("w4"))["jobId"] == a_ids[1]
    stats = (await broker.http.get("/v1/stats")).json()
    assert (stats["total"], stats["inProgress"]) == (10_001, 3)
    await broker.check_invariants()


# -- F16: NaN, Infinity and undecodable bytes ----------------------------------------------

NON_FINITE_SUBMITS = [
    b'{"payload": NaN}',
    b'{"payload": {"x": [1, Infinity]}}',
    b'{"payload": -Infinity}',
    b'{"payload": 1e309}',
    b'{"payload": 1, "maxAttempts": NaN}',
    b'{"payload": "\xff\xfe"}',
    b'{"payload": "\\ud800"}',
]


@pytest.mark.parametrize("body", NON_FINITE_SUBMITS)
async def test_f16_non_finite_or_undecodable_submit_is_400(
    start_broker: BrokerFactory, body: bytes
) -> None:
    broker = await start_broker(broker_heartbeat_interval_ms=60_000)
    version = broker.engine.version
    response = await broker.http.post(
        "/v1/jobs", content=body, headers={"content-type": "application/json"}
    )
    assert_error(response, 400, "BrokerProtocolError")
    assert broker.engine.version == version


async def test_f16_bad_submits_inside_a_batch_fail_alone(broker: RestBroker) -> None:
    items = [b'{"payload": "good-1"}', *NON_FINITE_SUBMITS, b'{"payload": "good-2"}']
    body = b'{"jobs": [' + b", ".join(items) + b"]}"
    response = await broker.http.post(
        "/v1/jobs/batch", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == len(items)
    good, *bad, last = results
    for answer in bad:
        assert answer["error"]["_tag"] == "BrokerProtocolError"
        assert answer["error"]["message"]
    for answer in (good, last):
        broker.ledger.max_attempts[answer["jobId"]] = 3
    stored = await broker.storage.stored_document()  # strict: no NaN, no Infinity, UTF-8
    assert [j["payload"] for j in stored["jobs"]] == ["good-1", "good-2"]
    await broker.check_invariants()


# -- F18: malformed requests ---------------------------------------------------------------

JSON = {"content-type": "application/json"}
UNKNOWN = "00000000-0000-0000-0000-000000000000"
MALFORMED: list[tuple[str, str, bytes, dict[str, str], int]] = [
    ("POST", "/v1/jobs", b'{"payload": [1, 2', JSON, 400),
    ("POST", "/v1/jobs", b'[{"payload": 1}]', JSON, 400),
    ("POST", "/v1/jobs/claim", b'["w1"]', JSON, 400),
    ("POST", "/v1/jobs/batch", b'[{"payload": 1}]', JSON, 400),
    ("POST", "/v1/jobs/batch", b'{"jobs": {"payload": 1}}', JSON, 400),
    ("POST", "/v1/jobs", b'{"payload": 1}', {"content-type": "text/plain"}, 400),
    ("POST", "/v1/jobs", b"", JSON, 400),
    ("POST", "/v1/jobs", b"null", JSON, 400),
    ("POST", "/v1/jobs", b'{"type": "A"}', JSON, 400),
    ("POST", "/v1/jobs", b'{"payload": 1, "type": 123}', JSON, 400),
    ("POST", "/v1/jobs", b'{"payload": 1, "type": "' + b"t" * 1_000_000 + b'"}', JSON, 400),
    ("POST", "/v1/jobs", b'{"payload": 1, "maxAttempts": 0}', JSON, 400),
    ("POST", "/v1/jobs", b'{"payload": 1, "maxAttempts": -1}', JSON, 400),
    ("POST", "/v1/jobs", b'{"payload": 1, "maxAttempts": "3"}', JSON, 400),
    ("POST", "/v1/jobs", b'{"payload": 1, "maxAttempts": 3.5}', JSON, 400),
    ("POST", "/v1/jobs", b'{"payload": 1, "maxAttempts": 1e309}', JSON, 400),
    ("POST", "/v1/jobs", b'{"payload": 1, "maxAttempts": 18446744073709551616}', JSON, 400),
    ("POST", "/v1/jobs", b'{"payload": 1, "maxAttempts": 18446744073709551615}', JSON, 400),
    ("POST", "/v1/jobs", b'{"payload": 1, "maxAttempts": true}', JSON, 400),
    ("POST", "/v1/jobs", b'{"payload": 18446744073709551616}', JSON, 400),
    ("POST", "/v1/jobs", b'{"payload": ' + b"[" * 300 + b"]" * 300 + b"}", JSON, 400),
    ("POST", "/v1/jobs", b'{"payload": "\xc3\x28"}', JSON, 400),
    ("POST", "/v1/jobs", b'{"payload": 1, "delayMs": -5}', JSON, 400),
    ("POST", "/v1/jobs", b'{"payload": 1, "priority": "high"}', JSON, 400),
    ("POST", "/v1/jobs/claim", b'{"workerId": "w", "types": "A"}', JSON, 400),
    ("POST", "/v1/jobs/claim", b'{"workerId": "w", "types": [1]}', JSON, 400),
    ("POST", "/v1/jobs/claim", b'{"types": ["A"]}', JSON, 400),
    ("POST", "/v1/jobs/claim", b'{"workerId": ""}', JSON, 400),
    ("POST", "/v1/jobs/claim", b'{"workerId": "w", "waitMs": 3600000}', JSON, 400),
    ("POST", f"/v1/jobs/{UNKNOWN}/heartbeat", b'{"workerId": "w"}', JSON, 409),
    ("POST", f"/v1/jobs/{UNKNOWN}/complete", b'{"workerId": "w"}', JSON, 409),
    ("POST", f"/v1/jobs/{UNKNOWN}/fail", b'{"workerId": "w"}', JSON, 409),
    ("POST", f"/v1/jobs/{UNKNOWN}/complete", b'{"workerId": 7}', JSON, 400),
    ("POST", f"/v1/jobs/{UNKNOWN}/complete", b'{"workerId": "w", "attempt": "1"}', JSON, 400),
    ("POST", f"/v1/jobs/{UNKNOWN}/fail", b'{"workerId": "w", "reason": "bogus"}', JSON, 400),
    ("POST", f"/v1/jobs/{UNKNOWN}/fail", b'{"workerId": "w", "retryDelayMs": -1}', JSON, 400),
    ("POST", f"/v1/jobs/{UNKNOWN}/cancel", b"{}", JSON, 404),
    ("GET", f"/v1/jobs/{UNKNOWN}", b"", {}, 404),
    ("POST", f"/v1/jobs/{'x' * 600}/complete", b'{"workerId": "w"}', JSON, 400),
    ("POST", "/v1/dead/requeue", b'{"jobIds": "all"}', JSON, 400),
    ("POST", "/v1/jobs", b'{"payload": "' + b"x" * 1_100_000 + b'"}', JSON, 413),
    ("DELETE", "/v1/jobs", b"", {}, 405),
    ("GET", "/nowhere", b"", {}, 404),
]


async def test_f18_malformed_requests_get_4xx_and_leave_the_state_alone(
    start_broker: BrokerFactory,
) -> None:
    broker = await start_broker(broker_heartbeat_interval_ms=60_000)
    await broker.submit("existing")
    version, stored = broker.engine.version, await broker.storage.read_stored_bytes()

    for method, path, body, headers, status in MALFORMED:
        response = await broker.http.request(method, path, content=body, headers=headers)
        label = f"{method} {path[:40]} {body[:60]!r}"
        assert response.status_code == status, (label, response.status_code, response.text)
        error = response.json()
        assert isinstance(error["_tag"], str) and isinstance(error["message"], str), label
        assert broker.engine.version == version, label

    assert await broker.storage.read_stored_bytes() == stored
    assert (await broker.http.get("/healthz")).status_code == 200
    assert await broker.submit("valid right after")
    await broker.check_invariants()


async def test_keep_alive_requests_are_not_delayed_by_nagle(broker: RestBroker) -> None:
    """Each response on a kept-alive connection must leave at once (TCP_NODELAY): with
    Nagle's algorithm against delayed ACKs every one of them took 40 ms or more. The median
    is compared, so a loaded machine slowing a few requests down does not fail the test."""
    await broker.http.get("/healthz")  # open the connection
    took = []
    for _ in range(21):
        started = time.monotonic()
        assert (await broker.http.get("/healthz")).status_code == 200
        took.append(time.monotonic() - started)
    assert statistics.median(took) < 0.03


async def test_client_leaving_mid_body_is_not_logged_as_a_broker_error(
    broker: RestBroker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="osqueue")
    host, port = broker.handle.broker.address.rsplit(":", 1)
    _reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n" + b'{"payload": "' + b"x" * 100
    )
    await writer.drain()
    writer.close()
    await writer.wait_closed()

    def gone_logged() -> bool:
        return any("went away" in r.getMessage() for r in caplog.records)

    await poll_until(gone_logged, 5)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert await broker.submit("still serving")
