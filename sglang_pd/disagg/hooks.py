"""SchedulerHooks: the seam where prefill/decode disaggregation plugs into the one scheduler.

The colocated server uses ``NullHooks``; ``disagg.prefill.PrefillHooks`` and
``disagg.decode.DecodeHooks`` add their queues around the same continuous-batching loop, so P and D
share every other line of the engine (DESIGN §2).

A request without bootstrap fields on a PD worker is *local*: the worker's own ``/health_generate``
probe (the HTTP edge refuses such requests from clients). The PD hooks leave local requests alone, so
they run exactly as on a colocated worker, with no peer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sglang_pd.disagg.bootstrap_info import BootstrapInfo
from sglang_pd.scheduler.req import FinishReason, Req

if TYPE_CHECKING:
    from sglang_pd.scheduler.scheduler import Scheduler, StepOutput


class SchedulerHooks:
    """Default behaviour: nothing extra (colocated)."""

    # The scheduler may launch a batch before the previous one's results are processed: hooks that
    # act on a request between two of its steps (PrefillHooks.take_over) must turn this off.
    supports_overlap = True

    def bind(self, scheduler: Scheduler) -> None:
        self.sched = scheduler

    def on_submit(self, req: Req) -> bool:
        """True if the hook queued ``req`` itself (it reaches the scheduler's waiting queue later)."""
        return False

    def before_step(self, out: StepOutput) -> None:
        """Move requests between the hook's queues and the scheduler; report what changed in ``out``."""

    def after_compute(self, req: Req, start: int, n: int) -> None:
        """Positions [start, start + n) of ``req`` were just computed (and a token sampled if it reached the end)."""

    def take_over(self, req: Req) -> bool:
        """After ``req`` got a new token: True if the hook takes it out of the running batch."""
        return False

    def on_retract(self, req: Req) -> FinishReason | None:
        """``req`` is being retracted: a reason to fail it instead of requeueing it."""
        return None

    def abort(self, rid: str, message: str) -> Req | None:
        """Abort a request held in the hook's queues (None if not there)."""
        return None

    def held_rids(self) -> list[str]:
        """Requests parked in the hook's queues that still await an answer (what ``abort`` can end); requests
        that were answered but keep resources until a transfer is terminal are not among them."""
        return []

    def has_work(self) -> bool:
        return False

    def wakeup_fd(self) -> int | None:
        """An fd that turns readable when the hook's work may have moved (a KV transfer's state changed), so a
        scheduler waiting on it need not poll on a timer; None: none. The waiter drains it (os.eventfd_read)."""
        return None

    def stats(self) -> dict[str, Any]:
        return {}

    def transfer_meta(self, req: Req) -> dict[str, Any] | None:
        """meta_info["kv_transfer"] of a finished request (bytes, ms, GB/s)."""
        return None

    def shutdown(self) -> None:
        pass


NullHooks = SchedulerHooks


def is_local(req: Req) -> bool:
    """A request with no peer (see module docstring): the PD hooks schedule it as a colocated one."""
    return req.bootstrap is None


def bootstrap_of(req: Req) -> BootstrapInfo:
    """The bootstrap fields of a PD request. Only called for requests the hooks queued, which all carry them."""
    if req.bootstrap is None:
        raise RuntimeError(f"request {req.rid} has no bootstrap fields (a local request reached a PD-only path)")
    return req.bootstrap


def room_of(req: Req) -> int:
    return bootstrap_of(req).room
