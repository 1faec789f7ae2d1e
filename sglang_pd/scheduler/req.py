"""Req: one request as the scheduler owns it, with a status enum and counter-based progress.

Progress invariant: the KV cache holds positions ``[0, num_computed_tokens)`` of
``all_ids = prompt_ids + output_ids`` in ``pages`` (``pages[j]`` covers positions
``[j * page_size, (j + 1) * page_size)``). A step computes positions
``[num_computed_tokens, num_computed_tokens + n)``; when that reaches ``len(all_ids)`` the step
also samples the next token. A fresh prefill, a chunk of one, a decode step, a prefix-cache hit,
a recomputation after retraction (and, in PD mode, "KV arrived") all move the same counter.

Overlapped scheduling: a batch is launched before the previous batch's sampled tokens reach the
host. A token that is sampled on the device but not yet seen by the host sits in ``pending_ids`` as a
placeholder (a negative id the model runner resolves on the device), so
``all_ids = prompt_ids + output_ids + pending_ids`` and ``seq_len`` counts it; ``output_ids`` holds
only tokens the host has seen, so stop checks and streamed outputs never see a placeholder.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from sglang_pd.disagg.bootstrap_info import BootstrapInfo
from sglang_pd.sampling.params import SamplingParams


class ReqStatus(enum.Enum):
    WAITING = "waiting"  # queued; holds no pages
    RUNNING = "running"  # admitted; holds pages for [0, num_computed_tokens)
    FINISHED = "finished"  # done; holds nothing


_LEGAL = {
    ReqStatus.WAITING: {ReqStatus.RUNNING, ReqStatus.FINISHED},
    ReqStatus.RUNNING: {ReqStatus.WAITING, ReqStatus.FINISHED},  # -> WAITING = retracted
    ReqStatus.FINISHED: set(),
}


@dataclass(frozen=True)
class FinishReason:
    """SGLang's ``meta_info.finish_reason``: stop (EOS/stop id/stop string), length, or abort."""

    type: str  # "stop" | "length" | "abort"
    matched: int | str | None = None  # the stop token id or stop string
    length: int | None = None
    message: str | None = None
    # abort only: the HTTP status when the request itself is at fault (SGLang's FINISH_ABORT status_code);
    # a 4xx abort before any output token answers the client with that status instead of a 200 + abort
    status_code: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type}
        if self.type == "stop":
            out["matched"] = self.matched
        elif self.type == "length":
            out["length"] = self.length
        else:
            out["message"] = self.message
            if self.status_code is not None:
                out["status_code"] = self.status_code
        return out


@dataclass(frozen=True)
class LogprobRequest:
    """What logprobs the client asked for; ``start_len`` -1 means output tokens only."""

    return_logprob: bool = False
    top_logprobs_num: int = 0
    start_len: int = -1


@dataclass
class LogprobRecord:
    """Collected logprobs: lists of (logprob, token_id); top lists hold such pairs per position."""

    input_token: list[tuple[float | None, int]] = field(default_factory=list)
    input_top: list[list[tuple[float, int]] | None] = field(default_factory=list)
    output_token: list[tuple[float, int]] = field(default_factory=list)
    output_top: list[list[tuple[float, int]]] = field(default_factory=list)


@dataclass(eq=False)
class Req:
    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int  # the request's own seed, or one drawn at submission; drives every random draw
    logprob: LogprobRequest = field(default_factory=LogprobRequest)
    bootstrap: BootstrapInfo | None = None  # PD mode only
    output_ids: list[int] = field(default_factory=list)
    pending_ids: list[int] = field(default_factory=list)  # placeholders of in-flight samples (oldest first)
    status: ReqStatus = ReqStatus.WAITING
    num_computed_tokens: int = 0
    pages: list[int] = field(default_factory=list)
    prefix_node: Any = None  # radix node locked while running (None when not running)
    cached_tokens: int = 0  # prefix-cache hit of the first admission (SGLang's meta_info.cached_tokens)
    admitted_once: bool = False
    num_retractions: int = 0
    finish_reason: FinishReason | None = None
    logprobs: LogprobRecord = field(default_factory=LogprobRecord)

    # --- derived views -------------------------------------------------------------------------
    @property
    def seq_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids) + len(self.pending_ids)

    @property
    def num_sampled(self) -> int:
        """Output tokens sampled so far, the in-flight ones included (the next sample's index)."""
        return len(self.output_ids) + len(self.pending_ids)

    @property
    def num_uncomputed(self) -> int:
        return self.seq_len - self.num_computed_tokens

    @property
    def in_prefill(self) -> bool:
        """More than one position left to compute (the prompt, or a recomputation after retraction)."""
        return self.num_uncomputed > 1

    def token_ids(self, start: int, end: int) -> list[int]:
        """all_ids[start:end] without building all_ids (placeholders included)."""
        p = len(self.prompt_ids)
        if end <= p:
            return self.prompt_ids[start:end]
        o = p + len(self.output_ids)
        if start >= p and end <= o:
            return self.output_ids[start - p : end - p]
        if start >= o:
            return self.pending_ids[start - o : end - o]
        ids = self.prompt_ids[start:] + self.output_ids[max(0, start - p) :] + self.pending_ids
        return ids[: end - start]

    @property
    def wants_input_logprobs(self) -> bool:
        """Input logprobs were asked for and not all collected yet."""
        lp = self.logprob
        if not lp.return_logprob or lp.start_len < 0 or lp.start_len >= len(self.prompt_ids):
            return False
        return len(self.logprobs.input_token) < len(self.prompt_ids) - lp.start_len

    @property
    def finished(self) -> bool:
        return self.status is ReqStatus.FINISHED

    def set_status(self, new: ReqStatus) -> None:
        if new not in _LEGAL[self.status]:
            raise RuntimeError(f"request {self.rid}: illegal transition {self.status.value} -> {new.value}")
        self.status = new

    def finish(self, reason: FinishReason) -> None:
        self.finish_reason = reason
        self.set_status(ReqStatus.FINISHED)
