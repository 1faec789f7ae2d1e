"""OpenAI layer without a server: parsing/validation, parameter mapping, response and chunk builders."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest

from sglang_pd.server.errors import APIError
from sglang_pd.server.openai_api import merge_chunks
from sglang_pd.server.openai_chat import (
    ChatStream,
    chat_response,
    logprob_content,
    parse_chat,
)
from sglang_pd.server.openai_completions import (
    CompletionStream,
    completion_response,
    logprob_block,
    parse_completion,
    parse_prompts,
)
from sglang_pd.server.openai_protocol import (
    MIN_LOGPROB,
    ResponseMeta,
    TokenTexts,
    clamp_logprob,
    usage,
)
from sglang_pd.server.req_state import GenerateChunk, ReqState

MODEL = "tiny"
CTX = 2048


class FakeTokenizer:
    """Token id k decodes to the k-th letter; ids >= 26 to '<k>'."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(ord("a") + i) if i < 26 else f"<{i}>" for i in ids)


def texts() -> TokenTexts:
    return TokenTexts(FakeTokenizer())


def api_error(fn: Any, *args: Any, **kwargs: Any) -> APIError:
    with pytest.raises(APIError) as info:
        fn(*args, **kwargs)
    return info.value


def completion(**body: Any) -> Any:
    return parse_completion({"model": MODEL, "prompt": "hi", **body}, MODEL)


def chat(**body: Any) -> Any:
    return parse_chat({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **body}, MODEL, CTX)


def state(
    rid: str, out: list[int], finish: dict | None, prompt: int = 3, cached: int = 0, lps: bool = False
) -> ReqState:
    s = ReqState(rid, prompt, lps, 2 if lps else 0)
    s.output_ids, s.finish_reason, s.cached_tokens = list(out), finish, cached
    s.text = FakeTokenizer().decode(out)
    if lps:
        s.output_token_logprobs = [[-0.5, t, None] for t in out]
        s.output_top_logprobs = [[[-0.5, t, None], [-2.0, 25, None]] for t in out]
    return s


# --- completions parsing ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("hello", ("hello",)),
        (["a", "b"], ("a", "b")),
        ([1, 2, 3], ((1, 2, 3),)),
        ([[1, 2], [3]], ((1, 2), (3,))),
    ],
)
def test_prompt_shapes(prompt: Any, expected: tuple) -> None:
    assert parse_prompts(prompt) == expected


@pytest.mark.parametrize("prompt", [None, "", [], [""], [[]], [1, "a"], [[1], "a", 3], [True], [-1], {"a": 1}, 5])
def test_bad_prompts(prompt: Any) -> None:
    assert api_error(parse_prompts, prompt).param == "prompt"


def test_completion_defaults_and_mapping() -> None:
    req = completion()
    assert req.opts.params.max_new_tokens == 16 and req.opts.n == 1 and not req.opts.stream
    req = completion(
        max_tokens=5,
        min_tokens=2,
        temperature=0,
        top_p=0.5,
        top_k=3,
        min_p=0.1,
        seed=7,
        repetition_penalty=1.1,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        stop="x",
        stop_token_ids=[4],
        ignore_eos=True,
        skip_special_tokens=False,
        no_stop_trim=True,
        logit_bias={"5": 1.0},
        user="u",
        n=2,
        best_of=2,
    )
    p = req.opts.params
    assert (p.max_new_tokens, p.min_new_tokens, p.temperature, p.top_p, p.top_k, p.min_p, p.seed) == (
        5,
        2,
        0.0,
        0.5,
        3,
        0.1,
        7,
    )
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty, p.stop, p.stop_token_ids) == (
        1.1,
        0.5,
        -0.5,
        ("x",),
        (4,),
    )
    assert p.ignore_eos and not p.skip_special_tokens and p.no_stop_trim and p.logit_bias == {5: 1.0}
    assert completion(model=None).opts.n == 1  # model may be left out


