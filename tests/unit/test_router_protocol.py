"""Request validation, job encoding (rids, PD fields), SSE splitting, logprob merging, PD fan-out."""

from __future__ import annotations

import json
import random

import pytest

from router import sse
from router.config import BreakerConfig, WorkerSpec
from router.errors import APIError
from router.fanout import Merger, needs_split, split_generate, split_openai
from router.jobs import ROOM_BOUND, Job, worker_rids
from router.logprob_merge import PromptLogprobPatcher, merge_generate
from router.validation import parse_chat, parse_completions, parse_generate
from router.worker import Worker


@pytest.mark.parametrize(
    "body, param",
    [
        ({}, None),
        ({"text": "a", "input_ids": [1]}, None),
        ({"text": ""}, "text"),
        ({"text": 5}, "text"),
        ({"input_ids": []}, "input_ids"),
        ({"input_ids": [1, -2]}, "input_ids"),
        ({"text": "a", "sampling_params": {"temperature": -1}}, "temperature"),
        ({"text": "a", "sampling_params": {"top_p": 0}}, "top_p"),
        ({"text": "a", "sampling_params": {"max_new_tokens": "5"}}, "max_new_tokens"),
        ({"text": "a", "sampling_params": {"n": 0}}, "n"),
        ({"text": "a", "sampling_params": {"stop": [1]}}, "stop"),
        ({"text": "a", "sampling_params": []}, "sampling_params"),
        ({"text": ["a", "b"], "sampling_params": [{}]}, "sampling_params"),
        ({"text": "a", "stream": "yes"}, "stream"),
        ({"text": "a", "top_logprobs_num": -1}, "top_logprobs_num"),
        ({"text": "a", "return_logprob": 1}, "return_logprob"),
        ({"text": "a", "rid": ""}, "rid"),
    ],
)
def test_generate_rejects(body, param):
    with pytest.raises(APIError) as e:
        parse_generate(body)
    assert e.value.status == 400 and e.value.param == param


def test_generate_summary():
    p = parse_generate(
        {"text": ["ab", "cd"], "sampling_params": [{"n": 2}, {}], "return_logprob": [True, False], "stream": True}
    )
    assert (p.is_batch, p.n, p.choices, p.stream, p.input_logprobs, p.routing_key) == (
        True,
        (2, 1),
        3,
        True,
        (True, False),
        "ab",
    )
    single = parse_generate({"input_ids": [1, 2, 3]})
    assert not single.is_batch and single.routing_key == "\x01\x02\x03" and not needs_split(single)


@pytest.mark.parametrize(
    "route, body, param",
    [
        ("completions", {}, "prompt"),
        ("completions", {"prompt": []}, "prompt"),
        ("completions", {"prompt": [["a"]]}, "prompt"),
        ("completions", {"prompt": "a", "n": 0}, "n"),
        ("completions", {"prompt": "a", "n": 129}, "n"),
        ("completions", {"prompt": "a", "max_tokens": 0}, "max_tokens"),
        ("completions", {"prompt": "a", "temperature": 3}, "temperature"),
        ("completions", {"prompt": "a", "logprobs": 6}, "logprobs"),
        ("completions", {"prompt": "a", "stream_options": {"include_usage": True}}, "stream_options"),
        ("completions", {"prompt": "a", "best_of": 3}, "best_of"),
        ("chat", {"messages": []}, "messages"),
        ("chat", {"messages": ["hi"]}, "messages"),
        ("chat", {"messages": [{"content": "hi"}]}, "messages"),
        ("chat", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3}, "top_logprobs"),
        ("chat", {"messages": [{"role": "user", "content": "hi"}], "presence_penalty": 2.5}, "presence_penalty"),
        ("chat", {"messages": [{"role": "user", "content": "hi"}], "model": 3}, "model"),
    ],
)
def test_openai_rejects(route, body, param):
    with pytest.raises(APIError) as e:
        (parse_chat if route == "chat" else parse_completions)(body)
    assert e.value.status == 400 and e.value.param == param


