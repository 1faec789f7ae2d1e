"""Host cost of each step that starts a direct copy (pd_kernels/kv_copy.py), in a quiet process (no other Python
thread) on 2 GPUs. The first way (D pulling, through transfer/peer_pool.py's first version): building the
page-id tensor, uploading it through pinned memory, the ``copy_pages`` launch (1 page: the host side, not the
copy), the CUDA event, the device and stream guards. Next to it, the fast path: ``PageIdUploader.upload`` and
a ``PageCopier`` call (pull on GPU 1, push on GPU 0: the same host work; the stream passed, or the current
one), and the host side of a whole push send as the engine would make it (wait for the forward's event,
upload P's ids, launch, record the event), inside ``with torch.cuda.stream(side)`` or passing ``side``.

    python bench/kv_copy_launch_cost.py
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root first: pd_kernels/ is a package

import torch

from pd_kernels.kv_copy import (
    PageCopier,
    PageIdUploader,
    RawPages,
    _direct_launch_known,
    copy_pages,
)

LAYERS, HEADS, HEAD_DIM, PAGE, POOL = 32, 8, 128, 16, 1200


def per_call_us(name: str, fn: Callable[[], object], n: int = 300) -> None:
    for _ in range(20):
        fn()
    torch.cuda.synchronize(0)
    torch.cuda.synchronize(1)
    t = time.perf_counter()
    for i in range(n):
        fn()
        if i % 50 == 49:
            torch.cuda.synchronize(0)
            torch.cuda.synchronize(1)
    print(f"{name:<68} {(time.perf_counter() - t) / n * 1e6:8.1f} us")


def main() -> None:
    src = torch.randn(LAYERS, 2, POOL, PAGE, HEADS, HEAD_DIM, device="cuda:0", dtype=torch.bfloat16)
    dst = torch.zeros(LAYERS, 2, POOL, PAGE, HEADS, HEAD_DIM, device="cuda:1", dtype=torch.bfloat16)
    for a, b in ((0, 1), (1, 0)):
        torch.empty(1, device=f"cuda:{a}").copy_(torch.empty(1, device=f"cuda:{b}"))
    print(f"PageCopier direct launch: {_direct_launch_known()}")
    torch.cuda.set_device(1)
    stream = torch.cuda.Stream(1)
    ids = list(range(0, 256, 2))  # 128 pages: 2048 tokens
    raw = RawPages(src.data_ptr(), src.dtype, POOL)
    one = torch.tensor([5, 7]).to("cuda:1")
    with torch.cuda.stream(stream):
        per_call_us("torch.tensor(256 ids)", lambda: torch.tensor(ids + ids, dtype=torch.int64))
        per_call_us(
            "+ pin_memory + to(cuda, non_blocking)",
            lambda: torch.tensor(ids + ids).pin_memory().to("cuda:1", non_blocking=True),
        )
        per_call_us("copy_pages launch, 1 page (host time)", lambda: copy_pages(raw, one[:1], dst, one[1:]))
        per_call_us("torch.cuda.Event() + record", lambda: torch.cuda.Event().record())
        event = torch.cuda.Event()
        per_call_us("event.record() (an event made once)", lambda: event.record())
        for dtype in (torch.int64, torch.int32):
            up, name = PageIdUploader("cuda:1", capacity=256, dtype=dtype), str(dtype)[6:]
            per_call_us(f"PageIdUploader({name}).upload(256 ids, stream)", lambda u=up: u.upload(ids + ids, stream))
            per_call_us(f"PageIdUploader({name}).upload(128 ids, stream)", lambda u=up: u.upload(ids, stream))
        per_call_us("PageIdUploader.upload(128 ids), current stream", lambda: up.upload(ids))
        pull = PageCopier(raw, dst)
        per_call_us("PageCopier call (pull, GPU 1), 1 page, stream", lambda: pull(one[:1], one[1:], stream))
        per_call_us("PageCopier call (pull, GPU 1), 1 page, current stream", lambda: pull(one[:1], one[1:]))

    def guards() -> None:
        with torch.cuda.device(dst.device), torch.cuda.stream(stream):
            pass

    per_call_us("with torch.cuda.device(), torch.cuda.stream()", guards)

    torch.cuda.set_device(0)
    side, fwd = torch.cuda.Stream(0), torch.cuda.Event()
    fwd.record()
    push = PageCopier(src, RawPages(dst.data_ptr(), dst.dtype, POOL))
    uploader = PageIdUploader("cuda:0", capacity=256)
    d_ids = torch.tensor(ids, device="cuda:0")[:1]
    p_one = torch.tensor([3], device="cuda:0")
    per_call_us("PageCopier call (push, GPU 0), 1 page, stream", lambda: push(p_one, d_ids, side))
    sent = torch.cuda.Event()

    def send_ctx() -> None:  # 1 page copied, 128 ids uploaded: the host side of a 2048-token send
        with torch.cuda.stream(side):
            side.wait_event(fwd)
            push(uploader.upload(ids)[:1], d_ids)
            sent.record(side)

    def send() -> None:
        side.wait_event(fwd)
        push(uploader.upload(ids, side)[:1], d_ids, side)
        sent.record(side)

    per_call_us("push send: with stream(side): wait_event, upload 128, call, record", send_ctx)
    per_call_us("push send: wait_event, upload 128, call, record (side passed)", send)


if __name__ == "__main__":
    main()
