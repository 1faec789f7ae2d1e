"""Router overhead: the same short streamed requests straight to a worker and through the router, one run.

    python bench/router_overhead.py [--latency-ms 2] [--tokens 4] [--requests 400] [--seconds 5] \
        [--concurrency 16 64 128] [--client lean|aiohttp] [--pd] [--no-baseline] \
        [--output-file bench/results/router_overhead.jsonl]

The worker is the router tests' mock (``tests/router_support/mock_worker.py``, an aiohttp app) in its
own process, answering after a fixed ``--latency-ms`` with ``--tokens`` SSE events, so only the
router is measured. The router is ``python -m router.launch_router`` (regular mode, one worker;
``--pd``: PD mode with a prefill and a decode mock, two legs per request, the direct path going to
the decode mock with made-up bootstrap fields), also its own process. Measurements:
1. latency: one request at a time, direct and routed in alternating blocks; per request the time
   from sending to the end of the answer; added median / p99 = routed - direct.
2. throughput: a closed loop of N concurrent streams for ``--seconds`` at each ``--concurrency``,
   direct and routed; the max routed req/s is what the router sustains here. The router's own CPU
   time (from /proc) gives CPU-µs per request, i.e. what one full core would sustain.
3. floors (regular mode, unless ``--no-baseline``): the same through two bare ~20-line
   pass-through proxies with no routing, checks or metrics: aiohttp server + aiohttp client
   ("bare aiohttp proxy"), and aiohttp server + the router's own upstream client
   (``router.h1_client``, "bare h1 proxy"). They tell the router's logic apart from its HTTP
   machinery on this machine.
Load generator (``--client``): on a small machine the generator, the mock and the router share
the cores, so the generator's own CPU per request caps what any path can show. ``lean`` (default
since 2026-11-22) is a keep-alive HTTP/1.1 client on asyncio Protocols (uvloop when installed):
one write per request, the answer complete at the chunked terminator or at Content-Length, every
answer checked for status 200 and ``data: [DONE]``. ``aiohttp`` is the ClientSession generator
used before (several times the CPU per request). Either way direct, routed and floors are measured
with the same generator in the same run, with the direct path as the baseline. Prints a table;
appends one JSON line with ``--output-file``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO / "tests"))
from router_support.mock_worker import MockProcess
from router_support.procs import RouterProcess, free_port

BODY = {"text": "a short prompt", "stream": True, "sampling_params": {"max_new_tokens": 4}}
PD_FIELDS = {"bootstrap_host": "127.0.0.1", "bootstrap_port": 8998, "bootstrap_room": 1}  # direct calls to a PD mock
BARE_AIOHTTP_PROXY = """
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
BARE_H1_PROXY = """
import asyncio, sys
from aiohttp import web
from router.h1_client import H1Client, Origin, request_bytes
async def handle(request):
    body = await request.read()
    origin = request.app["o"]
    r = await request.app["c"].request(origin, request_bytes(origin, "POST", request.path,
                                       {"Content-Type": "application/json"}, body), 60)
    resp = web.StreamResponse(headers={"Content-Type": r.content_type})
    await resp.prepare(request)
    async for chunk in r:
        await resp.write(chunk)
    r.release()
    await resp.write_eof()
    return resp
async def main():
    app = web.Application()
    app["c"], app["o"] = H1Client(30, 10), Origin.of(sys.argv[1])
    app.router.add_post("/generate", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", int(sys.argv[2])).start()
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""
DONE = b"data: [DONE]\n\n"
Caller = Callable[[], Awaitable[float]]  # one request -> its latency in seconds


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def check(url: str, status: int, body: bytes) -> None:
    if status != 200 or DONE not in body[-64:]:
        raise RuntimeError(f"bad answer from {url}: {status} {body[-200:]!r}")


# --- load generators -----------------------------------------------------------------------------------
class LeanConn(asyncio.Protocol):
    """One keep-alive connection of the lean generator; one request at a time."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.head_end = -1
        self.length: int | None = None  # Content-Length, or None for a chunked answer
        self.waiter: asyncio.Future[bytes] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if self.head_end < 0:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            self.head_end = end + 4
            found = re.search(rb"\r\ncontent-length: *(\d+)", bytes(buf[:end]).lower())
            self.length = int(found.group(1)) if found else None
        body = len(buf) - self.head_end
        if self.length is not None:
            complete = body >= self.length
        else:  # the last chunk, alone or after a data chunk's CRLF
            complete = buf.endswith(b"\r\n0\r\n\r\n") or (body == 5 and buf.endswith(b"0\r\n\r\n"))
        if complete and self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(bytes(buf))
            buf.clear()
            self.head_end = -1

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"connection lost: {exc}"))

    async def call(self, request: bytes, timeout_s: float = 60.0) -> bytes:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        waiter = self.waiter = loop.create_future()
        timer = loop.call_later(timeout_s, lambda: waiter.done() or waiter.set_exception(TimeoutError("no answer")))
        self.transport.write(request)
        try:
            return await waiter
        finally:
            timer.cancel()


