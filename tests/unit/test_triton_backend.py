"""The Triton attention backend and fused layer ops, end to end in the engine, under Triton's interpreter on CPU.

Greedy tokens equal transformers' own for a batch that mixes a short prompt, several pages, a
chunked prompt and a cached prefix (so extend attention sees a paged prefix), then decodes.
"""

from __future__ import annotations

import pytest
from oracle import assert_pool_idle


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral"])
def test_triton_backend_matches_transformers(arch, tiny_model_dir, hf_oracle):
    from sglang_pd import Engine

    path = tiny_model_dir(arch)
    oracle = hf_oracle(path)
    base = [7 + (i * 13) % 500 for i in range(40)]
    prompts = [base[:3], base[:37], base + [11, 12], [9] * 5 + base[5:21]]
    engine = Engine(
        model_path=str(path),
        device="cpu",
        attention_backend="triton",
        page_size=4,
        chunked_prefill_size=16,
        max_total_tokens=1024,
        skip_tokenizer_init=True,
    )
    try:
        sp = {"temperature": 0, "max_new_tokens": 5, "ignore_eos": True}
        first = engine.generate(input_ids=prompts[1], sampling_params=sp)
        outs = engine.generate(input_ids=prompts, sampling_params=sp)  # prompts[1:3] hit the cached prefix
        assert first["output_ids"] == oracle.greedy(prompts[1], 5)
        for p, o in zip(prompts, outs):
            assert o["output_ids"] == oracle.greedy(p, 5), p
        assert outs[2]["meta_info"]["cached_tokens"] > 0
        assert_pool_idle(engine)
    finally:
        engine.shutdown()


def test_triton_backend_refused_on_cpu_without_interpreter(monkeypatch, tiny_model_dir):
    from sglang_pd import Engine

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        Engine(model_path=str(tiny_model_dir("llama")), device="cpu", attention_backend="triton")
