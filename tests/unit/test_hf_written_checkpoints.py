"""Checkpoints written by transformers itself (its own random init, not our tool) through Engine.generate."""

from __future__ import annotations

import random

import pytest
import torch
from oracle import HFOracle, assert_pool_idle

from sglang_pd import Engine


def _save(kind: str, path, **kw) -> None:
    import transformers as tf

    cfg_cls, model_cls = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
    }[kind]
    base = dict(
        vocab_size=300,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=2,
        bos_token_id=1,
    )
    torch.manual_seed(0)
    model_cls(cfg_cls(**{**base, **kw})).save_pretrained(path, max_shard_size="100KB" if kind == "qwen3" else "1GB")


CASES = {
    "llama-llama3rope": (
        "llama",
        dict(
            rope_scaling={
                "rope_type": "llama3",
                "factor": 4.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 128,
            }
        ),
    ),
    "mistral-window": ("mistral", dict(sliding_window=40, head_dim=16)),
    "qwen2": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen3-sharded": ("qwen3", dict(head_dim=12, rope_scaling={"rope_type": "linear", "factor": 2.0})),
}
SETTINGS = (
    {},
    {"chunked_prefill_size": 32, "page_size": 4},
    {"max_total_tokens": 1200, "page_size": 16, "max_running_requests": 4},
)


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_written_checkpoint(case, tmp_path):
    kind, kw = CASES[case]
    _save(kind, tmp_path, **kw)
    oracle = HFOracle(tmp_path)
    rng = random.Random(5)
    prompts = [[rng.randrange(300) for _ in range(n)] for n in (1, 7, 16, 45, 90, 33, 64, 3)]
    n_new = 24
    expected = [oracle.greedy(p, n_new) for p in prompts]
    for settings in SETTINGS:
        engine = Engine(model_path=str(tmp_path), **settings)
        outs = engine.generate(
            input_ids=prompts, sampling_params={"temperature": 0, "max_new_tokens": n_new, "ignore_eos": True}
        )
        assert [o["output_ids"] for o in outs] == expected, settings
        assert_pool_idle(engine)
