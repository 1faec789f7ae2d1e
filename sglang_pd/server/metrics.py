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
        self.cache_hit_rate = Gauge("sglang:cache_hit_rate", "Prefix-cache hit rate of prompt tokens", labels, registry=r)
        self.num_retractions = Gauge("sglang:num_retracted_reqs", "Retractions since start", labels, registry=r)
        self.prompt_tokens = Counter("sglang:prompt_tokens", "Prompt tokens processed", labels, registry=r)
        self.generation_tokens = Counter("sglang:generation_tokens", "Tokens generated", labels, registry=r)
        self.cached_tokens = Counter("sglang:cached_tokens", "Prompt tokens served from the prefix cache", labels, registry=r)
        self.num_requests = Counter("sglang:num_requests", "Finished requests", labels, registry=r)
        self.num_aborted = Counter("sglang:num_aborted_requests", "Aborted requests", labels, registry=r)
        self.ttft = Histogram("sglang:time_to_first_token_seconds", "Time to first token", labels, buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("sglang:inter_token_latency_seconds", "Time between tokens", labels, buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("sglang:e2e_request_latency_seconds", "End-to-end latency", labels, buckets=LATENCY_BUCKETS, registry=r)
        self.labels = {"model_name": model_name}

    def set_scheduler_stats(self, running: int, queued: int, token_usage: float, hit_rate: float, retractions: int) -> None:
        self.num_running_reqs.labels(**self.labels).set(running)
        self.num_queue_reqs.labels(**self.labels).set(queued)
        self.token_usage.labels(**self.labels).set(token_usage)
        self.cache_hit_rate.labels(**self.labels).set(hit_rate)
        self.num_retractions.labels(**self.labels).set(retractions)

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
