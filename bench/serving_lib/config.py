"""The benchmark's configuration: one frozen dataclass built once from the CLI flags."""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

BACKENDS: tuple[str, ...] = ("sglang", "openai", "openai-chat")
DATASETS: tuple[str, ...] = ("random", "random-ids")

# Route each backend posts to.
BACKEND_PATHS: Mapping[str, str] = MappingProxyType({
    "sglang": "/generate",
    "openai": "/v1/completions",
    "openai-chat": "/v1/chat/completions",
})


@dataclass(frozen=True)
class BenchConfig:
    base_url: str  # "http://host:port", no trailing slash
    backend: str
    model: str | None  # None: asked from GET /v1/models at start
    tokenizer: str | None
    dataset_name: str
    random_input_len: int
    random_output_len: int
    random_range_ratio: float  # lengths uniform in [max(1, int(len * ratio)), len]
    random_vocab_size: int | None  # random-ids range; None: tokenizer's, server's, or a safe default
    num_prompts: int
    request_rate: float  # requests/s; math.inf = all at once
    max_concurrency: int | None
    seed: int
    stream: bool
    ignore_eos: bool
    warmup_requests: int
    request_timeout_s: float
    output_file: str | None
    disable_tqdm: bool
    api_key: str | None

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"--backend must be one of {list(BACKENDS)}, got {self.backend!r}")
        if self.dataset_name not in DATASETS:
            raise ValueError(f"--dataset-name must be one of {list(DATASETS)}, got {self.dataset_name!r}")
        if self.random_input_len < 1 or self.random_output_len < 1:
            raise ValueError("--random-input-len and --random-output-len must be >= 1")
        if not 0.0 <= self.random_range_ratio <= 1.0:
            raise ValueError("--random-range-ratio must be in [0, 1]")
        if self.num_prompts < 1:
            raise ValueError("--num-prompts must be >= 1")
        if not self.request_rate > 0:  # inf passes; nan and <= 0 do not
            raise ValueError("--request-rate must be > 0 (or inf)")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError("--max-concurrency must be >= 1")
        if self.warmup_requests < 0:
            raise ValueError("--warmup-requests must be >= 0")

    @property
    def url(self) -> str:
        return self.base_url + BACKEND_PATHS[self.backend]
