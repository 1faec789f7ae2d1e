"""Online serving benchmark against a running server (SGLang's ``bench_serving``, first version).

    python bench/serving.py --base-url http://127.0.0.1:30000 --backend sglang \
        --dataset-name random-ids --random-input-len 1024 --random-output-len 256 \
        --num-prompts 200 --request-rate 8 --max-concurrency 64 --output-file bench/results/serving.jsonl

Backends: sglang (POST /generate), openai (POST /v1/completions), openai-chat
(POST /v1/chat/completions); the openai ones work against any OpenAI-compatible server.
Prints SGLang's result table; --output-file appends one JSON line per run (config + metrics).
Exit status: 0 when at least one request succeeded, 1 otherwise (or when warm-up failed).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

if __package__:  # python -m bench.serving
    from .serving_lib.config import BACKENDS, DATASETS, BenchConfig
    from .serving_lib.metrics import compute_metrics
    from .serving_lib.report import append_jsonl, format_table, result_json, summarize_errors
    from .serving_lib.runner import run_benchmark
else:  # python bench/serving.py
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from serving_lib.config import BACKENDS, DATASETS, BenchConfig
    from serving_lib.metrics import compute_metrics
    from serving_lib.report import append_jsonl, format_table, result_json, summarize_errors
    from serving_lib.runner import run_benchmark


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", help="http://HOST:PORT (wins over --host/--port)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--backend", choices=BACKENDS, default="sglang")
    p.add_argument("--model", help="model name sent to OpenAI routes (default: first id of GET /v1/models)")
    p.add_argument("--tokenizer", help="HF tokenizer dir: builds text prompts, counts generated tokens")
    p.add_argument("--dataset-name", choices=DATASETS,
                   help="default: random with --tokenizer, random-ids without")
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=1024)
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths uniform in [len * ratio, len]")
    p.add_argument("--random-vocab-size", type=int,
                   help="random-ids drawn from [0, N) (default: the tokenizer's vocab, else 256)")
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="Poisson arrivals, requests/s; inf sends all at once")
    p.add_argument("--max-concurrency", type=int, help="at most this many requests in flight")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--disable-stream", action="store_true")
    p.add_argument("--disable-ignore-eos", action="store_true")
    p.add_argument("--warmup-requests", type=int, default=1)
    p.add_argument("--request-timeout", type=float, default=3600.0, help="seconds per request")
    p.add_argument("--output-file", help="append one JSON line per run")
    p.add_argument("--disable-tqdm", action="store_true")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                   help="sent as 'Authorization: Bearer KEY' (default: $OPENAI_API_KEY)")
    return p


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    base_url = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    dataset = args.dataset_name or ("random" if args.tokenizer else "random-ids")
    return BenchConfig(
        base_url=base_url, backend=args.backend, model=args.model, tokenizer=args.tokenizer,
        dataset_name=dataset, random_input_len=args.random_input_len,
        random_output_len=args.random_output_len, random_range_ratio=args.random_range_ratio,
        random_vocab_size=args.random_vocab_size, num_prompts=args.num_prompts,
        request_rate=args.request_rate, max_concurrency=args.max_concurrency, seed=args.seed,
        stream=not args.disable_stream, ignore_eos=not args.disable_ignore_eos,
        warmup_requests=args.warmup_requests, request_timeout_s=args.request_timeout,
        output_file=args.output_file, disable_tqdm=args.disable_tqdm, api_key=args.api_key,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        result = asyncio.run(run_benchmark(cfg))
    except (RuntimeError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    metrics = compute_metrics(result.records, result.duration)
    errors = summarize_errors(result.records)
    print(format_table(cfg, metrics, errors), flush=True)
    if cfg.output_file:
        append_jsonl(cfg.output_file, result_json(cfg, result.model, metrics, errors))
    return 0 if metrics.completed > 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
