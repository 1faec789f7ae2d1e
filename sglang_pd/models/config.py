"""ModelConfig: the architecture facts of an HF checkpoint directory, read once with AutoConfig.

Everything the decoder, loader and engine need is normalised here (bias flags per architecture,
explicit head_dim, per-layer sliding windows, rope parameters from either spelling, all EOS ids), so
no other module reads a transformers config object.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sglang_pd.models.rope import SUPPORTED_ROPE_TYPES, RopeConfig

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES: tuple[str, ...] = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)
_ARCH_BY_MODEL_TYPE: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
_SCALED_ROPE_TYPES = ("llama3", "yarn", "longrope")  # HF defaults their original_max_position_embeddings


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    hidden_act: str
    attention_bias: bool  # bias on q/k/v projections
    o_proj_bias: bool  # bias on o_proj (HF Llama/Qwen3: = attention_bias; Qwen2/Mistral: never)
    mlp_bias: bool  # bias on gate/up/down (Llama's mlp_bias only)
    qk_norm: bool  # per-head RMSNorm of q and k before rope (Qwen3)
    tie_word_embeddings: bool
    max_position_embeddings: int
    rope: RopeConfig
    sliding_windows: tuple[int | None, ...]  # one entry per layer; None = full attention
    torch_dtype: torch.dtype | None  # dtype the checkpoint was saved in
    eos_token_ids: tuple[int, ...]  # config's eos ids, then generation_config's, deduplicated
    bos_token_id: int | None = None
    pad_token_id: int | None = None

    @property
    def context_len(self) -> int:
        return self.max_position_embeddings

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def from_pretrained(cls, model_path: str) -> ModelConfig:
        """Read ``model_path/config.json`` (+ ``generation_config.json``); ValueError if unsupported."""
        raw = _read_json(Path(model_path) / "config.json")
        architecture = _architecture(raw)
        from transformers import AutoConfig  # deferred: importing transformers is slow

        hf = AutoConfig.from_pretrained(model_path)
        return _from_hf(hf, architecture, Path(model_path))


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a model directory needs a config.json")
    with path.open() as f:
        return json.load(f)


def _architecture(raw: dict[str, Any]) -> str:
    archs = raw.get("architectures") or []
    if not archs and raw.get("model_type") in _ARCH_BY_MODEL_TYPE:
        archs = [_ARCH_BY_MODEL_TYPE[raw["model_type"]]]
    for arch in archs:
        if arch in SUPPORTED_ARCHITECTURES:
            return arch
    named = ", ".join(archs) if archs else f"model_type={raw.get('model_type')!r}"
    raise ValueError(
        f"unsupported model architecture {named}; supported architectures: {list(SUPPORTED_ARCHITECTURES)}"
    )


def _from_hf(hf: Any, architecture: str, path: Path) -> ModelConfig:
    num_heads = int(hf.num_attention_heads)
    num_layers = int(hf.num_hidden_layers)
    hidden_act = getattr(hf, "hidden_act", "silu")
    if hidden_act != "silu":
        raise ValueError(f"hidden_act {hidden_act!r} is not supported (only 'silu')")
    attention_bias = architecture == "Qwen2ForCausalLM" or (
        architecture in ("LlamaForCausalLM", "Qwen3ForCausalLM") and bool(getattr(hf, "attention_bias", False))
    )
    generation = _read_generation_config(path)
    return ModelConfig(
        architecture=architecture,
        model_type=str(hf.model_type),
        vocab_size=int(hf.vocab_size),
        hidden_size=int(hf.hidden_size),
        intermediate_size=int(hf.intermediate_size),
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=int(getattr(hf, "num_key_value_heads", None) or num_heads),
        head_dim=int(getattr(hf, "head_dim", None) or hf.hidden_size // num_heads),
        rms_norm_eps=float(hf.rms_norm_eps),
        hidden_act=hidden_act,
        attention_bias=attention_bias,
        o_proj_bias=attention_bias and architecture != "Qwen2ForCausalLM",
        mlp_bias=architecture == "LlamaForCausalLM" and bool(getattr(hf, "mlp_bias", False)),
        qk_norm=architecture == "Qwen3ForCausalLM",
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        max_position_embeddings=int(hf.max_position_embeddings),
        rope=_rope_config(hf),
        sliding_windows=_sliding_windows(hf, architecture, num_layers),
        torch_dtype=_checkpoint_dtype(hf),
        eos_token_ids=_eos_ids(getattr(hf, "eos_token_id", None), generation.get("eos_token_id")),
        bos_token_id=_opt_int(getattr(hf, "bos_token_id", None), generation.get("bos_token_id")),
        pad_token_id=_opt_int(getattr(hf, "pad_token_id", None), generation.get("pad_token_id")),
    )


def _read_generation_config(path: Path) -> dict[str, Any]:
    file = path / "generation_config.json"
    return _read_json(file) if file.is_file() else {}


def _rope_params(hf: Any) -> dict[str, Any]:
    """The flat rope dict: ``rope_parameters`` (transformers 5) or ``rope_scaling`` (older)."""
    params = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
    params = dict(params)
    if params and all(isinstance(v, dict) for v in params.values()):  # nested per layer type
        params = dict(params.get("full_attention") or next(iter(params.values())))
    return params


def _rope_config(hf: Any) -> RopeConfig:
    p = _rope_params(hf)
    rope_type = p.get("rope_type") or p.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope type {rope_type!r} is not supported; supported rope types: {list(SUPPORTED_ROPE_TYPES)}"
        )
    theta = p.get("rope_theta") or getattr(hf, "rope_theta", None) or 10000.0
    partial = p.get("partial_rotary_factor") or getattr(hf, "partial_rotary_factor", None) or 1.0
    original_max = p.get("original_max_position_embeddings")
    if rope_type in _SCALED_ROPE_TYPES:
        # HF: a top-level original_max_position_embeddings wins, else the dict's, else the context length
        original_max = getattr(hf, "original_max_position_embeddings", None) or original_max
        original_max = original_max or hf.max_position_embeddings
    return RopeConfig(
        theta=float(theta),
        rope_type=rope_type,
        partial_rotary_factor=float(partial),
        factor=_opt_float(p.get("factor")),
        original_max_position_embeddings=int(original_max) if original_max else None,
        low_freq_factor=_opt_float(p.get("low_freq_factor")),
        high_freq_factor=_opt_float(p.get("high_freq_factor")),
        attention_factor=_opt_float(p.get("attention_factor")),
        beta_fast=_opt_float(p.get("beta_fast")),
        beta_slow=_opt_float(p.get("beta_slow")),
        mscale=_opt_float(p.get("mscale")),
        mscale_all_dim=_opt_float(p.get("mscale_all_dim")),
        truncate=bool(p.get("truncate", True)),
    )


def _sliding_windows(hf: Any, architecture: str, num_layers: int) -> tuple[int | None, ...]:
    """Per-layer window, decided as transformers' modeling code decides it."""
    window = getattr(hf, "sliding_window", None)
    if architecture == "MistralForCausalLM":
        return (int(window) if window is not None else None,) * num_layers
    if architecture not in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        return (None,) * num_layers
    if not getattr(hf, "use_sliding_window", False):
        window = None  # Qwen2/3 __post_init__: sliding_window only counts with use_sliding_window
    layer_types = getattr(hf, "layer_types", None)
    if layer_types is None:
        max_window_layers = int(getattr(hf, "max_window_layers", num_layers))
        layer_types = [
            "sliding_attention" if window is not None and i >= max_window_layers else "full_attention"
            for i in range(num_layers)
        ]
    return tuple(
        int(window) if window is not None and layer_types[i] == "sliding_attention" else None for i in range(num_layers)
    )


def _checkpoint_dtype(hf: Any) -> torch.dtype | None:
    value = getattr(hf, "dtype", None) or getattr(hf, "torch_dtype", None)
    if value is None or isinstance(value, torch.dtype):
        return value
    name = str(value).removeprefix("torch.")
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        logger.warning("ignoring unknown checkpoint dtype %r", value)
        return None
    return dtype


def _as_ids(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


def _eos_ids(config_eos: int | list[int] | None, generation_eos: int | list[int] | None) -> tuple[int, ...]:
    ids = _as_ids(config_eos) + _as_ids(generation_eos)
    return tuple(dict.fromkeys(ids))


def _opt_int(*values: Any) -> int | None:
    for value in values:
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return None


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)
