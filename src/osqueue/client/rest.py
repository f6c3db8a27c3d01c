"""The REST transport: each method is one HTTP request over a kept-alive httpx connection."""

from __future__ import annotations

from typing import Any, Final
from urllib.parse import quote

import httpx

from osqueue.client._http import StreamTransport, origin_of, proxied
from osqueue.errors import (
    BrokerProtocolError,
    TransportConfigError,
    TransportConnectionError,
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

# Failures that happen before a request can have reached the broker.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
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

    Up to ``max_connections`` connections are kept alive between calls by a
    :class:`~osqueue.client._http.StreamTransport`, which gets each request as ready-made
    bytes: building httpx's request and response objects cost a worker more than the
    network did. ``token`` is sent as ``Authorization: Bearer <token>``. ``timeout_s``
    bounds a whole request; a claim that waits (``waitMs``) gets that wait on top.
    ``http_transport`` sends the requests through an :class:`httpx.AsyncClient` on that
    transport instead (tests pass :class:`httpx.MockTransport`); so does an HTTP proxy
    named in the environment for the broker's URL, on httpx's own pool.
    """

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        max_connections: int = 100,
        http_transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = normalize_base_url(base_url)
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        headers = {"user-agent": USER_AGENT, "accept": "application/json"}
        if token:
            if not token.isprintable():
                raise TransportConfigError("the token has a control character (OSQUEUE_TOKEN)")
            headers["authorization"] = f"Bearer {token}"
        self._default_timeout = self._timeout(0.0)
        direct = http_transport is None and not proxied(httpx.URL(self.base_url))
        self._stream = StreamTransport(max_connections=max_connections) if direct else None
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=self._default_timeout,
            transport=http_transport or self._stream,
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
        )
        url = httpx.URL(self.base_url)
        self._origin = origin_of(url)
        self._prefix = url.raw_path.rstrip(b"/")
        fields = {"host": url.netloc.decode("ascii"), **headers}
        self._head_fields = "".join(f"{k}: {v}\r\n" for k, v in fields.items()).encode()

    def __repr__(self) -> str:
        return f"RestTransport({self.base_url!r})"

    def _timeout(self, extra_s: float) -> httpx.Timeout:
        total_s = self.timeout_s + extra_s
        return httpx.Timeout(total_s, connect=min(self.connect_timeout_s, total_s))

    async def call(self, method: str, params: dict[str, Any]) -> Any:
        """Send one request; answer the decoded body, ``{}`` for 204."""
        verb, path, body = self._route(method, params)
        wait_ms = params.get("waitMs") if method == "claimJob" else None
        timeout = self._default_timeout
        if isinstance(wait_ms, int | float) and wait_ms > 0:
            timeout = self._timeout(wait_ms / 1000)
        content = encode_json(body) if body is not None else None
        try:
            if self._stream is not None:
                status, answer = await self._send(self._stream, verb, path, content, timeout)
            else:
                response = await self._http.request(
                    verb,
                    path,
                    content=content,
                    headers=_JSON_BODY if content is not None else None,
                    timeout=timeout,
                )
                status, answer = response.status_code, response.content
        except httpx.UnsupportedProtocol as exc:
            raise TransportConfigError(f"cannot reach {self.base_url}: {exc}") from exc
        except httpx.TransportError as exc:
            raise TransportConnectionError(
                f"{verb} {self.base_url}{path} failed: {type(exc).__name__}: {exc}",
                method=verb,
                path=path,
                request_sent=not isinstance(exc, _NOT_SENT),
            ) from exc
        return self._answer(status, answer, verb, path)

    async def _send(
        self,
        stream: StreamTransport,
        verb: str,
        path: str,
        content: bytes | None,
        timeouts: httpx.Timeout,
    ) -> tuple[int, bytes]:
        """The request as bytes straight to the stream transport: status and body."""
        head = b"%s %s%s HTTP/1.1\r\n%s" % (
            verb.encode(), self._prefix, path.encode(), self._head_fields,
        )  # fmt: skip
        if content is None:
            data = head + b"\r\n"
        else:
            data = b"%scontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
                head, len(content), content,
            )  # fmt: skip
        status, _headers, answer = await stream.send(
            self._origin,
            data,
            connect_timeout_s=timeouts.connect,
            read_timeout_s=timeouts.read,
            pool_timeout_s=timeouts.pool,
        )
        return status, answer

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
