"""Writing an answer to the client: whole JSON answers, or SSE streams opened at their first event.

A stream's response headers are sent only when the first event is ready, so every failure before
that is an ordinary HTTP error (the worker's own status and envelope when it gave one). After the
first byte, a failure becomes a final ``data: {"error": ...}`` event followed by ``data: [DONE]``.

A client that goes away is expected: a write to its closed connection ends the stream quietly (one
DEBUG line, no traceback); the source is closed, which aborts the worker calls (``dispatch``), and
the response goes back to aiohttp, which ignores the closed connection.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncGenerator

from aiohttp import web

from router import sse
from router.app_keys import REQUEST_ID
from router.errors import APIError, sse_error_event
from router.metrics import RouterMetrics
from router.upstream import LegError

logger = logging.getLogger(__name__)
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class SSEResponse(web.StreamResponse):
    """A stream whose head goes out with its first event, in one write (aiohttp >= 3.11 otherwise sends
    a StreamResponse's head on its own at ``prepare``: one more syscall and wake-up per request)."""

    _send_headers_immediately = False


def leg_error_response(e: LegError, headers: dict[str, str]) -> web.Response:
    """A failure before anything was sent: the worker's own error body and status when it gave one
    (a 4xx, or a 5xx that blames the request; other 5xx get the router's own envelope)."""
    if e.body is not None and (e.status < 500 or not e.worker_fault):
        return web.Response(body=e.body, status=e.status, content_type="application/json", headers=headers)
    retry_after = 1 if e.status in (429, 503) else None
    raise APIError(e.status, e.message, retry_after=retry_after)


async def send_stream(
    request: web.Request,
    events: AsyncGenerator[bytes, None],
    route: str,
    metrics: RouterMetrics,
    started: float,
    headers: dict[str, str],
) -> web.StreamResponse:
    async with contextlib.aclosing(events) as gen:
        try:
            first = await anext(gen)
        except StopAsyncIteration:
            first = sse.DONE
        except LegError as e:
            return leg_error_response(e, headers)
        resp = SSEResponse(headers={**SSE_HEADERS, **headers})
        try:
            return await _forward(request, resp, first, gen, route, metrics, started)
        except ConnectionError as e:  # the client went away (a write to its closed connection)
            logger.debug("client left %s %s while it was streamed: %s", route, request.get(REQUEST_ID, ""), e)
            return resp


async def _forward(
    request: web.Request,
    resp: SSEResponse,
    first: bytes,
    gen: AsyncGenerator[bytes, None],
    route: str,
    metrics: RouterMetrics,
    started: float,
) -> web.StreamResponse:
    await resp.prepare(request)
    if first.endswith(sse.DONE):  # the whole answer at once: one write with the last chunk
        await resp.write_eof(first)
        metrics.ttft_for(route).observe(time.perf_counter() - started)
        await _drain(gen)
        return resp
    await resp.write(first)
    metrics.ttft_for(route).observe(time.perf_counter() - started)
    error: bytes | None = None
    try:
        async for blob in gen:
            if blob.endswith(sse.DONE):  # the worker's last event: send it with the final chunk
                await resp.write_eof(blob)
                await _drain(gen)
                return resp
            await resp.write(blob)
    except (LegError, APIError) as e:
        error = sse_error_event(e.status, e.message)
        metrics.errors.labels(route, str(e.status)).inc()
    except (ConnectionError, web.HTTPException):
        raise
    except Exception:
        logger.exception("error while streaming %s", route)
        error = sse_error_event(500, "internal router error")
        metrics.errors.labels(route, "500").inc()
    if error is not None:
        await resp.write(error + sse.DONE)
    await resp.write_eof()
    return resp


async def _drain(gen: AsyncGenerator[bytes, None]) -> None:
    """Let the source finish after the client has everything (it settles the worker call as a success)."""
    try:
        async for _ in gen:
            pass
    except (LegError, APIError) as e:  # after [DONE]: nothing left to tell the client
        logger.debug("error after the end of a stream: %s", e)


async def send_unary(body: bytes, content_type: str, headers: dict[str, str]) -> web.Response:
    ctype = content_type or "application/json"
    return web.Response(body=body, status=200, headers={**headers, "Content-Type": ctype})
