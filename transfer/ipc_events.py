"""Interprocess CUDA events of one direct link: P records one after each copy into D's pages, D polls it.

P owns a ring of ``RING_SIZE`` events per link (created on its KV device) and sends their IPC handles in
HelloOk; D opens them once (``open_events``). After launching a copy P records the next event of the ring
on its transfer stream and names its index in the Pushed message, posted after the record.

Why a ring is safe: every copy of a link runs on P's one transfer stream, in launch order, so an event
re-recorded for a later copy fires only after the earlier copies finished. Whoever waits on index ``k``
therefore waits for its own copy or, conservatively, for a later one; never for less.
"""

from __future__ import annotations

import threading

import torch

RING_SIZE = 8


class EventRing:
    """P: the link's events; ``record`` is called from the scheduler's thread and the loop (locked)."""

    def __init__(self, device: torch.device, size: int = RING_SIZE) -> None:
        with torch.cuda.device(device):
            self.events = [torch.cuda.Event(interprocess=True) for _ in range(size)]
            self.handles = [bytes(e.ipc_handle()) for e in self.events]  # creates each event on ``device``
        self._lock = threading.Lock()
        self._next = 0
        self.last: torch.cuda.Event | None = None  # the latest recorded: fires after every copy so far

    def record(self, stream: torch.cuda.Stream) -> int:
        """Record the next event on ``stream``; its index."""
        with self._lock:
            k = self._next
            self._next = (k + 1) % len(self.events)
            self.events[k].record(stream)
            self.last = self.events[k]
        return k


def open_events(handles: list[bytes], device: torch.device) -> list[torch.cuda.Event]:
    """D: P's events, usable here (``query``/``synchronize``); raises RuntimeError if the driver refuses."""
    return [torch.cuda.Event.from_ipc_handle(device, handle) for handle in handles]
