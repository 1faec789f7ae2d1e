"""Router metrics (names after SGLang's gateway, ``sgl_router_*``) in a registry owned by the app.

What every request touches (``sgl_router_requests``, ``..._ttft_seconds``, ``..._request_duration_seconds``)
lives in plain loop-local ``LoopCounter``/``LoopHistogram`` objects, one per route: no lock, no label
lookup, a few attribute updates (prometheus_client's lock-guarded children cost several times
more per request). They are exported at scrape time like the live per-worker gauges (active
requests, health, circuit state) and queue gauges, which a collector reads from live state, so a
removed worker's series disappear with it. Rarer events (errors, retries, aborts, health checks)
use prometheus_client counters. Invariant: all of it is mutated and scraped on the router's event
loop only (single thread), which is what makes the lock-free objects safe.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from router.worker import Health, Worker

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class LoopCounter:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class LoopHistogram:
    """Observations per bucket (``counts[i]``: values in (bounds[i-1], bounds[i]]; the last: above all)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        """Prometheus buckets: (upper bound, observations <= it), ending with +Inf."""
        out, total = [], 0
        for bound, count in zip((*map(str, map(float, self.bounds)), "+Inf"), self.counts, strict=True):
            total += count
            out.append((bound, float(total)))
        return out


class _PerRoute(Collector):
    """Exports the loop-local per-route series."""

    def __init__(self, metrics: RouterMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        m = self.metrics
        requests = CounterMetricFamily("sgl_router_requests", "Client requests by route", labels=["route"])
        for route, counter in m.requests.items():
            requests.add_metric([route], counter.value)
        yield requests
        for name, doc, series in (
            ("sgl_router_ttft_seconds", "Arrival to the first byte streamed to the client", m.ttft),
            ("sgl_router_request_duration_seconds", "Arrival to the last byte", m.duration),
        ):
            family = HistogramMetricFamily(name, doc, labels=["route"])
            for route, hist in series.items():
                family.add_metric([route], hist.cumulative(), hist.sum)
            yield family


class _LiveState(Collector):
    def __init__(self, workers: Callable[[], Iterable[Worker]], queue: Callable[[], tuple[int, int]]) -> None:
        self.workers = workers
        self.queue = queue

    def collect(self) -> Iterator[Any]:
        labels = ["worker", "role"]
        active = GaugeMetricFamily("sgl_router_worker_active_requests", "Calls in flight to a worker", labels=labels)
        healthy = GaugeMetricFamily(
            "sgl_router_worker_healthy", "1 when the worker passes health checks", labels=labels
        )
        cb = GaugeMetricFamily("sgl_router_cb_state", "Circuit state: 0 closed, 1 open, 2 half-open", labels=labels)
        draining = GaugeMetricFamily("sgl_router_worker_draining", "1 while the worker drains", labels=labels)
        processed = CounterMetricFamily(
            "sgl_router_worker_processed_requests", "Calls finished by a worker", labels=labels
        )
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
        self.requests: dict[str, LoopCounter] = {}
        self.ttft: dict[str, LoopHistogram] = {}
        self.duration: dict[str, LoopHistogram] = {}
        r.register(_PerRoute(self))
        self.errors = Counter(
            "sgl_router_request_errors",
            "Client requests answered with an error, by status",
            ["route", "status"],
            registry=r,
        )
        self.retries = Counter(
            "sgl_router_retries", "Retries (a new worker or pair) before the first byte", ["route"], registry=r
        )
        self.aborts = Counter(
            "sgl_router_leg_aborts",
            "POST /abort_request sent to a worker, by its role and why",
            ["role", "reason"],
            registry=r,
        )
        self.health_checks = Counter(
            "sgl_router_health_checks", "Health probes by worker and result", ["worker", "result"], registry=r
        )

    def requests_for(self, route: str) -> LoopCounter:
        counter = self.requests.get(route)
        if counter is None:
            counter = self.requests[route] = LoopCounter()
        return counter

    def ttft_for(self, route: str) -> LoopHistogram:
        hist = self.ttft.get(route)
        if hist is None:
            hist = self.ttft[route] = LoopHistogram(LATENCY_BUCKETS)
        return hist

    def duration_for(self, route: str) -> LoopHistogram:
        hist = self.duration.get(route)
        if hist is None:
            hist = self.duration[route] = LoopHistogram(LATENCY_BUCKETS)
        return hist

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
