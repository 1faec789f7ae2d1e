"""Router overhead: the same short streamed requests straight to a worker and through the router, one run.

    python bench/router_overhead.py [--latency-ms 2] [--tokens 4] [--requests 400] [--seconds 5] \
        [--concurrency 16 64 128] [--output-file bench/results/router_overhead.jsonl]

The worker is the router tests' mock (``tests/router_support/mock_worker.py``) in its own process,
answering after a fixed ``--latency-ms`` with ``--tokens`` SSE events, so only the router is
measured. The router is ``python -m router.launch_router`` (regular mode, one worker), also its own
process. Two measurements:
1. latency: one request at a time, direct and routed in alternating blocks; per request the time
   from sending to ``[DONE]``; added median / p99 = routed - direct.
2. throughput: a closed loop of N concurrent streams for ``--seconds`` at each ``--concurrency``,
   direct and routed; the max routed req/s is what the router sustains here. The router's own CPU
   time (from /proc) gives CPU-µs per request, i.e. what one full core would sustain.
3. the floor: the same through a bare 20-line aiohttp pass-through proxy (no routing, no checks,
   no metrics), so the router's cost can be told apart from aiohttp's own on this machine.
On a small machine the load generator, mock and router share the cores: all numbers come from the
same run, with the direct path as the baseline. Prints a table; appends one JSON line with
``--output-file``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from router_support.mock_worker import MockProcess
from router_support.procs import RouterProcess, free_port

BODY = {"text": "a short prompt", "stream": True, "sampling_params": {"max_new_tokens": 4}}
BARE_PROXY = """
import asyncio, sys, aiohttp
from aiohttp import web
async def handle(request):
    body = await request.read()
    async with request.app["s"].post(sys.argv[1] + request.path, data=body,
                                     headers={"Content-Type": "application/json"}) as r:
        resp = web.StreamResponse(headers={"Content-Type": r.content_type})
        await resp.prepare(request)
        async for chunk in r.content.iter_any():
            await resp.write(chunk)
        await resp.write_eof()
        return resp
