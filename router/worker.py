"""One worker's runtime state (``Worker``) and the frozen snapshot policies see (``WorkerView``).

Invariants (all mutation happens on the router's event loop, so no locks):
- ``active`` counts calls the router has open to this worker (a PD request holds one on P and one
  on D); it never goes negative and returns to 0 when the worker is idle.
- A worker takes new requests iff ``available``: health ``HEALTHY``, not draining, circuit not open.
- ``health`` starts ``PENDING`` (never probed); one good probe admits a pending worker, after that
  ejection and re-admission follow the thresholds (see ``health``); a worker that says a process of
  it died is ejected at once.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass
from typing import Any

from router.circuit_breaker import CircuitBreaker, CircuitState
from router.config import BreakerConfig, Role, WorkerSpec, url_host


class Health(enum.Enum):
    PENDING = "pending"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"


@dataclass(frozen=True)
class WorkerView:
    """What a routing policy may look at: a snapshot, never the live object."""

    url: str
    role: Role
    active: int
    healthy: bool
    circuit: CircuitState


class Worker:
    def __init__(self, spec: WorkerSpec, breaker: BreakerConfig) -> None:
        self.spec = spec
        self.host = url_host(spec.url)  # the URL never changes for a registered worker (the registry's key)
        self.breaker = CircuitBreaker(breaker)
        self.health = Health.PENDING
        self.fail_streak = 0  # consecutive failed probes
        self.ok_streak = 0  # consecutive good probes
        self.last_probe_error: str | None = None
        self.draining = False
        self.active = 0
        self.processed = 0  # calls finished, any outcome
        self.idle = asyncio.Event()  # set while active == 0 (drain waits on it)
        self.idle.set()

    @property
    def url(self) -> str:
        return self.spec.url

    @property
    def role(self) -> Role:
        return self.spec.role

    @property
    def available(self) -> bool:
        return self.health is Health.HEALTHY and not self.draining and self.breaker.allows()

    @property
    def suspect(self) -> bool:
        """Worth probing at the fast cadence: not known healthy, failing lately, or its circuit open
        (good probes may end an open circuit early: ``CircuitBreaker.probe_ok``)."""
        return self.health is not Health.HEALTHY or self.fail_streak > 0 or self.breaker.state is CircuitState.OPEN

    def view(self) -> WorkerView:
        return WorkerView(self.url, self.role, self.active, self.health is Health.HEALTHY, self.breaker.state)

    def acquire(self) -> None:
        self.active += 1
        self.idle.clear()

    def release(self) -> None:
        assert self.active > 0, f"release without acquire on {self.url}"
        self.active -= 1
        self.processed += 1
        if self.active == 0:
            self.idle.set()

    def describe(self) -> dict[str, Any]:
        """GET /workers entry."""
        status = "draining" if self.draining else self.health.value
        return {
            "url": self.url,
            "role": self.role,
            "bootstrap_port": self.spec.bootstrap_port,
            "status": status,
            "healthy": self.health is Health.HEALTHY,
            "draining": self.draining,
            "available": self.available,
            "active_requests": self.active,
            "processed_requests": self.processed,
            "circuit_state": self.breaker.state.label,
            "consecutive_probe_failures": self.fail_streak,
            "last_probe_error": self.last_probe_error,
        }
