"""Rotary position embedding (rotate-half, NeoX / HF Llama) of q and k in one launch.

Layout: q ``[T, H, D]``, k ``[T, Hkv, D]``, unit last-dim stride, any token and head strides (slices of a
fused qkv projection are fine); positions ``[T]`` int64 (or int32) in ``[0, max_position)`` (not checked:
no host sync); cos_cache / sin_cache float32 ``[max_position, rotary_dim // 2]`` with a unit last-dim
stride, as built by ``sglang_pd.models.rope.RotaryEmbedding`` (attention factor folded in, so every rope
type is just a different cache). With ``half = rotary_dim // 2`` and ``x1 = x[:half]``, ``x2 = x[half:rot]``:
    out[:half]     = x1 * cos - x2 * sin
    out[half:rot]  = x2 * cos + x1 * sin
    out[rot:D]     = x[rot:D]                    (partial rotary: pass through)

Numerics are HF's, rounding for rounding: cos/sin are rounded to x's dtype, each product is rounded to the
dtype, then the sum is rounded (each step computed in float32; float32 products of two 8/11-bit-mantissa
values are exact, so this equals torch's bf16/fp16 arithmetic bit for bit). In float32 this is plain
float32 arithmetic (the GPU compiler may contract to FMA: an ulp apart).

Grid: (T, head blocks of q then of k); program (t, j) rotates BLOCK_H heads of token t.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _rotate_heads(
    src_ptr,
    dst_ptr,
    s_t,
    s_h,
    d_t,
    d_h,
    tok,
    num_heads,
    head0,
    cos,
    sin,
    HALF: tl.constexpr,
    PASS: tl.constexpr,
    COPY_PASS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
):
    # heads [head0, head0 + BLOCK_H) of token tok; cos/sin [BLOCK_HALF] float32, already rounded to the dtype
    dtype = dst_ptr.dtype.element_ty
    heads = head0 + tl.arange(0, BLOCK_H)
    j = tl.arange(0, BLOCK_HALF)
    head_ok = (heads < num_heads)[:, None]
    mask = head_ok & (j < HALF)[None, :]
    src_row = src_ptr + tok * s_t + heads[:, None] * s_h  # [BLOCK_H, 1]
    dst_row = dst_ptr + tok * d_t + heads[:, None] * d_h
    src = src_row + j[None, :]
    dst = dst_row + j[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    c = cos[None, :]
    s = sin[None, :]
    o1 = (x1 * c).to(dtype).to(tl.float32) - (x2 * s).to(dtype).to(tl.float32)
    o2 = (x2 * c).to(dtype).to(tl.float32) + (x1 * s).to(dtype).to(tl.float32)
    tl.store(dst, o1.to(dtype), mask=mask)
    tl.store(dst + HALF, o2.to(dtype), mask=mask)
    if COPY_PASS:
        p = tl.arange(0, BLOCK_PASS)
        pmask = head_ok & (p < PASS)[None, :]
        rest = tl.load(src_row + 2 * HALF + p[None, :], mask=pmask, other=0.0)
        tl.store(dst_row + 2 * HALF + p[None, :], rest, mask=pmask)


@triton.jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    qo_ptr,
    ko_ptr,
    pos_ptr,
    cos_ptr,
    sin_ptr,
    num_q_heads,
    num_k_heads,
    num_q_blocks,
    q_st,
    q_sh,
    k_st,
    k_sh,
    qo_st,
    qo_sh,
    ko_st,
    ko_sh,
    cache_stride,
    HALF: tl.constexpr,
    PASS: tl.constexpr,
    COPY_PASS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    j = tl.arange(0, BLOCK_HALF)
    dtype = qo_ptr.dtype.element_ty
    cos = tl.load(cos_ptr + pos * cache_stride + j, mask=j < HALF, other=0.0).to(dtype).to(tl.float32)
    sin = tl.load(sin_ptr + pos * cache_stride + j, mask=j < HALF, other=0.0).to(dtype).to(tl.float32)
    if blk < num_q_blocks:
        _rotate_heads(
            q_ptr,
            qo_ptr,
            q_st,
            q_sh,
            qo_st,
            qo_sh,
            tok,
            num_q_heads,
            blk * BLOCK_H,
            cos,
            sin,
            HALF,
            PASS,
            COPY_PASS,
            BLOCK_H,
            BLOCK_HALF,
            BLOCK_PASS,
        )
    else:
        _rotate_heads(
            k_ptr,
            ko_ptr,
            k_st,
            k_sh,
            ko_st,
            ko_sh,
            tok,
            num_k_heads,
            (blk - num_q_blocks) * BLOCK_H,
            cos,
            sin,
            HALF,
            PASS,
            COPY_PASS,
            BLOCK_H,
            BLOCK_HALF,
            BLOCK_PASS,
        )


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated copies of q ``[T, H, D]`` and k ``[T, Hkv, D]`` (new contiguous tensors); inputs untouched."""
    _check(q, k, positions, cos_cache, sin_cache)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    _launch(q, k, q_out, k_out, positions, cos_cache, sin_cache, copy_pass=True)
    return q_out, k_out


