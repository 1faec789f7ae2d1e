"""Offline throughput: the same random prompts through our Engine and through transformers' generate.

    python bench/offline_throughput.py --model-path DIR [--load-format dummy] \
        --num-prompts 64 --random-input-len 128 --random-output-len 64 [--hf-num-prompts 16]
    python bench/offline_throughput.py --tiny llama     # makes a tiny checkpoint first (CPU smoke run)
    python bench/offline_throughput.py --shape llama-3.1-8b --num-prompts 1000 --random-input-len 1024 \
        --random-output-len 1024 --hf-num-prompts 64 --itl --prefill      # the GPU run (dummy weights)

Prints output tokens/s of both and the ratio, and appends a JSON line with --output-file.
``--itl``: batch-1 inter-token latency at 1k context (one 1024-token prompt; (time for 257 tokens -
time for 1) / 256). ``--prefill``: prompt tokens/s over 2048-token prompts with one output token each.
Both sides see the same prompts (token ids) and generate exactly --random-output-len tokens each
(EOS ignored), greedy.
"""

from __future__ import annotations

import sys
from pathlib import Path

# The repo root goes before bench/ (python puts a script's folder first): ``import pd_kernels`` must find
# the pd_kernels/ package, not bench/kernels.py.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import logging
import platform
import random
import tempfile
import time
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    output_len: int


@dataclass(frozen=True)
class Measurement:
    system: str
    num_prompts: int
    output_tokens: int
    seconds: float

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.seconds


def make_workload(vocab: int, n: int, in_len: int, out_len: int, ratio: float, seed: int) -> Workload:
    rng = random.Random(seed)
    lo = max(1, int(in_len * ratio))
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(lo, in_len))] for _ in range(n)]
    return Workload(prompts, out_len)


def timed_generate(engine: object, prompts: list[list[int]], max_new_tokens: int) -> tuple[float, int]:
    """(seconds, output tokens) of one greedy generate call over ``prompts`` on a flushed cache."""
    engine.flush_cache()
    sp = {"temperature": 0, "max_new_tokens": max_new_tokens, "ignore_eos": True}
    t0 = time.perf_counter()
    outs = engine.generate(input_ids=prompts, sampling_params=sp)
    return time.perf_counter() - t0, sum(len(o["output_ids"]) for o in outs)


def run_ours(engine: object, work: Workload) -> Measurement:
    timed_generate(engine, work.prompts[:2], 4)  # warm-up
    dt, tokens = timed_generate(engine, work.prompts, work.output_len)
    return Measurement("sglang_pd", len(work.prompts), tokens, dt)


def batch1_itl_ms(engine: object, vocab: int, context: int = 1024, steps: int = 256) -> float:
    """Inter-token latency of one request at ``context`` tokens: (T(steps + 1 tokens) - T(1 token)) / steps."""
    prompt = make_workload(vocab, 1, context, 1, 1.0, seed=1).prompts
    timed_generate(engine, prompt, 8)  # warm-up
    first, _ = timed_generate(engine, prompt, 1)
    full, _ = timed_generate(engine, prompt, steps + 1)
    return (full - first) / steps * 1e3


def prefill_tok_s(engine: object, vocab: int, prompt_len: int = 2048, n: int = 64) -> float:
    """Prompt tokens/s over ``n`` prompts of ``prompt_len`` tokens, one output token each."""
    prompts = make_workload(vocab, n, prompt_len, 1, 1.0, seed=2).prompts
    timed_generate(engine, prompts[:4], 1)  # warm-up
    dt, _ = timed_generate(engine, prompts, 1)
    return n * prompt_len / dt


def run_transformers(
    path: str, load_format: str, dtype: torch.dtype, device: str, work: Workload, batch: int
) -> Measurement:
    from transformers import AutoConfig, AutoModelForCausalLM

    if load_format == "dummy":
        with torch.device(device):  # random init on the GPU: an 8B model initialised on the CPU takes minutes
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model = model.to(device).eval()
    tokens = 0
    t0 = time.perf_counter()
    for i in range(0, len(work.prompts), batch):
        tokens += _hf_batch(model, work.prompts[i : i + batch], work.output_len, device)
    sync(device)
    return Measurement("transformers", len(work.prompts), tokens, time.perf_counter() - t0)


