"""StagingPool: a few persistent, reused byte buffers on the KV device that chunks are packed into / received into.

``num_slots`` (SGLANG_DISAGGREGATION_QUEUE_SIZE) slots bound the chunks in flight per engine. A slot
keeps its allocation between chunks (UCX caches registrations/IPC mappings per allocation) and only
grows, to the size of the largest chunk it has carried: device memory held is at most
``num_slots x largest chunk``. Used from the UCX event loop only.
"""

from __future__ import annotations

import asyncio

import torch

_GROW_ALIGN = 1 << 20  # grow slots in whole MiB so nearby chunk sizes reuse one allocation


class StagingSlot:
    def __init__(self, index: int, device: torch.device) -> None:
        self.index = index
        self.device = device
        self.buf = torch.empty(0, dtype=torch.uint8, device=device)

    @property
    def capacity(self) -> int:
        return self.buf.numel()

    def ensure(self, nbytes: int) -> None:
        if nbytes > self.capacity:
            size = -(-nbytes // _GROW_ALIGN) * _GROW_ALIGN
            self.buf = torch.empty(0, dtype=torch.uint8, device=self.device)  # free before growing
            self.buf = torch.empty(size, dtype=torch.uint8, device=self.device)

    def view(self, nbytes: int, dtype: torch.dtype) -> torch.Tensor:
        """The first ``nbytes`` as a contiguous 1-D tensor of ``dtype`` (the packed chunk)."""
        return self.buf[:nbytes].view(dtype)


class StagingPool:
    def __init__(self, num_slots: int, device: torch.device) -> None:
        self._slots = [StagingSlot(i, device) for i in range(num_slots)]
        self._free = list(self._slots)
        self._sem = asyncio.Semaphore(num_slots)
        self.num_slots = num_slots

    async def acquire(self, nbytes: int) -> StagingSlot:
        """A free slot of at least ``nbytes`` (waits while all are busy; grows the largest free one if needed)."""
        await self._sem.acquire()
        fits = [s for s in self._free if s.capacity >= nbytes]
        slot = min(fits, key=lambda s: s.capacity) if fits else max(self._free, key=lambda s: s.capacity)
        self._free.remove(slot)
        try:
            slot.ensure(nbytes)
        except BaseException:
            self.release(slot)
            raise
        return slot

    def release(self, slot: StagingSlot) -> None:
        self._free.append(slot)
        self._sem.release()

    @property
    def bytes_held(self) -> int:
        return sum(s.capacity for s in self._slots)
