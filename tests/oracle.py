"""Test oracles shared by test files: transformers' own greedy decoding, and the KV pool invariant.

(Not in conftest.py: two conftest modules exist, and ``from conftest import`` would pick either.)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

ARCHS = ("llama", "mistral", "qwen2", "qwen3")


class HFOracle:
    """Greedy tokens and logprobs from transformers' own forward (KV-cached, one prompt at a time)."""

    def __init__(self, path: Path) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self._cache: dict[tuple, list[int]] = {}

    @torch.inference_mode()
    def greedy(self, prompt: Sequence[int], n: int) -> list[int]:
        key = (tuple(prompt), n)
        if key not in self._cache:
            ids = torch.tensor([list(prompt)])
            out = self.model(ids, use_cache=True)
            past, tokens = out.past_key_values, []
            for _ in range(n):
                nxt = int(out.logits[0, -1].argmax())
                tokens.append(nxt)
                out = self.model(torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
                past = out.past_key_values
            self._cache[key] = tokens
        return self._cache[key]

    @torch.inference_mode()
    def logprobs(self, ids: Sequence[int]) -> torch.Tensor:
        """log_softmax of the logits at every position of ``ids``: [len(ids), vocab]."""
        logits = self.model(torch.tensor([list(ids)])).logits[0]
        return torch.log_softmax(logits.float(), dim=-1)


def assert_pool_idle(engine: object) -> None:
    """DESIGN §3 invariant: with nothing running, free pages + cached pages == all pages."""
    sched = engine.core.scheduler  # type: ignore[attr-defined]
    assert not sched.running and not sched.waiting
    kv = sched.kv
    assert kv.cache.num_locked_pages == 0
    assert kv.pool.num_free + kv.cache.num_cached_pages == kv.pool.num_total
    kv.cache.check_invariants()
