"""PieceSender: P's per-room piece pipeline (split, gather, post in order) on top of UcxEngineBase.

``send`` (scheduler thread) cuts a call's pages into pieces of <= ``max_message_mb`` (one data message
each) and, when D has registered and a staging slot is free, starts each piece's gather right there (CUDA:
one kernel on the engine stream after ``ready_event``; no host wait), then hands the pieces to the loop in
one call. On the loop one job per piece runs, in order: it waits for its gather (a piece that found no free
slot takes one now, in arrival order, and gathers on the loop), then posts the Data header and the data
back to back and lets the next piece go, so gathers, sends and D's scatters of consecutive pieces overlap.
The room's last piece's header carries the aux record and the page count.
Slots cannot deadlock: a piece never holds a slot while it waits for D's registration; once a room has a
piece waiting for a slot its later pieces wait behind it; waiters are served first come, first served and
never overtaken by the scheduler's thread (staging.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from transfer.base import AuxRecord
from transfer.pack import chunk_nbytes, page_nbytes
from transfer.protocol import Data, Fail, Pages
from transfer.room import RoomState
from transfer.staging import StagingSlot
from transfer.ucx_engine import UcxEngineBase


class SendingRoom(RoomState):
    """What the pipeline keeps per room on P."""

    def __init__(self, room: int) -> None:
        super().__init__(room)
        self.peer: Any = None  # D's link (``.channel``) once D registered the room
        self.num_pages = 0  # pages D registered
        self.direct = False  # D registered on a direct link: it copies the pages itself (Pages, no data)
        self.announced = False  # a Pages message went to D (under ``lock``): D may be reading our pages
        self.draining: str | None = None  # failed by us while D may be reading: the reason, until D answers
        self.drain_deadline = 0.0
        self.pages_sent = 0  # loop-only
        self.registered = asyncio.Event()  # set on the loop once D registered or the room died
        self.tail: asyncio.Future[None] | None = None  # loop-only: the previous piece was posted
        self.waiting_for_slot = 0  # pieces queued without a slot, not yet holding one (under ``lock``)

    @property
    def alive(self) -> bool:
        """Not terminal and not draining (a draining room sends nothing more, but is not Failed yet)."""
        return not self.terminal and self.draining is None


@dataclass
class SendJob:
    """One piece: pages ``[first_page, first_page + len(page_ids))`` of the room's prompt, one data message."""

    page_ids: list[int] | torch.Tensor
    first_page: int
    last: bool
    aux: AuxRecord | None
    ready_event: Any
    slot: StagingSlot | None = None  # set once the piece holds a staging slot (its gather started)
    gathered: Any = None  # CUDA event after the gather (None: on CPU, or not started)
    needs_slot: bool = False  # counted in the room's ``waiting_for_slot`` until it holds a slot


S = TypeVar("S", bound=SendingRoom)


