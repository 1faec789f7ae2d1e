"""Offline Engine API: output shape, stops, seeds, logprobs, penalties and clear errors for bad input."""

from __future__ import annotations

import pytest
import torch
from oracle import assert_pool_idle

from sglang_pd import Engine


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    eng = Engine(model_path=str(tiny_model_dir("llama")), page_size=4, chunked_prefill_size=32)
    yield eng
    assert_pool_idle(eng)
    eng.shutdown()


@pytest.fixture(scope="module")
def oracle(tiny_model_dir, hf_oracle):
    return hf_oracle(tiny_model_dir("llama"))


def test_text_prompt_single_and_batch(engine):
    one = engine.generate(prompt="Hello there", sampling_params={"temperature": 0, "max_new_tokens": 8})
    assert set(one) == {"text", "output_ids", "meta_info"}
    assert isinstance(one["text"], str) and 1 <= len(one["output_ids"]) <= 8
    meta = one["meta_info"]
    assert meta["prompt_tokens"] == len(engine.tokenizer.encode("Hello there"))
    assert meta["completion_tokens"] == len(one["output_ids"])
    assert meta["finish_reason"]["type"] in ("stop", "length")
    assert meta["e2e_latency"] >= 0 and isinstance(meta["id"], str)
    many = engine.generate(prompt=["a b c", "the cat"], sampling_params=[{"max_new_tokens": 3}, {"max_new_tokens": 5}])
    assert isinstance(many, list) and len(many) == 2
    assert many[0]["meta_info"]["completion_tokens"] <= 3 and many[1]["meta_info"]["completion_tokens"] <= 5
    assert_pool_idle(engine)


def test_stop_token_ids_and_stop_strings(engine):
    base = engine.generate(
        input_ids=[5, 6, 7], sampling_params={"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}
    )
    ids = base["output_ids"]
    # stop at the 5th generated token's id (first occurrence)
    stop_id = ids[4]
    first = ids.index(stop_id)
    out = engine.generate(
        input_ids=[5, 6, 7],
        sampling_params={"temperature": 0, "max_new_tokens": 24, "ignore_eos": True, "stop_token_ids": [stop_id]},
    )
    assert out["output_ids"] == ids[: first + 1]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_id}
    # stop string: a piece of the text generated after a few tokens
    full_text = engine.tokenizer.decode(ids)
    prefix_text = engine.tokenizer.decode(ids[:6])
    needle = full_text[len(prefix_text) : len(prefix_text) + 3]
    if len(needle.strip()) < 2:
        pytest.skip("generated text has no usable stop string")
    out = engine.generate(
        input_ids=[5, 6, 7],
        sampling_params={"temperature": 0, "max_new_tokens": 24, "ignore_eos": True, "stop": [needle]},
    )
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": needle}
    assert needle not in out["text"] and full_text.startswith(out["text"])
    assert len(out["output_ids"]) < 24
    kept = engine.generate(
        input_ids=[5, 6, 7],
        sampling_params={
            "temperature": 0,
            "max_new_tokens": 24,
            "ignore_eos": True,
            "stop": [needle],
            "no_stop_trim": True,
        },
    )
    assert needle in kept["text"]


def test_eos_and_min_new_tokens(engine):
    eos = engine.core.model_config.eos_token_ids[0]
    # Push EOS with a logit bias: generation stops at once, unless min_new_tokens holds it off.
    sp = {"temperature": 0, "max_new_tokens": 10, "logit_bias": {str(eos): 100.0}}
    out = engine.generate(input_ids=[3, 4], sampling_params=sp)
    assert out["output_ids"] == [eos] and out["meta_info"]["finish_reason"] == {"type": "stop", "matched": eos}
    assert out["text"] == ""
    out = engine.generate(input_ids=[3, 4], sampling_params={**sp, "min_new_tokens": 4})
    assert len(out["output_ids"]) == 5 and eos not in out["output_ids"][:4]
    out = engine.generate(input_ids=[3, 4], sampling_params={**sp, "ignore_eos": True})
    assert out["output_ids"] == [eos] * 10 and out["meta_info"]["finish_reason"]["type"] == "length"


def test_seed_reproduces_and_n_choices(engine):
    sp = {"temperature": 1.0, "top_p": 0.95, "max_new_tokens": 12, "seed": 7, "ignore_eos": True}
    a = engine.generate(prompt="once upon", sampling_params=sp)
    b = engine.generate(prompt="once upon", sampling_params=sp)
    c = engine.generate(prompt="once upon", sampling_params={**sp, "seed": 8})
    assert a["output_ids"] == b["output_ids"] and a["output_ids"] != c["output_ids"]
    choices = engine.generate(prompt="once upon", sampling_params={**sp, "n": 3})
    assert len(choices) == 3 and choices[0]["output_ids"] == a["output_ids"]
    assert len({tuple(ch["output_ids"]) for ch in choices}) == 3


