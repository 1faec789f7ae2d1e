"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models.

Every check that can fail (parsing, tokenization, context length, capacity) runs before the
response starts, so it is an ordinary JSON error; after the SSE headers an error is a final event,
then ``[DONE]``. The handler consumes the engine streams itself: when the client goes away aiohttp
cancels the handler, which cancels the per-choice pumps, and each aborts its request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any, Protocol

from aiohttp import web

from sglang_pd.disagg.bootstrap_info import attach_bootstrap
from sglang_pd.generate_request import GenerateItem
from sglang_pd.server.errors import APIError
from sglang_pd.server.http_common import end_sse, read_json, send_event, start_sse
from sglang_pd.server.messages import TokenizedGenerateReq
from sglang_pd.server.openai_chat import ChatStream, chat_response, parse_chat
from sglang_pd.server.openai_completions import (
    CompletionStream,
    completion_response,
    parse_completion,
)
from sglang_pd.server.openai_protocol import ResponseMeta, TokenTexts
from sglang_pd.server.req_state import GenerateChunk
from sglang_pd.server.server_state import ServerState
from sglang_pd.server.stream_merge import collect_all, merge_chunks

logger = logging.getLogger(__name__)
OWNED_BY = "sglang-pd"


class StreamEmitter(Protocol):
    def opening(self) -> list[dict[str, Any]]: ...
    def on_chunk(self, index: int, chunk: GenerateChunk) -> list[dict[str, Any]]: ...
    def closing(self) -> list[dict[str, Any]]: ...


# --- running requests ----------------------------------------------------------------------------
async def submit(
    srv: ServerState, items: Sequence[GenerateItem], prompt_param: str, body: dict[str, Any]
) -> list[TokenizedGenerateReq]:
    """Validate every choice (400s, 503s) before anything runs or any header is sent."""
    try:
        items = attach_bootstrap(items, body, srv.args.bootstrap_key())  # PD: choice k uses room + k
    except ValueError as e:
        raise APIError(400, str(e), "bootstrap_room") from e
    srv.tm.check_capacity(len(items))
    try:
        reqs = [await srv.tm.make_request(it) for it in items]
    except APIError as e:  # the engine's wording -> the OpenAI request's names
        param = prompt_param if e.param == "prompt" else e.param
        raise APIError(e.status, e.message.replace("max_new_tokens", "max_tokens"), param, e.retry_after) from e
    busy = next((r.rid for r in reqs if r.rid in srv.tm.states), None)
    if busy is not None:
        raise APIError(400, f"request id {busy!r} is already in flight", "rid")
    return reqs


def ready_state(request: web.Request) -> ServerState:
    srv: ServerState = request.app["srv"]
    if srv.tm.ready is None:
        raise APIError(503, "the server is still starting", retry_after=1)
    return srv


async def stream_response(
    request: web.Request, srv: ServerState, reqs: Sequence[TokenizedGenerateReq], emitter: StreamEmitter
) -> web.StreamResponse:
    resp = await start_sse(request)
    error: APIError | None = None
    try:
        for event in emitter.opening():
            await send_event(resp, event)
        async with contextlib.aclosing(merge_chunks(srv, reqs)) as chunks:
            async for index, chunk in chunks:
                for event in emitter.on_chunk(index, chunk):
                    await send_event(resp, event)
        for event in emitter.closing():
            await send_event(resp, event)
    except APIError as e:
        error = e
    except ConnectionResetError:
        raise
    except Exception:  # headers are out: report it in the stream, never a traceback
        logger.exception("error while streaming %s", request.path)
        error = APIError(500, "internal server error")
    return await end_sse(resp, error)


# --- handlers --------------------------------------------------------------------------------------
async def completions(request: web.Request) -> web.StreamResponse:
    srv = ready_state(request)
    body = await read_json(request)
    req = parse_completion(body, srv.args.model_name)
    prompt_ids = [p if isinstance(p, tuple) else tuple(await srv.tm.tokenize(p)) for p in req.prompts]
    prompt_texts = [await _prompt_text(srv, p) for p in req.prompts] if req.echo else [""] * len(req.prompts)
    reqs = await submit(srv, req.items(prompt_ids), "prompt", body)
    meta = ResponseMeta(
        f"cmpl-{req.opts.rid}", "text_completion", int(time.time()), srv.args.model_name, req.opts.include_usage
    )
    texts = TokenTexts(srv.tm.tokenizer)
    if req.opts.stream:
        return await stream_response(request, srv, reqs, CompletionStream(req, meta, prompt_texts, texts))
    states = await collect_all(srv, reqs)
    return web.json_response(completion_response(req, meta, states, prompt_texts, texts))


async def _prompt_text(srv: ServerState, prompt: str | tuple[int, ...]) -> str:
    if isinstance(prompt, str):
        return prompt
    if srv.tm.tokenizer is None:
        return ""
    return await asyncio.to_thread(srv.tm.tokenizer.decode, list(prompt))


async def chat_completions(request: web.Request) -> web.StreamResponse:
    srv = ready_state(request)
    body = await read_json(request)
    req = parse_chat(body, srv.args.model_name, srv.tm.context_length)
    prompt_ids = await srv.tm.apply_chat_template(list(req.messages), **req.template_kwargs)
    reqs = await submit(srv, req.items(prompt_ids, srv.tm.context_length), "messages", body)
    meta = ResponseMeta(f"chatcmpl-{req.opts.rid}", "chat.completion", int(time.time()), srv.args.model_name)
    texts = TokenTexts(srv.tm.tokenizer)
    if req.opts.stream:
        chunk_meta = ResponseMeta(meta.id, "chat.completion.chunk", meta.created, meta.model, req.opts.include_usage)
        return await stream_response(request, srv, reqs, ChatStream(req, chunk_meta, texts))
    states = await collect_all(srv, reqs)
    return web.json_response(chat_response(req, meta, states, texts))


def model_card(srv: ServerState) -> dict[str, Any]:
    return {
        "id": srv.args.model_name,
        "object": "model",
        "created": int(time.time()),
        "owned_by": OWNED_BY,
        "root": srv.args.model_path,
        "parent": None,
        "max_model_len": srv.tm.context_length,
    }


async def list_models(request: web.Request) -> web.Response:
    srv = ready_state(request)
    return web.json_response({"object": "list", "data": [model_card(srv)]})


async def retrieve_model(request: web.Request) -> web.Response:
    srv = ready_state(request)
    name = request.match_info["model"]
    if name != srv.args.model_name:
        raise APIError(404, f"The model `{name}` does not exist.", "model")
    return web.json_response(model_card(srv))


def register_openai_routes(app: web.Application) -> None:
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model:.+}", retrieve_model)
