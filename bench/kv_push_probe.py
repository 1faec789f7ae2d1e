"""Probe of a design not built: P writes D's pages itself (push) and D learns completion from a CUDA IPC event.

P (cuda:0) maps D's (cuda:1) KV pool through CUDA IPC and, right from the calling thread, uploads the page ids
and launches kernels/kv_copy.py's kernel writing D's pages over NVLink, then records one of K interprocess
events; D opened those events once and, told which one (through a multiprocessing queue, standing in for a
UCX control message that travels while the copy runs), polls it. Handoff = P's call -> D sees the event fired
(host monotonic clock, shared by both processes); pages are checksummed on both sides. The percentage is of
381 GB/s, the GPU0 -> GPU1 copy ceiling measured by bench/kv_transfer.py on the same machine.

    python bench/kv_push_probe.py
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root first: kernels/ is a package

import torch

LAYERS, HEADS, HEAD_DIM, PAGE, POOL, EVENTS = 32, 8, 128, 16, 1200, 8
ELEMS = PAGE * HEADS * HEAD_DIM
CEILING_GBS = 381.0


def checksums(kv: torch.Tensor, ids: Any) -> torch.Tensor:
    return kv[:, :, ids].view(torch.int16).sum(dim=(0, 1, 3, 4, 5)).cpu()


def decode_main(inbox: Any, outbox: Any) -> None:
    from transfer import cuda_ipc

    torch.cuda.set_device(1)
    kv = torch.zeros(LAYERS, 2, POOL, PAGE, HEADS, HEAD_DIM, device="cuda:1", dtype=torch.bfloat16)
    cuda_ipc.ensure_context(1)
    outbox.put(cuda_ipc.export(kv.data_ptr()))
    events = [torch.cuda.Event.from_ipc_handle(1, h) for h in inbox.get()]
    outbox.put("ready")
    while (msg := inbox.get()) != "stop":
        k, ids = msg
        t_msg = time.monotonic()
        while not events[k].query():
            time.sleep(2e-5)
        outbox.put((t_msg, time.monotonic(), checksums(kv, ids)))


def main() -> None:
    from kernels.kv_copy import RawPages, _pages_to_pages_kernel
    from transfer import cuda_ipc

    torch.cuda.set_device(0)
    kv = torch.randn(LAYERS, 2, POOL, PAGE, HEADS, HEAD_DIM, device="cuda:0", dtype=torch.bfloat16)
    ctx = mp.get_context("spawn")
    to_d, from_d = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=decode_main, args=(to_d, from_d), daemon=True)
    proc.start()
    handle, offset = from_d.get(timeout=120)
    cuda_ipc.ensure_context(0)
    base = cuda_ipc.open_handle(handle)
    dst = RawPages(base + offset, torch.int16, POOL)
    events = [torch.cuda.Event(interprocess=True) for _ in range(EVENTS)]
    to_d.put([e.ipc_handle() for e in events])
    assert from_d.get(timeout=120) == "ready"
    stream = torch.cuda.Stream(0)
    src = kv.view(torch.int16)
    block = 4096
    print(f"{'tokens':>6} {'handoff ms':>10} {'p10-p90':>12} {'msg at ms':>9} {'% of ceiling':>12} pages ok")
    for tokens in (256, 2048, 8192):
        n = tokens // PAGE
        rows = []
        for it in range(13):  # the first 3 are warm-up
            sid, did = torch.randperm(POOL)[:n], torch.randperm(POOL)[:n]
            k = it % EVENTS
            torch.cuda.synchronize(0)
            t0 = time.monotonic()
            with torch.cuda.stream(stream):
                ids = torch.tensor([*sid.tolist(), *did.tolist()]).pin_memory().to("cuda:0", non_blocking=True)
                _pages_to_pages_kernel[(n * (ELEMS // block), LAYERS * 2)](
                    src, dst, ids[:n], ids[n:], POOL, POOL, ELEMS, ELEMS // block, EVEN=True, BLOCK=block, num_warps=8)
                events[k].record(stream)
            to_d.put((k, did.tolist()))
            t_msg, t_done, got = from_d.get(timeout=60)
            if it >= 3:
                rows.append(((t_done - t0) * 1e3, (t_msg - t0) * 1e3, torch.equal(got, checksums(kv, sid.cuda(0)))))
        ms = sorted(r[0] for r in rows)
        med = statistics.median(ms)
        pct = 100 * n * LAYERS * 2 * ELEMS * 2 / (med * 1e6) / CEILING_GBS
        print(f"{tokens:>6} {med:>10.3f} {ms[1]:>5.2f}-{ms[-2]:<6.2f} {statistics.median(r[1] for r in rows):>9.3f} "
              f"{pct:>11.1f}% {all(r[2] for r in rows)}")
    to_d.put("stop")
    proc.join(10)


if __name__ == "__main__":
    main()
