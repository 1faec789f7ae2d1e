"""Issue 19, worker side, on a real 1 P + 1 D cluster (UCX over TCP) behind the real router.

- /health_generate on P and D runs locally (no peer), through the router end to end, and leaves the cluster serving;
- poison requests (integers beyond 64 bits, int64 values beyond every bound, n = 1000, a 100k-deep body,
  NaN) are 4xx JSON errors on P, D and the router, and leave no request behind;
- clients that vanish while a stream starts are aborted quietly (no traceback) and free their KV;
- a decode worker whose detokenizer is killed exits within seconds (test_worker_fuzz kills a scheduler
  and checks the exit code, on the worker it fuzzed).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import random
import signal
import socket
import struct
import time
from pathlib import Path

import pytest
import requests
from cluster import Cluster
from test_pd_cluster import wait_idle

from pd_common.cluster_auth import load_cluster_key

PAGE = ("--page-size", "4")
ROUTER = ("--policy", "round_robin", "--health-check-interval-secs", "0.5", "--health-success-threshold", "1")
GREEDY = {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True}
REPEAT = 100
BIG = str(2**64)  # one past what msgpack carries
DIGITS = "9" * 5000
INT64 = str(2**63 - 1)  # fits int64, beyond every field's bound

# (route, raw JSON body, a word the error names): each is refused at the edge
POISON: list[tuple[str, str, str]] = [
    ("/generate", '{"input_ids": [1, 2], "sampling_params": {"stop_token_ids": [%s]}}' % BIG, "out of range"),
    ("/generate", '{"input_ids": [1, 2], "sampling_params": {"stop_token_ids": [%s]}}' % INT64, "stop_token_ids"),
    ("/generate", '{"input_ids": [1, 2], "sampling_params": {"max_new_tokens": %s}}' % DIGITS, "out of range"),
    ("/generate", '{"input_ids": [1, 2], "sampling_params": {"max_new_tokens": %s}}' % INT64, "max_new_tokens"),
    ("/generate", '{"input_ids": [1, 2], "sampling_params": {"top_k": %s}}' % BIG, "out of range"),
    ("/generate", '{"input_ids": [1, 2], "sampling_params": {"top_k": %s}}' % INT64, "top_k"),
    ("/generate", '{"input_ids": [1, 2], "return_logprob": true, "logprob_start_len": %s}' % BIG, "out of range"),
    (
        "/generate",
        '{"input_ids": [1, 2], "return_logprob": true, "logprob_start_len": %s}' % INT64,
        "logprob_start_len",
    ),
    ("/generate", '{"input_ids": [1, 2], "return_logprob": true, "top_logprobs_num": %s}' % BIG, "out of range"),
    ("/generate", '{"input_ids": [1, 2], "return_logprob": true, "top_logprobs_num": %s}' % INT64, "top_logprobs_num"),
    ("/generate", '{"input_ids": [1, 2], "sampling_params": {"n": 1000}}', "n"),
    ("/generate", '{"input_ids": [1, 2], "sampling_params": {"temperature": NaN}}', "NaN"),
    ("/generate", '{"input_ids": [1, 2], "x": %s%s}' % ("[" * 100_000, "]" * 100_000), "deeper"),
    ("/v1/completions", '{"prompt": [1, 2], "max_tokens": %s}' % DIGITS, "out of range"),
    ("/v1/completions", '{"prompt": [1, 2], "max_tokens": %s}' % INT64, "max_tokens"),
    ("/v1/completions", '{"prompt": [1, 2], "n": 1000}', "n"),
    ("/v1/completions", '{"prompt": [1, 2], "top_k": %s}' % BIG, "out of range"),
    (
        "/v1/chat/completions",
        '{"messages": [{"role": "user", "content": "hi"}], "stop_token_ids": [%s]}' % INT64,
        "stop_token_ids",
    ),
]


@pytest.fixture(scope="module")
def cluster(tiny_llama):
    c = Cluster(tiny_llama, 1, 1, worker_args=PAGE, router_args=ROUTER)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def boot_port(cluster) -> int:
    return requests.get(cluster.prefill[0] + "/get_server_info", timeout=5).json()["disaggregation_bootstrap_port"]


def worker_logs(cluster: Cluster) -> str:
    return "".join(Path(cluster.log_dir, f"{name}.log").read_text(errors="replace") for name in ("prefill0", "decode0"))


def assert_serving(cluster: Cluster) -> None:
    out = requests.post(
        cluster.url + "/generate", json={"input_ids": [5, 6, 7], "sampling_params": GREEDY}, timeout=60
    ).json()
    assert out["meta_info"]["finish_reason"]["type"] == "length" and len(out["output_ids"]) == 4, out
    wait_idle(cluster.prefill + cluster.decode)
    for url in cluster.prefill + cluster.decode:
        assert requests.get(url + "/get_server_info", timeout=5).json()["num_in_flight_reqs"] == 0


def assert_error_envelope(r: requests.Response, needle: str) -> None:
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == r.status_code, err
    assert needle in err["message"], err


def test_health_generate_on_p_d_and_router(cluster):
    """Locally on P and D (no peer); through the router, one real P + D request each time."""
    with requests.Session() as s:
        for url in [*cluster.prefill, *cluster.decode, cluster.url]:
            codes = [s.get(url + "/health_generate", timeout=30).status_code for _ in range(REPEAT)]
            assert codes == [200] * REPEAT, codes
    assert_serving(cluster)
    assert "Traceback" not in worker_logs(cluster)


def signed_bootstrap(cluster: Cluster, boot_port: int) -> dict:
    """Bootstrap fields as the router adds them: a fresh room, signed with the cluster's secret."""
    key = load_cluster_key(secret_file=cluster.info["cluster_secret_file"])
    assert key is not None
    room = random.randrange(1 << 62)
    token = key.sign("bootstrap", ["127.0.0.1", boot_port, room])
    return {
        "bootstrap_host": "127.0.0.1",
        "bootstrap_port": boot_port,
        "bootstrap_room": room,
        "bootstrap_token": token,
    }


