"""The HTTP layer the REST and Connect transports share: one aiohttp session per broker.

:class:`BrokerSession` keeps up to ``max_connections`` kept-alive connections to one broker
and maps aiohttp's failures to osqueue's transport errors, so that the transports only build
requests and read answers. Its :class:`aiohttp.ClientSession` is made in the running loop
at the first request (aiohttp binds a session to the loop it was made in, and a transport
may be built outside any loop, as the blocking client does).
"""

from __future__ import annotations

import urllib.request
from collections.abc import Mapping
from typing import Final

import aiohttp
from yarl import URL

from osqueue.errors import TransportConfigError, TransportConnectionError

__all__ = ["DEFAULT_MAX_IDLE_S", "BrokerSession", "bearer_header"]

#: An idle connection older than this is closed rather than reused: the broker's server
#: (uvicorn) closes connections idle for 5 s, and a request sent on a connection the server
#: is closing fails after it may have been sent.
DEFAULT_MAX_IDLE_S: Final = 3.0

# Failures that happen before a request can have reached the broker: refused, DNS, TLS
# handshake, no connection within the connect time-out.
_NOT_SENT: Final = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)
_CACHED_TIMEOUTS: Final = 32


def bearer_header(token: str | None) -> dict[str, str]:
    """The ``authorization`` header for ``token`` (none without one)."""
    if not token:
        return {}
    if not token.isprintable():
        raise TransportConfigError("the token has a control character (OSQUEUE_TOKEN)")
    return {"authorization": f"Bearer {token}"}


class BrokerSession:
    """Sends requests to the broker at ``base_url`` over kept-alive connections.

    ``headers`` go with every request. ``timeout_s`` bounds a whole request (waiting for a
    free connection included) and ``connect_timeout_s`` the opening of a connection.
    HTTP proxies are taken from the environment (``HTTP_PROXY``, ``HTTPS_PROXY``,
    ``ALL_PROXY``, ``NO_PROXY``), once, when the session is made.
    """

    def __init__(
        self,
        base_url: str,
        headers: Mapping[str, str],
        *,
        timeout_s: float,
        connect_timeout_s: float,
        max_connections: int,
    ) -> None:
        try:
            url = URL(base_url)
        except (TypeError, ValueError) as exc:
            raise TransportConfigError(f"broker URL {base_url!r} is not usable: {exc}") from exc
        if not url.host:
            raise TransportConfigError(
                f"broker URL {base_url!r} has no host: give http://host:port (url= or BROKER_URL)"
            )
        self.base_url = base_url
        self._prefix = str(url).rstrip("/")
        self._headers = dict(headers)
        self._timeout_s = timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._max_connections = max_connections
        self._default_timeout = self._make_timeout(0.0)
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {}
        self._url = url
        self._session: aiohttp.ClientSession | None = None
        self._proxy: str | None = None
        self._closed = False

    def _make_timeout(self, extra_s: float) -> aiohttp.ClientTimeout:
        total_s = self._timeout_s + extra_s
        return aiohttp.ClientTimeout(
            total=total_s, sock_connect=min(self._connect_timeout_s, total_s)
        )

    def timeout(self, wait_ms: object) -> aiohttp.ClientTimeout:
        """The time-out of a request that may wait ``wait_ms`` at the broker (a claim's
        ``waitMs``) on top of the usual ``timeout_s``."""
        if not isinstance(wait_ms, int | float) or wait_ms <= 0:
            return self._default_timeout
        timeout = self._timeouts.get(wait_ms)
        if timeout is None:
            if len(self._timeouts) >= _CACHED_TIMEOUTS:
                self._timeouts.clear()
            timeout = self._timeouts[wait_ms] = self._make_timeout(wait_ms / 1000)
        return timeout

    def _open(self) -> aiohttp.ClientSession:
        if self._closed:
            raise TransportConfigError("this transport is closed; create a new one")
        self._proxy = _env_proxy(self._url)
        connector = aiohttp.TCPConnector(
            limit=self._max_connections, limit_per_host=0, keepalive_timeout=DEFAULT_MAX_IDLE_S
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers=self._headers,
            timeout=self._default_timeout,
            # trust_env=True would look up the proxy and ~/.netrc in a thread on every
            # request (aiohttp 3.14), which halved the submits a client could send: the
            # proxy is looked up once instead (_env_proxy), and netrc is not used.
            trust_env=False,
            # The broker sets no cookies, and compressing its small answers costs more
            # than it saves on the links a queue runs on.
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("accept-encoding",),
        )
        return self._session

    async def send(
        self,
        verb: str,
        path: str,
        content: bytes | None,
        headers: Mapping[str, str] | None,
        timeouts: aiohttp.ClientTimeout,
    ) -> tuple[int, str, bytes]:
        """Send one request; answer its status, content type and body.

        Raises :class:`TransportConnectionError` when the broker could not be reached or
        the exchange failed, with ``request_sent=False`` only when no connection was made,
        and :class:`TransportConfigError` for a URL aiohttp cannot use.
        """
        session = self._session or self._open()
        try:
            async with session.request(
                verb,
                self._prefix + path,
                data=content,
                headers=headers,
                timeout=timeouts,
                proxy=self._proxy,
            ) as response:
                return response.status, response.content_type, await response.read()
        except aiohttp.InvalidURL as exc:
            raise TransportConfigError(f"cannot reach {self.base_url}: {exc}") from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TransportConnectionError(
                f"{verb} {self.base_url}{path} failed: {type(exc).__name__}: {exc}",
                method=verb,
                path=path,
                request_sent=not isinstance(exc, _NOT_SENT),
            ) from exc

    async def aclose(self) -> None:
        """Close the kept-alive connections; requests after this are refused."""
        self._closed = True
        if self._session is not None:
            await self._session.close()


def _env_proxy(url: URL) -> str | None:
    """The HTTP proxy the environment names for ``url`` (``HTTP_PROXY``, ``HTTPS_PROXY``,
    ``ALL_PROXY``), or None when there is none or ``NO_PROXY`` exempts its host."""
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get(url.scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass(url.host or ""):
        return None
    return proxy
