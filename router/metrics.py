"""Router metrics (names after SGLang's gateway, ``sgl_router_*``) in a registry owned by the app.

Counters and histograms are updated on the request path. Per-worker gauges (active requests,
health, circuit state) and the queue gauges are read from live state at scrape time by a custom
collector, so a removed worker's series disappear with it and the request path pays nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from router.worker import Health, Worker

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _LiveState(Collector):
    def __init__(self, workers: Callable[[], Iterable[Worker]], queue: Callable[[], tuple[int, int]]) -> None:
        self.workers = workers
        self.queue = queue

    def collect(self) -> Iterator[Any]:
        labels = ["worker", "role"]
        active = GaugeMetricFamily("sgl_router_worker_active_requests", "Calls in flight to a worker", labels=labels)
        healthy = GaugeMetricFamily("sgl_router_worker_healthy", "1 when the worker passes health checks", labels=labels)
        cb = GaugeMetricFamily("sgl_router_cb_state", "Circuit state: 0 closed, 1 open, 2 half-open", labels=labels)
        draining = GaugeMetricFamily("sgl_router_worker_draining", "1 while the worker drains", labels=labels)
        processed = CounterMetricFamily("sgl_router_worker_processed_requests", "Calls finished by a worker", labels=labels)
        for w in self.workers():
            key = [w.url, w.role]
            active.add_metric(key, w.active)
            healthy.add_metric(key, 1.0 if w.health is Health.HEALTHY else 0.0)
            cb.add_metric(key, int(w.breaker.state))
            draining.add_metric(key, 1.0 if w.draining else 0.0)
            processed.add_metric(key, w.processed)
        running, queued = self.queue()
        yield from (active, healthy, cb, draining, processed)
        yield GaugeMetricFamily("sgl_router_active_requests", "Client requests being dispatched", value=running)
        yield GaugeMetricFamily("sgl_router_queue_depth", "Client requests waiting for a dispatch slot", value=queued)


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("sgl_router_requests", "Client requests by route", ["route"], registry=r)
        self.errors = Counter("sgl_router_request_errors", "Client requests answered with an error, by status",
                              ["route", "status"], registry=r)
        self.retries = Counter("sgl_router_retries", "Retries (a new worker or pair) before the first byte",
                               ["route"], registry=r)
        self.aborts = Counter("sgl_router_leg_aborts", "POST /abort_request sent to a worker, by its role and why",
                              ["role", "reason"], registry=r)
        self.health_checks = Counter("sgl_router_health_checks", "Health probes by worker and result",
                                     ["worker", "result"], registry=r)
        self.ttft = Histogram("sgl_router_ttft_seconds", "Arrival to the first byte streamed to the client",
                              ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.duration = Histogram("sgl_router_request_duration_seconds", "Arrival to the last byte", ["route"],
                                  buckets=LATENCY_BUCKETS, registry=r)

        self._children: dict[tuple[str, str], Any] = {}

    def _child(self, kind: str, route: str) -> Any:
        """A labelled child, looked up once per route (``labels()`` is not free on the hot path)."""
        child = self._children.get((kind, route))
        if child is None:
            child = self._children[(kind, route)] = getattr(self, kind).labels(route)
        return child

    def requests_for(self, route: str) -> Any:
        return self._child("requests", route)

    def ttft_for(self, route: str) -> Any:
        return self._child("ttft", route)

    def duration_for(self, route: str) -> Any:
        return self._child("duration", route)

    def watch(self, workers: Callable[[], Iterable[Worker]], queue: Callable[[], tuple[int, int]]) -> None:
        """Read per-worker and queue gauges from live state at scrape time."""
        self.registry.register(_LiveState(workers, queue))

    def forget_worker(self, url: str) -> None:
        for result in ("ok", "fail"):
            try:
                self.health_checks.remove(url, result)
            except KeyError:
                pass

    def render(self) -> bytes:
        return generate_latest(self.registry)
