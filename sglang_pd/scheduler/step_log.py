"""SGLang-style batch log lines: every prefill batch, and every ``--decode-log-interval`` decode steps.

    Prefill batch. #new-seq: 3, #new-token: 6144, #cached-token: 512, token usage: 0.05, #running-req: 40, #queue-req: 960
    Decode batch. #running-req: 256, #token: 401234, token usage: 0.47, gen throughput (token/s): 11234.5, #queue-req: 744

Throughput is decode tokens over wall time since the previous decode line (it includes the
prefill steps between them, as SGLang's does).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

logger = logging.getLogger("sglang_pd.batch")


@dataclass(frozen=True)
class StepStats:
    """What one scheduler step computed, and the queues after it."""

    new_seqs: int  # requests whose prefill started this step
    prefill_tokens: int  # prompt tokens computed this step
    cached_tokens: int  # prompt tokens the new requests found in the prefix cache
    decode_reqs: int  # requests that decoded one token this step
    running: int
    queued: int
    used_tokens: int  # KV tokens held by requests and the cache
    total_tokens: int  # KV pool capacity in tokens


class StepLogger:
    def __init__(self, decode_log_interval: int) -> None:
        self.interval = decode_log_interval
        self._decode_steps = 0
        self._decode_tokens = 0
        self._since = time.perf_counter()

    def record(self, s: StepStats) -> None:
        usage = s.used_tokens / max(1, s.total_tokens)
        if s.prefill_tokens:
            logger.info(
                "Prefill batch. #new-seq: %d, #new-token: %d, #cached-token: %d, token usage: %.2f, "
                "#running-req: %d, #queue-req: %d",
                s.new_seqs,
                s.prefill_tokens,
                s.cached_tokens,
                usage,
                s.running,
                s.queued,
            )
        if not s.decode_reqs or self.interval <= 0:
            return
        self._decode_steps += 1
        self._decode_tokens += s.decode_reqs
        if self._decode_steps % self.interval:
            return
        now = time.perf_counter()
        rate = self._decode_tokens / max(now - self._since, 1e-9)
        logger.info(
            "Decode batch. #running-req: %d, #token: %d, token usage: %.2f, gen throughput (token/s): %.2f, "
            "#queue-req: %d",
            s.running,
            s.used_tokens,
            usage,
            rate,
            s.queued,
        )
        self._decode_tokens, self._since = 0, now