def test_openai_summary():
    p = parse_completions({"prompt": ["a", [1, 2]], "n": 2, "echo": True, "logprobs": 1})
    assert p.n == (2, 2) and p.choices == 4 and p.input_logprobs == (True, True) and needs_split(p)
    c = parse_chat(
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi"}]},
            ],
            "unknown_vendor_key": 1,
        }
    )
    assert c.routing_key == "be brief\nhi" and c.choices == 1


def _worker(url: str, role: str, port: int | None = None) -> Worker:
    return Worker(WorkerSpec(url, role, port), BreakerConfig(5, 1, 1.0, 1.0, True))  # type: ignore[arg-type]


def test_worker_rids_follow_the_workers_naming():
    assert worker_rids("r", (1,), False) == ("r",)
    assert worker_rids("r", (2,), False) == ("r-0", "r-1")
    assert worker_rids(("a", "b"), (1, 2), False) == ("a", "b-0", "b-1")
    assert worker_rids("r", (1,), True) == ("r",)
    assert worker_rids("r", (2, 2), True) == ("r-0", "r-1", "r-2", "r-3")


def test_encode_adds_pd_fields_and_fresh_rooms_and_never_streams_prefill():
    job = Job(
        "/generate", {"text": "a", "stream": True, "stream_options": {"x": 1}}, "rid1", (1,), True, "a", None, "req"
    )
    p = _worker("http://10.0.0.5:30000", "prefill", 9001)
    rng = random.Random(0)
    first, retry = job.encode(0, p, rng), job.encode(1, p, rng)
    d_body, p_body = json.loads(first.data), json.loads(first.prefill_data)
    assert (d_body["bootstrap_host"], d_body["bootstrap_port"], d_body["rid"]) == ("10.0.0.5", 9001, "rid1")
    assert 0 <= d_body["bootstrap_room"] < ROOM_BOUND and p_body["bootstrap_room"] == d_body["bootstrap_room"]
    assert p_body["stream"] is False and "stream_options" not in p_body and d_body["stream"] is True
    assert json.loads(retry.data)["bootstrap_room"] != d_body["bootstrap_room"]
    assert retry.rids == ("rid1-retry1",)
    regular = job.encode(0, None, rng)
    assert regular.prefill_data is None and "bootstrap_room" not in json.loads(regular.data)


def test_split_generate_one_choice_per_job():
    body = {
        "text": ["ab", "cd"],
        "sampling_params": [{"n": 2, "seed": 7}, {"temperature": 0}],
        "rid": ["x", "y"],
        "return_logprob": [True, False],
        "stream": True,
    }
    parsed = parse_generate(body)
    jobs = split_generate("/generate", body, parsed, "req", lambda: "fresh")
    assert [j.rid for j in jobs] == ["x-0", "x-1", "y"]
    assert [j.body["sampling_params"] for j in jobs] == [{"seed": 7}, {"seed": 8}, {"temperature": 0}]
    assert [j.body["text"] for j in jobs] == ["ab", "ab", "cd"]
    assert [j.merge for j in jobs] == ["generate", "generate", None]
    assert all(j.choices == (1,) and j.stream and "rid" not in j.body for j in jobs)


def test_split_openai_and_merge_like_a_colocated_worker():
    body = {"prompt": ["hello", "yo"], "n": 2, "seed": 3, "rid": "base"}
    parsed = parse_completions(body)
    jobs, base = split_openai("/v1/completions", body, parsed, "req", lambda: "fresh")
    assert base == "base" and [j.rid for j in jobs] == ["base-0", "base-1", "base-2", "base-3"]
    assert [(j.body["prompt"], j.body["seed"], "n" in j.body) for j in jobs] == [
        ("hello", 3, False),
        ("hello", 4, False),
        ("yo", 3, False),
        ("yo", 4, False),
    ]
    merger = Merger(parsed, base, parsed.n)
    answers = [
        json.dumps(
            {
                "id": f"cmpl-base-{k}",
                "object": "text_completion",
                "choices": [{"index": 0, "text": str(k)}],
                "usage": {
                    "prompt_tokens": 5 if k < 2 else 2,
                    "completion_tokens": 3,
                    "prompt_tokens_details": {"cached_tokens": k},
                },
            }
        ).encode()
        for k in range(4)
    ]
    out = json.loads(merger.unary(answers))
    assert out["id"] == "cmpl-base" and [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in out["choices"]] == ["0", "1", "2", "3"]
    assert out["usage"] == {
        "prompt_tokens": 7,
        "completion_tokens": 12,
        "total_tokens": 19,
        "prompt_tokens_details": {"cached_tokens": 1 + 3},
    }


