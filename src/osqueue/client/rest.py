"""The REST transport: each method is one HTTP request over a kept-alive aiohttp connection."""

from __future__ import annotations

from typing import Any, Final
from urllib.parse import quote

from osqueue.client._session import BrokerSession, bearer_header
from osqueue.errors import (
    BrokerProtocolError,
    TransportConfigError,
    error_from_body,
)
from osqueue.model import decode_json, encode_json

__all__ = ["DEFAULT_CONNECT_TIMEOUT_S", "DEFAULT_TIMEOUT_S", "ROUTES", "RestTransport"]

DEFAULT_TIMEOUT_S: Final = 30.0
DEFAULT_CONNECT_TIMEOUT_S: Final = 5.0
USER_AGENT: Final = "osqueue-python"

#: method name -> (HTTP verb, path template, whether ``params`` is sent as the body).
#: ``{jobId}`` is filled from ``params["jobId"]``, which is then left out of the body.
ROUTES: Final[dict[str, tuple[str, str, bool]]] = {
    "submitJob": ("POST", "/v1/jobs", True),
    "submitBatch": ("POST", "/v1/jobs/batch", True),
    "claimJob": ("POST", "/v1/jobs/claim", True),
    "heartbeat": ("POST", "/v1/jobs/{jobId}/heartbeat", True),
    "completeJob": ("POST", "/v1/jobs/{jobId}/complete", True),
    "failJob": ("POST", "/v1/jobs/{jobId}/fail", True),
    "getStats": ("GET", "/v1/stats", False),
    "listJobs": ("GET", "/v1/jobs", False),
    "getJob": ("GET", "/v1/jobs/{jobId}", False),
    "cancelJob": ("POST", "/v1/jobs/{jobId}/cancel", True),
    "listDead": ("GET", "/v1/dead", False),
    "requeueDead": ("POST", "/v1/dead/requeue", True),
    "purgeDead": ("DELETE", "/v1/dead", False),
}

_JSON_BODY: Final = {"content-type": "application/json"}


def normalize_base_url(url: str) -> str:
    """``http(s)://host:port`` without a trailing slash; a bare ``host:port`` gets ``http://``.

    The bare form is what the state document's ``broker`` field holds.
    """
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = f"http://{url}"
    scheme = url.split("://", 1)[0].lower()
    if scheme not in ("http", "https") or url.endswith("://"):
        raise TransportConfigError(
            f"broker URL {url!r} is not usable: give http://host:port (url= or BROKER_URL)"
        )
    return url


class RestTransport:
    """Carries client calls as the REST requests of the protocol (section 5).

    Up to ``max_connections`` connections are kept alive between calls, on one
    :class:`aiohttp.ClientSession`; HTTP proxies named in the environment apply.
    ``token`` is sent as ``Authorization: Bearer <token>``. ``timeout_s`` bounds a whole
    request; a claim that waits (``waitMs``) gets that wait on top.
    """

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        max_connections: int = 100,
    ) -> None:
        self.base_url = normalize_base_url(base_url)
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        headers = {"user-agent": USER_AGENT, "accept": "application/json", **bearer_header(token)}
        self._headers = headers
        self._http = BrokerSession(
            self.base_url,
            headers,
            timeout_s=timeout_s,
            connect_timeout_s=connect_timeout_s,
            max_connections=max_connections,
        )

    def __repr__(self) -> str:
        return f"RestTransport({self.base_url!r})"

    async def call(self, method: str, params: dict[str, Any]) -> Any:
        """Send one request; answer the decoded body, ``{}`` for 204."""
        verb, path, body = self._route(method, params)
        timeout = self._http.timeout(params.get("waitMs") if method == "claimJob" else None)
        if body is None:
            status, _, answer = await self._http.send(verb, path, None, None, timeout)
        else:
            content = encode_json(body)
            status, _, answer = await self._http.send(verb, path, content, _JSON_BODY, timeout)
        return self._answer(status, answer, verb, path)

    @staticmethod
    def _route(method: str, params: dict[str, Any]) -> tuple[str, str, dict[str, Any] | None]:
        route = ROUTES.get(method)
        if route is None:
            raise BrokerProtocolError(f"unknown method {method!r}", method=method)
        verb, template, has_body = route
        body = dict(params)
        path = template
        if "{jobId}" in template:
            job_id = body.pop("jobId", None)
            if not isinstance(job_id, str) or not job_id:
                raise BrokerProtocolError(f"{method} needs a string jobId", method=method)
            path = template.replace("{jobId}", quote(job_id, safe=""))
        return verb, path, body if has_body else None

    @staticmethod
    def _answer(status: int, content: bytes, verb: str, path: str) -> Any:
        if status == 204:
            return {}
        try:
            decoded = decode_json(content) if content else None
        except BrokerProtocolError:
            decoded = None
        if 200 <= status < 300:
            if decoded is None and content:
                raise BrokerProtocolError(
                    f"{verb} {path} answered {status} with a body that is not JSON"
                )
            return {} if decoded is None else decoded
        raise error_from_body(decoded, status=status, method=verb, path=path)

    async def aclose(self) -> None:
        """Close the kept-alive connections."""
        await self._http.aclose()
