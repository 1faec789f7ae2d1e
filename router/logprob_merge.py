"""PD: the prompt's logprobs come from the prefill worker; these put them into the decode worker's answer.

D never runs the prompt forward, so it cannot know the prompt tokens' logprobs; P computed them.
Contract with the workers (colocated answers have the same shape):
- ``/generate``: D's ``meta_info.input_token_logprobs`` / ``input_top_logprobs`` are replaced by P's.
- ``/v1/completions`` with ``echo`` and ``logprobs``: the first ``usage.prompt_tokens`` entries of
  D's choice ``logprobs`` (the echoed prompt, values null on D) take P's values, whether they
  arrive in one response or spread over stream chunks (``PromptLogprobPatcher`` counts entries).
"""

from __future__ import annotations

from typing import Any

_GENERATE_KEYS = ("input_token_logprobs", "input_top_logprobs")


def merge_generate(payload: Any, prefill: Any) -> Any:
    """Copy P's input logprobs into one D answer/event (in place, and returned); no-op when either lacks them."""
    if not isinstance(payload, dict) or not isinstance(prefill, dict):
        return payload
    meta, p_meta = payload.get("meta_info"), prefill.get("meta_info")
    if not isinstance(meta, dict) or not isinstance(p_meta, dict):
        return payload
    for key in _GENERATE_KEYS:
        if p_meta.get(key):
            meta[key] = p_meta[key]
    return payload


class PromptLogprobPatcher:
    """Fills the prompt part of D's completion logprobs with P's, chunk after chunk (one choice)."""

    def __init__(self, prefill: Any) -> None:
        self.seen = 0  # logprob entries of D's choice passed so far
        self.values: list[Any] = []
        self.tops: list[Any] = []
        if isinstance(prefill, dict):
            usage = prefill.get("usage") or {}
            k = int(usage.get("prompt_tokens") or 0)
            choices = prefill.get("choices") or [{}]
            lp = (choices[0] or {}).get("logprobs") or {}
            self.values = list(lp.get("token_logprobs") or [])[:k]
            self.tops = list(lp.get("top_logprobs") or [])[:k]

    def patch(self, payload: Any) -> Any:
        """Patch one D answer/chunk in place; returns it."""
        if not isinstance(payload, dict):
            return payload
        for choice in payload.get("choices") or ():
            lp = choice.get("logprobs") if isinstance(choice, dict) else None
            values = lp.get("token_logprobs") if isinstance(lp, dict) else None
            if not isinstance(values, list):
                continue
            tops = lp.get("top_logprobs") if isinstance(lp, dict) else None
            for i in range(len(values)):
                pos = self.seen + i
                if pos < len(self.values):
                    values[i] = self.values[pos]
                if isinstance(tops, list) and i < len(tops) and pos < len(self.tops):
                    tops[i] = self.tops[pos]
            self.seen += len(values)
        return payload
