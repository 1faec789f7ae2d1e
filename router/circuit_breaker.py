"""Per-worker circuit breaker: closed -> open after N failures in a row, half-open after a timeout or
as soon as health checks see the worker back.

States and transitions (``clock`` is injected, so tests need no sleeps):
- CLOSED: requests flow. ``failure_threshold`` failures in a row, each within ``window_s`` of the
  previous one, open the circuit. A success resets the streak.
- OPEN: the worker gets no requests until ``timeout_s`` has passed since it opened; then HALF_OPEN.
  Health checks end it earlier (a worker restarted after its circuit opened is routable at once):
  ``readmit`` (the health checker admitted the worker again after ejecting it) -> HALF_OPEN, and
  ``probe_ok`` x N in a row -> HALF_OPEN when the circuit opened on a transport failure (the worker
  was unreachable, now it answers) or a probe failed after it opened (it went down and came back).
  A circuit opened only by 5xx answers of a worker whose probes kept passing waits ``timeout_s``:
  that worker is up but failing requests.
- HALF_OPEN: requests flow again as trials; ``success_threshold`` successes in a row close the
  circuit, any failure re-opens it (and restarts the timeout).
Only failures that say something about the worker count (``faults``: transport errors, 5xx
answers that do not blame the request, broken streams, a dead worker process); a client's fault
(every 4xx) is recorded as nothing at all. A disabled breaker is always CLOSED.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable

from router.config import BreakerConfig


class CircuitState(enum.IntEnum):
    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2

    @property
    def label(self) -> str:
        return self.name.lower()


class CircuitBreaker:
    def __init__(self, config: BreakerConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self._state = CircuitState.CLOSED
        self._failures = 0  # consecutive failures (CLOSED) counted within the window
        self._successes = 0  # consecutive successes while HALF_OPEN
        self._last_failure_at = 0.0
        self._opened_at = 0.0
        self._streak_transport = False  # a transport failure is among the current failure streak
        self._down_seen = False  # OPEN: a transport failure opened it, or a probe failed since
        self._probe_oks = 0  # OPEN: good probes in a row (while _down_seen)

    @property
    def state(self) -> CircuitState:
        if self._state is CircuitState.OPEN and self.clock() - self._opened_at >= self.config.timeout_s:
            self._state, self._successes = CircuitState.HALF_OPEN, 0
        return self._state

    def allows(self) -> bool:
        """May a request go to this worker now?"""
        return not self.config.enabled or self.state is not CircuitState.OPEN

    def record_success(self) -> None:
        if not self.config.enabled:
            return
        if self.state is CircuitState.HALF_OPEN:
            self._successes += 1
            if self._successes >= self.config.success_threshold:
                self._state, self._failures = CircuitState.CLOSED, 0
        else:
            self._failures, self._streak_transport = 0, False

    def record_failure(self, transport: bool = False) -> bool:
        """A worker fault; ``transport``: the connection failed (the worker may be down). -> the circuit opened."""
        if not self.config.enabled:
            return False
        now = self.clock()
        state = self.state
        if state is CircuitState.HALF_OPEN:
            self._open(now, transport)
            return True
        if state is CircuitState.OPEN:
            self._down_seen = self._down_seen or transport
            return False  # late news from a request sent before the circuit opened
        if now - self._last_failure_at > self.config.window_s:
            self._failures, self._streak_transport = 0, False
        self._failures += 1
        self._streak_transport = self._streak_transport or transport
        self._last_failure_at = now
        if self._failures >= self.config.failure_threshold:
            self._open(now, self._streak_transport)
            return True
        return False

    def _open(self, now: float, transport: bool) -> None:
        self._state, self._opened_at, self._successes = CircuitState.OPEN, now, 0
        self._failures, self._streak_transport = 0, False
        self._down_seen, self._probe_oks = transport, 0

    def _half_open(self) -> None:
        self._state, self._successes = CircuitState.HALF_OPEN, 0

    # --- what health checks say ----------------------------------------------------------------------
    def readmit(self) -> bool:
        """The health checker admitted the worker again: an open circuit goes half-open now. -> changed."""
        if self.config.enabled and self.state is CircuitState.OPEN:
            self._half_open()
            return True
        return False

    def probe_failed(self) -> None:
        if self.config.enabled and self.state is CircuitState.OPEN:
            self._down_seen, self._probe_oks = True, 0

    def probe_ok(self, needed: int) -> bool:
        """A good health probe; after ``needed`` in a row following a sign that the worker was down,
        an open circuit goes half-open. -> changed."""
        if not self.config.enabled or self.state is not CircuitState.OPEN or not self._down_seen:
            return False
        self._probe_oks += 1
        if self._probe_oks >= needed:
            self._half_open()
            return True
        return False

    @property
    def consecutive_failures(self) -> int:
        return self._failures
