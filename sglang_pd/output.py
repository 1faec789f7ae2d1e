"""Turning a finished Req into SGLang's answer: text (stop strings trimmed), output_ids, meta_info."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from sglang_pd.scheduler.req import Req


class TextDecoder(Protocol):
    def decode(
        self, ids: Sequence[int], skip_special_tokens: bool = ..., spaces_between_special_tokens: bool = ...
    ) -> str: ...


def final_text(tokenizer: TextDecoder | None, req: Req) -> str:
    """Decoded output; a matched stop token or stop string (and what follows it) is cut unless no_stop_trim."""
    if tokenizer is None:
        return ""
    p = req.params
    ids = req.output_ids
    reason = req.finish_reason
    matched = reason.matched if reason is not None and reason.type == "stop" else None
    if isinstance(matched, int) and not p.no_stop_trim and ids and ids[-1] == matched:
        ids = ids[:-1]
    text = tokenizer.decode(ids, skip_special_tokens=p.skip_special_tokens)
    if isinstance(matched, str) and not p.no_stop_trim:
        cut = text.find(matched)
        if cut >= 0:
            text = text[:cut]
    return text


def _lp_list(pairs: Sequence[tuple[float | None, int]]) -> list[list[Any]]:
    return [[lp, tok, None] for lp, tok in pairs]


def meta_info(req: Req, e2e_latency: float) -> dict[str, Any]:
    assert req.finish_reason is not None
    meta: dict[str, Any] = {
        "id": req.rid,
        "finish_reason": req.finish_reason.to_dict(),
        "prompt_tokens": len(req.prompt_ids),
        "completion_tokens": len(req.output_ids),
        "cached_tokens": req.cached_tokens,
        "e2e_latency": e2e_latency,
    }
    if req.logprob.return_logprob:
        rec = req.logprobs
        meta["input_token_logprobs"] = _lp_list(rec.input_token)
        meta["output_token_logprobs"] = _lp_list(rec.output_token)
        if req.logprob.top_logprobs_num > 0:
            meta["input_top_logprobs"] = [None if t is None else _lp_list(t) for t in rec.input_top]
            meta["output_top_logprobs"] = [_lp_list(t) for t in rec.output_top]
    return meta


def generate_output(tokenizer: TextDecoder | None, req: Req, e2e_latency: float) -> dict[str, Any]:
    return {
        "text": final_text(tokenizer, req),
        "output_ids": list(req.output_ids),
        "meta_info": meta_info(req, e2e_latency),
    }
