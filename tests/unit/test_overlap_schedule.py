"""Overlapped scheduling: the host launches batch k+1 before it reads batch k's samples.

Oracle: the same engine with ``disable_overlap_schedule`` (serial steps) must give identical answers
for every kind of request (stops decided by the lagging results, seeded sampling, penalties that
force the serial fallback, logprobs, retraction in a tiny pool, aborts of in-flight requests), and
every page must come back.
"""

from __future__ import annotations

import pytest
from oracle import assert_pool_idle

from sglang_pd import Engine
from sglang_pd.generate_request import GenerateItem
from sglang_pd.sampling.params import SamplingParams
from sglang_pd.scheduler.req import LogprobRequest

PROMPTS = [
    [5, 6, 7],
    list(range(3, 40)),
    [9] * 70,
    list(range(100, 117)),
    [11, 12],
    list(range(50, 95)),
    list(range(200, 260)),
    [4] * 33,
]


def _params(stop_id: int) -> list[dict]:
    return [
        {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True, "stop_token_ids": [stop_id]},
        {"temperature": 0.8, "top_p": 0.9, "top_k": 20, "seed": 7, "max_new_tokens": 30, "ignore_eos": True},
        {"temperature": 0, "max_new_tokens": 1},
        {"temperature": 0, "max_new_tokens": 20, "ignore_eos": True, "min_new_tokens": 5, "stop_token_ids": [stop_id]},
        {"temperature": 1.0, "seed": 3, "max_new_tokens": 16, "ignore_eos": True, "frequency_penalty": 0.7},
        {"temperature": 0, "max_new_tokens": 0},
        {"temperature": 0, "max_new_tokens": 32, "ignore_eos": True},
        {"temperature": 0.5, "seed": 11, "max_new_tokens": 32, "ignore_eos": True},
    ]


def _run(path: str, overlap: bool, **kwargs) -> tuple[list[dict], Engine]:
    eng = Engine(model_path=path, page_size=4, chunked_prefill_size=16, disable_overlap_schedule=not overlap, **kwargs)
    base = eng.generate(
        input_ids=PROMPTS[0], sampling_params={"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
    )
    stop_id = base["output_ids"][6]
    outs = eng.generate(
        input_ids=PROMPTS,
        sampling_params=_params(stop_id),
        return_logprob=True,
        logprob_start_len=[-1, 0, -1, 2, -1, 1, -1, -1],
        top_logprobs_num=2,
    )
    return outs, eng


def _comparable(out: dict) -> tuple:
    meta = out["meta_info"]
    return (
        out["output_ids"],
        meta["finish_reason"],
        [t for _, t, _ in meta["output_token_logprobs"]],
        [round(lp, 4) for lp, _, _ in meta["output_token_logprobs"]],
        [round(lp, 4) if lp is not None else None for lp, _, _ in meta.get("input_token_logprobs", [])],
    )


@pytest.mark.parametrize("pool", [None, 160])
def test_overlap_answers_equal_serial(tiny_model_dir, pool):
    path = str(tiny_model_dir("llama"))
    extra = {} if pool is None else {"max_total_tokens": pool, "schedule_conservativeness": 0}
    serial, eng_s = _run(path, overlap=False, **extra)
    overlapped, eng_o = _run(path, overlap=True, **extra)
    assert [_comparable(o) for o in overlapped] == [_comparable(s) for s in serial]
    assert overlapped[0]["meta_info"]["finish_reason"]["type"] == "stop"  # a stop seen one step late
    if pool is not None:
        assert eng_o.core.scheduler.num_retractions > 0
    for eng in (eng_s, eng_o):
        assert_pool_idle(eng)
        eng.shutdown()


def test_launches_run_ahead_of_results(tiny_model_dir):
    """The order of device work and host reads: L1 L2 R1 L3 R2 ... with overlap, L1 R1 L2 R2 ... without."""
    path = str(tiny_model_dir("llama"))
    orders = {}
    for overlap in (True, False):
        eng = Engine(model_path=path, page_size=4, disable_overlap_schedule=not overlap)
        runner = eng.core.runner
        events: list[str] = []
        launch = runner.launch

        def recording_launch(plan, launch=launch, events=events):
            pending = launch(plan)
            n = sum(e.startswith("L") for e in events) + 1
            events.append(f"L{n}")
            result = pending.result
            pending.result = lambda: (events.append(f"R{n}"), result())[1]
            return pending

        runner.launch = recording_launch
        eng.generate(input_ids=[1, 2, 3], sampling_params={"temperature": 0, "max_new_tokens": 5, "ignore_eos": True})
        orders[overlap] = events
        assert_pool_idle(eng)
        eng.shutdown()
    assert orders[False] == [f"{k}{i}" for i in range(1, 6) for k in "LR"]
    # 5 tokens: prefill + 4 decodes, and one more decode launched before the 5th token was seen
    # (it is dropped: max_new_tokens is known to stop it, so the planner skips it) -> 5 launches.
    assert orders[True] == ["L1", "L2", "R1", "L3", "R2", "L4", "R3", "L5", "R4", "R5"]


def test_abort_and_stop_of_in_flight_requests_free_every_page(tiny_model_dir):
    path = str(tiny_model_dir("llama"))
    eng = Engine(model_path=path, page_size=4)
    core = eng.core
    greedy = SamplingParams.from_dict({"temperature": 0, "max_new_tokens": 40, "ignore_eos": True})
    reqs = [
        core.make_req(
            GenerateItem(
                rid=f"r{i}", text=None, input_ids=tuple(range(3 + i, 20 + i)), params=greedy, logprob=LogprobRequest()
            )
        )
        for i in range(4)
    ]
    for r in reqs:
        assert core.submit(r) is None
    sched = core.scheduler
    for _ in range(6):
        sched.step()
    assert sched.inflight is not None and reqs[1] in sched.inflight.members and reqs[1].pending_ids
    aborted = sched.abort("r1", "client went away")
    assert aborted is reqs[1] and aborted.finished and not aborted.pending_ids
    assert all(t >= 0 for t in aborted.output_ids)
    assert aborted in sched.inflight.deferred_release  # its pages wait for the in-flight batch
    while sched.has_work():
        sched.step()
    assert [len(r.output_ids) for r in reqs] == [40, len(aborted.output_ids), 40, 40]
    alone = eng.generate(
        input_ids=reqs[2].prompt_ids, sampling_params={"temperature": 0, "max_new_tokens": 40, "ignore_eos": True}
    )
    assert reqs[2].output_ids == alone["output_ids"]
    assert_pool_idle(eng)
    eng.shutdown()


def test_pool_is_idle_when_generate_returns_after_a_stop_token(tiny_model_dir):
    """The last request stops on a token the host sees one step late: the batch launched meanwhile
    still holds its pages, and generate() returns only after that batch is collected."""
    eng = Engine(model_path=str(tiny_model_dir("llama")), page_size=4)
    base = eng.generate(
        input_ids=[5, 6, 7], sampling_params={"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
    )
    stop_id = base["output_ids"][6]
    out = eng.generate(
        input_ids=[5, 6, 7],
        sampling_params={"temperature": 0, "max_new_tokens": 12, "ignore_eos": True, "stop_token_ids": [stop_id]},
    )
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_id}
    assert eng.core.scheduler.inflight is None
    assert_pool_idle(eng)
    eng.shutdown()
