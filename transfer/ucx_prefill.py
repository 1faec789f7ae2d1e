"""UcxPrefillTransfer: P's side of the UCX engine (bootstrap server, data listener, rooms, D links).

Room clock: P first *sees* a room at its first ``poll``, ``send`` or ``abort`` call (the scheduler
polls when it admits the request). From then D has ``bootstrap_timeout`` seconds to register, else
the room fails. A registration that arrives before P sees the room (router sends to P and D
concurrently) waits in ``_pending`` (D is told Registered at once) and is taken over when P sees the
room; if P never sees it within ``bootstrap_timeout`` of its arrival, D is told Fail.

Links: P opens no listening socket of its own. Its bootstrap route names its UCX worker address and this
engine's accept id; ``_accept_loop`` receives D's Hellos on the accept tag (protocol.py) and only after a
Hello passed its checks (with a cluster secret: its ``link`` token) creates the endpoint back to D.
A room belongs to the link that registered it first: a second registration of a live room (any link)
is refused with Fail on the registering link only, so the first request's data never go elsewhere.

Sending: ``send`` hands the pages to the piece pipeline (ucx_pieces.py): UCX data messages; or, on a direct
link (we mapped the pool D offered in Hello, peer_pool.py), a copy into D's pages launched right in ``send``
plus a Pushed message (ucx_push.py). Success comes when D answers Done.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pd_common.cluster_auth import ClusterAuthError, ClusterKey
from transfer.base import (
    AuxRecord,
    EngineDescription,
    KVPoll,
    PrefillTransfer,
    TransferStats,
)
from transfer.bootstrap import BootstrapServer, Route
from transfer.config import TransferConfig
from transfer.hosts import advertised_host
from transfer.ipc_events import EventRing
from transfer.peer_pool import PeerPool, PeerPoolError, PoolOffer, open_pool
from transfer.protocol import (
    LINK_ID_BITS,
    MAX_HELLO_BYTES,
    Abort,
    AbortAck,
    Close,
    Done,
    Fail,
    Hello,
    HelloOk,
    HelloRefused,
    Message,
    Register,
    Registered,
    accept_tag,
    decode_hello,
    hello_payload,
)
from transfer.room import RecentFailures
from transfer.ucx_channel import Channel, accept, ucx_array
from transfer.ucx_engine import CONNECT_TIMEOUT_S
from transfer.ucx_pieces import SendingRoom
from transfer.ucx_push import PushSender

logger = logging.getLogger(__name__)


class DecodePeer:
    """One connected D endpoint (loop-only state)."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.decode_id = "?"
        self.refused: str | None = None  # handshake refusal, repeated for every registration
        self.rooms: set[int] = set()
        self.pool: PeerPool | None = None  # D's pool mapped here (a direct link); closed when the link ends
        self.events: EventRing | None = None  # direct CUDA links: recorded after each copy into D's pages


class PrefillRoom(SendingRoom):
    def __init__(self, room: int, deadline: float, on_change: Callable[[], None] | None = None) -> None:
        super().__init__(room, on_change)
        self.deadline = deadline  # D must register before this (monotonic s)
        self.peer: DecodePeer | None = None
        self.send_started = False  # failure injection is decided at the first send


@dataclass
class PendingRegistration:
    peer: DecodePeer
    num_pages: int
    page_ids: list[int] | None
    arrived: float


