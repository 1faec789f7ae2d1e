"""/generate, /v1/completions, /v1/chat/completions: validate, admit, plan, dispatch, respond.

Order of checks (each a plain JSON error, before any worker is called): auth (middleware) -> body
size and JSON (413/400; bounded: ``pd_common.json_body``, at most 32 levels deep, integers within
int64, no NaN) -> validation (400) -> admission (429/408) -> worker choice (503).
Regular mode sends the client's body (plus the rid the router sets) to one worker; PD mode sends
it to a P/D pair, split per choice when it holds several (``fanout``). Bootstrap fields a client
sent are dropped first (``jobs.strip_client_fields``): only the router sets them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from pd_common.json_body import JSONBodyError, loads_bounded
from router.app_keys import DISPATCHER_KEY, REQUEST_ID, STATE_KEY
from router.dispatch import Dispatcher
from router.errors import APIError
from router.fanout import (
    Merger,
    fanout_stream,
    fanout_unary,
    needs_split,
    split_generate,
    split_openai,
)
from router.jobs import Job, Merge, client_rid, strip_client_fields, strip_rid
from router.responder import leg_error_response, send_stream, send_unary
from router.state import RouterState
from router.upstream import LegError
from router.validation import PARSERS, Kind, Parsed

ROUTES: dict[str, Kind] = {"/generate": "generate", "/v1/completions": "completions", "/v1/chat/completions": "chat"}


async def read_json(request: web.Request) -> tuple[dict[str, Any], bytes]:
    """The body as a JSON object and as the bytes it came in, or 400 (malformed) / 413 (too large)."""
    limit = request.app[STATE_KEY].config.max_payload_size
    if request.content_length is not None and request.content_length > limit:
        raise APIError(413, f"request body exceeds the limit of {limit} bytes")
    try:
        n = request.content_length
        # with a length (checked above): one read of exactly the body, no growing buffer
        raw = await request.content.readexactly(n) if n else await request.read()
    except asyncio.IncompleteReadError as e:
        raise APIError(400, "the request body ended before its Content-Length") from e
    except web.HTTPRequestEntityTooLarge as e:
        raise APIError(413, f"request body exceeds the limit of {limit} bytes") from e
    return parse_body(raw), raw


def parse_body(raw: bytes) -> dict[str, Any]:
    """A request body as a bounded JSON object, or 400."""
    try:
        body = loads_bounded(raw)
    except JSONBodyError as e:
        raise APIError(400, str(e)) from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


def single_job(
    route: str,
    body: dict[str, Any],
    parsed: Parsed,
    request_id: str,
    pd: bool,
    new_rid: Callable[[], str],
    raw: bytes | None = None,
) -> Job:
    """The whole request as one Job; ``raw`` (the body's bytes) lets it skip re-encoding a body without rid."""
    rid = client_rid(body, len(parsed.n), parsed.is_batch, new_rid)
    merge: Merge = None
    if pd and parsed.input_logprobs[0]:
        merge = "generate" if parsed.kind == "generate" else "completions"
    if "rid" in body:
        body, raw = strip_rid(body), None
    return Job(route, body, rid, parsed.n, parsed.stream, parsed.routing_key, merge, request_id, raw)


async def handle(request: web.Request) -> web.StreamResponse:
    state: RouterState = request.app[STATE_KEY]
    dispatcher: Dispatcher = request.app[DISPATCHER_KEY]
    route = request.path
    started = time.perf_counter()
    body, given = await read_json(request)
    parsed = PARSERS[ROUTES[route]](body)
    raw: bytes | None = given
    stripped = strip_client_fields(body)
    if stripped is not body:  # the client named bootstrap fields: never forwarded, the body is re-encoded
        body, raw = dict(stripped), None
    request_id: str = request[REQUEST_ID]
    headers = {"x-request-id": request_id}
    if state.shutting_down:
        raise APIError(503, "the router is shutting down", retry_after=5)
    pd = state.config.pd_disaggregation
    await state.admission.acquire()
    try:
        if pd and needs_split(parsed):
            return await _split(request, state, dispatcher, route, body, parsed, headers, started)
        job = single_job(route, body, parsed, request_id, pd, state.new_id, raw)
        if parsed.stream:
            return await send_stream(request, dispatcher.stream(job), route, state.metrics, started, headers)
        data, ctype = await dispatcher.unary(job)
        return await send_unary(data, ctype, headers)
    except LegError as e:
        return leg_error_response(e, headers)
    finally:
        state.admission.release()
        state.metrics.duration_for(route).observe(time.perf_counter() - started)


async def _split(
    request: web.Request,
    state: RouterState,
    dispatcher: Dispatcher,
    route: str,
    body: dict[str, Any],
    parsed: Parsed,
    headers: dict[str, str],
    started: float,
) -> web.StreamResponse:
    request_id = headers["x-request-id"]
    if parsed.kind == "generate":
        jobs, base = split_generate(route, body, parsed, request_id, state.new_id), None
    else:
        jobs, base = split_openai(route, body, parsed, request_id, state.new_id)
    merger = Merger(parsed, base, parsed.n)
    if parsed.stream:
        return await send_stream(
            request, fanout_stream(dispatcher, jobs, merger), route, state.metrics, started, headers
        )
    return await send_unary(await fanout_unary(dispatcher, jobs, merger), "application/json", headers)


def register(app: web.Application) -> None:
    for path in ROUTES:
        app.router.add_post(path, handle)