@torch.inference_mode()
def _hf_batch(model: torch.nn.Module, prompts: list[list[int]], out_len: int, device: str) -> int:
    width = max(len(p) for p in prompts)
    pad = 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)  # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=out_len,
        min_new_tokens=out_len,
        do_sample=False,
        pad_token_id=pad,
        eos_token_id=None,
    )
    return int(out.shape[0] * (out.shape[1] - width))


def sync(device: str) -> None:
    if torch.cuda.is_available() and device != "cpu":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path")
    ap.add_argument("--tiny", choices=("llama", "mistral", "qwen2", "qwen3"), help="make a tiny checkpoint and use it")
    ap.add_argument(
        "--shape", choices=("llama-3.1-8b",), help="a config-only checkpoint of this shape (implies dummy weights)"
    )
    ap.add_argument("--itl", action="store_true", help="also measure batch-1 inter-token latency at 1k context")
    ap.add_argument("--prefill", action="store_true", help="also measure prefill tokens/s on 2048-token prompts")
    ap.add_argument("--load-format", default="auto", choices=("auto", "dummy"))
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--hf-num-prompts", type=int, default=None, help="prompts for transformers (default: all)")
    ap.add_argument("--hf-batch-size", type=int, default=64)
    ap.add_argument("--random-input-len", type=int, default=128)
    ap.add_argument("--random-output-len", type=int, default=64)
    ap.add_argument("--random-range-ratio", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument(
        "--engine-arg", action="append", default=[], metavar="KEY=VALUE", help="extra Engine kwargs (JSON values)"
    )
    ap.add_argument("--output-file")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")  # the engine's batch lines

    path = args.model_path
    if args.tiny:
        from sglang_pd.tools.make_tiny_model import make_tiny_model

        path = str(make_tiny_model(tempfile.mkdtemp(prefix="tiny-"), arch=args.tiny))
    if args.shape:
        from model_shapes import write_config

        path, args.load_format = str(write_config(tempfile.mkdtemp(prefix="shape-"), args.shape)), "dummy"
    if not path:
        ap.error("--model-path, --tiny or --shape is required")
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(path)
    vocab = hf_config.vocab_size
    work = make_workload(
        vocab, args.num_prompts, args.random_input_len, args.random_output_len, args.random_range_ratio, args.seed
    )
    extra = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in args.engine_arg)}
    kwargs = {"model_path": path, "load_format": args.load_format, "dtype": args.dtype, "device": args.device, **extra}
    from sglang_pd import Engine

    engine = Engine(**kwargs)
    ours = run_ours(engine, work)
    print(f"sglang_pd: {ours.output_tok_s:.1f} out tok/s over {ours.seconds:.1f} s", flush=True)
    extra_metrics: dict[str, float] = {}
    if args.itl:
        extra_metrics["batch1_itl_ms_1k_ctx"] = batch1_itl_ms(engine, vocab)
    if args.prefill:
        prompt_len = min(2048, hf_config.max_position_embeddings - 1)  # tiny models stop at 2048
        extra_metrics[f"prefill_tok_s_{prompt_len}"] = prefill_tok_s(engine, vocab, prompt_len)
    engine.shutdown()
    device = "cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
    dtype = {
        "auto": torch.bfloat16 if device == "cuda" else torch.float32,
        "float32": torch.float32,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
    }[args.dtype]
    results = [ours]
    if not args.skip_hf:
        hf_work = Workload(work.prompts[: args.hf_num_prompts or len(work.prompts)], work.output_len)
        results.append(run_transformers(path, args.load_format, dtype, device, hf_work, args.hf_batch_size))
    print(f"{'system':<14}{'prompts':>8}{'out tokens':>12}{'seconds':>10}{'out tok/s':>12}")
    for m in results:
        print(f"{m.system:<14}{m.num_prompts:>8}{m.output_tokens:>12}{m.seconds:>10.2f}{m.output_tok_s:>12.1f}")
    ratio = ours.output_tok_s / results[1].output_tok_s if len(results) > 1 else None
    if ratio is not None:
        print(f"ratio sglang_pd / transformers: {ratio:.2f}x")
    for name, value in extra_metrics.items():
        print(f"{name}: {value:.2f}")
    if args.output_file:
        record = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": platform.node(),
            "device": device,
            "args": vars(args),
            "results": [asdict(m) | {"output_tok_s": m.output_tok_s} for m in results],
            "ratio": ratio,
            **extra_metrics,
        }
        with open(args.output_file, "a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
