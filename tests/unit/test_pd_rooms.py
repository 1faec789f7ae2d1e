"""P and D schedulers in one process (fake transfer engine): one live request per room on each worker, a second
one is refused at once and never gets the first one's data; the unsigned-control-plane warning."""

from __future__ import annotations

import logging
import time

import pytest
from test_pd_fake import GREEDY, assert_idle, make_core

from pd_common.cluster_auth import ENV_VAR, UNSIGNED_WARNING
from sglang_pd.disagg.bootstrap_info import BootstrapInfo
from sglang_pd.generate_request import GenerateItem
from sglang_pd.sampling.params import SamplingParams
from sglang_pd.scheduler.req import LogprobRequest

BOOT_PORT = 18998


@pytest.fixture()
def hub():
    from transfer.fake_engine import FakeTransferHub

    return FakeTransferHub()


def item(rid: str, prompt: list[int], room: int) -> GenerateItem:
    return GenerateItem(
        rid,
        None,
        tuple(prompt),
        SamplingParams.from_dict(GREEDY),
        LogprobRequest(),
        0,
        BootstrapInfo("127.0.0.1", BOOT_PORT, room),
    )


def test_a_second_request_with_a_live_room_is_refused_on_both_sides(tiny_model_dir, hub, monkeypatch, caplog) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    path = str(tiny_model_dir("llama"))
    with caplog.at_level(logging.WARNING):
        p = make_core(path, "prefill", hub, page_size=4)
        d = make_core(path, "decode", hub, page_size=4)
    assert [r.getMessage() for r in caplog.records].count(UNSIGNED_WARNING) == 2  # once per worker
    try:
        legit = list(range(3, 30))
        dreq, preq = d.make_req(item("legit", legit, 41)), p.make_req(item("legit", legit, 41))
        assert d.submit(dreq) is None
        d.step()  # D registers room 41 and waits for P
        for core in (d, p):  # the stranger's request names the same room: refused at once, on either side
            evil = core.make_req(item("evil", [9, 9, 9], 41))
            if core is p:
                assert p.submit(preq) is None  # P's own leg first (the router's)
            refused = core.submit(evil)
            assert refused is evil and evil.finished and evil.finish_reason.type == "abort"
            assert "already in use" in evil.finish_reason.message and evil.output_ids == []
        deadline = time.monotonic() + 20
        while not (dreq.finished and preq.finished):
            assert time.monotonic() < deadline
            p.step()
            d.step()
        assert dreq.finish_reason.type == "length", dreq.finish_reason
        from sglang_pd import Engine

        want = Engine(model_path=path, page_size=4).generate(input_ids=legit, sampling_params=GREEDY)["output_ids"]
        assert dreq.output_ids == want
        # once both sides released the room, it may be used again
        again_d, again_p = d.make_req(item("again", legit, 41)), p.make_req(item("again", legit, 41))
        assert d.submit(again_d) is None and p.submit(again_p) is None
        while not (again_d.finished and again_p.finished):
            assert time.monotonic() < deadline + 20
            p.step()
            d.step()
        assert again_d.output_ids == want
        assert_idle(p)
        assert_idle(d)
    finally:
        p.shutdown()
        d.shutdown()


def test_no_warning_with_a_secret(tiny_model_dir, hub, monkeypatch, caplog) -> None:
    monkeypatch.setenv(ENV_VAR, "q" * 24)
    with caplog.at_level(logging.WARNING):
        core = make_core(str(tiny_model_dir("llama")), "decode", hub, page_size=4)
    try:
        assert UNSIGNED_WARNING not in [r.getMessage() for r in caplog.records]
        assert core.args.cluster_key() is not None
    finally:
        core.shutdown()
