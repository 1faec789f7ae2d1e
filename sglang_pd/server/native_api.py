"""SGLang's native routes: /generate, health, info, cache and abort control, /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from typing import Any

from aiohttp import web

from sglang_pd.disagg.bootstrap_info import attach_bootstrap
from sglang_pd.generate_request import MAX_REQUESTS_PER_CALL, normalize_generate
from sglang_pd.server.errors import APIError
from sglang_pd.server.http_common import end_sse, read_json, send_event, start_sse
from sglang_pd.server.messages import TokenizedGenerateReq
from sglang_pd.server.req_state import ReqState
from sglang_pd.server.server_state import ServerState
from sglang_pd.server.stream_merge import collect_all, merge_chunks

HEALTH_GENERATE_TIMEOUT_S = 20.0


def sglang_output(state: ReqState) -> dict[str, Any]:
    return {"text": state.text, "output_ids": list(state.output_ids), "meta_info": state.meta_info()}


async def build_requests(srv: ServerState, body: dict[str, Any]) -> tuple[list[TokenizedGenerateReq], bool]:
    """/generate body -> validated scheduler messages (APIError 400 on any bad field)."""
    prompt = body.get("text", body.get("prompt"))
    try:
        items, is_batch = normalize_generate(
            prompt,
            body.get("input_ids"),
            body.get("sampling_params"),
            body.get("return_logprob", False),
            body.get("logprob_start_len", -1),
            body.get("top_logprobs_num", 0),
            body.get("rid"),
            max_requests=MAX_REQUESTS_PER_CALL,
        )
        items = attach_bootstrap(items, body, srv.args.bootstrap_key())
    except ValueError as e:
        raise APIError(400, str(e)) from e
    srv.tm.check_capacity(len(items))
    return [await srv.tm.make_request(it) for it in items], is_batch


async def generate(request: web.Request) -> web.StreamResponse:
    srv: ServerState = request.app["srv"]
    body = await read_json(request)
    reqs, is_batch = await build_requests(srv, body)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "stream must be a boolean", "stream")
    if not stream:
        outs = [sglang_output(s) for s in await collect_all(srv, reqs)]
        return web.json_response(outs if is_batch else outs[0])
    resp = await start_sse(request)
    # index -> (tokens, finished) of the last event. Events show the whole state, which already holds
    # every chunk that arrived, so chunks that queued up are coalesced and the final event goes once.
    sent: dict[int, tuple[int, bool]] = {}
    error: APIError | None = None
    try:
        async with contextlib.aclosing(merge_chunks(srv, reqs)) as chunks:
            async for index, chunk in chunks:
                state = chunk.state
                mark = (len(state.output_ids), state.finished)
                if sent.get(index) == mark:
                    continue
                sent[index] = mark
                event = sglang_output(state)
                if is_batch:
                    event["index"] = index
                await send_event(resp, event)
    except APIError as e:
        error = e
    return await end_sse(resp, error)


async def health(request: web.Request) -> web.Response:
    srv: ServerState = request.app["srv"]
    problem = srv.health_problem()
    if problem:
        return web.json_response({"status": "unhealthy", "reason": problem}, status=503)
    return web.json_response({"status": "ok"})


async def health_generate(request: web.Request) -> web.Response:
    """One greedy token from a one-token prompt, run locally. The probe carries no bootstrap fields, so on a
    PD worker it runs as an ordinary colocated request with no peer (as SGLang's); clients cannot send such
    a request to a PD worker (make_request refuses it), only this handler builds one."""
    srv: ServerState = request.app["srv"]
    problem = srv.health_problem()
    if problem:
        return web.json_response({"status": "unhealthy", "reason": problem}, status=503)
    req = TokenizedGenerateReq(f"health-{time.monotonic_ns()}", [0], {"max_new_tokens": 1, "temperature": 0}, 0)
    try:
        state = (await asyncio.wait_for(collect_all(srv, [req]), HEALTH_GENERATE_TIMEOUT_S))[0]
    except TimeoutError:
        return web.json_response({"status": "unhealthy", "reason": "generation timed out"}, status=503)
    if not state.output_ids:
        return web.json_response({"status": "unhealthy", "reason": str(state.finish_reason)}, status=503)
    return web.json_response({"status": "ok"})


async def get_model_info(request: web.Request) -> web.Response:
    srv: ServerState = request.app["srv"]
    args = srv.args
    ready = srv.tm.require_ready()
    return web.json_response(
        {
            "model_path": args.model_path,
            "tokenizer_path": args.tokenizer_path or args.model_path,
            "served_model_name": args.model_name,
            "is_generation": True,
            "context_length": ready.context_length,
            **ready.model_config,
        }
    )


async def get_server_info(request: web.Request) -> web.Response:
    srv: ServerState = request.app["srv"]
    live = await srv.tm.server_info()
    ready = srv.tm.require_ready()
    return web.json_response(
        {
            **srv.args.public_dict(),
            "context_length": ready.context_length,
            "max_total_num_tokens": ready.max_total_tokens,
            "effective_max_running_requests": ready.max_running_requests,
            "scheduler": live,
            "num_in_flight_reqs": len(srv.tm.states),  # requests main still answers (scheduler's view: "scheduler")
            "process_ids": {"main": os.getpid(), **{name: p.pid for name, p in srv.children.items()}},
            "version": srv.version,
        }
    )


async def flush_cache(request: web.Request) -> web.Response:
    srv: ServerState = request.app["srv"]
    if await srv.tm.flush_cache():
        return web.Response(text="Cache flushed.\n")
    raise APIError(400, "cannot flush the cache while requests are running; retry when idle")


async def abort_request(request: web.Request) -> web.Response:
    srv: ServerState = request.app["srv"]
    body = await read_json(request)
    if body.get("abort_all"):
        await srv.tm.abort_all("aborted by /abort_request")
        return web.json_response({"aborted": "all"})
    rid = body.get("rid")
    if not isinstance(rid, str) or not rid:
        raise APIError(400, "rid must be a non-empty string", "rid")
    await srv.tm.abort(rid, "aborted by /abort_request")
    return web.json_response({"aborted": rid})


async def metrics(request: web.Request) -> web.Response:
    srv: ServerState = request.app["srv"]
    return web.Response(body=srv.metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


def register_native_routes(app: web.Application, enable_metrics: bool) -> None:
    app.router.add_post("/generate", generate)
    app.router.add_get("/health", health)
    app.router.add_get("/health_generate", health_generate)
    app.router.add_get("/get_model_info", get_model_info)
    app.router.add_get("/get_server_info", get_server_info)
    app.router.add_route("*", "/flush_cache", flush_cache)
    app.router.add_post("/abort_request", abort_request)
    if enable_metrics:
        app.router.add_get("/metrics", metrics)
