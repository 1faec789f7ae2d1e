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


def test_readmission_by_health_checks_half_opens_at_once():
    cb, _ = breaker()
    for _ in range(3):
        cb.record_failure()
    assert cb.state is CircuitState.OPEN
    assert cb.readmit() and cb.state is CircuitState.HALF_OPEN  # no waiting for timeout_s
    cb.record_success()
    cb.record_success()
    assert cb.state is CircuitState.CLOSED
    assert not cb.readmit() and cb.state is CircuitState.CLOSED  # nothing to do when not open


def test_good_probes_half_open_a_circuit_opened_by_transport_failures_or_after_a_failed_probe():
    cb, _ = breaker()
    for transport in (False, True, False):  # one transport failure in the streak is enough
        cb.record_failure(transport)
    assert cb.state is CircuitState.OPEN
    assert not cb.probe_ok(2) and cb.state is CircuitState.OPEN
    assert cb.probe_ok(2) and cb.state is CircuitState.HALF_OPEN
    cb.record_failure()  # the trial failed: open again, a fresh start
    assert cb.state is CircuitState.OPEN and not cb.probe_ok(1)
    answers, _ = breaker()
    for _ in range(3):
        answers.record_failure()  # 5xx answers of a worker whose probes pass: the timeout applies
    for _ in range(5):
        assert not answers.probe_ok(2)
    assert answers.state is CircuitState.OPEN
    answers.probe_failed()  # it went down ...
    assert not answers.probe_ok(2) and answers.probe_ok(2)  # ... and came back: half-open
    assert answers.state is CircuitState.HALF_OPEN


def test_disabled_breaker_ignores_health_news():
    off, _ = breaker(enabled=False)
    off.probe_failed()
    assert not off.readmit() and not off.probe_ok(1) and off.state is CircuitState.CLOSED