class Generator:
    """Opens callers (one request at a time each) to a URL; ``lean`` or ``aiohttp``."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.session: aiohttp.ClientSession | None = None
        self.conns: list[LeanConn] = []

    async def caller(self, url: str, body: dict[str, Any]) -> Caller:
        data = json.dumps(body).encode()
        if self.kind == "aiohttp":
            if self.session is None:
                self.session = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=60)
                )
            session = self.session

            async def aiohttp_one() -> float:
                t0 = time.perf_counter()
                async with session.post(
                    url + "/generate", data=data, headers={"Content-Type": "application/json"}
                ) as r:
                    raw = await r.read()
                check(url, r.status, raw)
                return time.perf_counter() - t0

            return aiohttp_one
        host, port = url.split("//", 1)[1].rsplit(":", 1)
        _, conn = await asyncio.get_running_loop().create_connection(LeanConn, host, int(port))
        self.conns.append(conn)
        request = (
            f"POST /generate HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n"
        ).encode() + data

        async def lean_one() -> float:
            t0 = time.perf_counter()
            raw = await conn.call(request)
            check(url, int(raw[9:12]) if raw.startswith(b"HTTP/1.1 ") else 0, raw)
            return time.perf_counter() - t0

        return lean_one

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None
        for conn in self.conns:
            if conn.transport is not None:
                conn.transport.close()
        self.conns.clear()


# --- measurements --------------------------------------------------------------------------------------
def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def latency(
    gen: Generator, direct: tuple[str, dict[str, Any]], other: tuple[str, dict[str, Any]], n: int, block: int = 20
) -> dict[str, Any]:
    one_d, one_r = await gen.caller(*direct), await gen.caller(*other)
    d: list[float] = []
    r: list[float] = []
    for _ in range(10):  # warm both paths (connections, code)
        await one_d()
        await one_r()
    while len(d) < n:
        d.extend([await one_d() for _ in range(block)])
        r.extend([await one_r() for _ in range(block)])
    ms = 1000.0
    out = {
        "direct_median_ms": statistics.median(d) * ms,
        "direct_p99_ms": pct(d, 0.99) * ms,
        "routed_median_ms": statistics.median(r) * ms,
        "routed_p99_ms": pct(r, 0.99) * ms,
    }
    out["added_median_ms"] = out["routed_median_ms"] - out["direct_median_ms"]
    out["added_p99_ms"] = out["routed_p99_ms"] - out["direct_p99_ms"]
    return out


async def throughput(
    gen: Generator, target: tuple[str, dict[str, Any]], concurrency: int, seconds: float, pid: int | None = None
) -> tuple[float, float | None]:
    """-> (req/s, CPU µs per request of process ``pid``) for a closed loop of ``concurrency`` streams."""
    callers = [await gen.caller(*target) for _ in range(concurrency)]
    done = 0
    stop = time.perf_counter() + seconds

    async def loop(one: Caller) -> None:
        nonlocal done
        while time.perf_counter() < stop:
            await one()
            done += 1

    cpu0 = cpu_seconds(pid) if pid else 0.0
    t0 = time.perf_counter()
    await asyncio.gather(*(loop(one) for one in callers))
    rps = done / (time.perf_counter() - t0)
    cpu = (cpu_seconds(pid) - cpu0) / max(1, done) * 1e6 if pid else None
    await gen.close()
    return rps, cpu


async def run(
    args: argparse.Namespace, direct: str, routed: str, router_pid: int, floors: dict[str, tuple[str, int]]
) -> dict[str, Any]:
    gen = Generator(args.client)
    d = (direct, {**BODY, **PD_FIELDS} if args.pd else BODY)
    r = (routed, BODY)
    result: dict[str, Any] = {"latency": await latency(gen, d, r, args.requests)}
    for name, (url, _) in floors.items():
        result[f"{name}_latency"] = await latency(gen, d, (url, BODY), args.requests)
    await gen.close()
    rows = []
    for c in args.concurrency:
        row: dict[str, Any] = {"concurrency": c, "direct_rps": (await throughput(gen, d, c, args.seconds))[0]}
        row["routed_rps"], row["router_cpu_us_per_req"] = await throughput(gen, r, c, args.seconds, router_pid)
        for name, (url, pid) in floors.items():
            row[f"{name}_rps"], row[f"{name}_cpu_us_per_req"] = await throughput(gen, (url, BODY), c, args.seconds, pid)
        rows.append(row)
    result["throughput"] = rows
    result["max_routed_rps"] = max(row["routed_rps"] for row in rows)
    result["router_cpu_us_per_req"] = min(row["router_cpu_us_per_req"] for row in rows)
    result["one_core_rps_estimate"] = 1e6 / result["router_cpu_us_per_req"]
    return result


def table(res: dict[str, Any], floors: list[str]) -> str:
    cfg, lat = res["config"], res["latency"]
    lines = [
        (
            f"latency (1 at a time, {cfg['requests']} requests per path, {cfg['tokens']} events, mock latency "
            f"{cfg['latency_ms']} ms, {cfg['client']} client, {'PD' if cfg['pd'] else 'regular'} mode)"
        ),
        f"  direct  median {lat['direct_median_ms']:.3f} ms  p99 {lat['direct_p99_ms']:.3f} ms",
        f"  routed  median {lat['routed_median_ms']:.3f} ms  p99 {lat['routed_p99_ms']:.3f} ms",
        f"  added   median {lat['added_median_ms']:.3f} ms  p99 {lat['added_p99_ms']:.3f} ms",
    ]
    for name in floors:
        f = res[f"{name}_latency"]
        lines.append(
            f"  ({name.replace('_', ' ')}: added median {f['added_median_ms']:.3f} ms  p99 {f['added_p99_ms']:.3f} ms)"
        )
    lines.append(f"throughput (closed loop, {cfg['seconds']} s per point)")
    head = "  concurrency  direct req/s  routed req/s  router CPU us/req"
    for name in floors:
        head += f"  {name.replace('_', ' ')} req/s  CPU us/req"
    lines.append(head)
    for row in res["throughput"]:
        line = (
            f"  {row['concurrency']:>11}  {row['direct_rps']:>12.0f}  {row['routed_rps']:>12.0f}"
            f"  {row['router_cpu_us_per_req']:>17.0f}"
        )
        for name in floors:
            line += f"  {row[f'{name}_rps']:>{len(name) + 6}.0f}  {row[f'{name}_cpu_us_per_req']:>10.0f}"
        lines.append(line)
    lines.append(
        f"max routed req/s: {res['max_routed_rps']:.0f}; router CPU per request "
        f"{res['router_cpu_us_per_req']:.0f} us -> ~{res['one_core_rps_estimate']:.0f} req/s per full core"
        f"; load average {res['machine']['load_avg_before'][0]:.2f} before, "
        f"{res['machine']['load_avg'][0]:.2f} after"
    )
    return "\n".join(lines)


def start_floor(code: str, upstream: str) -> tuple[subprocess.Popen[str], str]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, "-c", code, upstream, str(port)], stdout=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready", "a bare proxy did not start"
    return proc, f"http://127.0.0.1:{port}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latency-ms", type=float, default=2.0, help="the mock worker's fixed latency")
    p.add_argument("--tokens", type=int, default=4, help="SSE events per answer")
    p.add_argument("--requests", type=int, default=400, help="sequential requests per path for the latency part")
    p.add_argument("--seconds", type=float, default=5.0, help="duration of each throughput point")
    p.add_argument("--concurrency", type=int, nargs="+", default=[16, 64, 128])
    p.add_argument("--client", choices=("lean", "aiohttp"), default="lean", help="the load generator")
    p.add_argument("--pd", action="store_true", help="PD mode: a prefill and a decode mock, two legs per request")
    p.add_argument("--router-arg", action="append", default=[], help="extra router flag (repeatable)")
    p.add_argument("--no-baseline", action="store_true", help="skip the bare proxy measurements")
    p.add_argument("--output-file", help="append the result as one JSON line")
    args = p.parse_args()
    load_before = os.getloadavg()
    mock_flags = ("--latency-ms", str(args.latency_ms), "--num-tokens", str(args.tokens))
    mocks: list[MockProcess] = []
    procs: list[subprocess.Popen[str]] = []
    router = None
    try:
        if args.pd:
            mocks = [MockProcess(*mock_flags, "--role", "prefill"), MockProcess(*mock_flags, "--role", "decode")]
            workers = ["--pd-disaggregation", "--prefill", mocks[0].url, "--decode", mocks[1].url]
        else:
            mocks = [MockProcess(*mock_flags)]
            workers = ["--worker-urls", mocks[0].url]
        router = RouterProcess(
            *workers,
            "--policy",
            "round_robin",
            "--max-concurrent-requests",
            "1024",
            "--log-level",
            "warning",
            *args.router_arg,
            wait_ready=True,
        )
        floors: dict[str, tuple[str, int]] = {}
        if not args.no_baseline and not args.pd:
            for name, code in (("bare_aiohttp_proxy", BARE_AIOHTTP_PROXY), ("bare_h1_proxy", BARE_H1_PROXY)):
                proc, url = start_floor(code, mocks[0].url)
                procs.append(proc)
                floors[name] = (url, proc.pid)
        res = asyncio.run(run(args, mocks[-1].url, router.url, router.proc.pid, floors))
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=10)
        if router is not None:
            router.stop()
        for mock in mocks:
            mock.stop()
    res["config"] = {
        "latency_ms": args.latency_ms,
        "tokens": args.tokens,
        "requests": args.requests,
        "seconds": args.seconds,
        "concurrency": args.concurrency,
        "router_args": args.router_arg,
        "client": args.client,
        "pd": args.pd,
    }
    res["machine"] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_avg": os.getloadavg(),
        "load_avg_before": load_before,
    }
    res["date"] = time.strftime("%Y-%m-%d")
    print(table(res, list(floors)))
    if args.output_file:
        with open(args.output_file, "a") as f:
            f.write(json.dumps(res) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
