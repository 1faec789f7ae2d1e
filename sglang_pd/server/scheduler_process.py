"""The scheduler process: EngineCore in a loop of receive -> step -> send.

Owns all device state. Receives typed requests from main, sends each step's new tokens to the
detokenizer and control replies / periodic stats straight to main.

Failure isolation: a message that cannot be handled fails its own request (an abort answer) and the
loop goes on; a failed step aborts every request the scheduler holds, its PD queues included, so no
request is left without an answer. Only a failure outside any one request ends the process (main then
exits non-zero, see launch_server).
"""

from __future__ import annotations

import logging
import time
import traceback
from typing import Any

import zmq

from sglang_pd.engine_core import EngineCore
from sglang_pd.scheduler.req import FinishReason, Req
from sglang_pd.server import ipc, messages
from sglang_pd.server.child_process import setup_child
from sglang_pd.server.messages import (
    AbortReq,
    BatchTokenOut,
    ControlReply,
    FlushCacheReq,
    SchedulerReady,
    SchedulerStats,
    ServerInfoReq,
    ShutdownReq,
    TokenizedGenerateReq,
    TokenOut,
)
from sglang_pd.server_args import ServerArgs

logger = logging.getLogger(__name__)
STATS_INTERVAL_S = 0.5
IDLE_POLL_MS = 50
WAITING_POLL_MS = 1  # work exists but nothing ran: poll, don't spin (a KV transfer's change wakes it at once)


def run_scheduler_process(args: ServerArgs, paths: ipc.IpcPaths) -> None:
    setup_child("scheduler", args.log_level)
    ctx = zmq.Context()
    inbox = ipc.pull(ctx, paths.scheduler_input)
    to_detok = ipc.push(ctx, paths.detokenizer_input)
    to_main = ipc.push(ctx, paths.main_control)
    try:
        core = EngineCore(args)
    except Exception as e:  # startup failure: tell main in one line, then exit non-zero
        logger.error("scheduler failed to start: %s", e)
        ipc.send(to_main, ControlReply(request_id=-1, ok=False, payload={"error": f"{type(e).__name__}: {e}"}))
        time.sleep(0.2)
        raise SystemExit(1) from None
    ipc.send(to_main, _ready(core))
    SchedulerLoop(core, inbox, to_detok, to_main).run()


def _ready(core: EngineCore) -> SchedulerReady:
    mc = core.model_config
    return SchedulerReady(
        context_length=core.context_length,
        vocab_size=mc.vocab_size,
        max_running_requests=core.scheduler.cfg.max_running_requests,
        max_total_tokens=core.scheduler.kv.capacity_tokens,
        page_size=core.scheduler.kv.page_size,
        eos_token_ids=list(mc.eos_token_ids),
        model_config={
            "architecture": mc.architecture,
            "model_type": mc.model_type,
            "num_hidden_layers": mc.num_hidden_layers,
            "hidden_size": mc.hidden_size,
            "vocab_size": mc.vocab_size,
            "dtype": str(core.runtime.dtype).replace("torch.", ""),
            "device": str(core.runtime.device),
        },
    )


