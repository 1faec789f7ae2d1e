"""PD mode against in-process mock prefill/decode workers: pairing fields, aborts, fan-out, logprob merge."""

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
GEN = {"text": "hello", "sampling_params": {"max_new_tokens": 4}}
P, D = {"name": "p", "role": "prefill"}, {"name": "d", "role": "decode"}


def pd(prefills: list[Any], decodes: list[Any], **kw: Any) -> Any:
    return running_router(
        pd_disaggregation=True,
        prefill=tuple((p.url, 9000 + i) for i, p in enumerate(prefills)),
        decode=tuple(d.url for d in decodes),
        **kw,
    )


async def post(s: aiohttp.ClientSession, url: str, body: Any, **kw: Any) -> tuple[int, Any]:
    async with s.post(url, json=body, **kw) as r:
        if r.content_type == "text/event-stream":
            return r.status, await read_sse(r)
        return r.status, await r.json()


async def test_both_legs_get_the_pairing_fields_and_d_answer_streams():
    async with (
        mocks(P, {**P, "name": "p2"}, D) as (p, p2, d),
        pd([p, p2], [d], policy="round_robin") as r,
        aiohttp.ClientSession() as s,
    ):
        await ready(r)
        status, events = await post(s, r.url + "/generate", {**GEN, "stream": True})
        assert status == 200 and events[-1] == "[DONE]" and events[-2]["meta_info"]["served_by"] == "d"
        await post(s, r.url + "/generate", GEN)
        legs = [(p.inference_calls()[0], d.inference_calls()[0]), (p2.inference_calls()[0], d.inference_calls()[1])]
        rooms = set()
        for (pc, dc), port in zip(legs, (9000, 9001)):
            for f in ("bootstrap_host", "bootstrap_port", "bootstrap_room", "rid", "text", "sampling_params"):
                assert pc.body[f] == dc.body[f], f
            assert pc.body["bootstrap_host"] == "127.0.0.1" and pc.body["bootstrap_port"] == port
            assert 0 <= pc.body["bootstrap_room"] < 2**63
            rooms.add(pc.body["bootstrap_room"])
            assert pc.headers["x-request-id"] == dc.headers["x-request-id"]
        assert len(rooms) == 2 and legs[0][1].body["stream"] is True
        assert legs[0][0].body["stream"] is False  # P's one-token answer is read whole


async def test_prefill_failure_aborts_decode_at_once_and_retries_with_a_new_pair():
    async with (
        mocks({**P, "fail_first": 1, "fail_status": 503}, {**D, "hang": True}) as (p, d),
        pd([p], [d]) as r,
        aiohttp.ClientSession() as s,
    ):
        await ready(r)
        task = asyncio.ensure_future(post(s, r.url + "/generate", {**GEN, "rid": "job1"}))
        await wait_until(lambda: "job1" in d.aborts, what="D aborted after P failed")
        await wait_until(lambda: len(d.inference_calls()) == 2, what="retry reached D")
        d.knobs.hang = False
        d.inflight["job1-retry1"].set()
        status, body = await asyncio.wait_for(task, 10)
        assert status == 200 and body["meta_info"]["id"] == "job1-retry1"
        first, second = d.inference_calls()
        assert first.body["bootstrap_room"] != second.body["bootstrap_room"]
        async with s.get(r.url + "/metrics") as resp:
            assert 'sgl_router_leg_aborts_total{reason="prefill_failed",role="decode"} 1.0' in await resp.text()


async def test_decode_failure_aborts_prefill_and_the_client_gets_the_error():
    async with (
        mocks({**P, "hang": True}, {**D, "fail_first": 1, "fail_status": 400}) as (p, d),
        pd([p], [d]) as r,
        aiohttp.ClientSession() as s,
    ):
        await ready(r)
        status, body = await post(s, r.url + "/generate", {**GEN, "rid": "job2"})
        assert status == 400 and "injected failure" in body["error"]["message"]
        await wait_until(lambda: p.aborts == ["job2"], what="P aborted after D failed")
        await wait_until(lambda: r.state.registry.get(p.url).active == 0, what="P slot released")


async def test_prefill_failure_after_the_first_byte_ends_the_stream_with_an_error():
    async with (
        mocks({**P, "latency_ms": 300, "fail_first": 1}, {**D, "token_delay_ms": 100, "num_tokens": 20}) as (p, d),
        pd([p], [d]) as r,
        aiohttp.ClientSession() as s,
    ):
        await ready(r)
        status, events = await post(s, r.url + "/generate", {**GEN, "stream": True, "rid": "job3"})
        assert status == 200 and events[0]["text"] == "w0 "
        assert events[-2]["error"]["code"] == 500 and events[-1] == "[DONE]"
        await wait_until(lambda: "job3" in d.aborts, what="D aborted")
        assert len(d.inference_calls()) == 1  # no retry after bytes went out


async def test_client_disconnect_aborts_both_legs_before_the_first_token():
    async with (
        mocks({**P, "hang": True}, {**D, "hang": True}) as (p, d),
        pd([p], [d]) as r,
        aiohttp.ClientSession() as s,
    ):
        await ready(r)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(post(s, r.url + "/generate", {**GEN, "stream": True, "rid": "bye"}), 0.3)
        await wait_until(lambda: p.aborts == ["bye"] and d.aborts == ["bye"], what="both legs aborted")
        await wait_until(lambda: all(w.active == 0 for w in r.state.registry.all()), what="slots released")


