"""Request arrival times: a Poisson process of a given rate, or everything at once."""

from __future__ import annotations

import math

import numpy as np


def arrival_gaps(rate: float, n: int, seed: int) -> list[float]:
    """``n`` i.i.d. exponential gaps of mean ``1 / rate`` seconds; all zero when ``rate`` is inf."""
    if n < 0:
        raise ValueError("n must be >= 0")
    if math.isinf(rate):
        return [0.0] * n
    if not rate > 0:
        raise ValueError(f"request rate must be > 0 or inf, got {rate}")
    rng = np.random.default_rng([seed, 1])  # its own stream: independent of the dataset's draws
    return [float(g) for g in rng.exponential(1.0 / rate, size=n)]


def arrival_offsets(rate: float, n: int, seed: int) -> list[float]:
    """Send time of each request, seconds after the start: the first goes at 0, then one gap each."""
    gaps = arrival_gaps(rate, max(n - 1, 0), seed)
    offsets = [0.0] * n
    for i, gap in enumerate(gaps, start=1):
        offsets[i] = offsets[i - 1] + gap
    return offsets
