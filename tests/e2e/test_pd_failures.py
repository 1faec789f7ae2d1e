"""PD failure paths over real UCX: every one ends in a client-visible error, frees every page, keeps workers serving."""

from __future__ import annotations

import concurrent.futures
import random
import time

import pytest
import requests
from server_process import ServerProcess, free_port
from test_pd_cluster import GREEDY, wait_idle

FAST = {
    "SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT": "3",
    "SGLANG_DISAGGREGATION_WAITING_TIMEOUT": "4",
    "SGLANG_DISAGGREGATION_HEARTBEAT_INTERVAL": "0.5",
    "SGLANG_DISAGGREGATION_HEARTBEAT_MAX_FAILURE": "2",
}
PAGE = ("--page-size", "4")


def start_p(model: str, env: dict[str, str], *extra: str) -> tuple[ServerProcess, int]:
    boot = free_port()
    return ServerProcess(
        model, *PAGE, "--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port", str(boot), *extra, env=env
    ), boot


def start_d(model: str, env: dict[str, str], *extra: str) -> ServerProcess:
    return ServerProcess(model, *(extra or PAGE), "--disaggregation-mode", "decode", env=env)


def leg(url: str, boot: int, room: int, prompt: list[int], sp: dict | None = None, timeout: float = 60) -> dict:
    body = {
        "input_ids": prompt,
        "sampling_params": sp or GREEDY,
        "bootstrap_host": "127.0.0.1",
        "bootstrap_port": boot,
        "bootstrap_room": room,
        "rid": f"room-{room}",
    }
    return requests.post(url + "/generate", json=body, timeout=timeout).json()


def both_legs(p_url: str, d_url: str, boot: int, room: int, prompt: list[int]) -> tuple[dict, dict]:
    with concurrent.futures.ThreadPoolExecutor(2) as ex:
        fp = ex.submit(leg, p_url, boot, room, prompt)
        fd = ex.submit(leg, d_url, boot, room, prompt)
        return fp.result(), fd.result()


def wait_stat(url: str, key: str, at_least: int = 1, timeout: float = 15) -> None:
    """Poll the worker's scheduler stats until ``key`` (top level, or under ``disagg``) reaches ``at_least``."""
    deadline = time.monotonic() + timeout
    while True:
        sched = requests.get(url + "/get_server_info", timeout=5).json()["scheduler"]
        if sched.get(key, sched["disagg"].get(key, 0)) >= at_least:
            return
        assert time.monotonic() < deadline, f"{url}: {key} stayed below {at_least}: {sched}"
        time.sleep(0.05)


def assert_error(out: dict, *needles: str) -> None:
    reason = out["meta_info"]["finish_reason"]
    assert reason["type"] == "abort", out
    assert any(n in reason["message"] for n in needles), reason["message"]


def healthy_and_serving(p: ServerProcess, d: ServerProcess, boot: int) -> None:
    for s in (p, d):
        assert requests.get(s.url + "/health", timeout=5).status_code == 200
    out_p, out_d = both_legs(p.url, d.url, boot, random.randrange(1 << 62), [5, 6, 7, 8, 9])
    assert out_d["meta_info"]["finish_reason"]["type"] == "length", out_d
    assert out_p["output_ids"] == out_d["output_ids"][:1]
    wait_idle([p.url, d.url])


@pytest.fixture(scope="module")
def pair(tiny_llama):
    p, boot = start_p(tiny_llama, FAST)
    d = start_d(tiny_llama, FAST)
    yield p, d, boot
    p.stop()
    d.stop()


def test_decode_never_registers(pair):
    p, d, boot = pair
    t0 = time.monotonic()
    assert_error(leg(p.url, boot, 11, [1, 2, 3, 4, 5, 6]), "bootstrap", "register", "timed out")
    assert 2 < time.monotonic() - t0 < 20
    wait_idle([p.url])
    healthy_and_serving(p, d, boot)


def test_prefill_never_sends(pair):
    p, d, boot = pair
    t0 = time.monotonic()
    assert_error(leg(d.url, boot, 12, list(range(4, 30))), "never received", "timed out", "timeout")
    assert time.monotonic() - t0 < 20
    wait_idle([p.url, d.url])
    healthy_and_serving(p, d, boot)