def apply_rotary_(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """In place: rotates q and k where they lie (views of a qkv buffer too); returns ``(q, k)``."""
    _check(q, k, positions, cos_cache, sin_cache)
    _launch(q, k, q, k, positions, cos_cache, sin_cache, copy_pass=False)
    return q, k


def _launch(
    q: torch.Tensor,
    k: torch.Tensor,
    q_out: torch.Tensor,
    k_out: torch.Tensor,
    positions: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    copy_pass: bool,
) -> None:
    tokens, num_q_heads, head_dim = q.shape
    num_k_heads = k.shape[1]
    half = cos_cache.shape[1]
    rest = head_dim - 2 * half
    if tokens == 0 or num_q_heads + num_k_heads == 0:
        return
    block_half = triton.next_power_of_2(half)
    block_h = min(triton.next_power_of_2(max(num_q_heads, num_k_heads)), max(1, 2048 // block_half))
    num_q_blocks = triton.cdiv(num_q_heads, block_h)
    grid = (tokens, num_q_blocks + triton.cdiv(num_k_heads, block_h))
    _rotary_kernel[grid](
        q,
        k,
        q_out,
        k_out,
        positions,
        cos_cache,
        sin_cache,
        num_q_heads,
        num_k_heads,
        num_q_blocks,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        q_out.stride(0),
        q_out.stride(1),
        k_out.stride(0),
        k_out.stride(1),
        cos_cache.stride(0),
        HALF=half,
        PASS=rest,
        COPY_PASS=copy_pass and rest > 0,
        BLOCK_H=block_h,
        BLOCK_HALF=block_half,
        BLOCK_PASS=triton.next_power_of_2(max(rest, 1)),
        num_warps=4 if block_h * block_half >= 1024 else 1,
    )


def _check(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor
) -> None:
    if q.dtype not in FLOAT_DTYPES or k.dtype != q.dtype:
        raise TypeError(f"q and k must share one of {FLOAT_DTYPES}, got {q.dtype} and {k.dtype}")
    if positions.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"positions must be int64 (or int32), got {positions.dtype}")
    if cos_cache.dtype != torch.float32 or sin_cache.dtype != torch.float32:
        raise TypeError(f"cos/sin caches must be float32, got {cos_cache.dtype} and {sin_cache.dtype}")
    devices = {t.device for t in (q, k, positions, cos_cache, sin_cache)}
    if len(devices) != 1:
        raise ValueError(f"q, k, positions and the caches must be on one device, got {devices}")
    if q.dim() != 3 or k.dim() != 3 or positions.dim() != 1:
        raise ValueError(
            f"need q [T, H, D], k [T, Hkv, D], positions [T]; got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(positions.shape)}"
        )
    if not q.shape[0] == k.shape[0] == positions.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, positions {tuple(positions.shape)} disagree")
    if q.stride(2) != 1 or k.stride(2) != 1:
        raise ValueError(f"q and k need a unit last-dim stride, got {q.stride()} and {k.stride()}")
    if cos_cache.dim() != 2 or sin_cache.shape != cos_cache.shape or sin_cache.stride() != cos_cache.stride():
        raise ValueError(
            f"cos/sin caches must be [max_position, rotary_dim // 2] with equal strides, got "
            f"{tuple(cos_cache.shape)} and {tuple(sin_cache.shape)}"
        )
    half = cos_cache.shape[1]
    if half < 1 or 2 * half > q.shape[2] or cos_cache.stride(1) != 1:
        raise ValueError(f"rotary_dim {2 * half} must be in [2, head_dim {q.shape[2]}], unit last-dim stride")


def apply_rotary_ref(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's rotate-half in x's dtype (what ``RotaryEmbedding.forward`` computes), on new tensors."""
    cos = torch.cat((cos_cache[positions],) * 2, dim=-1).to(q.dtype).unsqueeze(1)
    sin = torch.cat((sin_cache[positions],) * 2, dim=-1).to(q.dtype).unsqueeze(1)
    rot = cos.shape[-1]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x_rot, x_pass = x[..., :rot], x[..., rot:]
        rotated = torch.cat((-x_rot[..., rot // 2 :], x_rot[..., : rot // 2]), dim=-1)
        return torch.cat((x_rot * cos + rotated * sin, x_pass), dim=-1)

    return rotate(q), rotate(k)
