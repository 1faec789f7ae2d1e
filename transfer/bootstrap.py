"""P's bootstrap server (aiohttp) and D's client for it: where P's data endpoint is, and whether P is alive.

  PUT /route   {"rank", "host", "port", "engine", "prefill_id"}  -> 200; a P rank announces its endpoint
  GET /route?rank=R                                              -> 200 that record | 404 not announced yet
  GET /health                                                    -> 200 {"status": "ok"}
The P engine announces its own rank in-process (``set_route``); PUT is there for other ranks (TP > 1).
Both run on the UCX runtime's event loop; every client call has a timeout.
"""

from __future__ import annotations

import socket
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp
from aiohttp import web


class BootstrapError(RuntimeError):
    """P's bootstrap server could not be reached or gave no usable answer."""


@dataclass(frozen=True)
class Route:
    host: str
    port: int  # P's UCX data listener
    engine: dict[str, Any] = field(default_factory=dict)  # EngineDescription.to_dict()
    rank: int = 0
    prefill_id: str = ""

    @classmethod
    def from_json(cls, data: Any) -> Route:
        try:
            return cls(host=str(data["host"]), port=int(data["port"]), engine=dict(data.get("engine") or {}),
                       rank=int(data.get("rank", 0)), prefill_id=str(data.get("prefill_id", "")))
        except (KeyError, TypeError, ValueError) as e:
            raise BootstrapError(f"malformed route record {data!r:.200}: {e}") from e


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port); port 0 picks a free one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"bootstrap server cannot bind {host}:{port}: {e.strerror}") from e
    return sock


def advertised_host(host: str) -> str:
    """The address D should dial: ``host`` itself unless it is a wildcard."""
    if host in ("", "0.0.0.0", "::"):
        try:
            return socket.gethostbyname(socket.gethostname())
        except OSError:
            return "127.0.0.1"
    return host


class BootstrapServer:
    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.requested_port = port
        self.port = 0
        self._routes: dict[int, Route] = {}
        self._runner: web.AppRunner | None = None

    def set_route(self, route: Route) -> None:
        self._routes[route.rank] = route

    async def start(self) -> int:
        app = web.Application()
        app.router.add_put("/route", self._put_route)
        app.router.add_get("/route", self._get_route)
        app.router.add_get("/health", self._health)
        sock = bind_socket(self.host, self.requested_port)
        self.port = sock.getsockname()[1]
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def _put_route(self, request: web.Request) -> web.Response:
        try:
            route = Route.from_json(await request.json())
        except (BootstrapError, ValueError) as e:
            return web.json_response({"error": str(e)}, status=400)
        self.set_route(route)
        return web.json_response({"status": "ok"})

    async def _get_route(self, request: web.Request) -> web.Response:
        try:
            rank = int(request.query.get("rank", "0"))
        except ValueError:
            return web.json_response({"error": "rank must be an integer"}, status=400)
        route = self._routes.get(rank)
        if route is None:
            return web.json_response({"error": f"prefill rank {rank} has not announced its endpoint"}, status=404)
        return web.json_response(asdict(route))

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})


def _url(host: str, port: int, path: str) -> str:
    h = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"http://{h}:{port}{path}"


class BootstrapClient:
    """D's side: one aiohttp session, created on first use inside the event loop."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
        return self._session

    async def get_route(self, host: str, port: int, timeout: float, rank: int = 0) -> Route:
        try:
            async with self._get_session().get(_url(host, port, "/route"), params={"rank": str(rank)},
                                               timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                if resp.status != 200:
                    raise BootstrapError(f"GET /route answered {resp.status}: {(await resp.text())[:200]}")
                return Route.from_json(await resp.json())
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as e:
            raise BootstrapError(f"GET {_url(host, port, '/route')} failed: {type(e).__name__}: {e}") from e

    async def health(self, host: str, port: int, timeout: float) -> bool:
        try:
            async with self._get_session().get(_url(host, port, "/health"),
                                               timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                return resp.status == 200
        except (TimeoutError, aiohttp.ClientError, OSError):
            return False

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()
