"""Rotary position embedding: inverse frequencies per rope type, a float32 cos/sin cache, rotate-half.

Inverse frequencies are computed with the same expressions, in the same order and dtype, as
``transformers/modeling_rope_utils.py`` (and ``LlamaRotaryEmbedding.compute_default_rope_parameters``),
so float32 results agree bit for bit with HF's. Supported rope types: ``default``, ``linear``,
``llama3``, ``yarn``, ``dynamic``.

``dynamic`` (NTK) decision: HF recomputes the frequencies whenever a forward sees a position beyond
``max_position_embeddings``. We compute them once, for ``seq_len = max_position_embeddings`` (what HF
uses for every position below that length) and never serve positions past the context length, so we
match HF exactly for positions ``< max_position_embeddings`` and do not extrapolate past it.

Partial rotary (``partial_rotary_factor < 1``): the first ``rotary_dim`` channels of every head are
rotated (rotate-half within them), the rest pass through unchanged, as HF's partial-rotary models do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

SUPPORTED_ROPE_TYPES: tuple[str, ...] = ("default", "linear", "llama3", "yarn", "dynamic")


@dataclass(frozen=True)
class RopeConfig:
    """Rope parameters, normalised from either ``rope_parameters`` or ``rope_scaling`` + ``rope_theta``."""

    theta: float = 10000.0
    rope_type: str = "default"
    partial_rotary_factor: float = 1.0
    factor: float | None = None  # linear, dynamic, llama3, yarn
    original_max_position_embeddings: int | None = None  # llama3, yarn
    low_freq_factor: float | None = None  # llama3
    high_freq_factor: float | None = None  # llama3
    attention_factor: float | None = None  # yarn: cos/sin multiplier (mscale); None = derived
    beta_fast: float | None = None  # yarn, default 32
    beta_slow: float | None = None  # yarn, default 1
    mscale: float | None = None  # yarn
    mscale_all_dim: float | None = None  # yarn
    truncate: bool = True  # yarn


def rotary_dim(rope: RopeConfig, head_dim: int) -> int:
    """Channels of each head that rotate (HF: ``int(head_dim * partial_rotary_factor)``)."""
    return int(head_dim * rope.partial_rotary_factor)


def compute_inv_freq(rope: RopeConfig, head_dim: int, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """float32 inverse frequencies [rotary_dim // 2] (CPU) and the attention factor scaling cos/sin."""
    dim = rotary_dim(rope, head_dim)
    kind = rope.rope_type
    if kind == "default":
        return _base_inv_freq(rope.theta, dim), 1.0
    if kind == "linear":
        return _base_inv_freq(rope.theta, dim) / _need(rope.factor, "factor", kind), 1.0
    if kind == "dynamic":
        return _dynamic_inv_freq(rope, dim, max_position_embeddings), 1.0
    if kind == "llama3":
        return _llama3_inv_freq(rope, dim, max_position_embeddings), 1.0
    if kind == "yarn":
        return _yarn_inv_freq(rope, dim, max_position_embeddings)
    raise ValueError(f"rope type {kind!r} is not supported; supported rope types: {list(SUPPORTED_ROPE_TYPES)}")


def _need(value: float | None, name: str, kind: str) -> float:
    if value is None:
        raise ValueError(f"rope type {kind!r} needs {name!r} in rope_parameters / rope_scaling")
    return value


def _base_inv_freq(base: float, dim: int) -> torch.Tensor:
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim
    return 1.0 / (base**exponents)


def _dynamic_inv_freq(rope: RopeConfig, dim: int, max_pos: int) -> torch.Tensor:
    factor = _need(rope.factor, "factor", "dynamic")
    seq_len = max_pos  # see the module docstring: frequencies of the original context length
    base = rope.theta * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    return _base_inv_freq(base, dim)


def _llama3_inv_freq(rope: RopeConfig, dim: int, max_pos: int) -> torch.Tensor:
    inv_freq = _base_inv_freq(rope.theta, dim)
    factor = _need(rope.factor, "factor", "llama3")
    low_freq_factor = _need(rope.low_freq_factor, "low_freq_factor", "llama3")
    high_freq_factor = _need(rope.high_freq_factor, "high_freq_factor", "llama3")
    old_context_len = rope.original_max_position_embeddings or max_pos
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # long wavelengths are divided by factor, short ones kept, the band between is interpolated
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    return (dim * math.log(max_pos / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def _yarn_inv_freq(rope: RopeConfig, dim: int, max_pos: int) -> tuple[torch.Tensor, float]:
    base = rope.theta
    original_max = rope.original_max_position_embeddings or max_pos
    factor = rope.factor if rope.factor is not None else max_pos / original_max
    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = float(_yarn_mscale(factor, rope.mscale) / _yarn_mscale(factor, rope.mscale_all_dim))
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast = rope.beta_fast or 32
    beta_slow = rope.beta_slow or 1
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    inv_freq_extrapolation = 1.0 / pos_freqs
    inv_freq_interpolation = 1.0 / (factor * pos_freqs)
    low = _yarn_correction_dim(beta_fast, dim, base, original_max)
    high = _yarn_correction_dim(beta_slow, dim, base, original_max)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # HF: prevent a singular ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_factor = 1 - ramp.to(dtype=torch.float)
    inv_freq = inv_freq_interpolation * (1 - extrapolation_factor) + inv_freq_extrapolation * extrapolation_factor
    return inv_freq, attention_factor


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[..., 2h] -> [..., 2h]: (x1, x2) -> (-x2, x1), HF Llama's convention."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RotaryEmbedding(nn.Module):
    """float32 cos/sin of every position ``[0, max_position)``; rotates q and k of the new tokens.

    Call it as ``rope(q, k, positions)`` (``forward``); ``nn.Module.apply`` keeps its torch meaning.
    """

    cos_cache: torch.Tensor  # float32 [max_position, rotary_dim // 2], already times attention_factor
    sin_cache: torch.Tensor

    def __init__(
        self,
        head_dim: int,
        rope: RopeConfig,
        max_position: int,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        inv_freq, attention_factor = compute_inv_freq(rope, head_dim, max_position)
        self.head_dim = head_dim
        self.rotary_dim = 2 * int(inv_freq.numel())
        self.max_position = max_position
        self.attention_factor = attention_factor
        inv_freq = inv_freq.to(device=device)
        positions = torch.arange(max_position, dtype=torch.int64, device=device).float()
        freqs = positions[:, None] * inv_freq[None, :]  # [max_position, rotary_dim // 2], as HF
        self.register_buffer("cos_cache", freqs.cos() * attention_factor, persistent=False)
        self.register_buffer("sin_cache", freqs.sin() * attention_factor, persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> cos, sin [T, 1, rotary_dim] in ``dtype`` (HF casts them to q's dtype)."""
        cos = self.cos_cache[positions]
        sin = self.sin_cache[positions]
        cos = torch.cat((cos, cos), dim=-1).to(dtype).unsqueeze(1)
        sin = torch.cat((sin, sin), dim=-1).to(dtype).unsqueeze(1)
        return cos, sin

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, H, head_dim], k [T, Hkv, head_dim], positions [T] int64 -> rotated q, k (new tensors)."""
        cos, sin = self.cos_sin(positions, q.dtype)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.rotary_dim == self.head_dim:
            return (x * cos) + (rotate_half(x) * sin)
        x_rot, x_pass = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        return torch.cat(((x_rot * cos) + (rotate_half(x_rot) * sin), x_pass), dim=-1)
