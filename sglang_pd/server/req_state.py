"""What main keeps per in-flight request: cumulative output, timing, and the chunks a handler awaits."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from sglang_pd.server.messages import StrOut


@dataclass(frozen=True)
class GenerateChunk:
    """One step's news for one request; ``state`` holds everything so far."""

    text_delta: str
    token_ids_delta: list[int]
    output_token_logprobs_delta: list[list[Any]]
    output_top_logprobs_delta: list[list[list[Any]]]
    finished: bool
    state: ReqState


@dataclass(eq=False)
class ReqState:
    rid: str
    prompt_tokens: int
    return_logprob: bool
    top_logprobs_num: int
    created: float = field(default_factory=time.perf_counter)
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    text: str = ""
    output_ids: list[int] = field(default_factory=list)
    cached_tokens: int = 0
    finish_reason: dict[str, Any] | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    output_token_logprobs: list[list[Any]] = field(default_factory=list)
    output_top_logprobs: list[list[list[Any]]] = field(default_factory=list)
    input_token_logprobs: list[list[Any]] | None = None
    input_top_logprobs: list[Any] | None = None
    kv_transfer: dict[str, Any] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def apply(self, out: StrOut) -> GenerateChunk:
        t = out.token
        self.text += out.text_delta
        self.output_ids.extend(t.new_token_ids)
        self.cached_tokens = t.cached_tokens
        self.output_token_logprobs.extend(t.output_token_logprobs)
        self.output_top_logprobs.extend(t.output_top_logprobs)
        if t.input_token_logprobs is not None:
            self.input_token_logprobs = t.input_token_logprobs
            self.input_top_logprobs = t.input_top_logprobs
        self.finish_reason = t.finish_reason
        if t.kv_transfer is not None:
            self.kv_transfer = t.kv_transfer
        return GenerateChunk(
            out.text_delta, t.new_token_ids, t.output_token_logprobs, t.output_top_logprobs, self.finished, self
        )

    def meta_info(self) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "id": self.rid,
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": len(self.output_ids),
            "cached_tokens": self.cached_tokens,
            "e2e_latency": time.perf_counter() - self.created,
        }
        if self.kv_transfer is not None:
            meta["kv_transfer"] = self.kv_transfer
        if self.return_logprob:
            meta["input_token_logprobs"] = self.input_token_logprobs or []
            meta["output_token_logprobs"] = self.output_token_logprobs
            if self.top_logprobs_num > 0:
                meta["input_top_logprobs"] = self.input_top_logprobs or []
                meta["output_top_logprobs"] = self.output_top_logprobs
        return meta
