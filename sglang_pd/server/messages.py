"""Typed messages between the worker's processes, serialized with msgpack.

main -> scheduler:       TokenizedGenerateReq, AbortReq, FlushCacheReq, ServerInfoReq, ShutdownReq
scheduler -> detokenizer: BatchTokenOut
detokenizer -> main:     BatchStrOut
scheduler -> main:       SchedulerReady, ControlReply, SchedulerStats
Every message is a frozen dataclass of plain values (no tensors); ``encode``/``decode`` dispatch on
the class name. Nested dataclasses are flattened to dicts by ``dataclasses.asdict`` and rebuilt by
the receiving dataclass's ``from_wire`` where it has nested fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import msgpack

from sglang_pd.disagg.bootstrap_info import BootstrapInfo
from sglang_pd.sampling.params import SamplingParams
from sglang_pd.scheduler.req import LogprobRequest


@dataclass(frozen=True)
class TokenizedGenerateReq:
    rid: str
    input_ids: list[int]
    sampling_params: dict[str, Any]  # SamplingParams.to_dict(), validated in main
    seed: int
    return_logprob: bool = False
    top_logprobs_num: int = 0
    logprob_start_len: int = -1
    bootstrap_host: str | None = None
    bootstrap_port: int | None = None
    bootstrap_room: int | None = None

    @property
    def bootstrap(self) -> BootstrapInfo | None:
        if self.bootstrap_room is None:
            return None
        assert self.bootstrap_host is not None and self.bootstrap_port is not None
        return BootstrapInfo(self.bootstrap_host, self.bootstrap_port, self.bootstrap_room)

    @property
    def params(self) -> SamplingParams:
        return SamplingParams.from_dict(self.sampling_params)

    @property
    def logprob(self) -> LogprobRequest:
        return LogprobRequest(self.return_logprob, self.top_logprobs_num, self.logprob_start_len)


@dataclass(frozen=True)
class AbortReq:
    rid: str
    message: str = "aborted"


@dataclass(frozen=True)
class FlushCacheReq:
    request_id: int


@dataclass(frozen=True)
class ServerInfoReq:
    request_id: int


@dataclass(frozen=True)
class ShutdownReq:
    pass


@dataclass(frozen=True)
class TokenOut:
    """New tokens of one request since the last message, and its cumulative counters."""

    rid: str
    new_token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    finish_reason: dict[str, Any] | None = None  # FinishReason.to_dict() once finished
    # Logprob deltas (same length as new_token_ids) and the input logprobs (sent once, with the first token).
    output_token_logprobs: list[list[Any]] = field(default_factory=list)
    output_top_logprobs: list[list[list[Any]]] = field(default_factory=list)
    input_token_logprobs: list[list[Any]] | None = None
    input_top_logprobs: list[Any] | None = None
    # Detokenization settings travel with the tokens so the detokenizer keeps no request registry.
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    stop: list[str] = field(default_factory=list)  # stop strings: the detokenizer holds back partial matches
    kv_transfer: dict[str, Any] | None = None  # PD: {bytes, ms, gb_per_s} with the final message


@dataclass(frozen=True)
class BatchTokenOut:
    outs: list[TokenOut]

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> BatchTokenOut:
        return cls([TokenOut(**o) for o in d["outs"]])


@dataclass(frozen=True)
class StrOut:
    """TokenOut plus the text delta the detokenizer derived (stop strings already trimmed)."""

    token: TokenOut
    text_delta: str

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> StrOut:
        return cls(TokenOut(**d["token"]), d["text_delta"])


@dataclass(frozen=True)
class BatchStrOut:
    outs: list[StrOut]

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> BatchStrOut:
        return cls([StrOut.from_wire(o) for o in d["outs"]])


@dataclass(frozen=True)
class SchedulerReady:
    """Sent once the model is loaded: what main needs to validate requests and report."""

    context_length: int
    vocab_size: int
    max_running_requests: int
    max_total_tokens: int
    page_size: int
    eos_token_ids: list[int]
    model_config: dict[str, Any]


@dataclass(frozen=True)
class ControlReply:
    request_id: int
    ok: bool
    payload: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SchedulerStats:
    num_running_reqs: int
    num_queue_reqs: int
    token_usage: float  # share of pool pages held by requests (not by the cache alone)
    cache_hit_rate: float  # cached prompt tokens / prompt tokens, over admitted requests
    num_retractions: int
    pool: dict[str, int]
    disagg: dict[str, Any] = field(default_factory=dict)  # PD queue gauges and failure counters


_TYPES: dict[str, type] = {
    cls.__name__: cls
    for cls in (
        TokenizedGenerateReq,
        AbortReq,
        FlushCacheReq,
        ServerInfoReq,
        ShutdownReq,
        BatchTokenOut,
        BatchStrOut,
        SchedulerReady,
        ControlReply,
        SchedulerStats,
    )
}


def encode(msg: Any) -> bytes:
    return msgpack.packb([type(msg).__name__, dataclasses.asdict(msg)], use_bin_type=True)


def decode(data: bytes) -> Any:
    name, fields = msgpack.unpackb(data, raw=False, strict_map_key=False)
    cls = _TYPES[name]
    from_wire = getattr(cls, "from_wire", None)
    return from_wire(fields) if from_wire is not None else cls(**fields)
