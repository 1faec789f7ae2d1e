"""The router's pooled HTTP/1.1 client against real servers: aiohttp apps, and raw asyncio servers for misbehaviour."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from router_support.dropping_server import dropping_server  # noqa: E402

from router.h1_client import ConnectTimeout, H1Client, Origin, request_bytes
from router.h1_conn import Disconnected, ResponseTimeout

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@contextlib.asynccontextmanager
async def aiohttp_server(handler: Handler, keepalive_timeout: float = 75.0) -> AsyncIterator[tuple[Origin, set[int]]]:
    """An aiohttp app answering every POST/GET with ``handler``; yields (origin, client ports seen)."""
    ports: set[int] = set()

    async def record(request: web.Request) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        if peer:
            ports.add(peer[1])
        return await handler(request)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, keepalive_timeout=keepalive_timeout)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield Origin.of(f"http://127.0.0.1:{runner.addresses[0][1]}"), ports
    finally:
        await runner.cleanup()


async def wait_for(pred: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def post(origin: Origin, body: bytes = b"{}", path: str = "/x") -> bytes:
    return request_bytes(origin, "POST", path, {"Content-Type": "application/json"}, body)


async def test_content_length_answer_and_keep_alive_reuse() -> None:
    async def echo(request: web.Request) -> web.Response:
        return web.Response(body=b"got " + await request.read(), content_type="application/json")

    async with aiohttp_server(echo) as (origin, ports):
        client = H1Client(30.0, 5.0)
        for i in range(5):
            resp = await client.request(origin, post(origin, b'{"i": %d}' % i), 10.0)
            assert resp.status == 200 and resp.content_type == "application/json"
            assert await resp.read() == b'got {"i": %d}' % i
        assert len(ports) == 1  # one connection carried all five
        assert client.idle_count(origin) == 1
        client.close()


async def test_chunked_answer_streams_piece_by_piece() -> None:
    release = asyncio.Event()

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: 1\n\n")
        await release.wait()
        await resp.write(b"data: 2\n\n" * 3)
        await resp.write_eof()
        return resp

    async with aiohttp_server(stream) as (origin, _):
        client = H1Client(30.0, 5.0)
        resp = await client.request(origin, post(origin), 10.0)
        assert resp.content_type == "text/event-stream"
        pieces = aiter(resp)
        assert await anext(pieces) == b"data: 1\n\n"  # before the server wrote the rest
        release.set()
        rest = b"".join([p async for p in pieces])
        assert rest == b"data: 2\n\n" * 3
        resp.release()
        assert client.idle_count(origin) == 1  # chunked end reached: reusable
        client.close()


async def test_a_large_answer_read_slowly_arrives_whole() -> None:
    blob = bytes(range(256)) * 4096 * 2  # 2 MiB: reading pauses above the high-water mark

    async def big(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        for i in range(0, len(blob), 65536):
            await resp.write(blob[i : i + 65536])
        await resp.write_eof()
        return resp

    async with aiohttp_server(big) as (origin, _):
        client = H1Client(30.0, 5.0)
        resp = await client.request(origin, post(origin), 10.0)
        got = bytearray()
        async for piece in resp:
            got += piece
            await asyncio.sleep(0.001)
        assert bytes(got) == blob
        resp.release()
        again = await client.request(origin, post(origin), 10.0)  # the connection is healthy afterwards
        assert await again.read() == blob
        client.close()


async def test_server_closing_an_idle_connection_is_not_an_error() -> None:
    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async with aiohttp_server(ok, keepalive_timeout=0.2) as (origin, ports):
        client = H1Client(30.0, 5.0)
        assert await (await client.request(origin, post(origin), 10.0)).read() == b"ok"
        await wait_for(lambda: client.idle_count(origin) == 0, "the server to close the idle connection")
        assert await (await client.request(origin, post(origin), 10.0)).read() == b"ok"
        assert len(ports) == 2
        client.close()


@contextlib.asynccontextmanager
async def raw_server(answer_first: bool) -> AsyncIterator[tuple[Origin, list[int]]]:
    """Answers the first request of a connection if ``answer_first``, then drops it (see dropping_server)."""
    async with dropping_server(int(answer_first), b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok") as (url, seen):
        yield Origin.of(url), seen


async def test_stale_connection_is_retried_once_on_a_fresh_one() -> None:
    async with raw_server(answer_first=True) as (origin, seen):
        client = H1Client(30.0, 5.0)
        assert await (await client.request(origin, post(origin), 10.0)).read() == b"ok"
        # the reused connection is dropped without an answer; the fresh one answers
        assert await (await client.request(origin, post(origin), 10.0)).read() == b"ok"
        assert seen == [2, 1]
        client.close()


async def test_a_fresh_connection_dropping_the_request_is_an_error() -> None:
    async with raw_server(answer_first=False) as (origin, seen):
        client = H1Client(30.0, 5.0)
        with pytest.raises(Disconnected) as e:
            await client.request(origin, post(origin), 10.0)
        assert e.value.before_response and seen == [1]  # not retried: the connection was new
        client.close()


async def test_timeout_closes_the_connection() -> None:
    left = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            left.set()  # aiohttp cancels the handler when the client disconnects
            raise
        return web.Response(text="late")

    async with aiohttp_server(slow) as (origin, _):
        client = H1Client(30.0, 5.0)
        with pytest.raises(ResponseTimeout):
            await client.request(origin, post(origin), 0.2)
        await asyncio.wait_for(left.wait(), 5)
        assert client.idle_count(origin) == 0
        client.close()


async def test_timeout_covers_the_body_too() -> None:
    async def stalls(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(b"part")
        await asyncio.sleep(30)
        return resp

    async with aiohttp_server(stalls) as (origin, _):
        client = H1Client(30.0, 5.0)
        resp = await client.request(origin, post(origin), 0.3)
        with pytest.raises(ResponseTimeout):
            await resp.read()
        client.close()


@pytest.mark.parametrize("how", ["cancel", "close"])
async def test_cancelled_or_closed_request_closes_the_connection(how: str) -> None:
    started, left = asyncio.Event(), asyncio.Event()

    async def hangs(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(b"first")
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            left.set()
            raise
        return resp

    async with aiohttp_server(hangs) as (origin, _):
        client = H1Client(30.0, 5.0)
        resp = await client.request(origin, post(origin), 10.0)

        async def consume() -> None:
            async for _ in resp:
                pass

        task = asyncio.ensure_future(consume())
        await asyncio.wait_for(started.wait(), 5)
        if how == "cancel":
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        else:
            resp.close()
            with pytest.raises(ConnectionError):
                await task
        await asyncio.wait_for(left.wait(), 5)  # the server saw the client leave
        assert client.idle_count(origin) == 0
        client.close()


async def test_cancel_while_waiting_for_the_head_closes_the_connection() -> None:
    arrived, left = asyncio.Event(), asyncio.Event()

    async def never(request: web.Request) -> web.Response:
        arrived.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            left.set()
            raise
        return web.Response()

    async with aiohttp_server(never) as (origin, _):
        client = H1Client(30.0, 5.0)
        task = asyncio.ensure_future(client.request(origin, post(origin), 10.0))
        await asyncio.wait_for(arrived.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(left.wait(), 5)
        client.close()


async def test_connection_refused_and_connect_timeout() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = H1Client(30.0, 0.3)
    origin = Origin.of(f"http://127.0.0.1:{port}")
    with pytest.raises(ConnectionRefusedError):
        await client.request(origin, post(origin), 5.0)
    # a listener whose accept queue is full: the handshake never completes
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    try:
        origin = Origin.of(f"http://127.0.0.1:{listener.getsockname()[1]}")
        for _ in range(4):
            f = socket.socket()
            f.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                f.connect(listener.getsockname())
            fillers.append(f)
        await asyncio.sleep(0.1)
        with pytest.raises(ConnectTimeout):
            await client.request(origin, post(origin), 5.0)
    finally:
        for f in fillers:
            f.close()
        listener.close()
    client.close()


async def test_forget_and_close_drop_connections() -> None:
    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async with aiohttp_server(ok) as (origin, _):
        client = H1Client(30.0, 5.0)
        await (await client.request(origin, post(origin), 10.0)).read()
        assert client.idle_count(origin) == 1
        client.forget(origin)
        assert client.idle_count(origin) == 0
        await (await client.request(origin, post(origin), 10.0)).read()
        client.close()
        assert client.idle_count(origin) == 0


async def test_request_bytes_and_origins() -> None:
    origin = Origin.of("http://[::1]:8080/base/")
    assert (origin.host, origin.port, origin.netloc, origin.prefix) == ("::1", 8080, "[::1]:8080", "/base")
    assert Origin.of("https://h").port == 443 and Origin.of("http://h").port == 80
    raw = request_bytes(origin, "GET", "/v1/models?x=1", {"Authorization": "Bearer k"}, None)
    assert raw == b"GET /base/v1/models?x=1 HTTP/1.1\r\nHost: [::1]:8080\r\nAuthorization: Bearer k\r\n\r\n"
    raw = request_bytes(origin, "POST", "/g", {}, b"{}")
    assert raw.endswith(b"Content-Length: 2\r\n\r\n{}")
    for bad in ({"x-request-id": "a\r\nInjected: 1"}, {"x": "nul\0"}):
        with pytest.raises(ValueError):
            request_bytes(origin, "GET", "/", bad, None)
    with pytest.raises(ValueError):
        request_bytes(origin, "GET", "/a b", {}, None)
    with pytest.raises(ValueError):
        Origin.of("ftp://h:1")
