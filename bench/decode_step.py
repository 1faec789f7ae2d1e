"""One decode step of the engine against the HBM roofline (run on a GPU).

    python bench/decode_step.py [--batch-size 128] [--context 1536] [--disable-cuda-graph]

Builds the ModelRunner on Llama-3.1-8B shapes (dummy weights), fills the KV of ``--batch-size``
sequences of ``--context`` tokens with random values on random pages, then times
  forward: the model forward + LM head (the captured graph's replay, or eager), device events;
  step:    ``ModelRunner.run(plan)``: batch building, forward, greedy sampling, the result on the host,
           one step after the other (the serial scheduler, ``--disable-overlap-schedule``);
  pipelined step: ``launch`` of step k+1 before reading step k's result, as the overlapped scheduler
           runs (its planning Python is not included; bench/offline_throughput.py has the whole engine).
Roofline: (every weight byte + every KV byte read once) / the copy bandwidth measured in this run.
"""

from __future__ import annotations

import sys
from pathlib import Path

# The repo root goes before bench/ (python puts a script's folder first): ``import pd_kernels`` must find
# the pd_kernels/ package, not bench/kernels.py.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import platform
import random
import tempfile
import time

import torch
import triton.testing
from model_shapes import write_config


def copy_gbs() -> float:
    src = torch.randn(1 << 30, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() * 2 / ms / 1e6


def build_runner(path: str, args: argparse.Namespace):  # -> ModelRunner
    from sglang_pd.model_runner import ModelRunner
    from sglang_pd.models.config import ModelConfig
    from sglang_pd.runtime_config import resolve_runtime
    from sglang_pd.server_args import ServerArgs

    pages_needed = args.batch_size * (-(-(args.context + 1) // 16)) + 16
    sargs = ServerArgs(
        model_path=path,
        load_format="dummy",
        page_size=16,
        max_total_tokens=pages_needed * 16,
        context_length=args.context_length,
        disable_cuda_graph=args.disable_cuda_graph,
        cuda_graph_max_bs=max(args.batch_size, 1),
        attention_backend=args.attention_backend,
    )
    config = ModelConfig.from_pretrained(path)
    return ModelRunner(sargs, config, resolve_runtime(sargs, config)), config


def decode_plan(runner, bs: int, ctx: int, vocab: int):  # -> BatchPlan
    from sglang_pd.sampling.params import SamplingParams
    from sglang_pd.sampling.sampler import SamplingRow
    from sglang_pd.scheduler.batch import BatchPlan, PlanItem

    rng = random.Random(0)
    per_seq = -(-(ctx + 1) // 16)
    pages = list(range(1, runner.num_pages + 1))
    rng.shuffle(pages)
    greedy = SamplingRow(params=SamplingParams(temperature=0.0, max_new_tokens=16), seed=0, step=0)
    items = tuple(
        PlanItem(
            token_ids=(rng.randrange(vocab),),
            start_pos=ctx,
            page_ids=tuple(pages[i * per_seq : (i + 1) * per_seq]),
            sampling=greedy,
        )
        for i in range(bs)
    )
    return BatchPlan(items)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--context", type=int, default=1536, help="KV tokens per sequence before the step")
    ap.add_argument("--context-length", type=int, default=None, help="server --context-length (graph page-table width)")
    ap.add_argument("--attention-backend", default=None)
    ap.add_argument("--disable-cuda-graph", action="store_true")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--output-file")
    args = ap.parse_args()
    torch.manual_seed(0)
    path = str(write_config(tempfile.mkdtemp(prefix="llama8b-")))
    ceiling = copy_gbs()
    runner, config = build_runner(path, args)
    runner.kv_cache.buffer.normal_()
    plan = decode_plan(runner, args.batch_size, args.context, config.vocab_size)
    from sglang_pd.forward_batch_builder import build_forward_batch

    with torch.inference_mode():
        batch, layout = build_forward_batch(plan, 16, runner.device)
        graphs = runner.graph_runner is not None and runner.graph_runner.can_run(batch, layout.sample_rows)
        fwd = (lambda: runner.graph_runner.replay(batch)) if graphs else (lambda: runner._forward_eager(batch))
        fwd_ms = triton.testing.do_bench(fwd, return_mode="median")
        for _ in range(3):
            runner.run(plan)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            runner.run(plan)
        step_ms = (time.perf_counter() - t0) / args.steps * 1e3
        pending = runner.launch(plan)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            following = runner.launch(plan)
            pending.result()
            pending = following
        pending.result()
        pipelined_ms = (time.perf_counter() - t0) / args.steps * 1e3
    weight_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    weight_bytes -= runner.model.model.embed_tokens.weight.numel() * 2  # the embedding reads bs rows only
    kv_bytes = args.batch_size * (args.context + 1) * runner.kv_cache.shape.bytes_per_token(runner.kv_cache.dtype)
    floor_ms = (weight_bytes + kv_bytes) / ceiling / 1e6
    record = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.node(),
        "gpu": torch.cuda.get_device_name(0),
        "batch_size": args.batch_size,
        "context": args.context,
        "cuda_graph": graphs,
        "attention_backend": runner.attn.name,
        "copy_gbs": ceiling,
        "weight_gb": weight_bytes / 1e9,
        "kv_gb": kv_bytes / 1e9,
        "roofline_ms": floor_ms,
        "forward_ms": fwd_ms,
        "step_ms": step_ms,
        "pipelined_step_ms": pipelined_ms,
        "forward_of_roofline": floor_ms / fwd_ms,
        "step_of_roofline": floor_ms / step_ms,
        "pipelined_step_of_roofline": floor_ms / pipelined_ms,
    }
    if args.output_file:
        with open(args.output_file, "a") as f:
            f.write(json.dumps(record) + "\n")
    print(json.dumps(record, indent=1))
    print(
        f"\nbs {args.batch_size} ctx {args.context} graphs={graphs}: roofline {floor_ms:.2f} ms, forward {fwd_ms:.2f} ms "
        f"({100 * floor_ms / fwd_ms:.1f}%), full step {step_ms:.2f} ms ({100 * floor_ms / step_ms:.1f}%), "
        f"pipelined step {pipelined_ms:.2f} ms ({100 * floor_ms / pipelined_ms:.1f}%)"
    )


if __name__ == "__main__":
    main()
