"""The Connect transport: each method is one unary RPC of ``osqueue.v1.QueueService``.

Requests go as protobuf messages, in the binary codec (``codec="proto"``, the default) or
the JSON one (``codec="json"``), over a kept-alive httpx connection. Payloads travel as the
bytes of their JSON text. Needs the ``connect`` extra (``pip install 'osqueue[connect]'``)
for the generated messages.
"""

from __future__ import annotations

from typing import Any, Final, Literal

import httpx

from osqueue.client._http import StreamTransport, origin_of, proxied
from osqueue.client.rest import (
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_TIMEOUT_S,
    USER_AGENT,
    normalize_base_url,
)
from osqueue.errors import (
    BrokerProtocolError,
    TransportConfigError,
    TransportConnectionError,
)
from osqueue.model import decode_json

try:
    from osqueue import _connect_wire as wire
except ImportError as exc:  # protobuf-py is missing
    raise ImportError(
        "the Connect transport needs the connect extra: pip install 'osqueue[connect]'"
    ) from exc

__all__ = ["Codec", "ConnectTransport"]

Codec = Literal["proto", "json"]
CODECS: Final = ("proto", "json")

# Failures that happen before a request can have reached the broker.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


class ConnectTransport:
    """Carries client calls as Connect unary RPCs (protocol section 7).

    ``url`` is the broker's base URL (``http://host:port``). ``token`` is sent as
    ``Authorization: Bearer <token>``. ``timeout_s`` bounds a whole call; a claim that waits
    (``waitMs``) gets that wait on top. Up to ``max_connections`` connections are kept
    alive (:class:`~osqueue.client._http.StreamTransport`); ``http_transport`` replaces that
    network layer, and an HTTP proxy named in the environment for the broker's URL makes
    the calls go through httpx's own pool.
    """

    def __init__(
        self,
        url: str,
        codec: Codec = "proto",
        token: str | None = None,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        max_connections: int = 100,
        http_transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if codec not in CODECS:
            raise TransportConfigError(f"Connect codec must be 'proto' or 'json', not {codec!r}")
        self.base_url = normalize_base_url(url)
        self.codec = codec
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        headers = {
            "user-agent": USER_AGENT,
            "content-type": f"application/{codec}",
            "connect-protocol-version": "1",
        }
        if token:
            if not token.isprintable():
                raise TransportConfigError("the token has a control character (OSQUEUE_TOKEN)")
            headers["authorization"] = f"Bearer {token}"
        self._default_timeout = self._timeout(0.0)
        # Without http_transport, requests go as ready-made bytes to the stream transport
        # (httpx's request and response objects cost more than the network, see rest.py).
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
        base = httpx.URL(self.base_url)
        self._origin = origin_of(base)
        self._prefix = base.raw_path.rstrip(b"/")
        fields = {"host": base.netloc.decode("ascii"), **headers}
        self._head_fields = "".join(f"{k}: {v}\r\n" for k, v in fields.items()).encode()

    def _timeout(self, extra_s: float) -> httpx.Timeout:
        total_s = self.timeout_s + extra_s
        return httpx.Timeout(total_s, connect=min(self.connect_timeout_s, total_s))

    def __repr__(self) -> str:
        return f"ConnectTransport({self.base_url!r}, codec={self.codec!r})"

    async def call(self, method: str, params: dict[str, Any]) -> Any:
        """Send one RPC; answer the REST-shaped result, ``{}`` where REST answers 204."""
        rpc = wire.RPCS.get(method)
        if rpc is None:
            raise BrokerProtocolError(f"unknown method {method!r}", method=method)
        request, refused = wire.encode_params(method, params)
        try:
            content = self._encode(request)
        except (TypeError, ValueError) as exc:  # a value the message cannot hold
            raise BrokerProtocolError(f"{method}: {exc}", method=method) from exc
        wait_ms = params.get("waitMs") if method == "claimJob" else None
        timeout = self._default_timeout
        if isinstance(wait_ms, int | float) and wait_ms > 0:
            timeout = self._timeout(wait_ms / 1000)
        try:
            if self._stream is not None:
                status, content_type, answer = await self._send(
                    self._stream, rpc.path, content, timeout
                )
            else:
                response = await self._http.post(rpc.path, content=content, timeout=timeout)
                status, answer = response.status_code, response.content
                content_type = response.headers.get("content-type", "")
        except httpx.UnsupportedProtocol as exc:
            raise TransportConfigError(f"cannot reach {self.base_url}: {exc}") from exc
        except httpx.TransportError as exc:
            raise TransportConnectionError(
                f"POST {self.base_url}{rpc.path} failed: {type(exc).__name__}: {exc}",
                method="POST",
                path=rpc.path,
                request_sent=not isinstance(exc, _NOT_SENT),
            ) from exc
        if status != 200:
            raise self._error(status, answer, rpc.path)
        decoded = self._decode(content_type, answer, rpc.response, rpc.path)
        result = wire.decode_response(method, decoded)
        if refused:
            result["results"] = wire.splice_batch(result["results"], refused)
        return result

    def _encode(self, message: Any) -> bytes:
        if self.codec == "proto":
            data: bytes = message.to_binary()
            return data
        return str(message.to_json()).encode()

    async def _send(
        self, stream: StreamTransport, path: str, content: bytes, timeouts: httpx.Timeout
    ) -> tuple[int, str, bytes]:
        """The RPC as bytes straight to the stream transport: status, content type, body."""
        data = b"POST %s%s HTTP/1.1\r\n%scontent-length: %d\r\n\r\n%s" % (
            self._prefix, path.encode(), self._head_fields, len(content), content,
        )  # fmt: skip
        status, headers, answer = await stream.send(
            self._origin,
            data,
            connect_timeout_s=timeouts.connect,
            read_timeout_s=timeouts.read,
            pool_timeout_s=timeouts.pool,
        )
        content_type = next((v for k, v in headers if k.lower() == b"content-type"), b"")
        return status, content_type.decode("latin-1"), answer

    def _decode(self, content_type: str, content: bytes, cls: type[Any], path: str) -> Any:
        content_type = content_type.partition(";")[0].strip()
        try:
            if content_type == "application/proto":
                return cls.from_binary(content)
            if content_type == "application/json":
                return cls.from_json(content)
        except (TypeError, ValueError) as exc:
            raise BrokerProtocolError(
                f"{path} answered a message osqueue cannot read: {exc}"
            ) from exc
        raise BrokerProtocolError(f"{path} answered content type {content_type!r}, not a message")

    @staticmethod
    def _error(status: int, content: bytes, path: str) -> Exception:
        try:
            body = decode_json(content) if content else None
        except BrokerProtocolError:
            body = None
        return wire.error_from_connect(body, status=status, method="POST", path=path)

    async def aclose(self) -> None:
        """Close the kept-alive connections."""
        await self._http.aclose()