def with_bootstrap(body: str, boot: dict) -> str:
    """The poison body as a router would forward it: with signed bootstrap fields, so only the poison is wrong."""
    return body[:-1] + ", " + json.dumps(boot)[1:]


@pytest.mark.parametrize("target", ["prefill", "decode", "router"])
def test_poison_requests_are_4xx_and_leave_nothing_behind(cluster, boot_port, target):
    url = {"prefill": cluster.prefill[0], "decode": cluster.decode[0], "router": cluster.url}[target]
    headers = {"Content-Type": "application/json"}
    with requests.Session() as s:
        for route, body, needle in POISON:
            if target != "router":
                body = with_bootstrap(body, signed_bootstrap(cluster, boot_port))
            for _ in range(REPEAT):
                assert_error_envelope(s.post(url + route, data=body, headers=headers, timeout=30), needle)
    assert_serving(cluster)
    assert "Traceback" not in worker_logs(cluster)


def vanish(url: str, path: str, body: dict) -> None:
    """Send a streaming request, half-close, give the server up to 0.3 s to start the stream, then reset."""
    host, port = url.removeprefix("http://").split(":")
    raw = json.dumps(body).encode()
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(raw)}\r\n\r\n".encode()
            + raw
        )
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(0.3)
        with contextlib.suppress(OSError):
            sock.recv(1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def test_clients_vanishing_as_streams_start_are_quiet(cluster, boot_port):
    chat = {"messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 64}
    native = {"input_ids": [1, 2, 3], "stream": True, "sampling_params": {"max_new_tokens": 64}}
    calls = []
    for url in cluster.prefill + cluster.decode:
        for i in range(20):
            boot = signed_bootstrap(cluster, boot_port)
            calls.append(
                (url, "/generate" if i % 2 else "/v1/chat/completions", {**(native if i % 2 else chat), **boot})
            )
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda c: vanish(*c), calls))
    wait_idle(cluster.prefill + cluster.decode, timeout=30)
    logs = worker_logs(cluster)
    assert "Traceback" not in logs and "Error handling request" not in logs
    assert_serving(cluster)


def wait_gone(pid: int, timeout: float) -> float:
    """Seconds until ``pid`` no longer exists (reaped by its parent); fails after ``timeout``."""
    t0 = time.monotonic()
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return time.monotonic() - t0
        assert time.monotonic() - t0 < timeout, f"process {pid} still alive after {timeout}s"
        time.sleep(0.05)


def test_killed_detokenizer_makes_the_decode_worker_exit(cluster):
    """Last in the module: the cluster goes down with its decode worker."""
    info = requests.get(cluster.decode[0] + "/get_server_info", timeout=5).json()["process_ids"]
    os.kill(info["detokenizer"], signal.SIGKILL)
    assert wait_gone(info["main"], 10) < 10
    log = Path(cluster.log_dir, "decode0.log").read_text(errors="replace")
    assert "child process died: detokenizer" in log and "exiting with code 1" in log
    assert "Traceback" not in log
