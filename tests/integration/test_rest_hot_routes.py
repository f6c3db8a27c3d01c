"""The hot REST routes, which BrokerApp dispatches itself before Starlette.

Requests whose scope has a ``root_path`` go through Starlette's router instead, which holds
the same endpoints; both ways must answer alike, auth and limits included.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.integration.rest_support import BrokerFactory, RestBroker
from tests.integration.test_rest import assert_error

pytestmark = pytest.mark.stores(
    "memory", reason="request routing and parsing do not depend on the store"
)

TOKEN = "s3cret"
AUTH = {"authorization": f"Bearer {TOKEN}"}
JSON = {**AUTH, "content-type": "application/json"}
UNKNOWN = "00000000-0000-0000-0000-000000000000"

#: (method, path, body, headers, status, tag or None for a success)
CASES: list[tuple[str, str, bytes, dict[str, str], int, str | None]] = [
    ("POST", "/v1/jobs", b'{"payload": 1, "type": "t"}', JSON, 200, None),
    ("POST", "/v1/jobs", b'{"payload": 1}', {"content-type": "application/json"}, 401,
     "AuthenticationError"),
    ("POST", "/v1/jobs", b'{"payload": 1}', {**AUTH, "content-type": "text/plain"}, 400,
     "BrokerProtocolError"),
    ("POST", "/v1/jobs", b"  \n", JSON, 400, "BrokerProtocolError"),
    ("POST", "/v1/jobs", b'{"payload": "' + b"x" * 2_000 + b'"}', JSON, 413,
     "PayloadTooLargeError"),
    ("POST", "/v1/jobs/batch", b'{"jobs": [{"payload": NaN}, {"payload": 2}]}', JSON, 200,
     None),
    ("POST", "/v1/jobs/claim", b'{"workerId": "w", "types": ["t"]}', JSON, 200, None),
    ("POST", "/v1/jobs/claim", b'{"workerId": 3}', JSON, 400, "BrokerProtocolError"),
    ("POST", f"/v1/jobs/{UNKNOWN}/heartbeat", b'{"workerId": "w"}', JSON, 409,
     "LeaseLostError"),
    ("POST", f"/v1/jobs/{UNKNOWN}/complete", b'{"workerId": "w"}', JSON, 409,
     "LeaseLostError"),
    ("POST", f"/v1/jobs/{UNKNOWN}/fail", b'{"workerId": "w", "reason": "x"}', JSON, 400,
     "BrokerProtocolError"),
    ("POST", f"/v1/jobs/{UNKNOWN}/finish", b'{"workerId": "w"}', JSON, 404,
     "BrokerProtocolError"),
    ("POST", "/v1/jobs//complete", b'{"workerId": "w"}', JSON, 404, "BrokerProtocolError"),
    ("POST", f"/v1/jobs/{UNKNOWN}/complete/more", b"{}", JSON, 404, "BrokerProtocolError"),
    ("GET", f"/v1/jobs/{UNKNOWN}/complete", b"", AUTH, 405, "BrokerProtocolError"),
    ("PUT", "/v1/jobs/claim", b"{}", JSON, 405, "BrokerProtocolError"),
]  # fmt: skip


@pytest.fixture
async def token_broker(start_broker: BrokerFactory) -> RestBroker:
    return await start_broker(token=TOKEN, max_body_bytes=1_000)


@pytest.fixture
async def through_starlette(token_broker: RestBroker) -> AsyncIterator[httpx.AsyncClient]:
    """A client whose requests carry a root path, so Starlette's router serves them."""
    transport = httpx.ASGITransport(app=token_broker.handle.broker.app, root_path="/osq")
    async with httpx.AsyncClient(transport=transport, base_url="http://broker/osq") as client:
        yield client


@pytest.mark.parametrize(("method", "path", "body", "headers", "status", "tag"), CASES)
async def test_hot_routes_answer_alike_with_and_without_starlette(
    token_broker: RestBroker,
    through_starlette: httpx.AsyncClient,
    method: str,
    path: str,
    body: bytes,
    headers: dict[str, str],
    status: int,
    tag: str | None,
) -> None:
    await token_broker.http.post("/v1/jobs", json={"payload": 0, "type": "t"}, headers=AUTH)
    await through_starlette.post("/v1/jobs", json={"payload": 0, "type": "t"}, headers=AUTH)

    answers: list[Any] = []
    for client in (token_broker.http, through_starlette):
        response = await client.request(method, path, content=body, headers=headers)
        if tag is None:
            assert response.status_code == status, response.text
            answers.append(sorted(response.json()))
        else:
            error = assert_error(response, status, tag)
            answers.append({**error, "message": error["message"].replace("/osq/", "/")})
    assert answers[0] == answers[1]


async def test_a_bug_in_a_hot_route_is_500_and_logged(
    broker: RestBroker, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(body: Any) -> dict[str, Any]:
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(broker.handle.broker.service, "submit", broken)
    response = await broker.http.post("/v1/jobs", json={"payload": 1})
    body = assert_error(response, 500, "EngineStateError")
    assert "simulated" not in body["message"]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == ["unexpected error on POST /v1/jobs"]
    assert errors[0].exc_info is not None


async def test_a_body_sent_in_chunks_is_read_whole(broker: RestBroker) -> None:
    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: several receive() calls
        yield b'{"payload": "'
        for _ in range(5):
            yield b"x" * 1_000
        yield b'"}'

    response = await broker.http.post(
        "/v1/jobs", content=chunks(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 200, response.text
    job = (await broker.http.get(f"/v1/jobs/{response.json()['jobId']}")).json()
    assert job["payload"] == "x" * 5_000


async def test_success_without_a_body_is_204_with_no_content(broker: RestBroker) -> None:
    job_id = await broker.submit({"n": 1})
    claimed = await broker.claim("w")
    assert claimed["jobId"] == job_id
    response = await broker.http.post(f"/v1/jobs/{job_id}/complete", json={"workerId": "w"})
    assert response.status_code == 204
    assert response.content == b""
    assert "content-length" not in response.headers or response.headers["content-length"] == "0"
