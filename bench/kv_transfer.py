"""KV handoff benchmark: our P->D transfer against torch's copy of the same bytes.

Two paths (``--direct``): 1 (the default when P and D share a host) P maps D's KV pool (CUDA IPC) and, inside
``send``, writes the pages with one kernel over NVLink, then tells D which CUDA event to watch; 0: pack, UCX
send (cuda_ipc), scatter.

    python bench/kv_transfer.py                                   # 2 GPUs: P on cuda:0, D on cuda:1
    python bench/kv_transfer.py --device cpu                      # CPU + UCX over TCP/shm: the fixed cost per handoff
    python bench/kv_transfer.py --tokens 256,2048,8192 --iters 10 --json bench/results/transfer.jsonl

Two processes: this one runs the prefill engine, a spawned one the decode engine. For each prompt
length, ``iters`` rooms (after ``warmup``) each move the whole prompt's KV in one ``send`` (pages drawn
at random from each side's pool, as a busy cache would have them). Handoff = P's ``send`` call -> D
sees Success (its pages hold the KV), on the host-wide monotonic clock; the median is reported. With
``--during-forward-ms X`` (GPU) P calls ``send`` the way the scheduler does, right after launching the
forward (a stand-in GPU kernel of X ms) with its ready event, and the handoff runs from that forward's
end (P's main thread watching the event) to D's Success: what serving waits for.
Ceiling, measured in the same run on the same bytes: GPU0 -> GPU1 ``copy_`` (2 GPUs), or a host
memcpy (CPU). Also reported: pack alone (P, one gather) and unpack alone (D, one scatter).
"over copy ms" = handoff - the same bytes at the ceiling's speed: the time the handoff adds to a bare copy
(for tiny prompts it is the fixed cost per handoff: thread wakeups, control messages, kernel launches).
Default shape: Llama-3.1-8B (32 layers, 8 KV heads, head_dim 128, bf16, page 16 = 128 KiB/token) and
prompts of 256, 2048, 8192 tokens on GPU; on CPU a tiny one (2 layers, 2 KV heads, head_dim 64 = 1 KiB/token)
and prompts of 1, 16, 256 tokens, where the handoff is almost all fixed cost. UCX_* env vars pass through
(UCX_TLS, UCX_PROTO_INFO=y, UCX_RNDV_THRESH, ...).
"""

from __future__ import annotations

import sys
from pathlib import Path

# The repo root goes before bench/ (python puts a script's folder first): ``import pd_kernels`` must find
# the pd_kernels/ package, not bench/kernels.py.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch

from transfer import create_transfer
from transfer.base import AuxRecord, DecodeTransfer, EngineDescription, KVPoll
from transfer.config import TransferConfig
from transfer.pack import chunk_nbytes, pack_pages, unpack_pages

RESULT_TIMEOUT_S = 120.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--device", choices=("auto", "cuda", "cpu"), default="auto", help="auto: cuda when 2 GPUs are visible, else cpu"
    )
    ap.add_argument(
        "--tokens", default=None, help="prompt lengths, comma-separated (default 256,2048,8192; cpu 1,16,256)"
    )
    ap.add_argument("--layers", type=int, default=None, help="default 32 (2 on cpu)")
    ap.add_argument("--kv-heads", type=int, default=None, help="default 8 (2 on cpu)")
    ap.add_argument("--head-dim", type=int, default=None, help="default 128 (64 on cpu)")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--iters", type=int, default=None, help="handoffs per prompt length (default 8; cpu 50)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--queue-size", type=int, default=4, help="staging slots (SGLANG_DISAGGREGATION_QUEUE_SIZE)")
    ap.add_argument(
        "--max-message-mb",
        type=float,
        default=TransferConfig().max_message_mb,
        help="largest data message; longer sends are split and pipelined (SGLANG_DISAGGREGATION_MAX_MESSAGE_MB)",
    )
    ap.add_argument(
        "--direct",
        type=int,
        choices=(0, 1),
        default=int(TransferConfig().direct_copy),
        help="1: P writes the pages into D's mapped pool when it can (SGLANG_DISAGGREGATION_DIRECT_COPY); "
        "0: UCX data messages (pack, send, unpack)",
    )
    ap.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch intra-op threads in both processes (default: torch's own; 1 on cpu, where OpenMP "
        "threads of a 256 KiB copy fighting over shared cores add milliseconds of noise)",
    )
    ap.add_argument(
        "--during-forward-ms",
        type=float,
        default=0.0,
        help="GPU only: call send while a stand-in forward of this many ms still runs on P's stream (as "
        "the scheduler does), and time the handoff from that forward's end, not from the send call",
    )
    ap.add_argument("--json", default=None, help="append one JSON line with the results to this file")
    args = ap.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() and torch.cuda.device_count() >= 2 else "cpu"
    if args.device == "cuda" and torch.cuda.device_count() < 2:
        ap.error("--device cuda needs 2 visible GPUs")
    if args.during_forward_ms and args.device != "cuda":
        ap.error("--during-forward-ms needs the GPUs")
    gpu = args.device == "cuda"
    for name, on_gpu, on_cpu in (
        ("tokens", "256,2048,8192", "1,16,256"),
        ("layers", 32, 2),
        ("kv_heads", 8, 2),
        ("head_dim", 128, 64),
        ("iters", 8, 50),
    ):
        if getattr(args, name) is None:
            setattr(args, name, on_gpu if gpu else on_cpu)
    if args.torch_threads is None and not gpu:
        args.torch_threads = 1
    args.token_list = [int(t) for t in args.tokens.split(",") if t.strip()]
    return args


