"""The REST client's keep-alive HTTP/1.1 transport against a scripted loopback server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import httpx
import pytest

from osqueue.client._http import StreamTransport

Answer = Callable[[bytes], bytes]


class ScriptedServer:
    """Answers each request with ``answer(request head)``; counts connections and
    requests; closes a connection after an answer with ``Connection: close``."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.connections = 0
        self.requests: list[bytes] = []
        self.writers: list[asyncio.StreamWriter] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length) if length else b""
                self.requests.append(head + body)
                reply = self.answer(head)
                writer.write(reply)
                await writer.drain()
                if b"connection: close" in reply.lower():
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@asynccontextmanager
async def serving(answer: Answer) -> AsyncIterator[tuple[ScriptedServer, httpx.AsyncClient]]:
    script = ScriptedServer(answer)
    server = await asyncio.start_server(script.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", transport=StreamTransport(max_connections=4)
    )
    try:
        yield script, client
    finally:
        await client.aclose()
        server.close()
        await server.wait_closed()


def ok(body: bytes = b'{"ok":true}') -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)


async def test_sequential_requests_share_one_connection() -> None:
    async with serving(lambda head: ok()) as (script, client):
        for _ in range(5):
            response = await client.post("/v1/jobs", content=b'{"payload":1}')
            assert response.json() == {"ok": True}
    assert script.connections == 1
    assert len(script.requests) == 5
    assert script.requests[0].startswith(b"POST /v1/jobs HTTP/1.1\r\n")
    assert script.requests[0].endswith(b'\r\n\r\n{"payload":1}')


async def test_concurrent_requests_keep_their_connections_for_the_next_ones() -> None:
    async with serving(lambda head: ok()) as (script, client):
        for _ in range(3):
            await asyncio.gather(*(client.get("/v1/stats") for _ in range(4)))
    assert script.connections == 4
    assert len(script.requests) == 12


async def test_chunked_and_empty_bodies_are_read_whole() -> None:
    def answer(head: bytes) -> bytes:
        if head.startswith(b"GET /chunked"):
            return (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                b'4\r\n{"a"\r\n3;ext=1\r\n:1}\r\n0\r\n\r\n'
            )
        return b"HTTP/1.1 204 No Content\r\n\r\n"

    async with serving(answer) as (script, client):
        assert (await client.get("/chunked")).json() == {"a": 1}
        assert (await client.post("/done", content=b"{}")).status_code == 204
        assert (await client.get("/chunked")).content == b'{"a":1}'
    assert script.connections == 1


async def test_a_connection_the_server_closes_is_not_reused() -> None:
    def answer(head: bytes) -> bytes:
        return b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\n{}"

    async with serving(answer) as (script, client):
        for _ in range(3):
            assert (await client.get("/v1/stats")).json() == {}
    assert script.connections == 3


async def test_an_idle_connection_closed_by_the_server_is_replaced() -> None:
    transport = StreamTransport()
    async with serving(lambda head: ok()) as (script, client):
        client._transport = transport
        await client.get("/v1/stats")
        [idle] = [c for pool in transport._idle.values() for c in pool]
        script.writers[0].close()  # the server drops the idle connection
        await idle.reader.read()  # the client side sees the end of the stream
        assert (await client.get("/v1/stats")).status_code == 200
    assert script.connections == 2


async def test_a_dropped_answer_is_a_read_error_and_no_answer_a_timeout() -> None:
    def answer(head: bytes) -> bytes:
        if head.startswith(b"GET /slow"):
            return b""  # never answers
        return b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\nconnection: close\r\n\r\n{}"

    async with serving(answer) as (_script, client):
        with pytest.raises(httpx.ReadError):
            await client.get("/short")
        with pytest.raises(httpx.ReadTimeout):
            await client.get("/slow", timeout=0.2)


async def test_a_refused_connection_is_a_connect_error() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    async with httpx.AsyncClient(transport=StreamTransport()) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(f"http://127.0.0.1:{port}/v1/stats")


def test_a_proxy_from_the_environment_keeps_the_rest_client_on_httpx(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from osqueue.client.rest import RestTransport

    monkeypatch.setenv("HTTP_PROXY", "http://proxy.invalid:3128")
    monkeypatch.setenv("NO_PROXY", "exempt.example")
    assert RestTransport("http://broker.example:8080")._stream is None
    assert RestTransport("http://exempt.example:8080")._stream is not None
    monkeypatch.delenv("HTTP_PROXY")
    assert RestTransport("http://broker.example:8080")._stream is not None
