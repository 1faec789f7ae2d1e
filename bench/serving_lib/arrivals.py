"""Request arrival times: a Poisson process of a given rate (or a burstier gamma process), or all at once.

``burstiness`` is SGLang's flag: gaps are gamma-distributed with shape ``burstiness`` and mean
``1 / rate``; 1.0 is exactly exponential (Poisson arrivals), < 1 burstier, > 1 more regular.
"""

from __future__ import annotations

import math

import numpy as np


def arrival_gaps(rate: float, n: int, seed: int, burstiness: float = 1.0) -> list[float]:
    """``n`` i.i.d. gaps of mean ``1 / rate`` seconds (exponential at burstiness 1); zeros when rate is inf."""
    if n < 0:
        raise ValueError("n must be >= 0")
    if math.isinf(rate):
        return [0.0] * n
    if not rate > 0:
        raise ValueError(f"request rate must be > 0 or inf, got {rate}")
    if not burstiness > 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    rng = np.random.default_rng([seed, 1])  # its own stream: independent of the dataset's draws
    if burstiness == 1.0:
        return [float(g) for g in rng.exponential(1.0 / rate, size=n)]
    return [float(g) for g in rng.gamma(burstiness, 1.0 / (rate * burstiness), size=n)]


def arrival_offsets(rate: float, n: int, seed: int, burstiness: float = 1.0) -> list[float]:
    """Send time of each request, seconds after the start: the first goes at 0, then one gap each."""
    gaps = arrival_gaps(rate, max(n - 1, 0), seed, burstiness)
    offsets = [0.0] * n
    for i, gap in enumerate(gaps, start=1):
        offsets[i] = offsets[i - 1] + gap
    return offsets
