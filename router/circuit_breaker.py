"""Per-worker circuit breaker: closed -> open after N failures in a row, half-open after a timeout.

States and transitions (``clock`` is injected, so tests need no sleeps):
- CLOSED: requests flow. ``failure_threshold`` failures in a row, each within ``window_s`` of the
  previous one, open the circuit. A success resets the streak.
- OPEN: the worker gets no requests until ``timeout_s`` has passed since it opened; then HALF_OPEN.
- HALF_OPEN: requests flow again as trials; ``success_threshold`` successes in a row close the
  circuit, any failure re-opens it (and restarts the timeout).
Only failures that say something about the worker count (transport errors, 5xx answers, broken
streams); a client's 4xx never does. A disabled breaker is always CLOSED.
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
            self._failures = 0

    def record_failure(self) -> None:
        if not self.config.enabled:
            return
        now = self.clock()
        state = self.state
        if state is CircuitState.HALF_OPEN:
            self._open(now)
            return
        if state is CircuitState.OPEN:
            return  # late news from a request sent before the circuit opened
        if now - self._last_failure_at > self.config.window_s:
            self._failures = 0
        self._failures += 1
        self._last_failure_at = now
        if self._failures >= self.config.failure_threshold:
            self._open(now)

    def _open(self, now: float) -> None:
        self._state, self._opened_at, self._successes = CircuitState.OPEN, now, 0
        self._failures = 0

    @property
    def consecutive_failures(self) -> int:
        return self._failures
