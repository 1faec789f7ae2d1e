"""TokenizerManager (main process): tokenizes and validates, tracks in-flight requests, routes outputs.

Requests go to the scheduler as TokenizedGenerateReq; text comes back from the detokenizer as
BatchStrOut and is fanned out to per-request queues. A handler that stops listening (client gone,
task cancelled) aborts its request, so the scheduler frees its pages at once.

Invariant: a request enters ``states`` only once its message is encoded, and leaves it (aborted in the
scheduler unless it finished) whenever its handler stops listening, whatever stopped it; a request
that cannot be encoded fails alone with a 400 and leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from sglang_pd.generate_request import GenerateItem, request_seed
from sglang_pd.request_validation import validate_prompt
from sglang_pd.server import messages
from sglang_pd.server.errors import APIError
from sglang_pd.server.ipc import IpcPaths
from sglang_pd.server.messages import (
    AbortReq,
    BatchStrOut,
    ControlReply,
    FlushCacheReq,
    SchedulerReady,
    SchedulerStats,
    ServerInfoReq,
    ShutdownReq,
    StrOut,
    TokenizedGenerateReq,
)
from sglang_pd.server.metrics import ServerMetrics
from sglang_pd.server.req_state import GenerateChunk, ReqState
from sglang_pd.server_args import ServerArgs
from sglang_pd.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)
CLOSE_SEND_TIMEOUT_S = 2.0


class TokenizerManager:
    def __init__(self, args: ServerArgs, paths: IpcPaths, metrics: ServerMetrics) -> None:
        self.args = args
        self.metrics = metrics
        self.tokenizer: Any = (
            None if args.skip_tokenizer_init else load_tokenizer(args.tokenizer_path or args.model_path)
        )
        self.chat_template = _read_template(args.chat_template)
        self.ctx = zmq.asyncio.Context()
        self.to_scheduler = self.ctx.socket(zmq.PUSH)
        self.to_scheduler.setsockopt(zmq.LINGER, 0)
        self.from_detok = self.ctx.socket(zmq.PULL)
        self.from_detok.bind(paths.main_output)
        self.from_sched = self.ctx.socket(zmq.PULL)
        self.from_sched.bind(paths.main_control)
        self.paths = paths
        self.states: dict[str, ReqState] = {}
        self.ready: SchedulerReady | None = None
        self.stats: SchedulerStats | None = None
        self.draining = False
        self.dead: str | None = None  # why the worker can no longer serve (a child process died)
        self._replies: dict[int, asyncio.Future] = {}
        self._ids = itertools.count()
        self._seeds = random.Random(args.random_seed)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="tokenize")
        self._tasks: list[asyncio.Task] = []

    # --- lifecycle -------------------------------------------------------------------------------
    async def wait_ready(self) -> SchedulerReady:
        """Block until the scheduler loaded the model (or failed: RuntimeError with its message)."""
        self.to_scheduler.connect(self.paths.scheduler_input)
        while self.ready is None:
            msg = messages.decode(await self.from_sched.recv())
            if isinstance(msg, SchedulerReady):
                self.ready = msg
            elif isinstance(msg, ControlReply) and not msg.ok and msg.request_id == -1:
                raise RuntimeError(msg.payload.get("error", "scheduler failed to start"))
        self._tasks = [asyncio.create_task(self._output_loop()), asyncio.create_task(self._control_loop())]
        return self.ready

    async def close(self) -> None:
        if self.dead is None:  # a dead scheduler never reads it: the send could wait forever
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._send(ShutdownReq()), CLOSE_SEND_TIMEOUT_S)
        for t in self._tasks:
            t.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.ctx.destroy(linger=0)

    # --- requests --------------------------------------------------------------------------------
    def require_ready(self) -> SchedulerReady:
        """What the scheduler reported at startup; 503 before that (handlers can run only after it)."""
        if self.ready is None:
            raise APIError(503, "the server is still starting", retry_after=1)
        return self.ready

    @property
    def context_length(self) -> int:
        return self.require_ready().context_length

    async def tokenize(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise APIError(400, "text prompts need a tokenizer; this server has none (use input_ids)")
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.tokenizer.encode, text)

    async def apply_chat_template(self, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
        if self.tokenizer is None:
            raise APIError(400, "chat needs a tokenizer; this server has none")
        if self.chat_template is None and getattr(self.tokenizer, "chat_template", None) is None:
            raise APIError(400, "this model has no chat template; start the server with --chat-template")

        def render() -> list[int]:
            text = self.tokenizer.apply_chat_template(
                messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=True, **kwargs
            )
            return self.tokenizer.encode(text, add_special_tokens=False)

        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, render)
        except Exception as e:  # template errors are the client's messages' fault
            raise APIError(400, f"cannot apply the chat template to these messages: {e}") from e

    async def make_request(self, item: GenerateItem) -> TokenizedGenerateReq:
        """Tokenize + validate one item (APIError 400 on bad input) into the scheduler's message."""
        ready = self.require_ready()
        ids = list(item.input_ids) if item.input_ids is not None else await self.tokenize(item.text or "")
        try:
            validate_prompt(ids, item.params, ready.context_length, ready.vocab_size, self.tokenizer is not None)
        except ValueError as e:
            raise APIError(400, str(e), "prompt") from e
        lp, boot = item.logprob, item.bootstrap
        mode = self.args.disaggregation_mode
        if mode != "null" and boot is None:
            raise APIError(
                400,
                f"this is a {mode} server: requests need bootstrap_host, bootstrap_port and "
                "bootstrap_room (send them through the router)",
                "bootstrap_room",
            )
        if mode == "null":
            boot = None  # a colocated server ignores bootstrap fields
        top_logprobs_num = min(lp.top_logprobs_num, ready.vocab_size)  # more than the vocabulary: all of it
        return TokenizedGenerateReq(
            item.rid,
            ids,
            item.params.to_dict(),
            request_seed(item, self._seeds),
            lp.return_logprob,
            top_logprobs_num,
            lp.start_len,
            boot.host if boot else None,
            boot.port if boot else None,
            boot.room if boot else None,
        )

    def check_capacity(self, new: int = 1) -> None:
        """503 while draining or dead; 503 + Retry-After when the queue beyond the running batch is full."""
        if self.dead is not None:
            raise APIError(503, self.dead)
        if self.draining:
            raise APIError(503, "server is shutting down", retry_after=5)
        limit = self.args.max_queued_requests
        if limit is not None and self.ready is not None:
            if len(self.states) + new > self.ready.max_running_requests + limit:
                raise APIError(503, "too many requests queued; retry later", retry_after=1)

    async def generate(self, req: TokenizedGenerateReq) -> AsyncIterator[GenerateChunk]:
        """Submit ``req`` and yield its chunks; aborts it when the caller stops early."""
        if req.rid in self.states:
            raise APIError(400, f"request id {req.rid!r} is already in flight", "rid")
        if self.dead is not None:
            raise APIError(503, self.dead)
        wire = encode_request(req)
        state = ReqState(req.rid, len(req.input_ids), req.return_logprob, req.top_logprobs_num)
        self.states[req.rid] = state
        try:
            await self.to_scheduler.send(wire)
            while True:
                chunk: GenerateChunk = await state.queue.get()
                rejected = _rejection(chunk)
                if rejected is not None:
                    raise rejected
                yield chunk
                if chunk.finished:
                    return
        finally:
            self.states.pop(req.rid, None)
            if not state.finished:
                await self.abort(req.rid, "client disconnected")

    async def abort(self, rid: str, message: str = "aborted") -> None:
        if self.dead is None:  # a dead scheduler holds nothing to free
            await self._send(AbortReq(rid, message))

    async def abort_all(self, message: str) -> None:
        for rid in list(self.states):
            await self.abort(rid, message)

    def mark_dead(self, message: str) -> None:
        """A child process died: fail everything in flight and refuse new requests with 503 ``message``."""
        self.dead = message
        self.fail_all(message)

    def fail_all(self, message: str) -> None:
        """End every in-flight request here (the scheduler is gone and will never answer)."""
        for state in list(self.states.values()):
            if not state.finished:
                state.finish_reason = {"type": "abort", "message": message}
                state.queue.put_nowait(GenerateChunk("", [], [], [], True, state))

    async def control(self, msg_cls: type, timeout: float = 10.0) -> ControlReply:
        """Ask the scheduler and wait for its reply; 503 when it is dead or does not answer in ``timeout``."""
        if self.dead is not None:
            raise APIError(503, self.dead)
        rid = next(self._ids)
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._replies[rid] = fut
        try:
            await asyncio.wait_for(self._send(msg_cls(rid)), timeout)
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise APIError(503, f"the scheduler did not answer within {timeout:g}s") from None
        finally:
            self._replies.pop(rid, None)

    async def flush_cache(self) -> bool:
        return (await self.control(FlushCacheReq)).ok

    async def server_info(self) -> dict[str, Any]:
        return (await self.control(ServerInfoReq)).payload

    # --- loops -----------------------------------------------------------------------------------
    async def _send(self, msg: Any) -> None:
        await self.to_scheduler.send(messages.encode(msg))

    async def _output_loop(self) -> None:
        while True:
            batch: BatchStrOut = messages.decode(await self.from_detok.recv())
            now = time.perf_counter()
            for out in batch.outs:
                state = self.states.get(out.token.rid)
                if state is not None:
                    self._deliver(state, out, now)

    def _deliver(self, state: ReqState, out: StrOut, now: float) -> None:
        """Hand one output to its request; a failure here (a bug) ends that request alone, not the loop."""
        try:
            chunk = state.apply(out)
            self._observe(state, out.token.new_token_ids, now, out.token.finish_reason)
        except Exception:
            logger.exception("cannot apply an output of request %s; aborting it", state.rid)
            state.finish_reason = {"type": "abort", "message": "internal error while handling the output"}
            chunk = GenerateChunk("", [], [], [], True, state)
        state.queue.put_nowait(chunk)

    def _observe(self, state: ReqState, new_ids: list[int], now: float, finish: dict[str, Any] | None) -> None:
        if new_ids:
            if state.first_token_at is None:
                state.first_token_at = now
                self.metrics.first_token(now - state.created)
                if len(new_ids) > 1:
                    self.metrics.tokens(len(new_ids) - 1, 0.0)
            else:
                self.metrics.tokens(len(new_ids), now - (state.last_token_at or now))
            state.last_token_at = now
        if finish is not None and state.kv_transfer is not None and state.kv_transfer.get("bytes"):
            self.metrics.kv_transfer(state.kv_transfer)
        if finish is not None:
            self.metrics.finished(
                state.prompt_tokens,
                len(state.output_ids),
                state.cached_tokens,
                now - state.created,
                finish.get("type") == "abort",
            )

    async def _control_loop(self) -> None:
        while True:
            msg = messages.decode(await self.from_sched.recv())
            if isinstance(msg, SchedulerStats):
                self.stats = msg
                self.metrics.set_scheduler_stats(
                    msg.num_running_reqs, msg.num_queue_reqs, msg.token_usage, msg.cache_hit_rate, msg.num_retractions
                )
                self.metrics.set_disagg_stats(msg.disagg)
            elif isinstance(msg, ControlReply):
                fut = self._replies.get(msg.request_id)
                if fut is not None and not fut.done():
                    fut.set_result(msg)


