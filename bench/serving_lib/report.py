"""The printed result table (SGLang's layout) and the one-JSON-line-per-run record."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .config import BenchConfig
from .metrics import BenchMetrics, Distribution
from .records import RequestRecord

WIDTH = 50
MAX_ERROR_KINDS = 5
DISTRIBUTIONS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    # (BenchMetrics field, JSON key stem, table title, statistics printed)
    ("e2e_latency", "e2e_latency", "End-to-End Latency", ("mean", "median", "p90", "p99")),
    ("ttft", "ttft", "Time to First Token", ("mean", "median", "p90", "p99")),
    ("tpot", "tpot", "Time per Output Token (excl. 1st token)", ("mean", "median", "p90", "p99")),
    ("itl", "itl", "Inter-Token Latency", ("mean", "median", "p90", "p95", "p99", "max")),
)
LABELS: Mapping[str, str] = MappingProxyType(
    {"e2e_latency": "E2E Latency", "ttft": "TTFT", "tpot": "TPOT", "itl": "ITL"}
)


def _row(label: str, value: Any) -> str:
    if value is None:
        text = "n/a"
    elif isinstance(value, float):
        text = f"{value:.2f}"
    else:
        text = str(value)
    return f"{label:<40} {text:<10}"


def summarize_errors(records: Sequence[RequestRecord]) -> list[dict[str, Any]]:
    """The most frequent failure messages with their counts."""
    counts = Counter(r.error for r in records if not r.success)
    return [{"message": m, "count": c} for m, c in counts.most_common(MAX_ERROR_KINDS)]


def format_table(cfg: BenchConfig, m: BenchMetrics, errors: Sequence[dict[str, Any]] = ()) -> str:
    lines = ["{:=^{w}}".format(" Serving Benchmark Result ", w=WIDTH)]
    if cfg.tag:
        lines.append(_row("Tag:", cfg.tag))
    lines += [
        _row("Backend:", cfg.backend),
        _row("Dataset:", cfg.dataset_name),
        _row("Traffic request rate:", "inf" if math.isinf(cfg.request_rate) else cfg.request_rate),
        _row("Max request concurrency:", cfg.max_concurrency or "not set"),
        _row("Successful requests:", m.completed),
        _row("Failed requests:", m.failed),
        _row("Benchmark duration (s):", m.duration),
        _row("Total input tokens:", m.total_input_tokens),
        _row("Total generated tokens:", m.total_output_tokens),
    ]
    if m.total_output_tokens_retokenized is not None:
        lines.append(_row("Total generated tokens (retokenized):", m.total_output_tokens_retokenized))
    lines += [
        _row("Request throughput (req/s):", m.request_throughput),
    ]
    if m.goodput is not None and cfg.slo is not None:
        lines += [
            _row("Request goodput (req/s):", m.goodput.request_goodput),
            _row("SLO attainment (%):", m.goodput.attainment_pct),
            _row("Goodput SLO:", cfg.slo.describe()),
        ]
    lines += [
        _row("Input token throughput (tok/s):", m.input_throughput),
        _row("Output token throughput (tok/s):", m.output_throughput),
        _row("Total token throughput (tok/s):", m.total_throughput),
        _row("Concurrency:", m.concurrency),
    ]
    for field, _, title, stats in DISTRIBUTIONS:
        dist: Distribution = getattr(m, field)
        lines.append("{:-^{w}}".format(title, w=WIDTH))
        for stat in stats:
            name = stat.capitalize() if stat in ("mean", "median", "max") else stat.upper()
            lines.append(_row(f"{name} {LABELS[field]} (ms):", getattr(dist, stat)))
    lines.append("=" * WIDTH)
    for err in errors:
        lines.append(f"error x{err['count']}: {err['message']}")
    return "\n".join(lines)


def result_json(
    cfg: BenchConfig,
    model: str | None,
    m: BenchMetrics,
    errors: Sequence[dict[str, Any]] = (),
    flush_status: str | None = None,
) -> dict[str, Any]:
    """Config + every metric, flat; non-finite numbers become JSON-safe (``"inf"`` / null).

    ``tag`` and ``labels`` name the run in sweeps (plots.py draws one line per tag); ``request_rate``
    is its x value. Goodput keys (``request_goodput``, ``slo_attainment_pct``, ``good_requests``,
    ``goodput_slo``) are null without ``--goodput``.
    """
    out: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "tag": cfg.tag,
        "labels": cfg.label_dict,
        "backend": cfg.backend,
        "base_url": cfg.base_url,
        "model": model,
        "tokenizer": cfg.tokenizer,
        "dataset_name": cfg.dataset_name,
        "num_prompts": cfg.num_prompts,
        "random_input_len": cfg.random_input_len,
        "random_output_len": cfg.random_output_len,
        "random_range_ratio": cfg.random_range_ratio,
        "request_rate": "inf" if math.isinf(cfg.request_rate) else cfg.request_rate,
        "max_concurrency": cfg.max_concurrency,
        "seed": cfg.seed,
        "stream": cfg.stream,
        "ignore_eos": cfg.ignore_eos,
        "warmup_requests": cfg.warmup_requests,
        "burstiness": cfg.burstiness,
        "flush_cache": flush_status,
    }
    out.update(_dataset_params(cfg))
    scalars = {k: v for k, v in asdict(m).items() if not isinstance(v, dict) and k != "goodput"}
    out.update(scalars)
    out.update(
        m.goodput.as_json(cfg.slo)
        if m.goodput is not None and cfg.slo is not None
        else {"goodput_slo": None, "good_requests": None, "request_goodput": None, "slo_attainment_pct": None}
    )
    for field, stem, _, _ in DISTRIBUTIONS:
        dist: Distribution = getattr(m, field)
        for stat in ("mean", "median", "std", "p90", "p95", "p99", "max"):
            out[f"{stat}_{stem}_ms"] = getattr(dist, stat)
    out["errors"] = list(errors)
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}


def _dataset_params(cfg: BenchConfig) -> dict[str, Any]:
    if cfg.dataset_name == "generated-shared-prefix":
        return {
            "gsp_num_groups": cfg.gsp_num_groups,
            "gsp_prompts_per_group": cfg.gsp_prompts_per_group,
            "gsp_system_prompt_len": cfg.gsp_system_prompt_len,
            "gsp_question_len": cfg.gsp_question_len,
            "gsp_output_len": cfg.gsp_output_len,
        }
    if cfg.dataset_name == "chat-synthetic":
        return {"chat_long_fraction": cfg.chat_long_fraction, "chat_long_input_len": cfg.chat_long_input_len}
    return {}


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append ``record`` as one strict-JSON line (no NaN/Infinity)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, allow_nan=False) + "\n")
