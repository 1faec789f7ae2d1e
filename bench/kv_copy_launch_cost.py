"""Host cost of each step D takes to start a direct copy (kernels/kv_copy.py through transfer/peer_pool.py), in a
quiet process (no other Python thread) on 2 GPUs: building the page-id tensor, uploading it through pinned memory,
the Triton launch (1 page: the host side, not the copy), the CUDA event, the device and stream guards.

    python bench/kv_copy_launch_cost.py
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root first: kernels/ is a package

import torch

from kernels.kv_copy import RawPages, copy_pages

LAYERS, HEADS, HEAD_DIM, PAGE, POOL = 32, 8, 128, 16, 1200


def per_call_us(name: str, fn: Callable[[], object], n: int = 300) -> None:
    for _ in range(20):
        fn()
    torch.cuda.synchronize(1)
    t = time.perf_counter()
    for i in range(n):
        fn()
        if i % 50 == 49:
            torch.cuda.synchronize(1)
    print(f"{name:<48} {(time.perf_counter() - t) / n * 1e6:8.1f} us")


def main() -> None:
    src = torch.randn(LAYERS, 2, POOL, PAGE, HEADS, HEAD_DIM, device="cuda:0", dtype=torch.bfloat16)
    dst = torch.zeros(LAYERS, 2, POOL, PAGE, HEADS, HEAD_DIM, device="cuda:1", dtype=torch.bfloat16)
    for a, b in ((0, 1), (1, 0)):
        torch.empty(1, device=f"cuda:{a}").copy_(torch.empty(1, device=f"cuda:{b}"))
    torch.cuda.set_device(1)
    stream = torch.cuda.Stream(1)
    ids = list(range(0, 256, 2))  # 128 pages: 2048 tokens
    raw = RawPages(src.data_ptr(), src.dtype, POOL)
    with torch.cuda.stream(stream):
        per_call_us("torch.tensor(256 ids)", lambda: torch.tensor(ids + ids, dtype=torch.int64))
        per_call_us("+ pin_memory + to(cuda, non_blocking)",
                    lambda: torch.tensor(ids + ids).pin_memory().to("cuda:1", non_blocking=True))
        one = torch.tensor([5, 7]).to("cuda:1")
        per_call_us("copy_pages launch, 1 page (host time)", lambda: copy_pages(raw, one[:1], dst, one[1:]))
        per_call_us("torch.cuda.Event() + record", lambda: torch.cuda.Event().record())

    def guards() -> None:
        with torch.cuda.device(dst.device), torch.cuda.stream(stream):
            pass

    per_call_us("with torch.cuda.device(), torch.cuda.stream()", guards)


if __name__ == "__main__":
    main()
