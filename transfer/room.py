"""Per-room state shared by both engines: the forward-only KVPoll state machine, failure text, byte/time stats.

Invariants: a room's status only moves forward (Bootstrapping < WaitingForInput < Transferring <
Success); Failed and Success are terminal. ``lock`` (re-entrant) guards status changes, and engines
hold it while they start a read (P's pack) or write (D's scatter) of the room's pages, skipping dead rooms.
On CUDA, D's scatters run asynchronously on D's engine stream; D records the latest one's completion in
``gpu_work`` (one stream runs them in order, so it covers all), and ``fail`` waits for it before it marks
the room Failed. So once D's ``fail``/abort returns, or ``poll`` shows Failed, no write into the room's
pages is in progress or can start. P's packs only read; P never waits for them when a room fails: a pack
still queued behind the forward may read pages the scheduler has reused, but a dead room's bytes are
never sent (P posts a piece only after its pack finished while the room was alive).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from transfer.base import KVPoll, TransferStats


class RoomState:
    def __init__(
        self, room: int, status: KVPoll = KVPoll.Bootstrapping, on_change: Callable[[], None] | None = None
    ) -> None:
        self.room = room
        self.lock = threading.RLock()
        self.status = status
        self.reason: str | None = None
        self.created = time.monotonic()
        self.num_bytes = 0
        self.t_first: float | None = None  # first byte packed (P) / header received (D)
        self.t_end: float | None = None  # Success or Failed
        self.gpu_work: Any = None  # D: torch.cuda.Event after the room's latest scatter on the engine stream
        self.path = ""  # TransferStats.path, set by the engine when the first pages move
        self.on_change = on_change  # called after every status change, outside the lock (the engine's wakeup)

    @property
    def terminal(self) -> bool:
        return self.status in (KVPoll.Success, KVPoll.Failed)

    @property
    def alive(self) -> bool:
        return not self.terminal

    def advance(self, to: KVPoll) -> bool:
        """Move forward to ``to`` (never backward, never out of a terminal state); True if it moved."""
        assert to != KVPoll.Failed, "use fail()"
        with self.lock:
            if self.terminal or to <= self.status:
                return False
            self.status = to
            if to == KVPoll.Success:
                self.t_end = time.monotonic()
        if self.on_change is not None:
            self.on_change()
        return True

    def fail(self, reason: str) -> bool:
        """Mark Failed with ``reason`` unless already terminal; True if this call failed it.

        Waits for the room's queued GPU writes (``gpu_work``) first: at most the scatter of a few pieces."""
        with self.lock:
            if self.terminal:
                return False
            if self.gpu_work is not None:
                self.gpu_work.synchronize()
                self.gpu_work = None
            self.status = KVPoll.Failed
            self.reason = reason
            self.t_end = time.monotonic()
        if self.on_change is not None:
            self.on_change()
        return True

    def add_bytes(self, n: int) -> None:
        with self.lock:
            if self.t_first is None:
                self.t_first = time.monotonic()
            self.num_bytes += n

    def mark_first_byte(self, at: float | None = None) -> None:
        """The transfer's start: now, or ``at`` (a monotonic time of this host) if that is earlier."""
        with self.lock:
            t = time.monotonic() if at is None else at
            if self.t_first is None or t < self.t_first:
                self.t_first = t

    def stats(self) -> TransferStats:
        with self.lock:
            if self.t_first is None:
                return TransferStats(self.num_bytes, 0.0, self.path)
            end = self.t_end if self.t_end is not None else time.monotonic()
            return TransferStats(self.num_bytes, max(0.0, (end - self.t_first) * 1e3), self.path)


R = TypeVar("R", bound=RoomState)


class RoomTable(Generic[R]):
    """Thread-safe room -> state map."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rooms: dict[int, R] = {}

    def get(self, room: int) -> R | None:
        with self._lock:
            return self._rooms.get(room)

    def get_or_create(self, room: int, make: Callable[[], R]) -> tuple[R, bool]:
        """(state, created): ``make`` runs under the table lock, so keep it cheap."""
        with self._lock:
            state = self._rooms.get(room)
            if state is not None:
                return state, False
            state = self._rooms[room] = make()
            return state, True

    def put(self, room: int, state: R) -> R | None:
        """Store ``state``; return the state it replaced."""
        with self._lock:
            old = self._rooms.get(room)
            self._rooms[room] = state
            return old

    def pop(self, room: int) -> R | None:
        with self._lock:
            return self._rooms.pop(room, None)

    def snapshot(self) -> list[R]:
        with self._lock:
            return list(self._rooms.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._rooms)

    def __iter__(self) -> Iterator[R]:
        return iter(self.snapshot())


class RecentFailures:
    """Why recently released rooms failed (bounded), to answer a late registration at once."""

    def __init__(self, capacity: int = 4096) -> None:
        self._lock = threading.Lock()
        self._capacity = capacity
        self._reasons: OrderedDict[int, str] = OrderedDict()

    def add(self, room: int, reason: str) -> None:
        with self._lock:
            self._reasons[room] = reason
            self._reasons.move_to_end(room)
            while len(self._reasons) > self._capacity:
                self._reasons.popitem(last=False)

    def get(self, room: int) -> str | None:
        with self._lock:
            return self._reasons.get(room)


class RoomInUse(ValueError):
    """``register`` of a room this engine still holds (another request's): refused, the holder untouched."""

    def __init__(self, room: int) -> None:
        super().__init__(f"room {room} is already in use by another request on this decode worker")
        self.room = room


def unknown_room(room: int) -> str:
    return f"room {room} is unknown to this transfer engine (never registered, or already released)"