def test_logprobs_match_transformers(engine, oracle):
    prompt = [11, 12, 13, 14, 15, 16, 17, 18, 19]
    out = engine.generate(
        input_ids=prompt,
        sampling_params={"temperature": 0, "max_new_tokens": 6, "ignore_eos": True},
        return_logprob=True,
        logprob_start_len=0,
        top_logprobs_num=3,
    )
    meta = out["meta_info"]
    full = prompt + out["output_ids"]
    ref = oracle.logprobs(full)
    inp = meta["input_token_logprobs"]
    assert inp[0] == [None, prompt[0], None] and [t for _, t, _ in inp] == prompt
    for j in range(1, len(prompt)):
        assert inp[j][0] == pytest.approx(float(ref[j - 1, prompt[j]]), abs=1e-4)
    outp = meta["output_token_logprobs"]
    assert [t for _, t, _ in outp] == out["output_ids"]
    for k, (lp, tok, _) in enumerate(outp):
        assert lp == pytest.approx(float(ref[len(prompt) - 1 + k, tok]), abs=1e-4)
        top = meta["output_top_logprobs"][k]
        ref_vals, ref_ids = ref[len(prompt) - 1 + k].topk(3)
        assert [t for _, t, _ in top] == ref_ids.tolist()
        assert top[0][1] == tok  # greedy picks the top-1
    assert len(meta["input_top_logprobs"]) == len(prompt) and meta["input_top_logprobs"][0] is None
    # start_len in the middle of the prompt; cached prefixes must not swallow the requested positions
    out2 = engine.generate(
        input_ids=prompt,
        sampling_params={"temperature": 0, "max_new_tokens": 2},
        return_logprob=True,
        logprob_start_len=5,
    )
    inp2 = out2["meta_info"]["input_token_logprobs"]
    assert [t for _, t, _ in inp2] == prompt[5:]
    assert inp2[0][0] == pytest.approx(float(ref[4, prompt[5]]), abs=1e-4)


def test_penalties_move_the_distribution(engine):
    prompt = [20, 21, 22, 23]
    greedy = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}
    plain = engine.generate(input_ids=prompt, sampling_params=greedy)["output_ids"]
    penal = engine.generate(
        input_ids=prompt, sampling_params={**greedy, "frequency_penalty": 2.0, "presence_penalty": 2.0}
    )["output_ids"]
    assert len(set(penal)) >= len(set(plain))
    rep = engine.generate(input_ids=prompt, sampling_params={**greedy, "repetition_penalty": 2.0})["output_ids"]
    assert len(set(rep)) >= len(set(plain))
    boost = engine.generate(input_ids=prompt, sampling_params={**greedy, "frequency_penalty": -2.0})["output_ids"]
    assert len(set(boost)) <= len(set(plain))


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"sampling_params": {"temperature": -1}}, "temperature"),
        ({"sampling_params": {"top_p": 0}}, "top_p"),
        ({"sampling_params": {"max_new_tokens": -3}}, "max_new_tokens"),
        ({"sampling_params": {"bogus": 1}}, "bogus"),
        ({"sampling_params": {"top_k": "x"}}, "top_k"),
    ],
)
def test_bad_sampling_params_raise(engine, kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        engine.generate(input_ids=[1, 2, 3], **kwargs)


def test_bad_inputs_raise_clear_errors(engine):
    with pytest.raises(ValueError, match="maximum context length"):
        engine.generate(input_ids=[1] * 10, sampling_params={"max_new_tokens": engine.core.context_length})
    with pytest.raises(ValueError, match="empty"):
        engine.generate(prompt="")
    with pytest.raises(ValueError, match="vocabulary"):
        engine.generate(input_ids=[10**9])
    with pytest.raises(ValueError, match="exactly one"):
        engine.generate()
    with pytest.raises(ValueError, match="sampling_params"):
        engine.generate(input_ids=[[1], [2]], sampling_params=[{}])
    with pytest.raises(ValueError, match="unknown server argument"):
        Engine(model_path="x", not_a_flag=1)
    with pytest.raises(ValueError, match="page_size"):
        Engine(model_path="x", page_size=0)
    assert (
        engine.generate(input_ids=[1, 2], sampling_params={"max_new_tokens": 1})["meta_info"]["completion_tokens"] == 1
    )


def test_request_that_can_never_fit_fails_alone(tiny_model_dir):
    eng = Engine(model_path=str(tiny_model_dir("llama")), max_total_tokens=64, page_size=4)
    outs = eng.generate(input_ids=[[1] * 50, [2, 3]], sampling_params={"max_new_tokens": 30, "temperature": 0})
    assert outs[0]["meta_info"]["finish_reason"]["type"] == "abort"
    assert "KV pool" in outs[0]["meta_info"]["finish_reason"]["message"] and outs[0]["output_ids"] == []
    assert outs[1]["meta_info"]["completion_tokens"] >= 1
    assert_pool_idle(eng)


def test_unsupported_architecture_fails_at_startup(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        Engine(model_path=str(tmp_path), load_format="dummy")


def test_dummy_load_format_runs_without_weights(tiny_model_dir, tmp_path):
    import shutil

    src = tiny_model_dir("qwen3")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        if (src / name).exists():
            shutil.copy(src / name, tmp_path / name)
    eng = Engine(model_path=str(tmp_path), load_format="dummy", dtype="float32")
    out = eng.generate(prompt="hi", sampling_params={"max_new_tokens": 4, "ignore_eos": True})
    assert out["meta_info"]["completion_tokens"] == 4
    assert torch.isfinite(torch.tensor(out["meta_info"]["e2e_latency"]))
