"""Decode-side hooks: prealloc queue -> transfer queue -> (scheduler) running, with no prompt forward.

Admission control: a request leaves the prealloc queue only when the pool can hold its prompt now
and, beyond every admitted request's outstanding reservation, ``num_reserved_decode_tokens`` more
tokens of growth, so D does not run dry for what it admitted. Then D takes pages for the prompt and
registers the room with P. When the room is Success the prompt's KV sits in those pages and the aux
record carries P's first token: the request joins the running batch as if it had prefilled here.
An aborted request in the transfer queue answers at once, but its pages wait in ``draining`` until the
room is terminal: on a direct link P may still be writing them. A local request (no bootstrap fields:
the health probe, see ``hooks``) skips these queues and prefills here like a colocated request.
"""

from __future__ import annotations

from typing import Any

from sglang_pd.disagg.hooks import SchedulerHooks, bootstrap_of, is_local, room_of
from sglang_pd.disagg.transfer_meta import transfer_meta
from sglang_pd.scheduler.req import FinishReason, Req, ReqStatus
from sglang_pd.scheduler.scheduler import StepOutput
from transfer.base import AuxRecord, DecodeTransfer, KVPoll


class DecodeHooks(SchedulerHooks):
    def __init__(self, transfer: DecodeTransfer, num_reserved_decode_tokens: int) -> None:
        self.transfer = transfer
        self.reserved_tokens = num_reserved_decode_tokens
        self.prealloc_queue: list[Req] = []
        self.transfer_queue: list[Req] = []
        self.draining: list[Req] = []  # aborted, answered; pages kept until the room is terminal
        self.finished_meta: dict[str, dict[str, Any] | None] = {}
        self.num_transfer_failed = 0

    def on_submit(self, req: Req) -> bool:
        if is_local(req):
            return False  # scheduled as a colocated request
        self.prealloc_queue.append(req)
        return True

    def before_step(self, out: StepOutput) -> None:
        for req in list(self.draining):
            if self.transfer.poll(room_of(req)) in (KVPoll.Success, KVPoll.Failed):
                self.draining.remove(req)
                self.sched.kv.release(req)
                self.transfer.release(room_of(req))
        self._poll_transfers(out)
        self._admit()

    def _admit(self) -> None:
        kv = self.sched.kv
        while self.prealloc_queue:
            req = self.prealloc_queue[0]
            active = len(self.sched.running) + len(self.transfer_queue)
            if active >= self.sched.cfg.max_running_requests:
                return
            need = self._reservation(req) + sum(self._outstanding(r) for r in self._admitted())
            if kv.available_pages < need or not kv.reserve(req, len(req.prompt_ids)):
                return
            self.prealloc_queue.pop(0)
            req.set_status(ReqStatus.RUNNING)
            req.admitted_once = True
            boot = bootstrap_of(req)
            self.transfer.register(boot.room, boot.host, boot.port, list(req.pages))
            self.transfer_queue.append(req)

    def _poll_transfers(self, out: StepOutput) -> None:
        for req in list(self.transfer_queue):
            state = self.transfer.poll(room_of(req))
            aux = self.transfer.aux(room_of(req)) if state == KVPoll.Success else None
            if aux is not None:
                self.transfer_queue.remove(req)
                self._activate(req, aux, out)
            elif state in (KVPoll.Success, KVPoll.Failed):  # Success without P's first token fails it too
                self.transfer_queue.remove(req)
                self.num_transfer_failed += 1
                self.sched.kv.release(req)
                message = self.transfer.failure(room_of(req)) or (
                    "KV transfer failed" if state == KVPoll.Failed else "KV arrived without the first token"
                )
                req.finish(FinishReason("abort", message=message))
                self._close(req)
                out.finished.append(req)

    def _activate(self, req: Req, aux: AuxRecord, out: StepOutput) -> None:
        """The prompt's KV is in place: continue exactly as after a local prefill."""
        req.num_computed_tokens = len(req.prompt_ids)
        req.cached_tokens = aux.cached_tokens
        req.output_ids.append(aux.first_token_id)
        rec = req.logprobs
        rec.output_token.extend((lp, t) for lp, t, _ in aux.output_token_logprobs)
        rec.output_top.extend([(lp, t) for lp, t, _ in top] for top in aux.output_top_logprobs)
        if aux.input_token_logprobs is not None:
            rec.input_token = [(lp, t) for lp, t, _ in aux.input_token_logprobs]
            rec.input_top = [None if t is None else [(lp, i) for lp, i, _ in t] for t in (aux.input_top_logprobs or [])]
        self._close(req)  # the room is done; keep its stats for the answer
        self.sched.running.append(req)
        out.updated.append(req)
        self.sched.check_stop(req, out)

    def _admitted(self) -> list[Req]:
        return self.sched.running + self.transfer_queue

    def _reservation(self, req: Req) -> int:
        """Pages ``req`` may hold: its prompt plus its reserved growth."""
        growth = min(req.params.max_new_tokens, self.reserved_tokens)
        return self.sched.kv.pages_for(len(req.prompt_ids) + growth)

    def _outstanding(self, req: Req) -> int:
        return max(0, self._reservation(req) - len(req.pages))

    def abort(self, rid: str, message: str) -> Req | None:
        for queue in (self.prealloc_queue, self.transfer_queue):
            for req in queue:
                if req.rid == rid:
                    queue.remove(req)
                    req.finish(FinishReason("abort", message=message))
                    if queue is self.transfer_queue:
                        self.transfer.abort(room_of(req), message)
                        if self.transfer.poll(room_of(req)) not in (KVPoll.Success, KVPoll.Failed):
                            self.finished_meta[req.rid] = transfer_meta(self.transfer, req)
                            self.draining.append(req)  # P may still write the pages: before_step releases them
                            return req
                        self.sched.kv.release(req)
                    self._close(req)
                    return req
        return None

    def held_rids(self) -> list[str]:
        return [r.rid for r in self.prealloc_queue + self.transfer_queue]  # not draining: already answered

    def has_work(self) -> bool:
        return bool(self.prealloc_queue or self.transfer_queue or self.draining)

    def wakeup_fd(self) -> int | None:
        return self.transfer.wakeup_fd()

    def stats(self) -> dict[str, Any]:
        return {
            "num_decode_prealloc_queue_reqs": len(self.prealloc_queue),
            "num_decode_transfer_queue_reqs": len(self.transfer_queue),
            # of those, how many P has acknowledged (registered; waiting for or receiving KV)
            "num_decode_registered_reqs": sum(
                self.transfer.poll(room_of(r)) >= KVPoll.WaitingForInput for r in self.transfer_queue
            ),
            "num_transfer_failed_reqs": self.num_transfer_failed,
        }

    def transfer_meta(self, req: Req) -> dict[str, Any] | None:
        return self.finished_meta.pop(req.rid, None)

    def shutdown(self) -> None:
        self.transfer.shutdown()

    def _close(self, req: Req) -> None:
        if req.rid not in self.finished_meta:
            self.finished_meta[req.rid] = transfer_meta(self.transfer, req)
            self.transfer.release(room_of(req))