def test_completion_items_index_and_rids() -> None:
    req = completion(prompt=["a", "b"], n=2, rid="r", seed=3, logprobs=2)
    items = req.items([(1,), (2, 3)])
    assert [it.rid for it in items] == ["r-0", "r-1", "r-2", "r-3"]
    assert [it.input_ids for it in items] == [(1,), (1,), (2, 3), (2, 3)]
    assert [it.choice for it in items] == [0, 1, 0, 1]  # offsets the seed within one prompt
    assert items[0].logprob.return_logprob and items[0].logprob.top_logprobs_num == 2
    assert items[0].logprob.start_len == -1
    echo = completion(echo=True, logprobs=0).items([(1, 2)])
    assert echo[0].logprob.return_logprob and echo[0].logprob.start_len == 0  # prompt logprobs too
    assert completion(rid="solo").items([(1,)])[0].rid == "solo"


@pytest.mark.parametrize(
    "body, param",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": "3"}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": "x"}, "temperature"),
        ({"temperature": 10**400}, "temperature"),
        ({"top_p": float("nan")}, "top_p"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 0}, "n"),
        ({"n": True}, "n"),
        ({"logprobs": 6}, "logprobs"),
        ({"logprobs": -1}, "logprobs"),
        ({"stop": 3}, "stop"),
        ({"stop": [1]}, "stop"),
        ({"stream": "yes"}, "stream"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"stream": True, "stream_options": 3}, "stream_options"),
        ({"echo": 1}, "echo"),
        ({"suffix": "x"}, "suffix"),
        ({"best_of": 3}, "best_of"),
        ({"top_k": -5}, "top_k"),
        ({"min_tokens": 20}, "min_tokens"),
        ({"seed": "s"}, "seed"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"ignore_eos": "y"}, "ignore_eos"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"model": 3}, "model"),
        ({"rid": ""}, "rid"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
    ],
)
def test_completion_bad_params(body: dict, param: str) -> None:
    err = api_error(completion, **body)
    assert err.status == 400 and err.param == param, err.message


def test_min_tokens_message_uses_openai_names() -> None:
    err = api_error(completion, min_tokens=20)
    assert "min_tokens" in err.message and "max_tokens" in err.message and "new_tokens" not in err.message


def test_unknown_model_is_404() -> None:
    err = api_error(completion, model="other")
    assert err.status == 404 and err.message == "The model `other` does not exist."


def test_include_usage() -> None:
    assert completion(stream=True, stream_options={"include_usage": True}).opts.include_usage
    assert not completion(stream=True).opts.include_usage


# --- chat parsing -----------------------------------------------------------------------------------
def test_chat_messages_normalised() -> None:
    req = chat(
        messages=[
            {"role": "system", "content": "s"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "name": "u"},
            {"role": "assistant", "content": None},
            {"role": "tool", "content": "r", "tool_call_id": "c1"},
        ]
    )
    assert req.messages == (
        {"role": "system", "content": "s"},
        {"role": "user", "content": "a\nb", "name": "u"},
        {"role": "assistant", "content": ""},
        {"role": "tool", "content": "r", "tool_call_id": "c1"},
    )


@pytest.mark.parametrize(
    "body, param",
    [
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": ["hi"]}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
        ({"messages": [{"role": "user", "content": None}]}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"logprobs": "yes"}, "logprobs"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"chat_template_kwargs": []}, "chat_template_kwargs"),
    ],
)
def test_chat_bad_params(body: dict, param: str) -> None:
    err = api_error(chat, **body)
    assert err.status == 400 and err.param == param, err.message


def test_chat_accepts_empty_unsupported_values() -> None:
    req = chat(
        tools=[],
        tool_choice="none",
        response_format={"type": "text"},
        functions=None,
        logprobs=True,
        top_logprobs=3,
        chat_template_kwargs={"enable_thinking": False, "add_generation_prompt": False},
    )
    assert req.logprobs and req.top_logprobs == 3 and req.template_kwargs == {"enable_thinking": False}


def test_chat_max_tokens() -> None:
    assert chat(max_completion_tokens=4, max_tokens=9).items([1, 2], CTX)[0].params.max_new_tokens == 4
    assert chat(max_tokens=9).items([1, 2], CTX)[0].params.max_new_tokens == 9
    assert chat().items([1, 2, 3], CTX)[0].params.max_new_tokens == CTX - 3  # the rest of the window
    items = chat(n=3, rid="c").items([1], CTX)
    assert [it.rid for it in items] == ["c-0", "c-1", "c-2"] and [it.choice for it in items] == [0, 1, 2]
    assert not items[0].logprob.return_logprob


