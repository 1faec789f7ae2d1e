"""Peer page-copy bandwidth of pd_kernels/kv_copy.py on 2 GPUs (one process): pull (the kernel on GPU 1 reads GPU 0's
pool, as D does on a direct link) and push (the kernel on GPU 0 writes GPU 1's pool), over block sizes and warp
counts, against torch's contiguous GPU0 -> GPU1 copy of the same bytes. Llama-3.1-8B pages, random page ids.

    python bench/kv_copy_peer.py
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root first: pd_kernels/ is a package

import torch

from pd_kernels.kv_copy import RawPages, _pages_to_pages_kernel

LAYERS, HEADS, HEAD_DIM, PAGE, POOL = 32, 8, 128, 16, 1200
ELEMS = PAGE * HEADS * HEAD_DIM  # per page per plane


def timed_ms(device: int, fn: Callable[[], object], iters: int = 20) -> float:
    with torch.cuda.device(device):
        fn()
        torch.cuda.synchronize(0)
        torch.cuda.synchronize(1)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / iters


def copy_fn(
    mode: str, src: torch.Tensor, dst: torch.Tensor, sid: torch.Tensor, did: torch.Tensor, block: int, warps: int
) -> tuple[int, Callable[[], object]]:
    """(device that runs it, the launch): pull runs on GPU 1 with GPU 0's pool by address, push the other way."""
    dev = 1 if mode == "pull" else 0
    s_idx, d_idx = sid.to(f"cuda:{dev}"), did.to(f"cuda:{dev}")
    s_arg = RawPages(src.data_ptr(), torch.int16, POOL) if mode == "pull" else src.view(torch.int16)
    d_arg = dst.view(torch.int16) if mode == "pull" else RawPages(dst.data_ptr(), torch.int16, POOL)
    per_page = ELEMS // block
    grid = (sid.numel() * per_page, LAYERS * 2)
    return dev, lambda: _pages_to_pages_kernel[grid](
        s_arg, d_arg, s_idx, d_idx, POOL, POOL, ELEMS, per_page, EVEN=True, BLOCK=block, num_warps=warps
    )


def main() -> None:
    src = torch.randn(LAYERS, 2, POOL, PAGE, HEADS, HEAD_DIM, device="cuda:0", dtype=torch.bfloat16)
    dst = torch.zeros(LAYERS, 2, POOL, PAGE, HEADS, HEAD_DIM, device="cuda:1", dtype=torch.bfloat16)
    for a, b in ((0, 1), (1, 0)):  # cross-device copies make torch enable peer access both ways
        torch.empty(1, device=f"cuda:{a}").copy_(torch.empty(1, device=f"cuda:{b}"))
    print(
        f"{'tokens':>6} {'MB':>6} {'ceiling GB/s':>12} {'mode':>5} {'block':>6} {'warps':>5} {'ms':>7} {'GB/s':>7} {'%ceil':>6}"
    )
    for tokens in (2048, 8192):
        n = tokens // PAGE
        nbytes = n * LAYERS * 2 * ELEMS * 2
        a = torch.empty(nbytes, dtype=torch.uint8, device="cuda:0")
        b = torch.empty(nbytes, dtype=torch.uint8, device="cuda:1")
        ceiling = nbytes / timed_ms(0, lambda a=a, b=b: b.copy_(a)) / 1e6
        sid, did = torch.randperm(POOL)[:n], torch.randperm(POOL)[:n]
        for mode in ("pull", "push"):
            for block in (1024, 2048, 4096, 8192, 16384):
                for warps in (4, 8, 16):
                    dev, fn = copy_fn(mode, src, dst, sid, did, block, warps)
                    ms = timed_ms(dev, fn)
                    gbs = nbytes / ms / 1e6
                    print(
                        f"{tokens:>6} {nbytes / 1e6:>6.0f} {ceiling:>12.1f} {mode:>5} {block:>6} {warps:>5} "
                        f"{ms:>7.3f} {gbs:>7.1f} {100 * gbs / ceiling:>5.1f}%"
                    )
        ok = torch.equal(dst[:, :, did.cuda(1)].cpu(), src[:, :, sid.cuda(0)].cpu())
        print("pages ok:", ok)


if __name__ == "__main__":
    main()
