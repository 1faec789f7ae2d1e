"""UcxDecodeTransfer: D's side of the UCX engine (one cached link per P, heartbeats, receive-and-scatter).

Room clock: ``waiting_timeout`` runs from ``register`` until Success, whatever the stage.
Link to a P (keyed by its bootstrap host:port, loop-only): connect = GET /route, create the UCX
endpoint, send a fresh link id (it names the link's tags), Hello -> HelloOk | HelloRefused. Then every room of that P is registered on the one endpoint
and a receive loop dispatches P's messages. Connection attempts and heartbeats (GET /health every
``heartbeat_interval`` while the link has live rooms) share one miss counter; at
``heartbeat_max_failure`` consecutive misses, an endpoint error, or a refused handshake, every room of
the link fails with the reason and the link is dropped (the next ``register`` builds a new one).
Receiving (data pieces, or direct copies from P's mapped pool) is PageReceiver's (ucx_receive.py).
We answer P's Fail/Abort on a direct link with AbortAck once the room's copies are done; P's pool is
mapped at the handshake (``PrefillLink.map_pool``) and unmapped when the link drops.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

import torch

from transfer.base import (
    AuxRecord,
    DecodeTransfer,
    EngineDescription,
    KVPoll,
    TransferStats,
)
from transfer.bootstrap import BootstrapClient
from transfer.config import TransferConfig
from transfer.peer_pool import PeerPool
from transfer.protocol import (
    Abort,
    AbortAck,
    Data,
    Fail,
    Hello,
    HelloOk,
    HelloRefused,
    Message,
    Pages,
    Register,
    Registered,
)
from transfer.room import unknown_room
from transfer.ucx_channel import Channel, connect
from transfer.ucx_decode_state import Addr, DecodeRoom, HandshakeRefused, PrefillLink
from transfer.ucx_engine import CONNECT_TIMEOUT_S
from transfer.ucx_receive import PageReceiver

logger = logging.getLogger(__name__)

class UcxDecodeTransfer(PageReceiver, DecodeTransfer):
    role = "decode"

    def __init__(self, kv_buffer: torch.Tensor, desc: EngineDescription, config: TransferConfig) -> None:
        super().__init__(kv_buffer, desc, config)
        self._links: dict[Addr, PrefillLink] = {}
        self._client = BootstrapClient()

    # --- scheduler thread -------------------------------------------------------------------------

    def start(self) -> None:
        self._start_runtime(self._astart, self._aclose)

    async def _astart(self) -> None:
        pass

    def register(self, room: int, bootstrap_host: str, bootstrap_port: int, page_ids: Sequence[int]) -> None:
        ids = page_ids.tolist() if isinstance(page_ids, torch.Tensor) else list(page_ids)
        state = DecodeRoom(room, ids, (bootstrap_host, int(bootstrap_port)),
                           time.monotonic() + self.config.waiting_timeout)
        old = self.rooms.put(room, state)
        if old is not None and old.alive:
            self._fail_room(old, f"room {room} registered again", Abort)
        self.call_soon(self._attach, state)

    def poll(self, room: int) -> KVPoll:
        state = self.rooms.get(room)
        if state is None:
            return KVPoll.Failed
        finishing = state.finishing
        if finishing is not None and state.alive and finishing.query():
            self._succeed(state)
        if state.alive and time.monotonic() > state.deadline:
            self._fail_room(state, self._timeout_text(state), Fail)
        return state.status

    def aux(self, room: int) -> AuxRecord | None:
        state = self.rooms.get(room)
        return state.aux if state is not None and state.status == KVPoll.Success else None

    def abort(self, room: int, message: str) -> None:
        state = self.rooms.get(room)
        if state is not None:
            self._fail_room(state, message, Abort)

    def failure(self, room: int) -> str | None:
        state = self.rooms.get(room)
        if state is None:
            return unknown_room(room)
        return state.reason if state.status == KVPoll.Failed else None

    def stats(self, room: int) -> TransferStats:
        return self._stats(room)

    def release(self, room: int) -> None:
        state = self.rooms.pop(room)
        if state is None:
            return
        self._fail_room(state, "released by the decode scheduler before the transfer finished", Abort)
        self.call_soon(self._forget, state)

    def shutdown(self) -> None:
        self._shutdown_common(self._aclose)

    # --- rooms (any thread) -----------------------------------------------------------------------

    def _fail_room(self, state: DecodeRoom, reason: str, tell: type[Fail | Abort] | None) -> None:
        """Fail the room (waits for its queued scatters: afterwards nothing writes its pages)."""
        if not state.fail(reason):
            return
        logger.info("%s: room %d failed: %s", self.engine_id, state.room, reason)
        if tell is not None:
            self.call_soon(self._tell_prefill, state, tell(state.room, reason))

    def _timeout_text(self, state: DecodeRoom) -> str:
        return (f"KV transfer timed out: room {state.room} got no complete KV from prefill {state.addr[0]}:"
                f"{state.addr[1]} within {self.config.waiting_timeout:g}s (SGLANG_DISAGGREGATION_WAITING_TIMEOUT)")

    def check_timeouts(self, now: float) -> None:
        for state in self.rooms.snapshot():
            if state.alive and now > state.deadline:
                self._fail_room(state, self._timeout_text(state), Fail)

    # --- loop: links ------------------------------------------------------------------------------

    def _attach(self, state: DecodeRoom) -> None:
        if not state.alive:
            return
        link = self._links.get(state.addr)
        if link is None:
            link = self._links[state.addr] = PrefillLink(state.addr)
            link.tasks = [self.spawn(self._run_link(link)), self.spawn(self._heartbeat(link))]
        link.rooms[state.room] = state
        if link.channel is not None:
            self._register(link, state)

    def _forget(self, state: DecodeRoom) -> None:
        link = self._links.get(state.addr)
        if link is not None and link.rooms.get(state.room) is state:
            del link.rooms[state.room]

    def _tell_prefill(self, state: DecodeRoom, msg: Message) -> None:
        link = self._links.get(state.addr)
        if link is not None and link.channel is not None and link.rooms.get(state.room) is state:
            self._post(link, msg)

    def _register(self, link: PrefillLink, state: DecodeRoom) -> None:
        if state.alive:
            self._post(link, Register(state.room, len(state.page_ids), link.pool is not None))

    def _post(self, link: PrefillLink, msg: Message) -> None:
        """Send a control message, not waiting for it (loop); a broken link is reported by its receive loop."""
        if link.channel is None:
            return
        try:
            link.channel.post_nowait(msg)
        except ConnectionError as e:
            logger.debug("%s: could not send %s to %s: %s", self.engine_id, type(msg).__name__, link.name, e)

    def _drop_link(self, link: PrefillLink, reason: str) -> None:
        """Fail every room of the link with ``reason`` and forget the link (loop)."""
        if self._links.get(link.addr) is link:
            del self._links[link.addr]
        live = [s for s in link.rooms.values() if s.alive]
        if not self._closing:
            logger.log(logging.WARNING if live else logging.INFO, "%s: %s (%d live rooms failed)",
                       self.engine_id, reason, len(live))
        for state in live:
            self._fail_room(state, reason, None)  # waits for the room's copies: the pool may go after this
        link.rooms.clear()
        link.close_pool(self.engine_id)
        current = asyncio.current_task()
        for task in link.tasks:
            if task is not current:
                task.cancel()
        if link.channel is not None:
            channel, link.channel = link.channel, None
            self.spawn(channel.close())

    def _unreachable(self, link: PrefillLink, detail: str) -> str:
        return (f"prefill server {link.name} unreachable: {link.misses} consecutive failed probes "
                f"every {self.config.heartbeat_interval:g}s ({detail})")

    async def _run_link(self, link: PrefillLink) -> None:
        while True:
            try:
                link.channel, link.pool = await self._connect(link)
                break
            except HandshakeRefused as e:
                self._drop_link(link, e.reason)
                return
            except Exception as e:  # noqa: BLE001 - counted as a missed heartbeat, then retried
                link.misses += 1
                if link.misses >= self.config.heartbeat_max_failure:
                    self._drop_link(link, self._unreachable(link, f"{type(e).__name__}: {e}"))
                    return
                await asyncio.sleep(self.config.heartbeat_interval)
        link.misses = 0
        for state in list(link.rooms.values()):
            self._register(link, state)
        try:
            while True:
                msg = await link.channel.recv()
                if isinstance(msg, Data):
                    await self._on_data(link, msg)
                elif isinstance(msg, Pages):
                    self._on_pages(link, msg)
                else:
                    self._on_control(link, msg)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - any endpoint error fails the link's rooms
            self._drop_link(link, f"connection to prefill {link.name} lost ({type(e).__name__}: {e})")

    async def _connect(self, link: PrefillLink) -> tuple[Channel, PeerPool | None]:
        """The handshaken channel to P, and P's pool if it offered one and we could map it (a direct link)."""
        route = await self._client.get_route(*link.addr, timeout=CONNECT_TIMEOUT_S)
        taken = {lk.channel.link_id for lk in self._links.values() if lk.channel is not None}
        channel = await connect(self.runtime, route.host, route.port, taken, 2 * CONNECT_TIMEOUT_S)
        try:
            await channel.send(Hello(self.desc.to_dict(), self.engine_id))
            reply = await asyncio.wait_for(channel.recv(), CONNECT_TIMEOUT_S)
        except BaseException:
            await channel.close()
            raise
        if isinstance(reply, HelloOk):
            pool = link.map_pool(reply.pool, self.kv, self.engine_id) if self.config.direct_read else None
            return channel, pool
        await channel.close()
        if isinstance(reply, HelloRefused):
            raise HandshakeRefused(reply.reason)
        raise ValueError(f"expected HelloOk, got {type(reply).__name__}")

    async def _heartbeat(self, link: PrefillLink) -> None:
        interval = self.config.heartbeat_interval
        loop = asyncio.get_running_loop()
        tick = loop.time()
        while True:
            tick += interval
            await asyncio.sleep(max(0.0, tick - loop.time()))
            if link.channel is None or not link.has_live_rooms():
                continue  # connecting (attempts count as probes) or idle
            if await self._client.health(*link.addr, timeout=min(interval, 2.0)):
                link.misses = 0
                continue
            link.misses += 1
            if link.misses >= self.config.heartbeat_max_failure:
                self._drop_link(link, self._unreachable(link, "GET /health failed"))
                return

    # --- loop: messages from P --------------------------------------------------------------------

    def _on_control(self, link: PrefillLink, msg: Message) -> None:
        state = link.rooms.get(getattr(msg, "room", -1))
        if isinstance(msg, Registered):
            if state is not None:
                state.advance(KVPoll.WaitingForInput)
        elif isinstance(msg, (Fail, Abort)):
            if state is not None:
                reason = msg.reason if isinstance(msg, Fail) else f"aborted by prefill: {msg.reason}"
                self._fail_room(state, reason, None)  # waits for the room's copies
            if link.pool is not None:  # P keeps its pages until we answer (it may have announced some)
                self._post(link, AbortAck(msg.room))
        else:
            logger.warning("%s: unexpected %s from prefill %s", self.engine_id, type(msg).__name__, link.name)

    async def _aclose(self) -> None:
        for link in list(self._links.values()):
            link.close_pool(self.engine_id)  # every room failed before this runs (shutdown)
            for task in link.tasks:
                task.cancel()
            if link.channel is not None:
                await link.channel.close()
        self._links.clear()
        await self._client.close()

