"""RouterState: everything one router instance owns, built once from its config (no module-level state).

``build_state`` wires the parts without I/O; ``start``/``stop`` open and close the HTTP session and
the health loop (the app's startup/cleanup hooks call them).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field

from router.admission import Admission
from router.config import Role, RouterConfig
from router.health import HealthChecker
from router.metrics import RouterMetrics
from router.policies import Policy
from router.registry import WorkerRegistry
from router.upstream import Upstream
from router.worker import Worker


@dataclass
class RouterState:
    config: RouterConfig
    registry: WorkerRegistry
    policies: dict[Role, Policy]
    upstream: Upstream
    health: HealthChecker
    metrics: RouterMetrics
    admission: Admission
    rng: random.Random
    ids: random.Random  # request ids and rids: unique, not secret; never seeded from the config
    shutting_down: bool = field(default=False)

    def new_id(self) -> str:
        return f"{self.ids.getrandbits(128):032x}"


def build_state(config: RouterConfig) -> RouterState:
    rng = random.Random(config.seed)
    registry = WorkerRegistry(config.roles, config.breaker)
    policies = {role: Policy(config.policy_for(role), random.Random(rng.getrandbits(64)), config.cache_aware)
                for role in config.roles}
    upstream = Upstream(config.request_timeout_secs, config.api_key)
    metrics = RouterMetrics()
    health_cfg = config.health

    async def probe(worker: Worker) -> str | None:
        return await upstream.probe(worker, health_cfg.endpoint, health_cfg.timeout_s)

    health = HealthChecker(registry, probe, health_cfg, metrics)
    admission = Admission(config.max_concurrent_requests, config.queue_size, config.queue_timeout_secs)
    metrics.watch(registry.all, admission.state)

    def forget(worker: Worker) -> None:
        for policy in policies.values():
            policy.forget(worker.url)
        metrics.forget_worker(worker.url)
        upstream.forget(worker.url)

    registry.on_remove.append(forget)
    for spec in config.initial_workers():
        registry.add(spec)
    return RouterState(config, registry, policies, upstream, health, metrics, admission, rng,
                       random.Random(os.urandom(16)))


async def start(state: RouterState) -> None:
    await state.upstream.start()
    state.health.start()


async def stop(state: RouterState) -> None:
    await state.health.stop()
    await state.registry.close()
    await state.upstream.close()
