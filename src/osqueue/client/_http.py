"""A small HTTP/1.1 keep-alive transport for httpx, on asyncio streams.

httpx's default pool (httpcore) costs the REST client most of its time once many requests
are in flight: on every request it checks every pooled connection for expiry (a socket
poll and a dict of socket attributes each), its locks try to import ``sniffio`` on every
use when it is not installed, and it keeps at most 20 idle connections, so a client with
more tasks in flight closes and reopens connections all the time. With 64 tasks the REST
client reached about 150 requests per second where the WebSocket client reached 4,000.

This transport keeps one idle list per origin and checks only the connection it is about to
use. It speaks what the broker speaks: HTTP/1.1, one request at a time per connection,
bodies framed by ``Content-Length`` or chunked (or, without either, by the connection's
end). The REST and Connect transports hand it ready-made request bytes through
:meth:`StreamTransport.send`, which goes straight to the broker: HTTP proxies named in the
environment (``HTTP_PROXY``, ``ALL_PROXY``) are not used, nor HTTP/2 or client
certificates, so those transports keep httpx's own pool when :func:`proxied` says a proxy
applies.
"""

from __future__ import annotations

import asyncio
import ssl
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Final

import httpx

__all__ = ["DEFAULT_MAX_IDLE_S", "Origin", "StreamTransport", "origin_of", "proxied"]

#: An idle connection older than this is closed rather than reused: the broker's server
#: (uvicorn) closes connections idle for 5 s, and a request sent on a connection the
#: server is closing fails after it may have been sent.
DEFAULT_MAX_IDLE_S: Final = 3.0
_MAX_HEAD_BYTES: Final = 64 * 1024
_NO_BODY_STATUSES: Final = frozenset((204, 304))

Origin = tuple[str, str, int]


@dataclass(slots=True)
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    idle_since_s: float = field(default_factory=time.monotonic)

    def usable(self, max_idle_s: float) -> bool:
        return (
            not self.reader.at_eof()
            and not self.writer.is_closing()
            and time.monotonic() - self.idle_since_s < max_idle_s
        )

    def close(self) -> None:
        self.writer.close()


