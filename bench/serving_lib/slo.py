"""Service-level objectives (``--goodput ttft:MS tpot:MS ...``) and which requests meet them.

A request is *good* when it succeeded and meets every bound given (each in milliseconds):

- ``ttft``: time to first token;
- ``tpot``: its time per output token after the first, ``(e2e - ttft) / (output_len - 1)``
  (a request with one output token has none and passes);
- ``e2e`` (alias ``e2el``, vLLM's spelling): end-to-end latency;
- ``itl``: its **largest** inter-token gap, i.e. the stream never stalls longer than the bound.
  The largest gap, not a percentile, because the stall a user sees is one long gap: a prefill that
  shares the GPU with decoding delays one or a few steps of every running request, which moves a
  request's max gap but hardly its mean or, with a few hundred gaps, its p99;
- ``itl_p99``: the p99 of its inter-token gaps (numpy linear percentile), the lenient variant.

A request without gaps (one output token, or not streamed) passes the ITL bounds.
Goodput = good requests / benchmark duration; SLO attainment = good / all requests sent (%).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from .records import RequestRecord

ALIASES = {"e2el": "e2e"}


@dataclass(frozen=True)
class SLO:
    """Bounds in milliseconds; None: not bounded."""

    ttft: float | None = None
    tpot: float | None = None
    e2e: float | None = None
    itl: float | None = None  # the request's max inter-token gap
    itl_p99: float | None = None  # the request's p99 inter-token gap

    def bounds(self) -> dict[str, float]:
        return {f.name: v for f in fields(self) if (v := getattr(self, f.name)) is not None}

    def describe(self) -> str:
        """``ttft<=2000ms itl<=150ms``; "" when nothing is bounded."""
        return " ".join(f"{k}<={v:g}ms" for k, v in self.bounds().items())


def parse_slo(specs: Sequence[str]) -> SLO:
    """``["ttft:2000", "tpot:50"]`` -> SLO; raises ValueError on unknown keys or bad numbers."""
    known = {f.name for f in fields(SLO)}
    values: dict[str, float] = {}
    for spec in specs:
        key, sep, raw = spec.partition(":")
        key = ALIASES.get(key.strip().lower(), key.strip().lower())
        if not sep or key not in known:
            raise ValueError(f"--goodput takes KEY:MS with KEY in {sorted(known | set(ALIASES))}, got {spec!r}")
        try:
            ms = float(raw)
        except ValueError:
            raise ValueError(f"--goodput {key}: {raw!r} is not a number of milliseconds") from None
        if not ms > 0:
            raise ValueError(f"--goodput {key} must be > 0 ms, got {raw}")
        values[key] = ms
    if not values:
        raise ValueError("--goodput needs at least one KEY:MS")
    return SLO(**values)


def request_values_ms(rec: RequestRecord) -> dict[str, float | None]:
    """The per-request quantities the SLO bounds, in ms (None: the request has none)."""
    gaps = np.asarray(rec.itl, dtype=np.float64) * 1000.0
    tpot = (rec.latency - rec.ttft) / (rec.output_len - 1) * 1000.0 if rec.output_len > 1 else None
    return {
        "ttft": rec.ttft * 1000.0,
        "tpot": tpot,
        "e2e": rec.latency * 1000.0,
        "itl": float(gaps.max()) if gaps.size else None,
        "itl_p99": float(np.percentile(gaps, 99)) if gaps.size else None,
    }


def is_good(rec: RequestRecord, slo: SLO) -> bool:
    if not rec.success:
        return False
    values = request_values_ms(rec)
    return all((v := values[k]) is None or v <= bound for k, bound in slo.bounds().items())


@dataclass(frozen=True)
class Goodput:
    good: int  # requests meeting every bound
    total: int  # requests sent (failed ones count, and are never good)
    request_goodput: float  # good / duration, requests/s
    attainment_pct: float  # 100 * good / total

    def as_json(self, slo: SLO) -> dict[str, Any]:
        return {
            "goodput_slo": slo.bounds(),
            "good_requests": self.good,
            "request_goodput": self.request_goodput,
            "slo_attainment_pct": self.attainment_pct,
        }


def compute_goodput(records: Sequence[RequestRecord], duration: float, slo: SLO) -> Goodput:
    good = sum(is_good(r, slo) for r in records)
    total = len(records)
    return Goodput(good, total, good / duration, 100.0 * good / total if total else 0.0)
