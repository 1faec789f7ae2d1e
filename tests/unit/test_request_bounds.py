"""Edge bounds of a request (issue 19): every bound rejects with a ValueError / 400 naming the field and
accepts its boundary value; a PD worker's local request (the health probe) runs with no peer; the
scheduler answers every request it holds, PD queues included, when it aborts all."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from pd_common.json_body import (
    INT_MAX,
    INT_MIN,
    MAX_DEPTH,
    JSONBodyError,
    loads_bounded,
)
from sglang_pd.generate_request import MAX_REQUESTS_PER_CALL, normalize_generate
from sglang_pd.sampling.params import (
    INT32_MAX,
    MAX_N,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    MAX_TOKEN_ID_ENTRIES,
    SamplingParams,
)
from sglang_pd.server.errors import APIError
from sglang_pd.server.messages import BatchTokenOut, TokenizedGenerateReq
from sglang_pd.server.openai_completions import parse_completion
from sglang_pd.server.openai_protocol import parse_common
from sglang_pd.server.tokenizer_manager import encode_request

# --- SamplingParams ---------------------------------------------------------------------------------
BOUNDS: list[tuple[str, Any, Any]] = [  # (field, largest accepted value, smallest rejected value)
    ("max_new_tokens", INT32_MAX, INT32_MAX + 1),
    ("top_k", INT32_MAX, INT32_MAX + 1),
    ("n", MAX_N, MAX_N + 1),
    ("stop", ["s"] * MAX_STOP_STRINGS, [f"s{i}" for i in range(MAX_STOP_STRINGS + 1)]),
    ("stop", ["x" * MAX_STOP_STRING_CHARS], ["x" * (MAX_STOP_STRING_CHARS + 1)]),
    ("stop_token_ids", [INT32_MAX], [INT32_MAX + 1]),
    ("stop_token_ids", [1] * MAX_TOKEN_ID_ENTRIES, [1] * (MAX_TOKEN_ID_ENTRIES + 1)),
    ("stop_token_ids", [0], [2**64]),
    ("logit_bias", {str(INT32_MAX): 1.0}, {str(INT32_MAX + 1): 1.0}),
    (
        "logit_bias",
        {str(i): 1.0 for i in range(MAX_TOKEN_ID_ENTRIES)},
        {str(i): 1.0 for i in range(MAX_TOKEN_ID_ENTRIES + 1)},
    ),
    ("logit_bias", {"7": 1.0}, {"1" * 5000: 1.0}),
]


@pytest.mark.parametrize("name,ok,bad", BOUNDS, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(BOUNDS)])
def test_sampling_bound(name: str, ok: Any, bad: Any) -> None:
    SamplingParams.from_dict({name: ok})
    with pytest.raises(ValueError, match=name) as e:
        SamplingParams.from_dict({name: bad})
    assert len(str(e.value)) < 300  # a client's megabyte is not echoed back


def test_lower_bounds_unchanged() -> None:
    assert SamplingParams.from_dict({"max_new_tokens": 0, "top_k": -1, "n": 1}).top_k == -1
    for d, name in (({"n": 0}, "n"), ({"top_k": -2}, "top_k"), ({"max_new_tokens": -1}, "max_new_tokens")):
        with pytest.raises(ValueError, match=name):
            SamplingParams.from_dict(d)


def test_check_vocab_covers_stop_token_ids() -> None:
    SamplingParams.from_dict({"stop_token_ids": [9]}).check_vocab(10)
    with pytest.raises(ValueError, match="stop_token_ids"):
        SamplingParams.from_dict({"stop_token_ids": [10]}).check_vocab(10)


# --- /generate normalisation ------------------------------------------------------------------------
def _gen(**kw: Any) -> list:
    """normalize_generate as the HTTP server calls it."""
    return normalize_generate(
        None, kw.pop("input_ids", [1, 2]), kw.pop("sampling_params", None), max_requests=MAX_REQUESTS_PER_CALL, **kw
    )[0]


@pytest.mark.parametrize(
    "name,ok,bad",
    [
        ("logprob_start_len", -1, -2),
        ("logprob_start_len", INT32_MAX, INT32_MAX + 1),
        ("top_logprobs_num", 0, -1),
        ("top_logprobs_num", INT32_MAX, INT32_MAX + 1),
    ],
)
def test_logprob_bounds(name: str, ok: int, bad: int) -> None:
    _gen(**{name: ok})
    with pytest.raises(ValueError, match=name):
        _gen(**{name: bad})


def test_generate_n_and_batch_bounds() -> None:
    assert len(_gen(sampling_params={"n": MAX_N})) == MAX_N
    with pytest.raises(ValueError, match="n must be"):
        _gen(sampling_params={"n": 1000})
    prompts = MAX_REQUESTS_PER_CALL // MAX_N
    assert len(_gen(input_ids=[[1]] * prompts, sampling_params={"n": MAX_N})) == MAX_REQUESTS_PER_CALL
    with pytest.raises(ValueError, match="at most"):
        _gen(input_ids=[[1]] * (prompts + 1), sampling_params={"n": MAX_N})
    with pytest.raises(ValueError, match="batch of prompts"):
        _gen(input_ids=[[1]] * (MAX_REQUESTS_PER_CALL + 1))
    offline = normalize_generate(None, [[1]] * (MAX_REQUESTS_PER_CALL + 1), None)[0]  # the Engine: no bound
    assert len(offline) == MAX_REQUESTS_PER_CALL + 1


# --- OpenAI routes share the bounds -------------------------------------------------------------------
def test_openai_n_uses_the_shared_bound() -> None:
    assert parse_common({"n": MAX_N}, "m", ("max_tokens",), 16).n == MAX_N
    with pytest.raises(APIError) as e:
        parse_common({"n": MAX_N + 1}, "m", ("max_tokens",), 16)
    assert e.value.status == 400 and e.value.param == "n"


@pytest.mark.parametrize(
    "body,param",
    [
        ({"max_tokens": INT32_MAX + 1}, "max_tokens"),
        ({"top_k": 2**63 - 1}, "top_k"),
        ({"stop_token_ids": [INT32_MAX + 1]}, "stop_token_ids"),
    ],
)
def test_openai_sampling_bounds(body: dict, param: str) -> None:
    with pytest.raises(APIError) as e:
        parse_common(body, "m", ("max_tokens",), 16)
    assert e.value.status == 400 and e.value.param == param and param in e.value.message


def test_completion_prompts_times_n_bounded() -> None:
    with pytest.raises(APIError) as e:
        parse_completion({"prompt": ["a"] * (MAX_REQUESTS_PER_CALL // MAX_N + 1), "n": MAX_N}, "m")
    assert e.value.status == 400 and e.value.param == "prompt"


# --- JSON bodies --------------------------------------------------------------------------------------
def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize(
    "ok,bad,needle",
    [
        (str(INT_MAX), str(INT_MAX + 1), "out of range"),
        (str(INT_MIN), str(INT_MIN - 1), "out of range"),
        ("1", "9" * 5000, "out of range"),
        (_nested(MAX_DEPTH), _nested(MAX_DEPTH + 1), "deeper"),
        ("[1]", _nested(100_000), "deeper"),
        ("1e308", "1e999", "out of range"),
        ("0.5", "NaN", "not valid JSON"),
        ("0.5", "-Infinity", "not valid JSON"),
    ],
)
def test_json_body_bounds(ok: str, bad: str, needle: str) -> None:
    loads_bounded(ok)
    with pytest.raises(JSONBodyError, match=needle):
        loads_bounded(bad)


# --- IPC encoding ---------------------------------------------------------------------------------
def test_unencodable_request_is_a_400() -> None:
    req = TokenizedGenerateReq("r", [1], {"stop_token_ids": [2**64]}, 0)
    with pytest.raises(APIError) as e:
        encode_request(req)
    assert e.value.status == 400 and "cannot carry" in e.value.message
    assert encode_request(TokenizedGenerateReq("r", [1], {"stop_token_ids": [2**63 - 1]}, 0))


# --- PD hooks: local requests and abort-all ----------------------------------------------------------
BOOT_PORT = 18997


class Sink:
    """A socket stand-in that keeps what the scheduler sends."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, data: bytes, *args: Any) -> None:
        self.sent.append(data)

    def token_outs(self) -> list:
        outs = []
        for data in self.sent:
            name, fields = msgpack.unpackb(data, raw=False, strict_map_key=False)
            if name == "BatchTokenOut":
                outs += BatchTokenOut.from_wire(fields).outs
        return outs