class StreamTransport(httpx.AsyncBaseTransport):
    """Sends each request on an idle kept-alive connection, or a new one when none is idle.

    At most ``max_connections`` requests are in flight at once (a request waits for a free
    place up to the ``pool`` timeout); every connection that ends a request cleanly is kept
    for the next one, for up to ``max_idle_s``.
    """

    def __init__(
        self,
        *,
        max_connections: int = 100,
        max_idle_s: float = DEFAULT_MAX_IDLE_S,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._places = asyncio.Semaphore(max_connections)
        self._idle: dict[Origin, list[_Connection]] = {}
        self._max_idle_s = max_idle_s
        self._ssl_context = ssl_context
        self._closed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts = request.extensions.get("timeout", {})
        await request.aread()
        status, headers, body = await self.send(
            origin_of(request.url),
            _request_bytes(request),
            head_only=request.method == "HEAD",
            connect_timeout_s=timeouts.get("connect"),
            read_timeout_s=timeouts.get("read"),
            pool_timeout_s=timeouts.get("pool"),
        )
        return httpx.Response(
            status,
            headers=headers,
            content=body,
            request=request,
            extensions={"http_version": b"HTTP/1.1"},
        )

    async def send(
        self,
        origin: Origin,
        data: bytes,
        *,
        head_only: bool = False,
        connect_timeout_s: float | None = None,
        read_timeout_s: float | None = None,
        pool_timeout_s: float | None = None,
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """Send one whole request (head and body, as bytes) to ``origin`` and answer the
        status, headers and body. Raises httpx's transport errors (ConnectError,
        ConnectTimeout and PoolTimeout before anything was sent)."""
        await self._take_place(pool_timeout_s)
        try:
            connection = await self._connection(origin, connect_timeout_s)
            try:
                async with asyncio.timeout(read_timeout_s):
                    status, headers, body, reusable = await _exchange(connection, data, head_only)
            except TimeoutError as exc:
                connection.close()
                raise httpx.ReadTimeout(f"no answer within the timeout: {exc}") from exc
            except BaseException:
                connection.close()
                raise
            if reusable and not self._closed:
                connection.idle_since_s = time.monotonic()
                self._idle.setdefault(origin, []).append(connection)
            else:
                connection.close()
        finally:
            self._places.release()
        return status, headers, body

    async def _take_place(self, timeout_s: float | None) -> None:
        if not self._places.locked():
            await self._places.acquire()  # free: returns at once
            return
        try:
            async with asyncio.timeout(timeout_s):
                await self._places.acquire()
        except TimeoutError as exc:
            raise httpx.PoolTimeout("no free connection within the pool timeout") from exc

    async def _connection(self, origin: Origin, timeout_s: float | None) -> _Connection:
        idle = self._idle.get(origin)
        while idle:
            connection = idle.pop()
            if connection.usable(self._max_idle_s):
                return connection
            connection.close()
        scheme, host, port = origin
        tls = self._tls() if scheme == "https" else None
        try:
            async with asyncio.timeout(timeout_s):
                reader, writer = await asyncio.open_connection(
                    host, port, ssl=tls, server_hostname=host if tls else None
                )
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(f"could not connect to {host}:{port} in time") from exc
        except OSError as exc:
            raise httpx.ConnectError(str(exc) or type(exc).__name__) from exc
        return _Connection(reader, writer)

    def _tls(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = httpx.create_ssl_context()
        return self._ssl_context

    async def aclose(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
        self._idle.clear()


def proxied(url: httpx.URL) -> bool:
    """Whether the environment names an HTTP proxy for ``url`` (``HTTP_PROXY``,
    ``HTTPS_PROXY`` or ``ALL_PROXY``, unless ``NO_PROXY`` exempts its host)."""
    proxies = urllib.request.getproxies_environment()
    if not (proxies.get(url.scheme) or proxies.get("all")):
        return False
    return not urllib.request.proxy_bypass(url.host)


def origin_of(url: httpx.URL) -> Origin:
    """``(scheme, host, port)``, the key connections are kept under."""
    scheme = url.scheme
    port = url.port or (443 if scheme == "https" else 80)
    return scheme, url.host, port


def _request_bytes(request: httpx.Request) -> bytes:
    lines = [b"%s %s HTTP/1.1" % (request.method.encode(), request.url.raw_path)]
    lines.extend(b"%s: %s" % (name, value) for name, value in request.headers.raw)
    lines.append(b"\r\n")
    return b"\r\n".join(lines) + request.content


async def _exchange(
    connection: _Connection, data: bytes, head_only: bool
) -> tuple[int, list[tuple[bytes, bytes]], bytes, bool]:
    """Write a request and read its answer: status, headers, body, and whether the
    connection may carry another request."""
    try:
        connection.writer.write(data)
        await connection.writer.drain()
        while True:
            status, headers, keep_alive = await _read_head(connection.reader)
            if status >= 200:
                break
        if head_only or status in _NO_BODY_STATUSES:
            return status, headers, b"", keep_alive
        body, framed = await _read_body(connection.reader, headers)
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        raise httpx.ReadError(f"the connection failed: {type(exc).__name__}: {exc}") from exc
    return status, headers, body, keep_alive and framed


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, list[tuple[bytes, bytes]], bool]:
    head = await reader.readuntil(b"\r\n\r\n")
    if len(head) > _MAX_HEAD_BYTES:
        raise httpx.RemoteProtocolError("the answer's head is too large")
    status_line, *lines = head[:-4].split(b"\r\n")
    parts = status_line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise httpx.RemoteProtocolError(f"not an HTTP/1.1 answer: {status_line[:80]!r}")
    headers: list[tuple[bytes, bytes]] = []
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon:
            raise httpx.RemoteProtocolError(f"malformed header line {line[:80]!r}")
        headers.append((name.strip(), value.strip()))
    connection_tokens = b",".join(v for n, v in headers if n.lower() == b"connection").lower()
    keep_alive = parts[0] == b"HTTP/1.1" and b"close" not in connection_tokens
    return int(parts[1]), headers, keep_alive


async def _read_body(
    reader: asyncio.StreamReader, headers: list[tuple[bytes, bytes]]
) -> tuple[bytes, bool]:
    """The body and whether its end was framed (else the connection ended it)."""
    length: int | None = None
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"transfer-encoding" and b"chunked" in value.lower():
            return await _read_chunked(reader), True
        if lowered == b"content-length":
            if not value.isdigit():
                raise httpx.RemoteProtocolError(f"bad Content-Length {value[:40]!r}")
            length = int(value)
    if length is None:
        return await reader.read(), False
    return (await reader.readexactly(length) if length else b""), True


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    chunks: list[bytes] = []
    while True:
        size_line = await reader.readuntil(b"\r\n")
        try:
            size = int(size_line.split(b";", 1)[0].strip(), 16)
        except ValueError as exc:
            raise httpx.RemoteProtocolError(f"bad chunk size {size_line[:40]!r}") from exc
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                pass
            return b"".join(chunks)
        chunks.append(await reader.readexactly(size))
        await reader.readexactly(2)
