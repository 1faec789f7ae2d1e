"""Online serving benchmark against a running server (SGLang's ``bench_serving``, first version).

    python bench/serving.py --base-url http://127.0.0.1:30000 --backend sglang \
        --dataset-name random-ids --random-input-len 1024 --random-output-len 256 \
        --num-prompts 200 --request-rate 8 --max-concurrency 64 --output-file bench/results/serving.jsonl

Backends: sglang (POST /generate), openai (POST /v1/completions), openai-chat
(POST /v1/chat/completions); the openai ones work against any OpenAI-compatible server.
Datasets: random (text; needs --tokenizer), random-ids, generated-shared-prefix (--gsp-*: groups
sharing a long system prompt), chat-synthetic (ShareGPT-like lognormal lengths, no download; see
serving_lib/chat_synthetic.py). Arrivals: Poisson at --request-rate (gamma with --burstiness != 1).
--flush-cache posts /flush_cache between warm-up and the run (skipped with a warning where the
server has no such route). --goodput ttft:MS tpot:MS [e2e:MS] [itl:MS] [itl_p99:MS] reports goodput
and SLO attainment (definitions in serving_lib/slo.py; itl bounds a request's largest gap).
Prints SGLang's result table; --output-file appends one JSON line per run (config + metrics),
named by --tag / --label for sweeps; --plot DIR writes latency CDFs of the run (and, with
--output-file, the sweep charts of that file: python -m bench.serving_lib.plots draws them too).
Exit status: 0 when at least one request succeeded, 1 otherwise (or when warm-up failed).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import re
import sys
from pathlib import Path

if __package__:  # python -m bench.serving
    from .serving_lib import plots
    from .serving_lib.config import BACKENDS, DATASETS, BenchConfig
    from .serving_lib.metrics import compute_metrics
    from .serving_lib.report import append_jsonl, format_table, result_json, summarize_errors
    from .serving_lib.runner import RunResult, run_benchmark
    from .serving_lib.slo import parse_slo
else:  # python bench/serving.py (bench/ is sys.path[0] then), or imported as ``serving`` by tests
    if str(Path(__file__).resolve().parent) not in sys.path:
        sys.path.append(str(Path(__file__).resolve().parent))  # last: bench/kernels.py must not shadow pd_kernels/
    from serving_lib import plots
    from serving_lib.config import BACKENDS, DATASETS, BenchConfig
    from serving_lib.metrics import compute_metrics
    from serving_lib.report import append_jsonl, format_table, result_json, summarize_errors
    from serving_lib.runner import RunResult, run_benchmark
    from serving_lib.slo import parse_slo


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", help="http://HOST:PORT (wins over --host/--port)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--backend", choices=BACKENDS, default="sglang")
    p.add_argument("--model", help="model name sent to OpenAI routes (default: first id of GET /v1/models)")
    p.add_argument("--tokenizer", help="HF tokenizer dir: builds text prompts, counts generated tokens")
    p.add_argument("--dataset-name", choices=DATASETS, help="default: random with --tokenizer, random-ids without")
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=1024)
    p.add_argument("--random-range-ratio", type=float, default=0.0, help="lengths uniform in [len * ratio, len]")
    p.add_argument(
        "--random-vocab-size", type=int, help="random-ids drawn from [0, N) (default: the tokenizer's vocab, else 256)"
    )
    p.add_argument(
        "--num-prompts",
        type=int,
        default=1000,
        help="requests to send (generated-shared-prefix: groups x prompts per group instead)",
    )
    g = p.add_argument_group("generated-shared-prefix")
    g.add_argument("--gsp-num-groups", type=int, default=64)
    g.add_argument("--gsp-prompts-per-group", type=int, default=16)
    g.add_argument("--gsp-system-prompt-len", type=int, default=2048)
    g.add_argument("--gsp-question-len", type=int, default=128)
    g.add_argument("--gsp-output-len", type=int, default=256)
    c = p.add_argument_group("chat-synthetic (lengths clamped to --random-input-len / --random-output-len)")
    c.add_argument(
        "--chat-long-fraction",
        type=float,
        default=0.0,
        help="share of long-document requests mixed in (input uniform in [L/2, L])",
    )
    c.add_argument("--chat-long-input-len", type=int, default=8192, help="L of --chat-long-fraction")
    p.add_argument(
        "--request-rate", type=float, default=float("inf"), help="Poisson arrivals, requests/s; inf sends all at once"
    )
    p.add_argument(
        "--burstiness",
        type=float,
        default=1.0,
        help="gamma shape of the arrival gaps: 1 Poisson, < 1 burstier, > 1 more regular",
    )
    p.add_argument("--max-concurrency", type=int, help="at most this many requests in flight")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--disable-stream", action="store_true")
    p.add_argument("--disable-ignore-eos", action="store_true")
    p.add_argument("--warmup-requests", type=int, default=1)
    p.add_argument("--request-timeout", type=float, default=3600.0, help="seconds per request")
    p.add_argument("--flush-cache", action="store_true", help="POST /flush_cache after warm-up")
    p.add_argument(
        "--goodput",
        nargs="+",
        metavar="KEY:MS",
        help="SLO: ttft, tpot, e2e, itl (a request's largest gap), itl_p99 bounds in ms",
    )
    p.add_argument("--output-file", help="append one JSON line per run")
    p.add_argument("--tag", help="name of this run's series in sweep charts (e.g. pd, colocated)")
    p.add_argument(
        "--label", action="append", default=[], metavar="KEY=VALUE", help="extra label in the JSON line (repeatable)"
    )
    p.add_argument("--plot", metavar="DIR", help="write PNG charts (needs matplotlib)")
    p.add_argument("--disable-tqdm", action="store_true")
    p.add_argument(
        "--api-key",
        default=os.environ.get("OPENAI_API_KEY"),
        help="sent as 'Authorization: Bearer KEY' (default: $OPENAI_API_KEY)",
    )
    return p


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    base_url = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    dataset = args.dataset_name or ("random" if args.tokenizer else "random-ids")
    if dataset == "generated-shared-prefix":  # SGLang's rule: the groups decide the count
        args.num_prompts = args.gsp_num_groups * args.gsp_prompts_per_group
    return BenchConfig(
        base_url=base_url,
        backend=args.backend,
        model=args.model,
        tokenizer=args.tokenizer,
        dataset_name=dataset,
        random_input_len=args.random_input_len,
        random_output_len=args.random_output_len,
        random_range_ratio=args.random_range_ratio,
        random_vocab_size=args.random_vocab_size,
        num_prompts=args.num_prompts,
        request_rate=args.request_rate,
        max_concurrency=args.max_concurrency,
        seed=args.seed,
        stream=not args.disable_stream,
        ignore_eos=not args.disable_ignore_eos,
        warmup_requests=args.warmup_requests,
        request_timeout_s=args.request_timeout,
        output_file=args.output_file,
        disable_tqdm=args.disable_tqdm,
        api_key=args.api_key,
        burstiness=args.burstiness,
        gsp_num_groups=args.gsp_num_groups,
        gsp_prompts_per_group=args.gsp_prompts_per_group,
        gsp_system_prompt_len=args.gsp_system_prompt_len,
        gsp_question_len=args.gsp_question_len,
        gsp_output_len=args.gsp_output_len,
        chat_long_fraction=args.chat_long_fraction,
        chat_long_input_len=args.chat_long_input_len,
        flush_cache=args.flush_cache,
        slo=parse_slo(args.goodput) if args.goodput else None,
        tag=args.tag,
        labels=parse_labels(args.label),
        plot_dir=args.plot,
    )


def parse_labels(items: list[str]) -> tuple[tuple[str, str], ...]:
    labels = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--label takes KEY=VALUE, got {item!r}")
        labels.append((key, value))
    return tuple(labels)


def check_plotting() -> None:
    """Fail before the run, not after it, when --plot cannot work."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install matplotlib (or pip install -e '.[dev]')") from None


