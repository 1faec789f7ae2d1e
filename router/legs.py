"""One attempt of one Job: a call to a regular worker, or to a prefill/decode pair at once (DESIGN §4.1).

``Leg`` is one worker call: it holds the worker's active slot from creation until ``finish`` and
reports the outcome to the worker's circuit breaker: a success, a worker fault, or nothing at all
for a fault of the request (``faults``). Transport failures also ``poke`` the health checker; an
answer that says a process of the worker died ejects the worker at once. ``PairCall`` runs the
decode leg (the regular worker in regular mode) in the caller's task and the prefill leg as a
background task, concurrently:
- D's answer is what the client gets; it is forwarded as whole SSE events as soon as they arrive.
  Only when the client asked for prompt logprobs does the first D event wait for P's answer (D
  cannot produce a token before P's prefill, so this costs next to nothing).
- P failing aborts D at once (``POST /abort_request`` + closing D's connection) and the attempt
  fails with P's error; D failing, or the client leaving, aborts P (and D) the same way. While D's
  head is still awaited, P's failure cancels that await in the caller's task and takes the
  cancellation back (``uncancel``), as ``asyncio.timeout`` does; a cancellation from anyone else
  (the client leaving) is never swallowed.
- After D finished, a P leg still running is left to finish on its own (never aborted: D's answer
  is complete, P's late answer is only released).
- Aborted answers (``finish_reason`` abort) are looked at: one whose message says a worker process
  died fails the leg as the worker's fault (retried when nothing reached the client yet, worker
  ejected); one without a message (OpenAI routes) makes the router probe the worker at once: if it
  fails its health check the same happens, else the abort is passed through (a client's abort).
Invariant: when ``close`` returns, every leg is finished (slot released) or owned by a background
task that will finish it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator
from typing import Any

from router import faults, sse
from router.errors import error_body
from router.h1_client import Response
from router.jobs import Encoded, Job
from router.logprob_merge import PromptLogprobPatcher, merge_generate
from router.state import RouterState
from router.upstream import (
    NET_ERRORS,
    LegError,
    died_error,
    envelope_error,
    status_error,
    transport_error,
)
from router.worker import Health, Worker

logger = logging.getLogger(__name__)
_UNPARSED = object()  # PairCall.p_answer before P's answer was needed
_ABORT = b'"abort"'  # cheap pre-check before an answer is parsed for abort finishes


class Leg:
    def __init__(self, state: RouterState, worker: Worker, rids: tuple[str, ...]) -> None:
        self.state = state
        self.worker = worker
        self.rids = rids
        self.done = False
        worker.acquire()

    def finish(self, error: LegError | None) -> None:
        """The call ended: ok (None) or failed. Idempotent. A request's fault touches no breaker."""
        if self.done:
            return
        self.done = True
        self.worker.release()
        if error is None:
            self.worker.breaker.record_success()
            return
        if not error.worker_fault:
            return
        opened = self.worker.breaker.record_failure(error.transport)
        if opened:
            logger.warning("circuit of %s worker %s opened: %s", self.worker.role, self.worker.url, error.message)
        if error.fatal:
            self.state.health.eject(self.worker, error.message)
        elif error.transport or opened:  # probe it now (and fast while suspect): health checks may end the circuit
            self.state.health.poke(self.worker.url)

    def abort(self, reason: str) -> None:
        """Tell the worker to drop our requests; the outcome counts neither way."""
        if self.done:
            return
        self.done = True
        self.worker.release()
        self.state.upstream.abort(self.worker, self.rids)
        self.state.metrics.aborts.labels(self.worker.role, reason).inc()


