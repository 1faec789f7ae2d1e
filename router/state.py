"""RouterState: everything one router instance owns, built once from its config (no module-level state).

``build_state`` wires the parts without I/O; ``start``/``stop`` open and close the HTTP session and
the health loop (the app's startup/cleanup hooks call them).
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass, field

from pd_common.cluster_auth import UNSIGNED_WARNING, ClusterKey, load_cluster_key
from router.admission import Admission
from router.config import Role, RouterConfig
from router.faults import ProbeFailure
from router.health import HealthChecker
from router.metrics import RouterMetrics
from router.policies import Policy
from router.registry import WorkerRegistry
from router.upstream import Upstream
from router.worker import Worker

logger = logging.getLogger(__name__)


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
    cluster_key: ClusterKey | None = field(default=None, repr=False)  # signs the PD bootstrap fields
    shutting_down: bool = field(default=False)

    def new_id(self) -> str:
        return f"{self.ids.getrandbits(128):032x}"


def build_state(config: RouterConfig) -> RouterState:
    """ValueError when the cluster secret cannot be loaded (``--cluster-secret-file``)."""
    cluster_key = load_cluster_key(secret_file=config.cluster_secret_file)
    rng = random.Random(config.seed)
    registry = WorkerRegistry(config.roles, config.breaker)
    policies = {
        role: Policy(config.policy_for(role), random.Random(rng.getrandbits(64)), config.cache_aware)
        for role in config.roles
    }
    upstream = Upstream(config.request_timeout_secs, config.api_key)
    metrics = RouterMetrics()
    health_cfg = config.health

    async def probe(worker: Worker) -> ProbeFailure | None:
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
    return RouterState(
        config,
        registry,
        policies,
        upstream,
        health,
        metrics,
        admission,
        rng,
        random.Random(os.urandom(16)),
        cluster_key,
    )


def startup_warnings(config: RouterConfig, cluster_key: ClusterKey | None) -> list[str]:
    """What an operator should hear once at startup about how open this router is."""
    out: list[str] = []
    if config.pd_disaggregation and cluster_key is None:
        out.append(UNSIGNED_WARNING)
    if config.allow_remote_admin and not config.admin_api_key:
        out.append(
            "--allow-remote-admin without --admin-api-key: anyone who reaches this router can add or "
            "remove workers, flush caches and abort every request (README: Security)"
        )
    return out


def admin_mode(config: RouterConfig) -> str:
    if config.admin_api_key:
        return "management routes need the admin API key (or a cluster-signed registration)"
    if config.allow_remote_admin:
        return "management routes are open to every caller (--allow-remote-admin)"
    return "management routes accept loopback callers only (or cluster-signed registrations); set --admin-api-key"


async def start(state: RouterState) -> None:
    for warning in startup_warnings(state.config, state.cluster_key):
        logger.warning("%s", warning)
    logger.info(
        "%s; PD bootstrap fields %s",
        admin_mode(state.config),
        "signed with the cluster secret" if state.cluster_key else "unsigned",
    )
    await state.upstream.start()
    state.health.start()


async def stop(state: RouterState) -> None:
    await state.health.stop()
    await state.registry.close()
    await state.upstream.close()
