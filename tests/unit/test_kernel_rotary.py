"""pd_kernels.rotary: rotate-half RoPE vs HF-numerics torch (RotaryEmbedding) on strided q/k, GQA, partial rotary."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import DEVICES, nan_empty

from pd_kernels.rotary import apply_rotary, apply_rotary_, apply_rotary_ref
from sglang_pd.models.rope import RopeConfig, RotaryEmbedding

MAX_POS = 4096
ROPES = {
    "default": RopeConfig(theta=10000.0),
    "llama3": RopeConfig(
        theta=500000.0,
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=1024,
    ),
    "yarn": RopeConfig(theta=10000.0, rope_type="yarn", factor=4.0, original_max_position_embeddings=1024),
}


def fused_qkv(
    tokens: int, heads: int, kv_heads: int, head_dim: int, device: str, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv [T, (H + 2 Hkv) D] and its q [T, H, D], k [T, Hkv, D] views (row stride (H + 2 Hkv) D)."""
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g) * 2).to(device=device, dtype=dtype)
    q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    return qkv, q, k


def positions_for(tokens: int, device: str, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, MAX_POS, (tokens,), generator=g).to(device)


def assert_matches(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.isfinite(out).all(), "kernel left elements unwritten"
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    else:  # the same rounding steps as HF, yet the GPU differs from torch by an ulp on a share of elements
        diff = (out.float() - ref.float()).abs()
        ulp = torch.finfo(out.dtype).eps * ref.float().abs().clamp_min(1.0)
        assert bool((diff <= 4 * ulp).all()), float((diff / ulp).max())
        assert float(diff.norm() / ref.float().norm()) < 5e-3


CASES = [  # tokens, heads, kv_heads, head_dim, partial_rotary_factor, rope
    (1, 4, 2, 64, 1.0, "default"),
    (3, 3, 1, 128, 1.0, "llama3"),
    (17, 2, 2, 64, 0.5, "default"),
    (5, 8, 2, 128, 0.25, "yarn"),
    (2, 1, 1, 80, 0.8, "llama3"),  # head_dim 80, rotary_dim 64: pass-through of 16
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tokens,heads,kv_heads,head_dim,partial,rope_name", CASES)
def test_matches_rotary_embedding(
    device: str, tokens: int, heads: int, kv_heads: int, head_dim: int, partial: float, rope_name: str
) -> None:
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    rope_cfg = RopeConfig(**{**ROPES[rope_name].__dict__, "partial_rotary_factor": partial})
    rope = RotaryEmbedding(head_dim, rope_cfg, MAX_POS, device=device)
    qkv, q, k = fused_qkv(tokens, heads, kv_heads, head_dim, device, dtype)
    before = qkv.clone()
    pos = positions_for(tokens, device)
    with nan_empty():
        q_out, k_out = apply_rotary(q, k, pos, rope.cos_cache, rope.sin_cache)
    assert torch.equal(qkv, before)  # inputs untouched
    ref_q, ref_k = rope(q, k, pos)  # the model's torch code
    assert_matches(q_out, ref_q)
    assert_matches(k_out, ref_k)
    alt_q, alt_k = apply_rotary_ref(q, k, pos, rope.cos_cache, rope.sin_cache)
    assert torch.equal(alt_q, ref_q) and torch.equal(alt_k, ref_k)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("partial", [1.0, 0.5])
def test_in_place_on_qkv_views(device: str, partial: float) -> None:
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    tokens, heads, kv_heads, head_dim = 3, 4, 2, 64
    rope = RotaryEmbedding(head_dim, RopeConfig(partial_rotary_factor=partial), MAX_POS, device=device)
    qkv, q, k = fused_qkv(tokens, heads, kv_heads, head_dim, device, dtype, seed=2)
    before = qkv.clone()
    pos = positions_for(tokens, device, seed=3)
    ref_q, ref_k = apply_rotary_ref(q, k, pos, rope.cos_cache, rope.sin_cache)
    got_q, got_k = apply_rotary_(q, k, pos, rope.cos_cache, rope.sin_cache)
    assert got_q is q and got_k is k
    assert_matches(q, ref_q)
    assert_matches(k, ref_k)
    v_start = (heads + kv_heads) * head_dim
    assert torch.equal(qkv[:, v_start:], before[:, v_start:])  # v untouched


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rope_name", ["default", "llama3"])
def test_large_bf16_on_cuda(rope_name: str) -> None:
    rope = RotaryEmbedding(128, ROPES[rope_name], MAX_POS, device="cuda")
    _, q, k = fused_qkv(4096, 32, 8, 128, "cuda", torch.bfloat16, seed=4)
    pos = positions_for(4096, "cuda", seed=5)
    with nan_empty():
        q_out, k_out = apply_rotary(q, k, pos, rope.cos_cache, rope.sin_cache)
    ref_q, ref_k = rope(q, k, pos)
    assert_matches(q_out, ref_q)
    assert_matches(k_out, ref_k)


def test_checks() -> None:
    rope = RotaryEmbedding(64, RopeConfig(), 16)
    _, q, k = fused_qkv(2, 2, 1, 64, "cpu", torch.float32)
    pos = torch.tensor([0, 5])
    cos, sin = rope.cos_cache, rope.sin_cache
    with pytest.raises(TypeError, match="positions"):
        apply_rotary(q, k, pos.float(), cos, sin)
    with pytest.raises(TypeError, match="share"):
        apply_rotary(q, k.double(), pos, cos, sin)
    with pytest.raises(ValueError, match="disagree"):
        apply_rotary(q, k, pos[:1], cos, sin)
    with pytest.raises(ValueError, match="unit last-dim"):
        apply_rotary(torch.randn(2, 2, 128)[..., ::2], k, pos, cos, sin)
    with pytest.raises(ValueError, match="rotary_dim"):
        apply_rotary(q[..., :32], k[..., :32], pos, cos, sin)
    with pytest.raises(TypeError, match="float32"):
        apply_rotary(q, k, pos, cos.half(), sin.half())
