"""P's bootstrap server (aiohttp) and D's client for it: how to reach P's data path, and whether P is alive.

  PUT /route   {"rank", "host", "address", "accept_id", "engine", "prefill_id"}  -> 200; another P rank
               announces its endpoint. With a cluster secret the request must carry
               ``X-SGLang-PD-Signature: key.sign("route", body_digest("PUT", "/route", body))`` (else 401);
               without one only loopback callers may (else 403). Nobody may replace a rank this
               server announced itself (409).
  GET /route?rank=R                                              -> 200 that record | 404 not announced yet
  GET /health                                                    -> 200 {"status": "ok"}
A route names P's UCX worker address (hex) and the accept id of its engine (protocol.py); ``auth`` says
whether P requires signed links. The P engine announces its own rank in-process (``set_route``); PUT is
there for other ranks (TP > 1). Both run on the UCX runtime's event loop; every client call has a timeout.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from pd_common.cluster_auth import SIGNATURE_HEADER, ClusterAuthError, ClusterKey, body_digest
from transfer.hosts import advertised_host  # noqa: F401 - re-exported (older imports)

logger = logging.getLogger(__name__)

MAX_ROUTE_BODY = 1 << 20


class BootstrapError(RuntimeError):
    """P's bootstrap server could not be reached or gave no usable answer."""


@dataclass(frozen=True)
class Route:
    host: str  # P's advertised data host (information: D reaches P through ``address``)
    address: str  # hex of P's UCX worker address
    accept_id: int  # P engine's accept id: D sends its Hello on protocol.accept_tag(accept_id)
    engine: dict[str, Any] = field(default_factory=dict)  # EngineDescription.to_dict()
    rank: int = 0
    prefill_id: str = ""
    auth: bool = False  # P requires links signed with the cluster secret

    @classmethod
    def from_json(cls, data: Any) -> Route:
        try:
            route = cls(
                host=str(data["host"]),
                address=str(data["address"]),
                accept_id=int(data["accept_id"]),
                engine=dict(data.get("engine") or {}),
                rank=int(data.get("rank", 0)),
                prefill_id=str(data.get("prefill_id", "")),
                auth=bool(data.get("auth", False)),
            )
            bytes.fromhex(route.address)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise BootstrapError(f"malformed route record {data!r:.200}: {e}") from e
        if not route.address or route.rank < 0 or route.accept_id < 0:
            raise BootstrapError(f"malformed route record {data!r:.200}")
        return route

    @property
    def worker_address(self) -> bytes:
        return bytes.fromhex(self.address)


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


def is_loopback(remote: str | None) -> bool:
    try:
        return remote is not None and ipaddress.ip_address(remote.split("%")[0]).is_loopback
    except ValueError:
        return False


class BootstrapServer:
    def __init__(self, host: str, port: int, cluster_key: ClusterKey | None = None) -> None:
        self.host = host
        self.requested_port = port
        self.port = 0
        self._key = cluster_key
        self._routes: dict[int, Route] = {}
        self._own: set[int] = set()  # ranks announced in-process: never replaced over HTTP
        self._runner: web.AppRunner | None = None

    def set_route(self, route: Route) -> None:
        """Announce one of this process's own ranks."""
        self._own.add(route.rank)
        self._routes[route.rank] = route

    async def start(self) -> int:
        app = web.Application(client_max_size=MAX_ROUTE_BODY)
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
        body = await request.read()
        if self._key is not None:
            try:
                self._key.verify("route", body_digest("PUT", "/route", body), request.headers.get(SIGNATURE_HEADER))
            except ClusterAuthError as e:
                logger.warning("bootstrap server: refused PUT /route from %s: %s", request.remote, e)
                return web.json_response({"error": f"PUT /route needs a valid {SIGNATURE_HEADER}: {e}"}, status=401)
        elif not is_loopback(request.remote):
            logger.warning("bootstrap server: refused unsigned PUT /route from %s", request.remote)
            return web.json_response(
                {"error": "PUT /route is accepted from this host only (no cluster secret)"}, status=403
            )
        try:
            route = Route.from_json(json.loads(body))
        except (BootstrapError, ValueError) as e:
            return web.json_response({"error": str(e)}, status=400)
        if route.rank in self._own:
            return web.json_response({"error": f"rank {route.rank} is this prefill worker's own"}, status=409)
        self._routes[route.rank] = route
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
            async with self._get_session().get(
                _url(host, port, "/route"), params={"rank": str(rank)}, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as resp:
                if resp.status != 200:
                    raise BootstrapError(f"GET /route answered {resp.status}: {(await resp.text())[:200]}")
                return Route.from_json(await resp.json())
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as e:
            raise BootstrapError(f"GET {_url(host, port, '/route')} failed: {type(e).__name__}: {e}") from e

    async def put_route(
        self, host: str, port: int, route: Route, timeout: float, cluster_key: ClusterKey | None = None
    ) -> None:
        """Announce ``route`` (another rank) on P's bootstrap server, signed when a key is given."""
        body = json.dumps(asdict(route)).encode()
        headers = {"Content-Type": "application/json"}
        if cluster_key is not None:
            headers[SIGNATURE_HEADER] = cluster_key.sign("route", body_digest("PUT", "/route", body))
        try:
            async with self._get_session().put(
                _url(host, port, "/route"), data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as resp:
                if resp.status != 200:
                    raise BootstrapError(f"PUT /route answered {resp.status}: {(await resp.text())[:200]}")
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            raise BootstrapError(f"PUT {_url(host, port, '/route')} failed: {type(e).__name__}: {e}") from e

    async def health(self, host: str, port: int, timeout: float) -> bool:
        try:
            async with self._get_session().get(
                _url(host, port, "/health"), timeout=aiohttp.ClientTimeout(total=timeout)
            ) as resp:
                return resp.status == 200
        except (TimeoutError, aiohttp.ClientError, OSError):
            return False

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()
