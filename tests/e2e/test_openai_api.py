"""OpenAI routes against a real worker, with the official ``openai`` client as the client."""

from __future__ import annotations

import json
import time
from typing import Any

import openai
import pytest
import requests

PROMPT_IDS = [10, 200, 31, 47, 5, 120, 300]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story."}]


@pytest.fixture(scope="module")
def client(server: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def native(server: Any, ids: list[int], max_new_tokens: int) -> dict[str, Any]:
    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0}}
    r = requests.post(server.url + "/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def assert_healthy(server: Any, client: openai.OpenAI, model: str) -> None:
    assert requests.get(server.url + "/health", timeout=10).status_code == 200
    out = client.completions.create(model=model, prompt="Hello", max_tokens=2, temperature=0)
    assert out.usage.completion_tokens >= 1


def test_models(server: Any, client: openai.OpenAI, model: str) -> None:
    card = client.models.list().data[0]
    assert card.object == "model" and card.owned_by and card.model_extra["max_model_len"] == 2048
    assert client.models.retrieve(model).id == model
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_completion_greedy_matches_native_and_streams(server: Any, client: openai.OpenAI, model: str) -> None:
    ref = native(server, PROMPT_IDS, 12)
    out = client.completions.create(model=model, prompt=PROMPT_IDS, max_tokens=12, temperature=0)
    assert out.object == "text_completion" and out.id.startswith("cmpl-") and out.model == model
    assert out.choices[0].text == ref["text"] and out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (7, 12, 19)
    assert out.usage.prompt_tokens_details.cached_tokens >= 0
    chunks = list(
        client.completions.create(
            model=model,
            prompt=PROMPT_IDS,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref["text"]
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-2].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-2])


def test_chat_stream_matches_non_stream(client: openai.OpenAI, model: str) -> None:
    out = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=10, temperature=0)
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content
    assert out.usage.completion_tokens == 10 and out.choices[0].finish_reason == "length"
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=MESSAGES,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    assert chunks[0].object == "chat.completion.chunk"
    body = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in body) == out.choices[0].message.content
    last = body[-1].choices[0]
    assert last.finish_reason == "length" and last.delta.content is None and last.delta.role is None
    assert chunks[-1].usage.prompt_tokens == out.usage.prompt_tokens and chunks[-1].usage.completion_tokens == 10
    plain = list(client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=2, stream=True))
    assert all(c.usage is None and c.choices for c in plain)


def test_n_with_seed_distinct_and_reproducible(client: openai.OpenAI, model: str) -> None:
    def run() -> list[str]:
        out = client.completions.create(
            model=model, prompt="Once upon a time", max_tokens=12, n=3, seed=11, temperature=2.0
        )
        assert [c.index for c in out.choices] == [0, 1, 2] and out.usage.completion_tokens == 36
        return [c.text for c in out.choices]

    first = run()
    assert len(set(first)) > 1 and run() == first
    chat = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8, n=2, seed=5, temperature=2.0)
    assert [c.index for c in chat.choices] == [0, 1] and chat.choices[0].message.content != chat.choices[
        1
    ].message.content


def test_several_prompts_index_order(server: Any, client: openai.OpenAI, model: str) -> None:
    other = PROMPT_IDS[::-1]
    out = client.completions.create(model=model, prompt=[PROMPT_IDS, other], n=2, max_tokens=6, temperature=0)
    refs = [native(server, PROMPT_IDS, 6)["text"], native(server, other, 6)["text"]]
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert [c.text for c in out.choices] == [refs[0], refs[0], refs[1], refs[1]]
    assert out.usage.prompt_tokens == 14 and out.usage.completion_tokens == 24
    chunks = list(
        client.completions.create(
            model=model, prompt=[PROMPT_IDS, other], n=2, max_tokens=6, temperature=0, stream=True
        )
    )
    texts = ["".join(c.choices[0].text for c in chunks if c.choices[0].index == i) for i in range(4)]
    assert texts == [c.text for c in out.choices]


def test_stop_string_and_stop_token_ids(server: Any, client: openai.OpenAI, model: str) -> None:
    ref = native(server, PROMPT_IDS, 12)
    text = ref["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    expected = text[: text.index(stop)]
    out = client.completions.create(model=model, prompt=PROMPT_IDS, max_tokens=12, temperature=0, stop=[stop])
    assert out.choices[0].text == expected and out.choices[0].finish_reason == "stop"
    streamed = list(
        client.completions.create(model=model, prompt=PROMPT_IDS, max_tokens=12, temperature=0, stop=stop, stream=True)
    )
    assert "".join(c.choices[0].text for c in streamed) == expected
    stop_id = ref["output_ids"][2]
    out = client.completions.create(
        model=model,
        prompt=PROMPT_IDS,
        max_tokens=12,
        temperature=0.7,
        extra_body={"stop_token_ids": [stop_id], "top_k": 1},
    )
    assert out.choices[0].finish_reason == "stop" and out.usage.completion_tokens <= 3


def test_completion_logprobs(server: Any, client: openai.OpenAI, model: str) -> None:
    out = client.completions.create(model=model, prompt=PROMPT_IDS, max_tokens=8, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and 1 <= len(top) <= 4 and value == pytest.approx(max(top.values()), abs=1e-5)
        assert top[token] == pytest.approx(value, abs=1e-5)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    chunks = list(
        client.completions.create(model=model, prompt=PROMPT_IDS, max_tokens=8, temperature=0, logprobs=3, stream=True)
    )
    streamed = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert streamed == lp.tokens
    echo = client.completions.create(model=model, prompt=PROMPT_IDS, max_tokens=2, temperature=0, logprobs=1, echo=True)
    elp = echo.choices[0].logprobs
    assert len(elp.tokens) == 9 and elp.token_logprobs[0] is None and elp.top_logprobs[0] is None
    tail = native(server, PROMPT_IDS, 2)["text"]
    assert echo.choices[0].text.endswith(tail) and len(echo.choices[0].text) > len(tail)


def test_chat_logprobs(client: openai.OpenAI, model: str) -> None:
    out = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True, top_logprobs=4
    )
    content = out.choices[0].logprobs.content
    assert len(content) == 6
    for item in content:
        assert len(item.top_logprobs) == 4 and item.bytes == list(item.token.encode())
        assert item.logprob == pytest.approx(max(t.logprob for t in item.top_logprobs), abs=1e-5)
    assert "".join(i.token for i in content).startswith(out.choices[0].message.content[:2])
    plain = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=2, logprobs=False)
    assert plain.choices[0].logprobs is None


