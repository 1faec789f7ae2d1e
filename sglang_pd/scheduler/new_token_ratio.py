"""Admission headroom for tokens not yet generated: SGLang's "new token ratio".

Admitting a request reserves only its prompt's pages; its output grows later. If admission ignored
that growth, a full batch would run the pool dry and retract (recompute) requests, wasting work.
So admission also sets aside ``ratio * remaining max_new_tokens`` tokens (clipped) for every running
request and for the candidate. Most requests stop early or share pages, so the ratio starts at
``0.7 * conservativeness`` and decays linearly to ``0.1 * conservativeness`` over 600 steps; a
retraction resets it, since the estimate just proved too low. ``conservativeness`` 0 turns it off
(admission then reserves one page of growth per running request only).
"""

from __future__ import annotations

from sglang_pd.scheduler.req import Req

INIT_RATIO = 0.7
MIN_RATIO = 0.1
DECAY_STEPS = 600
CLIP_MAX_NEW_TOKENS = 4096  # a request asking for more is still estimated at this many


class NewTokenRatio:
    def __init__(self, conservativeness: float) -> None:
        self.init = min(1.0, INIT_RATIO * conservativeness)
        self.min = min(self.init, MIN_RATIO * conservativeness)
        self.value = self.init
        self._decay = (self.init - self.min) / DECAY_STEPS

    def step(self) -> None:
        self.value = max(self.min, self.value - self._decay)

    def on_retract(self) -> None:
        self.value = self.init

    def future_tokens(self, req: Req) -> int:
        """Tokens ``req`` is expected to still add to the pool."""
        remaining = min(req.params.max_new_tokens - req.num_sampled, CLIP_MAX_NEW_TOKENS)
        return int(max(0, remaining) * self.value)
