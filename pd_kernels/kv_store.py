"""Write the new tokens' K and V into their cache slots, both in one launch.

Layout: k_cache / v_cache ``[num_slots, Hkv, D]`` (``KVCache.k_slots(layer)`` / ``v_slots(layer)``: views of
the one KV buffer; any slot and head strides, unit last-dim stride); k / v ``[T, Hkv, D]``, any token and
head strides (slices of a fused qkv projection are fine), float32/float16/bfloat16, cast to the cache's
dtype on the way (round to nearest even, as ``Tensor.to``); slots ``[T]`` int64 (or int32).

Invariant (not checked: that would be a host sync, and the launcher runs inside CUDA-graph capture):
every slot is in ``[0, num_slots)``. Padding tokens must point at a real scratch slot (the null page).
Like ``k_cache[slots] = k``, a slot repeated in ``slots`` ends up holding one of its writers.

Grid: (T, blocks of BLOCK_H heads); program (t, j) copies heads [j * BLOCK_H, ...) of token t, K then V.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _store_kv_kernel(
    k_ptr,
    v_ptr,
    kc_ptr,
    vc_ptr,
    slot_ptr,
    num_heads,
    k_st,
    k_sh,
    v_st,
    v_sh,
    kc_ss,
    kc_sh,
    vc_ss,
    vc_sh,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask = (heads < num_heads)[:, None] & (d < HEAD_DIM)[None, :]
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    h = heads[:, None].to(tl.int64)
    k = tl.load(k_ptr + tok * k_st + h * k_sh + d[None, :], mask=mask)
    v = tl.load(v_ptr + tok * v_st + h * v_sh + d[None, :], mask=mask)
    tl.store(kc_ptr + slot * kc_ss + h * kc_sh + d[None, :], k.to(kc_ptr.dtype.element_ty), mask=mask)
    tl.store(vc_ptr + slot * vc_ss + h * vc_sh + d[None, :], v.to(vc_ptr.dtype.element_ty), mask=mask)


def store_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    """``k_cache[slots] = k.to(k_cache.dtype)``; ``v_cache[slots] = v.to(v_cache.dtype)``: one launch."""
    _check(k_cache, v_cache, slots, k, v)
    tokens, num_heads, head_dim = k.shape
    if tokens == 0 or num_heads == 0 or head_dim == 0:
        return
    block_d = triton.next_power_of_2(head_dim)
    block_h = min(triton.next_power_of_2(num_heads), max(1, 2048 // block_d))
    grid = (tokens, triton.cdiv(num_heads, block_h))
    _store_kv_kernel[grid](
        k,
        v,
        k_cache,
        v_cache,
        slots,
        num_heads,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        HEAD_DIM=head_dim,
        BLOCK_H=block_h,
        BLOCK_D=block_d,
        num_warps=max(1, min(8, block_h * block_d // 256)),
    )


def _check(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("k", k), ("v", v)):
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be one of {FLOAT_DTYPES}, got {t.dtype}")
        if t.dim() != 3 or t.stride(2) != 1:
            raise ValueError(
                f"{name} must be 3-D with a unit last-dim stride, got shape {tuple(t.shape)} strides {t.stride()}"
            )
    if slots.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"slots must be int64 (or int32), got {slots.dtype}")
    devices = {t.device for t in (k_cache, v_cache, slots, k, v)}
    if len(devices) != 1:
        raise ValueError(f"caches, slots, k and v must be on one device, got {devices}")
    if k.shape != v.shape or slots.shape != (k.shape[0],):
        raise ValueError(
            f"need k, v [T, Hkv, D] and slots [T]; got {tuple(k.shape)}, {tuple(v.shape)}, {tuple(slots.shape)}"
        )
    if k_cache.shape[1:] != k.shape[1:] or v_cache.shape[1:] != k.shape[1:]:
        raise ValueError(
            f"caches {tuple(k_cache.shape)}, {tuple(v_cache.shape)} do not hold [Hkv, D] = {tuple(k.shape[1:])}"
        )


def store_kv_ref(
    k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    """The torch code the kernel replaces (``KVCache.store``)."""
    k_cache[slots] = k.to(k_cache.dtype)
    v_cache[slots] = v.to(v_cache.dtype)
