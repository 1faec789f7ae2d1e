"""PageReceiver: D's receive side of the UCX engine (data pieces and direct copies -> Success) on top of UcxEngineBase.

Data: a Data header takes a staging slot (waiting for one if all are busy, and for the slot's last
scatter) and posts the receive of its piece at once; when the piece has landed, the loop starts its
scatter into the room's pages under the room lock (CUDA: one kernel on the engine stream, no host wait;
skipped if the room died, but the piece is always received: P's send waits for our receive).
Direct links: a Pages message names P's pages; the loop copies them from P's mapped pool into the room's
pages under the room lock (CUDA: one kernel on the engine stream reading P's GPU), right away.
Either way the room's last message carries the aux record and the page count; once every page has
landed and been written (on CUDA: once the last write's event fired, seen by ``poll`` or by a worker
thread, whichever first), the room is Success and P is told Done. Loop thread unless stated.
"""

from __future__ import annotations

import asyncio
from typing import Any

from transfer.base import AuxRecord, KVPoll
from transfer.pack import chunk_nbytes
from transfer.protocol import Data, Done, Fail, Message, Pages
from transfer.staging import StagingSlot
from transfer.ucx_decode_state import DecodeRoom, PrefillLink
from transfer.ucx_engine import UcxEngineBase


class PageReceiver(UcxEngineBase[DecodeRoom]):
    def _fail_room(self, state: DecodeRoom, reason: str, tell: type[Any] | None) -> None:
        """Fail the room; tell P with message type ``tell`` (the decode engine implements it)."""
        raise NotImplementedError

    def _tell_prefill(self, state: DecodeRoom, msg: Message) -> None:
        raise NotImplementedError

    async def _on_data(self, link: PrefillLink, msg: Data) -> None:
        state = link.rooms.get(msg.room)
        if state is not None and state.alive:
            problem = None
            if msg.first_page + msg.num_pages > len(state.page_ids):
                problem = (f"prefill sent pages [{msg.first_page}, {msg.first_page + msg.num_pages}) "
                           f"but decode registered {len(state.page_ids)}")
            elif msg.nbytes != chunk_nbytes(self.kv, msg.num_pages):
                problem = f"piece of {msg.num_pages} pages has {msg.nbytes} bytes, expected {chunk_nbytes(self.kv, msg.num_pages)}"
            if problem is not None:
                self._fail_room(state, problem, Fail)
            else:
                state.advance(KVPoll.Transferring)
                state.mark_first_byte()
        if msg.nbytes > 0:  # always receive: P's send waits for our receive
            slot = await self.staging.acquire(msg.nbytes)
            assert link.channel is not None
            try:
                landed = link.channel.post_recv_data(msg.seq, slot.buf[:msg.nbytes])
            except BaseException:
                self.staging.release(slot)
                raise
            if state is not None:
                state.inflight += 1
            self.spawn(self._land(link, state, msg, slot, landed))
        if state is not None and msg.last:
            state.last_header = msg
            self._maybe_finish(link, state)

    def _on_pages(self, link: PrefillLink, msg: Pages) -> None:
        """Direct link: copy P's pages named in ``msg`` from its mapped pool into the room's pages."""
        state = link.rooms.get(msg.room)
        if state is None or not state.alive:
            return
        n = len(msg.page_ids)
        problem = None
        if link.pool is None:
            problem = "prefill sent page ids, but this link has no mapped prefill pool"
        elif msg.first_page + n > len(state.page_ids):
            problem = f"prefill sent pages [{msg.first_page}, {msg.first_page + n}) but decode registered {len(state.page_ids)}"
        else:
            state.advance(KVPoll.Transferring)
            state.mark_first_byte()
            try:
                if self.launch_pull(state, link.pool, msg.page_ids, state.page_ids[msg.first_page:msg.first_page + n]):
                    state.pages_received += n
                    if n:
                        state.path = "direct"
                        state.add_bytes(chunk_nbytes(self.kv, n))
            except Exception as e:  # noqa: BLE001 - bad ids from P fail the room, never the engine
                problem = f"copying KV from prefill's pool failed ({type(e).__name__}: {e})"
        if problem is not None:
            self._fail_room(state, problem, Fail)
            return
        if msg.last:
            state.last_header = msg
            self._maybe_finish(link, state)

    async def _land(self, link: PrefillLink, state: DecodeRoom | None, msg: Data, slot: StagingSlot,
                    landed: asyncio.Future[None]) -> None:
        """Wait for one piece, start its scatter, give the slot back (its ``ready`` guards the next writer)."""
        try:
            await landed
            if state is not None:
                ids = state.page_ids[msg.first_page:msg.first_page + msg.num_pages]
                scattered, slot.ready = self.launch_unpack(state, ids, slot.view(msg.nbytes, self.kv.dtype))
                if scattered:
                    state.path = "ucx"
                    state.pages_received += msg.num_pages
                    state.add_bytes(msg.nbytes)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - fail the room; an endpoint error also ends the link
            if state is not None:
                self._fail_room(state, f"receiving KV failed ({type(e).__name__}: {e})", Fail)
        finally:
            self.staging.release(slot)
            if state is not None:
                state.inflight -= 1
                self._maybe_finish(link, state)

    def _maybe_finish(self, link: PrefillLink, state: DecodeRoom) -> None:
        """Once the last header came and every piece landed: check the count, then Success (loop)."""
        msg = state.last_header
        if msg is None or state.inflight or not state.alive or state.finishing is not None:
            return
        problem = None
        if msg.total_pages != state.pages_received or msg.total_pages > len(state.page_ids):
            problem = (f"incomplete KV transfer: received {state.pages_received} pages, prefill sent "
                       f"{msg.total_pages}, decode registered {len(state.page_ids)}")
        else:
            try:
                state.aux = AuxRecord(**(msg.aux or {}))
            except TypeError as e:
                problem = f"unreadable aux record from prefill: {e}"
        if problem is not None:
            self._fail_room(state, problem, Fail)
            return
        if state.gpu_work is None or state.gpu_work.query():
            self._succeed(state)
        else:
            state.finishing = state.gpu_work
            self.spawn(self._succeed_when_scattered(state))

    async def _succeed_when_scattered(self, state: DecodeRoom) -> None:
        await self.wait_event(state.finishing)
        self._succeed(state)

    def _succeed(self, state: DecodeRoom) -> None:
        """Success, and Done to P, exactly once (``poll`` or the loop, whichever sees the last scatter end)."""
        if state.advance(KVPoll.Success):
            if self.runtime.in_loop_thread:
                self._tell_prefill(state, Done(state.room))
            else:
                self.call_soon(self._tell_prefill, state, Done(state.room))