class SchedulerLoop:
    def __init__(self, core: EngineCore, inbox: zmq.Socket, to_detok: zmq.Socket, to_main: zmq.Socket) -> None:
        self.core = core
        self.inbox = inbox
        self.to_detok = to_detok
        self.to_main = to_main
        self.sent: dict[str, int] = {}  # rid -> output tokens already sent
        self.last_stats = 0.0
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.running = True
        self.wakeup_fd = self.core.scheduler.hooks.wakeup_fd()  # KV transfers wake the loop, not a timer

    def run(self) -> None:
        ran_batch = False
        while self.running:
            if ran_batch:
                timeout = 0
            else:
                timeout = WAITING_POLL_MS if self.core.scheduler.has_work() else IDLE_POLL_MS
            for msg in ipc.recv_all(self.inbox, timeout, self.wakeup_fd):
                self.handle_isolated(msg)
            ran_batch = self.step() if self.core.scheduler.has_work() else False
            self._maybe_send_stats()

    def step(self) -> bool:
        """One engine step, its outputs sent; True if a batch ran. A failed step (a bug) aborts every request
        the scheduler holds rather than killing the worker."""
        try:
            out = self.core.step()
        except Exception:
            logger.error("step failed; aborting every request\n%s", traceback.format_exc())
            self._abort_all("internal error in the scheduler step")
            return False
        self._send_tokens(out.updated + [r for r in out.finished if r not in out.updated])
        return out.ran_batch

    # --- messages --------------------------------------------------------------------------------
    def handle_isolated(self, msg: Any) -> None:
        """``handle``; a generate request that fails on its way in is answered with an abort, alone."""
        try:
            self.handle(msg)
        except Exception:
            logger.error("cannot handle %s\n%s", type(msg).__name__, traceback.format_exc())
            if isinstance(msg, TokenizedGenerateReq):
                self._fail_one(msg.rid, "internal error while submitting the request")

    def handle(self, msg: Any) -> None:
        if isinstance(msg, TokenizedGenerateReq):
            req = Req(
                rid=msg.rid,
                prompt_ids=list(msg.input_ids),
                params=msg.params,
                seed=msg.seed,
                logprob=msg.logprob,
                bootstrap=msg.bootstrap,
            )
            self.prompt_tokens += len(req.prompt_ids)
            failed = self.core.submit(req)
            if failed is not None:
                self._send_tokens([failed])
        elif isinstance(msg, AbortReq):
            aborted = self.core.scheduler.abort(msg.rid, msg.message)
            if aborted is not None:
                self._send_tokens([aborted])
        elif isinstance(msg, FlushCacheReq):
            ok = not self.core.scheduler.has_work() and self.core.scheduler.kv.flush_cache()
            ipc.send(self.to_main, ControlReply(msg.request_id, ok))
        elif isinstance(msg, ServerInfoReq):
            ipc.send(self.to_main, ControlReply(msg.request_id, True, self._stats_payload()))
        elif isinstance(msg, ShutdownReq):
            self.running = False  # even if what follows fails
            self._abort_all("server is shutting down")
            ipc.send(self.to_detok, msg)  # the detokenizer stops after the last outputs
            self.core.shutdown()

    def _abort_all(self, message: str) -> None:
        """Abort every request that awaits an answer: running, waiting, and parked in the PD hooks' queues
        (those still draining were answered already and keep their pages until their room is terminal)."""
        sched = self.core.scheduler
        victims = sched.hooks.held_rids() + [r.rid for r in list(sched.running) + list(sched.waiting)]
        self._send_tokens([r for rid in victims if (r := sched.abort(rid, message)) is not None])

    # --- outputs ---------------------------------------------------------------------------------
    def _send_tokens(self, reqs: list[Req]) -> None:
        if not reqs:
            return
        outs = [self._token_out(r) for r in reqs]
        try:
            data = messages.encode(BatchTokenOut(outs))
        except (OverflowError, TypeError, ValueError):  # one output that cannot be carried: fail it alone
            data = self._encode_each(outs)
        self.to_detok.send(data)

    def _encode_each(self, outs: list[TokenOut]) -> bytes:
        """The batch without the outputs msgpack refuses; each of those becomes an abort of its request."""
        kept = []
        for out in outs:
            try:
                messages.encode(BatchTokenOut([out]))
                kept.append(out)
            except (OverflowError, TypeError, ValueError) as e:
                logger.error("cannot send the output of %s (%s); aborting it", out.rid, e)
                kept.append(_abort_out(out.rid, "internal error: the output could not be sent"))
        return messages.encode(BatchTokenOut(kept))

    def _fail_one(self, rid: str, message: str) -> None:
        """Abort ``rid`` wherever it got to (nowhere, if its submission failed early) and answer it."""
        try:
            req = self.core.scheduler.abort(rid, message)
        except Exception:
            logger.error("cannot abort %s\n%s", rid, traceback.format_exc())
            req = None
        if req is not None:
            self._send_tokens([req])
            return
        self.sent.pop(rid, None)
        ipc.send(self.to_detok, BatchTokenOut([_abort_out(rid, message)]))

    def _token_out(self, req: Req) -> TokenOut:
        sent = self.sent.get(req.rid, 0)
        first = sent == 0
        if req.finished:
            self.sent.pop(req.rid, None)
            if req.admitted_once:
                self.cached_tokens += req.cached_tokens
        else:
            self.sent[req.rid] = len(req.output_ids)
        rec, lp = req.logprobs, req.logprob.return_logprob
        p = req.params
        return TokenOut(
            rid=req.rid,
            new_token_ids=req.output_ids[sent:],
            prompt_tokens=len(req.prompt_ids),
            completion_tokens=len(req.output_ids),
            cached_tokens=req.cached_tokens,
            finish_reason=_finish_dict(req.finish_reason),
            output_token_logprobs=[[v, t, None] for v, t in rec.output_token[sent:]] if lp else [],
            output_top_logprobs=[[[v, t, None] for v, t in top] for top in rec.output_top[sent:]] if lp else [],
            input_token_logprobs=[[v, t, None] for v, t in rec.input_token] if lp and first else None,
            input_top_logprobs=[None if t is None else [[v, i, None] for v, i in t] for t in rec.input_top]
            if lp and first and req.logprob.top_logprobs_num > 0
            else None,
            skip_special_tokens=p.skip_special_tokens,
            spaces_between_special_tokens=p.spaces_between_special_tokens,
            no_stop_trim=p.no_stop_trim,
            stop=list(p.stop),
            kv_transfer=self.core.scheduler.hooks.transfer_meta(req) if req.finished else None,
        )

    def _stats_payload(self) -> dict[str, Any]:
        sched = self.core.scheduler
        pool = self.core.pool_stats()
        total = max(1, pool["total_pages"])
        held = total - pool["free_pages"] - pool["evictable_pages"]
        stats = SchedulerStats(
            num_running_reqs=len(sched.running),
            num_queue_reqs=len(sched.waiting),
            token_usage=held / total,
            cache_hit_rate=self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0,
            num_retractions=sched.num_retractions,
            pool=pool,
            disagg=sched.hooks.stats(),
        )
        return stats.__dict__

    def _maybe_send_stats(self) -> None:
        now = time.monotonic()
        if now - self.last_stats >= STATS_INTERVAL_S:
            self.last_stats = now
            ipc.send(self.to_main, SchedulerStats(**self._stats_payload()))


def _abort_out(rid: str, message: str) -> TokenOut:
    return TokenOut(
        rid=rid,
        new_token_ids=[],
        prompt_tokens=0,
        completion_tokens=0,
        cached_tokens=0,
        finish_reason=FinishReason("abort", message=message).to_dict(),
    )


def _finish_dict(reason: FinishReason | None) -> dict[str, Any] | None:
    return None if reason is None else reason.to_dict()
