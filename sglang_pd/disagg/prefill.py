"""Prefill-side hooks: bootstrap queue -> (scheduler) waiting/running -> inflight, sending KV per chunk.

A P request waits in the bootstrap queue until D has registered its room, then prefills like any
request. After every forward its newly complete pages (and, with the last chunk, the partial last
page and the aux record carrying the first sampled token) are queued to the transfer engine. Once the
first token exists the request leaves the running batch but keeps its pages (the engine reads them in
the background) until the room is Success or Failed; then its pages go to the radix cache and it
finishes with that one token (its HTTP answer). An aborted request answers and frees its pages at once:
the room is Failed when ``abort`` returns (P's own reads of them no longer matter). A local request
(no bootstrap fields: the health probe, see ``hooks``) is never queued, sent or taken over here.
"""

from __future__ import annotations

from typing import Any

import torch

from sglang_pd.disagg.hooks import SchedulerHooks, is_local, room_of
from sglang_pd.disagg.transfer_meta import transfer_meta
from sglang_pd.scheduler.req import FinishReason, Req
from sglang_pd.scheduler.scheduler import StepOutput
from transfer.base import AuxRecord, KVPoll, PrefillTransfer


class PrefillHooks(SchedulerHooks):
    # take_over must see the first token before the scheduler plans the request's next step, and a
    # prompt-only worker gains little from overlap: its steps are long prefills.
    supports_overlap = False

    def __init__(self, transfer: PrefillTransfer, device: torch.device) -> None:
        self.transfer = transfer
        self.device = device
        self.bootstrap_queue: list[Req] = []
        self.inflight: list[Req] = []
        self.sent_pages: dict[str, int] = {}  # rid -> pages of the prompt already queued for sending
        self.finished_meta: dict[str, dict[str, Any] | None] = {}  # rid -> kv_transfer meta, until read
        self.num_bootstrap_failed = 0
        self.num_transfer_failed = 0

    def on_submit(self, req: Req) -> bool:
        if is_local(req):
            return False  # scheduled as a colocated request
        self.transfer.poll(room_of(req))  # starts the room's bootstrap clock
        self.bootstrap_queue.append(req)
        return True

    def before_step(self, out: StepOutput) -> None:
        for req in list(self.bootstrap_queue):
            state = self.transfer.poll(room_of(req))
            if state == KVPoll.Failed:
                self.bootstrap_queue.remove(req)
                self.num_bootstrap_failed += 1
                self._fail(req, out)
            elif state >= KVPoll.WaitingForInput:
                self.bootstrap_queue.remove(req)
                self.sched.waiting.append(req)
        for req in list(self.inflight):
            state = self.transfer.poll(room_of(req))
            if state in (KVPoll.Success, KVPoll.Failed):
                self.inflight.remove(req)
                self.sched.kv.release(req)
                if state == KVPoll.Success:
                    req.finish(FinishReason("length", length=len(req.output_ids)))
                else:
                    self.num_transfer_failed += 1
                    req.finish(FinishReason("abort", message=self._failure(req)))
                self._close(req)
                out.finished.append(req)

    def after_compute(self, req: Req, start: int, n: int) -> None:
        """Queue the pages this forward completed (all remaining ones once the prompt is done)."""
        if is_local(req):
            return
        ps = self.sched.kv.page_size
        done = req.num_computed_tokens >= len(req.prompt_ids)
        upto = self.sched.kv.pages_for(len(req.prompt_ids)) if done else req.num_computed_tokens // ps
        sent = self.sent_pages.get(req.rid, 0)
        if upto <= sent and not done:
            return
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        aux = _aux(req) if done else None
        self.transfer.send(room_of(req), req.pages[sent:upto], sent, done, aux, event)
        self.sent_pages[req.rid] = upto

    def take_over(self, req: Req) -> bool:
        """P's job ends with the first token: park the request (pages held) until its KV is delivered."""
        if is_local(req):
            return False
        self.sched.running.remove(req)
        self.inflight.append(req)
        self.sent_pages.pop(req.rid, None)
        return True

    def on_retract(self, req: Req) -> FinishReason | None:
        """Pages already queued for sending may be read in the background: fail the room instead."""
        if is_local(req):
            return None  # retracted and requeued like any colocated request
        self.transfer.abort(room_of(req), "prefill KV pool exhausted; retry the request")
        self.sent_pages.pop(req.rid, None)
        self.num_transfer_failed += 1
        return FinishReason("abort", message="prefill KV pool exhausted; retry the request")

    def abort(self, rid: str, message: str) -> Req | None:
        for queue in (self.bootstrap_queue, self.inflight):
            for req in queue:
                if req.rid == rid:
                    queue.remove(req)
                    self.transfer.abort(room_of(req), message)
                    req.finish(FinishReason("abort", message=message))
                    if req.pages:
                        self.sched.kv.release(req)
                    self._close(req)
                    return req
        for req in self.sched.running + list(self.sched.waiting):
            if req.rid == rid and not is_local(req):
                self.transfer.abort(room_of(req), message)
                self.sent_pages.pop(rid, None)
        return None  # the scheduler aborts it from its own queues

    def held_rids(self) -> list[str]:
        return [r.rid for r in self.bootstrap_queue + self.inflight]

    def has_work(self) -> bool:
        return bool(self.bootstrap_queue or self.inflight)

    def wakeup_fd(self) -> int | None:
        return self.transfer.wakeup_fd()

    def stats(self) -> dict[str, Any]:
        return {
            "num_prefill_prealloc_queue_reqs": len(self.bootstrap_queue),
            "num_prefill_inflight_queue_reqs": len(self.inflight),
            "num_bootstrap_failed_reqs": self.num_bootstrap_failed,
            "num_transfer_failed_reqs": self.num_transfer_failed,
        }

    def transfer_meta(self, req: Req) -> dict[str, Any] | None:
        return self.finished_meta.pop(req.rid, None)

    def shutdown(self) -> None:
        self.transfer.shutdown()

    def _fail(self, req: Req, out: StepOutput) -> None:
        req.finish(FinishReason("abort", message=self._failure(req)))
        self._close(req)
        out.finished.append(req)

    def _close(self, req: Req) -> None:
        """Keep the finished room's stats for the answer, then let the engine forget the room."""
        self.finished_meta[req.rid] = transfer_meta(self.transfer, req)
        self.transfer.release(room_of(req))

    def _failure(self, req: Req) -> str:
        return self.transfer.failure(room_of(req)) or "KV transfer failed"


def _aux(req: Req) -> AuxRecord:
    rec = req.logprobs
    return AuxRecord(
        first_token_id=req.output_ids[0],
        cached_tokens=req.cached_tokens,
        output_token_logprobs=[[lp, t, None] for lp, t in rec.output_token[:1]],
        output_top_logprobs=[[[lp, t, None] for lp, t in top] for top in rec.output_top[:1]],
        input_token_logprobs=[[lp, t, None] for lp, t in rec.input_token] if req.logprob.return_logprob else None,
        input_top_logprobs=[None if t is None else [[lp, i, None] for lp, i in t] for t in rec.input_top]
        if req.logprob.return_logprob and req.logprob.top_logprobs_num > 0
        else None,
    )
