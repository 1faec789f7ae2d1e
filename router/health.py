"""Background health checks: eject a worker after N failed probes in a row, re-admit after M good ones.

Each worker is probed (``GET {url}{endpoint}``, 200 = good) every ``interval_s`` while healthy and
quiet, and every ``FAST_PROBE_S`` (capped by the interval) while it is suspect: pending, unhealthy,
failing lately, or its circuit open. The dispatcher ``poke``s a worker when a call to it fails at
the transport level, so a dead worker is probed at once and ejected within about
``failure_threshold * FAST_PROBE_S``. Probes run as independent tasks (one per worker at a time), so
a hung worker never delays others. A pending worker (never seen healthy) is admitted by its first
good probe.

A worker that says a process of it died (``/health`` 503 with a reason containing "died", or a
request aborted with such a message: ``faults``) is ejected at once, on that first answer
(``eject``), not after N probes. Admission (re-)opens the worker's circuit breaker half-way
(``CircuitBreaker.readmit``), and good probes after signs of a restart do too (``probe_ok``), so a
restarted worker is routable as soon as its health checks pass, not after ``--cb-timeout-duration-secs``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from router.config import HealthConfig
from router.faults import ProbeFailure
from router.metrics import RouterMetrics
from router.registry import WorkerRegistry
from router.worker import Health, Worker

logger = logging.getLogger(__name__)
FAST_PROBE_S = 0.5
Probe = Callable[[Worker], Awaitable[ProbeFailure | str | None]]  # None when healthy, else why not


def apply_probe(worker: Worker, error: ProbeFailure | str | None, config: HealthConfig) -> str | None:
    """Fold one probe result into the worker's state; -> "admitted" / "ejected" / None.

    A fatal failure (the worker says a process of it died) ejects at once."""
    if error is None:
        worker.ok_streak += 1
        worker.fail_streak = 0
        worker.last_probe_error = None
        if worker.health is Health.PENDING or (
            worker.health is Health.UNHEALTHY and worker.ok_streak >= config.success_threshold
        ):
            worker.health = Health.HEALTHY
            worker.breaker.readmit()
            return "admitted"
        worker.breaker.probe_ok(config.success_threshold)
        return None
    worker.fail_streak += 1
    worker.ok_streak = 0
    worker.last_probe_error = str(error)
    worker.breaker.probe_failed()
    if isinstance(error, ProbeFailure) and error.fatal:
        return eject(worker, str(error))
    if worker.health is Health.HEALTHY and worker.fail_streak >= config.failure_threshold:
        worker.health = Health.UNHEALTHY
        return "ejected"
    return None


def eject(worker: Worker, reason: str) -> str | None:
    """Take ``worker`` out of rotation now (it says a process of it died). -> "ejected" if it was healthy."""
    was_healthy = worker.health is Health.HEALTHY
    worker.health = Health.UNHEALTHY
    worker.ok_streak = 0
    worker.last_probe_error = reason
    worker.breaker.probe_failed()
    return "ejected" if was_healthy else None


class HealthChecker:
    def __init__(self, registry: WorkerRegistry, probe: Probe, config: HealthConfig, metrics: RouterMetrics) -> None:
        self.registry = registry
        self.probe_fn = probe
        self.config = config
        self.metrics = metrics
        self._next_at: dict[str, float] = {}  # url -> monotonic time of its next probe
        self._probing: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="router-health")

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._probing.values()) if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t

    def poke(self, url: str) -> None:
        """Probe ``url`` now (a call to it just failed)."""
        self._next_at[url] = 0.0
        self._wake.set()

    def eject(self, worker: Worker, reason: str) -> None:
        """A call's answer says a process of ``worker`` died: out of rotation now, probed fast from now on."""
        if self.registry.get(worker.url) is not worker:
            return
        if eject(worker, reason) == "ejected":
            logger.warning("worker %s ejected: %s", worker.url, reason)
        self.poke(worker.url)

    async def probe_now(self, worker: Worker) -> None:
        """One probe, awaited (POST /workers uses it to admit a new worker at once; a call aborted
        without a reason uses it to learn whether the worker is still alive)."""
        await self._probe(worker)

    async def _run(self) -> None:
        while True:
            now = time.monotonic()
            for worker in self.registry.all():
                due = self._next_at.setdefault(worker.url, 0.0)
                if due <= now and worker.url not in self._probing:
                    self._probing[worker.url] = asyncio.get_running_loop().create_task(self._probe_task(worker))
            for url in [u for u in self._next_at if self.registry.get(u) is None]:
                del self._next_at[url]
            pending = [t for u, t in self._next_at.items() if u not in self._probing]
            sleep = max(0.0, min(pending, default=now + self.config.interval_s) - time.monotonic())
            self._wake.clear()
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that races a wake-up
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(sleep):
                    await self._wake.wait()

    async def _probe_task(self, worker: Worker) -> None:
        try:
            await self._probe(worker)
        finally:
            self._probing.pop(worker.url, None)
            self._wake.set()

    async def _probe(self, worker: Worker) -> None:
        try:
            error = await self.probe_fn(worker)
        except Exception as e:  # noqa: BLE001 - a probe must never kill the loop
            error = f"probe failed: {e!r}"
        if self.registry.get(worker.url) is not worker:
            return  # removed while probing
        self.metrics.health_checks.labels(worker.url, "ok" if error is None else "fail").inc()
        event = apply_probe(worker, error, self.config)
        if event == "ejected":
            logger.warning(
                "worker %s ejected after %d failed health check(s): %s", worker.url, worker.fail_streak, error
            )
        elif event == "admitted":
            logger.info("worker %s admitted (%s)", worker.url, worker.role)
        wait = min(self.config.interval_s, FAST_PROBE_S) if worker.suspect else self.config.interval_s
        self._next_at[worker.url] = time.monotonic() + wait