class PairCall:
    def __init__(self, state: RouterState, job: Job, prefill: Worker | None, decode: Worker, sent: Encoded) -> None:
        self.state = state
        self.job = job
        self.sent = sent
        self.d = Leg(state, decode, sent.rids)
        self.p = Leg(state, prefill, sent.rids) if prefill is not None else None
        self.p_task: asyncio.Task[Any] | None = None
        self.p_error: LegError | None = None
        self.p_answer: Any = _UNPARSED
        self.d_opening: asyncio.Task[Any] | None = None  # PD: the task waiting for D's head (P's failure interrupts it)
        self.p_interrupted = False  # _prefill_done cancelled d_opening
        self.d_resp: Response | None = None
        self.succeeded = False

    # --- prefill leg -------------------------------------------------------------------------------
    def _start_prefill(self) -> None:
        if self.p is not None and self.p_task is None:
            self.p_task = asyncio.get_running_loop().create_task(self._prefill())
            self.p_task.add_done_callback(self._prefill_done)

    async def _prefill(self) -> tuple[bytes, str]:
        """P's whole answer (body, content type); LegError when it failed. Parsed only if needed (a merge)."""
        assert self.p is not None
        worker = self.p.worker
        assert self.sent.prefill_data is not None
        resp = await self.state.upstream.post(worker, self.job.route, self.sent.prefill_data, self.job.request_id)
        try:
            raw = await resp.read()
        except NET_ERRORS as e:
            raise transport_error(worker, e) from e
        finally:
            resp.release()
        if resp.status != 200:
            raise status_error(worker, resp.status, raw)
        if resp.content_type == "text/event-stream":
            answer_of(worker, raw, resp.content_type)  # an error event is a failed call
        if _ABORT in raw:
            await self._judge_aborts(worker, _payloads(raw, resp.content_type), raising=True)
        return raw, resp.content_type

    def _prefill_done(self, task: asyncio.Task[Any]) -> None:
        assert self.p is not None
        if task.cancelled():
            return
        err = task.exception()
        if err is None:
            self.p.finish(None)
            return
        self.p_error = (
            err
            if isinstance(err, LegError)
            else LegError(500, f"prefill call failed: {err!r}", retryable=True, worker=self.p.worker)
        )
        self.p.finish(self.p_error)
        if not self.d.done:  # fail D at once instead of letting it wait for KV that never comes
            self.d.abort("prefill_failed")
            if self.d_opening is not None:  # stop waiting for D's head: _open_decode raises p_error
                self.p_interrupted = True
                self.d_opening.cancel()
            if self.d_resp is not None:
                self.d_resp.close()

    async def _prefill_answer(self) -> Any:
        """P's answer as a payload (for merging prompt logprobs), parsed once."""
        assert self.p_task is not None and self.p is not None
        if self.p_answer is _UNPARSED:
            try:
                raw, content_type = await asyncio.shield(self.p_task)
            except LegError:
                raise self.p_error or LegError(500, "prefill failed", retryable=True) from None
            self.p_answer = answer_of(self.p.worker, raw, content_type)
        return self.p_answer

    # --- decode leg --------------------------------------------------------------------------------
    async def _open_decode(self) -> Response:
        up, worker = self.state.upstream, self.d.worker
        sending = up.post(worker, self.job.route, self.sent.data, self.job.request_id)
        if self.p_task is None:  # regular mode: nothing to race against
            self.d_resp = await sending
        else:  # PD: P failing while D's head is awaited interrupts the wait (no extra task, no asyncio.wait)
            task = self.d_opening = asyncio.current_task()
            try:
                self.d_resp = await sending
            except asyncio.CancelledError:
                # ours alone (uncancel -> 0): P failed; another cancel pending (the client left): propagate
                if self.p_interrupted and task is not None and task.uncancel() == 0 and self.p_error is not None:
                    raise self.p_error from None
                raise
            finally:
                self.d_opening = None
            if self.p_error is not None:  # P failed just as D's head came in
                raise self.p_error
        if self.d_resp.status != 200:
            raw = await self._read(self.d_resp)
            raise status_error(worker, self.d_resp.status, raw)
        return self.d_resp

    async def _read(self, resp: Response) -> bytes:
        try:
            return await resp.read()
        except NET_ERRORS as e:
            raise self.p_error or transport_error(self.d.worker, e) from e

    async def stream(self) -> AsyncGenerator[bytes, None]:
        """Whole SSE events of D's answer (P's prompt logprobs merged in when asked)."""
        self._start_prefill()
        resp = await self._open_decode()
        splitter, first = sse.EventSplitter(), True
        merge = self._stream_merger()
        try:
            async for chunk in resp:
                blob = splitter.feed(chunk)
                if not blob:
                    continue
                if first:
                    first_error(self.d.worker, blob)
                    if _ABORT in blob:  # nothing reached the client yet: a dead worker's abort is retried
                        await self._judge_aborts(self.d.worker, sse.payloads(blob), raising=True)
                    first = False
                elif _ABORT in blob:
                    await self._judge_aborts(self.d.worker, sse.payloads(blob), raising=False)
                self._watch_errors(blob)
                yield await merge(blob) if merge else blob
            tail = splitter.rest()
            if tail:
                yield await merge(tail) if merge else tail
        except NET_ERRORS as e:
            raise self.p_error or transport_error(self.d.worker, e) from e
        if self.p_error is not None and self.d.done:  # P failed and aborted D before D's end
            raise self.p_error
        self.d.finish(None)
        self.succeeded = True

    def _stream_merger(self) -> Any:
        if self.job.merge is None or self.p_task is None:
            return None
        patcher: PromptLogprobPatcher | None = None

        async def merge(blob: bytes) -> bytes:
            nonlocal patcher
            answer = await self._prefill_answer()
            if self.job.merge == "generate":
                return sse.map_events(blob, lambda p: merge_generate(p, answer))
            patcher = patcher or PromptLogprobPatcher(answer)
            return sse.map_events(blob, patcher.patch)

        return merge

    def _watch_errors(self, blob: bytes) -> None:
        """An error event inside D's stream (after the first) fails the leg; the client sees it as is."""
        if b'{"error"' not in blob:
            return
        for payload in sse.payloads(blob):
            err = sse.error_of(payload)
            if err is not None:
                self.d.finish(envelope_error(self.d.worker, err[0], err[1], faults.envelope(payload), None))
                return

    async def _judge_aborts(self, worker: Worker, payloads: list[Any], raising: bool) -> None:
        """Aborted finishes in an answer of ``worker``: is the worker dead? Then fail its leg as its
        fault (raised when ``raising``: nothing reached the client; else the leg is finished, the
        answer goes on as is). A worker that is fine leaves the abort to the client."""
        error = await judge_aborts(self.state, worker, payloads, probe=raising)
        if error is None:
            return
        if raising:
            raise error
        for leg in (self.d, self.p):
            if leg is not None and leg.worker is worker:
                leg.finish(error)

    async def unary(self) -> tuple[bytes, str]:
        """D's whole answer (body, content type), P's prompt logprobs merged in when asked."""
        self._start_prefill()
        resp = await self._open_decode()
        raw = await self._read(resp)
        if self.p_error is not None and self.d.done:  # P failed and aborted D: D's answer is the abort
            raise self.p_error
        if _ABORT in raw:
            await self._judge_aborts(self.d.worker, _payloads(raw, resp.content_type), raising=True)
            if self.p_error is not None and self.d.done:
                raise self.p_error
        if self.job.merge is not None and self.p_task is not None:
            answer = await self._prefill_answer()
            raw = merge_unary(raw, answer, self.job.merge)
        self.d.finish(None)
        self.succeeded = True
        return raw, resp.content_type

    # --- the end -----------------------------------------------------------------------------------
    def blame(self, error: LegError) -> None:
        """The attempt failed with ``error``: finish the leg it came from (its worker ended that call)."""
        for leg in (self.d, self.p):
            if leg is not None and leg.worker is error.worker:
                leg.finish(error)

    def close(self, reason: str) -> None:
        """Called once when the attempt is over, in any way; ``reason`` says why when it failed."""
        if self.d_resp is not None:
            self.d_resp.release() if self.succeeded else self.d_resp.close()
        if not self.d.done:
            self.d.abort(reason)
        if self.p is None or self.p.done:
            return
        if self.succeeded:  # D is complete: let P's answer come in and release its slot then
            return
        self.p.abort("decode_failed" if reason == "failed" else reason)
        if self.p_task is not None:
            self.p_task.cancel()


