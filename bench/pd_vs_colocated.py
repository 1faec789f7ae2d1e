"""Prefill/decode disaggregation against colocated workers on the same two GPUs, over a request-rate sweep.

    python bench/pd_vs_colocated.py --device cuda                      # everything (see the time below)
    python bench/pd_vs_colocated.py --systems pd --workloads long       # one slice; rows accumulate
    python bench/pd_vs_colocated.py --report-only                       # tables + plots from raw.jsonl

Systems, each started with deploy/local_cluster.py and stopped before the next one:
  pd:        1 prefill worker (GPU 0) + 1 decode worker (GPU 1) behind the router (PD mode);
  colocated: 2 regular workers (GPU 0, GPU 1) behind the router (regular mode, its default policy).
Model: Llama-3.1-8B shapes with dummy weights (bench/model_shapes.py; workers get
--load-format dummy), or --model-path DIR (e.g. a tiny model for a CPU smoke run).
Workloads (token ids, backend sglang, streaming, EOS ignored, Poisson arrivals, same seed for both
systems so both get the same requests at each rate):
  long:  input uniform 4096-8192 tokens, output 256-512 (random-ids, ratio 0.5);
  mixed: chat-synthetic (ShareGPT-like lognormal lengths, <= 1024 in / 1024 out) with 20% long-document
         requests (input 4096-8192): short chats decoding while long prompts arrive;
  chat:  chat-synthetic alone (short prompts: where PD is expected to gain least), not run by default.
Each point sends max(--min-prompts, rate * --point-seconds) requests (same for both systems)
after --warmup-requests, with --flush-cache.

SLO (default ``--goodput ttft:3000 itl:150``): a request is good when its first token comes within
3 s and no gap between two of its tokens exceeds 150 ms (serving_lib/slo.py: ``itl`` bounds the
request's largest gap). The ITL bound is the decode-interference test: a colocated worker runs each
prompt chunk (up to --chunked-prefill-size, 8192 tokens by default) in the same step as its decodes,
so a long prefill stalls every running stream for that step (a few hundred ms for 4-8k tokens of an
8B model), while a healthy 8B decode step on an H200 is tens of ms; 150 ms is a stall a reader of a
stream notices. The TTFT bound is 5-10x the bare prefill of an 8k prompt, so it fails only requests
that queue for prefill, which is where PD (one prefill GPU against two) is expected to lose.

Rows accumulate in --out-dir/raw.jsonl across invocations (--fresh starts it over; for a rerun
point the last row wins), so a sweep can run in slices and --report-only joins them.
Writes to --out-dir: raw.jsonl (every point, tagged pd / colocated, labels.workload), WORKLOAD.md
(rates x p99 ITL, p99 TTFT, output throughput, goodput for both, ratios pd/colocated),
WORKLOAD_*.png (serving_lib/plots.py) and summary.md (a section for bench/RESULTS.md), and prints them.
Time on 2x H200 (measured 2026-11-22): a cluster starts in ~40 s; ``--workloads long --request-rates
1,2,3 --point-seconds 20`` for both systems took 196 s, ``mixed`` at 2,4,8 took 226 s. The defaults
(4 rates per workload, 40 s points) take roughly three times that.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import queue
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
if str(BENCH) not in sys.path:
    sys.path.append(str(BENCH))  # last: bench/kernels.py must not shadow the pd_kernels/ package

from serving_lib.compare import summary_markdown, workload_table  # noqa: E402
from serving_lib.plots import load_rows, plot_sweep, select_rows  # noqa: E402

SYSTEMS: dict[str, tuple[int, int]] = {"pd": (1, 1), "colocated": (0, 2)}  # (--prefill, --decode)
DEFAULT_SLO = ("ttft:3000", "itl:150")


@dataclass(frozen=True)
class Workload:
    bench_args: tuple[str, ...]
    rates: tuple[float, ...]  # default sweep on 2x H200 (--request-rates overrides)


WORKLOADS: dict[str, Workload] = {
    "long": Workload(
        (
            "--dataset-name",
            "random-ids",
            "--random-input-len",
            "8192",
            "--random-output-len",
            "512",
            "--random-range-ratio",
            "0.5",
        ),
        (0.5, 1.0, 2.0, 3.0),
    ),
    "mixed": Workload(
        (
            "--dataset-name",
            "chat-synthetic",
            "--random-input-len",
            "1024",
            "--random-output-len",
            "1024",
            "--chat-long-fraction",
            "0.2",
            "--chat-long-input-len",
            "8192",
        ),
        (1.0, 2.0, 4.0, 8.0),
    ),
    "chat": Workload(
        ("--dataset-name", "chat-synthetic", "--random-input-len", "1024", "--random-output-len", "1024"),
        (2.0, 4.0, 8.0, 16.0),
    ),
}


def log(msg: str) -> None:
    print(f"[pd_vs_colocated {datetime.now().strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", help="checkpoint dir (default: Llama-3.1-8B config + dummy weights)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--systems", type=csv, default=list(SYSTEMS), help=f"comma list of {list(SYSTEMS)}")
    ap.add_argument("--workloads", type=csv, default=["long", "mixed"], help=f"comma list of {list(WORKLOADS)}")
    ap.add_argument(
        "--request-rates",
        type=lambda s: [float(x) for x in csv(s)],
        help="req/s for every workload (default: "
        + "; ".join(f"{w} {','.join(f'{r:g}' for r in wl.rates)}" for w, wl in WORKLOADS.items())
        + ")",
    )
    ap.add_argument("--num-prompts", type=int, help="requests per point (default: see --point-seconds)")
    ap.add_argument("--point-seconds", type=float, default=40.0, help="arrivals span about this long per point")
    ap.add_argument("--min-prompts", type=int, default=24)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--warmup-requests", type=int, default=4)
    ap.add_argument("--goodput", nargs="+", default=list(DEFAULT_SLO), metavar="KEY:MS")
    ap.add_argument("--worker-arg", action="append", default=[], help="extra worker flag, --worker-arg=--flag=value")
    ap.add_argument("--router-arg", action="append", default=[], help="extra router flag, --router-arg=--flag=value")
    ap.add_argument(
        "--bench-arg",
        action="append",
        default=[],
        help="extra bench/serving.py flag after the workload's (wins), --bench-arg=--flag=value",
    )
    ap.add_argument("--show-progress", action="store_true", help="let the benchmark draw its progress bar")
    ap.add_argument("--base-port", type=int, default=31000, help="workers B, B+1; bootstrap B+10..; router B+20")
    ap.add_argument("--out-dir", default=str(BENCH / "results" / "pd_vs_colocated"))
    ap.add_argument("--fresh", action="store_true", help="start a new raw.jsonl (default: append; last row wins)")
    ap.add_argument("--report-only", action="store_true", help="only rebuild tables and plots from raw.jsonl")
    ap.add_argument(
        "--timeout",
        type=float,
        default=4 * 3600.0,
        help="seconds: no point starts after it and a running one is cut at it; stopping the cluster "
        "(seconds, at most ~2 min) and the report follow",
    )
    ap.add_argument("--startup-timeout", type=float, default=900.0, help="seconds for a cluster to become healthy")
    ap.add_argument("--point-timeout", type=float, default=900.0, help="seconds for one benchmark point")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    bad = [s for s in args.systems if s not in SYSTEMS] + [w for w in args.workloads if w not in WORKLOADS]
    if bad:
        ap.error(f"unknown systems/workloads: {bad}")
    return args


def prepare_model(args: argparse.Namespace) -> tuple[str, list[str], int]:
    """(model path, worker args it needs, vocab size for random ids)."""
    extra: list[str] = []
    if args.model_path:
        path = Path(args.model_path)
    else:
        from model_shapes import write_config

        path = write_config(Path(tempfile.mkdtemp(prefix="llama-3.1-8b-")))
        extra = ["--load-format=dummy"]  # local_cluster splits --worker-arg values at the first "="
    try:
        vocab = int(json.loads((path / "config.json").read_text())["vocab_size"])
    except (OSError, ValueError, KeyError) as exc:
        raise SystemExit(f"error: --model-path {path}: no readable config.json with vocab_size ({exc})") from None
    return str(path), extra, vocab


class Cluster:
    """deploy/local_cluster.py in its own session; ``stop`` always ends the whole group."""

    def __init__(self, args: argparse.Namespace, system: str, model_path: str, worker_args: list[str]) -> None:
        prefill, decode = SYSTEMS[system]
        self.log_dir = Path(tempfile.mkdtemp(prefix=f"pd-vs-colocated-{system}-"))
        b = args.base_port
        cmd = [
            sys.executable,
            str(REPO / "deploy" / "local_cluster.py"),
            "--model-path",
            model_path,
            "--prefill",
            str(prefill),
            "--decode",
            str(decode),
            "--device",
            args.device,
            "--port",
            str(b + 20),
            "--base-port",
            str(b),
            "--bootstrap-base-port",
            str(b + 10),
            "--log-dir",
            str(self.log_dir),
            "--startup-timeout",
            str(args.startup_timeout),
            *[f"--worker-arg={a}" for a in worker_args],
            *[f"--router-arg={a}" for a in args.router_arg],
        ]
        log(f"starting {system}: {shlex.join(cmd)}")
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, start_new_session=True
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        """The cluster's JSON line (router/prefill/decode URLs); raises RuntimeError with the logs' tails."""
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            if line is None:  # stdout closed: the cluster is exiting; its exit status follows shortly
                try:
                    self.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    pass
                break
            seen.append(line)
            if line.startswith("{"):
                return json.loads(line)
        logs = self.logs()
        last = next(
            (x for x in reversed((logs + "".join(seen)).splitlines()) if x.strip() and not x.startswith("---")), ""
        )
        what = "did not start in time" if self.proc.poll() is None else f"exited ({self.proc.returncode})"
        raise RuntimeError(f"cluster {what}; last log line: {last.strip()[:300]}\n" + "".join(seen)[-3000:] + logs)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def logs(self) -> str:
        return "".join(
            f"\n--- {p.name}\n{p.read_text(errors='replace')[-1500:]}" for p in sorted(self.log_dir.glob("*.log"))
        )

    def stop(self, timeout: float = 90.0) -> None:
        """SIGTERM (local_cluster stops its workers and router, killing those that linger), then
        SIGKILL to the whole process group if local_cluster itself does not exit in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
                return
            except subprocess.TimeoutExpired:
                log("cluster did not stop in time: killing its process group")
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the group is this session's: local_cluster + children
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)