@pytest.fixture(scope="module")
def pd_loops(tiny_model_dir):
    from sglang_pd.engine_core import EngineCore
    from sglang_pd.server.scheduler_process import SchedulerLoop
    from sglang_pd.server_args import ServerArgs
    from transfer.fake_engine import FakeTransferHub

    hub = FakeTransferHub()
    loops = {}
    for mode in ("prefill", "decode"):
        args = ServerArgs(
            model_path=str(tiny_model_dir("llama")),
            disaggregation_mode=mode,
            page_size=4,
            disaggregation_transfer_backend="fake",
            disaggregation_bootstrap_port=BOOT_PORT,
            host="127.0.0.1",
        )
        loops[mode] = SchedulerLoop(EngineCore(args, transfer_hub=hub), None, Sink(), Sink())  # type: ignore[arg-type]
    yield loops
    for loop in loops.values():
        loop.core.shutdown()


def _run_until_answered(loop, rid: str, steps: int = 200) -> Any:
    for _ in range(steps):
        done = [o for o in loop.to_detok.token_outs() if o.rid == rid and o.finish_reason is not None]
        if done:
            return done[-1]
        if loop.core.scheduler.has_work():
            loop.step()
    raise AssertionError(f"{rid} got no answer")


def _idle(loop) -> bool:
    sched = loop.core.scheduler
    kv = sched.kv
    return not sched.has_work() and kv.pool.num_free + kv.cache.num_evictable_pages == kv.pool.num_total