async def judge_aborts(state: RouterState, worker: Worker, payloads: list[Any], probe: bool = True) -> LegError | None:
    """A LegError (the worker's fault, retryable) when aborts in ``payloads`` mean ``worker`` is dead:
    a message saying a process died, or no message and a failed health probe right now (``probe``;
    else the probe is only scheduled: its verdict ejects the worker for later requests)."""
    verdict, message = faults.abort_verdict(payloads)
    if verdict == "died":
        return died_error(worker, message or "a worker process died")
    if verdict == "unknown" and state.registry.get(worker.url) is worker:
        if not probe:
            state.health.poke(worker.url)
            return None
        await state.health.probe_now(worker)
        if worker.health is Health.UNHEALTHY:
            return died_error(worker, f"it aborted the request and fails its health check: {worker.last_probe_error}")
    return None


def _payloads(raw: bytes, content_type: str) -> list[Any]:
    if content_type == "text/event-stream":
        return sse.payloads(raw)
    try:
        return [json.loads(raw)]
    except (ValueError, RecursionError):
        return []


def _event_error(worker: Worker, payload: Any) -> LegError | None:
    err = sse.error_of(payload)
    if err is None:
        return None
    envelope = faults.envelope(payload)  # the worker's own envelope is passed on when the request is to blame
    body = json.dumps({"error": envelope} if envelope else error_body(*err)).encode()
    return envelope_error(worker, err[0], err[1], envelope, body)


def answer_of(worker: Worker, raw: bytes, content_type: str) -> Any:
    """A whole worker answer (JSON, or an SSE stream's last event) -> payload; LegError on an error event."""
    if content_type == "text/event-stream":
        found = sse.payloads(raw)
        for payload in found:
            error = _event_error(worker, payload)
            if error is not None:
                raise error
        return found[-1] if found else None
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return None


def first_error(worker: Worker, blob: bytes) -> None:
    """A stream whose first event is an error is a failed call (retryable if the worker's fault)."""
    if not blob.startswith(b'data: {"error"'):
        return
    found = sse.payloads(blob)
    error = _event_error(worker, found[0]) if found else None
    if error is not None:
        raise error


def merge_unary(raw: bytes, prefill: Any, merge: str) -> bytes:
    try:
        payload = json.loads(raw)
    except (ValueError, RecursionError):
        return raw
    if merge == "generate":
        merge_generate(payload, prefill)
    else:
        PromptLogprobPatcher(prefill).patch(payload)
    return json.dumps(payload, ensure_ascii=False).encode()
