"""Pure metric computation: request records + wall-clock duration -> BenchMetrics.

Definitions (SGLang's ``bench_serving``): over successful requests only; percentiles by numpy's
default (linear) method; TPOT per request ``(latency - ttft) / (output_len - 1)`` for requests with
more than one output token; ITL pools every request's gaps; concurrency ``sum(latency) / duration``.
A distribution with no samples has every statistic None. Goodput (with an SLO) is in slo.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .records import RequestRecord
from .slo import SLO, Goodput, compute_goodput


@dataclass(frozen=True)
class Distribution:
    """Statistics of one latency, in milliseconds."""

    count: int
    mean: float | None
    median: float | None
    std: float | None
    p90: float | None
    p95: float | None
    p99: float | None
    max: float | None

    @classmethod
    def of_seconds(cls, samples: Sequence[float]) -> Distribution:
        if len(samples) == 0:
            return cls(0, None, None, None, None, None, None, None)
        ms = np.asarray(samples, dtype=np.float64) * 1000.0
        p90, p95, p99 = (float(v) for v in np.percentile(ms, [90, 95, 99]))
        return cls(len(ms), float(ms.mean()), float(np.median(ms)), float(ms.std()), p90, p95, p99, float(ms.max()))


@dataclass(frozen=True)
class BenchMetrics:
    completed: int
    failed: int
    duration: float  # seconds, first send to last answer
    total_input_tokens: int
    total_output_tokens: int
    total_output_tokens_retokenized: int | None  # None without --tokenizer
    request_throughput: float  # completed requests / s
    input_throughput: float  # tokens / s
    output_throughput: float
    total_throughput: float
    concurrency: float
    ttft: Distribution
    tpot: Distribution
    itl: Distribution
    e2e_latency: Distribution
    goodput: Goodput | None = None  # None without --goodput


def tpot_seconds(rec: RequestRecord) -> float | None:
    """Time per output token after the first; None with fewer than two output tokens."""
    if rec.output_len <= 1:
        return None
    return (rec.latency - rec.ttft) / (rec.output_len - 1)


def compute_metrics(records: Sequence[RequestRecord], duration: float, slo: SLO | None = None) -> BenchMetrics:
    if duration <= 0:
        raise ValueError(f"duration must be > 0, got {duration}")
    ok = [r for r in records if r.success]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_len for r in ok)
    retok = [r.output_len_retokenized for r in ok]
    retok_total = sum(v for v in retok if v is not None) if ok and None not in retok else None
    tpots = [t for t in (tpot_seconds(r) for r in ok) if t is not None]
    return BenchMetrics(
        completed=len(ok),
        failed=len(records) - len(ok),
        duration=duration,
        total_input_tokens=total_in,
        total_output_tokens=total_out,
        total_output_tokens_retokenized=retok_total,
        request_throughput=len(ok) / duration,
        input_throughput=total_in / duration,
        output_throughput=total_out / duration,
        total_throughput=(total_in + total_out) / duration,
        concurrency=sum(r.latency for r in ok) / duration,
        ttft=Distribution.of_seconds([r.ttft for r in ok]),
        tpot=Distribution.of_seconds(tpots),
        itl=Distribution.of_seconds([gap for r in ok for gap in r.itl]),
        e2e_latency=Distribution.of_seconds([r.latency for r in ok]),
        goodput=compute_goodput(records, duration, slo) if slo is not None else None,
    )
