"""UcxPrefillTransfer: P's side of the UCX engine (bootstrap server, data listener, rooms, D links).

Room clock: P first *sees* a room at its first ``poll``, ``send`` or ``abort`` call (the scheduler
polls when it admits the request). From then D has ``bootstrap_timeout`` seconds to register, else
the room fails. A registration that arrives before P sees the room (router sends to P and D
concurrently) waits in ``_pending`` (D is told Registered at once) and is taken over when P sees the
room; if P never sees it within ``bootstrap_timeout`` of its arrival, D is told Fail.

Sending: ``send`` hands the pages to the piece pipeline (ucx_pieces.py): UCX data messages, or on a direct
link (D mapped the pool we offer in HelloOk, peer_pool.py) a Pages message naming our pages once they are
written. Success comes when D answers Done.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from transfer.base import (
    AuxRecord,
    EngineDescription,
    KVPoll,
    PrefillTransfer,
    TransferStats,
)
from transfer.bootstrap import BootstrapServer, Route, advertised_host
from transfer.config import TransferConfig
from transfer.peer_pool import PeerPoolError, export_pool
from transfer.protocol import (
    Abort,
    AbortAck,
    Done,
    Fail,
    Hello,
    HelloOk,
    HelloRefused,
    Message,
    Register,
    Registered,
)
from transfer.room import RecentFailures
from transfer.ucx_channel import Channel, accept
from transfer.ucx_engine import CONNECT_TIMEOUT_S
from transfer.ucx_pieces import PieceSender, SendingRoom

logger = logging.getLogger(__name__)


class DecodePeer:
    """One connected D endpoint (loop-only state)."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.decode_id = "?"
        self.refused: str | None = None  # handshake refusal, repeated for every registration
        self.rooms: set[int] = set()


class PrefillRoom(SendingRoom):
    def __init__(self, room: int, deadline: float) -> None:
        super().__init__(room)
        self.deadline = deadline  # D must register before this (monotonic s)
        self.peer: DecodePeer | None = None
        self.send_started = False  # failure injection is decided at the first send


@dataclass
class PendingRegistration:
    peer: DecodePeer
    num_pages: int
    direct: bool
    arrived: float


