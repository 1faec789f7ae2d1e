"""Issue 19, router side, against in-process mock workers: whose fault a failure is, dead workers,
recovery after a restart, /health_generate end to end, admin separation, signed bootstrap fields,
bounded JSON bodies, quiet client disconnects."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from router_support.harness import (
    mocks,
    non_loopback_ip,
    ready,
    running_router,
    wait_until,
)
from router_support.mock_worker import MockWorker

from pd_common.cluster_auth import (
    UNSIGNED_WARNING,
    ClusterAuthError,
    ClusterKey,
    body_digest,
)
from router.circuit_breaker import CircuitState
from router.worker import Health

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]
GEN = {"text": "hello", "sampling_params": {"max_new_tokens": 4}}
P, D = {"name": "p", "role": "prefill"}, {"name": "d", "role": "decode"}
SECRET = b"0123456789abcdef-cluster-secret"
DIED = "child process died: scheduler"


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
            return r.status, await r.text()
        return r.status, await r.json()


def secret_file(tmp_path: Path) -> str:
    path = tmp_path / "cluster.secret"
    path.write_bytes(SECRET + b"\n")
    return str(path)


async def metric(s: aiohttp.ClientSession, url: str, prefix: str) -> float:
    async with s.get(url + "/metrics") as resp:
        text = await resp.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


# --- 1. whose fault ----------------------------------------------------------------------------------
async def test_100_client_errors_leave_every_breaker_closed_and_are_never_retried():
    async with (
        mocks({"name": "a", "fail_first": 10**6, "fail_status": 400}) as (a,),
        running_router(worker_urls=(a.url,), cb_failure_threshold=2) as r,
        aiohttp.ClientSession() as s,
    ):
        await ready(r)
        for i in range(100):
            status, body = await post(
                s,
                r.url + ("/generate" if i % 2 else "/v1/completions"),
                GEN if i % 2 else {"prompt": "x", "max_tokens": 4},
            )
            assert status == 400 and "injected failure" in body["error"]["message"]
        worker = r.state.registry.get(a.url)
        assert len(a.inference_calls()) == 100  # one upstream call per request: no retry
        assert worker.breaker.state is CircuitState.CLOSED and worker.breaker.consecutive_failures == 0
        assert await metric(s, r.url, "sgl_router_retries_total") == 0
        a.knobs.fail_status, a.knobs.fail_param = 503, "max_tokens"  # a 5xx that blames the request
        for _ in range(5):
            status, body = await post(s, r.url + "/generate", GEN)
            assert status == 503 and body["error"]["param"] == "max_tokens"
        assert len(a.inference_calls()) == 105 and worker.breaker.state is CircuitState.CLOSED
        assert worker.breaker.consecutive_failures == 0 and worker.available


async def test_pd_client_errors_of_the_prefill_worker_touch_no_breaker():
    async with (
        mocks({**P, "fail_first": 10**6, "fail_status": 400}, {**D, "latency_ms": 50}) as (p, d),
        pd([p], [d], cb_failure_threshold=2) as r,
        aiohttp.ClientSession() as s,
    ):
        await ready(r)
        for _ in range(100):
            status, _ = await post(s, r.url + "/generate", GEN)
            assert status == 400
        assert len(p.inference_calls()) == 100 and len(d.inference_calls()) == 100
        for w in r.state.registry.all():
            assert w.breaker.state is CircuitState.CLOSED and w.breaker.consecutive_failures == 0 and w.available
        async with s.get(r.url + "/health") as resp:
            assert resp.status == 200


async def test_a_500_is_not_retried_but_counts_and_503_is_retried():
    async with (
        mocks({"name": "a", "fail_first": 3, "fail_status": 500}, {"name": "b"}) as (a, b),
        running_router(worker_urls=(a.url, b.url), policy="round_robin", cb_failure_threshold=3) as r,
        aiohttp.ClientSession() as s,
    ):
        await ready(r)
        statuses = [(await post(s, r.url + "/generate", GEN))[0] for _ in range(6)]
        assert statuses.count(500) == 3 and statuses.count(200) == 3
        assert len(a.inference_calls()) == 3  # never retried, on a or elsewhere
        assert r.state.registry.get(a.url).breaker.state is CircuitState.OPEN  # worker faults still open it
        b.knobs.fail_first, b.knobs.fail_status = 1, 503  # unavailable: retried (on b, a's circuit is open)
        b.calls.clear()
        status, _ = await post(s, r.url + "/generate", GEN)
        assert status == 200 and len(b.inference_calls()) == 2 and len(a.inference_calls()) == 3


# --- 2. a restarted worker is routable once health checks admit it ------------------------------------
async def test_a_restarted_worker_is_routable_as_soon_as_health_checks_admit_it():
    a = MockWorker(name="a")
    port = int((await a.start()).rsplit(":", 1)[1])
    async with (
        running_router(worker_urls=(a.url,), cb_failure_threshold=2, cb_timeout_duration_secs=60.0) as r,
        aiohttp.ClientSession() as s,
    ):
        await ready(r)
        await a.stop()
        for _ in range(3):
            status, _ = await post(s, r.url + "/generate", GEN)
            assert status in (502, 503)
        w = r.state.registry.get(a.url)
        assert w.breaker.state is CircuitState.OPEN
        await wait_until(lambda: w.health is Health.UNHEALTHY, what="ejection")
        restarted = MockWorker(name="a2")
        await restarted.start(port)
        try:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            await wait_until(lambda: w.available, timeout=10, what="re-admission well before the 60 s breaker timeout")
            assert loop.time() - t0 < 10 and w.breaker.state is not CircuitState.OPEN
            status, body = await post(s, r.url + "/generate", GEN)
            assert status == 200 and body["meta_info"]["served_by"] == "a2"
        finally:
            await restarted.stop()


# --- 3. a dead worker process ------------------------------------------------------------------------
async def test_the_first_process_died_health_answer_ejects():
    async with (
        mocks({"name": "a"}, {"name": "b"}) as (a, b),
        running_router(worker_urls=(a.url, b.url), health_check_interval_secs=30.0, health_failure_threshold=3) as r,
    ):
        await ready(r)
        w = r.state.registry.get(a.url)
        await wait_until(lambda: w.available and r.state.registry.get(b.url).available, what="both admitted")
        a.knobs.health_status, a.knobs.health_reason = 503, DIED
        await r.state.health.probe_now(w)  # one probe, not health_failure_threshold of them
        assert w.health is Health.UNHEALTHY and w.fail_streak == 1 and "died" in w.last_probe_error
        b.knobs.health_status = 503  # an ordinary failure: needs 3 in a row
        wb = r.state.registry.get(b.url)
        await r.state.health.probe_now(wb)
        assert wb.health is Health.HEALTHY


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("route", ["/generate", "/v1/completions"])  # OpenAI aborts carry no message: /health says
async def test_an_answer_aborted_because_a_process_died_ejects_and_is_retried(route, stream):
    body = GEN if route == "/generate" else {"prompt": "hi", "max_tokens": 4}
    async with (
        mocks({"name": "a"}, {"name": "b"}) as (a, b),
        running_router(worker_urls=(a.url, b.url), policy="round_robin", health_check_interval_secs=30.0) as r,
        aiohttp.ClientSession() as s,
    ):
        await wait_until(lambda: all(w.available for w in r.state.registry.all()), what="both admitted")
        a.knobs.abort_message = f"worker process died: {DIED}"
        a.knobs.health_status, a.knobs.health_reason = 503, DIED
        for _ in range(2):
            status, answer = await post(s, r.url + route, {**body, "stream": stream})
            assert status == 200 and "abort" not in json.dumps(answer)
        assert len(a.inference_calls()) == 1 and len(b.inference_calls()) == 2  # retried on b, a ejected
        w = r.state.registry.get(a.url)
        assert w.health is Health.UNHEALTHY and not w.available and w.breaker.consecutive_failures == 1


async def test_router_health_turns_503_at_once_when_the_only_decode_worker_died():
    async with (
        mocks(P, {**D, "abort_message": f"worker process died: {DIED}"}) as (p, d),
        pd([p], [d], health_check_interval_secs=30.0) as r,
        aiohttp.ClientSession() as s,
    ):
        await ready(r)
        status, _ = await post(s, r.url + "/generate", GEN)
        assert status == 503  # retried, but there is no other decode worker
        async with s.get(r.url + "/health") as resp:
            assert resp.status == 503 and "decode" in (await resp.json())["reason"]
        assert len(d.inference_calls()) == 1


# --- 4. /health_generate -----------------------------------------------------------------------------
async def test_health_generate_runs_one_token_through_one_pair_with_signed_bootstrap_fields(tmp_path):
    key = ClusterKey(SECRET)
    async with (
        mocks(P, {**P, "name": "p2"}, D) as (p, p2, d),
        pd([p, p2], [d], cluster_secret_file=secret_file(tmp_path)) as r,
        aiohttp.ClientSession() as s,
    ):
        await ready(r)
        for _ in range(3):
            async with s.get(r.url + "/health_generate") as resp:
                out = await resp.json()
                assert resp.status == 200 and out["status"] == "ok" and out["decode"] == d.url
        calls = p.inference_calls() + p2.inference_calls()
        assert len(calls) == 3 and len(d.inference_calls()) == 3
        assert not [c for c in p.calls + d.calls if c.path == "/health_generate"]  # end to end, not fanned out
        for c in calls + d.inference_calls():
            b = c.body
            assert b["sampling_params"]["max_new_tokens"] == 1
            key.verify(
                "bootstrap", [b["bootstrap_host"], b["bootstrap_port"], b["bootstrap_room"]], b["bootstrap_token"]
            )
        d.knobs.fail_first = 1
        async with s.get(r.url + "/health_generate") as resp:
            assert resp.status == 503 and "injected failure" in (await resp.json())["reason"]
        d.knobs.abort_message = f"worker process died: {DIED}"
        d.knobs.health_status, d.knobs.health_reason = 503, DIED
        async with s.get(r.url + "/health_generate") as resp:
            assert resp.status == 503 and "died" in (await resp.json())["reason"]
        assert not r.state.registry.get(d.url).available  # ejected on that answer
        async with s.get(r.url + "/health_generate") as resp:
            assert resp.status == 503


async def test_health_generate_regular_mode_one_worker():
    async with mocks({"name": "a"}) as (a,), running_router(worker_urls=(a.url,)) as r, aiohttp.ClientSession() as s:
        await ready(r)
        async with s.get(r.url + "/health_generate") as resp:
            assert resp.status == 200 and (await resp.json())["worker"] == a.url
        assert len(a.inference_calls()) == 1 and "bootstrap_room" not in a.inference_calls()[0].body
        a.knobs.abort_message = "aborted by someone"
        async with s.get(r.url + "/health_generate") as resp:
            assert resp.status == 503 and "aborted" in (await resp.json())["reason"]


# --- 5. admin separation -----------------------------------------------------------------------------
async def test_the_inference_key_does_not_grant_management_routes():
    async with (
        mocks({"name": "a"}, {"name": "b"}) as (a, b),
        running_router(worker_urls=(a.url,), api_key="infer", admin_api_key="admin") as r,
        aiohttp.ClientSession() as s,
    ):
        await ready(r)
        infer, admin = {"Authorization": "Bearer infer"}, {"Authorization": "Bearer admin"}
        for method, path, body in (
            ("POST", "/workers", {"url": b.url}),
            ("GET", "/workers", None),
            ("DELETE", f"/workers?url={a.url}", None),
            ("POST", f"/add_worker?url={b.url}", None),
            ("POST", f"/remove_worker?url={a.url}", None),
            ("POST", "/flush_cache", None),
            ("POST", "/abort_request", {"abort_all": True}),
            ("GET", "/get_server_info", None),
        ):
            for headers, want in ((infer, 403), ({}, 401), ({"Authorization": "Bearer nope"}, 401)):
                async with s.request(method, r.url + path, json=body, headers=headers) as resp:
                    assert resp.status == want, (method, path, headers)
                    assert (await resp.json())["error"]["code"] == want
        assert len(r.state.registry) == 1 and a.aborts == []
        async with s.post(r.url + "/workers", json={"url": b.url}, headers=admin) as resp:
            assert resp.status == 201
        async with s.post(r.url + "/abort_request", json={"abort_all": True}, headers=admin) as resp:
            assert resp.status == 200
        for headers in (infer, admin):  # the admin key is a superset
            status, _ = await post(s, r.url + "/generate", GEN, headers=headers)
            assert status == 200
        status, _ = await post(s, r.url + "/generate", GEN)
        assert status == 401


async def test_without_an_admin_key_management_is_loopback_only():
    ip = non_loopback_ip()
    if ip is None:
        pytest.skip("this machine has no non-loopback address")
    async with (
        mocks({"name": "a"}, {"name": "b"}) as (a, b),
        running_router(bind="0.0.0.0", worker_urls=(a.url,)) as r,
        aiohttp.ClientSession() as s,
    ):
        await ready(r)
        remote = r.url.replace("127.0.0.1", ip)
        for method, path, body in (
            ("POST", "/workers", {"url": b.url}),
            ("GET", "/workers", None),
            ("POST", "/abort_request", {"abort_all": True}),
            ("POST", "/flush_cache", None),
            ("DELETE", f"/workers?url={a.url}", None),
        ):
            async with s.request(method, remote + path, json=body) as resp:
                assert resp.status == 403 and "loopback" in (await resp.json())["error"]["message"]
        status, _ = await post(s, remote + "/generate", GEN)  # inference stays open
        assert status == 200
        async with s.get(remote + "/health") as resp:
            assert resp.status == 200
        async with s.post(r.url + "/workers", json={"url": b.url}) as resp:  # loopback: allowed
            assert resp.status == 201
    async with (
        mocks({"name": "a"}) as (a,),
        running_router(bind="0.0.0.0", worker_urls=(a.url,), allow_remote_admin=True) as r,
        aiohttp.ClientSession() as s,
        s.get(r.url.replace("127.0.0.1", ip) + "/workers") as resp,
    ):
        assert resp.status == 200


def _sign(key: ClusterKey, method: str, path: str, body: bytes) -> dict[str, str]:
    return {
        "X-SGLang-PD-Signature": key.sign("register", body_digest(method, path, body)),
        "Content-Type": "application/json",
    }


async def test_signed_registrations_are_admitted_unsigned_and_badly_signed_are_refused(tmp_path):
    ip = non_loopback_ip()
    if ip is None:
        pytest.skip("this machine has no non-loopback address")
    key, stranger = ClusterKey(SECRET), ClusterKey(b"another-secret-of-16-bytes")
    async with (
        mocks(P, D, {**D, "name": "evil"}) as (p, d, evil),
        pd([p], [], bind="0.0.0.0", cluster_secret_file=secret_file(tmp_path)) as r,
        aiohttp.ClientSession() as s,
    ):
        remote = r.url.replace("127.0.0.1", ip)
        body = json.dumps({"url": evil.url, "role": "decode"}).encode()
        for headers, want in (
            ({"Content-Type": "application/json"}, 403),
            (_sign(stranger, "POST", "/workers", body), 401),
            (_sign(key, "POST", "/workers/x", body), 401),
            (_sign(key, "DELETE", "/workers", body), 401),
            ({"X-SGLang-PD-Signature": "garbage", "Content-Type": "application/json"}, 401),
        ):
            async with s.post(remote + "/workers", data=body, headers=headers) as resp:
                assert resp.status == want
        other = json.dumps({"url": d.url, "role": "decode"}).encode()  # a signature binds the body
        async with s.post(remote + "/workers", data=other, headers=_sign(key, "POST", "/workers", body)) as resp:
            assert resp.status == 401
        async with s.post(r.url + "/workers", data=body, headers=_sign(stranger, "POST", "/workers", body)) as resp:
            assert resp.status == 401  # a bad signature is refused from loopback too
        assert r.state.registry.get(evil.url) is None
        good = json.dumps({"url": d.url, "role": "decode"}).encode()
        async with s.post(remote + "/workers", data=good, headers=_sign(key, "POST", "/workers", good)) as resp:
            assert resp.status == 201
        path = f"/workers?url={d.url}"
        async with s.delete(
            remote + "/workers", params={"url": d.url}, headers=_sign(key, "DELETE", f"/workers?url={p.url}", b"")
        ) as resp:
            assert resp.status == 401  # signed for another worker
        async with s.delete(
            remote + "/workers", params={"url": d.url}, headers=_sign(key, "DELETE", path, b"")
        ) as resp:
            assert resp.status == 200
        assert r.state.registry.get(d.url) is None
        async with s.post(remote + "/workers", data=good, headers=_sign(key, "POST", "/workers", good)) as resp:
            assert resp.status == 201
        async with s.delete(
            remote + "/workers",
            params={"url": d.url},  # a bare-path token names no worker
            headers=_sign(key, "DELETE", "/workers", b""),
        ) as resp:
            assert resp.status == 401
        assert r.state.registry.get(d.url) is not None


# --- 6. signed bootstrap fields ----------------------------------------------------------------------
async def test_bootstrap_fields_are_the_routers_own_and_signed(tmp_path, caplog):
    key = ClusterKey(SECRET)
    forged = {"bootstrap_host": "10.9.9.9", "bootstrap_port": 1, "bootstrap_room": 5, "bootstrap_token": "1.ab"}
    caplog.set_level(logging.WARNING, logger="router")
    async with (
        mocks(P, D) as (p, d),
        pd([p], [d], cluster_secret_file=secret_file(tmp_path)) as r,
        aiohttp.ClientSession() as s,
    ):
        await ready(r)
        for body in (
            {**GEN, **forged},
            {**GEN, **forged, "stream": True},
            {"prompt": "x", "n": 2, **forged},
            {"messages": [{"role": "user", "content": "x"}], **forged},
        ):
            route = (
                "/generate" if "text" in body else ("/v1/completions" if "prompt" in body else "/v1/chat/completions")
            )
            status, _ = await post(s, r.url + route, body)
            assert status == 200
        assert len(p.inference_calls()) == len(d.inference_calls()) == 5
        for pc, dc in zip(p.inference_calls(), d.inference_calls()):
            for c in (pc, dc):
                b = c.body
                assert b["bootstrap_host"] == "127.0.0.1" and b["bootstrap_port"] == 9000 and b["bootstrap_room"] != 5
                key.verify(
                    "bootstrap", [b["bootstrap_host"], b["bootstrap_port"], b["bootstrap_room"]], b["bootstrap_token"]
                )
                with pytest.raises(ClusterAuthError):
                    key.verify(
                        "bootstrap",
                        [b["bootstrap_host"], b["bootstrap_port"], b["bootstrap_room"] + 1],
                        b["bootstrap_token"],
                    )
            assert pc.body["bootstrap_token"] == dc.body["bootstrap_token"]
    assert UNSIGNED_WARNING not in caplog.text
    caplog.clear()
    async with mocks(P, D) as (p, d), pd([p], [d]) as r, aiohttp.ClientSession() as s:
        await ready(r)
        assert caplog.text.count(UNSIGNED_WARNING) == 1  # once, at startup
        status, _ = await post(s, r.url + "/generate", {**GEN, **forged})
        assert status == 200 and "bootstrap_token" not in d.inference_calls()[0].body
        assert d.inference_calls()[0].body["bootstrap_room"] != 5
    async with mocks({"name": "a"}) as (a,), running_router(worker_urls=(a.url,)) as r, aiohttp.ClientSession() as s:
        await ready(r)
        status, _ = await post(s, r.url + "/generate", {**GEN, **forged})
        assert status == 200 and not set(forged) & set(a.inference_calls()[0].body)  # regular: none forwarded


# --- 7. bounded bodies -------------------------------------------------------------------------------
async def test_deep_or_huge_json_is_a_400_everywhere():
    async with mocks({"name": "a"}) as (a,), running_router(worker_urls=(a.url,)) as r, aiohttp.ClientSession() as s:
        await ready(r)
        deep = b'{"text": "x", "sampling_params": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        for path in ("/generate", "/v1/completions", "/v1/chat/completions", "/workers", "/abort_request"):
            async with s.post(r.url + path, data=deep, headers={"Content-Type": "application/json"}) as resp:
                assert resp.status == 400, path
                assert "deeper" in (await resp.json())["error"]["message"]
        for body in (
            b'{"text": "x", "sampling_params": {"max_new_tokens": 1' + b"0" * 5000 + b"}}",
            b'{"text": "x", "sampling_params": {"stop_token_ids": [18446744073709551616]}}',
            b'{"text": "x", "sampling_params": {"max_new_tokens": 1e300}}',
            b'{"text": "x", "sampling_params": {"top_k": 9.3e18}}',
            b'{"text": "x", "sampling_params": {"temperature": NaN}}',
            b'{"text": "x", "sampling_params": {"n": 1000}}',
            b'{"prompt": "x", "max_tokens": 1e300}',
            b'{"text": "x", "top_logprobs_num": 1e300}',
        ):
            path = "/v1/completions" if b"prompt" in body else "/generate"
            async with s.post(r.url + path, data=body, headers={"Content-Type": "application/json"}) as resp:
                assert resp.status == 400, body[:80]
                assert (await resp.json())["error"]["code"] == 400
        assert a.inference_calls() == []
        async with s.get(r.url + "/health") as resp:
            assert resp.status == 200


# --- 8. quiet client disconnects ---------------------------------------------------------------------
async def test_client_disconnects_while_a_stream_starts_log_no_traceback(caplog):
    caplog.set_level(logging.DEBUG)
    async with mocks({"name": "a", "num_tokens": 50}) as (a,):  # in-process: the race is likeliest
        async with running_router(worker_urls=(a.url,)) as r:
            await ready(r)
            port = int(r.url.rsplit(":", 1)[1])
            body = json.dumps({"text": "hi", "stream": True}).encode()
            req = (
                b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            for delay in [0, 0.0002, 0.0005, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.006, 0.008] * 15:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(req)
                await writer.drain()
                await asyncio.sleep(delay)
                writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                writer.close()  # a reset: the router's next write fails
            await wait_until(lambda: all(w.active == 0 for w in r.state.registry.all()), what="slots released")
            async with aiohttp.ClientSession() as s, s.get(r.url + "/health") as resp:
                assert resp.status == 200
        bad = [
            rec
            for rec in caplog.records
            if rec.levelno >= logging.ERROR or (rec.exc_info and rec.name.startswith("router"))
        ]
        assert bad == [], [f"{rec.name}: {rec.getMessage()}" for rec in bad]
