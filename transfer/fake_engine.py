"""The fake transfer engine: P and D in one process, joined by a FakeTransferHub, for scheduler unit tests.

Same interface, states, failure texts, timeouts, abort and failure-injection semantics as the UCX
engine, but synchronous and thread-free: pages move with pack/unpack inside ``send`` (so D can jump
from WaitingForInput to Success within one call), and timeouts are evaluated when either side polls.
Emulated network: ``hub.set_reachable(addr, False)`` makes a P unreachable (D's heartbeat fails its
rooms after heartbeat_interval x heartbeat_max_failure); ``shutdown`` of one side acts like a broken
endpoint and fails the rooms it shared with the other at once.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from transfer.base import (
    AuxRecord,
    DecodeTransfer,
    EngineDescription,
    KVPoll,
    PrefillTransfer,
    TransferStats,
)
from transfer.config import TransferConfig
from transfer.pack import chunk_nbytes, pack_pages, unpack_pages, wait_ready
from transfer.room import RecentFailures, RoomInUse, RoomState, RoomTable, unknown_room

Addr = tuple[str, int]


class FakeTransferHub:
    """Bootstrap address -> fake P engine, plus emulated reachability. One lock serializes every fake engine."""

    _default: ClassVar[FakeTransferHub | None] = None
    _default_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._prefills: dict[Addr, FakePrefillTransfer] = {}
        self._down_since: dict[Addr, float] = {}
        self._ports = itertools.count(40000)

    @classmethod
    def default(cls) -> FakeTransferHub:
        """The process-wide hub used when none is passed (P and D schedulers built in one process)."""
        with cls._default_lock:
            if cls._default is None:
                cls._default = FakeTransferHub()
            return cls._default

    def add_prefill(self, p: FakePrefillTransfer) -> int:
        with self.lock:
            port = p.bootstrap_port
            while port == 0 or (p.bootstrap_host, port) in self._prefills:
                port = next(self._ports)
            self._prefills[(p.bootstrap_host, port)] = p
            return port

    def remove_prefill(self, p: FakePrefillTransfer) -> None:
        with self.lock:
            self._prefills.pop((p.bootstrap_host, p.bootstrap_port), None)

    def lookup(self, addr: Addr) -> FakePrefillTransfer | None:
        with self.lock:
            return None if addr in self._down_since else self._prefills.get(addr)

    def set_reachable(self, addr: Addr, reachable: bool) -> None:
        with self.lock:
            if reachable:
                self._down_since.pop(addr, None)
            else:
                self._down_since.setdefault(addr, time.monotonic())

    def down_since(self, addr: Addr) -> float | None:
        with self.lock:
            return self._down_since.get(addr)


class _PRoom(RoomState):
    def __init__(self, room: int, deadline: float) -> None:
        super().__init__(room)
        self.deadline = deadline
        self.d_room: _DRoom | None = None
        self.num_pages = 0
        self.pages_sent = 0
        self.send_started = False
        self.backlog: list[_Job] = []  # sends before D registered


class _DRoom(RoomState):
    def __init__(self, room: int, page_ids: list[int], addr: Addr, deadline: float, engine: FakeDecodeTransfer) -> None:
        super().__init__(room)
        self.page_ids = page_ids
        self.addr = addr
        self.deadline = deadline
        self.engine = engine
        self.prefill: FakePrefillTransfer | None = None  # set once registered with P
        self.aux: AuxRecord | None = None
        self.pages_received = 0


@dataclass(frozen=True)
class _Job:
    page_ids: list[int] | torch.Tensor
    first_page: int
    last: bool
    aux: AuxRecord | None
    ready_event: Any


class FakePrefillTransfer(PrefillTransfer):
    def __init__(
        self,
        kv_buffer: torch.Tensor,
        desc: EngineDescription,
        config: TransferConfig,
        bootstrap_host: str,
        bootstrap_port: int,
        hub: FakeTransferHub | None = None,
    ) -> None:
        self.kv, self.desc, self.config = kv_buffer, desc, config
        self.hub = hub or FakeTransferHub.default()
        self.bootstrap_host, self.bootstrap_port = bootstrap_host, bootstrap_port
        self.rooms: RoomTable[_PRoom] = RoomTable()
        self._pending: dict[int, tuple[_DRoom, float]] = {}  # registrations before P saw the room
        self._recent = RecentFailures()
        self._rng = random.Random()

    def start(self) -> None:
        self.bootstrap_port = self.hub.add_prefill(self)

    def poll(self, room: int) -> KVPoll:
        with self.hub.lock:
            state = self._room(room)
            if state.alive and state.d_room is None and time.monotonic() > state.deadline:
                state.fail(
                    f"bootstrap timeout: no decode worker registered room {room} within "
                    f"{self.config.bootstrap_timeout:g}s (SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT)"
                )
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
        with self.hub.lock:
            state = self._room(room)
            if not state.alive:
                return
            if not state.send_started:
                state.send_started = True
                p = self.config.test_failure_prob
                if p > 0 and self._rng.random() < p:
                    self._fail(state, f"injected KV transfer failure (SGLANG_DISAGGREGATION_TEST_FAILURE_PROB={p})", "")
                    return
            state.advance(KVPoll.Transferring)
            ids = page_ids.clone() if isinstance(page_ids, torch.Tensor) else list(page_ids)
            job = _Job(ids, first_page, last, aux, ready_event)
            if state.d_room is None:
                state.backlog.append(job)
            else:
                self._deliver(state, job)

    def abort(self, room: int, message: str) -> None:
        with self.hub.lock:
            self._fail(self._room(room), message, "aborted by prefill: ")

    def failure(self, room: int) -> str | None:
        state = self.rooms.get(room)
        return state.reason if state is not None and state.status == KVPoll.Failed else None

    def stats(self, room: int) -> TransferStats:
        state = self.rooms.get(room)
        return state.stats() if state is not None else TransferStats()

    def holds(self, room: int) -> bool:
        return self.rooms.get(room) is not None

    def release(self, room: int) -> None:
        with self.hub.lock:
            state = self.rooms.pop(room)
            if state is not None:
                self._fail(
                    state, "released by the prefill scheduler before the transfer finished", "aborted by prefill: "
                )
                if state.reason:
                    self._recent.add(room, state.reason)

    def shutdown(self) -> None:
        with self.hub.lock:
            self.hub.remove_prefill(self)
            lost = f"connection to prefill {self.bootstrap_host}:{self.bootstrap_port} lost (prefill shut down)"
            for state in self.rooms.snapshot():
                if state.d_room is not None:
                    state.d_room.fail(lost)
                state.fail("prefill transfer engine shut down")
            for d_room, _ in self._pending.values():
                d_room.fail(lost)
            self._pending.clear()

    # --- internals (hub lock held) ----------------------------------------------------------------

    def _room(self, room: int) -> _PRoom:
        state, created = self.rooms.get_or_create(
            room, lambda: _PRoom(room, time.monotonic() + self.config.bootstrap_timeout)
        )
        if created and room in self._pending:
            d_room, _ = self._pending.pop(room)
            self._attach(state, d_room)
        return state

    def _fail(self, state: _PRoom, reason: str, d_prefix: str | None) -> None:
        """Fail the room; D's room fails too with ``d_prefix + reason`` unless ``d_prefix`` is None."""
        if state.fail(reason) and d_prefix is not None and state.d_room is not None:
            state.d_room.fail(d_prefix + reason)

    def _attach(self, state: _PRoom, d_room: _DRoom) -> None:
        state.d_room, state.num_pages = d_room, len(d_room.page_ids)
        state.advance(KVPoll.WaitingForInput)
        backlog, state.backlog = state.backlog, []
        for job in backlog:
            self._deliver(state, job)

    def on_register(self, d_room: _DRoom) -> str | None:
        """D registers a room: None if accepted, else the refusal text."""
        state = self.rooms.get(d_room.room)
        if state is None:
            reason = self._recent.get(d_room.room)
            if reason is None and d_room.room in self._pending:
                reason = f"room {d_room.room} is already registered by another decode request"
            if reason is None:
                self._pending[d_room.room] = (d_room, time.monotonic())
            return reason
        if not state.alive:
            return state.reason or f"room {d_room.room} already finished on prefill"
        if state.d_room is not None:
            return f"room {d_room.room} is already registered by another decode request"
        self._attach(state, d_room)
        return None

    def on_decode_failed(self, d_room: _DRoom, reason: str) -> None:
        state = self.rooms.get(d_room.room)
        if state is not None and state.d_room is d_room:
            state.fail(reason)
        elif self._pending.get(d_room.room, (None, 0.0))[0] is d_room:
            del self._pending[d_room.room]
            self._recent.add(d_room.room, reason)

    def pending_expired(self, d_room: _DRoom, now: float) -> bool:
        entry = self._pending.get(d_room.room)
        if entry is None or entry[0] is not d_room or now - entry[1] <= self.config.bootstrap_timeout:
            return False
        del self._pending[d_room.room]
        return True

    def _deliver(self, state: _PRoom, job: _Job) -> None:
        d_room = state.d_room
        assert d_room is not None
        n = len(job.page_ids)
        if job.first_page + n > state.num_pages:
            self._fail(
                state,
                f"prefill sends pages [{job.first_page}, {job.first_page + n}) but decode "
                f"registered {state.num_pages} pages",
                "",
            )
            return
        if n:
            wait_ready(job.ready_event)
            staging = torch.empty(
                chunk_nbytes(self.kv, n) // self.kv.element_size(), dtype=self.kv.dtype, device=self.kv.device
            )
            pack_pages(self.kv, job.page_ids, staging)
            state.add_bytes(staging.numel() * staging.element_size())
            state.pages_sent += n
            if d_room.alive:
                d_kv = d_room.engine.kv
                d_room.advance(KVPoll.Transferring)
                unpack_pages(d_kv, d_room.page_ids[job.first_page : job.first_page + n], staging.to(d_kv.device))
                d_room.add_bytes(staging.numel() * staging.element_size())
                d_room.pages_received += n
        if job.last and d_room.alive:
            assert job.aux is not None
            d_room.aux = AuxRecord(**job.aux.to_dict())
            d_room.advance(KVPoll.Success)
            state.advance(KVPoll.Success)


