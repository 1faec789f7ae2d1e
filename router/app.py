"""The router's aiohttp application: middlewares, routes, and the state's lifecycle hooks.

Middlewares, outermost first:
1. errors: ``APIError`` and aiohttp's HTTP exceptions -> the OpenAI envelope; anything else -> 500
   without a traceback. Every answer carries ``x-request-id``; inference routes count requests and
   errors by status here.
2. request id: the first of ``--request-id-headers`` the client sent, else a fresh one; sent to the
   workers as ``x-request-id`` and echoed.
3. auth: with ``--api-key``, every route but the open ones needs ``Authorization: Bearer KEY`` (401).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from aiohttp import web

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
            resp = error_response(APIError(413, f"request body exceeds the limit of {state.config.max_payload_size} bytes"))
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


def auth_middleware(api_key: str | None) -> Middleware:
    expected = f"Bearer {api_key}".encode() if api_key else None

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if expected is not None and request.path not in OPEN_PATHS:
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                raise APIError(401, "invalid or missing API key")
        return await handler(request)

    return auth


def create_app(config: RouterConfig) -> web.Application:
    state = build_state(config)
    app = web.Application(
        middlewares=[error_middleware(state), request_id_middleware(config.request_id_headers, state.new_id),
                     auth_middleware(config.api_key)],
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
