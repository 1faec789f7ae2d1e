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
Direct links (D registered with its page ids) skip all of this: ``send`` launches the copy into D's pages
itself (ucx_push.py); only a send that came before D's registration waits here as a job, then pushes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from transfer.base import AuxRecord
from transfer.pack import chunk_nbytes, page_nbytes
from transfer.protocol import Data, Fail
from transfer.room import RoomState
from transfer.staging import StagingSlot
from transfer.ucx_engine import UcxEngineBase


class SendingRoom(RoomState):
    """What the pipeline keeps per room on P."""

    def __init__(self, room: int, on_change: Callable[[], None] | None = None) -> None:
        super().__init__(room, on_change=on_change)
        self.peer: Any = None  # D's link (``.channel``) once D registered the room
        self.num_pages = 0  # pages D registered
        self.direct = False  # D registered on a direct link: we write its pages ourselves (ucx_push.py)
        self.pages_sent = 0  # loop-only (direct links: under ``lock``)
        self.registered = asyncio.Event()  # set on the loop once D registered or the room died
        self.tail: asyncio.Future[None] | None = None  # loop-only: the previous piece was posted
        self.waiting_for_slot = 0  # pieces queued without a slot, not yet holding one (under ``lock``)
        self.dst_ids: list[int] = []  # direct links: D's page ids, in prompt order
        self.dst_dev: Any = None  # direct CUDA links: ``dst_ids`` on our device (uploaded at registration)
        self.pushes: Any = None  # direct CUDA links: an event after the room's latest copy into D's pages
        self.queued = 0  # jobs handed to the loop, not finished yet (under ``lock``)


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

    def _push_now(
        self,
        state: S,
        ids: list[int] | torch.Tensor,
        first_page: int,
        last: bool,
        aux: AuxRecord | None,
        ready_event: Any,
    ) -> bool:
        """Direct link: launch the send's copy into D's pages right here if nothing of the room is queued ahead
        (PushSender, ucx_push.py); False: it goes through the loop like a piece."""
        raise NotImplementedError

    def _push(
        self,
        state: S,
        ids: list[int] | torch.Tensor,
        first_page: int,
        last: bool,
        aux: AuxRecord | None,
        ready_event: Any,
    ) -> None:
        """Direct link: launch the copy into D's pages and post Pushed (PushSender, ucx_push.py)."""
        raise NotImplementedError

    # --- scheduler thread ---------------------------------------------------------------------------

    def _queue_pieces(
        self,
        state: S,
        page_ids: Sequence[int] | torch.Tensor,
        first_page: int,
        last: bool,
        aux: AuxRecord | None,
        ready_event: Any,
    ) -> None:
        ids = page_ids.clone() if isinstance(page_ids, torch.Tensor) else list(page_ids)
        if ready_event is None and self._stream is not None:  # a copy started later must follow the caller's work
            ready_event = torch.cuda.Event()
            ready_event.record(torch.cuda.current_stream(self.kv.device))
        if state.direct and self._push_now(state, ids, first_page, last, aux, ready_event):
            return
        per = max(1, int(self.config.max_message_mb * (1 << 20)) // page_nbytes(self.kv))
        starts = range(0, len(ids), per) if len(ids) else range(1)
        jobs = [
            SendJob(
                ids[start : start + per],
                first_page + start,
                last and k == len(starts) - 1,
                aux if last and k == len(starts) - 1 else None,
                ready_event,
            )
            for k, start in enumerate(starts)
        ]
        with state.lock:
            state.queued += len(jobs)
        self._gather_early(state, jobs)
        self.call_soon(self._enqueue, state, jobs)

    def _gather_early(self, state: S, jobs: list[SendJob]) -> None:
        """Start the pieces' gathers on this (the scheduler's) thread while slots are free; count the rest."""
        early = state.peer is not None and not state.direct  # never hold a slot while D has not registered
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
                started, job.gathered = self.launch_pack(
                    state, job.page_ids, slot.view(chunk_nbytes(self.kv, n), self.kv.dtype), job.ready_event
                )
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
            prev, state.tail = state.tail, loop.create_future()
            self.spawn(self._run_job(state, job, prev, state.tail))

    async def _run_job(
        self, state: S, job: SendJob, prev: asyncio.Future[None] | None, ordered: asyncio.Future[None]
    ) -> None:
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
                self._fail(
                    state,
                    f"prefill sends pages [{job.first_page}, {job.first_page + n}) but decode "
                    f"registered {state.num_pages} pages",
                    Fail,
                )
                return
            if state.direct:  # a send that came before D registered on a direct link
                if self._stream is None:  # the CPU copy is synchronous: wait for the pages off the loop
                    await self.until_ready(job.ready_event)
                self._push(state, job.page_ids, job.first_page, job.last, job.aux, job.ready_event)
                return
            if job.needs_slot:
                job.slot = await self.staging.acquire(nbytes)
                self._got_slot(state, job)
                started, job.gathered = self.launch_pack(
                    state, job.page_ids, job.slot.view(nbytes, self.kv.dtype), job.ready_event
                )
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
            with state.lock:
                state.queued -= 1
            if job.slot is not None:  # a gather of a dead room may still be queued: the next user waits for it
                job.slot.ready = job.gathered
                self.staging.release(job.slot)

    @staticmethod
    def _got_slot(state: SendingRoom, job: SendJob) -> None:
        if job.needs_slot:
            job.needs_slot = False
            with state.lock:
                state.waiting_for_slot -= 1


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
