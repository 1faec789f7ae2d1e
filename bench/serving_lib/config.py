"""The benchmark's configuration: one frozen dataclass built once from the CLI flags."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from .slo import SLO

BACKENDS: tuple[str, ...] = ("sglang", "openai", "openai-chat")
DATASETS: tuple[str, ...] = ("random", "random-ids", "generated-shared-prefix", "chat-synthetic")

# Route each backend posts to.
BACKEND_PATHS: Mapping[str, str] = MappingProxyType(
    {
        "sglang": "/generate",
        "openai": "/v1/completions",
        "openai-chat": "/v1/chat/completions",
    }
)


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
    # Everything below has a default, so code and tests that build a config can leave it out.
    burstiness: float = 1.0  # gamma-distributed gaps of this shape; 1.0 = Poisson
    gsp_num_groups: int = 64
    gsp_prompts_per_group: int = 16
    gsp_system_prompt_len: int = 2048
    gsp_question_len: int = 128
    gsp_output_len: int = 256
    chat_long_fraction: float = 0.0  # chat-synthetic: share of long-document requests
    chat_long_input_len: int = 8192  # ... whose input is uniform in [len // 2, len]
    flush_cache: bool = False  # POST /flush_cache after warm-up, before the measured run
    slo: SLO | None = None  # --goodput
    tag: str | None = None  # series name in sweep plots (e.g. "pd", "colocated")
    labels: tuple[tuple[str, str], ...] = ()  # --label KEY=VALUE, copied into the JSON line
    plot_dir: str | None = None

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
        if not (self.burstiness > 0 and math.isfinite(self.burstiness)):
            raise ValueError("--burstiness must be > 0")
        gsp = (
            self.gsp_num_groups,
            self.gsp_prompts_per_group,
            self.gsp_system_prompt_len,
            self.gsp_question_len,
            self.gsp_output_len,
        )
        if min(gsp) < 1:
            raise ValueError("--gsp-* sizes must be >= 1")
        if not 0.0 <= self.chat_long_fraction <= 1.0 or self.chat_long_input_len < 1:
            raise ValueError("--chat-long-fraction must be in [0, 1] and --chat-long-input-len >= 1")

    @property
    def label_dict(self) -> dict[str, str]:
        return dict(self.labels)

    @property
    def url(self) -> str:
        return self.base_url + BACKEND_PATHS[self.backend]
