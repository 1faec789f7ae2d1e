"""In-process harness for router tests: a router app and mock workers on ephemeral ports, one event loop.

Everything is bounded: ``wait_until`` polls a condition with a deadline (never a bare sleep), and
``running_router`` always cleans up.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from router.app import create_app
from router.app_keys import STATE_KEY
from router.config import RouterConfig
from router.state import RouterState
from router_support.mock_worker import MockWorker

FAST = {
    "health_check_interval_secs": 0.1,
    "health_check_timeout_secs": 1.0,
    "health_failure_threshold": 2,
    "health_success_threshold": 2,
    "retry_initial_backoff_ms": 1,
    "retry_max_backoff_ms": 5,
    "request_timeout_secs": 20.0,
    "seed": 1234,
}


@dataclass
class Router:
    url: str
    state: RouterState


async def wait_until(pred: Callable[[], bool | Awaitable[bool]], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if asyncio.iscoroutine(got):
            got = await got
        if got:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


def non_loopback_ip() -> str | None:
    """This machine's address on its default route (not 127.x), or None: a caller the router sees as remote."""
    for target in ("10.255.255.255", "192.0.2.1", "8.8.8.8"):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.connect((target, 9))  # a UDP connect sends nothing: it only picks the source address
                ip = s.getsockname()[0]
            except OSError:
                continue
        if not ip.startswith("127.") and ip != "0.0.0.0":
            return ip
    return None


@contextlib.asynccontextmanager
async def running_router(bind: str = "127.0.0.1", **overrides: Any) -> AsyncIterator[Router]:
    config = RouterConfig(**{**FAST, "port": 0, **overrides})
    app = create_app(config)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, bind, 0)
    await site.start()
    router = Router(f"http://127.0.0.1:{runner.addresses[0][1]}", app[STATE_KEY])
    try:
        yield router
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def mocks(*knobs: dict[str, Any]) -> AsyncIterator[list[MockWorker]]:
    workers = [MockWorker(**k) for k in knobs]
    try:
        for w in workers:
            await w.start()
        yield workers
    finally:
        for w in workers:
            await w.stop()


async def ready(router: Router, timeout: float = 5.0) -> None:
    async with aiohttp.ClientSession() as s:

        async def ok() -> bool:
            async with s.get(router.url + "/health") as r:
                return r.status == 200

        await wait_until(ok, timeout, "router readiness")


async def read_sse(resp: aiohttp.ClientResponse) -> list[Any]:
    """All events of a stream: JSON payloads, and the string "[DONE]"."""
    import json

    out: list[Any] = []
    buf = b""
    async for chunk in resp.content.iter_any():
        buf += chunk
        while b"\n\n" in buf:
            block, buf = buf.split(b"\n\n", 1)
            for line in block.split(b"\n"):
                if line.startswith(b"data: "):
                    data = line[6:]
                    out.append("[DONE]" if data == b"[DONE]" else json.loads(data))
    return out
