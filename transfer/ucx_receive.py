"""PageReceiver: D's receive side of the UCX engine (data pieces and direct copies -> Success) on top of UcxEngineBase.

Data: a Data header takes a staging slot (waiting for one if all are busy, and for the slot's last
scatter) and posts the receive of its piece at once; when the piece has landed, the loop starts its
scatter into the room's pages under the room lock (CUDA: one kernel on the engine stream, no host wait;
skipped if the room died, but the piece is always received: P's send waits for our receive).
Direct links: P writes the room's pages itself; a Pushed message says it launched a copy and names the
interprocess event it recorded after it (ucx_push.py).
Either way the room's last message carries the aux record and the page count; once every page has
landed and been written (on CUDA: once the last write's event fired, seen by ``poll``, a worker thread
or, for P's events, the ``push_watcher`` thread, whichever first), the room is Success and P is told Done.
Loop thread unless stated.
"""

from __future__ import annotations

import asyncio
from typing import Any

from transfer.base import AuxRecord, KVPoll
from transfer.event_watch import EventWatcher
from transfer.pack import chunk_nbytes
from transfer.protocol import Data, Done, Fail, Message, Pushed
from transfer.staging import StagingSlot
from transfer.ucx_decode_state import DecodeRoom, PrefillLink
from transfer.ucx_engine import UcxEngineBase


class PageReceiver(UcxEngineBase[DecodeRoom]):
    push_watcher: EventWatcher  # the decode engine makes it

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
                problem = (
                    f"prefill sent pages [{msg.first_page}, {msg.first_page + msg.num_pages}) "
                    f"but decode registered {len(state.page_ids)}"
                )
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
                landed = link.channel.post_recv_data(msg.seq, slot.buf[: msg.nbytes])
            except BaseException:
                self.staging.release(slot)
                raise
            if state is not None:
                state.inflight += 1
            self.spawn(self._land(link, state, msg, slot, landed))
        if state is not None and msg.last:
            state.last_header = msg
            self._maybe_finish(link, state)

    def _on_pushed(self, link: PrefillLink, msg: Pushed) -> None:
        """Direct link: P launched the copy of prompt pages ``[first_page, first_page + num_pages)`` into ours."""
        state = link.rooms.get(msg.room)
        if state is None or not state.alive:
            return
        n = msg.num_pages
        problem = None
        if not link.push:
            problem = "prefill wrote pages on a link where it did not map our pool"
        elif msg.first_page < 0 or n < 0 or msg.first_page + n > len(state.page_ids):
            problem = f"prefill wrote pages [{msg.first_page}, {msg.first_page + n}) but decode registered {len(state.page_ids)}"
        elif msg.event >= len(link.events) or (msg.event < 0 and link.events and n > 0):
            problem = f"prefill named copy event {msg.event}; the link has {len(link.events)}"
        if problem is not None:
            self._fail_room(state, problem, Fail)
            return
        state.advance(KVPoll.Transferring)
        state.mark_first_byte(msg.started if msg.started > 0 else None)  # one host: P's clock is ours
        if msg.event >= 0:
            state.push_event = link.events[msg.event]
        state.pages_received += n
        if n:
            state.path = "direct"
            state.add_bytes(chunk_nbytes(self.kv, n))
        if msg.last:
            state.last_header = msg
            self._maybe_finish(link, state)

    async def _land(
        self, link: PrefillLink, state: DecodeRoom | None, msg: Data, slot: StagingSlot, landed: asyncio.Future[None]
    ) -> None:
        """Wait for one piece, start its scatter, give the slot back (its ``ready`` guards the next writer)."""
        try:
            await landed
            if state is not None:
                ids = state.page_ids[msg.first_page : msg.first_page + msg.num_pages]
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
            problem = (
                f"incomplete KV transfer: received {state.pages_received} pages, prefill sent "
                f"{msg.total_pages}, decode registered {len(state.page_ids)}"
            )
        else:
            try:
                state.aux = AuxRecord(**(msg.aux or {}))
            except TypeError as e:
                problem = f"unreadable aux record from prefill: {e}"
        if problem is not None:
            self._fail_room(state, problem, Fail)
            return
        if state.push_event is not None:  # P's copies: watch P's event (a wait on it could outlive a dead P)
            if state.push_event.query():
                self._succeed(state)
            else:
                state.finishing = state.push_event
                self.push_watcher.watch(state.push_event, lambda error: self._pushed(state, error), lambda: state.alive)
        elif state.gpu_work is None or state.gpu_work.query():
            self._succeed(state)
        else:
            state.finishing = state.gpu_work
            self.spawn(self._succeed_when_scattered(state))

    async def _succeed_when_scattered(self, state: DecodeRoom) -> None:
        await self.wait_event(state.finishing)
        self._succeed(state)

    def _pushed(self, state: DecodeRoom, error: BaseException | None) -> None:
        """P's copies into the room's pages finished (or their event could not be read). Watcher thread."""
        if error is None:
            self._succeed(state)
        else:
            self._fail_room(
                state, f"cannot tell whether prefill's copy finished ({type(error).__name__}: {error})", Fail
            )

    def _succeed(self, state: DecodeRoom) -> None:
        """Success, and Done to P, exactly once (``poll`` or the loop, whichever sees the last scatter end)."""
        if state.advance(KVPoll.Success):
            if self.runtime.in_loop_thread:
                self._tell_prefill(state, Done(state.room))
            else:
                self.call_soon(self._tell_prefill, state, Done(state.room))