def encode_request(req: TokenizedGenerateReq) -> bytes:
    """The request's wire form, or APIError 400: what the edge let through must still fit msgpack (a value
    that does not is the client's, e.g. an integer beyond 64 bits); this must never become a 500."""
    try:
        return messages.encode(req)
    except (OverflowError, TypeError, ValueError) as e:
        logger.info("request %s cannot be encoded for the scheduler: %s", req.rid, e)
        raise APIError(400, f"the request holds a value this server cannot carry ({type(e).__name__}: {e})") from None


def _read_template(value: str | None) -> str | None:
    """--chat-template: a file path, or the template itself."""
    if value is None:
        return None
    path = Path(value)
    if path.is_file():
        return path.read_text()
    if "{%" in value or "{{" in value:
        return value
    raise ValueError(f"--chat-template {value!r} is neither a file nor a Jinja template")


def _rejection(chunk: GenerateChunk) -> APIError | None:
    """The client error of a request the scheduler refused before producing any token (a 4xx abort), else None."""
    reason = chunk.state.finish_reason if chunk.finished else None
    if reason is None:
        return None
    code = reason.get("status_code")
    if isinstance(code, int) and 400 <= code < 500 and not chunk.state.output_ids:
        return APIError(code, str(reason.get("message") or "request refused"))
    return None
