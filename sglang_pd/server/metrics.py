"""Worker metrics with SGLang's names, in a registry owned by the server (no global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80, 160)
ITL_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)


class ServerMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        r, labels = self.registry, ["model_name"]
        self.num_running_reqs = Gauge("sglang:num_running_reqs", "Requests in the running batch", labels, registry=r)
        self.num_queue_reqs = Gauge("sglang:num_queue_reqs", "Requests waiting in the scheduler", labels, registry=r)
        self.token_usage = Gauge("sglang:token_usage", "Share of KV pages held by requests", labels, registry=r)
        self.cache_hit_rate = Gauge(
            "sglang:cache_hit_rate", "Prefix-cache hit rate of prompt tokens", labels, registry=r
        )
        self.num_retractions = Gauge("sglang:num_retracted_reqs", "Retractions since start", labels, registry=r)
        self.prompt_tokens = Counter("sglang:prompt_tokens", "Prompt tokens processed", labels, registry=r)
        self.generation_tokens = Counter("sglang:generation_tokens", "Tokens generated", labels, registry=r)
        self.cached_tokens = Counter(
            "sglang:cached_tokens", "Prompt tokens served from the prefix cache", labels, registry=r
        )
        self.num_requests = Counter("sglang:num_requests", "Finished requests", labels, registry=r)
        self.num_aborted = Counter("sglang:num_aborted_requests", "Aborted requests", labels, registry=r)
        self.ttft = Histogram(
            "sglang:time_to_first_token_seconds", "Time to first token", labels, buckets=LATENCY_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "sglang:inter_token_latency_seconds", "Time between tokens", labels, buckets=ITL_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            "sglang:e2e_request_latency_seconds", "End-to-end latency", labels, buckets=LATENCY_BUCKETS, registry=r
        )
        self.labels = {"model_name": model_name}
        # prefill/decode disaggregation (DESIGN §4.5)
        self.pd_gauges = {
            name: Gauge(f"sglang:{name}", help_text, labels, registry=r)
            for name, help_text in (
                ("num_prefill_prealloc_queue_reqs", "Prefill: requests waiting for their decode worker to register"),
                ("num_prefill_inflight_queue_reqs", "Prefill: requests whose KV is being sent"),
                ("num_decode_prealloc_queue_reqs", "Decode: requests waiting for KV pages"),
                ("num_decode_transfer_queue_reqs", "Decode: requests receiving KV"),
            )
        }
        self.pd_counters = {
            "num_bootstrap_failed_reqs": Counter(
                "sglang:num_bootstrap_failed_reqs", "Rooms whose bootstrap failed", labels, registry=r
            ),
            "num_transfer_failed_reqs": Counter(
                "sglang:num_transfer_failed_reqs", "Rooms whose KV transfer failed", labels, registry=r
            ),
        }
        self._pd_counts: dict[str, int] = {}
        self.kv_latency = Histogram(
            "sglang:kv_transfer_latency_ms",
            "KV handoff time per request (ms)",
            labels,
            buckets=(0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000),
            registry=r,
        )
        self.kv_speed = Histogram(
            "sglang:kv_transfer_speed_gb_s",
            "KV handoff speed per request (GB/s)",
            labels,
            buckets=(0.01, 0.1, 0.5, 1, 5, 10, 25, 50, 100, 200, 400),
            registry=r,
        )
        self.kv_total = Histogram(
            "sglang:kv_transfer_total_mb",
            "KV bytes per request (MB)",
            labels,
            buckets=(0.1, 1, 8, 32, 128, 256, 512, 1024, 4096),
            registry=r,
        )

    def set_scheduler_stats(
        self, running: int, queued: int, token_usage: float, hit_rate: float, retractions: int
    ) -> None:
        self.num_running_reqs.labels(**self.labels).set(running)
        self.num_queue_reqs.labels(**self.labels).set(queued)
        self.token_usage.labels(**self.labels).set(token_usage)
        self.cache_hit_rate.labels(**self.labels).set(hit_rate)
        self.num_retractions.labels(**self.labels).set(retractions)

    def set_disagg_stats(self, stats: dict[str, int]) -> None:
        for name, gauge in self.pd_gauges.items():
            if name in stats:
                gauge.labels(**self.labels).set(stats[name])
        for name, counter in self.pd_counters.items():
            if name in stats:  # the scheduler reports running totals; counters move by the difference
                delta = stats[name] - self._pd_counts.get(name, 0)
                if delta > 0:
                    counter.labels(**self.labels).inc(delta)
                self._pd_counts[name] = stats[name]

    def kv_transfer(self, meta: dict[str, float]) -> None:
        self.kv_latency.labels(**self.labels).observe(meta["ms"])
        self.kv_speed.labels(**self.labels).observe(meta["gb_per_s"])
        self.kv_total.labels(**self.labels).observe(meta["bytes"] / 1e6)

    def first_token(self, ttft: float) -> None:
        self.ttft.labels(**self.labels).observe(ttft)

    def tokens(self, count: int, gap: float) -> None:
        """``count`` tokens arrived ``gap`` seconds after the previous ones (spread evenly)."""
        for _ in range(count):
            self.itl.labels(**self.labels).observe(gap / count)

    def finished(self, prompt: int, completion: int, cached: int, e2e: float, aborted: bool) -> None:
        self.prompt_tokens.labels(**self.labels).inc(prompt)
        self.generation_tokens.labels(**self.labels).inc(completion)
        self.cached_tokens.labels(**self.labels).inc(cached)
        self.num_requests.labels(**self.labels).inc()
        if aborted:
            self.num_aborted.labels(**self.labels).inc()
        self.e2e.labels(**self.labels).observe(e2e)

    def render(self) -> bytes:
        return generate_latest(self.registry)