def num_prompts(args: argparse.Namespace, rate: float) -> int:
    return args.num_prompts or max(args.min_prompts, math.ceil(rate * args.point_seconds))


def bench_command(
    args: argparse.Namespace,
    url: str,
    system: str,
    workload: str,
    rate: float,
    vocab: int,
    raw: Path,
    run_labels: tuple[str, ...] = (),
) -> list[str]:
    """``run_labels``: ``KEY=VALUE`` labels of this invocation (machine, command) carried by every row."""
    labels = [x for kv in (f"workload={workload}", *run_labels) for x in ("--label", kv)]
    return [
        sys.executable,
        str(BENCH / "serving.py"),
        "--base-url",
        url,
        "--backend",
        "sglang",
        *WORKLOADS[workload].bench_args,
        "--num-prompts",
        str(num_prompts(args, rate)),
        "--request-rate",
        f"{rate:g}",
        "--seed",
        str(args.seed),
        "--random-vocab-size",
        str(vocab),
        "--warmup-requests",
        str(args.warmup_requests),
        "--flush-cache",
        "--goodput",
        *args.goodput,
        "--tag",
        system,
        *labels,
        "--output-file",
        str(raw),
        *([] if args.show_progress else ["--disable-tqdm"]),
        *[x for a in args.bench_arg for x in a.split("=", 1)],
    ]


