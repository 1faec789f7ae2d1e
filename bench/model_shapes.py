"""Checkpoint directories with real model shapes and no weights, for ``--load-format dummy`` benchmarks."""

from __future__ import annotations

import json
from pathlib import Path

# Llama-3.1-8B's config.json fields that shape the compute (rope scaling as in the release).
LLAMA_3_1_8B: dict[str, object] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "tie_word_embeddings": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "torch_dtype": "bfloat16",
}

SHAPES = {"llama-3.1-8b": LLAMA_3_1_8B}


def write_config(out_dir: str | Path, name: str = "llama-3.1-8b") -> Path:
    """A directory holding only ``config.json`` of model ``name`` (use with --load-format dummy)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(SHAPES[name], indent=2))
    return out