class PieceSender(UcxEngineBase[S]):
    def _fail(self, state: Any, reason: str, tell: type[Any] | None) -> None:
        """Fail the room; tell D with message type ``tell`` (the prefill engine implements it)."""
        raise NotImplementedError

    # --- scheduler thread ---------------------------------------------------------------------------

    def _queue_pieces(self, state: S, page_ids: Sequence[int] | torch.Tensor, first_page: int, last: bool,
                      aux: AuxRecord | None, ready_event: Any) -> None:
        ids = page_ids.clone() if isinstance(page_ids, torch.Tensor) else list(page_ids)
        if ready_event is None and self._stream is not None:  # a gather started later must follow the caller's work
            ready_event = torch.cuda.Event()
            ready_event.record(torch.cuda.current_stream(self.kv.device))
        per = max(1, int(self.config.max_message_mb * (1 << 20)) // page_nbytes(self.kv))
        if state.direct:  # no message carries the bytes: one Pages (one copy on D) per call
            per = max(1, len(ids))
        starts = range(0, len(ids), per) if len(ids) else range(1)
        jobs = [SendJob(ids[start:start + per], first_page + start, last and k == len(starts) - 1,
                        aux if last and k == len(starts) - 1 else None, ready_event)
                for k, start in enumerate(starts)]
        self._gather_early(state, jobs)
        self.call_soon(self._enqueue, state, jobs)

    def _gather_early(self, state: S, jobs: list[SendJob]) -> None:
        """Start the pieces' gathers on this (the scheduler's) thread while slots are free; count the rest."""
        if state.direct:  # D copies from P's pool: no staging
            return
        early = state.peer is not None  # never hold a slot while D has not registered
        for job in jobs:
            n = len(job.page_ids)
            if n == 0:
                continue
            with state.lock:
                early = early and state.waiting_for_slot == 0
                slot = self.staging.try_acquire(chunk_nbytes(self.kv, n)) if early else None
                if slot is None:
                    early = False
                    job.needs_slot = True
                    state.waiting_for_slot += 1
                    continue
            try:
                started, job.gathered = self.launch_pack(state, job.page_ids,
                                                         slot.view(chunk_nbytes(self.kv, n), self.kv.dtype),
                                                         job.ready_event)
            except Exception as e:  # noqa: BLE001 - bad page ids etc.: the room fails, never the scheduler
                started = False
                self._fail(state, f"gathering KV for decode failed ({type(e).__name__}: {e})", Fail)
            if not started:  # the room died: its jobs end on the loop
                self.call_soon(self.staging.release, slot)
                return
            job.slot = slot

    # --- loop ----------------------------------------------------------------------------------------------

    def _enqueue(self, state: S, jobs: list[SendJob]) -> None:
        loop = asyncio.get_running_loop()
        for job in jobs:
            if self._announce_now(state, job):
                continue
            prev, state.tail = state.tail, loop.create_future()
            self.spawn(self._run_job(state, job, prev, state.tail))

    def _announce_now(self, state: S, job: SendJob) -> bool:
        """Direct link, fast path: post the Pages right here (no task) if nothing of the room is queued ahead
        and its forward has finished. False: the job goes the ordinary way."""
        ready = job.ready_event is None or (isinstance(job.ready_event, torch.cuda.Event) and job.ready_event.query())
        if (not state.direct or state.peer is None or (state.tail is not None and not state.tail.done()) or not ready
                or job.first_page + len(job.page_ids) > state.num_pages):
            return False
        self._got_slot(state, job)
        try:
            posted = self._post_pages(state, job)
        except Exception as e:  # noqa: BLE001 - as in _run_job: the room fails, the engine goes on
            self._fail(state, f"sending KV to decode failed ({type(e).__name__}: {e})", Fail)
            return True
        if posted is not None:
            posted.add_done_callback(lambda fut: self._check_posted(state, fut))
        return True

    def _check_posted(self, state: S, fut: asyncio.Future[None]) -> None:
        if not fut.cancelled() and fut.exception() is not None:
            e = fut.exception()
            self._fail(state, f"sending KV to decode failed ({type(e).__name__}: {e})", Fail)

    async def _run_job(self, state: S, job: SendJob, prev: asyncio.Future[None] | None,
                       ordered: asyncio.Future[None]) -> None:
        n = len(job.page_ids)
        nbytes = chunk_nbytes(self.kv, n)
        try:
            await self.wait_event(job.gathered)  # early gathers: overlaps the previous pieces' sends
            if prev is not None:
                await prev
            await state.registered.wait()
            peer = state.peer
            if not state.alive or peer is None:
                return
            if job.first_page + n > state.num_pages:
                self._fail(state, f"prefill sends pages [{job.first_page}, {job.first_page + n}) but decode "
                                  f"registered {state.num_pages} pages", Fail)
                return
            if state.direct:
                await self._announce(state, job, ordered)
                return
            if job.needs_slot:
                job.slot = await self.staging.acquire(nbytes)
                self._got_slot(state, job)
                started, job.gathered = self.launch_pack(state, job.page_ids, job.slot.view(nbytes, self.kv.dtype),
                                                         job.ready_event)
                if not started:
                    return
                await self.wait_event(job.gathered)
            if not state.alive:  # every gather finished while the room was alive: its bytes may go
                return
            seq = peer.channel.next_seq() if n else -1
            total = state.pages_sent + n if job.last else -1
            aux = job.aux.to_dict() if job.aux is not None else None
            posted = [peer.channel.post(Data(state.room, seq, job.first_page, n, nbytes, total, aux))]
            if n:
                assert job.slot is not None
                posted.append(peer.channel.post_data(seq, job.slot.buf[:nbytes]))
                state.path = "ucx"
                state.add_bytes(nbytes)
            state.pages_sent += n
            _resolve(ordered)  # the next piece may post now
            await asyncio.gather(*posted)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the room fails, the engine goes on
            self._fail(state, f"sending KV to decode failed ({type(e).__name__}: {e})", Fail)
        finally:
            _resolve(ordered)
            self._got_slot(state, job)
            if job.slot is not None:  # a gather of a dead room may still be queued: the next user waits for it
                job.slot.ready = job.gathered
                self.staging.release(job.slot)

    async def _announce(self, state: S, job: SendJob, ordered: asyncio.Future[None]) -> None:
        """Direct link: once the forward wrote the pages, tell D which of P's pages to copy (one Pages)."""
        await self.until_ready(job.ready_event)
        posted = self._post_pages(state, job)
        _resolve(ordered)
        if posted is not None:
            await posted

    def _post_pages(self, state: S, job: SendJob) -> asyncio.Future[None] | None:
        """Post the job's Pages unless the room is dead (then None). Loop."""
        n = len(job.page_ids)
        ids = job.page_ids.tolist() if isinstance(job.page_ids, torch.Tensor) else list(job.page_ids)
        total = state.pages_sent + n if job.last else -1
        aux = job.aux.to_dict() if job.aux is not None else None
        with state.lock:  # vs. a failure on the scheduler's thread: it sees ``announced`` or we see it dead
            if not state.alive:
                return None
            posted = state.peer.channel.post(Pages(state.room, job.first_page, ids, total, aux))
            state.announced = True
        if n:
            state.path = "direct"
            state.add_bytes(chunk_nbytes(self.kv, n))
        state.pages_sent += n
        return posted

    @staticmethod
    def _got_slot(state: SendingRoom, job: SendJob) -> None:
        if job.needs_slot:
            job.needs_slot = False
            with state.lock:
                state.waiting_for_slot -= 1


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
