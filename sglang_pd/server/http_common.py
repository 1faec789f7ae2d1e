"""Pieces every HTTP handler uses: JSON body reading, SSE writing, and the error/auth middlewares.

Every request body goes through ``loads_bounded``: integers fit int64, nesting is at most 32 levels,
no NaN/Infinity; anything else is a 400 before a handler looks at it. A client that goes away
mid-response is expected (the handler's requests are aborted by their own cleanup): it is logged at
DEBUG without a traceback, never as a server error.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from pd_common.json_body import JSONBodyError, loads_bounded
from sglang_pd.server.errors import APIError, error_response, sse_error_event

logger = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
OPEN_PATHS = frozenset({"/health", "/metrics"})


async def read_json(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object, or APIError 400 (malformed) / 413 (too large)."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as e:
        raise APIError(413, f"request body exceeds the limit of {request.app._client_max_size} bytes") from e
    try:
        body = loads_bounded(raw)
    except JSONBodyError as e:
        raise APIError(400, str(e)) from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


async def start_sse(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    return resp


async def send_event(resp: web.StreamResponse, payload: Any) -> None:
    await resp.write(f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode())


async def end_sse(resp: web.StreamResponse, error: APIError | None = None) -> web.StreamResponse:
    """Close a stream: an error travels as a final event before [DONE]."""
    if error is not None:
        await resp.write(sse_error_event(error.status, error.message))
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except APIError as e:
        return error_response(e)
    except web.HTTPRequestEntityTooLarge:
        return error_response(APIError(413, f"request body exceeds the limit of {request.app._client_max_size} bytes"))
    except web.HTTPNotFound:
        return error_response(APIError(404, f"no route {request.method} {request.path}"))
    except web.HTTPMethodNotAllowed:
        return error_response(APIError(405, f"method {request.method} not allowed on {request.path}"))
    except web.HTTPException as e:
        return error_response(APIError(e.status, e.reason or "HTTP error"))
    except ConnectionResetError as e:  # aiohttp's ClientConnectionResetError too: the client went away
        logger.debug("client went away during %s %s: %s", request.method, request.path, e)
        return _client_gone()
    except Exception:
        logger.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(APIError(500, "internal server error"))


def _client_gone() -> web.Response:
    """What a handler whose client disconnected returns: aiohttp's attempt to send it fails quietly (the
    transport is closed, which aiohttp treats as a premature disconnect). Re-raising instead would make
    aiohttp log "Error handling request" with a traceback at ERROR."""
    return web.Response(status=499, text="client closed the connection")


def auth_middleware(api_key: str | None) -> Callable:
    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if api_key is not None and request.path not in OPEN_PATHS:
            if request.headers.get("Authorization", "") != f"Bearer {api_key}":
                raise APIError(401, "invalid or missing API key")
        return await handler(request)

    return check