def write_plots(cfg: BenchConfig, result: RunResult) -> None:
    """CDFs of this run; with --output-file, the sweep charts of its rows that carry this run's labels."""
    assert cfg.plot_dir is not None
    rate = "inf" if math.isinf(cfg.request_rate) else f"{cfg.request_rate:g}"
    labels = [re.sub(r"[^A-Za-z0-9.-]+", "-", v)[:32] for _, v in cfg.labels]  # file-name safe
    stem = "_".join([cfg.tag or "run", *labels, f"rate{rate}"])
    try:
        written = plots.plot_run_cdfs(result.records, cfg.plot_dir, stem, title=stem)
        if cfg.output_file:
            rows = plots.select_rows(plots.load_rows([cfg.output_file]), {f"labels.{k}": v for k, v in cfg.labels})
            written += plots.plot_sweep(rows, cfg.plot_dir, "".join(f"{v}_" for v in labels), " ".join(labels))
    except (RuntimeError, OSError, ValueError) as exc:
        print(f"error: --plot: {exc}", file=sys.stderr)
        return
    for path in written:
        print(f"wrote {path}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
        if cfg.plot_dir:
            check_plotting()
    except ValueError as exc:
        parser.error(str(exc))
    try:
        result = asyncio.run(run_benchmark(cfg))
    except (RuntimeError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    metrics = compute_metrics(result.records, result.duration, cfg.slo)
    errors = summarize_errors(result.records)
    print(format_table(cfg, metrics, errors), flush=True)
    if cfg.output_file:
        append_jsonl(cfg.output_file, result_json(cfg, result.model, metrics, errors, result.flush_status))
    if cfg.plot_dir:
        write_plots(cfg, result)
    return 0 if metrics.completed > 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
