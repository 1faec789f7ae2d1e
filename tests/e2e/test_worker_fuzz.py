"""Fuzz the request bodies of one live colocated worker (issue 19): native /generate, /v1/completions and
/v1/chat/completions bodies mixing valid and invalid field names, types, huge and negative integers,
NaN/Infinity and nested junk. Every answer is 2xx or a 4xx JSON error envelope; afterwards the worker is
healthy, holds no request, and its log has no traceback. Last, its scheduler is killed: the worker exits
non-zero within seconds.

Each example is a valid body with 0-2 mutations (a known or unknown field, top level or nested, set to a
nasty value), so most bodies are wrong in one place only and reach the deepest check they can. Valid
bodies stay quick: token limits are small (0..4) unless a mutation hits them.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_process import ServerProcess
from test_pd_cluster import wait_idle

FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
EDGE_INTS = [2**64, 10**30, -(2**64), -(2**63) - 1, 2**63, 2**63 - 1, -(2**63), 2**31, -2, -1, 0]
ENVELOPE = {"message", "type", "param", "code"}

# --- strategies: a valid body, then 0-2 mutations (a known or unknown field set to a nasty value) -------
ints = st.one_of(st.integers(-3, 700), st.sampled_from(EDGE_INTS), st.integers(-(2**80), 2**80))
floats = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, 0.5, 1.0, 2.0, -0.1, 1e308])
scalars = st.none() | st.booleans() | ints | floats | st.text(max_size=12)
junk = st.recursive(
    scalars,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4),
    max_leaves=12,
)
edge_ints = st.sampled_from(EDGE_INTS)
nasty = st.one_of(edge_ints, st.lists(edge_ints, min_size=1, max_size=2), ints, floats, junk)
nasty = st.one_of(edge_ints, nasty)  # edge integers half the time

small_limit = st.integers(0, 4)
token_ids = st.lists(st.integers(0, 639), min_size=1, max_size=6)
prompt_text = st.text(min_size=1, max_size=30)
unit = st.floats(0.01, 1)
VALID_SAMPLING = dict(
    temperature=st.floats(0, 2),
    top_p=unit,
    top_k=st.integers(-1, 50),
    min_p=st.floats(0, 1),
    repetition_penalty=st.floats(0.5, 2),
    frequency_penalty=st.floats(-2, 2),
    presence_penalty=st.floats(-2, 2),
    stop=st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=3),
    stop_token_ids=token_ids,
    ignore_eos=st.booleans(),
    n=st.integers(1, 3),
    seed=st.integers(0, 2**63 - 1),
    logit_bias=st.dictionaries(st.integers(0, 639).map(str), st.floats(-100, 100), max_size=3),
    skip_special_tokens=st.booleans(),
)
NATIVE_TOP = dict(
    return_logprob=st.booleans(),
    logprob_start_len=st.integers(-1, 8),
    top_logprobs_num=st.integers(0, 5),
    rid=st.uuids().map(str),
    stream=st.booleans(),
)
OPENAI_TOP = dict(
    model=st.just("tiny"),
    stream=st.booleans(),
    user=st.text(max_size=5),
    **{k: v for k, v in VALID_SAMPLING.items() if k != "n"},
    n=st.integers(1, 2),
)
COMPLETION_TOP = dict(echo=st.booleans(), logprobs=st.integers(0, 5), **OPENAI_TOP)
CHAT_TOP = dict(logprobs=st.booleans(), top_logprobs=st.integers(0, 5), **OPENAI_TOP)
# fields a mutation may hit besides the valid ones (limits, vendor extras, unsupported, routing)
TOP_EXTRAS = [
    "max_tokens",
    "max_completion_tokens",
    "n",
    "best_of",
    "stream_options",
    "suffix",
    "tools",
    "response_format",
    "chat_template_kwargs",
    "bootstrap_room",
    "input_ids",
    "text",
    "prompt",
    "messages",
    "sampling_params",
    "logit_bias",
    "stop_token_ids",
]
SAMPLING_EXTRAS = ["max_new_tokens", "min_new_tokens", "json_schema", "sampling_seed", "n"]
# integer fields: where values beyond a bound or beyond 64 bits used to get through, so mutations favour them
INT_FIELDS = [
    "top_k",
    "n",
    "max_new_tokens",
    "min_new_tokens",
    "seed",
    "stop_token_ids",
    "logprob_start_len",
    "top_logprobs_num",
    "max_tokens",
    "max_completion_tokens",
    "logprobs",
    "top_logprobs",
    "best_of",
    "min_tokens",
    "logit_bias",
]


@st.composite
def mutated(draw: st.DrawFn, body: dict[str, Any], top: list[str], nested: str | None = None) -> dict[str, Any]:
    """``body`` with 0-2 fields set to nasty values: a field it may hold (at the top level, or inside the
    sampling_params object ``body[nested]``) or an unknown one."""
    for _ in range(draw(st.integers(0, 2))):
        target, names = body, top + TOP_EXTRAS
        if nested is not None and draw(st.booleans()):
            target, names = body[nested], list(VALID_SAMPLING) + SAMPLING_EXTRAS
        ints_here = [n for n in INT_FIELDS if n in names]
        target[draw(st.sampled_from(ints_here) | st.sampled_from(names) | st.text(max_size=8))] = draw(nasty)
    return body


@st.composite
def native_bodies(draw: st.DrawFn) -> dict[str, Any]:
    body = draw(st.fixed_dictionaries({}, optional=NATIVE_TOP))
    key = draw(st.sampled_from(["text", "prompt", "input_ids"]))
    body[key] = draw(
        token_ids | st.lists(token_ids, min_size=1, max_size=3)
        if key == "input_ids"
        else prompt_text | st.lists(prompt_text, min_size=1, max_size=3)
    )
    body["sampling_params"] = {
        **draw(st.fixed_dictionaries({}, optional=VALID_SAMPLING)),
        "max_new_tokens": draw(small_limit),
    }
    return draw(mutated(body, list(NATIVE_TOP), "sampling_params"))


@st.composite
def completion_bodies(draw: st.DrawFn) -> dict[str, Any]:
    body = draw(st.fixed_dictionaries({"max_tokens": small_limit}, optional=COMPLETION_TOP))
    body["prompt"] = draw(
        st.one_of(
            prompt_text,
            st.lists(prompt_text, min_size=1, max_size=3),
            token_ids,
            st.lists(token_ids, min_size=1, max_size=3),
        )
    )
    return draw(mutated(body, list(COMPLETION_TOP)))


message = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "system", "assistant"]),
        "content": prompt_text
        | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": prompt_text}), min_size=1, max_size=2),
    }
)


@st.composite
def chat_bodies(draw: st.DrawFn) -> dict[str, Any]:
    limit_key = draw(st.sampled_from(["max_tokens", "max_completion_tokens"]))
    body = draw(st.fixed_dictionaries({limit_key: small_limit}, optional=CHAT_TOP))
    body["messages"] = draw(st.lists(message, min_size=1, max_size=3))
    return draw(mutated(body, list(CHAT_TOP)))


# --- the worker --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def worker(tiny_llama):
    srv = ServerProcess(tiny_llama, "--page-size", "4", "--served-model-name", "tiny")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def session():
    with requests.Session() as s:
        yield s


def post(session: requests.Session, url: str, body: dict[str, Any]) -> None:
    """Send ``body`` (NaN/Infinity written as JSON extensions, integers as they are) and check the answer."""
    r = session.post(url, data=json.dumps(body), headers={"Content-Type": "application/json"}, timeout=60)
    if 200 <= r.status_code < 300:
        return
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:500], json.dumps(body)[:500])
    err = r.json()["error"]
    assert set(err) == ENVELOPE and err["code"] == r.status_code and isinstance(err["message"], str), err


@FUZZ
@given(body=native_bodies())
def test_fuzz_generate(worker, session, body):
    post(session, worker.url + "/generate", body)


@FUZZ
@given(body=completion_bodies())
def test_fuzz_completions(worker, session, body):
    post(session, worker.url + "/v1/completions", body)


@FUZZ
@given(body=chat_bodies())
def test_fuzz_chat(worker, session, body):
    post(session, worker.url + "/v1/chat/completions", body)


def test_worker_healthy_and_clean_after_fuzzing(worker):
    assert requests.get(worker.url + "/health_generate", timeout=30).status_code == 200
    wait_idle([worker.url])
    assert requests.get(worker.url + "/get_server_info", timeout=5).json()["num_in_flight_reqs"] == 0
    log = Path(worker.log.name).read_text(errors="replace")
    assert "Traceback" not in log and "internal server error" not in log.lower(), log[-3000:]


def test_killed_scheduler_makes_the_worker_exit_nonzero(worker):
    """Last in the module: the fuzzed worker goes down with its scheduler."""
    pid = requests.get(worker.url + "/get_server_info", timeout=5).json()["process_ids"]["scheduler"]
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    while worker.proc.poll() is None:
        assert time.monotonic() - t0 < 10, "the worker outlived its scheduler by 10 s"
        time.sleep(0.05)
    assert worker.proc.returncode != 0
    log = Path(worker.log.name).read_text(errors="replace")
    assert log.count("child process died: scheduler") == 1 and "Traceback" not in log, log[-3000:]