# --- builders -----------------------------------------------------------------------------------------
def test_usage_counts_each_prompt_once() -> None:
    states = [
        state("a", [1, 2], None, prompt=3, cached=0),
        state("b", [1], None, prompt=3, cached=2),
        state("c", [1, 2, 3], None, prompt=5, cached=4),
        state("d", [], None, prompt=5, cached=1),
    ]
    assert usage(states, 2) == {
        "prompt_tokens": 8,
        "completion_tokens": 6,
        "total_tokens": 14,
        "prompt_tokens_details": {"cached_tokens": 6},
    }


def test_clamp_and_token_texts() -> None:
    assert clamp_logprob(float("-inf")) == MIN_LOGPROB and clamp_logprob(None) is None
    assert TokenTexts(None)(7) == "token_id:7"
    assert texts().many([0, 1, 30]) == ["a", "b", "<30>"]


def test_legacy_logprob_block() -> None:
    block = logprob_block(
        texts(),
        [[None, 0, None], [-1.0, 1, None], [float("-inf"), 30, None]],
        [None, [[-0.5, 2, None]], [[-0.1, 3, None], [-0.2, 3, None]]],
        10,
    )
    assert block["tokens"] == ["a", "b", "<30>"]
    assert block["token_logprobs"] == [None, -1.0, MIN_LOGPROB]
    assert block["top_logprobs"] == [None, {"c": -0.5, "b": -1.0}, {"d": -0.1, "<30>": MIN_LOGPROB}]
    assert block["text_offset"] == [10, 11, 12]


def test_completion_response_shape_and_echo() -> None:
    req = completion(prompt=["x", "y"], n=1, echo=True, logprobs=1)
    s0, s1 = state("a", [1, 2], {"type": "length", "length": 2}, lps=True), state("b", [3], {"type": "stop"}, lps=True)
    s0.input_token_logprobs, s0.input_top_logprobs = [[None, 23, None], [-3.0, 24, None]], None
    meta = ResponseMeta("cmpl-1", "text_completion", 5, MODEL)
    out = completion_response(req, meta, [s0, s1], ["xy", "y"], texts())
    assert out["object"] == "text_completion" and out["usage"]["completion_tokens"] == 3
    c0, c1 = out["choices"]
    assert (c0["index"], c0["text"], c0["finish_reason"]) == (0, "xybc", "length")
    assert c0["logprobs"]["tokens"] == ["x", "y", "b", "c"] and c0["logprobs"]["token_logprobs"][0] is None
    assert c0["logprobs"]["text_offset"] == [0, 1, 2, 3]
    assert (c1["index"], c1["text"], c1["finish_reason"]) == (1, "yd", "stop")


def chunk(s: ReqState, text: str, ids: list[int], finished: bool) -> GenerateChunk:
    lps = [[-0.5, t, None] for t in ids] if s.return_logprob else []
    tops = [[[-0.5, t, None]] for t in ids] if s.return_logprob else []
    return GenerateChunk(text, ids, lps, tops, finished, s)


def test_completion_stream_events() -> None:
    req = completion(prompt=["p"], n=2, stream=True, stream_options={"include_usage": True}, logprobs=1)
    meta = ResponseMeta("cmpl-1", "text_completion", 5, MODEL, include_usage=True)
    stream = CompletionStream(req, meta, [""], texts())
    s0, s1 = state("a", [1, 2], None, lps=True), state("b", [], None, lps=True)
    events = stream.opening() + stream.on_chunk(0, chunk(s0, "b", [1], False))
    events += stream.on_chunk(1, chunk(s1, "", [], False))  # nothing new: no event
    s0.finish_reason = {"type": "length"}
    events += stream.on_chunk(0, chunk(s0, "c", [2], True))
    s1.finish_reason = {"type": "stop"}
    events += stream.on_chunk(1, chunk(s1, "", [], True)) + stream.closing()
    assert [e["choices"][0]["text"] for e in events[:-1]] == ["b", "c", "", ""]
    assert [e["choices"][0]["finish_reason"] for e in events[:-1]] == [None, None, "length", "stop"]
    assert [e["choices"][0]["index"] for e in events[:-1]] == [0, 0, 0, 1]
    assert events[1]["choices"][0]["logprobs"]["text_offset"] == [1]
    assert all(e["usage"] is None for e in events[:-1]) and events[-1]["choices"] == []
    assert events[-1]["usage"]["completion_tokens"] == 2