class FakeDecodeTransfer(DecodeTransfer):
    def __init__(
        self,
        kv_buffer: torch.Tensor,
        desc: EngineDescription,
        config: TransferConfig,
        hub: FakeTransferHub | None = None,
    ) -> None:
        self.kv, self.desc, self.config = kv_buffer, desc, config
        self.hub = hub or FakeTransferHub.default()
        self.rooms: RoomTable[_DRoom] = RoomTable()

    def start(self) -> None:
        pass

    def register(self, room: int, bootstrap_host: str, bootstrap_port: int, page_ids: Sequence[int]) -> None:
        ids = page_ids.tolist() if isinstance(page_ids, torch.Tensor) else list(page_ids)
        with self.hub.lock:
            state = _DRoom(
                room, ids, (bootstrap_host, int(bootstrap_port)), time.monotonic() + self.config.waiting_timeout, self
            )
            _, created = self.rooms.get_or_create(room, lambda: state)
            if not created:  # as the UCX engine: the holder's state is never touched
                raise RoomInUse(room)
            self._connect(state)

    def holds(self, room: int) -> bool:
        return self.rooms.get(room) is not None

    def poll(self, room: int) -> KVPoll:
        with self.hub.lock:
            state = self.rooms.get(room)
            if state is None:
                return KVPoll.Failed
            if state.alive:
                self._check(state, time.monotonic())
            return state.status

    def aux(self, room: int) -> AuxRecord | None:
        state = self.rooms.get(room)
        return state.aux if state is not None and state.status == KVPoll.Success else None

    def abort(self, room: int, message: str) -> None:
        with self.hub.lock:
            state = self.rooms.get(room)
            if state is not None:
                self._fail(state, message, "aborted by decode: ")

    def failure(self, room: int) -> str | None:
        state = self.rooms.get(room)
        if state is None:
            return unknown_room(room)
        return state.reason if state.status == KVPoll.Failed else None

    def stats(self, room: int) -> TransferStats:
        state = self.rooms.get(room)
        return state.stats() if state is not None else TransferStats()

    def release(self, room: int) -> None:
        with self.hub.lock:
            state = self.rooms.pop(room)
            if state is not None:
                self._fail(
                    state, "released by the decode scheduler before the transfer finished", "aborted by decode: "
                )

    def shutdown(self) -> None:
        with self.hub.lock:
            lost = "connection to decode worker lost (decode shut down)"
            for state in self.rooms.snapshot():
                self._fail(state, "decode transfer engine shut down", None)
                if state.prefill is not None:
                    state.prefill.on_decode_failed(state, lost)

    # --- internals (hub lock held) ----------------------------------------------------------------

    def _connect(self, state: _DRoom) -> None:
        p = self.hub.lookup(state.addr)
        if p is None:
            return  # unreachable: retried at every poll, failed by _check after the heartbeat budget
        refusal = p.desc.mismatch(self.desc) or p.on_register(state)
        if refusal is not None:
            state.fail(refusal)
            return
        state.prefill = p
        state.advance(KVPoll.WaitingForInput)

    def _check(self, state: _DRoom, now: float) -> None:
        budget = self.config.heartbeat_interval * self.config.heartbeat_max_failure
        addr = f"{state.addr[0]}:{state.addr[1]}"
        if now > state.deadline:
            self._fail(
                state,
                f"KV transfer timed out: room {state.room} got no complete KV from prefill {addr} "
                f"within {self.config.waiting_timeout:g}s (SGLANG_DISAGGREGATION_WAITING_TIMEOUT)",
                "",
            )
            return
        if state.prefill is None:
            self._connect(state)
            if state.alive and state.prefill is None and now - state.created >= budget:
                state.fail(f"prefill server {addr} unreachable: no answer for {budget:g}s (bootstrap server not found)")
            return
        down = self.hub.down_since(state.addr)
        if down is not None and now - down >= budget:
            self._fail(
                state,
                f"prefill server {addr} unreachable: {self.config.heartbeat_max_failure} consecutive "
                f"failed probes every {self.config.heartbeat_interval:g}s (GET /health failed)",
                None,
            )
        elif state.prefill.pending_expired(state, now):
            state.fail(
                f"prefill never received the request of room {state.room} within "
                f"{self.config.bootstrap_timeout:g}s of decode's registration"
            )

    def _fail(self, state: _DRoom, reason: str, p_prefix: str | None) -> None:
        """Fail the room; P's room fails too with ``p_prefix + reason`` unless ``p_prefix`` is None."""
        if state.fail(reason) and p_prefix is not None and state.prefill is not None:
            state.prefill.on_decode_failed(state, p_prefix + reason)