class UcxPrefillTransfer(PushSender[PrefillRoom], PrefillTransfer):
    role = "prefill"

    def __init__(
        self,
        kv_buffer: torch.Tensor,
        desc: EngineDescription,
        config: TransferConfig,
        bootstrap_host: str,
        bootstrap_port: int,
        data_host: str | None = None,
        cluster_key: ClusterKey | None = None,
    ) -> None:
        super().__init__(kv_buffer, desc, config, data_host)
        self.bootstrap_host = bootstrap_host
        self.bootstrap_port = bootstrap_port  # the real port once started (0 = pick a free one)
        self.data_host = data_host if data_host is not None else bootstrap_host
        self._key = cluster_key
        self._accept_id = secrets.randbits(LINK_ID_BITS)
        self._lock = threading.Lock()  # room creation vs. pending registrations
        self._pending: dict[int, PendingRegistration] = {}
        self._recent = RecentFailures()
        self._peers: set[DecodePeer] = set()
        self._bootstrap: BootstrapServer | None = None
        self._rng = random.Random()
        self._refusals = 0  # Hellos refused before a link existed (logged sparsely)

    # --- scheduler thread -------------------------------------------------------------------------

    def start(self) -> None:
        self._start_runtime(self._astart, self._aclose)
        logger.info(
            "%s: bootstrap server on %s:%d, KV data over UCX (advertised host %s, network devices %s), "
            "links %s, direct copies to decode pools on this host: %s",
            self.engine_id,
            self.bootstrap_host,
            self.bootstrap_port,
            advertised_host(self.data_host),
            self.runtime.net_devices or "all",
            "signed" if self._key is not None else "UNSIGNED",
            "on" if self.config.direct_copy else "off",
        )

    def poll(self, room: int) -> KVPoll:
        state = self._room(room)
        if state.alive and state.peer is None and time.monotonic() > state.deadline:
            self._fail(state, self._bootstrap_timeout_text(room), None)
        return state.status

    def send(
        self,
        room: int,
        page_ids: Sequence[int],
        first_page: int,
        last: bool,
        aux: AuxRecord | None = None,
        ready_event: Any = None,
    ) -> None:
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

    def holds(self, room: int) -> bool:
        return self.rooms.get(room) is not None

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
            state, created = self.rooms.get_or_create(room, lambda: PrefillRoom(room, deadline, self._notify))
            pending = self._pending.pop(room, None) if created else None
        if pending is not None:
            self._attach(state, pending.peer, pending.num_pages, pending.page_ids)
        elif created and (reason := self._recent.get(room)) is not None:
            # D registered this room earlier and its link has died since: fail now, not at the bootstrap timeout.
            self._fail(state, reason, None)
        return state

    def _attach(self, state: PrefillRoom, peer: DecodePeer, num_pages: int, page_ids: list[int] | None) -> None:
        problem = None
        state.num_pages = num_pages
        if page_ids is not None and peer.pool is not None:
            try:
                if len(page_ids) != num_pages:
                    raise ValueError(f"{len(page_ids)} page ids for {num_pages} pages")
                self._prepare_push(state, peer, page_ids)
                state.direct = True
            except Exception as e:  # noqa: BLE001 - D's bad ids fail the room, never the engine
                problem = f"decode registered unusable page ids ({type(e).__name__}: {e})"
        state.peer = peer  # last: a room with a peer is fully attached
        if problem is not None:
            self._fail(state, problem, Fail)
            return
        state.advance(KVPoll.WaitingForInput)
        self._wake(state)

    def _wake(self, state: PrefillRoom) -> None:
        if self._runtime is not None and self._runtime.in_loop_thread:
            state.registered.set()
        else:
            self.call_soon(state.registered.set)

    def _fail(self, state: PrefillRoom, reason: str, tell: type[Fail | Abort] | None) -> None:
        """Fail the room; ``tell`` D with that message type if it registered (None: D already knows).

        On a direct link the message goes only once our copies into D's pages finished: D frees them on it."""
        if not state.fail(reason):
            return
        logger.info("%s: room %d failed: %s", self.engine_id, state.room, reason)
        self._wake(state)
        peer = state.peer
        if tell is not None and peer is not None:
            self.call_soon(self._post_after_copies, peer, state, tell(state.room, reason))

    def _bootstrap_timeout_text(self, room: int) -> str:
        return (
            f"bootstrap timeout: no decode worker registered room {room} within "
            f"{self.config.bootstrap_timeout:g}s (SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT)"
        )

    def check_timeouts(self, now: float) -> None:
        for state in self.rooms.snapshot():
            if state.alive and state.peer is None and now > state.deadline:
                self._fail(state, self._bootstrap_timeout_text(state.room), None)
        with self._lock:
            expired = [
                (room, p) for room, p in self._pending.items() if now - p.arrived > self.config.bootstrap_timeout
            ]
            for room, _ in expired:
                del self._pending[room]
        for room, p in expired:
            reason = (
                f"prefill never received the request of room {room} within "
                f"{self.config.bootstrap_timeout:g}s of decode's registration"
            )
            self._recent.add(room, reason)
            p.peer.rooms.discard(room)
            self._post(p.peer, Fail(room, reason))

    # --- loop: start/stop, connections ------------------------------------------------------------

    async def _astart(self) -> None:
        self._bootstrap = BootstrapServer(self.bootstrap_host, self.bootstrap_port, self._key)
        self.bootstrap_port = await self._bootstrap.start()
        self._bootstrap.set_route(
            Route(
                host=advertised_host(self.data_host),
                address=self.runtime.worker_address.hex(),
                accept_id=self._accept_id,
                engine=self.desc.to_dict(),
                prefill_id=self.engine_id,
                auth=self._key is not None,
            )
        )
        self.spawn(self._accept_loop())

    async def _aclose(self) -> None:
        if self._bootstrap is not None:
            await self._bootstrap.stop()
        for peer in list(self._peers):
            await peer.channel.close()
            await self._close_peer_pool(peer)  # every room failed before this runs (shutdown)

    async def _accept_loop(self) -> None:
        """Receive D's Hellos (any sender, one message each) on this engine's accept tag, forever."""
        buf = np.empty(MAX_HELLO_BYTES, dtype=np.uint8)
        tag = accept_tag(self._accept_id)
        while True:
            try:
                await self.runtime.recv_any(ucx_array(buf), tag, buf)
                hello = decode_hello(buf.tobytes())
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - a garbled or oversized Hello is the sender's problem
                self._refuse_quietly(f"unreadable Hello ({type(e).__name__}: {e})")
                continue
            self.spawn(self._serve(hello))

    def _refuse_quietly(self, why: str) -> None:
        """A Hello refused before any link exists: nothing is sent back (that would dial the sender)."""
        self._refusals += 1
        n = self._refusals
        if n <= 10 or n % 1000 == 0:
            logger.warning("%s: refused a decode link (%d so far): %s", self.engine_id, n, why)

    def _check_hello(self, hello: Hello) -> str | None:
        """Why ``hello`` may not open a link (None: it may); checked before any endpoint to its sender exists."""
        if self._key is not None:
            try:
                self._key.verify("link", hello_payload(hello), hello.token)
            except ClusterAuthError as e:
                return f"decode {hello.decode_id[:64]!r}: {e}"
        if any(p.channel.link_id == hello.link_id for p in self._peers):  # 40 random bits: D retries
            return f"decode {hello.decode_id[:64]!r}: link id already in use"
        return None

    async def _serve(self, hello: Hello) -> None:
        """One D link: checks, the endpoint back to D, handshake answer, then its control messages until it fails."""
        problem = self._check_hello(hello)
        if problem is not None:
            self._refuse_quietly(problem)
            return
        try:
            channel = accept(self.runtime, hello)
        except ValueError as e:
            self._refuse_quietly(f"decode {hello.decode_id[:64]!r}: {e}")
            return
        peer = DecodePeer(channel)
        self._peers.add(peer)
        try:
            peer.decode_id = hello.decode_id
            peer.refused = self._check_engine(hello.engine)
            if peer.refused is None and hello.pool is not None and self.config.direct_copy:
                self._map_decode_pool(peer, hello.pool)
            await asyncio.wait_for(
                channel.send(
                    HelloOk(
                        self.engine_id, peer.pool is not None, peer.events.handles if peer.events is not None else []
                    )
                    if peer.refused is None
                    else HelloRefused(peer.refused)
                ),
                CONNECT_TIMEOUT_S,
            )
            while True:
                self._dispatch(peer, await channel.recv())
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - any endpoint error ends this peer
            self._peer_lost(peer, f"connection to decode worker {peer.decode_id} lost ({type(e).__name__}: {e})")
        finally:
            self._peers.discard(peer)
            await channel.close()
            await self._close_peer_pool(peer)  # after _peer_lost failed its rooms

    def _map_decode_pool(self, peer: DecodePeer, offer: dict[str, Any]) -> None:
        """Map the pool D offered (a direct link) with the link's events; on any problem: UCX data messages."""
        try:
            peer.pool = open_pool(PoolOffer.from_dict(offer), self.kv)
            if self._stream is not None:
                peer.events = EventRing(self.kv.device)
        except (PeerPoolError, RuntimeError) as e:
            if peer.pool is not None:
                peer.pool.close()
            peer.pool = None
            benign = isinstance(e, PeerPoolError) and e.benign
            logger.log(
                logging.INFO if benign else logging.WARNING,
                "%s: decode %s: KV as UCX data messages, no direct copies (%s)",
                self.engine_id,
                peer.decode_id,
                e,
            )
            return
        logger.info(
            "%s: decode %s: direct copies into its KV pool (%s)", self.engine_id, peer.decode_id, offer.get("kind")
        )

    def _check_engine(self, engine: dict[str, Any]) -> str | None:
        try:
            theirs = EngineDescription(**engine)
        except TypeError as e:
            return f"prefill/decode engine mismatch (unreadable decode engine description: {e})"
        return self.desc.mismatch(theirs)

    def _peer_lost(self, peer: DecodePeer, reason: str) -> None:
        live = [
            s for s in (self.rooms.get(r) for r in peer.rooms) if s is not None and s.peer is peer and not s.terminal
        ]
        if not self._closing:
            logger.log(
                logging.WARNING if live else logging.INFO,
                "%s: %s (%d live rooms failed)",
                self.engine_id,
                reason,
                len(live),
            )
        for state in live:
            self._fail(state, reason, None)
        with self._lock:
            for room in [r for r, p in self._pending.items() if p.peer is peer]:
                del self._pending[room]
                self._recent.add(room, reason)
        peer.rooms.clear()

    def _dispatch(self, peer: DecodePeer, msg: Message) -> None:
        if isinstance(msg, Close):
            raise ConnectionError(f"decode closed the link: {msg.reason[:200]}")
        if isinstance(msg, Register):
            self._on_register(peer, msg)
        elif isinstance(msg, Done):
            state = self.rooms.get(msg.room)
            if state is not None and state.peer is peer:
                state.advance(KVPoll.Success)
            peer.rooms.discard(msg.room)
        elif isinstance(msg, (Fail, Abort)):
            reason = msg.reason if isinstance(msg, Fail) else f"aborted by decode: {msg.reason}"
            state = self.rooms.get(msg.room)
            if state is None or state.peer is not peer:
                state = None
            if state is not None:
                self._fail(state, reason, None)
            if peer.pool is not None:  # D keeps the room's pages until we say no copy can write them any more
                self._post_after_copies(peer, state, AbortAck(msg.room))
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
                    self._pending[room] = PendingRegistration(peer, msg.num_pages, msg.page_ids, time.monotonic())
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
            self._attach(state, peer, msg.num_pages, msg.page_ids)
            if not state.alive:  # failed by the scheduler thread just before it knew its peer: tell D now
                self._post(peer, Fail(room, state.reason or f"room {room} failed on prefill"))

    def _post(self, peer: DecodePeer, msg: Message) -> None:
        """Send a control message, not waiting for it (loop); a broken link is reported by its receive loop."""
        try:
            peer.channel.post_nowait(msg)
        except ConnectionError as e:
            logger.debug("%s: could not send %s to %s: %s", self.engine_id, type(msg).__name__, peer.decode_id, e)
