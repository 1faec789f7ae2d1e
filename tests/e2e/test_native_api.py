"""The real worker over HTTP: native /generate against the offline Engine, concurrency, disconnects, bad input."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest
import requests

from sglang_pd import Engine

GREEDY = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}


def wait_idle(url: str, timeout: float) -> dict:
    """Poll /get_server_info until no request runs; return the scheduler section."""
    deadline = time.monotonic() + timeout
    while True:
        sched = requests.get(url + "/get_server_info", timeout=5).json()["scheduler"]
        pool = sched["pool"]
        if (
            sched["num_running_reqs"] == 0
            and sched["num_queue_reqs"] == 0
            and pool["free_pages"] + pool["evictable_pages"] == pool["total_pages"]
        ):
            return sched
        if time.monotonic() > deadline:
            raise AssertionError(f"server not idle after {timeout}s: {sched}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def engine(tiny_llama):
    eng = Engine(model_path=tiny_llama, page_size=4)
    yield eng
    eng.shutdown()


def test_generate_matches_offline_engine(server, engine):
    prompts = ["Hello world", "The quick brown fox", "a"]
    expected = engine.generate(prompt=prompts, sampling_params=GREEDY)
    for prompt, exp in zip(prompts, expected):
        got = requests.post(
            server.url + "/generate", json={"text": prompt, "sampling_params": GREEDY}, timeout=60
        ).json()
        assert got["output_ids"] == exp["output_ids"] and got["text"] == exp["text"]
        assert got["meta_info"]["finish_reason"] == {"type": "length", "length": 24}
        assert got["meta_info"]["prompt_tokens"] == exp["meta_info"]["prompt_tokens"]
    ids = [5, 6, 7, 8]
    got = requests.post(server.url + "/generate", json={"input_ids": ids, "sampling_params": GREEDY}, timeout=60).json()
    assert got["output_ids"] == engine.generate(input_ids=ids, sampling_params=GREEDY)["output_ids"]
    batch = requests.post(
        server.url + "/generate", json={"text": prompts, "sampling_params": GREEDY}, timeout=60
    ).json()
    assert [b["output_ids"] for b in batch] == [e["output_ids"] for e in expected]


def test_streaming_is_cumulative_and_ends_with_done(server, engine):
    body = {"text": "Hello world", "sampling_params": GREEDY, "stream": True}
    events = []
    with requests.post(server.url + "/generate", json=body, stream=True, timeout=60) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line:
                events.append(line.decode())
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: ") :]) for e in events[:-1]]
    # Events are cumulative; chunks that queue up while the handler writes are coalesced, so there is
    # at most one event per token and every event brings at least one new token.
    counts = [len(c["output_ids"]) for c in chunks]
    assert 1 <= len(chunks) <= 24 and counts == sorted(set(counts)) and counts[-1] == 24
    exp = engine.generate(prompt="Hello world", sampling_params=GREEDY)
    assert chunks[-1]["text"] == exp["text"] and chunks[-1]["output_ids"] == exp["output_ids"]
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])
    for a, b in zip(chunks, chunks[1:]):
        assert b["text"].startswith(a["text"])


def test_64_concurrent_clients(server, engine):
    prompts = [[(7 * i + j) % 600 + 4 for j in range(3 + i % 17)] for i in range(64)]
    sp = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
    expected = [o["output_ids"] for o in engine.generate(input_ids=prompts, sampling_params=sp)]

    async def run() -> list[list[int]]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:

            async def one(p: list[int]) -> list[int]:
                async with s.post(server.url + "/generate", json={"input_ids": p, "sampling_params": sp}) as r:
                    return (await r.json())["output_ids"]

            return await asyncio.gather(*(one(p) for p in prompts))

    assert asyncio.run(run()) == expected
    wait_idle(server.url, 5)


def test_client_disconnect_frees_pages_within_a_second(server):
    long = {"temperature": 0, "max_new_tokens": 1900, "ignore_eos": True}
    with requests.post(
        server.url + "/generate",
        json={"input_ids": [9, 10], "sampling_params": long, "stream": True},
        stream=True,
        timeout=60,
    ) as r:
        lines = r.iter_lines()
        next(lines)  # the request is running; leaving the block closes the connection
    t0 = time.monotonic()
    wait_idle(server.url, 1.0)
    # Non-streaming: the client gives up while the server is still generating.
    with pytest.raises(requests.exceptions.Timeout):
        requests.post(server.url + "/generate", json={"input_ids": [9, 11], "sampling_params": long}, timeout=0.5)
    wait_idle(server.url, 1.0)
    assert time.monotonic() - t0 < 10


@pytest.mark.parametrize(
    "body, status, needle",
    [
        ("{not json", 400, "malformed JSON"),
        ('["a list"]', 400, "JSON object"),
        ({"text": "hi", "sampling_params": "hot"}, 400, "sampling_params"),
        ({"text": "hi", "sampling_params": {"temperature": "abc"}}, 400, "temperature"),
        ({"text": "hi", "sampling_params": {"temperature": -0.5}}, 400, "temperature"),
        ({"text": "hi", "sampling_params": {"top_p": 1.5}}, 400, "top_p"),
        ({"text": "hi", "sampling_params": {"max_new_tokens": -1}}, 400, "max_new_tokens"),
        ({"text": "hi", "sampling_params": {"unknown_knob": 1}}, 400, "unknown_knob"),
        ({"text": ""}, 400, "empty"),
        ({"input_ids": []}, 400, "empty"),
        ({"input_ids": ["a"]}, 400, "input_ids"),
        ({"text": "hi", "sampling_params": {"max_new_tokens": 5000}}, 400, "This model's maximum context length is"),
        ({"text": "hi", "stream": "yes"}, 400, "stream"),
    ],
)
def test_bad_input_gets_the_error_envelope(server, body, status, needle):
    data = body if isinstance(body, str) else json.dumps(body)
    r = requests.post(server.url + "/generate", data=data, timeout=30)
    assert r.status_code == status
    err = r.json()["error"]
    assert needle in err["message"] and err["code"] == status and "Traceback" not in r.text
    assert requests.get(server.url + "/health", timeout=5).status_code == 200


def test_unknown_route_and_info_routes(server):
    r = requests.get(server.url + "/no/such/route", timeout=5)
    assert r.status_code == 404 and r.json()["error"]["code"] == 404
    info = requests.get(server.url + "/get_model_info", timeout=5).json()
    assert info["is_generation"] and info["architecture"] == "LlamaForCausalLM"
    srv = requests.get(server.url + "/get_server_info", timeout=5).json()
    assert srv["page_size"] == 4 and srv["scheduler"]["pool"]["total_pages"] > 0
    assert requests.get(server.url + "/health_generate", timeout=30).status_code == 200


def test_flush_cache_abort_and_metrics(server):
    requests.post(
        server.url + "/generate", json={"input_ids": list(range(4, 40)), "sampling_params": GREEDY}, timeout=60
    )
    sched = wait_idle(server.url, 5)
    assert sched["pool"]["cached_pages"] > 0
    assert requests.post(server.url + "/flush_cache", timeout=10).status_code == 200
    assert wait_idle(server.url, 5)["pool"]["cached_pages"] == 0

    long = {"temperature": 0, "max_new_tokens": 1900, "ignore_eos": True}
    with requests.post(
        server.url + "/generate",
        json={"input_ids": [3, 4], "sampling_params": long, "stream": True, "rid": "to-abort"},
        stream=True,
        timeout=60,
    ) as r:
        lines = r.iter_lines()
        next(lines)
        assert requests.post(server.url + "/abort_request", json={"rid": "to-abort"}, timeout=5).status_code == 200
        last = [ln for ln in lines if ln][-2]
    assert json.loads(last[len(b"data: ") :])["meta_info"]["finish_reason"]["type"] == "abort"

    text = requests.get(server.url + "/metrics", timeout=5).text
    for name in (
        "sglang:prompt_tokens_total",
        "sglang:generation_tokens_total",
        "sglang:num_running_reqs",
        "sglang:time_to_first_token_seconds_bucket",
        "sglang:e2e_request_latency_seconds_count",
        "sglang:token_usage",
        "sglang:cache_hit_rate",
        "sglang:inter_token_latency_seconds_count",
    ):
        assert name in text, name
    before = _counter(text, "sglang:generation_tokens_total")
    requests.post(server.url + "/generate", json={"input_ids": [5], "sampling_params": GREEDY}, timeout=60)
    after = _counter(requests.get(server.url + "/metrics", timeout=5).text, "sglang:generation_tokens_total")
    assert after == before + 24


def _counter(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in metrics")