async def test_several_choices_fan_out_one_room_each():
    async with mocks(P, D) as (p, d), pd([p], [d]) as r, aiohttp.ClientSession() as s:
        await ready(r)
        status, outs = await post(
            s, r.url + "/generate", {"text": ["ab", "cd"], "sampling_params": {"n": 2, "seed": 1}, "rid": ["x", "y"]}
        )
        assert status == 200 and [o["meta_info"]["id"] for o in outs] == ["x-0", "x-1", "y-0", "y-1"]
        rooms = {c.body["bootstrap_room"] for c in d.inference_calls()}
        assert len(rooms) == 4 and [c.body["sampling_params"]["seed"] for c in d.inference_calls()] == [1, 2, 1, 2]
        status, events = await post(s, r.url + "/generate", {"text": ["ab", "cd"], "stream": True})
        assert sorted({e["index"] for e in events[:-1]}) == [0, 1] and events[-1] == "[DONE]"
        status, out = await post(s, r.url + "/v1/completions", {"prompt": ["a", "b"], "n": 2, "rid": "c"})
        assert status == 200 and out["id"] == "cmpl-c" and [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
        assert out["usage"]["prompt_tokens"] == 2 and out["usage"]["completion_tokens"] == 16


async def test_prompt_logprobs_come_from_the_prefill_worker():
    async with mocks(P, D) as (p, d), pd([p], [d]) as r, aiohttp.ClientSession() as s:
        await ready(r)
        status, out = await post(s, r.url + "/generate", {**GEN, "return_logprob": True})
        values = [v for v, _, _ in out["meta_info"]["input_token_logprobs"]]
        assert status == 200 and values[0] is None and values[1] == pytest.approx(-0.51) and len(values) == 5
        status, events = await post(s, r.url + "/generate", {**GEN, "return_logprob": True, "stream": True})
        assert all(len(e["meta_info"]["input_token_logprobs"]) == 5 for e in events[:-1])
        status, events = await post(
            s, r.url + "/v1/completions", {"prompt": "abc", "echo": True, "logprobs": 0, "stream": True}
        )
        first = events[0]["choices"][0]["logprobs"]["token_logprobs"]
        assert first[:3] == [None, pytest.approx(-0.51), pytest.approx(-0.52)] and first[3] == -0.1


async def test_readiness_needs_both_roles_and_openai_client_works():
    async with mocks(P, D) as (p, d), pd([p], [], seed=5) as r, aiohttp.ClientSession() as s:
        await wait_until(lambda: r.state.registry.get(p.url).available, what="prefill admitted")
        async with s.get(r.url + "/health") as resp:
            assert resp.status == 503 and "decode" in (await resp.json())["reason"]
        status, body = await post(s, r.url + "/generate", GEN)
        assert status == 503 and "decode" in body["error"]["message"]
        async with s.post(r.url + "/workers", json={"url": d.url, "role": "decode"}) as resp:
            assert resp.status == 201
        async with s.get(r.url + "/health") as resp:
            assert resp.status == 200
        client = openai.AsyncOpenAI(base_url=r.url + "/v1", api_key="none", max_retries=0, timeout=10)
        chat = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], n=2)
        assert [c.index for c in chat.choices] == [0, 1] and chat.choices[1].message.content == "w0 w1 w2 w3 "
        stream = await client.completions.create(model="m", prompt="hi", stream=True, max_tokens=4)
        assert "".join([c.choices[0].text async for c in stream]) == "w0 w1 w2 w3 "
        await client.close()


@pytest.mark.parametrize("client_leaves", [False, True])
async def test_prefill_failure_interrupts_the_wait_for_decode_head_but_never_hides_a_client_cancel(client_leaves):
    from router.dispatch import Dispatcher
    from router.inference_routes import single_job
    from router.upstream import LegError
    from router.validation import parse_generate

    async with mocks({**P, "hang": True}, {**D, "hang": True}) as (p, d), pd([p], [d]) as r:
        await ready(r)
        body = {**GEN, "stream": True}
        job = single_job("/generate", body, parse_generate(body), "req", True, lambda: "race")
        call = Dispatcher(r.state)._call(job, 0, set())
        events = call.stream()
        consumer = asyncio.ensure_future(anext(events))
        await wait_until(lambda: len(d.inference_calls()) == 1 and call.d_opening is not None, what="D head awaited")
        failed: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        failed.set_exception(LegError(503, "prefill gave up", retryable=True, worker=call.p.worker))
        call._prefill_done(failed)  # type: ignore[arg-type]  # what P's task does when it fails
        if client_leaves:
            consumer.cancel()  # in the same loop iteration: the client's cancel must win
            with pytest.raises(asyncio.CancelledError):
                await consumer
        else:
            with pytest.raises(LegError, match="prefill gave up"):
                await consumer
            assert not consumer.cancelled()
        call.close("client_disconnected" if client_leaves else "failed")
        assert call.p_task is not None
        call.p_task.cancel()  # the real P call still hangs (its failure above was simulated)
        await events.aclose()
        await wait_until(lambda: "race" in d.aborts, what="D aborted")
        await wait_until(lambda: all(w.active == 0 for w in r.state.registry.all()), what="slots released")
