"""Kernels against the GPU's ceilings, measured in one run (run on an H200).

    python bench/kernels.py [--quick] [--output-file bench/results/kernels.jsonl]

1. Ceilings: HBM copy bandwidth (a large device-to-device copy, bytes read + written) and the bf16
   matmul rate (8192^3 through torch), both on random data.
2. Decode attention (Llama-3.1-8B heads: 32 q, 8 kv, head_dim 128, bf16, page 16) over a
   batch x context grid: achieved bytes/s (K and V read once, q read, out written) / copy ceiling.
3. Prefill attention over fresh causal prompts, same heads: TFLOP/s of ours and of torch's
   ``scaled_dot_product_attention`` on the same shapes (contiguous K/V for torch, paged for ours).
4. The pointwise kernels (RMSNorm + residual, rotary, SiLU-and-mul, KV store, KV pack) as a fraction
   of the copy ceiling.

Times are medians of ``triton.testing.do_bench`` (it clears L2 between runs). Prints a table last.
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
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
import triton.testing

H, HKV, D, PAGE = 32, 8, 128, 16
DT = torch.bfloat16


@dataclass(frozen=True)
class Row:
    what: str
    shape: str
    ms: float
    achieved: float  # GB/s or TFLOP/s
    unit: str
    ceiling_fraction: float | None  # of the copy / matmul ceiling
    peer: float | None = None  # torch's figure on the same shape, same unit
    note: str = ""


def bench_ms(fn: Callable[[], object]) -> float:
    return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))


def copy_ceiling_gbs() -> float:
    src = torch.randn(1 << 30, dtype=DT, device="cuda")  # 2 GiB
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / ms / 1e6


def matmul_ceiling_tflops() -> float:
    a = torch.randn(8192, 8192, dtype=DT, device="cuda")
    b = torch.randn(8192, 8192, dtype=DT, device="cuda")
    ms = bench_ms(lambda: a @ b)
    return 2 * 8192**3 / ms / 1e9


def paged_pool(num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random K and V slot views [slots, HKV, D] with room for ``num_tokens`` plus the null page."""
    slots = (num_tokens // PAGE + 1) * PAGE
    kv = torch.randn(2, slots, HKV, D, dtype=DT, device="cuda")
    return kv[0], kv[1]


def random_page_table(bs: int, ctx: int) -> torch.Tensor:
    pages = -(-ctx // PAGE)
    perm = torch.randperm(bs * pages, device="cuda") + 1  # page 0 is the null page
    return perm.view(bs, pages).to(torch.int32)


def decode_rows(copy_gbs: float, grid: list[tuple[int, int]]) -> list[Row]:
    from pd_kernels.decode_attention import decode_attention, default_num_kv_splits

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for bs, ctx in grid:
        k, v = paged_pool(bs * ctx + PAGE * bs)
        table = random_page_table(bs, ctx)
        lens = torch.full((bs,), ctx, dtype=torch.int32, device="cuda")
        q = torch.randn(bs, H, D, dtype=DT, device="cuda")
        splits = default_num_kv_splits(bs, HKV, ctx, sms)
        ms = bench_ms(lambda: decode_attention(q, k, v, table, lens, PAGE, D**-0.5, num_kv_splits=splits))
        nbytes = 2 * bs * ctx * HKV * D * 2 + 2 * q.numel() * 2
        gbs = nbytes / ms / 1e6
        rows.append(
            Row("decode attention", f"bs {bs} x ctx {ctx}", ms, gbs, "GB/s", gbs / copy_gbs, note=f"splits {splits}")
        )
    return rows


def prefill_rows(mm_tflops: float, shapes: list[tuple[int, int]]) -> list[Row]:
    from pd_kernels.extend_attention import extend_attention

    rows = []
    for bs, n in shapes:
        k, v = paged_pool(bs * n + PAGE * bs)
        table = random_page_table(bs, n)
        lens = torch.full((bs,), n, dtype=torch.int32, device="cuda")
        starts = torch.arange(bs, dtype=torch.int32, device="cuda") * n
        q = torch.randn(bs * n, H, D, dtype=DT, device="cuda")
        ours = bench_ms(lambda: extend_attention(q, k, v, table, lens, lens, starts, PAGE, D**-0.5, n))
        qt = q.view(bs, n, H, D).transpose(1, 2).contiguous()
        kt = torch.randn(bs, HKV, n, D, dtype=DT, device="cuda")
        vt = torch.randn_like(kt)
        theirs = bench_ms(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True))
        flops = 4 * bs * H * D * n * n / 2  # causal: half the score matrix
        t_ours, t_torch = flops / ours / 1e9, flops / theirs / 1e9
        rows.append(
            Row(
                "prefill attention",
                f"bs {bs} x {n}",
                ours,
                t_ours,
                "TFLOP/s",
                t_ours / mm_tflops,
                peer=t_torch,
                note=f"torch sdpa {theirs:.3f} ms",
            )
        )
    return rows


def pointwise_rows(copy_gbs: float, tokens: int) -> list[Row]:
    from pd_kernels.activation import silu_and_mul
    from pd_kernels.kv_pack import pack_pages
    from pd_kernels.kv_store import store_kv
    from pd_kernels.rmsnorm import rms_norm
    from pd_kernels.rotary import apply_rotary

    hidden, inter = 4096, 14336
    x = torch.randn(tokens, hidden, dtype=DT, device="cuda")
    res = torch.randn_like(x)
    w = torch.randn(hidden, dtype=DT, device="cuda")
    gu = torch.randn(tokens, 2 * inter, dtype=DT, device="cuda")
    qkv = torch.randn(tokens, (H + 2 * HKV) * D, dtype=DT, device="cuda")
    q = qkv[:, : H * D].view(tokens, H, D)
    kk = qkv[:, H * D : (H + HKV) * D].view(tokens, HKV, D)
    vv = qkv[:, (H + HKV) * D :].view(tokens, HKV, D)
    pos = torch.randint(0, 8192, (tokens,), device="cuda")
    inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device="cuda").float() / D))
    ang = torch.arange(8192, device="cuda").float()[:, None] * inv[None]
    cos, sin = ang.cos(), ang.sin()
    kc, vc = paged_pool(4 * tokens)
    slots = torch.randperm(kc.shape[0] - PAGE, device="cuda")[:tokens] + PAGE
    kv_buf = torch.randn(32, 2, 4096 + 1, PAGE, HKV, D, dtype=DT, device="cuda")  # 32 layers, 64k tokens
    pages = torch.randperm(4096, device="cuda")[:512] + 1
    staging = torch.empty(32 * 2 * 512 * PAGE * HKV * D, dtype=DT, device="cuda")
    e = 2  # bytes per bf16 element
    cases = [
        ("rmsnorm + residual", f"{tokens} x {hidden}", lambda: rms_norm(x, w, 1e-5, res), 4 * x.numel() * e),
        (
            "rotary q,k",
            f"{tokens} tok, {H}+{HKV} heads",
            lambda: apply_rotary(q, kk, pos, cos, sin),
            2 * (q.numel() + kk.numel()) * e,
        ),
        ("silu_and_mul", f"{tokens} x {inter}", lambda: silu_and_mul(gu), gu.numel() * e * 3 // 2),
        ("kv store", f"{tokens} tok", lambda: store_kv(kc, vc, slots, kk, vv), 4 * kk.numel() * e),
        ("kv pack", "512 pages x 32 layers", lambda: pack_pages(kv_buf, pages, staging), 2 * staging.numel() * e),
    ]
    rows = []
    for what, shape, fn, nbytes in cases:
        ms = bench_ms(fn)
        gbs = nbytes / ms / 1e6
        rows.append(Row(what, shape, ms, gbs, "GB/s", gbs / copy_gbs))
    return rows


def print_table(copy_gbs: float, mm: float, rows: list[Row]) -> None:
    print(f"\nceilings: HBM copy {copy_gbs:.0f} GB/s (read + write), bf16 matmul {mm:.0f} TFLOP/s")
    print(f"{'what':<20}{'shape':<26}{'ms':>9}{'achieved':>11}{'unit':>9}{'of ceiling':>12}{'torch':>9}  note")
    for r in rows:
        peer = f"{r.peer:.0f}" if r.peer is not None else "-"
        frac = f"{100 * r.ceiling_fraction:.1f}%" if r.ceiling_fraction is not None else "-"
        print(f"{r.what:<20}{r.shape:<26}{r.ms:>9.3f}{r.achieved:>11.1f}{r.unit:>9}{frac:>12}{peer:>9}  {r.note}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smaller grid")
    ap.add_argument("--output-file")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/kernels.py needs a CUDA GPU")
    torch.manual_seed(0)
    copy_gbs, mm = copy_ceiling_gbs(), matmul_ceiling_tflops()
    grid = (
        [(64, 4096), (1, 1024), (128, 1536)]
        if args.quick
        else [(1, 1024), (1, 8192), (8, 4096), (32, 1024), (64, 4096), (128, 1536), (256, 1024), (16, 32768)]
    )
    shapes = [(1, 2048), (4, 2048)] if args.quick else [(1, 2048), (4, 2048), (1, 8192), (16, 512)]
    rows = decode_rows(copy_gbs, grid) + prefill_rows(mm, shapes) + pointwise_rows(copy_gbs, 8192)
    if args.output_file:
        record = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": platform.node(),
            "gpu": torch.cuda.get_device_name(0),
            "torch": torch.__version__,
            "triton": triton.__version__,
            "copy_gbs": copy_gbs,
            "matmul_tflops": mm,
            "rows": [asdict(r) for r in rows],
        }
        with open(args.output_file, "a") as f:
            f.write(json.dumps(record) + "\n")
    print_table(copy_gbs, mm, rows)


if __name__ == "__main__":
    main()
