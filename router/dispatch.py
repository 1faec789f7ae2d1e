"""Dispatch one Job: pick workers by policy, run an attempt (``legs.PairCall``), retry before the first byte.

Retry rule: an attempt that fails with a retryable error (``faults``: a connection failure,
502/503/504 that do not blame the request, an answer aborted because a worker process died, or a
stream whose first event is such an error) is retried with backoff on a newly picked worker (PD: a
new pair and a new room), avoiding the workers that failed when others exist, up to
``retry.max_retries`` times, and only while nothing of this job has been sent to the client: once
the first event of a stream has been yielded, a failure is final (the responder turns it into a
final SSE error event). A client's 4xx, a 5xx that blames the request, and a plain 500 (an internal
error the same request would likely hit again) go back to the client at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

from router.config import Role
from router.errors import APIError
from router.jobs import Job
from router.legs import PairCall
from router.state import RouterState
from router.upstream import LegError
from router.worker import Worker

NO_WORKER_RETRY_AFTER_S = 5


class Dispatcher:
    def __init__(self, state: RouterState) -> None:
        self.state = state
        self.retry = state.config.retry
        self.pd = state.config.pd_disaggregation

    # --- choosing workers ----------------------------------------------------------------------------
    def pick(self, role: Role, key: str, avoid: set[str]) -> Worker:
        workers = self.state.registry.available(role)
        if not workers:
            raise APIError(503, f"no healthy {role} worker is available", retry_after=NO_WORKER_RETRY_AFTER_S)
        candidates = [w for w in workers if w.url not in avoid] or workers
        policy = self.state.policies[role]
        if len(candidates) == 1:
            chosen = candidates[0]
            if policy.remembers_prompts:
                policy.choose([chosen.view()], key)  # keeps its prefix tree current
            return chosen
        view = policy.choose([w.view() for w in candidates], key)
        return next(w for w in candidates if w.url == view.url)

    def _call(self, job: Job, attempt: int, avoid: set[str]) -> PairCall:
        prefill = self.pick("prefill", job.key, avoid) if self.pd else None
        decode = self.pick("decode" if self.pd else "regular", job.key, avoid)
        sent = job.encode(attempt, prefill, self.state.rng, self.state.cluster_key)
        return PairCall(self.state, job, prefill, decode, sent)

    def _may_retry(self, job: Job, error: LegError, attempt: int, avoid: set[str]) -> bool:
        if error.worker is not None:
            avoid.add(error.worker.url)
        if not error.retryable or attempt >= self.retry.max_retries or self.state.shutting_down:
            return False
        self.state.metrics.retries.labels(job.route).inc()
        return True

    async def _backoff(self, attempt: int) -> None:
        r = self.retry
        delay = min(r.max_backoff_s, r.initial_backoff_s * r.multiplier**attempt)
        delay *= 1.0 + r.jitter * self.state.rng.uniform(-1.0, 1.0)
        await asyncio.sleep(max(0.0, delay))

    # --- streaming -----------------------------------------------------------------------------------
    async def stream(self, job: Job) -> AsyncGenerator[bytes, None]:
        """Whole SSE events for ``job``; LegError/APIError when it fails (after the first event: final)."""
        avoid: set[str] = set()
        for attempt in range(self.retry.max_retries + 1):
            if attempt:
                await self._backoff(attempt - 1)
            call = self._call(job, attempt, avoid)
            events = call.stream()
            reason, sent = "failed", False
            try:
                first = await anext(events)
                sent = True
                yield first
                async for blob in events:
                    yield blob
                return
            except StopAsyncIteration:  # an empty answer
                return
            except LegError as e:
                call.blame(e)  # before close(): the failing leg is finished with its error, not aborted
                if sent or not self._may_retry(job, e, attempt, avoid):
                    raise
            except BaseException:  # cancelled, or closed by the responder: the client went away
                reason = "client_disconnected"
                raise
            finally:
                await events.aclose()
                call.close(reason)

    # --- whole answers -------------------------------------------------------------------------------
    async def unary(self, job: Job) -> tuple[bytes, str]:
        """D's (or the worker's) whole answer for ``job``: (body, content type)."""
        avoid: set[str] = set()
        for attempt in range(self.retry.max_retries + 1):
            call = self._call(job, attempt, avoid)
            reason = "failed"
            try:
                return await call.unary()
            except LegError as e:
                call.blame(e)
                if not self._may_retry(job, e, attempt, avoid):
                    raise
            except BaseException:
                reason = "client_disconnected"
                raise
            finally:
                call.close(reason)
            await self._backoff(attempt)
        raise AssertionError("unreachable")
