"""Bounded concurrency with a bounded FIFO queue: 429 when the queue is full, 408 after the queue timeout.

Invariants: ``running <= max_concurrent`` (unless unbounded, ``max_concurrent <= 0``);
``len(waiters) <= queue_size``; a released slot passes straight to the oldest waiter (``running``
unchanged), so a newcomer never jumps the queue. A waiter cancelled after it was handed a slot
gives the slot back.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

from router.errors import APIError

RETRY_AFTER_S = 1


class Admission:
    def __init__(self, max_concurrent: int, queue_size: int, queue_timeout_s: float) -> None:
        self.max_concurrent = max_concurrent
        self.queue_size = queue_size
        self.queue_timeout_s = queue_timeout_s
        self.running = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def state(self) -> tuple[int, int]:
        return self.running, self.queued

    async def acquire(self) -> None:
        if self.max_concurrent <= 0 or (self.running < self.max_concurrent and not self._waiters):
            self.running += 1
            return
        if len(self._waiters) >= self.queue_size:
            raise APIError(
                429,
                f"too many requests: {self.running} running and {len(self._waiters)} queued",
                retry_after=RETRY_AFTER_S,
            )
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            async with asyncio.timeout(self.queue_timeout_s):  # not wait_for: it can swallow a racing cancel
                await fut
        except TimeoutError:
            self._discard(fut)
            raise APIError(
                408,
                f"request waited {self.queue_timeout_s:g}s in the router queue without a slot",
                retry_after=RETRY_AFTER_S,
            ) from None
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # handed a slot just as the client left
            else:
                self._discard(fut)
            raise

    def release(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot moves to the oldest waiter
                return
        self.running -= 1
        assert self.running >= 0

    def _discard(self, fut: asyncio.Future[None]) -> None:
        with contextlib.suppress(ValueError):
            self._waiters.remove(fut)