@pytest.mark.parametrize("mode", ["prefill", "decode"])
def test_local_request_runs_without_a_peer(pd_loops, mode: str) -> None:
    loop = pd_loops[mode]
    loop.handle_isolated(TokenizedGenerateReq(f"health-{mode}", [0], {"max_new_tokens": 1, "temperature": 0}, 0))
    out = _run_until_answered(loop, f"health-{mode}")
    assert out.finish_reason["type"] == "length" and out.completion_tokens == 1
    assert _idle(loop)


@pytest.mark.parametrize("mode", ["prefill", "decode"])
def test_abort_all_answers_requests_parked_in_pd_queues(pd_loops, mode: str) -> None:
    loop = pd_loops[mode]
    rid = f"parked-{mode}"
    loop.handle_isolated(
        TokenizedGenerateReq(
            rid,
            [5, 6, 7],
            {"max_new_tokens": 4},
            0,
            bootstrap_host="127.0.0.1",
            bootstrap_port=BOOT_PORT,
            bootstrap_room=1234 if mode == "prefill" else 5678,
        )
    )
    loop.step()  # P: waits for D in the bootstrap queue; D: admitted, registered, waits for P's KV
    assert loop.core.scheduler.hooks.held_rids() == [rid]
    loop._abort_all("internal error in the scheduler step")
    answers = [o for o in loop.to_detok.token_outs() if o.rid == rid]
    assert len(answers) == 1 and answers[0].finish_reason["type"] == "abort"
    assert loop.core.scheduler.hooks.held_rids() == []
    for _ in range(50):  # D keeps a draining request's pages until its room is terminal, then frees them
        if _idle(loop):
            break
        loop.step()
    assert _idle(loop)


def test_bad_message_fails_only_its_request(pd_loops) -> None:
    loop = pd_loops["prefill"]
    loop.handle_isolated(TokenizedGenerateReq("bad", [1], {"top_p": 7}, 0))  # main never sends this: a bug
    answers = [o for o in loop.to_detok.token_outs() if o.rid == "bad"]
    assert len(answers) == 1 and answers[0].finish_reason["type"] == "abort"
    loop.handle_isolated(TokenizedGenerateReq("after", [0], {"max_new_tokens": 1}, 0))
    assert _run_until_answered(loop, "after").finish_reason["type"] == "length"
