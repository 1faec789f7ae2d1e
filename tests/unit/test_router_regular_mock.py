"""The router in regular mode against in-process mock workers: routes, retries, aborts, status codes."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from router_support.harness import mocks, read_sse, ready, running_router, wait_until

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]
GEN = {"text": "hello world", "sampling_params": {"max_new_tokens": 4}}


async def post(s: aiohttp.ClientSession, url: str, body: Any, **kw: Any) -> tuple[int, Any, Any]:
    async with s.post(url, json=body, **kw) as r:
        if r.content_type == "text/event-stream":
            return r.status, await read_sse(r), r.headers
        return r.status, await r.json(), r.headers


async def test_routes_pass_through_and_round_robin_spreads():
    async with (
        mocks({"name": "a"}, {"name": "b"}) as (a, b),
        running_router(worker_urls=(a.url, b.url), policy="round_robin") as r,
        aiohttp.ClientSession() as s,
    ):
        await ready(r)
        served = [(await post(s, r.url + "/generate", GEN))[1]["meta_info"]["served_by"] for _ in range(4)]
        assert served == ["a", "b", "a", "b"]
        status, events, headers = await post(s, r.url + "/generate", {**GEN, "stream": True})
        assert status == 200 and headers["Content-Type"] == "text/event-stream" and events[-1] == "[DONE]"
        assert [e["text"] for e in events[:-1]] == ["w0 ", "w0 w1 ", "w0 w1 w2 ", "w0 w1 w2 w3 "]
        status, batch, _ = await post(s, r.url + "/generate", {"text": ["a", "b"], "sampling_params": {"n": 2}})
        assert status == 200 and len(batch) == 4  # regular mode: the worker expands the batch itself
        status, models, _ = await post(
            s, r.url + "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 2}
        )
        assert status == 200 and len(models["choices"]) == 2
        async with s.get(r.url + "/v1/models") as resp:
            assert (await resp.json())["data"][0]["id"] == "mock-model"
        async with s.get(r.url + "/get_model_info") as resp:
            assert resp.status == 200 and (await resp.json())["model_path"] == "mock-model"
        async with s.get(r.url + "/get_server_info") as resp:
            info = await resp.json()
            assert {w["body"]["name"] for w in info["workers"]} == {"a", "b"} and "router" in info
        async with s.post(r.url + "/flush_cache") as resp:
            assert resp.status == 200 and len((await resp.json())["results"]) == 2


async def test_official_openai_client_streaming_and_not():
    async with mocks({"name": "a"}) as (a,), running_router(worker_urls=(a.url,)) as r:
        await ready(r)
        client = openai.AsyncOpenAI(base_url=r.url + "/v1", api_key="none", max_retries=0, timeout=10)
        out = await client.completions.create(model="mock-model", prompt="hi", max_tokens=4)
        assert out.choices[0].text == "w0 w1 w2 w3 " and out.usage.completion_tokens == 4
        chat = await client.chat.completions.create(model="mock-model", messages=[{"role": "user", "content": "hi"}])
        assert chat.choices[0].message.content == "w0 w1 w2 w3 "
        stream = await client.chat.completions.create(
            model="mock-model",
            messages=[{"role": "user", "content": "x"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        pieces = [c.choices[0].delta.content async for c in stream if c.choices]
        assert "".join(p or "" for p in pieces) == "w0 w1 w2 w3 "
        models = await client.models.list()
        assert models.data[0].id == "mock-model"
        await client.close()


async def test_request_id_is_propagated_and_echoed_and_rid_is_set():
    async with mocks({"name": "a"}) as (a,), running_router(worker_urls=(a.url,)) as r, aiohttp.ClientSession() as s:
        await ready(r)
        _, body, headers = await post(s, r.url + "/generate", GEN, headers={"x-request-id": "trace-42"})
        assert headers["x-request-id"] == "trace-42" and a.calls[-1].headers["x-request-id"] == "trace-42"
        assert a.calls[-1].body["rid"] == body["meta_info"]["id"]  # the router set a rid it can abort
        _, _, headers = await post(s, r.url + "/generate", {**GEN, "rid": "mine"})
        assert len(headers["x-request-id"]) == 32 and a.calls[-1].body["rid"] == "mine"
        async with s.get(r.url + "/nope") as resp:
            assert resp.status == 404 and (await resp.json())["error"]["code"] == 404
            assert resp.headers["x-request-id"]


async def test_retries_before_the_first_byte_only():
    async with (
        mocks({"name": "a", "fail_first": 2, "fail_status": 503}) as (a,),
        running_router(worker_urls=(a.url,), retry_max_retries=3) as r,
        aiohttp.ClientSession() as s,
    ):
        await ready(r)
        status, body, _ = await post(s, r.url + "/generate", GEN)
        assert status == 200 and len(a.inference_calls()) == 3
        assert [c.body["rid"] for c in a.inference_calls()][1:] == [
            f"{body['meta_info']['id'][:-7]}-retry{k}" for k in (1, 2)
        ]
        a.knobs.fail_first, a.knobs.crash_after, a.knobs.token_delay_ms = 0, 2, 20
        a.calls.clear()
        status, events, _ = await post(s, r.url + "/generate", {**GEN, "stream": True})
        assert status == 200 and len(a.inference_calls()) == 1  # bytes were sent: no retry
        assert [e["text"] for e in events[:2]] == ["w0 ", "w0 w1 "]
        assert events[2]["error"]["code"] == 502 and events[3] == "[DONE]"
        a.knobs.crash_after, a.knobs.error_after, a.knobs.token_delay_ms = (
            None,
            0,
            0,
        )  # an error as the very first event is retried
        a.calls.clear()
        status, events, _ = await post(s, r.url + "/generate", {**GEN, "stream": True})
        assert len(a.inference_calls()) == 4 and status == 503  # 1 + 3 retries, all failed
        async with s.get(r.url + "/metrics") as resp:
            text = await resp.text()
        assert 'sgl_router_retries_total{route="/generate"} 5.0' in text


async def test_client_errors_pass_through_unretried():
    async with (
        mocks({"name": "a", "fail_first": 1, "fail_status": 400}) as (a,),
        running_router(worker_urls=(a.url,)) as r,
        aiohttp.ClientSession() as s,
    ):
        await ready(r)
        status, body, _ = await post(s, r.url + "/generate", GEN)
        assert status == 400 and "injected failure" in body["error"]["message"] and len(a.inference_calls()) == 1


async def test_router_validates_before_dispatch():
    async with (
        mocks({"name": "a"}) as (a,),
        running_router(worker_urls=(a.url,), max_payload_size=2000) as r,
        aiohttp.ClientSession() as s,
    ):
        await ready(r)
        async with s.post(r.url + "/generate", data=b"{not json") as resp:
            assert resp.status == 400 and (await resp.json())["error"]["type"] == "BadRequestError"
        status, body, _ = await post(s, r.url + "/generate", {"text": "a", "sampling_params": {"temperature": -1}})
        assert status == 400 and body["error"]["param"] == "temperature"
        status, body, _ = await post(s, r.url + "/v1/completions", {"prompt": "a", "n": "2"})
        assert status == 400 and body["error"]["param"] == "n"
        status, body, _ = await post(s, r.url + "/generate", {"text": "x" * 5000})
        assert status == 413 and body["error"]["code"] == 413
        assert a.inference_calls() == []


async def test_api_key_401_with_health_and_metrics_open():
    async with (
        mocks({"name": "a", "api_key": "worker-key"}) as (a,),
        running_router(api_key="router-key") as r,
        aiohttp.ClientSession() as s,
    ):
        async with s.post(
            r.url + "/workers",
            json={"url": a.url, "api_key": "worker-key"},
            headers={"Authorization": "Bearer router-key"},
        ) as resp:
            assert resp.status == 201
        for path in ("/health", "/metrics", "/liveness"):
            async with s.get(r.url + path) as resp:
                assert resp.status == 200
        status, body, _ = await post(s, r.url + "/generate", GEN)
        assert status == 401 and body["error"]["type"] == "AuthenticationError"
        status, _, _ = await post(s, r.url + "/generate", GEN, headers={"Authorization": "Bearer wrong"})
        assert status == 401
        async with s.get(r.url + "/workers") as resp:
            assert resp.status == 401
        status, body, _ = await post(s, r.url + "/generate", GEN, headers={"Authorization": "Bearer router-key"})
        assert status == 200 and a.calls[-1].headers["authorization"] == "Bearer worker-key"


async def test_overload_429_408_and_no_worker_503():
    async with (
        mocks({"name": "a", "hang": True}) as (a,),
        running_router(worker_urls=(a.url,), max_concurrent_requests=1, queue_size=1, queue_timeout_secs=0.3) as r,
        aiohttp.ClientSession() as s,
    ):
        await ready(r)
        first = asyncio.ensure_future(post(s, r.url + "/generate", GEN))
        await wait_until(lambda: a.active == 1, what="first request at the worker")
        queued = asyncio.ensure_future(post(s, r.url + "/generate", GEN))
        await wait_until(lambda: r.state.admission.queued == 1, what="second request queued")
        status, body, headers = await post(s, r.url + "/generate", GEN)
        assert status == 429 and headers["Retry-After"] and body["error"]["code"] == 429
        status, body, headers = await post(s, r.url + "/generate", GEN)
        status, body, headers = await queued
        assert status == 408 and headers["Retry-After"]
        a.knobs.hang = False
        for rid in list(a.inflight):
            a.inflight[rid].set()
        assert (await first)[0] == 200
    async with running_router() as r, aiohttp.ClientSession() as s:  # a router with no workers at all
        async with s.get(r.url + "/health") as resp:
            assert resp.status == 503
        status, body, headers = await post(s, r.url + "/v1/completions", {"prompt": "a"})
        assert status == 503 and headers["Retry-After"] and "no healthy regular worker" in body["error"]["message"]


async def test_client_disconnect_aborts_the_worker_request():
    async with (
        mocks({"name": "a", "hang": True}) as (a,),
        running_router(worker_urls=(a.url,)) as r,
        aiohttp.ClientSession() as s,
    ):
        await ready(r)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(post(s, r.url + "/generate", {**GEN, "stream": True, "rid": "gone-early"}), 0.3)
        await wait_until(lambda: a.aborts == ["gone-early"], what="abort before the first token")
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(post(s, r.url + "/v1/completions", {"prompt": "x", "rid": "unary", "n": 2}), 0.3)
        await wait_until(lambda: a.aborts[1:] == ["unary-0", "unary-1"], what="abort of every choice of a whole answer")
        a.knobs.hang, a.knobs.token_delay_ms, a.knobs.num_tokens = False, 50, 100
        async with s.post(r.url + "/generate", json={**GEN, "stream": True, "rid": "gone-mid"}) as resp:
            await resp.content.readuntil(b"\n\n")
        await wait_until(lambda: "gone-mid" in a.aborts, what="abort mid-stream")
        await wait_until(lambda: r.state.registry.get(a.url).active == 0, what="slot released")
