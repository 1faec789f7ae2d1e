"""The router (a real process) in front of two real tiny-model workers, regular mode.

One module-scoped cluster, exercised in order: the router starts empty; worker A registers itself
(``launch_server --register-with``, signed with the cluster secret both share) and serves, through the
official OpenAI client too, and ``/health_generate`` on the router generates a token through it; worker B,
added with POST /workers, serves new requests; DELETE drains B under load with no failed request;
SIGTERM on A deregisters and drains it under load with no failed request; a worker killed
mid-stream gives the client an error within seconds and is marked unhealthy.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import openai
import pytest
import requests
from server_process import ServerProcess

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from router_support.procs import RouterProcess

pytestmark = pytest.mark.timeout(240)  # two worker startups dominate; slow when the machine is shared
WORKER_FLAGS = ("--enable-metrics", "--page-size", "4", "--max-running-requests", "32")


@pytest.fixture(scope="module")
def cluster(tiny_llama, tmp_path_factory):
    # A and the router share a cluster secret: A's registration and withdrawal are signed, and a signature
    # the router could not verify would be refused (401) even from loopback.
    secret = tmp_path_factory.mktemp("secret") / "cluster.secret"
    secret.write_bytes(b"real-workers-cluster-secret-0123")
    router = RouterProcess(
        "--policy",
        "round_robin",
        "--health-check-interval-secs",
        "0.5",
        "--health-failure-threshold",
        "2",
        "--health-success-threshold",
        "1",
        "--log-level",
        "warning",
        "--cluster-secret-file",
        str(secret),
    )
    workers: list[ServerProcess] = []
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            futures = [
                pool.submit(
                    ServerProcess,
                    tiny_llama,
                    *WORKER_FLAGS,
                    "--register-with",
                    router.url,
                    "--cluster-secret-file",
                    str(secret),
                ),
                pool.submit(ServerProcess, tiny_llama, *WORKER_FLAGS),
            ]
            workers = [f.result() for f in futures]
        yield router, workers
    finally:
        router.stop()
        for w in workers:
            w.stop()


def registry(router: RouterProcess) -> dict[str, dict[str, Any]]:
    return {w["url"]: w for w in requests.get(router.url + "/workers", timeout=5).json()["workers"]}


def served_requests(worker: ServerProcess) -> float:
    text = requests.get(worker.url + "/metrics", timeout=5).text
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("sglang:num_requests_total")
    )


def wait_for(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def test_a_self_registered_worker_serves_through_the_openai_client(cluster):
    router, (a, _) = cluster
    wait_for(lambda: registry(router).get(a.url, {}).get("status") == "healthy", 30, "A registered itself")
    assert registry(router)[a.url]["role"] == "regular" and len(registry(router)) == 1
    client = openai.OpenAI(base_url=router.url + "/v1", api_key="none", max_retries=0, timeout=30)
    model = client.models.list().data[0].id
    direct = openai.OpenAI(base_url=a.url + "/v1", api_key="none", max_retries=0, timeout=30)
    kw = {"model": model, "prompt": "The router", "max_tokens": 12, "temperature": 0}
    via = client.completions.create(**kw)
    assert via.choices[0].text == direct.completions.create(**kw).choices[0].text
    assert via.usage.completion_tokens == 12
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True) if c.choices)
    assert streamed == via.choices[0].text
    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0}
    whole = client.chat.completions.create(**chat).choices[0].message.content
    pieces = client.chat.completions.create(**chat, stream=True, stream_options={"include_usage": True})
    assert "".join(c.choices[0].delta.content or "" for c in pieces if c.choices) == whole
    native = requests.post(
        router.url + "/generate",
        json={"text": "hi", "sampling_params": {"max_new_tokens": 4}},
        headers={"x-request-id": "e2e-1"},
        timeout=30,
    )
    assert native.status_code == 200 and native.headers["x-request-id"] == "e2e-1"
    assert native.json()["meta_info"]["completion_tokens"] == 4
    for _ in range(3):  # one real one-token generation through the router, not a fan-out to the workers
        probe = requests.get(router.url + "/health_generate", timeout=60)
        assert probe.status_code == 200 and probe.json()["worker"] == a.url, probe.text
    forged = requests.post(
        router.url + "/generate",
        json={
            "text": "hi",
            "bootstrap_room": 7,
            "bootstrap_host": "10.0.0.1",
            "sampling_params": {"max_new_tokens": 2},
        },
        timeout=30,
    )
    assert forged.status_code == 200  # a client's bootstrap fields never reach a worker
    assert "Traceback" not in router.logs(tail=None)


def test_a_worker_added_at_runtime_serves_new_requests(cluster):
    router, (_, b) = cluster
    before = served_requests(b)
    r = requests.post(router.url + "/workers", json={"url": b.url, "role": "regular"}, timeout=30)
    assert r.status_code == 201 and r.json()["worker"]["status"] == "healthy"
    for _ in range(4):
        r = requests.post(
            router.url + "/generate", json={"text": "x", "sampling_params": {"max_new_tokens": 2}}, timeout=30
        )
        assert r.status_code == 200
    assert served_requests(b) >= before + 2


class Load:
    """Four client threads streaming short requests through the router until stopped."""

    def __init__(self, router: RouterProcess) -> None:
        self.router = router
        self.failures: list[str] = []
        self.done = 0
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.client) for _ in range(4)]

    def client(self) -> None:
        with requests.Session() as s:
            while not self.stop.is_set():
                body = {"text": "load", "stream": True, "sampling_params": {"max_new_tokens": 8, "ignore_eos": True}}
                r = s.post(self.router.url + "/generate", json=body, timeout=60)
                if r.status_code != 200 or '"error"' in r.text or not r.text.endswith("data: [DONE]\n\n"):
                    self.failures.append(f"{r.status_code}: {r.text[-300:]}")
                self.done += 1

    def __enter__(self) -> Load:  # noqa: PYI034
        for t in self.threads:
            t.start()
        wait_for(lambda: self.done >= 6, 30, "load running")
        return self

    def more(self, n: int) -> None:
        mark = self.done
        wait_for(lambda: self.done >= mark + n, 30, f"{n} more requests")

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)


def test_delete_drains_under_load_with_no_failed_request(cluster):
    router, (_, b) = cluster
    with Load(router) as load:
        r = requests.delete(router.url + "/workers", params={"url": b.url}, timeout=10)
        assert r.status_code in (200, 202)
        wait_for(lambda: b.url not in registry(router), 30, "drained worker removed")
        b_served = served_requests(b)
        load.more(6)
        assert served_requests(b) == b_served  # nothing new reached the removed worker
    assert load.failures == []
    assert requests.post(router.url + "/workers", json={"url": b.url}, timeout=30).status_code == 201


def test_sigterm_deregisters_and_drains_a_worker_under_load(cluster):
    router, (a, _) = cluster
    with Load(router) as load:
        assert a.terminate(timeout=60) == 0
        wait_for(lambda: a.url not in registry(router), 10, "A deregistered itself")
        load.more(6)
    assert load.failures == []


def test_a_worker_killed_mid_stream_errors_the_client_fast_and_is_ejected(cluster):
    router, workers = cluster
    client = openai.OpenAI(base_url=router.url + "/v1", api_key="none", max_retries=0, timeout=60)
    model = client.models.list().data[0].id
    stream = client.completions.create(
        model=model, prompt="long", max_tokens=1900, stream=True, extra_body={"ignore_eos": True}
    )
    next(iter(stream))
    busy = [url for url, w in registry(router).items() if w["active_requests"] > 0]
    assert len(busy) == 1
    victim = next(w for w in workers if w.url == busy[0])  # B: A left in the previous test
    killed_at = time.monotonic()
    os.killpg(victim.proc.pid, signal.SIGKILL)
    with pytest.raises(openai.APIError) as e:
        for _ in stream:
            pass
    assert time.monotonic() - killed_at < 5.0, "the client waited too long for its error"
    assert "failed" in str(e.value) or "error" in str(e.value).lower()
    wait_for(lambda: registry(router)[victim.url]["status"] == "unhealthy", 10, "the dead worker marked unhealthy")
    metrics = requests.get(router.url + "/metrics", timeout=5).text
    assert f'sgl_router_worker_healthy{{role="regular",worker="{victim.url}"}} 0.0' in metrics
    r = requests.post(router.url + "/generate", json={"text": "x"}, timeout=30)
    assert r.status_code == 503 and r.headers["Retry-After"]  # no healthy worker left