def test_max_completion_tokens_and_extras(client: openai.OpenAI, model: str) -> None:
    out = client.chat.completions.create(model=model, messages=MESSAGES, max_completion_tokens=3, temperature=0)
    assert out.usage.completion_tokens == 3 and out.choices[0].finish_reason == "length"
    parts = [{"role": "user", "content": [{"type": "text", "text": "Tell me a story."}]}]
    assert client.chat.completions.create(model=model, messages=parts, max_tokens=2).usage.completion_tokens >= 1
    out = client.completions.create(
        model=model,
        prompt="Hi",
        max_tokens=5,
        extra_body={
            "min_tokens": 5,
            "ignore_eos": True,
            "top_k": 3,
            "min_p": 0.05,
            "repetition_penalty": 1.1,
            "skip_special_tokens": False,
            "no_stop_trim": True,
            "rid": "openai-extras-1",
        },
    )
    assert out.usage.completion_tokens == 5 and out.id == "cmpl-openai-extras-1"


COMPLETION_BAD = [
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": 2.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"n": 0}, "n"),
    ({"logprobs": 6}, "logprobs"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"stop": 5}, "stop"),
    ({"max_tokens": "many"}, "max_tokens"),
    ({"prompt": [99999]}, "prompt"),
    ({"max_tokens": 2047}, "prompt"),
]
CHAT_BAD = [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"temperature": -1}, "temperature"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]},
        "messages",
    ),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 30}, "top_logprobs"),
    ({"max_tokens": 2040}, "messages"),
]


@pytest.mark.parametrize(
    "route, body, param",
    [("completions", b, p) for b, p in COMPLETION_BAD] + [("chat/completions", b, p) for b, p in CHAT_BAD],
)
def test_bad_requests_are_400(client: openai.OpenAI, model: str, route: str, body: dict, param: str) -> None:
    create = client.completions.create if route == "completions" else client.chat.completions.create
    base = {"model": model, "prompt": "Hi"} if route == "completions" else {"model": model, "messages": MESSAGES}
    with pytest.raises(openai.BadRequestError) as info:
        create(**{**base, **body})
    err = info.value.body
    assert info.value.status_code == 400 and err["param"] == param and err["code"] == 400, err
    assert err["type"] == "BadRequestError" and err["message"] and "Traceback" not in err["message"]
    if param in ("prompt", "messages") and "max_tokens" in body:
        assert err["message"].startswith("This model's maximum context length is")


def test_unknown_model_404_and_server_stays_healthy(server: Any, client: openai.OpenAI, model: str) -> None:
    for call in (
        lambda: client.completions.create(model="gpt-x", prompt="Hi", max_tokens=2),
        lambda: client.chat.completions.create(model="gpt-x", messages=MESSAGES, max_tokens=2),
    ):
        with pytest.raises(openai.NotFoundError) as info:
            call()
        assert info.value.body["message"] == "The model `gpt-x` does not exist." and info.value.body["code"] == 404
    r = requests.post(server.url + "/v1/chat/completions", data=b"{not json", timeout=10)
    assert r.status_code == 400 and "error" in r.json()
    no_model = requests.post(server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, timeout=30)
    assert no_model.status_code == 200 and no_model.json()["model"] == model
    assert_healthy(server, client, model)


def test_disconnect_aborts_stream(server: Any, client: openai.OpenAI, model: str) -> None:
    body = {"model": model, "messages": MESSAGES, "max_tokens": 2000, "stream": True, "ignore_eos": True}
    with requests.post(server.url + "/v1/chat/completions", json=body, timeout=30, stream=True) as r:
        events = 0
        for line in r.iter_lines():
            events += line.startswith(b"data: {")
            if events == 4:
                break
    deadline = time.monotonic() + 5  # running all 2000 tokens takes far longer on CPU
    while time.monotonic() < deadline:
        sched = requests.get(server.url + "/get_server_info", timeout=10).json()["scheduler"]
        if sched["num_running_reqs"] == 0 and sched["num_queue_reqs"] == 0:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the abandoned request kept running: {json.dumps(sched)}")
    assert_healthy(server, client, model)
