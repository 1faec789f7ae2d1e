"""The router's aiohttp application: middlewares, routes, and the state's lifecycle hooks.

Middlewares, outermost first:
1. errors: ``APIError`` and aiohttp's HTTP exceptions -> the OpenAI envelope; anything else -> 500
   without a traceback. Every answer carries ``x-request-id``; inference routes count requests and
   errors by status here.
2. request id: the first of ``--request-id-headers`` the client sent, else a fresh one; sent to the
   workers as ``x-request-id`` and echoed.
3. auth (``authorize``), by route class:
   - open (``OPEN_PATHS``): /health, /readiness, /liveness, /metrics: anyone.
   - management (``ADMIN_PATHS``): /workers (list, add, remove), /add_worker, /remove_worker,
     /flush_cache, /abort_request, /get_server_info. With ``--admin-api-key``: that key as Bearer
     (the inference ``--api-key`` does not grant them: 403; nothing or a wrong key: 401). Without
     one: loopback callers only (403 for others) unless ``--allow-remote-admin``, and the inference
     key when one is set, as before. Registrations (POST/DELETE /workers, /add_worker,
     /remove_worker) are also accepted with a valid cluster signature: header
     ``X-SGLang-PD-Signature`` = ``ClusterKey.sign("register", body_digest(method, path, body))``
     where path is the request path plus ``?query`` when there is one (decoded; the bare path is
     accepted too, see ``signed_paths``) and body the exact bytes sent; a signature that does not
     verify is a 401 wherever it comes from.
   - everything else (inference, /v1/models, /health_generate, ...): with ``--api-key``,
     ``Authorization: Bearer KEY`` (the admin key works too), else anyone.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from aiohttp import web

from pd_common.cluster_auth import SIGNATURE_HEADER, ClusterAuthError, ClusterKey, body_digest
from router import admin_routes, inference_routes
from router.app_keys import DISPATCHER_KEY, REQUEST_ID, STATE_KEY
from router.config import RouterConfig
from router.dispatch import Dispatcher
from router.errors import APIError, error_response
from router.state import RouterState, build_state, start, stop

if TYPE_CHECKING:  # annotations only: the names moved between aiohttp releases
    from aiohttp.typedefs import Handler, Middleware

logger = logging.getLogger(__name__)
OPEN_PATHS = frozenset({"/health", "/liveness", "/readiness", "/metrics"})
ADMIN_PATHS = frozenset(
    {"/workers", "/add_worker", "/remove_worker", "/flush_cache", "/abort_request", "/get_server_info"}
)
ADMIN_PREFIXES = ("/workers/",)
REGISTRATION_PATHS = frozenset({"/workers", "/add_worker", "/remove_worker"})
REGISTER_PURPOSE = "register"


def is_admin_path(path: str) -> bool:
    return path in ADMIN_PATHS or path.startswith(ADMIN_PREFIXES)


def is_registration(method: str, path: str) -> bool:
    """Worker registration and withdrawal: the management calls a cluster signature may authorize."""
    if method == "POST":
        return path in REGISTRATION_PATHS
    return method == "DELETE" and (path == "/workers" or path.startswith("/workers/"))


def is_loopback(remote: str | None) -> bool:
    """Is the peer address a loopback one (127.0.0.0/8, ::1, or IPv4-mapped 127.x)?"""
    if not remote:
        return False
    try:
        addr = ipaddress.ip_address(remote.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def signed_paths(request: web.Request) -> list[str]:
    """The path a registration signature covers: the path plus its decoded ``?query`` when there is one,
    which binds a withdrawal (``DELETE /workers?url=...``) to the worker it names."""
    if not request.query_string:
        return [request.path]
    return [f"{request.path}?{request.query_string}"]


def error_middleware(state: RouterState) -> Middleware:
    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        inference = request.path in inference_routes.ROUTES
        if inference:
            state.metrics.requests_for(request.path).inc()
        try:
            resp = await handler(request)
        except APIError as e:
            resp = error_response(e)
        except web.HTTPRequestEntityTooLarge:
            resp = error_response(
                APIError(413, f"request body exceeds the limit of {state.config.max_payload_size} bytes")
            )
        except web.HTTPNotFound:
            resp = error_response(APIError(404, f"no route {request.method} {request.path}"))
        except web.HTTPMethodNotAllowed:
            resp = error_response(APIError(405, f"method {request.method} not allowed on {request.path}"))
        except web.HTTPException as e:
            resp = error_response(APIError(e.status, e.reason or "HTTP error"))
        except ConnectionResetError:
            raise
        except Exception:
            logger.exception("unhandled error in %s %s", request.method, request.path)
            resp = error_response(APIError(500, "internal router error"))
        if inference and resp.status >= 400:
            state.metrics.errors.labels(request.path, str(resp.status)).inc()
        if not resp.prepared:
            resp.headers["x-request-id"] = request.get(REQUEST_ID, "")
        return resp

    return errors


def request_id_middleware(names: tuple[str, ...], new_id: Callable[[], str]) -> Middleware:
    @web.middleware
    async def request_id(request: web.Request, handler: Handler) -> web.StreamResponse:
        headers = request.headers
        for name in names:
            given = headers.get(name)
            if given:
                request[REQUEST_ID] = given
                break
        else:
            request[REQUEST_ID] = new_id()
        return await handler(request)

    return request_id


def _bearer(key: str | None) -> bytes | None:
    return f"Bearer {key}".encode() if key else None


def _matches(given: bytes, expected: bytes | None) -> bool:
    return expected is not None and hmac.compare_digest(given, expected)


def auth_middleware(config: RouterConfig, cluster_key: ClusterKey | None) -> Middleware:
    inference = _bearer(config.api_key)
    admin = _bearer(config.admin_api_key)

    async def signed(request: web.Request) -> bool:
        """A registration carrying a cluster signature: True if it verifies; APIError 401 if it does not."""
        token = request.headers.get(SIGNATURE_HEADER)
        if token is None or cluster_key is None or not is_registration(request.method, request.path):
            return False
        body = await request.read()
        error: ClusterAuthError | None = None
        for path in signed_paths(request):
            try:
                cluster_key.verify(REGISTER_PURPOSE, body_digest(request.method, path, body), token)
                return True
            except ClusterAuthError as e:
                error = error or e
        logger.warning("refused a %s %s from %s: %s", request.method, request.path, request.remote, error)
        raise APIError(401, f"bad cluster signature: {error}") from None

    async def authorize_admin(request: web.Request, given: bytes) -> None:
        if _matches(given, admin) or await signed(request):
            return
        if admin is not None:
            if _matches(given, inference):
                raise APIError(403, "the API key does not grant management routes; use the admin API key")
            raise APIError(401, "invalid or missing admin API key")
        if not (config.allow_remote_admin or is_loopback(request.remote)):
            raise APIError(
                403,
                "management routes accept only loopback callers on this router (no admin API key "
                "is configured); set --admin-api-key",
            )
        if inference is not None and not _matches(given, inference):
            raise APIError(401, "invalid or missing API key")

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if path not in OPEN_PATHS:
            given = request.headers.get("Authorization", "").encode()
            if is_admin_path(path):
                await authorize_admin(request, given)
            elif inference is not None and not (_matches(given, inference) or _matches(given, admin)):
                raise APIError(401, "invalid or missing API key")
        return await handler(request)

    return auth


def create_app(config: RouterConfig) -> web.Application:
    state = build_state(config)
    app = web.Application(
        middlewares=[
            error_middleware(state),
            request_id_middleware(config.request_id_headers, state.new_id),
            auth_middleware(config, state.cluster_key),
        ],
        client_max_size=config.max_payload_size,
    )
    app[STATE_KEY] = state
    app[DISPATCHER_KEY] = Dispatcher(state)
    inference_routes.register(app)
    admin_routes.register(app)

    async def on_startup(_: web.Application) -> None:
        await start(state)

    async def on_cleanup(_: web.Application) -> None:
        await stop(state)

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app
