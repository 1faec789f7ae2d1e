"""Engine greedy output against transformers' forward, over architectures, page/chunk sizes and cache modes."""

from __future__ import annotations

import random

import pytest
from oracle import ARCHS, assert_pool_idle

from sglang_pd import Engine

NEW_TOKENS = 32
PROMPT_LENS = (1, 5, 16, 33, 70, 130)  # one token, < a page, = a page, many pages, > small chunks
CONFIGS = {
    "default": {},
    "chunk8-page1": {"chunked_prefill_size": 8, "page_size": 1},
    "chunk24-page16": {"chunked_prefill_size": 24, "page_size": 16},
    "nocache-chunk32-page4": {"chunked_prefill_size": 32, "page_size": 4, "disable_radix_cache": True},
}
GREEDY = {"temperature": 0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True}


def make_prompts(vocab: int, lens: tuple[int, ...] = PROMPT_LENS, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(n)] for n in lens]


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_transformers(arch, config, tiny_model_dir, hf_oracle):
    path = tiny_model_dir(arch)
    oracle = hf_oracle(path)
    engine = Engine(model_path=str(path), **CONFIGS[config])
    prompts = make_prompts(engine.core.model_config.vocab_size)
    outs = engine.generate(input_ids=prompts, sampling_params=GREEDY)
    for prompt, out in zip(prompts, outs):
        assert out["output_ids"] == oracle.greedy(prompt, NEW_TOKENS), f"prompt of {len(prompt)} tokens"
        assert out["meta_info"]["finish_reason"] == {"type": "length", "length": NEW_TOKENS}
        assert out["meta_info"]["prompt_tokens"] == len(prompt)
        assert out["meta_info"]["completion_tokens"] == NEW_TOKENS
    assert_pool_idle(engine)

    # Second pass over the same prompts: shared prefixes come from the radix cache.
    again = engine.generate(input_ids=prompts, sampling_params=GREEDY)
    assert [o["output_ids"] for o in again] == [o["output_ids"] for o in outs]
    cached = [o["meta_info"]["cached_tokens"] for o in again]
    if CONFIGS[config].get("disable_radix_cache"):
        assert cached == [0] * len(prompts)
    else:
        page = engine.server_args.page_size
        expected = [((len(p) + NEW_TOKENS - 1) // page) * page for p in prompts]
        # Cached prefix is capped so that at least one prompt token is recomputed.
        assert cached == [min(e, ((len(p) - 1) // page) * page) for e, p in zip(expected, prompts)]
        assert sum(cached) > 0
    assert_pool_idle(engine)


@pytest.mark.parametrize("arch", ("llama", "qwen3"))
def test_retraction_under_a_tiny_pool(arch, tiny_model_dir, hf_oracle):
    path = tiny_model_dir(arch)
    oracle = hf_oracle(path)
    # 8 requests of up to 70 + 32 tokens in a pool of 256 tokens: they cannot all stay resident.
    engine = Engine(
        model_path=str(path), max_total_tokens=256, page_size=4, chunked_prefill_size=16, schedule_conservativeness=0
    )  # admit greedily, so that the pool does run dry
    prompts = make_prompts(engine.core.model_config.vocab_size, (1, 5, 16, 33, 70, 40, 20, 60), seed=1)
    outs = engine.generate(input_ids=prompts, sampling_params=GREEDY)
    assert engine.core.scheduler.num_retractions > 0
    for prompt, out in zip(prompts, outs):
        assert out["output_ids"] == oracle.greedy(prompt, NEW_TOKENS)
    assert_pool_idle(engine)


def test_lpm_policy_and_small_running_cap(tiny_model_dir, hf_oracle):
    path = tiny_model_dir("qwen2")
    oracle = hf_oracle(path)
    engine = Engine(model_path=str(path), schedule_policy="lpm", max_running_requests=3, page_size=4)
    base = make_prompts(engine.core.model_config.vocab_size, (40,), seed=2)[0]
    prompts = [base[:k] + [7, 8, 9][: k % 3 + 1] for k in (10, 20, 30, 40)] + [base]
    engine.generate(input_ids=[base], sampling_params=GREEDY)
    outs = engine.generate(input_ids=prompts, sampling_params=GREEDY)
    for prompt, out in zip(prompts, outs):
        assert out["output_ids"] == oracle.greedy(prompt, NEW_TOKENS)
    assert outs[-1]["meta_info"]["cached_tokens"] > 0
    assert_pool_idle(engine)


def test_batch_invariance(tiny_model_dir):
    path = tiny_model_dir("llama")
    engine = Engine(model_path=str(path), page_size=16, chunked_prefill_size=64)
    prompts = make_prompts(engine.core.model_config.vocab_size, tuple(range(3, 3 + 32 * 3, 3)), seed=3)
    target = prompts[11]
    alone = engine.generate(input_ids=target, sampling_params=GREEDY)
    engine.flush_cache()
    batch = engine.generate(input_ids=prompts, sampling_params=GREEDY)
    assert batch[11]["output_ids"] == alone["output_ids"]
    # Seeded sampling is also independent of batch neighbours and position.
    sampled = {"temperature": 1.0, "max_new_tokens": 16, "seed": 1234, "ignore_eos": True}
    alone_s = engine.generate(input_ids=target, sampling_params=sampled)
    batch_s = engine.generate(input_ids=prompts[::-1], sampling_params=sampled)
    assert batch_s[len(prompts) - 1 - 11]["output_ids"] == alone_s["output_ids"]
    assert_pool_idle(engine)
