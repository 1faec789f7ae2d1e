"""The worker registry: which workers exist, their roles, and their removal by draining.

Invariants:
- URLs are normalised and unique; a URL has one role for as long as it is registered.
- ``drain(url)`` stops new requests to the worker at once; the worker is removed when its last
  in-flight call ends (its ``idle`` event), so in-flight requests finish normally.
- Registering a URL again with the same role is idempotent (a restarted worker re-registering):
  it cancels a pending drain and refreshes the bootstrap port / key; an ejected worker goes back to
  pending, so the registration's own probe admits it at once. Another role is a 409.
- ``on_remove`` callbacks let per-worker state elsewhere (policy trees, metrics) forget a worker.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

from router.config import BreakerConfig, Role, WorkerSpec
from router.errors import APIError
from router.worker import Health, Worker

logger = logging.getLogger(__name__)


class WorkerRegistry:
    def __init__(self, roles: Iterable[Role], breaker: BreakerConfig) -> None:
        self.roles = tuple(roles)
        self.breaker = breaker
        self._workers: dict[str, Worker] = {}
        self._drains: dict[str, asyncio.Task[None]] = {}
        self.on_remove: list[Callable[[Worker], None]] = []

    def __len__(self) -> int:
        return len(self._workers)

    def get(self, url: str) -> Worker | None:
        return self._workers.get(url)

    def all(self) -> list[Worker]:
        return list(self._workers.values())

    def by_role(self, role: Role) -> list[Worker]:
        return [w for w in self._workers.values() if w.role == role]

    def available(self, role: Role) -> list[Worker]:
        return [w for w in self._workers.values() if w.role == role and w.available]

    def add(self, spec: WorkerSpec) -> tuple[Worker, bool]:
        """-> (worker, created). APIError 400 for a role this mode does not use, 409 for a role change."""
        if spec.role not in self.roles:
            raise APIError(
                400, f"role {spec.role!r} is not served by this router (roles: {', '.join(self.roles)})", "role"
            )
        old = self._workers.get(spec.url)
        if old is not None:
            if old.role != spec.role:
                raise APIError(409, f"worker {spec.url} is already registered as {old.role}", "role")
            old.spec = spec
            self._cancel_drain(spec.url)
            old.draining = False
            if old.health is Health.UNHEALTHY:  # a restarted worker announcing itself: its next good probe admits
                old.health = Health.PENDING
            return old, False
        worker = Worker(spec, self.breaker)
        self._workers[spec.url] = worker
        logger.info("worker added: %s (%s)", spec.url, spec.role)
        return worker, True

    def drain(self, url: str) -> Worker:
        """Stop routing to ``url``; remove it once idle. APIError 404 when unknown."""
        worker = self._workers.get(url)
        if worker is None:
            raise APIError(404, f"no worker {url}", "url")
        worker.draining = True
        if worker.active == 0:
            self._cancel_drain(url)
            self._remove(worker)
        elif url not in self._drains:
            self._drains[url] = asyncio.get_running_loop().create_task(self._remove_when_idle(worker))
        return worker

    async def _remove_when_idle(self, worker: Worker) -> None:
        try:
            await worker.idle.wait()
        finally:
            self._drains.pop(worker.url, None)
        if worker.draining and self._workers.get(worker.url) is worker:
            self._remove(worker)

    def _remove(self, worker: Worker) -> None:
        del self._workers[worker.url]
        logger.info("worker removed: %s (%s), %d calls served", worker.url, worker.role, worker.processed)
        for callback in self.on_remove:
            callback(worker)

    def _cancel_drain(self, url: str) -> None:
        task = self._drains.pop(url, None)
        if task is not None:
            task.cancel()

    async def close(self) -> None:
        for url in list(self._drains):
            self._cancel_drain(url)
