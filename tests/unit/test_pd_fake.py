"""P and D schedulers in one process joined by the fake transfer engine: PD output equals colocated output."""

from __future__ import annotations

import random
import time

import pytest

from sglang_pd import Engine
from sglang_pd.disagg.bootstrap_info import BootstrapInfo
from sglang_pd.engine_core import EngineCore
from sglang_pd.generate_request import GenerateItem
from sglang_pd.sampling.params import SamplingParams
from sglang_pd.scheduler.req import LogprobRequest, Req
from sglang_pd.server_args import ServerArgs

GREEDY = {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True}
BOOT_PORT = 18998


@pytest.fixture()
def hub():
    from transfer.fake_engine import FakeTransferHub

    return FakeTransferHub()


def make_core(path: str, mode: str, hub, **kw) -> EngineCore:
    args = ServerArgs(
        model_path=path,
        disaggregation_mode=mode,
        disaggregation_transfer_backend="fake",
        disaggregation_bootstrap_port=BOOT_PORT,
        host="127.0.0.1",
        **kw,
    )
    return EngineCore(args, transfer_hub=hub)


def run_pd(
    p: EngineCore,
    d: EngineCore,
    prompts: list[list[int]],
    sp: dict,
    *,
    logprob: LogprobRequest | None = None,
    timeout: float = 30.0,
    router_aborts: bool = False,
) -> tuple[list[Req], list[Req]]:
    """Drive both schedulers until every request ends. ``router_aborts``: when a D request fails, abort
    its P leg as the router does."""
    rng = random.Random(0)
    p_reqs, d_reqs = [], []
    for i, prompt in enumerate(prompts):
        boot = BootstrapInfo("127.0.0.1", BOOT_PORT, rng.randrange(1 << 63))
        item = GenerateItem(
            f"r{i}", None, tuple(prompt), SamplingParams.from_dict(sp), logprob or LogprobRequest(), 0, boot
        )
        d_reqs.append(d.make_req(item))
        p_reqs.append(p.make_req(item))
        d.submit(d_reqs[-1])
        p.submit(p_reqs[-1])
    deadline = time.monotonic() + timeout
    while not all(r.finished for r in d_reqs + p_reqs):
        assert time.monotonic() < deadline, "PD run did not finish"
        p.step()
        d.step()
        if router_aborts:
            for dr, pr in zip(d_reqs, p_reqs):
                if dr.finished and dr.finish_reason.type == "abort" and not pr.finished:
                    p.scheduler.abort(pr.rid, "the decode leg failed")
    return p_reqs, d_reqs


def assert_idle(core: EngineCore) -> None:
    sched = core.scheduler
    assert not sched.has_work()
    kv = sched.kv
    assert kv.cache.num_locked_pages == 0
    assert kv.pool.num_free + kv.cache.num_cached_pages == kv.pool.num_total


@pytest.mark.parametrize("settings", [{"page_size": 4, "chunked_prefill_size": 16}, {"page_size": 1}])
def test_pd_matches_colocated(tiny_model_dir, hub, settings):
    path = str(tiny_model_dir("llama"))
    rng = random.Random(1)
    shared = [rng.randrange(600) for _ in range(40)]
    prompts = [[rng.randrange(600) for _ in range(n)] for n in (1, 3, 17, 50)] + [shared + [5], shared + [6, 7]]
    expected = [
        o["output_ids"] for o in Engine(model_path=path, **settings).generate(input_ids=prompts, sampling_params=GREEDY)
    ]
    p = make_core(path, "prefill", hub, **settings)
    d = make_core(path, "decode", hub, **settings)
    try:
        p_reqs, d_reqs = run_pd(p, d, prompts, GREEDY)
        assert [r.output_ids for r in d_reqs] == expected
        assert all(r.finish_reason.type == "length" and len(r.output_ids) == 1 for r in p_reqs)
        assert [r.output_ids[0] for r in p_reqs] == [e[0] for e in expected]
        # a second pass over the shared prefix hits P's radix cache; D still gets the whole prompt
        p2, d2 = run_pd(p, d, prompts[-2:], GREEDY)
        assert [r.output_ids for r in d2] == expected[-2:]
        assert p2[0].cached_tokens > 0 and d2[0].cached_tokens == p2[0].cached_tokens
        assert_idle(p)
        assert_idle(d)
    finally:
        p.shutdown()
        d.shutdown()


def test_pd_logprobs_come_from_prefill(tiny_model_dir, hub):
    path = str(tiny_model_dir("qwen2"))
    prompt = [11, 12, 13, 14, 15, 16]
    lp = LogprobRequest(True, 2, 0)
    colo = Engine(model_path=path, page_size=4).generate(
        input_ids=prompt, sampling_params=GREEDY, return_logprob=True, logprob_start_len=0, top_logprobs_num=2
    )
    p = make_core(path, "prefill", hub, page_size=4)
    d = make_core(path, "decode", hub, page_size=4)
    try:
        _, (dreq,) = run_pd(p, d, [prompt], GREEDY, logprob=lp)
        assert dreq.output_ids == colo["output_ids"]
        got_in = [t for _, t in dreq.logprobs.input_token]
        assert got_in == prompt
        ref_out = colo["meta_info"]["output_token_logprobs"]
        assert [t for _, t in dreq.logprobs.output_token] == [t for _, t, _ in ref_out]
        for (a, _), (b, _, _) in zip(dreq.logprobs.output_token, ref_out):
            assert a == pytest.approx(b, abs=1e-4)
    finally:
        p.shutdown()
        d.shutdown()


def test_engine_mismatch_fails_alone_and_frees_pages(tiny_model_dir, hub):
    path = str(tiny_model_dir("llama"))
    p = make_core(path, "prefill", hub, page_size=4)
    d = make_core(path, "decode", hub, page_size=8)
    try:
        p_reqs, d_reqs = run_pd(p, d, [[1, 2, 3, 4, 5]], GREEDY, router_aborts=True)
        assert d_reqs[0].finish_reason.type == "abort" and "mismatch" in d_reqs[0].finish_reason.message
        assert p_reqs[0].finish_reason.type == "abort"
        assert_idle(p)
        assert_idle(d)
    finally:
        p.shutdown()
        d.shutdown()


def test_abort_on_decode_side_frees_both(tiny_model_dir, hub):
    path = str(tiny_model_dir("llama"))
    p = make_core(path, "prefill", hub, page_size=4)
    d = make_core(path, "decode", hub, page_size=4)
    try:
        long = {"temperature": 0, "max_new_tokens": 500, "ignore_eos": True}
        boot = BootstrapInfo("127.0.0.1", BOOT_PORT, 77)
        item = GenerateItem("x", None, tuple(range(3, 40)), SamplingParams.from_dict(long), LogprobRequest(), 0, boot)
        dreq, preq = d.make_req(item), p.make_req(item)
        d.submit(dreq)
        p.submit(preq)
        for _ in range(5):
            p.step()
            d.step()
        d.scheduler.abort("x", "client went away")
        p.scheduler.abort("x", "client went away")
        deadline = time.monotonic() + 10
        while p.scheduler.has_work() or d.scheduler.has_work():
            assert time.monotonic() < deadline
            p.step()
            d.step()
        assert dreq.finish_reason.type == "abort" and preq.finished
        assert_idle(p)
        assert_idle(d)
    finally:
        p.shutdown()
        d.shutdown()
