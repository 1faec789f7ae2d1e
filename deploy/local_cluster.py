"""Start N prefill workers, M decode workers and the router on one machine; stop them all on Ctrl-C/SIGTERM.

    python deploy/local_cluster.py --model-path DIR --prefill 1 --decode 1 [--port 8000] [--device cpu]
        [--worker-arg=--page-size=16 ...] [--router-arg=--policy=round_robin ...]

Ports: workers from --base-port up (prefill first), bootstrap ports from --bootstrap-base-port up,
the router on --port. Security: the cluster runs signed (README "Security"): a fresh random secret is
written to LOG_DIR/cluster.secret (mode 0600) and given to every worker and the router as
--cluster-secret-file; --cluster-secret-file FILE uses yours, --no-cluster-secret runs unsigned (private
network only). The JSON line names the file ("cluster_secret_file"), so a worker started later can join.
With --device cuda, prefill i uses GPU i and decode j uses GPU N + j (--base-gpu-id), or the i-th entry of
--gpu-ids (prefill first; e.g. --gpu-ids 0,0 puts P and D on one GPU: give them --max-total-tokens and a
small --mem-fraction-static). With --prefill 0 the workers are colocated (--decode M regular workers, router in
regular mode). Prints one JSON line with the URLs once everything is healthy (tests read it), then
a curl line for people, and waits.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Proc:
    name: str
    url: str
    popen: subprocess.Popen


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "UCX_WARN_UNUSED_ENV_VARS": "n",
    }


def secret_args(args: argparse.Namespace) -> list[str]:
    return ["--cluster-secret-file", args.cluster_secret_file] if args.cluster_secret_file else []


def make_secret(log_dir: Path) -> str:
    """A fresh random cluster secret in ``log_dir``/cluster.secret, readable by this user only; its path."""
    path = log_dir / "cluster.secret"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    os.chmod(path, 0o600)
    return str(path)


def start_worker(args: argparse.Namespace, mode: str, index: int, port: int, gpu: int, log_dir: Path) -> Proc:
    cmd = [
        sys.executable,
        "-m",
        "sglang_pd.launch_server",
        "--model-path",
        args.model_path,
        "--host",
        args.host,
        "--port",
        str(port),
        "--device",
        args.device,
        *secret_args(args),
        *args.worker_arg,
    ]
    if mode != "null":
        cmd += ["--disaggregation-mode", mode]
    if mode == "prefill":
        cmd += ["--disaggregation-bootstrap-port", str(args.bootstrap_base_port + index)]
    if args.device == "cuda":
        cmd += ["--base-gpu-id", str(gpu)]
    name = f"{mode if mode != 'null' else 'worker'}{index}"
    log = open(log_dir / f"{name}.log", "w")
    popen = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=REPO)
    return Proc(name, f"http://{args.host}:{port}", popen)


def start_router(args: argparse.Namespace, prefills: list[Proc], decodes: list[Proc], log_dir: Path) -> Proc:
    cmd = [
        sys.executable,
        "-m",
        "router.launch_router",
        "--host",
        args.host,
        "--port",
        str(args.port),
        *secret_args(args),
        *args.router_arg,
    ]
    if prefills:
        cmd.append("--pd-disaggregation")
        for i, p in enumerate(prefills):
            cmd += ["--prefill", p.url, str(args.bootstrap_base_port + i)]
        for d in decodes:
            cmd += ["--decode", d.url]
    else:
        cmd += ["--worker-urls", *[d.url for d in decodes]]
    log = open(log_dir / "router.log", "w")
    popen = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=REPO)
    return Proc("router", f"http://{args.host}:{args.port}", popen)


def wait_healthy(procs: list[Proc], timeout: float, log_dir: Path) -> None:
    deadline = time.monotonic() + timeout
    pending = list(procs)
    while pending:
        for p in list(pending):
            if p.popen.poll() is not None:
                tail = (log_dir / f"{p.name}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{p.name} exited with {p.popen.returncode}:\n{tail}")
            try:
                with urllib.request.urlopen(p.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        pending.remove(p)
            except (OSError, http.client.HTTPException):
                pass  # not up yet
        if pending and time.monotonic() > deadline:
            raise TimeoutError(f"not healthy within {timeout}s: {[p.name for p in pending]} (logs in {log_dir})")
        time.sleep(0.2)


def stop_all(procs: list[Proc]) -> None:
    for p in procs:
        if p.popen.poll() is None:
            p.popen.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    for p in procs:
        try:
            p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.popen.kill()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", required=True)
    ap.add_argument("--prefill", type=int, default=1, help="prefill workers (0: colocated workers)")
    ap.add_argument("--decode", type=int, default=1, help="decode workers (or colocated workers with --prefill 0)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000, help="router port")
    ap.add_argument("--base-port", type=int, default=30000, help="first worker port")
    ap.add_argument("--bootstrap-base-port", type=int, default=8998)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument(
        "--gpu-ids", default=None, help="cuda: comma-separated GPU per worker, prefill first (default 0, 1, ...)"
    )
    ap.add_argument(
        "--worker-arg",
        action="append",
        default=[],
        help="extra worker flag (repeatable; use --worker-arg=--flag=value)",
    )
    ap.add_argument("--router-arg", action="append", default=[], help="extra router flag (repeatable)")
    ap.add_argument("--log-dir", default=None)
    ap.add_argument(
        "--cluster-secret-file",
        default=None,
        help="cluster secret for every worker and the router (default: a fresh one in the log dir)",
    )
    ap.add_argument(
        "--no-cluster-secret",
        action="store_true",
        help="run the control plane unsigned (private network only; README: Security)",
    )
    ap.add_argument("--startup-timeout", type=float, default=300)
    args = ap.parse_args(argv)
    args.worker_arg = [x for a in args.worker_arg for x in a.split("=", 1)] if args.worker_arg else []
    args.router_arg = [x for a in args.router_arg for x in a.split("=", 1)] if args.router_arg else []
    return args


def gpu_ids(args: argparse.Namespace) -> list[int]:
    """The GPU of each worker, prefill first: --gpu-ids, else one GPU each in order."""
    n = args.prefill + args.decode
    if args.gpu_ids is None:
        return list(range(n))
    ids = [int(x) for x in args.gpu_ids.split(",")]
    if len(ids) != n:
        raise SystemExit(f"--gpu-ids names {len(ids)} GPUs for {n} workers")
    return ids


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log_dir = Path(args.log_dir or f"/tmp/sglang-pd-cluster-{os.getpid()}")
    log_dir.mkdir(parents=True, exist_ok=True)
    if args.no_cluster_secret:
        args.cluster_secret_file = None
    elif not args.cluster_secret_file:
        args.cluster_secret_file = make_secret(log_dir)
    mode = "prefill" if args.prefill > 0 else "null"
    gpus = gpu_ids(args)
    prefills = [start_worker(args, "prefill", i, args.base_port + i, gpus[i], log_dir) for i in range(args.prefill)]
    decodes = [
        start_worker(
            args,
            "decode" if mode == "prefill" else "null",
            j,
            args.base_port + args.prefill + j,
            gpus[args.prefill + j],
            log_dir,
        )
        for j in range(args.decode)
    ]
    procs = prefills + decodes
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    try:
        wait_healthy(procs, args.startup_timeout, log_dir)
        router = start_router(args, prefills, decodes, log_dir)
        procs.append(router)
        wait_healthy([router], 60, log_dir)
        print(
            json.dumps(
                {
                    "router": router.url,
                    "prefill": [p.url for p in prefills],
                    "decode": [d.url for d in decodes],
                    "log_dir": str(log_dir),
                    "cluster_secret_file": args.cluster_secret_file,
                }
            ),
            flush=True,
        )
        print(
            f"cluster ready; try:\n  curl -s {router.url}/generate -H 'Content-Type: application/json' "
            f'-d \'{{"text": "Hello", "sampling_params": {{"max_new_tokens": 16, "temperature": 0}}}}\'',
            flush=True,
        )
        while not stop["now"] and all(p.popen.poll() is None for p in procs):
            time.sleep(0.2)
        dead = [p.name for p in procs if p.popen.poll() is not None]
        if dead and not stop["now"]:
            print(f"stopping: {', '.join(dead)} exited (logs in {log_dir})", file=sys.stderr)
            return 1
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        stop_all(procs)


if __name__ == "__main__":
    sys.exit(main())