def describe(args: argparse.Namespace) -> EngineDescription:
    return EngineDescription(
        model_id=f"bench:L{args.layers}",
        architecture="LlamaForCausalLM",
        dtype=args.dtype,
        num_layers=args.layers,
        num_kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        page_size=args.page_size,
    )


def make_kv(args: argparse.Namespace, device: torch.device, fill: bool) -> torch.Tensor:
    num_pages = 2 * -(-max(args.token_list) // args.page_size) + 1  # twice the largest prompt: ids spread out
    shape = (args.layers, 2, num_pages, args.page_size, args.kv_heads, args.head_dim)
    dtype = getattr(torch, args.dtype)
    kv = torch.empty(shape, dtype=dtype, device=device)
    if fill:
        kv.normal_()
    else:
        kv.zero_()
    return kv


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        for i in range(torch.cuda.device_count()):  # a GPU0 -> GPU1 copy involves both
            torch.cuda.synchronize(i)


def page_checksums(kv: torch.Tensor, page_ids: list[int]) -> torch.Tensor:
    """One int64 per page (bits summed over all layers, K and V), in page order: equal on P and D iff the pages arrived."""
    bits = {2: torch.int16, 4: torch.int32}[kv.element_size()]
    return kv[:, :, page_ids].view(bits).sum(dim=(0, 1, 3, 4, 5)).cpu()


def time_op(fn: Any, device: torch.device, iters: int = 5) -> float:
    """Median ms of ``fn`` (after one warm-up call)."""
    fn()
    sync(device)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def copy_ceiling_gbs(nbytes: int, src: torch.device, dst: torch.device) -> float:
    a = torch.empty(nbytes, dtype=torch.uint8, device=src).random_(0, 255)
    b = torch.empty(nbytes, dtype=torch.uint8, device=dst)
    ms = time_op(lambda: b.copy_(a), src if src.type == "cuda" else dst)
    return nbytes / (ms * 1e6)


def config(args: argparse.Namespace) -> TransferConfig:
    return TransferConfig(
        queue_size=args.queue_size,
        bootstrap_timeout=60,
        waiting_timeout=60,
        heartbeat_interval=5,
        heartbeat_max_failure=3,
        max_message_mb=args.max_message_mb,
        direct_copy=bool(args.direct),
    )


# --- decode process ---------------------------------------------------------------------------------


def decode_main(args: argparse.Namespace, inbox: Any, outbox: Any) -> None:
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    device = torch.device("cuda:1") if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    kv = make_kv(args, device, fill=False)
    d = create_transfer("decode", "ucx", kv, describe(args), config(args), "", 0)
    assert isinstance(d, DecodeTransfer)
    d.start()
    outbox.put(("ready",))
    try:
        while True:
            cmd = inbox.get(timeout=RESULT_TIMEOUT_S)
            if cmd[0] == "stop":
                break
            if cmd[0] == "room":
                _, room, host, port, page_ids = cmd
                d.register(room, host, port, page_ids)
                while d.poll(room) not in (KVPoll.Success, KVPoll.Failed):
                    time.sleep(2e-5)  # releases the GIL for the transfer threads
                t_done = time.monotonic()
                ok = d.poll(room) == KVPoll.Success
                outbox.put(
                    (
                        "done",
                        room,
                        int(d.poll(room)),
                        t_done,
                        d.failure(room),
                        d.stats(room).ms,
                        page_checksums(kv, page_ids) if ok else None,
                        d.stats(room).path,
                    )
                )
                d.release(room)
            elif cmd[0] == "unpack":
                _, n_pages = cmd
                ids = torch.randperm(kv.shape[2], device=device)[:n_pages]
                staging = torch.empty(chunk_nbytes(kv, n_pages) // kv.element_size(), dtype=kv.dtype, device=device)
                outbox.put(("unpack", time_op(lambda ids=ids, st=staging: unpack_pages(kv, ids, st), device)))
    finally:
        d.shutdown()


# --- prefill process (this one) -------------------------------------------------------------------


def gpu_cycles_per_ms() -> float:
    """How many ``torch.cuda._sleep`` cycles take 1 ms on the current GPU (measured)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1_000_000)  # warm-up
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    end.synchronize()
    return 10_000_000 / start.elapsed_time(end)


def handoff(
    p: Any, kv: torch.Tensor, inbox: Any, outbox: Any, room: int, n_pages: int, forward_cycles: int = 0
) -> dict[str, Any]:
    p_ids = torch.randperm(kv.shape[2])[:n_pages].tolist()
    d_ids = torch.randperm(kv.shape[2])[:n_pages].tolist()
    p.poll(room)
    outbox.put(("room", room, "127.0.0.1", p.bootstrap_port, d_ids))
    deadline = time.monotonic() + RESULT_TIMEOUT_S
    while p.poll(room) == KVPoll.Bootstrapping:
        if time.monotonic() > deadline:
            raise TimeoutError("decode did not register")
        time.sleep(1e-4)
    if forward_cycles:  # the scheduler's way: send right after launching the forward that writes the pages
        torch.cuda._sleep(forward_cycles)
        ready = torch.cuda.Event()
        ready.record()
        p.send(room, p_ids, 0, True, AuxRecord(first_token_id=1), ready)
        while not ready.query():
            time.sleep(0)  # lets the engine's loop thread run
        t_send = time.monotonic()  # the forward's end, seen within a few microseconds
    else:
        t_send = time.monotonic()
        p.send(room, p_ids, 0, True, AuxRecord(first_token_id=1))
    msg = inbox.get(timeout=RESULT_TIMEOUT_S)
    assert msg[0] == "done" and msg[1] == room, msg
    if msg[2] != KVPoll.Success:
        raise RuntimeError(f"room {room} failed on decode: {msg[4]}")
    while p.poll(room) not in (KVPoll.Success, KVPoll.Failed):
        time.sleep(1e-4)
    result = {
        "handoff_ms": (msg[3] - t_send) * 1e3,
        "p_stats_ms": p.stats(room).ms,
        "d_stats_ms": msg[5],
        "verified": torch.equal(msg[6], page_checksums(kv, p_ids)),
        "path": msg[7],
    }
    p.release(room)
    return result


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    p_dev = torch.device("cuda:0") if args.device == "cuda" else torch.device("cpu")
    d_dev = torch.device("cuda:1") if args.device == "cuda" else torch.device("cpu")
    if p_dev.type == "cuda":
        torch.cuda.set_device(p_dev)
    kv = make_kv(args, p_dev, fill=True)
    page_bytes = chunk_nbytes(kv, 1)
    pages = {t: -(-t // args.page_size) for t in args.token_list}
    ceilings = {t: copy_ceiling_gbs(pages[t] * page_bytes, p_dev, d_dev) for t in args.token_list}
    packs = {}
    for t in args.token_list:
        ids = torch.randperm(kv.shape[2], device=p_dev)[: pages[t]]
        out = torch.empty(pages[t] * page_bytes // kv.element_size(), dtype=kv.dtype, device=p_dev)
        packs[t] = time_op(lambda ids=ids, out=out: pack_pages(kv, ids, out), p_dev)
    p = create_transfer("prefill", "ucx", kv, describe(args), config(args), "127.0.0.1", 0)
    p.start()
    ctx = mp.get_context("spawn")
    to_d, from_d = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=decode_main, args=(args, to_d, from_d), name="bench-decode", daemon=True)
    proc.start()
    rows = []
    forward_cycles = int(args.during_forward_ms * gpu_cycles_per_ms()) if args.during_forward_ms else 0
    try:
        assert from_d.get(timeout=RESULT_TIMEOUT_S)[0] == "ready"
        room = 1
        for t in args.token_list:
            samples = []
            for i in range(args.warmup + args.iters):
                res = handoff(p, kv, from_d, to_d, room, pages[t], forward_cycles)
                room += 1
                if i >= args.warmup:
                    samples.append(res)
            to_d.put(("unpack", pages[t]))
            unpack_ms = from_d.get(timeout=RESULT_TIMEOUT_S)[1]
            nbytes = pages[t] * page_bytes
            times = sorted(s["handoff_ms"] for s in samples)
            ms = statistics.median(times)
            gbs = nbytes / (ms * 1e6)
            rows.append(
                {
                    "tokens": t,
                    "bytes": nbytes,
                    "handoff_ms": ms,
                    "gb_s": gbs,
                    "ceiling_gb_s": ceilings[t],
                    "pct_of_ceiling": 100 * gbs / ceilings[t],
                    "pack_ms": packs[t],
                    "unpack_ms": unpack_ms,
                    "over_copy_ms": ms - nbytes / (ceilings[t] * 1e6),
                    "p10_handoff_ms": times[len(times) // 10],
                    "p90_handoff_ms": times[(len(times) * 9) // 10],
                    "min_handoff_ms": times[0],
                    "verified": all(s["verified"] for s in samples),
                    "p_stats_ms": statistics.median(s["p_stats_ms"] for s in samples),
                    "d_stats_ms": statistics.median(s["d_stats_ms"] for s in samples),
                    "path": "/".join(sorted({s["path"] for s in samples})),
                }
            )
    finally:
        to_d.put(("stop",))
        proc.join(timeout=15)
        if proc.is_alive():
            proc.kill()
        p.shutdown()
    return rows


def print_table(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    where = "GPU0 -> GPU1, UCX" if args.device == "cuda" else "CPU -> CPU, UCX (TCP/shm)"
    ceiling = "torch copy_ GPU0->GPU1" if args.device == "cuda" else "host memcpy (torch copy_)"
    ucx = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("UCX_")) or "(UCX_* unset)"
    print(
        f"KV handoff, {where}: {args.layers} layers x {args.kv_heads} KV heads x {args.head_dim} dims, "
        f"{args.dtype}, page {args.page_size}; pieces <= {args.max_message_mb:g} MiB, {args.queue_size} staging "
        f"slots; median of {args.iters} (after {args.warmup} warm-up); ceiling = {ceiling}"
    )
    if args.during_forward_ms:
        print(
            f"send called while a {args.during_forward_ms:g} ms forward runs; handoff = the forward's end -> D's Success"
        )
    print(f"env: {ucx}")
    head = (
        f"{'path':>6} {'tokens':>7} {'bytes':>13} {'handoff ms':>11} {'p10-p90 ms':>13} {'over copy ms':>13} {'GB/s':>8} "
        f"{'ceiling GB/s':>13} {'% ceiling':>10} {'pack ms':>8} {'unpack ms':>10} {'pages ok':>8}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        spread = f"{r['p10_handoff_ms']:.2f}-{r['p90_handoff_ms']:.2f}"
        print(
            f"{r['path']:>6} {r['tokens']:>7} {r['bytes']:>13,} {r['handoff_ms']:>11.3f} {spread:>13} {r['over_copy_ms']:>13.3f} "
            f"{r['gb_s']:>8.2f} {r['ceiling_gb_s']:>13.1f} {r['pct_of_ceiling']:>9.1f}% {r['pack_ms']:>8.3f} "
            f"{r['unpack_ms']:>10.3f} {'yes' if r['verified'] else 'NO':>8}"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = run(args)
    print_table(args, rows)
    if args.json:
        record = {
            "bench": "transfer",
            "date": date.today().isoformat(),
            "device": args.device,
            "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
            "shape": {
                "layers": args.layers,
                "kv_heads": args.kv_heads,
                "head_dim": args.head_dim,
                "page_size": args.page_size,
                "dtype": args.dtype,
            },
            "iters": args.iters,
            "queue_size": args.queue_size,
            "max_message_mb": args.max_message_mb,
            "direct": args.direct,
            "during_forward_ms": args.during_forward_ms,
            "ucx_env": {k: v for k, v in os.environ.items() if k.startswith("UCX_")},
            "results": rows,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "a") as f:
            f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
