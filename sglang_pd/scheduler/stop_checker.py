"""When does a request stop: EOS, stop_token_ids, stop strings, max_new_tokens, context length."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from sglang_pd.scheduler.req import FinishReason, Req


class Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


class StopChecker:
    def __init__(self, eos_token_ids: Sequence[int], context_length: int, tokenizer: Decoder | None) -> None:
        self.eos_token_ids = frozenset(eos_token_ids)
        self.context_length = context_length
        self.tokenizer = tokenizer

    def blocked_ids(self, req: Req) -> tuple[int, ...]:
        """Token ids the sampler must not pick while ``min_new_tokens`` is not reached."""
        if req.num_sampled >= req.params.min_new_tokens:  # the next sample's index
            return ()
        eos = () if req.params.ignore_eos else tuple(self.eos_token_ids)
        return tuple(sorted(set(eos) | set(req.params.stop_token_ids)))

    def check(self, req: Req) -> FinishReason | None:
        """Called after each appended token; returns why ``req`` is done, or None.

        Reads only tokens the host has seen (``output_ids``), never in-flight placeholders.
        """
        p = req.params
        n = len(req.output_ids)
        last = req.output_ids[-1]
        if n >= p.min_new_tokens:
            if last in p.stop_token_ids or (not p.ignore_eos and last in self.eos_token_ids):
                return FinishReason("stop", matched=last)
            matched = self._stop_string(req)
            if matched is not None:
                return FinishReason("stop", matched=matched)
        if n >= p.max_new_tokens:
            return FinishReason("length", length=n)
        if len(req.prompt_ids) + n >= self.context_length:
            return FinishReason("length", length=n)
        return None

    def surely_stops(self, req: Req) -> bool:
        """True if ``req`` will stop once its in-flight samples land, whatever they are (max_new_tokens
        or context length reached): the scheduler need not plan another step for it."""
        return req.num_sampled >= req.params.max_new_tokens or req.seq_len >= self.context_length

    def _stop_string(self, req: Req) -> str | None:
        if not req.params.stop or self.tokenizer is None:
            return None
        # A stop string of B UTF-8 bytes spans at most B tokens of a byte-level vocabulary (+1 for a
        # token straddling its start).
        width = max(len(s.encode()) for s in req.params.stop) + 1
        tail = self.tokenizer.decode(req.output_ids[-width:], skip_special_tokens=False)
        for s in req.params.stop:
            if s in tail:
                return s
        return None