def run_point(cmd: list[str], timeout: float, raw: Path) -> bool:
    """One bench/serving.py run; True when it appended its row (it may still have failed requests)."""
    before = len(raw.read_text().splitlines()) if raw.exists() else 0
    log(f"bench: {shlex.join(cmd)}")
    try:
        proc = subprocess.run(cmd, cwd=REPO, timeout=timeout)
    except subprocess.TimeoutExpired:
        log(f"bench point timed out after {timeout:.0f} s; no row for it")
        return False
    after = len(raw.read_text().splitlines()) if raw.exists() else 0
    if after <= before:
        log(f"bench exited with {proc.returncode} and wrote no row")
    return after > before


def run_system(
    args: argparse.Namespace,
    system: str,
    model: tuple[str, list[str], int],
    raw: Path,
    deadline: float,
    run_labels: tuple[str, ...],
) -> str | None:
    """Every (workload, rate) point of one system on one cluster; returns a failure note or None."""
    path, model_args, vocab = model
    cluster = Cluster(args, system, path, model_args + args.worker_arg)
    try:
        info = cluster.wait_ready(min(args.startup_timeout + 60, max(deadline - time.monotonic(), 1)))
        log(f"{system} ready: {info}")
        for workload in args.workloads:
            for rate in args.request_rates or WORKLOADS[workload].rates:
                left = deadline - time.monotonic()
                if left < 30:
                    return f"{system}: --timeout reached before {workload} at rate {rate:g}"
                if not cluster.alive():
                    return f"{system}: cluster exited during the sweep{cluster.logs()}"
                cmd = bench_command(args, info["router"], system, workload, rate, vocab, raw, run_labels)
                run_point(cmd, min(args.point_timeout, left), raw)
        return None
    except RuntimeError as exc:
        return f"{system}: {exc}"
    finally:
        cluster.stop()
        log(f"{system} stopped (logs in {cluster.log_dir})")


