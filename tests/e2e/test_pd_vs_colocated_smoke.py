"""bench/pd_vs_colocated.py end to end on CPU: both clusters start, serve one short sweep point, stop."""

from __future__ import annotations

import json
import subprocess
import sys

from server_process import REPO, free_port_block


def test_pd_vs_colocated_cpu_smoke(tiny_model_dir, tmp_path) -> None:
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        str(REPO / "bench" / "pd_vs_colocated.py"),
        "--device",
        "cpu",
        "--model-path",
        str(tiny_model_dir("llama")),
        "--workloads",
        "mixed",
        "--request-rates",
        "4",
        "--num-prompts",
        "4",
        "--warmup-requests",
        "1",
        "--base-port",
        str(free_port_block(21)),
        "--out-dir",
        str(out),
        "--startup-timeout",
        "120",
        "--timeout",
        "150",
        "--bench-arg=--random-input-len=24",
        "--bench-arg=--random-output-len=6",
        "--bench-arg=--chat-long-input-len=64",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = [json.loads(line) for line in (out / "raw.jsonl").read_text().splitlines()]
    assert sorted(r["tag"] for r in rows) == ["colocated", "pd"]
    for r in rows:
        assert r["completed"] == 4 and r["failed"] == 0 and r["labels"]["workload"] == "mixed"
        assert r["labels"]["command"].startswith("python bench/pd_vs_colocated.py --device cpu")
        assert r["flush_cache"] == "ok" and r["goodput_slo"] == {"ttft": 3000.0, "itl": 150.0}
        assert r["dataset_name"] == "chat-synthetic" and r["request_rate"] == 4.0
    assert [r["total_input_tokens"] for r in rows][0] == rows[1]["total_input_tokens"]  # the same requests
    table = (out / "mixed.md").read_text()
    assert table.startswith("| rate req/s | ok pd | ok colocated |") and "| 4 | 4/4 | 4/4 |" in table
    assert (out / "mixed_p99_itl_vs_rate.png").exists() and "## PD (1P+1D) vs colocated" in proc.stdout
    assert (out / "summary.md").read_text() in proc.stdout


def test_pd_vs_colocated_reports_a_cluster_that_fails_to_start(tiny_model_dir, tmp_path) -> None:
    cmd = [
        sys.executable,
        str(REPO / "bench" / "pd_vs_colocated.py"),
        "--device",
        "cpu",
        "--model-path",
        str(tiny_model_dir("llama")),
        "--systems",
        "pd",
        "--workloads",
        "long",
        "--worker-arg=--no-such-flag",
        "--base-port",
        str(free_port_block(21)),
        "--out-dir",
        str(tmp_path),
        "--startup-timeout",
        "60",
        "--timeout",
        "90",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1  # nothing completed
    assert (
        "- failed: pd: cluster exited (1); last log line: sglang-pd-server: error: unrecognized arguments"
        in proc.stdout
    )
    assert "| (no data) |" in (tmp_path / "long.md").read_text()