def test_client_aborts_either_leg(pair):
    p, d, boot = pair
    long = {"temperature": 0, "max_new_tokens": 1500, "ignore_eos": True}
    with concurrent.futures.ThreadPoolExecutor(2) as ex:
        fp = ex.submit(leg, p.url, boot, 13, list(range(4, 40)), long)
        fd = ex.submit(leg, d.url, boot, 13, list(range(4, 40)), long)
        fp.result()
        wait_stat(d.url, "num_running_reqs")  # D is decoding now
        requests.post(d.url + "/abort_request", json={"rid": "room-13"}, timeout=5)
        assert fd.result()["meta_info"]["finish_reason"]["type"] == "abort"
    # the P leg aborted while P still waits for D's registration
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        fp = ex.submit(leg, p.url, boot, 14, [3, 4, 5])
        wait_stat(p.url, "num_prefill_prealloc_queue_reqs")  # P holds it, waiting for D
        requests.post(p.url + "/abort_request", json={"rid": "room-14"}, timeout=5)
        assert fp.result()["meta_info"]["finish_reason"]["type"] == "abort"
    wait_idle([p.url, d.url])
    healthy_and_serving(p, d, boot)


def test_engine_mismatch(pair, tiny_llama):
    p, _, boot = pair
    d8 = start_d(tiny_llama, FAST, "--page-size", "8")
    try:
        out_p, out_d = both_legs(p.url, d8.url, boot, 15, [1, 2, 3, 4, 5])
        assert_error(out_d, "mismatch")
        assert "page_size" in out_d["meta_info"]["finish_reason"]["message"]
        assert out_p["meta_info"]["finish_reason"]["type"] == "abort"
        wait_idle([p.url, d8.url])
    finally:
        d8.stop()


def test_injected_transfer_failures(tiny_llama):
    env = {**FAST, "SGLANG_DISAGGREGATION_TEST_FAILURE_PROB": "0.5"}
    p, boot = start_p(tiny_llama, env)
    d = start_d(tiny_llama, env)
    try:
        # Until both outcomes were seen (p = 0.5 each): at most 40 requests, so a false failure is a 2^-39 event.
        results: list[tuple[dict, dict]] = []
        while len(results) < 40 and len({r[1]["meta_info"]["finish_reason"]["type"] for r in results}) < 2:
            i = len(results)
            results.append(both_legs(p.url, d.url, boot, 100 + i, [7, 8, 9, 10 + i % 500]))
        failed = [r for r in results if r[1]["meta_info"]["finish_reason"]["type"] == "abort"]
        assert 0 < len(failed) < len(results), [r[1]["meta_info"]["finish_reason"] for r in results]
        for out_p, out_d in failed:
            assert_error(out_d, "injected")
            assert out_p["meta_info"]["finish_reason"]["type"] == "abort"
        wait_idle([p.url, d.url])
        assert all(requests.get(s.url + "/health", timeout=5).status_code == 200 for s in (p, d))
    finally:
        p.stop()
        d.stop()


def test_prefill_dies(tiny_llama):
    p, boot = start_p(tiny_llama, {**FAST, "SGLANG_DISAGGREGATION_WAITING_TIMEOUT": "120"})
    d = start_d(tiny_llama, {**FAST, "SGLANG_DISAGGREGATION_WAITING_TIMEOUT": "120"})
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as ex:
            fd = ex.submit(leg, d.url, boot, 21, [1, 2, 3, 4, 5, 6, 7])  # D registers; P never gets the request
            wait_stat(d.url, "num_decode_registered_reqs")  # P acknowledged D's registration
            p.kill()
            t0 = time.monotonic()
            out = fd.result()
        assert_error(out, "unreachable", "lost", "closed", "died")
        assert time.monotonic() - t0 < 15  # heartbeat 0.5 s x 2, not the 120 s waiting timeout
        wait_idle([d.url])
        assert requests.get(d.url + "/health", timeout=5).status_code == 200
    finally:
        p.stop()
        d.stop()


def test_decode_dies_mid_transfer(tiny_llama):
    p, boot = start_p(tiny_llama, {**FAST, "SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT": "60"})
    d = start_d(tiny_llama, FAST)
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as ex:
            ex.submit(lambda: _quiet(leg, d.url, boot, 31, list(range(4, 60))))  # D registers room 31 with P
            deadline = time.monotonic() + 10
            while (
                requests.get(d.url + "/get_server_info", timeout=5)
                .json()["scheduler"]["disagg"]
                .get("num_decode_registered_reqs", 0)
                == 0
            ):  # P has D's registration
                assert time.monotonic() < deadline
                time.sleep(0.05)
            d.kill()
        t0 = time.monotonic()
        out = leg(p.url, boot, 31, list(range(4, 60)))
        assert out["meta_info"]["finish_reason"]["type"] == "abort"
        assert time.monotonic() - t0 < 20  # the dead endpoint fails the room, not the 60 s bootstrap timeout
        wait_idle([p.url])
        assert requests.get(p.url + "/health", timeout=5).status_code == 200
    finally:
        p.stop()
        d.stop()


def _quiet(fn, *args):  # the D leg dies with its server; its connection error is expected
    try:
        return fn(*args)
    except requests.RequestException:
        return None
