"""P and D schedulers in one process joined by the real UCX engine (TCP on 127.0.0.1) over a direct link (P writes
D's shared-memory pool): a request D aborts while P may write its pages keeps them until P confirms, then frees
everything on both sides."""

from __future__ import annotations

import socket
import time

import pytest
from test_pd_fake import GREEDY, assert_idle

from sglang_pd.disagg.bootstrap_info import BootstrapInfo
from sglang_pd.engine_core import EngineCore
from sglang_pd.generate_request import GenerateItem
from sglang_pd.sampling.params import SamplingParams
from sglang_pd.scheduler.req import LogprobRequest
from sglang_pd.server_args import ServerArgs

pytestmark = pytest.mark.timeout(120)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_core(path: str, mode: str, port: int) -> EngineCore:
    args = ServerArgs(
        model_path=path,
        disaggregation_mode=mode,
        disaggregation_transfer_backend="ucx",
        disaggregation_bootstrap_port=port,
        host="127.0.0.1",
        page_size=4,
    )
    return EngineCore(args)


def step_until(cores: list[EngineCore], done, what: str, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        for core in cores:
            core.step()
        time.sleep(0.001)


def test_decode_abort_keeps_pages_until_prefill_confirms(tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    path = str(tiny_model_dir("llama"))
    port = free_port()
    p = make_core(path, "prefill", port)
    d = make_core(path, "decode", port)
    try:
        boot = BootstrapInfo("127.0.0.1", port, 4242)
        item = GenerateItem("x", None, tuple(range(3, 40)), SamplingParams.from_dict(GREEDY), LogprobRequest(), 0, boot)
        dreq = d.make_req(item)
        d.submit(dreq)  # P has not seen the request yet: D registers, and P may write its pages from now on
        hooks = d.scheduler.hooks
        step_until([d], lambda: hooks.stats()["num_decode_registered_reqs"] == 1, "D's registration")
        # Fault injection on a private method: hold P's answers back, so the drain is observable.
        p_transfer = p.scheduler.hooks.transfer  # type: ignore[attr-defined]
        p_post, held = p_transfer._post, []
        p_transfer._post = lambda peer, msg: (
            held.append((peer, msg)) if type(msg).__name__ == "AbortAck" else p_post(peer, msg)
        )
        d.scheduler.abort("x", "client went away")
        assert dreq.finished and dreq.finish_reason.type == "abort"  # the client is answered at once
        step_until([d, p], lambda: bool(held), "P to receive the abort")
        assert hooks.draining == [dreq], "D keeps the pages while P may still write them"
        assert d.scheduler.kv.pool.num_free < d.scheduler.kv.pool.num_total
        for peer, msg in held:
            p_transfer.call_soon(p_post, peer, msg)  # the answer goes out now
        step_until([d, p], lambda: not d.scheduler.has_work() and not p.scheduler.has_work(), "both to go idle")
        assert_idle(d)
        assert_idle(p)
        # The link goes on: the next request is served direct, end to end.
        boot2 = BootstrapInfo("127.0.0.1", port, 4243)
        item2 = GenerateItem(
            "y", None, tuple(range(5, 30)), SamplingParams.from_dict(GREEDY), LogprobRequest(), 0, boot2
        )
        dreq2, preq2 = d.make_req(item2), p.make_req(item2)
        d.submit(dreq2)
        p.submit(preq2)
        step_until([p, d], lambda: dreq2.finished and preq2.finished, "the next request")
        assert dreq2.finish_reason.type == "length", dreq2.finish_reason
        meta = d.scheduler.hooks.transfer_meta(dreq2)
        assert meta is not None and meta["path"] == "direct"
    finally:
        d.shutdown()
        p.shutdown()