class UcxPrefillTransfer(PieceSender[PrefillRoom], PrefillTransfer):
    role = "prefill"

    def __init__(self, kv_buffer: torch.Tensor, desc: EngineDescription, config: TransferConfig,
                 bootstrap_host: str, bootstrap_port: int) -> None:
        super().__init__(kv_buffer, desc, config)
        self.bootstrap_host = bootstrap_host
        self.bootstrap_port = bootstrap_port  # the real port once started (0 = pick a free one)
        self._lock = threading.Lock()  # room creation vs. pending registrations
        self._pending: dict[int, PendingRegistration] = {}
        self._recent = RecentFailures()
        self._peers: set[DecodePeer] = set()
        self._listener: Any = None
        self._bootstrap: BootstrapServer | None = None
        self._rng = random.Random()
        self._offer: dict[str, Any] | None = None  # our pool, offered to D for direct reads (peer_pool.py)

    # --- scheduler thread -------------------------------------------------------------------------

    def start(self) -> None:
        if self.config.direct_read:
            try:
                self._offer = export_pool(self.kv).to_dict()
            except PeerPoolError as e:
                logger.info("%s: no direct reads of the KV pool (%s): KV goes as UCX data messages", self.engine_id, e)
        self._start_runtime(self._astart, self._aclose)
        logger.info("%s: bootstrap server on %s:%d, UCX data listener on port %d, pool offered for direct reads: %s",
                    self.engine_id, self.bootstrap_host, self.bootstrap_port, self._listener.port,
                    self._offer["kind"] if self._offer else "no")

    def poll(self, room: int) -> KVPoll:
        state = self._room(room)
        if state.alive and state.peer is None and time.monotonic() > state.deadline:
            self._fail(state, self._bootstrap_timeout_text(room), None)
        return state.status

    def send(self, room: int, page_ids: Sequence[int], first_page: int, last: bool,
             aux: AuxRecord | None = None, ready_event: Any = None) -> None:
        if last and aux is None:
            raise ValueError("the last send of a room must carry its aux record")
        state = self._room(room)
        if not state.alive:
            return
        if not state.send_started:
            state.send_started = True
            p = self.config.test_failure_prob
            if p > 0 and self._rng.random() < p:
                self._fail(state, f"injected KV transfer failure (SGLANG_DISAGGREGATION_TEST_FAILURE_PROB={p})", Fail)
                return
        state.advance(KVPoll.Transferring)
        self._queue_pieces(state, page_ids, first_page, last, aux, ready_event)

    def abort(self, room: int, message: str) -> None:
        self._fail(self._room(room), message, Abort)

    def failure(self, room: int) -> str | None:
        state = self.rooms.get(room)
        return state.reason if state is not None and state.status == KVPoll.Failed else None

    def stats(self, room: int) -> TransferStats:
        return self._stats(room)

    def release(self, room: int) -> None:
        state = self.rooms.pop(room)
        if state is None:
            return
        self._fail(state, "released by the prefill scheduler before the transfer finished", Abort)
        if state.status == KVPoll.Failed and state.reason:
            self._recent.add(room, state.reason)
        peer = state.peer
        if peer is not None:
            self.call_soon(peer.rooms.discard, room)

    def shutdown(self) -> None:
        self._shutdown_common(self._aclose)

    # --- rooms (any thread) -----------------------------------------------------------------------

    def _room(self, room: int) -> PrefillRoom:
        state = self.rooms.get(room)
        if state is not None:
            return state
        with self._lock:
            deadline = time.monotonic() + self.config.bootstrap_timeout
            state, created = self.rooms.get_or_create(room, lambda: PrefillRoom(room, deadline))
            pending = self._pending.pop(room, None) if created else None
        if pending is not None:
            self._attach(state, pending.peer, pending.num_pages, pending.direct)
        elif created and (reason := self._recent.get(room)) is not None:
            # D registered this room earlier and its link has died since: fail now, not at the bootstrap timeout.
            self._fail(state, reason, None)
        return state

    def _attach(self, state: PrefillRoom, peer: DecodePeer, num_pages: int, direct: bool) -> None:
        state.num_pages, state.direct = num_pages, direct and self._offer is not None
        state.peer = peer  # last: a room with a peer is fully attached
        state.advance(KVPoll.WaitingForInput)
        self._wake(state)

    def _wake(self, state: PrefillRoom) -> None:
        if self._runtime is not None and self._runtime.in_loop_thread:
            state.registered.set()
        else:
            self.call_soon(state.registered.set)

    def _fail(self, state: PrefillRoom, reason: str, tell: type[Fail | Abort] | None) -> None:
        """Fail the room; ``tell`` D with that message type if it registered (None: D already knows).

        A room whose pages D may be copying (direct link, pages announced) first drains: D is told, and the
        room turns Failed only when D answers (or its link drops, or ``_drain_timeout`` passes), so the
        scheduler keeps the pages until no copy by D can read them."""
        if tell is not None and self._drain(state, reason, tell):
            return
        reason = state.draining or reason  # a drained room fails with the reason it began draining for
        if not state.fail(reason):
            return
        logger.info("%s: room %d failed: %s", self.engine_id, state.room, reason)
        self._wake(state)
        peer = state.peer
        if tell is not None and peer is not None:
            self.call_soon(self._post, peer, tell(state.room, reason))

    def _drain(self, state: PrefillRoom, reason: str, tell: type[Fail | Abort]) -> bool:
        """Start draining the room if D may be reading its pages; True if it is draining now."""
        with state.lock:
            if state.draining is not None:
                return True
            if state.terminal or not (state.direct and state.announced):
                return False
            state.draining = reason
            state.drain_deadline = time.monotonic() + self._drain_timeout
        logger.info("%s: room %d failing once decode stops reading its pages: %s", self.engine_id, state.room, reason)
        self.call_soon(self._post, state.peer, tell(state.room, reason))
        return True

    @property
    def _drain_timeout(self) -> float:
        """How long a draining room waits for D's answer: as long as D waits before it declares us dead."""
        return self.config.heartbeat_interval * self.config.heartbeat_max_failure

    def _bootstrap_timeout_text(self, room: int) -> str:
        return (f"bootstrap timeout: no decode worker registered room {room} within "
                f"{self.config.bootstrap_timeout:g}s (SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT)")

    def check_timeouts(self, now: float) -> None:
        for state in self.rooms.snapshot():
            if state.alive and state.peer is None and now > state.deadline:
                self._fail(state, self._bootstrap_timeout_text(state.room), None)
            elif state.draining is not None and not state.terminal and now > state.drain_deadline:
                logger.warning("%s: room %d: decode did not answer our abort within %gs; failing it anyway",
                               self.engine_id, state.room, self._drain_timeout)
                self._fail(state, state.draining, None)
        with self._lock:
            expired = [(room, p) for room, p in self._pending.items()
                       if now - p.arrived > self.config.bootstrap_timeout]
            for room, _ in expired:
                del self._pending[room]
        for room, p in expired:
            reason = (f"prefill never received the request of room {room} within "
                      f"{self.config.bootstrap_timeout:g}s of decode's registration")
            self._recent.add(room, reason)
            p.peer.rooms.discard(room)
            self._post(p.peer, Fail(room, reason))

    # --- loop: start/stop, connections ------------------------------------------------------------

    async def _astart(self) -> None:
        self._listener = self.runtime.listen(0, lambda ep: self.spawn(self._serve(ep)))
        self._bootstrap = BootstrapServer(self.bootstrap_host, self.bootstrap_port)
        self.bootstrap_port = await self._bootstrap.start()
        self._bootstrap.set_route(Route(host=advertised_host(self.bootstrap_host), port=self._listener.port,
                                        engine=self.desc.to_dict(), prefill_id=self.engine_id))

    async def _aclose(self) -> None:
        if self._bootstrap is not None:
            await self._bootstrap.stop()
        for peer in list(self._peers):
            await peer.channel.close()
        self._listener = None  # dropping it stops listening

    async def _serve(self, ep: Any) -> None:
        """One D link: handshake, then its control messages until the endpoint fails."""
        try:
            channel = await accept(self.runtime, ep, CONNECT_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - a connection that never said who it is: forget it
            logger.info("%s: a decode worker's connection failed before its handshake: %s", self.engine_id, e)
            return
        peer = DecodePeer(channel)
        if any(p.channel.link_id == channel.link_id for p in self._peers):  # 40 random bits: D retries
            await channel.close()
            return
        self._peers.add(peer)
        try:
            hello = await asyncio.wait_for(channel.recv(), CONNECT_TIMEOUT_S)
            if not isinstance(hello, Hello):
                raise TypeError(f"expected Hello, got {type(hello).__name__}")
            peer.decode_id = hello.decode_id
            peer.refused = self._check_engine(hello.engine)
            await channel.send(HelloOk(self.engine_id, self._offer) if peer.refused is None
                               else HelloRefused(peer.refused))
            while True:
                self._dispatch(peer, await channel.recv())
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - any endpoint error ends this peer
            self._peer_lost(peer, f"connection to decode worker {peer.decode_id} lost ({type(e).__name__}: {e})")
        finally:
            self._peers.discard(peer)
            await channel.close()

    def _check_engine(self, engine: dict[str, Any]) -> str | None:
        try:
            theirs = EngineDescription(**engine)
        except TypeError as e:
            return f"prefill/decode engine mismatch (unreadable decode engine description: {e})"
        return self.desc.mismatch(theirs)

    def _peer_lost(self, peer: DecodePeer, reason: str) -> None:
        live = [s for s in (self.rooms.get(r) for r in peer.rooms) if s is not None and s.peer is peer and not s.terminal]
        if not self._closing:
            logger.log(logging.WARNING if live else logging.INFO, "%s: %s (%d live rooms failed)",
                       self.engine_id, reason, len(live))
        for state in live:
            self._fail(state, reason, None)
        with self._lock:
            for room in [r for r, p in self._pending.items() if p.peer is peer]:
                del self._pending[room]
                self._recent.add(room, reason)
        peer.rooms.clear()

    def _dispatch(self, peer: DecodePeer, msg: Message) -> None:
        if isinstance(msg, Register):
            self._on_register(peer, msg)
        elif isinstance(msg, (Done, AbortAck)):
            state = self.rooms.get(msg.room)
            if state is not None and state.peer is peer:
                if state.draining is not None:  # D stopped reading (or finished before our abort came)
                    self._fail(state, state.draining, None)
                elif isinstance(msg, Done):
                    state.advance(KVPoll.Success)
            peer.rooms.discard(msg.room)
        elif isinstance(msg, (Fail, Abort)):
            reason = msg.reason if isinstance(msg, Fail) else f"aborted by decode: {msg.reason}"
            state = self.rooms.get(msg.room)
            if state is not None and state.peer is peer:
                self._fail(state, state.draining or reason, None)
            with self._lock:
                if self._pending.get(msg.room) is not None and self._pending[msg.room].peer is peer:
                    del self._pending[msg.room]
                    self._recent.add(msg.room, reason)
            peer.rooms.discard(msg.room)
        else:
            logger.warning("%s: unexpected %s from decode %s", self.engine_id, type(msg).__name__, peer.decode_id)

    def _on_register(self, peer: DecodePeer, msg: Register) -> None:
        room = msg.room
        refusal = peer.refused
        with self._lock:
            state = self.rooms.get(room)
            if refusal is None and state is None:
                refusal = self._recent.get(room)
                if refusal is None and room in self._pending:
                    refusal = f"room {room} is already registered by another decode request"
                if refusal is None:
                    self._pending[room] = PendingRegistration(peer, msg.num_pages, msg.direct, time.monotonic())
        if refusal is None and state is not None:
            if not state.alive:
                refusal = state.reason or f"room {room} already finished on prefill"
            elif state.peer is not None:
                refusal = f"room {room} is already registered by another decode request"
        if refusal is not None:
            self._post(peer, Fail(room, refusal))
            return
        peer.rooms.add(room)
        self._post(peer, Registered(room))
        if state is not None:
            self._attach(state, peer, msg.num_pages, msg.direct)
            if not state.alive:  # failed by the scheduler thread just before it knew its peer: tell D now
                self._post(peer, Fail(room, state.reason or f"room {room} failed on prefill"))

    def _post(self, peer: DecodePeer, msg: Message) -> None:
        """Send a control message, not waiting for it (loop); a broken link is reported by its receive loop."""
        try:
            peer.channel.post_nowait(msg)
        except ConnectionError as e:
            logger.debug("%s: could not send %s to %s: %s", self.engine_id, type(msg).__name__, peer.decode_id, e)
