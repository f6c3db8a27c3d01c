"""The Connect transport: each method is one unary RPC of ``osqueue.v1.QueueService``.

Requests go as protobuf messages, in the binary codec (``codec="proto"``, the default) or
the JSON one (``codec="json"``), over a kept-alive aiohttp connection. Payloads travel as the
bytes of their JSON text. Needs the ``connect`` extra (``pip install 'osqueue[connect]'``)
for the generated messages.
"""

from __future__ import annotations

from typing import Any, Final, Literal

from osqueue.client._session import BrokerSession, bearer_header
from osqueue.client.rest import (
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_TIMEOUT_S,
    USER_AGENT,
    normalize_base_url,
)
from osqueue.errors import BrokerProtocolError, TransportConfigError
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


class ConnectTransport:
    """Carries client calls as Connect unary RPCs (protocol section 7).

    ``url`` is the broker's base URL (``http://host:port``). ``token`` is sent as
    ``Authorization: Bearer <token>``. ``timeout_s`` bounds a whole call; a claim that waits
    (``waitMs``) gets that wait on top. Up to ``max_connections`` connections are kept
    alive, on one :class:`aiohttp.ClientSession`; HTTP proxies named in the environment
    apply.
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
            **bearer_header(token),
        }
        self._http = BrokerSession(
            self.base_url,
            headers,
            timeout_s=timeout_s,
            connect_timeout_s=connect_timeout_s,
            max_connections=max_connections,
        )

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
        timeout = self._http.timeout(params.get("waitMs") if method == "claimJob" else None)
        status, content_type, answer = await self._http.send(
            "POST", rpc.path, content, None, timeout
        )
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