def machine() -> str:
    try:
        gpus = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=20
        ).stdout.split("\n")
        names = [g.strip() for g in gpus if g.strip()]
    except (OSError, subprocess.SubprocessError):
        names = []
    gpu = f"{len(names)}x {names[0]}" if names else "no GPU"
    return f"{gpu}, {os.cpu_count()} CPU cores, {platform.system()} {platform.machine()}"


def report(args: argparse.Namespace, raw: Path, out_dir: Path, notes: list[str]) -> str:
    rows = load_rows([raw]) if raw.exists() else []
    tables: dict[str, str] = {}
    for workload in args.workloads:
        table = workload_table(rows, workload)
        tables[workload] = table
        (out_dir / f"{workload}.md").write_text(table + "\n")
        try:
            plot_sweep(select_rows(rows, {"labels.workload": workload}), out_dir, f"{workload}_", f"{workload}:")
        except RuntimeError as exc:
            notes.append(f"plots not written: {exc}")
    shown = [r for r in rows if (r.get("labels") or {}).get("workload") in args.workloads]
    facts = [
        ("dates (UTC)", _distinct(str(r.get("date", ""))[:10] for r in shown)),
        ("machine", _distinct((r.get("labels") or {}).get("machine") for r in shown)),
        ("commands", _distinct(f"`{c}`" for r in shown if (c := (r.get("labels") or {}).get("command")))),
        ("model", _distinct(_model_desc(r.get("model")) for r in shown)),
        (
            "router",
            "PD mode for pd, regular mode for colocated; its default policy (cache_aware) unless a "
            "command sets --router-arg=--policy=...",
        ),
        (
            "SLO",
            _distinct(json.dumps(r.get("goodput_slo")) for r in shown)
            + " in ms; itl = a request's largest inter-token gap",
        ),
        ("workloads", "; ".join(f"{w}: {' '.join(WORKLOADS[w].bench_args)}" for w in args.workloads)),
        ("raw", str(raw)),
    ]
    text = summary_markdown("PD (1P+1D) vs colocated (2 workers) on the same GPUs", facts, tables, notes)
    (out_dir / "summary.md").write_text(text)
    return text


def _model_desc(model: Any) -> str | None:
    if isinstance(model, str) and Path(model).name.startswith("llama-3.1-8b-"):  # prepare_model's temp dir
        return "Llama-3.1-8B shapes, dummy bf16 weights"
    return model


def _distinct(values: Iterable[Any]) -> str:
    seen = list(dict.fromkeys(str(v) for v in values if v))
    return "; ".join(seen) if seen else "n/a"


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = out_dir / "raw.jsonl"
    notes: list[str] = []
    if not args.report_only:
        if args.fresh and raw.exists():
            raw.unlink()
        deadline = time.monotonic() + args.timeout
        model = prepare_model(args)
        run_labels = (f"machine={machine()}", f"command=python {shlex.join(['bench/pd_vs_colocated.py', *args.argv])}")
        signal.signal(signal.SIGTERM, _interrupt)  # so that `finally` stops the cluster on SIGTERM too
        try:
            for system in args.systems:
                note = run_system(args, system, model, raw, deadline, run_labels)
                if note:
                    log(f"FAILED {note}")
                    notes.append(f"- failed: {note.splitlines()[0]}")
        except KeyboardInterrupt:
            log("interrupted: the cluster is stopped; reporting what ran")
            notes.append("- interrupted before the end of the sweep")
    print(report(args, raw, out_dir, notes), flush=True)
    rows = load_rows([raw]) if raw.exists() else []
    return 0 if any(r.get("completed") for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
