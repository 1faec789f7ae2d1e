"""Run ``deploy/local_cluster.py`` (N prefill + M decode workers + router) for a test, and always stop it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from server_process import REPO, free_port_block


class Cluster:
    def __init__(
        self,
        model_path: str,
        prefill: int,
        decode: int,
        *,
        worker_args: tuple[str, ...] = (),
        router_args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        timeout: float = 180,
        device: str = "cpu",
        gpu_ids: tuple[int, ...] | None = None,
    ) -> None:
        self.log_dir = Path(tempfile.mkdtemp(prefix="pd-cluster-"))
        n = prefill + decode
        base = free_port_block(2 * n + 1)  # workers, then bootstrap ports, then the router
        cmd = [
            sys.executable,
            str(REPO / "deploy" / "local_cluster.py"),
            "--model-path",
            model_path,
            "--prefill",
            str(prefill),
            "--decode",
            str(decode),
            "--port",
            str(base + 2 * n),
            "--base-port",
            str(base),
            "--bootstrap-base-port",
            str(base + n),
            "--log-dir",
            str(self.log_dir),
            "--device",
            device,
            *(["--gpu-ids", ",".join(map(str, gpu_ids))] if gpu_ids else []),
            *[f"--worker-arg={a}" for a in worker_args],
            *[f"--router-arg={a}" for a in router_args],
        ]
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        self.info = self._read_info(timeout)
        self.url: str = self.info["router"]
        self.prefill: list[str] = self.info["prefill"]
        self.decode: list[str] = self.info["decode"]

    def _read_info(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        lines = []
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("{"):
                return json.loads(line)
        self.stop()
        raise RuntimeError("cluster did not start:\n" + "".join(lines)[-4000:] + self.logs())

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}" for p in sorted(self.log_dir.glob("*.log"))
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=45)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
