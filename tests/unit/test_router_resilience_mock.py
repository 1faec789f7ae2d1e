"""Health ejection/re-admission, circuit breaker, dynamic workers and drain, stale connections (mocks, in-process)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from router_support.dropping_server import dropping_server
from router_support.harness import mocks, ready, running_router, wait_until
from router_support.mock_worker import MockWorker

from router.config import WorkerSpec
from router.upstream import LegError, Upstream
from router.worker import Worker

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]
GEN = {"text": "hello", "sampling_params": {"max_new_tokens": 4}}


async def workers(s: aiohttp.ClientSession, url: str) -> dict[str, dict[str, Any]]:
    async with s.get(url + "/workers") as r:
        return {w["url"]: w for w in (await r.json())["workers"]}


async def test_ejection_after_failed_probes_and_readmission_after_good_ones():
    async with (
        mocks({"name": "a"}, {"name": "b"}) as (a, b),
        running_router(worker_urls=(a.url, b.url), policy="round_robin") as r,
        aiohttp.ClientSession() as s,
    ):
        await ready(r)
        a.knobs.health_status = 503
        await wait_until(lambda: not r.state.registry.get(a.url).available, what="ejection of a")
        assert (await workers(s, r.url))[a.url]["status"] == "unhealthy"
        for _ in range(4):  # everything goes to b now
            async with s.post(r.url + "/generate", json=GEN) as resp:
                assert (await resp.json())["meta_info"]["served_by"] == "b"
        a.knobs.health_status = 200
        await wait_until(lambda: r.state.registry.get(a.url).available, what="re-admission of a")
        b.knobs.health_delay_ms = 3000  # slower than the probe timeout (1 s): a failed probe
        await wait_until(lambda: not r.state.registry.get(b.url).available, timeout=10, what="slow b ejected")
        async with s.get(r.url + "/metrics") as resp:
            text = await resp.text()
        assert f'sgl_router_health_checks_total{{result="fail",worker="{a.url}"}}' in text
        assert f'sgl_router_worker_healthy{{role="regular",worker="{b.url}"}} 0.0' in text


async def test_circuit_breaker_opens_and_closes():
    async with (
        mocks({"name": "a", "fail_first": 2, "fail_status": 500}, {"name": "b"}) as (a, b),
        running_router(
            worker_urls=(a.url, b.url),
            policy="round_robin",
            disable_retries=True,
            cb_failure_threshold=2,
            cb_success_threshold=1,
            cb_timeout_duration_secs=0.5,
        ) as r,
        aiohttp.ClientSession() as s,
    ):
        await ready(r)
        statuses = []
        for _ in range(4):
            async with s.post(r.url + "/generate", json=GEN) as resp:
                statuses.append(resp.status)
        assert statuses == [500, 200, 500, 200]
        assert (await workers(s, r.url))[a.url]["circuit_state"] == "open"
        async with s.get(r.url + "/metrics") as resp:
            assert f'sgl_router_cb_state{{role="regular",worker="{a.url}"}} 1.0' in await resp.text()
        calls = len(a.inference_calls())
        for _ in range(3):
            async with s.post(r.url + "/generate", json=GEN) as resp:
                assert resp.status == 200
        assert len(a.inference_calls()) == calls  # open: a gets nothing
        await wait_until(lambda: r.state.registry.get(a.url).breaker.allows(), what="half-open")
        served = set()
        for _ in range(4):
            async with s.post(r.url + "/generate", json=GEN) as resp:
                served.add((await resp.json())["meta_info"]["served_by"])
        assert served == {"a", "b"} and (await workers(s, r.url))[a.url]["circuit_state"] == "closed"


async def test_workers_api_add_and_drain_under_load_without_failures():
    async with (
        mocks({"name": "a", "token_delay_ms": 5}, {"name": "b", "token_delay_ms": 5}) as (a, b),
        running_router(worker_urls=(a.url,), policy="round_robin") as r,
        aiohttp.ClientSession() as s,
    ):
        await ready(r)
        async with s.post(r.url + "/workers", json={"url": "not a url"}) as resp:
            assert resp.status == 400
        async with s.post(r.url + "/workers", json={"url": b.url, "role": "prefill"}) as resp:
            assert resp.status == 400  # regular mode
        failures: list[str] = []
        stop = asyncio.Event()

        async def client() -> None:
            while not stop.is_set():
                async with s.post(r.url + "/generate", json={**GEN, "stream": True}) as resp:
                    body = await resp.read()
                    if resp.status != 200 or b'"error"' in body or not body.endswith(b"data: [DONE]\n\n"):
                        failures.append(f"{resp.status} {body[-200:]!r}")

        load = [asyncio.ensure_future(client()) for _ in range(6)]
        async with s.post(r.url + "/workers", json={"url": b.url}) as resp:
            assert resp.status == 201 and (await resp.json())["worker"]["status"] == "healthy"
        await wait_until(lambda: len(b.inference_calls()) >= 5, what="b serving")
        async with s.delete(r.url + "/workers", params={"url": a.url}) as resp:
            assert resp.status in (200, 202)
        await wait_until(lambda: r.state.registry.get(a.url) is None, what="a drained and removed")
        served_by_a = len(a.inference_calls())
        await wait_until(lambda: len(b.inference_calls()) >= served_by_a + 20, what="traffic after removal")
        assert len(a.inference_calls()) == served_by_a  # no new requests after the drain began
        async with s.post(r.url + "/add_worker", params={"url": a.url}) as resp:
            assert resp.status == 201
        await wait_until(lambda: len(a.inference_calls()) > served_by_a, what="a back")
        stop.set()
        await asyncio.wait_for(asyncio.gather(*load), 10)
        assert failures == []


async def test_drain_lets_in_flight_requests_finish():
    async with (
        mocks({"name": "a", "token_delay_ms": 100, "num_tokens": 5}) as (a,),
        running_router(worker_urls=(a.url,)) as r,
        aiohttp.ClientSession() as s,
    ):
        await ready(r)
        async with s.post(r.url + "/generate", json={**GEN, "stream": True}) as resp:
            await resp.content.readuntil(b"\n\n")
            async with s.delete(r.url + "/workers", params={"url": a.url}) as d:
                assert d.status == 202 and (await d.json())["status"] == "draining"
            async with s.post(r.url + "/generate", json=GEN) as other:
                assert other.status == 503  # no new requests while draining
            rest = await resp.read()
        assert rest.endswith(b"data: [DONE]\n\n") and b'"error"' not in rest
        await wait_until(lambda: r.state.registry.get(a.url) is None, what="removal")


async def test_a_dead_worker_is_ejected_quickly_after_a_failed_call():
    a = MockWorker(name="a")
    await a.start()
    async with (
        mocks({"name": "b"}) as (b,),
        running_router(worker_urls=(a.url, b.url), health_check_interval_secs=30.0, policy="round_robin") as r,
        aiohttp.ClientSession() as s,
    ):
        await ready(r)
        await wait_until(lambda: r.state.registry.get(a.url).available, what="a admitted")
        await a.stop()
        for _ in range(2):  # the call to dead a fails over to b, and pokes a's health check
            async with s.post(r.url + "/generate", json=GEN) as resp:
                assert resp.status == 200
        await wait_until(lambda: not r.state.registry.get(a.url).available, timeout=5, what="fast ejection")


DONE_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: 14\r\n\r\ndata: [DONE]\n\n"


async def test_stale_connection_is_retried_once_on_a_fresh_one() -> None:
    from router.config import BreakerConfig

    async with dropping_server(1, DONE_ANSWER) as (url, seen):
        up = Upstream(10.0, None)
        await up.start()
        try:
            w = Worker(WorkerSpec(url, "regular"), BreakerConfig(3, 1, 1.0, 1.0, True))
            for _ in range(2):  # the second one goes out on the kept-alive connection, which is dropped
                resp = await up.post(w, "/generate", b"{}", "req-1")
                assert resp.status == 200 and await resp.read() == b"data: [DONE]\n\n"
            assert seen == [2, 1]  # one silent retry on a fresh connection, no LegError
        finally:
            await up.close()
    async with dropping_server(0, DONE_ANSWER) as (url, seen):  # a fresh connection dropped: a real failure
        up = Upstream(10.0, None)
        await up.start()
        try:
            w = Worker(WorkerSpec(url, "regular"), BreakerConfig(3, 1, 1.0, 1.0, True))
            with pytest.raises(LegError) as e:
                await up.post(w, "/generate", b"{}", None)
            assert e.value.transport and e.value.retryable and e.value.status == 502 and seen == [1]
        finally:
            await up.close()
