"""StagingPool: a few persistent, reused byte buffers on the KV device that pieces are packed into / received into.

``num_slots`` (SGLANG_DISAGGREGATION_QUEUE_SIZE) slots bound the data messages in flight per engine. A
slot keeps its allocation between uses (UCX caches registrations/IPC mappings per allocation) and only
grows, to the size of the largest piece it has carried: device memory held is at most
``num_slots x largest piece``.
Threads: ``try_acquire`` from any thread (P packs on the scheduler's thread when a slot is free);
``acquire`` and ``release`` on the owning event loop. Waiters are served first come, first served, and
``try_acquire`` never overtakes a waiter, so a piece that had to wait is never starved by later ones.
``StagingSlot.ready``: a CUDA event after the last GPU work on the slot (D's scatter reading it; P's gather
writing it, when a dead room's piece gave its slot back without waiting). Nothing may touch the slot,
nor may it be reallocated, before that event fired: ``acquire`` waits for it (through ``wait_event``),
``try_acquire`` passes over a slot whose event has not fired.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import torch

_GROW_ALIGN = 1 << 20  # grow slots in whole MiB so nearby piece sizes reuse one allocation


class StagingSlot:
    def __init__(self, index: int, device: torch.device) -> None:
        self.index = index
        self.device = device
        self.buf = torch.empty(0, dtype=torch.uint8, device=device)
        self.ready: Any = None  # torch.cuda.Event after the last GPU work on the slot, or None

    @property
    def capacity(self) -> int:
        return self.buf.numel()

    def ensure(self, nbytes: int) -> None:
        if nbytes > self.capacity:
            size = -(-nbytes // _GROW_ALIGN) * _GROW_ALIGN
            self.buf = torch.empty(0, dtype=torch.uint8, device=self.device)  # free before growing
            self.buf = torch.empty(size, dtype=torch.uint8, device=self.device)

    def view(self, nbytes: int, dtype: torch.dtype) -> torch.Tensor:
        """The first ``nbytes`` as a contiguous 1-D tensor of ``dtype`` (the packed piece)."""
        return self.buf[:nbytes].view(dtype)


class StagingPool:
    def __init__(
        self, num_slots: int, device: torch.device, wait_event: Callable[[Any], Awaitable[None]] | None = None
    ) -> None:
        self._slots = [StagingSlot(i, device) for i in range(num_slots)]
        self._free = list(self._slots)
        self._lock = threading.Lock()
        self._waiters: deque[tuple[asyncio.Future[StagingSlot], int]] = deque()
        self._wait_event = wait_event
        self.num_slots = num_slots

    def try_acquire(self, nbytes: int) -> StagingSlot | None:
        """A free slot of at least ``nbytes`` whose last GPU reader is done, or None (any thread, never waits)."""
        with self._lock:
            if self._waiters or not self._free:
                return None
            slot = self._pick(nbytes)
            if slot.ready is not None and not slot.ready.query():
                return None
            self._free.remove(slot)
        return self._grow(slot, nbytes)

    async def acquire(self, nbytes: int) -> StagingSlot:
        """A free slot of at least ``nbytes`` (waits while all are busy; grows the largest free one if needed)."""
        with self._lock:
            if self._free and not self._waiters:
                slot: StagingSlot | None = self._pick(nbytes)
                self._free.remove(slot)  # type: ignore[arg-type]
            else:
                slot = None
                fut: asyncio.Future[StagingSlot] = asyncio.get_running_loop().create_future()
                self._waiters.append((fut, nbytes))
        if slot is None:
            try:
                slot = await fut
            except asyncio.CancelledError:
                self._cancel_wait(fut)
                raise
        if slot.ready is not None:
            try:
                if not slot.ready.query() and self._wait_event is not None:
                    await self._wait_event(slot.ready)
                else:
                    slot.ready.synchronize()
            except BaseException:
                self.release(slot)
                raise
            slot.ready = None
        return self._grow(slot, nbytes)

    def release(self, slot: StagingSlot) -> None:
        """Give ``slot`` back (loop thread): to the first waiter, else to the free list."""
        with self._lock:
            while self._waiters:
                fut, _ = self._waiters.popleft()
                if not fut.done():
                    fut.set_result(slot)
                    return
            self._free.append(slot)

    @property
    def bytes_held(self) -> int:
        return sum(s.capacity for s in self._slots)

    def _pick(self, nbytes: int) -> StagingSlot:
        fits = [s for s in self._free if s.capacity >= nbytes]
        return min(fits, key=lambda s: s.capacity) if fits else max(self._free, key=lambda s: s.capacity)

    def _grow(self, slot: StagingSlot, nbytes: int) -> StagingSlot:
        try:
            slot.ensure(nbytes)
        except BaseException:
            self.release(slot)
            raise
        return slot

    def _cancel_wait(self, fut: asyncio.Future[StagingSlot]) -> None:
        with self._lock:
            self._waiters = deque(w for w in self._waiters if w[0] is not fut)
        if fut.done() and not fut.cancelled():
            self.release(fut.result())  # handed over just as the waiter was cancelled
