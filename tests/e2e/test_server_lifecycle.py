"""Server lifecycle: flags and config, auth, payload and queue limits, SIGTERM drain, a dying child."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import pytest
import requests
from server_process import REPO, ServerProcess

LONG = {"temperature": 0, "max_new_tokens": 1900, "ignore_eos": True}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sglang_pd.launch_server", *args], capture_output=True, text=True, timeout=60, cwd=REPO
    )


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--model-path", "x", "--page-size", "0"], "page_size"),
        (["--model-path", "x", "--port", "notanint"], "--port"),
        (["--model-path", "x", "--dtype", "float8"], "--dtype"),
        (["--model-path", "x", "--mem-fraction-static", "1.5"], "mem_fraction_static"),
        (["--model-path", "x", "--no-such-flag"], "--no-such-flag"),
    ],
)
def test_invalid_flags_fail_with_one_line_and_exit_2(flags, needle):
    out = run_cli(*flags)
    assert out.returncode == 2
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], out.stderr


def test_config_file_and_cli_precedence(tiny_llama, tmp_path):
    cfg = tmp_path / "config.yaml"
    cfg.write_text("page-size: 8\nschedule-policy: lpm\nserved_model_name: from-yaml\nmax-running-requests: 3\n")
    srv = ServerProcess(tiny_llama, "--config", str(cfg), "--max-running-requests", "5")
    try:
        info = requests.get(srv.url + "/get_server_info", timeout=5).json()
        assert info["page_size"] == 8 and info["schedule_policy"] == "lpm" and info["served_model_name"] == "from-yaml"
        assert info["max_running_requests"] == 5
    finally:
        srv.stop()
    bad = tmp_path / "bad.yaml"
    bad.write_text("nonsense-flag: 1\n")
    out = run_cli("--model-path", tiny_llama, "--config", str(bad))
    assert out.returncode == 2 and "nonsense-flag" in out.stderr


@pytest.fixture(scope="module")
def strict_server(tiny_llama):
    srv = ServerProcess(
        tiny_llama,
        "--api-key",
        "sekret",
        "--max-payload-size",
        "2000",
        "--max-running-requests",
        "1",
        "--max-queued-requests",
        "0",
        "--enable-metrics",
    )
    yield srv
    srv.stop()


def test_api_key_payload_limit_and_full_queue(strict_server):
    url, auth = strict_server.url, {"Authorization": "Bearer sekret"}
    body = {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2}}
    r = requests.post(url + "/generate", json=body, timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == 401
    r = requests.post(url + "/generate", json=body, headers={"Authorization": "Bearer wrong"}, timeout=10)
    assert r.status_code == 401
    assert requests.get(url + "/health", timeout=5).status_code == 200  # open without a key
    assert requests.get(url + "/metrics", timeout=5).status_code == 200
    assert requests.post(url + "/generate", json=body, headers=auth, timeout=30).status_code == 200
    r = requests.post(url + "/generate", data="x" * 5000, headers=auth, timeout=10)
    assert r.status_code == 413 and r.json()["error"]["code"] == 413
    # One request running fills the batch; with no queue allowed the next gets 503 + Retry-After.
    with requests.post(
        url + "/generate",
        json={"input_ids": [1, 2], "sampling_params": LONG, "stream": True},
        headers=auth,
        stream=True,
        timeout=60,
    ) as running:
        assert running.status_code == 200, running.text
        lines = running.iter_lines()  # keep the iterator: dropping it makes requests close the connection
        assert b"output_ids" in next(lines)
        r = requests.post(url + "/generate", json=body, headers=auth, timeout=10)
        assert r.status_code == 503 and "Retry-After" in r.headers
    assert requests.post(url + "/generate", json=body, headers=auth, timeout=30).status_code == 200


def test_sigterm_drains_then_aborts_and_exits_zero(tiny_llama):
    srv = ServerProcess(tiny_llama, "--shutdown-timeout", "1")
    results: dict[str, object] = {}

    def long_request() -> None:
        r = requests.post(
            srv.url + "/generate",
            json={"input_ids": [1, 2], "sampling_params": {**LONG, "max_new_tokens": 2000}},
            timeout=60,
        )
        results["long"] = r.json()

    def short_request() -> None:
        r = requests.post(
            srv.url + "/generate", json={"input_ids": [3], "sampling_params": {"max_new_tokens": 8}}, timeout=60
        )
        results["short"] = r.json()

    threads = [threading.Thread(target=long_request), threading.Thread(target=short_request)]
    for t in threads:
        t.start()
    # both reached the server (the short one may already be done) before SIGTERM
    wait_in_flight(srv.url, lambda n: n >= 2 or ("short" in results and n >= 1))
    t0 = time.monotonic()
    assert srv.terminate(timeout=30) == 0
    for t in threads:
        t.join(timeout=30)
    assert time.monotonic() - t0 < 15
    assert results["short"]["meta_info"]["finish_reason"]["type"] in ("length", "stop")
    assert results["long"]["meta_info"]["finish_reason"]["type"] == "abort"


def wait_in_flight(url: str, ready: Callable[[int], bool], timeout: float = 15) -> None:
    """Poll main's count of in-flight requests until ``ready`` holds (instead of sleeping)."""
    deadline = time.monotonic() + timeout
    while not ready(requests.get(url + "/get_server_info", timeout=5).json()["num_in_flight_reqs"]):
        assert time.monotonic() < deadline, "requests never reached the server"
        time.sleep(0.02)


def test_dead_child_turns_health_503_and_fails_in_flight(tiny_llama):
    srv = ServerProcess(tiny_llama)
    try:
        sched = requests.get(srv.url + "/get_server_info", timeout=5).json()["process_ids"]["scheduler"]
        results: dict[str, object] = {}

        def request() -> None:
            r = requests.post(srv.url + "/generate", json={"input_ids": [1], "sampling_params": LONG}, timeout=60)
            results["r"] = (r.status_code, r.json())

        t = threading.Thread(target=request)
        t.start()
        wait_in_flight(srv.url, lambda n: n >= 1)
        os.kill(sched, signal.SIGKILL)
        t.join(timeout=20)
        assert not t.is_alive(), "request hung after the scheduler died"
        status, body = results["r"]
        assert body["meta_info"]["finish_reason"]["type"] == "abort"
        deadline = time.monotonic() + 5
        while requests.get(srv.url + "/health", timeout=5).status_code != 503:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert "died" in requests.get(srv.url + "/health", timeout=5).json()["reason"]
    finally:
        srv.stop()
