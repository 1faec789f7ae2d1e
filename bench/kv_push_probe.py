"""Probe of the push handoff: P (cuda:0) writes D's (cuda:1) pages itself; D learns completion from a CUDA IPC event.

P maps D's KV pool through CUDA IPC. A send, as P's scheduler thread would run it: on a side stream that
first waits for the forward's event, upload the page ids, launch pd_kernels/kv_copy.py's kernel writing D's
pages over NVLink, record one of 8 interprocess events; then tell D which one (a pipe, written from the
calling thread, standing in for the control message, which travels while the copy runs). D opened the
events once and polls the named one. Handoff = P's t0 -> D sees the event fired (host monotonic clock,
shared by both processes); D's pages are zeroed before each send and checksummed against P's after.
Before each t0 GPU 0 sits idle ``--idle-ms`` while P's thread spins (a busy scheduler). Variants:

  a          the first probe's way: torch.tensor(ids).pin_memory().to(cuda), kernel[grid](...), all inside
             ``with torch.cuda.stream(side)``
  b          PageIdUploader (P's and D's ids in one upload) + PageCopier, the side stream passed to each call
  c          like b, D's ids uploaded ahead of time (at registration, in the engine): only P's go up
  c ctx      like c, inside ``with torch.cuda.stream(side)`` instead of passing the stream
  c spin     like c, D polls without sleeping (the others sleep 20 us between polls)
  c sleep    like c, P's thread sleeps through the idle time instead of spinning (a cold CPU at t0)
  c timeline like c, with CUDA timing events around the copy and P spinning on the IPC event as well
  c warm     like c timeline, a tiny kernel launched on GPU 0 just before t0 (is an idle GPU slow to start?)

The ceiling: torch's copy of the same bytes, contiguous, GPU 0 -> GPU 1, timed with CUDA events (and on the
host clock, synchronize included); "% of ceiling" = ceiling time / handoff.

    python bench/kv_push_probe.py [--iters 20] [--tokens 256 2048 8192]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root first: pd_kernels/ is a package

import torch
import triton

LAYERS, HEADS, HEAD_DIM, PAGE, POOL, EVENTS = 32, 8, 128, 16, 1200, 8
ELEMS = PAGE * HEADS * HEAD_DIM
VARIANTS = ("a", "b", "c", "c ctx", "c spin", "c sleep", "c timeline", "c warm")


def page_bytes(n: int) -> int:
    return n * LAYERS * 2 * ELEMS * 2


def checksums(kv: torch.Tensor, ids: Any) -> torch.Tensor:
    return kv[:, :, ids].view(torch.int16).sum(dim=(0, 1, 3, 4, 5)).cpu()


def decode_main(conn: Any) -> None:
    from transfer import cuda_ipc

    torch.cuda.set_device(1)
    kv = torch.zeros(LAYERS, 2, POOL, PAGE, HEADS, HEAD_DIM, device="cuda:1", dtype=torch.bfloat16)
    cuda_ipc.ensure_context(1)
    conn.send(cuda_ipc.export(kv.data_ptr()))
    events = [torch.cuda.Event.from_ipc_handle(1, h) for h in conn.recv()]
    conn.send("ready")
    while (msg := conn.recv()) != "stop":
        k, ids, spin = msg
        t_msg = time.monotonic()
        while not events[k].query():
            if not spin:
                time.sleep(2e-5)
        t_done = time.monotonic()
        got = checksums(kv, ids)
        kv.zero_()
        torch.cuda.synchronize(1)
        conn.send((t_msg, t_done, got))


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def recv(conn: Any, timeout: float) -> Any:
    if not conn.poll(timeout):
        raise TimeoutError(f"nothing from D in {timeout} s")
    return conn.recv()


def idle(seconds: float, sleep: bool) -> None:
    if sleep:
        time.sleep(seconds)
        return
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def sync_both() -> None:
    torch.cuda.synchronize(0)
    torch.cuda.synchronize(1)


def gpu_ms(fn: Any, stream: torch.cuda.Stream, reps: int = 10) -> float:
    """Median CUDA-event time of ``fn()`` on ``stream``."""
    out = []
    for i in range(reps + 2):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            a.record()
            fn()
            b.record()
        b.synchronize()
        if i >= 2:
            out.append(a.elapsed_time(b))
    return median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=20, help="timed sends per variant and size (after 3 warm-up)")
    ap.add_argument("--tokens", type=int, nargs="+", default=[256, 2048, 8192])
    ap.add_argument("--idle-ms", type=float, default=5.0, help="GPU 0 idle before each send (P spins)")
    args = ap.parse_args()

    from pd_kernels.kv_copy import (
        PageCopier,
        PageIdUploader,
        RawPages,
        _direct_launch_known,
        _pages_to_pages_kernel,
    )
    from transfer import cuda_ipc

    torch.cuda.set_device(0)
    kv = torch.randn(LAYERS, 2, POOL, PAGE, HEADS, HEAD_DIM, device="cuda:0", dtype=torch.bfloat16)
    ctx = mp.get_context("spawn")
    conn, d_end = ctx.Pipe()
    proc = ctx.Process(target=decode_main, args=(d_end,), daemon=True)
    proc.start()
    handle, offset = recv(conn, 120)
    cuda_ipc.ensure_context(0)
    base = cuda_ipc.open_handle(handle)
    dst = RawPages(base + offset, torch.bfloat16, POOL)
    events = [torch.cuda.Event(interprocess=True) for _ in range(EVENTS)]
    conn.send([e.ipc_handle() for e in events])
    assert recv(conn, 120) == "ready"

    side = torch.cuda.Stream(0)
    fwd = torch.cuda.Event()  # the forward's event, which the side stream waits for
    warm = torch.zeros(1, device="cuda:0")
    copier = PageCopier(kv, dst)
    uploader = PageIdUploader("cuda:0", capacity=2 * max(args.tokens) // PAGE)
    src16, dst16, block = kv.view(torch.int16), RawPages(dst.ptr, torch.int16, POOL), 4096
    e0, e1, e2 = (torch.cuda.Event(enable_timing=True) for _ in range(3))
    for e in (e0, e1, e2):
        e.record()  # created now, not inside a send

    def send(variant: str, n: int, sid: list[int], did: list[int], did_dev: torch.Tensor, k: int) -> dict[str, float]:
        """One send from t0; returns host stamps (s after t0) and, for the timeline variants, the GPU's."""
        timed = variant in ("c timeline", "c warm")
        if variant == "c warm":
            warm.add_(1)  # on GPU 0's default stream, not the side stream
        t0 = time.monotonic()
        st: dict[str, float] = {"t0": t0}
        if variant in ("a", "c ctx"):  # the side stream made current for the calls
            with torch.cuda.stream(side):
                side.wait_event(fwd)
                if variant == "a":
                    ids = torch.tensor([*sid, *did]).pin_memory().to("cuda:0", non_blocking=True)
                    _pages_to_pages_kernel[(n * (ELEMS // block), LAYERS * 2)](
                        src16,
                        dst16,
                        ids[:n],
                        ids[n:],
                        POOL,
                        POOL,
                        ELEMS,
                        ELEMS // block,
                        EVEN=True,
                        BLOCK=block,
                        num_warps=8,
                    )
                else:
                    copier(uploader.upload(sid), did_dev)
                events[k].record(side)
        else:  # the side stream passed to each call
            if timed:
                e0.record(side)
            side.wait_event(fwd)
            if variant == "b":
                ids = uploader.upload(sid + did, side)
                copier(ids[:n], ids[n:], side)
            else:
                src_ids = uploader.upload(sid, side)
                st["upload"] = time.monotonic() - t0
                if timed:
                    e1.record(side)
                copier(src_ids, did_dev, side)
                st["launch"] = time.monotonic() - t0
                if timed:
                    e2.record(side)
            events[k].record(side)
        st["record"] = time.monotonic() - t0
        conn.send((k, did, variant == "c spin"))
        st["put"] = time.monotonic() - t0
        if timed:
            while not events[k].query():
                pass
            st["p_seen"] = time.monotonic() - t0
            st["gpu_upload"] = e0.elapsed_time(e1) / 1e3
            st["gpu_kernel"] = e1.elapsed_time(e2) / 1e3
        return st

    print(f"triton {triton.__version__}, torch {torch.__version__}, direct launch: {_direct_launch_known()}")
    ceiling: dict[int, tuple[float, float, float]] = {}
    results: dict[tuple[str, int], list[dict[str, Any]]] = {}
    big = torch.randint(0, 255, (page_bytes(max(args.tokens) // PAGE),), dtype=torch.uint8, device="cuda:0")
    sink = torch.empty_like(big, device="cuda:1")
    for tokens in args.tokens:
        n = tokens // PAGE
        nb = page_bytes(n)
        ev = gpu_ms(lambda: sink[:nb].copy_(big[:nb]), torch.cuda.current_stream(0))
        host = []
        for _ in range(12):
            sync_both()
            t = time.perf_counter()
            sink[:nb].copy_(big[:nb])
            sync_both()
            host.append((time.perf_counter() - t) * 1e3)
        sid0 = torch.randperm(POOL)[:n]
        ids0 = (sid0.cuda(0), torch.randperm(POOL)[:n].cuda(0))
        kern = gpu_ms(lambda: copier(*ids0), side)
        ceiling[tokens] = (ev, median(host[2:]), kern)
        for variant in VARIANTS:
            rows = results[(variant, tokens)] = []
            for it in range(args.iters + 3):
                sid, did = torch.randperm(POOL)[:n].tolist(), torch.randperm(POOL)[:n].tolist()
                did_dev = torch.tensor(did, device="cuda:0")  # variant c: D's ids went up at registration
                k = it % EVENTS
                fwd.record(torch.cuda.current_stream(0))
                torch.cuda.synchronize(0)
                idle(args.idle_ms / 1e3, sleep=variant == "c sleep")
                st = send(variant, n, sid, did, did_dev, k)
                t_msg, t_done, got = recv(conn, 60)
                st.update(
                    handoff=t_done - st["t0"],
                    msg=t_msg - st["t0"],
                    ok=torch.equal(got, checksums(kv, torch.tensor(sid, device="cuda:0"))),
                )
                if it >= 3:
                    rows.append(st)
    conn.send("stop")
    proc.join(10)

    print("\nGPU timeline, variants 'c timeline' and 'c warm' (medians, us from t0; GPU spans from CUDA events):")
    print(
        f"{'tokens':>6} {'variant':<10} {'upload':>7} {'launch':>7} {'record':>7} {'put':>6} | {'gpu upload':>10} "
        f"{'kernel':>7} | {'P sees':>7} {'start lag':>9} | {'D msg':>6} {'D sees':>7} {'D delay':>7}"
    )
    for tokens in args.tokens:
        for variant in ("c timeline", "c warm"):
            rows = results[(variant, tokens)]
            lag = median([(r["p_seen"] - r["gpu_upload"] - r["gpu_kernel"]) * 1e6 for r in rows])
            delay = median([(r["handoff"] - r["p_seen"]) * 1e6 for r in rows])
            keys = ("upload", "launch", "record", "put", "gpu_upload", "gpu_kernel", "p_seen", "msg", "handoff")
            us = {key: median([r[key] * 1e6 for r in rows]) for key in keys}
            print(
                f"{tokens:>6} {variant:<10} {us['upload']:>7.1f} {us['launch']:>7.1f} {us['record']:>7.1f} "
                f"{us['put']:>6.1f} | {us['gpu_upload']:>10.1f} {us['gpu_kernel']:>7.1f} | {us['p_seen']:>7.1f} "
                f"{lag:>9.1f} | {us['msg']:>6.1f} {us['handoff']:>7.1f} {delay:>7.1f}"
            )
    print(
        "  upload/launch/record/put: host clock after each call; gpu upload: the side stream's event at t0 to the"
        "\n  kernel's start (the ids' copy, waiting for the host's launch); kernel: the copy kernel; P sees: P spins"
        "\n  on the IPC event; start lag = P sees - gpu upload - kernel (t0 to the GPU reaching the stream's first"
        "\n  event, plus P's poll); D delay = D sees - P sees (D polls every ~20 us + the sleep's overshoot)"
    )

    print("\nCeiling (torch contiguous copy GPU0 -> GPU1 of the same bytes) and the copy kernel alone (CUDA events):")
    for tokens in args.tokens:
        ev, host, kern = ceiling[tokens]
        print(
            f"{tokens:>6} tokens {page_bytes(tokens // PAGE) / 1e6:7.1f} MB: copy {ev:.3f} ms events "
            f"({page_bytes(tokens // PAGE) / ev / 1e6:.0f} GB/s), {host:.3f} ms host clock; kernel {kern:.3f} ms"
        )
    print(
        f"\n{'tokens':>6} {'variant':<10} {'handoff ms':>10} {'p10-p90':>12} {'msg at':>7} {'% of ceiling':>12} "
        "pages ok"
    )
    for tokens in args.tokens:
        for variant in VARIANTS:
            rows = results[(variant, tokens)]
            hs = sorted(r["handoff"] * 1e3 for r in rows)
            lo, hi = hs[len(hs) // 10], hs[-1 - len(hs) // 10]
            msg = median([r["msg"] * 1e3 for r in rows])
            print(
                f"{tokens:>6} {variant:<10} {median(hs):>10.3f} {lo:>5.3f}-{hi:<6.3f} {msg:>7.3f} "
                f"{100 * ceiling[tokens][0] / median(hs):>11.1f}% {all(r['ok'] for r in rows)}"
            )


if __name__ == "__main__":
    main()