def test_chat_response_and_logprobs() -> None:
    req = chat(n=1, logprobs=True, top_logprobs=2)
    s = state("a", [1, 2], {"type": "stop", "matched": 3}, lps=True)
    out = chat_response(req, ResponseMeta("chatcmpl-1", "chat.completion", 5, MODEL), [s], texts())
    choice = out["choices"][0]
    assert out["object"] == "chat.completion" and "usage" in out
    assert choice["message"] == {"role": "assistant", "content": "bc"} and choice["finish_reason"] == "stop"
    first = choice["logprobs"]["content"][0]
    assert first == {
        "token": "b",
        "logprob": -0.5,
        "bytes": [98],
        "top_logprobs": [
            {"token": "b", "logprob": -0.5, "bytes": [98]},
            {"token": "z", "logprob": -2.0, "bytes": [122]},
        ],
    }
    assert logprob_content(texts(), [], []) == []
    assert (
        chat_response(chat(), ResponseMeta("i", "chat.completion", 5, MODEL), [s], texts())["choices"][0]["logprobs"]
        is None
    )


def test_chat_stream_events() -> None:
    req = chat(n=2, stream=True)
    stream = ChatStream(req, ResponseMeta("chatcmpl-1", "chat.completion.chunk", 5, MODEL), texts())
    s0, s1 = state("a", [1], None), state("b", [2], None)
    events = stream.opening()
    assert [e["choices"][0]["delta"] for e in events] == [{"role": "assistant", "content": ""}] * 2
    assert [e["choices"][0]["index"] for e in events] == [0, 1] and "usage" not in events[0]
    events = stream.on_chunk(1, chunk(s1, "c", [2], False))
    s0.finish_reason = {"type": "abort", "message": "gone"}
    events += stream.on_chunk(0, chunk(s0, "b", [1], True))
    assert [(e["choices"][0]["index"], e["choices"][0]["delta"], e["choices"][0]["finish_reason"]) for e in events] == [
        (1, {"content": "c"}, None),
        (0, {"content": "b"}, None),
        (0, {}, "abort"),
    ]
    assert stream.closing() == [] and events[0]["object"] == "chat.completion.chunk"


# --- merging the choices' streams ------------------------------------------------------------------
class FakeTokenizerManager:
    """``generate`` yields three chunks (or fails for rid 'bad'); records every stream it closed."""

    def __init__(self) -> None:
        self.closed: list[str] = []

    async def generate(self, req: Any) -> AsyncIterator[GenerateChunk]:
        try:
            if req.rid == "bad":
                raise APIError(400, "boom")
            s = ReqState(req.rid, 1, False, 0)
            for k in range(3):
                await asyncio.sleep(0)
                s.finish_reason = {"type": "length"} if k == 2 else None
                yield GenerateChunk("x", [k], [], [], k == 2, s)
        finally:
            self.closed.append(req.rid)


def run_merge(rids: list[str], take: int | None = None) -> tuple[list[tuple[int, bool]], FakeTokenizerManager]:
    tm = FakeTokenizerManager()
    srv = SimpleNamespace(tm=tm)

    async def main() -> list[tuple[int, bool]]:
        got: list[tuple[int, bool]] = []
        async with contextlib.aclosing(merge_chunks(srv, [SimpleNamespace(rid=r) for r in rids])) as chunks:
            async for i, c in chunks:
                got.append((i, c.finished))
                if take is not None and len(got) == take:
                    break
        return got

    return asyncio.run(main()), tm


def test_merge_interleaves_and_tags_each_request() -> None:
    got, tm = run_merge(["a", "b"])
    assert sorted(got) == [(0, False), (0, False), (0, True), (1, False), (1, False), (1, True)]
    assert sorted(tm.closed) == ["a", "b"]


def test_merge_error_in_one_request_ends_all() -> None:
    with pytest.raises(APIError, match="boom"):
        run_merge(["a", "bad"])


def test_merge_stopping_early_closes_every_stream() -> None:
    got, tm = run_merge(["a", "b"], take=1)
    assert len(got) == 1 and sorted(tm.closed) == ["a", "b"]  # the engine aborts unfinished requests on close
