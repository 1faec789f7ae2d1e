"""The per-worker circuit breaker, driven by a fake clock (no sleeps)."""

from __future__ import annotations

from router.circuit_breaker import CircuitBreaker, CircuitState
from router.config import BreakerConfig


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def breaker(enabled: bool = True) -> tuple[CircuitBreaker, Clock]:
    clock = Clock()
    return CircuitBreaker(BreakerConfig(3, 2, timeout_s=10.0, window_s=5.0, enabled=enabled), clock), clock


def test_opens_after_consecutive_failures_and_success_resets():
    cb, _ = breaker()
    cb.record_failure()
    cb.record_failure()
    cb.record_success()  # streak broken
    cb.record_failure()
    cb.record_failure()
    assert cb.state is CircuitState.CLOSED and cb.allows()
    cb.record_failure()
    assert cb.state is CircuitState.OPEN and not cb.allows()


def test_failures_outside_the_window_do_not_add_up():
    cb, clock = breaker()
    for _ in range(2):
        cb.record_failure()
    clock.t += 6.0
    cb.record_failure()
    assert cb.state is CircuitState.CLOSED and cb.consecutive_failures == 1


def test_half_open_after_timeout_then_closes_on_successes():
    cb, clock = breaker()
    for _ in range(3):
        cb.record_failure()
    clock.t += 9.9
    assert cb.state is CircuitState.OPEN
    clock.t += 0.2
    assert cb.state is CircuitState.HALF_OPEN and cb.allows()
    cb.record_success()
    assert cb.state is CircuitState.HALF_OPEN
    cb.record_success()
    assert cb.state is CircuitState.CLOSED


def test_half_open_failure_reopens_and_restarts_the_timeout():
    cb, clock = breaker()
    for _ in range(3):
        cb.record_failure()
    clock.t += 10.0
    assert cb.state is CircuitState.HALF_OPEN
    cb.record_failure()
    assert cb.state is CircuitState.OPEN
    clock.t += 5.0
    assert cb.state is CircuitState.OPEN
    clock.t += 5.0
    assert cb.state is CircuitState.HALF_OPEN


def test_late_failures_while_open_change_nothing_and_disabled_never_opens():
    cb, clock = breaker()
    for _ in range(3):
        cb.record_failure()
    clock.t += 8.0
    cb.record_failure()  # from a request sent before the circuit opened
    clock.t += 2.0
    assert cb.state is CircuitState.HALF_OPEN
    off, _ = breaker(enabled=False)
    for _ in range(10):
        off.record_failure()
    assert off.allows() and off.state is CircuitState.CLOSED
