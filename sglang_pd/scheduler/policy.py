"""Waiting-queue order (``--schedule-policy``): fcfs, or lpm (longest cached prefix first)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from sglang_pd.scheduler.req import Req

LPM_MAX_QUEUE = 128  # beyond this, prefix matching every waiting request costs more than it saves


class SchedulePolicy(Protocol):
    def order(self, waiting: Sequence[Req], match_len: Callable[[Req], int]) -> list[Req]: ...


class FCFSPolicy:
    def order(self, waiting: Sequence[Req], match_len: Callable[[Req], int]) -> list[Req]:
        return list(waiting)


class LPMPolicy:
    def order(self, waiting: Sequence[Req], match_len: Callable[[Req], int]) -> list[Req]:
        if len(waiting) > LPM_MAX_QUEUE:
            return list(waiting)
        # sorted() is stable: equal matches keep arrival order.
        return sorted(waiting, key=lambda r: -match_len(r))


SCHEDULE_POLICIES: dict[str, type] = {"fcfs": FCFSPolicy, "lpm": LPMPolicy}


def create_schedule_policy(name: str) -> SchedulePolicy:
    return SCHEDULE_POLICIES[name]()