def test_merger_streams_reindex_and_hold_usage_back():
    parsed = parse_chat(
        {
            "messages": [{"role": "user", "content": "hi"}],
            "n": 2,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    m = Merger(parsed, "r", parsed.n)
    chunk = {
        "id": "chatcmpl-r-1",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": "x"}}],
    }
    assert m.event(1, chunk)["choices"][0]["index"] == 1 and chunk["id"] == "chatcmpl-r"
    for k in (0, 1):
        assert (
            m.event(
                k,
                {
                    "id": "z",
                    "object": "chat.completion.chunk",
                    "created": 1,
                    "model": "m",
                    "choices": [],
                    "usage": {"prompt_tokens": 4, "completion_tokens": 2},
                },
            )
            is None
        )
    tail = sse.payloads(m.closing())[0]
    assert tail["usage"]["prompt_tokens"] == 4 and tail["usage"]["completion_tokens"] == 4 and tail["choices"] == []
    gen = Merger(parse_generate({"text": ["a", "b"], "stream": True}), None, (1, 1))
    assert gen.event(1, {"text": "t"}) == {"text": "t", "index": 1}
    assert gen.closing() == b""


def test_event_splitter_forwards_whole_events_only():
    s = sse.EventSplitter()
    assert s.feed(b'data: {"a": 1}\n\ndata: {"b"') == b'data: {"a": 1}\n\n'
    assert s.feed(b": 2}\n") == b""
    assert s.feed(b"\ndata: [DONE]\n\n") == b'data: {"b": 2}\n\ndata: [DONE]\n\n'
    assert s.rest() == b""
    s.feed(b"data: {}")
    assert s.rest() == b"data: {}\n\n"
    assert sse.payloads(b'data: {"a": 1}\n\ndata: [DONE]\n\n') == [{"a": 1}]
    assert sse.error_of({"error": {"code": 503, "message": "m"}}) == (503, "m")
    assert sse.map_events(b'data: {"a": 1}\n\ndata: [DONE]\n\n', lambda p: {**p, "b": 2}) == (
        b'data: {"a": 1, "b": 2}\n\ndata: [DONE]\n\n'
    )


def test_prompt_logprobs_come_from_prefill():
    d = {"meta_info": {"input_token_logprobs": [], "output_token_logprobs": [[-0.1, 5, None]]}}
    p = {"meta_info": {"input_token_logprobs": [[None, 1, None], [-0.5, 2, None]], "input_top_logprobs": [None, []]}}
    merge_generate(d, p)
    assert d["meta_info"]["input_token_logprobs"] == p["meta_info"]["input_token_logprobs"]
    assert d["meta_info"]["input_top_logprobs"] == [None, []]
    prefill = {
        "usage": {"prompt_tokens": 3},
        "choices": [
            {
                "logprobs": {
                    "token_logprobs": [None, -0.5, -0.6, -0.1],
                    "top_logprobs": [None, {"a": -0.5}, {"b": -0.6}, {"c": -0.1}],
                }
            }
        ],
    }
    patcher = PromptLogprobPatcher(prefill)
    first = {"choices": [{"logprobs": {"token_logprobs": [None, None], "top_logprobs": [None, None]}}]}
    second = {"choices": [{"logprobs": {"token_logprobs": [None, -0.2], "top_logprobs": [None, {"w": -0.2}]}}]}
    patcher.patch(first)
    patcher.patch(second)
    assert first["choices"][0]["logprobs"]["token_logprobs"] == [None, -0.5]
    assert second["choices"][0]["logprobs"]["token_logprobs"] == [-0.6, -0.2]  # D's own token is untouched
    assert second["choices"][0]["logprobs"]["top_logprobs"] == [{"b": -0.6}, {"w": -0.2}]