async def main():
    app = web.Application()
    async def start(app):
        app["s"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    app.on_startup.append(start)
    app.router.add_post("/generate", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", int(sys.argv[2])).start()
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""
DONE = b"data: [DONE]\n\n"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def one(s: aiohttp.ClientSession, url: str) -> float:
    t0 = time.perf_counter()
    async with s.post(url + "/generate", json=BODY) as r:
        body = await r.read()
    if r.status != 200 or not body.endswith(DONE):
        raise RuntimeError(f"bad answer from {url}: {r.status} {body[-200:]!r}")
    return time.perf_counter() - t0


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def latency(s: aiohttp.ClientSession, direct: str, routed: str, n: int, block: int = 20) -> dict[str, Any]:
    d: list[float] = []
    r: list[float] = []
    for _ in range(10):  # warm both paths (connections, code)
        await one(s, direct)
        await one(s, routed)
    while len(d) < n:
        for _ in range(block):
            d.append(await one(s, direct))
        for _ in range(block):
            r.append(await one(s, routed))
    ms = 1000.0
    out = {"direct_median_ms": statistics.median(d) * ms, "direct_p99_ms": pct(d, 0.99) * ms,
           "routed_median_ms": statistics.median(r) * ms, "routed_p99_ms": pct(r, 0.99) * ms}
    out["added_median_ms"] = out["routed_median_ms"] - out["direct_median_ms"]
    out["added_p99_ms"] = out["routed_p99_ms"] - out["direct_p99_ms"]
    return out


async def throughput(s: aiohttp.ClientSession, url: str, concurrency: int, seconds: float) -> tuple[float, int]:
    done = 0
    stop = time.perf_counter() + seconds

    async def loop() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            await one(s, url)
            done += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return done / (time.perf_counter() - t0), done


async def cpu_per_request(s: aiohttp.ClientSession, url: str, pid: int, c: int, seconds: float) -> tuple[float, float]:
    """-> (req/s, CPU µs per request of process ``pid``) for a closed loop through ``url``."""
    cpu0 = cpu_seconds(pid)
    rps, done = await throughput(s, url, c, seconds)
    return rps, (cpu_seconds(pid) - cpu0) / max(1, done) * 1e6


async def run(args: argparse.Namespace, direct: str, routed: str, router_pid: int,
              bare: tuple[str, int] | None) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as s:
        result: dict[str, Any] = {"latency": await latency(s, direct, routed, args.requests)}
        if bare is not None:
            result["bare_proxy_latency"] = await latency(s, direct, bare[0], args.requests)
        rows = []
        for c in args.concurrency:
            d_rps, _ = await throughput(s, direct, c, args.seconds)
            r_rps, cpu_us = await cpu_per_request(s, routed, router_pid, c, args.seconds)
            row = {"concurrency": c, "direct_rps": d_rps, "routed_rps": r_rps, "router_cpu_us_per_req": cpu_us}
            if bare is not None:
                row["bare_proxy_rps"], row["bare_proxy_cpu_us_per_req"] = await cpu_per_request(
                    s, bare[0], bare[1], c, args.seconds)
            rows.append(row)
        result["throughput"] = rows
        result["max_routed_rps"] = max(row["routed_rps"] for row in rows)
        result["router_cpu_us_per_req"] = min(row["router_cpu_us_per_req"] for row in rows)
        result["one_core_rps_estimate"] = 1e6 / result["router_cpu_us_per_req"]
    return result


def table(res: dict[str, Any]) -> str:
    lat = res["latency"]
    lines = [
        (f"latency (1 at a time, {res['config']['requests']} requests per path, "
         f"{res['config']['tokens']} events, mock latency {res['config']['latency_ms']} ms)"),
        f"  direct  median {lat['direct_median_ms']:.3f} ms  p99 {lat['direct_p99_ms']:.3f} ms",
        f"  routed  median {lat['routed_median_ms']:.3f} ms  p99 {lat['routed_p99_ms']:.3f} ms",
        f"  added   median {lat['added_median_ms']:.3f} ms  p99 {lat['added_p99_ms']:.3f} ms",
        f"throughput (closed loop, {res['config']['seconds']} s per point)",
        "  concurrency  direct req/s  routed req/s  router CPU us/req  bare proxy req/s  bare proxy CPU us/req",
    ]
    for row in res["throughput"]:
        lines.append(f"  {row['concurrency']:>11}  {row['direct_rps']:>12.0f}  {row['routed_rps']:>12.0f}"
                     f"  {row['router_cpu_us_per_req']:>17.0f}  {row.get('bare_proxy_rps', 0):>16.0f}"
                     f"  {row.get('bare_proxy_cpu_us_per_req', 0):>21.0f}")
    if "bare_proxy_latency" in res:
        bare = res["bare_proxy_latency"]
        lines.insert(4, f"  (bare aiohttp proxy: added median {bare['added_median_ms']:.3f} ms"
                        f"  p99 {bare['added_p99_ms']:.3f} ms)")
    lines.append(f"max routed req/s: {res['max_routed_rps']:.0f}; router CPU per request "
                 f"{res['router_cpu_us_per_req']:.0f} us -> ~{res['one_core_rps_estimate']:.0f} req/s per full core")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latency-ms", type=float, default=2.0, help="the mock worker's fixed latency")
    p.add_argument("--tokens", type=int, default=4, help="SSE events per answer")
    p.add_argument("--requests", type=int, default=400, help="sequential requests per path for the latency part")
    p.add_argument("--seconds", type=float, default=5.0, help="duration of each throughput point")
    p.add_argument("--concurrency", type=int, nargs="+", default=[16, 64, 128])
    p.add_argument("--router-arg", action="append", default=[], help="extra router flag (repeatable)")
    p.add_argument("--no-baseline", action="store_true", help="skip the bare aiohttp proxy measurements")
    p.add_argument("--output-file", help="append the result as one JSON line")
    args = p.parse_args()
    mock = MockProcess("--latency-ms", str(args.latency_ms), "--num-tokens", str(args.tokens))
    router = None
    bare = None
    try:
        router = RouterProcess("--worker-urls", mock.url, "--policy", "round_robin", "--max-concurrent-requests",
                               "1024", "--log-level", "warning", *args.router_arg, wait_ready=True)
        target = None
        if not args.no_baseline:
            port = free_port()
            bare = subprocess.Popen([sys.executable, "-c", BARE_PROXY, mock.url, str(port)], stdout=subprocess.PIPE,
                                    text=True)
            assert bare.stdout is not None and bare.stdout.readline().strip() == "ready", "bare proxy did not start"
            target = (f"http://127.0.0.1:{port}", bare.pid)
        res = asyncio.run(run(args, mock.url, router.url, router.proc.pid, target))
    finally:
        if bare is not None:
            bare.kill()
            bare.wait(timeout=10)
        if router is not None:
            router.stop()
        mock.stop()
    res["config"] = {"latency_ms": args.latency_ms, "tokens": args.tokens, "requests": args.requests,
                     "seconds": args.seconds, "concurrency": args.concurrency, "router_args": args.router_arg}
    res["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "load_avg": os.getloadavg()}
    res["date"] = time.strftime("%Y-%m-%d")
    print(table(res))
    if args.output_file:
        with open(args.output_file, "a") as f:
            f.write(json.dumps(res) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
