"""PushSender: P writes D's pages itself on a direct link (D's pool mapped here, peer_pool.py).

A ``send`` on a room D registered on a direct link launches its copy right on the caller's (the
scheduler's) thread: on CUDA the transfer stream waits for the forward's ``ready_event`` (a GPU-side wait,
no host wait), one kernel writes the pages into D's pool over NVLink, and P records one of the link's
interprocess events (ipc_events.py); the Pushed message naming that event then goes out from the loop
while the copy runs. On CPU the copy is a synchronous gather + scatter into D's shared pool. A send that
came before D registered waits on the loop as a piece job (ucx_pieces.py) and pushes from there; later
sends of the room queue behind it, so a room's copies and Pushed messages keep their order.

Memory rule on a direct link: P never tells D that a room ended (Fail, Abort, or AbortAck answering D's
Fail/Abort) before every copy of that room into D's pages finished (``_post_after_copies``), and D keeps
the pages of a room it failed itself until one of those comes (ucx_decode.py). P's own pages need no
such care: a copy still reading them after the room failed only feeds pages D will never use.
"""

from __future__ import annotations

import logging
import time
from typing import Any, TypeVar

import torch

from transfer.base import AuxRecord
from transfer.pack import chunk_nbytes, wait_ready
from transfer.peer_pool import upload_ids
from transfer.protocol import Fail, Message, Pushed
from transfer.ucx_pieces import PieceSender, SendingRoom

logger = logging.getLogger(__name__)

S = TypeVar("S", bound=SendingRoom)


class PushSender(PieceSender[S]):
    def _post(self, peer: Any, msg: Message) -> None:
        """Send a control message to D, not waiting for it (loop; the prefill engine implements it)."""
        raise NotImplementedError

    def _prepare_push(self, state: S, peer: Any, page_ids: list[int]) -> None:
        """At D's registration on a direct link: check D's page ids and (CUDA) upload them. Raises on bad ids."""
        peer.pool.check(page_ids)
        state.dst_ids = page_ids
        if self._stream is not None:  # the copies run on this stream too: ordered after the upload
            with torch.cuda.device(self.kv.device):
                state.dst_dev = upload_ids(page_ids, self.kv.device, self._stream)

    def _push_now(
        self,
        state: S,
        ids: list[int] | torch.Tensor,
        first_page: int,
        last: bool,
        aux: AuxRecord | None,
        ready_event: Any,
    ) -> bool:
        with state.lock:
            if state.queued or state.peer is None:
                return False
            self._push(state, ids, first_page, last, aux, ready_event)
        return True

    def _push(
        self,
        state: S,
        ids: list[int] | torch.Tensor,
        first_page: int,
        last: bool,
        aux: AuxRecord | None,
        ready_event: Any,
    ) -> None:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        n = len(ids)
        peer = state.peer
        started = time.monotonic()
        try:
            with state.lock:
                if not state.alive:
                    return
                if first_page + n > state.num_pages:
                    raise IndexError(
                        f"prefill sends pages [{first_page}, {first_page + n}) but decode registered "
                        f"{state.num_pages} pages"
                    )
                event = self._launch_push(state, peer, ids, first_page, ready_event)
                state.pages_sent += n
                total = state.pages_sent if last else -1
        except Exception as e:  # noqa: BLE001 - bad page ids etc.: the room fails, never the scheduler
            self._fail(state, f"writing KV into decode's pages failed ({type(e).__name__}: {e})", Fail)
            return
        if n:
            state.path = "direct"
            state.mark_first_byte(started)
            state.add_bytes(chunk_nbytes(self.kv, n))
        msg = Pushed(state.room, first_page, n, total, aux.to_dict() if aux is not None else None, event, started)
        if self.runtime.in_loop_thread:
            self._post(peer, msg)
        else:
            self.call_soon(self._post, peer, msg)

    def _launch_push(self, state: S, peer: Any, ids: list[int], first_page: int, ready_event: Any) -> int:
        """Start the copy (under the room lock); the index of the link event recorded after it (-1: none, done)."""
        if not ids:
            return -1
        if self._stream is None:
            wait_ready(ready_event)
            peer.pool.write(self.kv, ids, state.dst_ids[first_page : first_page + len(ids)])
            return -1
        # No stream or device context (they cost more than the launch): everything takes the stream.
        if isinstance(ready_event, torch.cuda.Event):
            self._stream.wait_event(ready_event)
        else:
            wait_ready(ready_event)
        peer.pool.write(self.kv, ids, state.dst_dev[first_page : first_page + len(ids)], self._stream)
        k: int = peer.events.record(self._stream)
        state.pushes = peer.events.events[k]
        return k

    def _post_after_copies(self, peer: Any, state: S | None, msg: Message) -> None:
        """Loop: post ``msg`` (ending the room for D) once every copy of the room into D's pages finished."""
        event = state.pushes if state is not None else None
        if event is None or event.query():
            self._post(peer, msg)
        else:
            self.spawn(self._post_when_done(peer, event, msg))

    async def _post_when_done(self, peer: Any, event: Any, msg: Message) -> None:
        await self.wait_event(event)
        self._post(peer, msg)

    async def _close_peer_pool(self, peer: Any) -> None:
        """Loop: unmap D's pool once the link's last copy finished (every room of the link is terminal)."""
        pool, peer.pool = peer.pool, None
        if pool is None:
            return
        if peer.events is not None and peer.events.last is not None:
            await self.wait_event(peer.events.last)
        try:
            pool.close()
        except Exception as e:  # noqa: BLE001 - a mapping that will not close is logged, not fatal
            logger.warning("%s: unmapping decode %s's pool failed: %s", self.engine_id, peer.decode_id, e)
