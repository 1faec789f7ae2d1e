"""Prefill/decode clusters over real UCX (TCP on loopback) behind the real router."""

from __future__ import annotations

import asyncio
import random
import time

import aiohttp
import openai
import pytest
import requests
from cluster import Cluster

from sglang_pd import Engine

PAGE = ("--page-size", "4", "--chunked-prefill-size", "16")
GREEDY = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
ROUTER = ("--policy", "round_robin", "--health-check-interval-secs", "0.5", "--health-success-threshold", "1")


def pool_idle(url: str) -> bool:
    sched = requests.get(url + "/get_server_info", timeout=5).json()["scheduler"]
    pool, q = sched["pool"], sched.get("disagg", {})
    return (
        sched["num_running_reqs"] == 0
        and sched["num_queue_reqs"] == 0
        and not any(v for k, v in q.items() if k.endswith("queue_reqs"))
        and pool["free_pages"] + pool["evictable_pages"] == pool["total_pages"]
    )


def wait_idle(urls: list[str], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not all(pool_idle(u) for u in urls):
        assert time.monotonic() < deadline, [
            requests.get(u + "/get_server_info", timeout=5).json()["scheduler"] for u in urls
        ]
        time.sleep(0.1)


def mixed_prompts(n: int = 32) -> list[list[int]]:
    rng = random.Random(7)
    shared = [rng.randrange(4, 600) for _ in range(37)]
    lens = [1, 2, 3, 5, 9, 17, 33, 41, 70]  # < a page (4), many pages, > the chunk size (16)
    prompts = [[rng.randrange(4, 600) for _ in range(lens[i % len(lens)])] for i in range(n - 4)]
    return prompts + [shared + [1], shared + [2], shared + [1], shared + [3]]  # a shared prefix, one sent twice


async def post_all(url: str, bodies: list[dict]) -> list[dict]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:

        async def one(b: dict) -> dict:
            async with s.post(url + "/generate", json=b) as r:
                return await r.json()

        return await asyncio.gather(*(one(b) for b in bodies))


@pytest.fixture(scope="module")
def expected(tiny_llama):
    eng = Engine(model_path=tiny_llama, page_size=4, chunked_prefill_size=16)
    prompts = mixed_prompts()
    outs = eng.generate(input_ids=prompts, sampling_params=GREEDY)
    return prompts, [o["output_ids"] for o in outs]


@pytest.fixture(scope="module")
def cluster_1p2d(tiny_llama):
    c = Cluster(tiny_llama, 1, 2, worker_args=PAGE, router_args=ROUTER)
    yield c
    c.stop()


def test_1p2d_greedy_equals_colocated(cluster_1p2d, expected):
    prompts, want = expected
    outs = asyncio.run(post_all(cluster_1p2d.url, [{"input_ids": p, "sampling_params": GREEDY} for p in prompts]))
    assert [o["output_ids"] for o in outs] == want
    assert all(o["meta_info"]["kv_transfer"]["bytes"] > 0 for o in outs)
    assert {o["meta_info"]["kv_transfer"]["path"] for o in outs} == {
        "direct"
    }  # one host: P writes into D's mapped pool
    # the shared prefix again, now that it sits in P's radix cache: D still gets the whole prompt's KV
    again = requests.post(
        cluster_1p2d.url + "/generate", json={"input_ids": prompts[-1], "sampling_params": GREEDY}, timeout=60
    ).json()
    assert again["output_ids"] == want[-1] and again["meta_info"]["cached_tokens"] > 0
    wait_idle(cluster_1p2d.prefill + cluster_1p2d.decode)


def test_streaming_and_openai_through_the_router(cluster_1p2d, expected, tiny_llama):
    prompts, want = expected
    with requests.post(
        cluster_1p2d.url + "/generate",
        json={"input_ids": prompts[5], "sampling_params": GREEDY, "stream": True},
        stream=True,
        timeout=60,
    ) as r:
        events = [ln for ln in r.iter_lines() if ln]
    assert events[-1] == b"data: [DONE]"
    import json

    assert json.loads(events[-2][6:])["output_ids"] == want[5]
    client = openai.OpenAI(base_url=cluster_1p2d.url + "/v1", api_key="none")
    comp = client.completions.create(
        model=tiny_llama, prompt=prompts[7], max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    assert comp.usage.completion_tokens == 12
    native = requests.post(
        cluster_1p2d.url + "/generate", json={"input_ids": prompts[7], "sampling_params": GREEDY}, timeout=60
    ).json()
    assert comp.choices[0].text == native["text"]
    chunks = client.chat.completions.create(
        model=tiny_llama, messages=[{"role": "user", "content": "hello"}], max_tokens=8, temperature=0, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    full = client.chat.completions.create(
        model=tiny_llama, messages=[{"role": "user", "content": "hello"}], max_tokens=8, temperature=0
    )
    assert text == full.choices[0].message.content
    wait_idle(cluster_1p2d.prefill + cluster_1p2d.decode)


def test_client_abort_frees_both_sides(cluster_1p2d):
    long = {"temperature": 0, "max_new_tokens": 1500, "ignore_eos": True}
    with requests.post(
        cluster_1p2d.url + "/generate",
        json={"input_ids": list(range(4, 30)), "sampling_params": long, "stream": True},
        stream=True,
        timeout=60,
    ) as r:
        lines = r.iter_lines()
        next(lines)
    wait_idle(cluster_1p2d.prefill + cluster_1p2d.decode, timeout=5)


def test_decode_worker_registers_at_runtime(cluster_1p2d, tiny_llama, expected):
    from server_process import ServerProcess

    extra = ServerProcess(
        tiny_llama,
        *PAGE,
        "--disaggregation-mode",
        "decode",
        "--register-with",
        cluster_1p2d.url,
        "--cluster-secret-file",
        cluster_1p2d.info["cluster_secret_file"],
    )
    try:
        deadline = time.monotonic() + 30
        while extra.url not in [
            w["url"] for w in requests.get(cluster_1p2d.url + "/workers", timeout=5).json()["workers"]
        ]:
            assert time.monotonic() < deadline, "the new decode worker never showed up in the router"
            time.sleep(0.2)
        prompts, want = expected
        outs = asyncio.run(
            post_all(cluster_1p2d.url, [{"input_ids": p, "sampling_params": GREEDY} for p in prompts[:9]])
        )
        assert [o["output_ids"] for o in outs] == want[:9]
        workers = requests.get(cluster_1p2d.url + "/workers", timeout=5).json()["workers"]
        served = next(w["processed_requests"] for w in workers if w["url"] == extra.url)
        assert served >= 1, workers  # round robin over 3 decode workers: the new one took its share of the 9
    finally:
        extra.stop()
    # deregistered on SIGTERM
    assert extra.url not in [w["url"] for w in requests.get(cluster_1p2d.url + "/workers", timeout=5).json()["workers"]]


def test_2p1d_greedy_equals_colocated(tiny_llama, expected):
    """Also the UCX data-message path end to end: direct copies are off (as between hosts)."""
    prompts, want = expected
    c = Cluster(tiny_llama, 2, 1, worker_args=PAGE, router_args=ROUTER, env={"SGLANG_DISAGGREGATION_DIRECT_COPY": "0"})
    try:
        outs = asyncio.run(post_all(c.url, [{"input_ids": p, "sampling_params": GREEDY} for p in prompts[:16]]))
        assert [o["output_ids"] for o in outs] == want[:16]
        assert {o["meta_info"]["kv_transfer"]["path"] for o in outs} == {"ucx"}
        wait_idle(c.prefill + c.decode)
    finally:
        c.stop()
