"""``python -m router.launch_router`` as a process in front of mock worker processes.

The unmodified (sync) OpenAI client through a PD router; a router started with no workers; a
worker registering itself over HTTP the way ``launch_server --register-with`` does; SIGTERM lets
an in-flight stream finish and exits 0; a port in use exits 1.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import openai
import pytest
import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from router_support.mock_worker import MockProcess
from router_support.procs import RouterProcess

pytestmark = pytest.mark.timeout(60)
FAST = ("--health-check-interval-secs", "0.2", "--health-failure-threshold", "2", "--log-level", "warning")


def wait_for(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


@pytest.fixture()
def pd_mocks():
    procs = [
        MockProcess("--role", "prefill", "--name", "p"),
        MockProcess("--role", "decode", "--name", "d", "--token-delay-ms", "20"),
    ]
    yield procs
    for p in procs:
        p.stop()


def test_openai_client_through_a_pd_router_that_started_empty(pd_mocks):
    p, d = pd_mocks
    router = RouterProcess("--pd-disaggregation", *FAST)
    try:
        assert requests.get(router.url + "/health", timeout=5).status_code == 503
        r = requests.post(
            router.url + "/workers", json={"url": p.url, "role": "prefill", "bootstrap_port": 8998}, timeout=10
        )
        assert r.status_code == 201
        r = requests.post(router.url + "/workers", json={"url": d.url, "role": "decode"}, timeout=10)
        assert r.status_code == 201
        wait_for(lambda: requests.get(router.url + "/health", timeout=5).status_code == 200, 10, "readiness")
        client = openai.OpenAI(base_url=router.url + "/v1", api_key="none", max_retries=0, timeout=20)
        out = client.completions.create(model="mock-model", prompt="hi", max_tokens=4, n=2)
        assert [c.index for c in out.choices] == [0, 1] and out.choices[0].text == "w0 w1 w2 w3 "
        chunks = list(
            client.chat.completions.create(model="mock-model", messages=[{"role": "user", "content": "x"}], stream=True)
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "w0 w1 w2 w3 "
        calls = requests.get(d.url + "/_mock/calls", timeout=5).json()["calls"]
        assert all(c["body"]["bootstrap_host"] == "127.0.0.1" for c in calls if c["path"].startswith("/v1"))
        listed = requests.get(router.url + "/workers", timeout=5).json()
        assert listed["mode"] == "pd" and {w["role"] for w in listed["workers"]} == {"prefill", "decode"}
        r = requests.delete(router.url + "/workers", params={"url": d.url}, timeout=10)
        assert r.status_code == 200 and r.json()["status"] == "removed"
        assert requests.get(router.url + "/health", timeout=5).status_code == 503
    finally:
        router.stop()


def test_sigterm_lets_in_flight_streams_finish_then_exits_0(pd_mocks):
    _, d = pd_mocks
    requests.post(d.url + "/_mock/knobs", json={"role": "regular", "token_delay_ms": 100, "num_tokens": 10}, timeout=5)
    router = RouterProcess("--worker-urls", d.url, *FAST, wait_ready=True)
    result: dict[str, object] = {}

    def stream() -> None:
        r = requests.post(router.url + "/generate", json={"text": "x", "stream": True}, timeout=30)
        result["status"], result["body"] = r.status_code, r.text

    t = threading.Thread(target=stream)
    t.start()
    wait_for(lambda: requests.get(d.url + "/_mock/calls", timeout=5).json()["calls"], 10, "stream started")
    assert router.terminate(timeout=30) == 0
    t.join(timeout=30)
    assert (
        result["status"] == 200 and str(result["body"]).endswith("data: [DONE]\n\n") and '"error"' not in result["body"]
    )


def test_port_in_use_exits_1():
    first = RouterProcess(*FAST)
    try:
        import subprocess

        from router_support.procs import REPO

        out = subprocess.run(
            [sys.executable, "-m", "router.launch_router", "--port", str(first.port)],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=REPO,
            check=False,
        )
        assert out.returncode == 1 and "cannot listen" in out.stderr
    finally:
        first.stop()
