"""A launched batch whose results have not reached the host yet (overlapped scheduling).

With overlap, step k launches batch k and only then waits for batch k-1's results, so the host's
result processing and planning run while the device computes. Invariants:
- at most one batch is in flight between steps (``Scheduler.inflight``);
- a request in an in-flight batch keeps its pages until that batch completes: a request that
  finishes meanwhile (a stop token seen in the previous batch's results, an abort) is put on
  ``deferred_release`` and its pages return to the pool when the batch's results are collected,
  because the device may still be writing its KV (and, on a PD decode worker, pages handed to a new
  request are written by the transfer engine outside the compute stream).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from sglang_pd.scheduler.batch import BatchPlan, BatchResult
from sglang_pd.scheduler.req import Req


class PendingResult(Protocol):
    """The result of a launched batch; ``result()`` blocks until the device has produced it."""

    # Per plan item: the placeholder id that stands for its sampled token until the host sees it
    # (None for items that sample nothing). Later plans may use it as an input token id.
    placeholders: tuple[int | None, ...]

    def result(self) -> BatchResult: ...


class BatchRunner(Protocol):
    def launch(self, plan: BatchPlan) -> PendingResult: ...


@dataclass
class InflightBatch:
    items: tuple[tuple[Req, int, int], ...]  # (request, first position computed, positions computed)
    pending: PendingResult
    members: frozenset[Req]
    deferred_release: list[Req] = field(default_factory=list)
