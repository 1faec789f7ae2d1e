"""Issue 3's independent check: a checkpoint written by transformers itself, the real server, the official client.

The weights come from ``LlamaForCausalLM(config).save_pretrained`` (transformers' own random init,
not our tool); the tokenizer files are our tiny model's byte-level BPE with its ChatML template.
Greedy output must equal transformers' own greedy decoding of the same prompt tokens, streaming and
not; every bad input of the issue gets the OpenAI error envelope with the right status; and the
server is still healthy afterwards. One server serves the whole module (starts cost seconds).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest
import requests
import torch
from server_process import ServerProcess

API_KEY = "sk-independent-check"
CONTEXT = 256
PAYLOAD_LIMIT = 16384
N_NEW = 24
PROMPT = "Once upon a time, naïve café 日本"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Où est la gare? 🙂"}]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="module")
def ckpt(tiny_model_dir: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    src = tiny_model_dir("llama")
    out = tmp_path_factory.mktemp("hf-written-llama")
    vocab = len(AutoTokenizer.from_pretrained(src))
    # initializer_range 0.2 instead of 0.02 spreads the logits (std ~1.6 rather than ~0.16), so greedy
    # decoding has no near-ties that float32 summation order could flip.
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=CONTEXT,
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=3,
        initializer_range=0.2,
    )
    torch.manual_seed(1234)
    LlamaForCausalLM(config).save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy(src / name, out / name)
    return out


@pytest.fixture(scope="module")
def tok(ckpt: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ckpt)


@pytest.fixture(scope="module")
def srv(ckpt: Path) -> ServerProcess:
    s = ServerProcess(
        str(ckpt),
        "--served-model-name",
        "hf-llama",
        "--api-key",
        API_KEY,
        "--max-payload-size",
        str(PAYLOAD_LIMIT),
        "--max-running-requests",
        "1",
        "--max-queued-requests",
        "0",
        "--page-size",
        "4",
    )
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(srv: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def hf_greedy(ckpt: Path, hf_oracle: Callable[[Path], Any]) -> Callable[[list[int]], list[int]]:
    oracle = hf_oracle(ckpt)  # AutoModelForCausalLM.from_pretrained(ckpt), KV-cached greedy loop
    return lambda ids: oracle.greedy(ids, N_NEW)


def chat_prompt_ids(tok: Any, messages: list[dict[str, str]]) -> list[int]:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok.encode(text, add_special_tokens=False)


GREEDY = {"max_tokens": N_NEW, "temperature": 0, "extra_body": {"ignore_eos": True}}


def test_models_route(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == ["hf-llama"]


@pytest.mark.parametrize("prompt_kind", ["text", "token-ids"])
def test_completion_greedy_equals_transformers(
    client: openai.OpenAI, tok: Any, hf_greedy: Callable, prompt_kind: str
) -> None:
    ids = tok.encode(PROMPT)
    prompt: Any = PROMPT if prompt_kind == "text" else ids
    expected = tok.decode(hf_greedy(ids))
    assert len(set(hf_greedy(ids))) > 3  # a real sequence, not one token repeated
    out = client.completions.create(model="hf-llama", prompt=prompt, **GREEDY)
    assert out.choices[0].text == expected and out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), N_NEW)
    chunks = list(
        client.completions.create(
            model="hf-llama", prompt=prompt, stream=True, stream_options={"include_usage": True}, **GREEDY
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == N_NEW


def test_chat_greedy_equals_transformers(client: openai.OpenAI, tok: Any, hf_greedy: Callable) -> None:
    ids = chat_prompt_ids(tok, MESSAGES)
    expected = tok.decode(hf_greedy(ids))
    out = client.chat.completions.create(model="hf-llama", messages=MESSAGES, **GREEDY)
    msg = out.choices[0].message
    assert msg.role == "assistant" and msg.content == expected
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), N_NEW)
    chunks = list(client.chat.completions.create(model="hf-llama", messages=MESSAGES, stream=True, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"


def assert_envelope(r: requests.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"} and err["code"] == status, err
    assert err["message"] and "Traceback" not in err["message"]
    return err


def post(
    srv: ServerProcess, path: str, body: Any = None, data: bytes | None = None, key: str | None = API_KEY
) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    if data is not None:
        headers["Content-Type"] = "application/json"
    return requests.post(srv.url + path, json=body, data=data, headers=headers, timeout=30)


COMPLETION = {"model": "hf-llama", "prompt": "Hello", "max_tokens": 4}
CHAT = {"model": "hf-llama", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
BAD_OPENAI = [  # (extra body fields, the param the error must name), sent to both routes
    ({"max_tokens": "many"}, "max_tokens"),
    ({"temperature": "hot"}, "temperature"),
    ({"stream": "yes"}, "stream"),
    ({"top_p": [1]}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -5}, "max_tokens"),
    ({"temperature": -0.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_p": -0.1}, "top_p"),
]


@pytest.mark.parametrize(
    "route, base", [("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)], ids=["completions", "chat"]
)
def test_bad_openai_inputs_are_400(srv: ServerProcess, client: openai.OpenAI, route: str, base: dict) -> None:
    for extra, param in BAD_OPENAI:
        err = assert_envelope(post(srv, route, {**base, **extra}), 400)
        assert err["param"] == param, (extra, err)
    create = client.completions.create if route == "/v1/completions" else client.chat.completions.create
    kwargs = {k: v for k, v in base.items() if k != "max_tokens"}
    for extra in ({"max_tokens": 0}, {"temperature": -1}, {"top_p": 0}, {"top_p": 1.01}):
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as info:
                create(**kwargs, **({"max_tokens": 4} | extra), stream=stream)
            assert info.value.status_code == 400 and info.value.body["code"] == 400


def test_wrong_shapes_and_empty_prompts_are_400(srv: ServerProcess, client: openai.OpenAI) -> None:
    for body in (
        {**COMPLETION, "prompt": ""},
        {**COMPLETION, "prompt": []},
        {**COMPLETION, "prompt": {"a": 1}},
        {**COMPLETION, "prompt": [[]]},
        {**CHAT, "messages": []},
        {**CHAT, "messages": "Hello"},
        {**CHAT, "messages": [{"role": "user", "content": 5}]},
        {"max_tokens": 4},
    ):
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        assert_envelope(post(srv, path, body), 400)
    for body in (
        {"text": "", "sampling_params": {"max_new_tokens": 2}},
        {"input_ids": [], "sampling_params": {"max_new_tokens": 2}},
        {"text": "Hi", "sampling_params": {"max_new_tokens": -1}},
        {"text": "Hi", "sampling_params": {"temperature": -1}},
        {"text": "Hi", "sampling_params": {"top_p": 0}},
        {"text": "Hi", "sampling_params": "greedy"},
        {"input_ids": ["a"]},
        {"input_ids": "abc"},
        {"input_ids": [10**9]},
        {"text": "Hi", "stream": "no"},
        {"text": ["a", 3]},
        [],
    ):
        assert_envelope(post(srv, "/generate", body), 400)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="hf-llama", prompt="", max_tokens=4)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/generate"])
def test_malformed_json_is_400(srv: ServerProcess, path: str) -> None:
    for raw in (b"{not json", b'{"prompt": "Hi",}', b"\xff\xfe", b""):
        assert_envelope(post(srv, path, data=raw), 400)


def test_context_overflow_is_400_with_openai_message(srv: ServerProcess, client: openai.OpenAI) -> None:
    long_prompt = list(range(10, 10 + CONTEXT - 10))
    calls = [
        lambda: client.completions.create(model="hf-llama", prompt=long_prompt, max_tokens=20),
        lambda: client.completions.create(model="hf-llama", prompt=list(range(10, 10 + CONTEXT)), max_tokens=1),
        lambda: client.completions.create(model="hf-llama", prompt="Hi", max_tokens=CONTEXT),
        lambda: client.chat.completions.create(model="hf-llama", messages=MESSAGES, max_tokens=CONTEXT - 5),
        lambda: client.chat.completions.create(model="hf-llama", messages=MESSAGES, max_tokens=CONTEXT, stream=True),
    ]
    for call in calls:
        with pytest.raises(openai.BadRequestError) as info:
            call()
        assert info.value.body["message"].startswith("This model's maximum context length is"), info.value.body
    r = post(srv, "/generate", {"input_ids": long_prompt, "sampling_params": {"max_new_tokens": 20}})
    assert assert_envelope(r, 400)["message"].startswith(f"This model's maximum context length is {CONTEXT}")
    # exactly at the limit is fine
    ok = client.completions.create(model="hf-llama", prompt=long_prompt, max_tokens=10, temperature=0)
    assert ok.usage.completion_tokens >= 1


def test_unknown_route_404_and_wrong_method(srv: ServerProcess) -> None:
    assert_envelope(post(srv, "/v1/no-such-route", {}), 404)
    assert_envelope(requests.get(srv.url + "/nope", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10), 404)
    r = requests.get(srv.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10)
    assert r.status_code in (404, 405) and r.json()["error"]["code"] == r.status_code


def test_payload_over_limit_is_413(srv: ServerProcess, client: openai.OpenAI) -> None:
    big = "word " * (PAYLOAD_LIMIT // 4)
    with pytest.raises(openai.APIStatusError) as info:
        client.completions.create(model="hf-llama", prompt=big, max_tokens=2)
    assert info.value.status_code == 413 and info.value.body["code"] == 413
    assert_envelope(post(srv, "/generate", {"text": big}), 413)
    assert_envelope(post(srv, "/v1/chat/completions", data=b"{" + b" " * PAYLOAD_LIMIT + b"}"), 413)


def test_api_key_required(srv: ServerProcess) -> None:
    for key in (None, "sk-wrong", ""):
        assert_envelope(post(srv, "/v1/completions", COMPLETION, key=key), 401)
        assert_envelope(post(srv, "/generate", {"text": "Hi"}, key=key), 401)
    wrong = openai.OpenAI(base_url=srv.url + "/v1", api_key="sk-wrong", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(**CHAT)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert requests.get(srv.url + "/health", timeout=10).status_code == 200  # health stays open


def test_full_queue_is_503_with_retry_after(srv: ServerProcess, client: openai.OpenAI) -> None:
    # --max-running-requests 1 --max-queued-requests 0: one long stream fills the server.
    stream = client.completions.create(
        model="hf-llama", prompt="Hi", max_tokens=CONTEXT - 10, stream=True, extra_body={"ignore_eos": True}
    )
    chunks = iter(stream)
    next(chunks)  # the request is admitted and running
    try:
        with pytest.raises(openai.APIStatusError) as info:
            client.chat.completions.create(**CHAT)
        assert info.value.status_code == 503 and int(info.value.response.headers["Retry-After"]) >= 1
        assert info.value.body["code"] == 503
        r = post(srv, "/generate", {"text": "Hi", "sampling_params": {"max_new_tokens": 2}})
        assert_envelope(r, 503)
        assert "Retry-After" in r.headers
    finally:
        stream.close()  # the client goes away: the server aborts the request and frees its slot
    deadline = time.monotonic() + 10
    while post(srv, "/generate", {"text": "Hi", "sampling_params": {"max_new_tokens": 1}}).status_code == 503:
        assert time.monotonic() < deadline, "the abandoned request still holds the only slot"
        time.sleep(0.1)


def test_still_healthy_afterwards(srv: ServerProcess, client: openai.OpenAI, tok: Any, hf_greedy: Callable) -> None:
    r = requests.get(srv.url + "/health", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "ok"
    ids = chat_prompt_ids(tok, MESSAGES)
    out = client.chat.completions.create(model="hf-llama", messages=MESSAGES, **GREEDY)
    assert out.choices[0].message.content == tok.decode(hf_greedy(ids))
    log = Path(srv.log.name).read_text(errors="replace")
    assert "Traceback" not in log and "internal server error" not in log.lower(), log[-3000:]


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"text": 42}, id="text-int"),
        pytest.param({"input_ids": 5}, id="input_ids-int"),
        pytest.param({"text": "Hi", "top_logprobs_num": "2"}, id="top_logprobs_num-str"),
        pytest.param({"text": "Hi", "return_logprob": "yes"}, id="return_logprob-str"),
    ],
)
def test_native_wrong_types_are_400(srv: ServerProcess, body: dict) -> None:
    r = post(srv, "/generate", body)
    assert requests.get(srv.url + "/health", timeout=10).status_code == 200
    assert_envelope(r, 400)
