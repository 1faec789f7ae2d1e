"""Scheduler: continuous batching with chunked prefill, prefix reuse and retraction.

``step()`` = plan (running requests first, then admissions) -> launch the batch -> process results.
Every step is one mixed batch: each running request brings its next chunk of uncomputed positions
(one position when decoding), so decode never waits for a long prompt to finish.

Overlap (``SchedulerConfig.overlap``, SGLang's overlap schedule): step k plans and launches batch k
while batch k-1 still runs on the device, then processes batch k-1's results, so the host's Python
hides behind the device. Batch k reads k-1's sampled tokens on the device through placeholders
(``Req.pending_ids``). A request that stops at k-1 has computed one token too many at k; that token
is dropped. A step falls back to the serial order (collect k-1, then plan k) when planning needs
what only k-1's results tell: penalties that read the token history, or a pool so full that
planning might retract (a retraction must never hit a request with in-flight samples).
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

from sglang_pd.disagg.hooks import NullHooks, SchedulerHooks
from sglang_pd.scheduler.batch import BatchPlan
from sglang_pd.scheduler.inflight import BatchRunner, InflightBatch
from sglang_pd.scheduler.kv_manager import ReqKVManager
from sglang_pd.scheduler.new_token_ratio import NewTokenRatio
from sglang_pd.scheduler.plan_items import make_plan_item, needs_token_history, record_result
from sglang_pd.scheduler.policy import create_schedule_policy
from sglang_pd.scheduler.req import FinishReason, Req, ReqStatus
from sglang_pd.scheduler.step_log import StepLogger, StepStats
from sglang_pd.scheduler.stop_checker import StopChecker

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerConfig:
    page_size: int
    num_pages: int  # allocatable pages
    chunk_size: int | None  # prompt tokens per step; None = whole prompts
    max_prefill_tokens: int
    max_running_requests: int
    schedule_policy: str
    enable_radix_cache: bool
    decode_log_interval: int = 40  # decode steps between "Decode batch" log lines (0: never)
    schedule_conservativeness: float = 1.0  # scales the new-token-ratio admission headroom (0: off)
    overlap: bool = True  # launch step k before processing step k-1's results (if the hooks allow)


@dataclass
class StepOutput:
    updated: list[Req] = field(default_factory=list)  # got a new token this step
    finished: list[Req] = field(default_factory=list)
    ran_batch: bool = False  # a forward ran (False: only queues moved, e.g. waiting for KV transfers)


class Scheduler:
    def __init__(
        self, cfg: SchedulerConfig, runner: BatchRunner, stop: StopChecker, hooks: SchedulerHooks | None = None
    ) -> None:
        self.cfg = cfg
        self.runner = runner
        self.stop = stop
        self.kv = ReqKVManager(cfg.num_pages, cfg.page_size, cfg.enable_radix_cache)
        self.policy = create_schedule_policy(cfg.schedule_policy)
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []  # admission order; retraction takes from the end
        self.step_log = StepLogger(cfg.decode_log_interval)
        self.new_token_ratio = NewTokenRatio(cfg.schedule_conservativeness)
        self.num_retractions = 0
        self.hooks = hooks or NullHooks()
        self.hooks.bind(self)
        self.overlap = cfg.overlap and self.hooks.supports_overlap
        self.inflight: InflightBatch | None = None  # the launched batch whose results are not processed yet

    # --- public API ----------------------------------------------------------------------------
    def submit(self, req: Req) -> Req | None:
        """Queue ``req``; returns it finished (abort) at once if it can never fit in the KV pool."""
        need = len(req.prompt_ids) + req.params.max_new_tokens
        if need > self.kv.capacity_tokens:
            req.finish(
                FinishReason(
                    "abort",
                    message=(
                        f"request needs up to {need} tokens of KV (prompt {len(req.prompt_ids)} + max_new_tokens "
                        f"{req.params.max_new_tokens}) but the KV pool holds {self.kv.capacity_tokens}"
                    ),
                )
            )
            return req
        if not self.hooks.on_submit(req):
            self.waiting.append(req)
        return None

    def abort(self, rid: str, message: str = "aborted") -> Req | None:
        held = self.hooks.abort(rid, message)
        if held is not None:
            return held
        for req in list(self.waiting):
            if req.rid == rid:
                self.waiting.remove(req)
                req.finish(FinishReason("abort", message=message))
                return req
        for req in self.running:
            if req.rid == rid:
                self.finish(req, FinishReason("abort", message=message))
                return req
        return None

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.inflight) or self.hooks.has_work()

    def step(self) -> StepOutput:
        """Plan and launch one batch; returns what the last completed batch produced."""
        out = StepOutput()
        self.hooks.before_step(out)
        self.new_token_ratio.step()
        prev = self.inflight
        if prev is not None and not self._can_overlap():
            self.inflight = None
            self._collect(prev, out)
            prev = None
        scheduled = self._plan(out)
        if scheduled:
            self.step_log.record(self._step_stats(scheduled))
            self.inflight = self._launch(scheduled)
            out.ran_batch = True
        elif prev is not None:
            self.inflight = None
        if prev is not None:
            self._collect(prev, out)  # the device already runs the next batch
        if not self.overlap and self.inflight is not None:
            batch, self.inflight = self.inflight, None
            self._collect(batch, out)
        return out

    def _launch(self, scheduled: list[tuple[Req, int]]) -> InflightBatch:
        plan = BatchPlan(tuple(make_plan_item(r, n, self.stop) for r, n in scheduled))
        pending = self.runner.launch(plan)
        items = []
        for (req, n), placeholder in zip(scheduled, pending.placeholders):
            items.append((req, req.num_computed_tokens, n))
            req.num_computed_tokens += n
            if placeholder is not None:
                req.pending_ids.append(placeholder)
        return InflightBatch(tuple(items), pending, frozenset(r for r, _ in scheduled))

    def _collect(self, batch: InflightBatch, out: StepOutput) -> None:
        """Apply a launched batch's results (blocks until the device has them)."""
        result = batch.pending.result()
        for (req, start, n), res in zip(batch.items, result.items):
            if req.status is not ReqStatus.RUNNING:
                continue  # stopped or aborted while this batch ran: its sample is dropped
            got_token = record_result(req, start, res)
            self.hooks.after_compute(req, start, n)
            if got_token and not self.hooks.take_over(req):
                out.updated.append(req)
                self.check_stop(req, out)
        out.ran_batch = True
        for req in batch.deferred_release:
            self.kv.release(req)

    def _can_overlap(self) -> bool:
        """Planning the next batch needs nothing from the in-flight batch's results: no penalty reads
        the token history, and the pool can give every running request its next pages without
        retracting (each decode takes at most one page; prefill chunks share the token budget)."""
        if not self.overlap or any(needs_token_history(r) for r in self.running):
            return False
        budget = self.cfg.chunk_size or self.cfg.max_prefill_tokens
        return self.kv.available_pages > len(self.running) + self.kv.pages_for(budget)

    def check_stop(self, req: Req, out: StepOutput) -> None:
        reason = self.stop.check(req)
        if req.params.max_new_tokens == 0:  # prompt-only request (e.g. for input logprobs): no output token
            req.output_ids.pop()
            del req.logprobs.output_token[len(req.output_ids) :], req.logprobs.output_top[len(req.output_ids) :]
            reason = FinishReason("length", length=0)
        if reason is not None:
            self.finish(req, reason)
            out.finished.append(req)

    def _step_stats(self, scheduled: list[tuple[Req, int]]) -> StepStats:
        prefill = [(r, n) for r, n in scheduled if r.in_prefill]
        new = [r for r, _ in prefill if r.num_computed_tokens == r.cached_tokens]
        used_pages = self.kv.pool.num_total - self.kv.pool.num_free
        return StepStats(
            new_seqs=len(new),
            prefill_tokens=sum(n for _, n in prefill),
            cached_tokens=sum(r.cached_tokens for r in new),
            decode_reqs=len(scheduled) - len(prefill),
            running=len(self.running),
            queued=len(self.waiting),
            used_tokens=used_pages * self.cfg.page_size,
            total_tokens=self.kv.capacity_tokens,
        )

    # --- planning ------------------------------------------------------------------------------
    def _plan(self, out: StepOutput) -> list[tuple[Req, int]]:
        budget = self.cfg.chunk_size or self.cfg.max_prefill_tokens
        scheduled: list[tuple[Req, int]] = []
        retracted = False
        i = 0
        while i < len(self.running):
            req = self.running[i]
            if req.pending_ids and self.stop.surely_stops(req):
                i += 1  # its in-flight sample is its last: nothing more to compute
                continue
            n = min(req.num_uncomputed, budget) if req.in_prefill else 1
            if n <= 0:  # prefill budget spent; this request keeps its pages and waits a step
                i += 1
                continue
            ok, retracted_now = self._reserve_or_retract(req, n, out)
            retracted |= retracted_now
            if not ok:
                break  # req itself was retracted (it was the newest) or failed
            scheduled.append((req, n))
            if req.in_prefill:
                budget -= n
            i += 1
        if not retracted:
            self._admit(budget, scheduled)
        return scheduled

    def _reserve_or_retract(self, req: Req, n: int, out: StepOutput) -> tuple[bool, bool]:
        """Reserve pages for ``n`` more positions of ``req``, retracting newer requests if needed.

        Returns (req is scheduled, something was retracted).
        """
        retracted = False
        while not self.kv.reserve(req, n):
            victim = self.running[-1]
            if victim is req and len(self.running) == 1:
                # Cannot happen for requests admitted by submit(); kept as a loud, non-fatal guard.
                self.finish(req, FinishReason("abort", message="KV pool exhausted by a single request"))
                out.finished.append(req)
                return False, retracted
            self._retract(victim, out)
            retracted = True
            if victim is req:
                return False, retracted
        return True, retracted

    def _retract(self, req: Req, out: StepOutput) -> None:
        """Preempt: free the pages (full ones stay cached) and requeue first; recomputed later."""
        if req.pending_ids:
            raise RuntimeError(f"retracting {req.rid} with in-flight samples (the overlap check should prevent it)")
        reason = self.hooks.on_retract(req)
        if reason is not None:
            self.finish(req, reason)
            out.finished.append(req)
            return
        self.running.remove(req)
        self.kv.release(req)
        req.set_status(ReqStatus.WAITING)
        req.num_retractions += 1
        self.num_retractions += 1
        self.new_token_ratio.on_retract()
        self.waiting.appendleft(req)
        logger.debug("retracted %s (%d tokens); pool free=%d", req.rid, req.seq_len, self.kv.pool.num_free)

    def _admit(self, budget: int, scheduled: list[tuple[Req, int]]) -> None:
        if not self.waiting:
            return
        ratio = self.new_token_ratio
        future_pages = sum(self.kv.pages_for(ratio.future_tokens(r)) for r in self.running)
        for req in self.policy.order(self.waiting, self.kv.match):
            if len(self.running) >= self.cfg.max_running_requests:
                break
            if budget <= 0 and (self.cfg.chunk_size is not None or scheduled):
                break
            self.kv.admit(req)
            n = req.num_uncomputed if self.cfg.chunk_size is None else min(req.num_uncomputed, budget)
            n = max(n, 1)
            need = self.kv.pages_for(req.num_computed_tokens + n) - len(req.pages)
            growth = self.kv.pages_for(ratio.future_tokens(req))
            # Headroom: one page per running request so decodes can grow without retracting at once,
            # plus the pages the running requests and this one are expected to generate into.
            headroom = len(self.running) + future_pages + growth
            if self.kv.available_pages - need < headroom or not self.kv.reserve(req, n):
                self.kv.release(req)
                break  # keep the queue order: no overtaking by smaller requests
            future_pages += growth
            self.waiting.remove(req)
            req.set_status(ReqStatus.RUNNING)
            if not req.admitted_once:
                req.cached_tokens = req.num_computed_tokens
                req.admitted_once = True
            self.running.append(req)
            scheduled.append((req, n))
            budget -= n

    def finish(self, req: Req, reason: FinishReason) -> None:
        if req in self.running:
            self.running.remove(req)
            # Forget in-flight samples; the position of the last seen token counts as uncomputed.
            req.pending_ids.clear()
            req.num_computed_tokens = min(req.num_computed_tokens, req.seq_len - 1)
            batch = self.inflight
            if batch is not None and req in batch.members:
                batch.deferred_release.append(req)  # the device may still write its pages
            else:
                self.kv.release(req)
        req.finish(reason)
