"""TransferConfig: the ``SGLANG_DISAGGREGATION_*`` environment variables (DESIGN §4.4), parsed once, leniently.

A bad value never stops a worker: it logs a warning naming the variable and the default is used.
One variable is ours, not SGLang's: ``SGLANG_DISAGGREGATION_MAX_MESSAGE_MB`` (default 256) caps one data
message; a longer chunk goes as several messages, so packing the next one overlaps sending this one
(and D's scatter overlaps the next receive), and staging slots stay at most this big.
Another is ``SGLANG_DISAGGREGATION_DIRECT_COPY`` (default 1): when P and D share a host and P can map D's
KV pool (CUDA IPC over NVLink, or shared memory on CPU), P writes a room's pages straight into D's pool
with one kernel per send (no staging, pack, data message or unpack); 0 always sends the KV as UCX data
messages.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields

logger = logging.getLogger(__name__)

ENV_PREFIX = "SGLANG_DISAGGREGATION_"


def default_thread_pool_size(cpus: int | None = None) -> int:
    """SGLang's default: min(12, max(4, int(0.75 * cpus) // 8))."""
    cpus = cpus if cpus is not None else (os.cpu_count() or 1)
    return min(12, max(4, int(0.75 * cpus) // 8))


@dataclass(frozen=True)
class TransferConfig:
    thread_pool_size: int = field(default_factory=default_thread_pool_size)  # threads that wait on CUDA events
    queue_size: int = 4  # staging slots per engine (parallel chunks in flight)
    bootstrap_timeout: float = 300.0  # s, P: first poll/send of a room -> D's registration
    waiting_timeout: float = 300.0  # s, D: register() -> Success
    heartbeat_interval: float = 5.0  # s, D: GET /health on each P it has live rooms with
    heartbeat_max_failure: int = 2  # consecutive missed heartbeats before D fails that P's rooms
    test_failure_prob: float = 0.0  # fault injection: share of rooms failed at P's first send
    max_message_mb: float = 256.0  # ours, not SGLang's: split a send into messages of at most this many MiB
    direct_copy: bool = True  # ours: P writes D's pages itself through D's mapped pool on one host (peer_pool.py)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> TransferConfig:
        values: dict[str, object] = {}
        defaults = cls()
        for f in fields(cls):
            name = ENV_PREFIX + f.name.upper()
            raw = environ.get(name)
            if raw is None or raw.strip() == "":
                continue
            parsed = _PARSERS[f.name](raw.strip())
            if parsed is None:
                logger.warning(
                    "ignoring %s=%r (%s); using the default %r", name, raw, _RULES[f.name], getattr(defaults, f.name)
                )
            else:
                values[f.name] = parsed
        config = cls(**values)  # type: ignore[arg-type]
        logger.info("KV transfer config: %s", config.describe())
        return config

    def describe(self) -> str:
        return ", ".join(f"{ENV_PREFIX}{f.name.upper()}={getattr(self, f.name)}" for f in fields(self))


def _number(
    kind: Callable[[str], float], lo: float, hi: float | None = None, lo_open: bool = False
) -> Callable[[str], object]:
    def parse(raw: str) -> object:
        try:
            value = kind(raw)
        except ValueError:
            return None
        if math.isnan(value) or (lo_open and value <= lo) or value < lo or (hi is not None and value > hi):
            return None  # NaN or out of range
        return value

    return parse


def _bool(raw: str) -> object:
    return {
        "1": True,
        "true": True,
        "yes": True,
        "on": True,
        "0": False,
        "false": False,
        "no": False,
        "off": False,
    }.get(raw.lower())


def _int(raw: str) -> int:
    value = float(raw)  # accepts "8" and "8.0"; rejects "eight"
    if not value.is_integer():
        raise ValueError(raw)
    return int(value)


_PARSERS: dict[str, Callable[[str], object]] = {
    "thread_pool_size": _number(_int, 1),
    "queue_size": _number(_int, 1),
    "bootstrap_timeout": _number(float, 0.0, lo_open=True),
    "waiting_timeout": _number(float, 0.0, lo_open=True),
    "heartbeat_interval": _number(float, 0.0, lo_open=True),
    "heartbeat_max_failure": _number(_int, 1),
    "test_failure_prob": _number(float, 0.0, 1.0),
    "max_message_mb": _number(float, 0.0, lo_open=True),
    "direct_copy": _bool,
}
_RULES = {
    "thread_pool_size": "expected an integer >= 1",
    "queue_size": "expected an integer >= 1",
    "bootstrap_timeout": "expected seconds > 0",
    "waiting_timeout": "expected seconds > 0",
    "heartbeat_interval": "expected seconds > 0",
    "heartbeat_max_failure": "expected an integer >= 1",
    "test_failure_prob": "expected a probability in [0, 1]",
    "max_message_mb": "expected MiB > 0",
    "direct_copy": "expected 1/0 (true/false, yes/no, on/off)",
}
