"""Paged decode attention (one new token per sequence): split-KV flash decoding in two Triton stages.

Stage 1, grid (B, Hkv, S): program (b, g, s) takes all G = H // Hkv query heads of kv head g together
(rows of a [BLOCK_H, D] tile, BLOCK_H = max(16, next_pow2(G)), rows >= G masked), so each K/V row of
that head is read once and both products run on tl.dot. It walks split s of the visible keys
[kv_lo, seq_len), kv_lo = max(0, seq_len - window), BLOCK_N tokens at a time; each token's slot is
gathered through the page table, so a block may span several pages or part of one. It keeps a running
max and sum in the exp2 domain (log2(e) folded into the scale) and writes its normalised partial output
and log2-sum-exp to a float32 workspace. Stage 2, grid (B, H), merges the S partials with weights
exp2(lse_s - max lse). With S == 1, stage 1 writes the output directly and stage 2 is skipped.

Invariants:
- seq_lens[b] counts the new token, whose K/V is already in the cache; the query sits at position
  seq_lens[b] - 1 and sees keys j with seq_lens[b] - 1 - window < j <= seq_lens[b] - 1. A row with
  seq_lens[b] == 0 (batch padding, e.g. in a CUDA graph) reads nothing and gets zeros.
- page_table[b, j] for j < cdiv(seq_lens[b], page_size) is a valid page; later entries are never read.
- Split boundaries come from seq_lens inside the kernel (split length = cdiv(visible, S) rounded up to
  BLOCK_N): the launcher never reads tensor values on the host, so a call is CUDA-graph capturable for
  fixed shapes. A split with no keys writes lse = -inf and a zero partial, which the merge ignores.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

LOG2E = math.log2(math.e)
NO_WINDOW = 1 << 30  # window used when sliding_window is None: larger than any context
MAX_HEAD_DIM = 256
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, page_table_ptr, seq_lens_ptr, o_ptr, lse_ptr,
    stride_qb, stride_qh, stride_qd,
    stride_ks, stride_kh, stride_kd,
    stride_vs, stride_vh, stride_vd,
    stride_pt,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_lb, stride_lh,
    qk_scale, window,
    PAGE_SIZE: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, DIRECT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    g = tl.program_id(1)
    s = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    kv_lo = tl.maximum(seq_len - window, 0)
    span = tl.cdiv(tl.cdiv(seq_len - kv_lo, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = kv_lo + s * span
    end = tl.minimum(start + span, seq_len)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    heads = g * GROUP + offs_h
    hd_mask = (offs_h < GROUP)[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd, mask=hd_mask, other=0.0
    )
    k_base = k_ptr + g * stride_kh + offs_d[None, :] * stride_kd
    v_base = v_ptr + g * stride_vh + offs_d[None, :] * stride_vd
    pt_row = page_table_ptr + b * stride_pt

    m = tl.full([BLOCK_H], -1.0e30, dtype=tl.float32)  # finite floor: exp2(m - m_new) never sees -inf - -inf
    l = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + offs_n
        n_mask = pos < end
        page = tl.load(pt_row + pos // PAGE_SIZE, mask=n_mask, other=0)
        slot = page.to(tl.int64) * PAGE_SIZE + pos % PAGE_SIZE
        kv_mask = n_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
        k = tl.load(k_base + slot[:, None] * stride_ks, mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        qk = tl.where(n_mask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m, tl.max(qk, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        v = tl.load(v_base + slot[:, None] * stride_vs, mask=kv_mask, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m = m_new

    has_keys = l > 0.0
    l_safe = tl.where(has_keys, l, 1.0)
    o = acc / l_safe[:, None]
    o_ptrs = o_ptr + b * stride_ob + heads[:, None] * stride_oh + s * stride_os + offs_d[None, :] * stride_od
    tl.store(o_ptrs, o.to(o_ptr.dtype.element_ty), mask=hd_mask)
    if not DIRECT:
        lse = tl.where(has_keys, m + tl.log2(l_safe), float("-inf"))
        tl.store(lse_ptr + b * stride_lb + heads * stride_lh + s, lse, mask=offs_h < GROUP)


@triton.jit
def _decode_merge_kernel(
    part_ptr, lse_ptr, out_ptr,
    stride_pb, stride_ph, stride_ps,
    stride_lb, stride_lh,
    stride_ob, stride_oh, stride_od,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < NUM_SPLITS
    lse = tl.load(lse_ptr + b * stride_lb + h * stride_lh + offs_s, mask=s_mask, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)  # every split empty: weights all 0
    w = tl.exp2(lse - lse_max)
    denom = tl.sum(w, 0)
    mask = s_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    part_ptrs = part_ptr + b * stride_pb + h * stride_ph + offs_s[:, None] * stride_ps + offs_d[None, :]
    part = tl.load(part_ptrs, mask=mask, other=0.0)
    o = tl.sum(part * w[:, None], 0) / tl.where(denom > 0.0, denom, 1.0)
    tl.store(
        out_ptr + b * stride_ob + h * stride_oh + offs_d * stride_od,
        o.to(out_ptr.dtype.element_ty),
        mask=offs_d < HEAD_DIM,
    )


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_paged_inputs(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
    seq_lens: torch.Tensor, page_size: int, out: torch.Tensor | None,
) -> None:  # fmt: skip
    """Shared checks of the paged attention launchers (shapes, dtypes, devices); reads no tensor values."""
    if q.dim() != 3 or k_cache.dim() != 3 or v_cache.shape != k_cache.shape:
        shapes = [tuple(t.shape) for t in (q, k_cache, v_cache)]
        raise ValueError(f"want q [T, H, D] and k/v caches [slots, Hkv, D] of one shape; got {shapes}")
    heads, head_dim = q.shape[1], q.shape[2]
    num_slots, kv_heads = k_cache.shape[0], k_cache.shape[1]
    if k_cache.shape[2] != head_dim or kv_heads == 0 or heads % kv_heads != 0:
        raise ValueError(f"q heads, head_dim {heads}, {head_dim} do not fit kv heads {tuple(k_cache.shape[1:])}")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim {head_dim} unsupported (1..{MAX_HEAD_DIM})")
    if q.dtype not in FLOAT_DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(f"q/k/v must share one of {FLOAT_DTYPES}; got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if page_table.dtype != torch.int32 or seq_lens.dtype != torch.int32:
        raise TypeError(f"page_table and seq_lens must be int32; got {page_table.dtype}, {seq_lens.dtype}")
    if page_table.dim() != 2 or seq_lens.dim() != 1 or page_table.shape[0] != seq_lens.shape[0]:
        shapes = [tuple(page_table.shape), tuple(seq_lens.shape)]
        raise ValueError(f"want page_table [B, max_pages], seq_lens [B]; got {shapes}")
    if page_size < 1 or num_slots % page_size != 0:
        raise ValueError(f"page_size {page_size} must be >= 1 and divide the {num_slots} cache slots")
    tensors = [q, k_cache, v_cache, page_table, seq_lens] + ([] if out is None else [out])
    if any(t.device != q.device for t in tensors):
        raise ValueError(f"all tensors must be on one device; got {[str(t.device) for t in tensors]}")
    if not q.is_cuda and not interpreting():
        raise ValueError("CPU tensors need TRITON_INTERPRET=1 (set before importing this module)")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype):
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype}; got {tuple(out.shape)} {out.dtype}")


def default_num_kv_splits(
    batch_size: int, num_kv_heads: int, max_context: int, num_sms: int, *,
    programs_per_sm: int = 4, min_split_tokens: int = 128, max_splits: int = 32,
) -> int:  # fmt: skip
    """Splits per sequence: enough (b, kv head, split) programs to give each SM ``programs_per_sm``,
    but no split shorter than ``min_split_tokens`` of ``max_context`` and at most ``max_splits``."""
    programs = max(1, batch_size * num_kv_heads)
    want = -(-programs_per_sm * num_sms // programs)
    by_length = -(-max_context // min_split_tokens)
    return max(1, min(want, by_length, max_splits))


def _default_tuning(head_dim: int) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) for stage 1."""
    if interpreting():
        return 16, 4, 1
    if head_dim <= 128:
        return 64, 4, 2
    return 32, 4, 2


def decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
    seq_lens: torch.Tensor, page_size: int, scaling: float, sliding_window: int | None = None,
    num_kv_splits: int | None = None, out: torch.Tensor | None = None, *,
    block_n: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """Attention of one new token per sequence over its paged KV; returns ``out`` [B, H, D] (q's dtype).

    q [B, H, D]; k_cache, v_cache [num_pages * page_size, Hkv, D] (q's dtype); page_table [B, max_pages]
    int32; seq_lens [B] int32 (including the new token; 0 = padding row, output zeros). ``num_kv_splits`` defaults to
    ``default_num_kv_splits`` with max_context = max_pages * page_size (a shape, not a value), so the
    call never synchronises with the device. ``block_n``/``num_warps``/``num_stages`` tune stage 1.
    """
    check_paged_inputs(q, k_cache, v_cache, page_table, seq_lens, page_size, out)
    batch, heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    if seq_lens.shape[0] != batch:
        raise ValueError(f"seq_lens has {seq_lens.shape[0]} rows for a batch of {batch}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 or None; got {sliding_window}")
    if num_kv_splits is None:
        num_sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
        num_kv_splits = default_num_kv_splits(batch, kv_heads, page_table.shape[1] * page_size, num_sms)
    if num_kv_splits < 1:
        raise ValueError(f"num_kv_splits must be >= 1; got {num_kv_splits}")
    out = torch.empty_like(q) if out is None else out
    if batch == 0:
        return out
    tuned = _default_tuning(head_dim)
    block_n, num_warps, num_stages = block_n or tuned[0], num_warps or tuned[1], num_stages or tuned[2]
    group = heads // kv_heads
    block_d = max(16, triton.next_power_of_2(head_dim))
    direct = num_kv_splits == 1
    if direct:
        part, lse = out, out  # lse unused when DIRECT
        part_strides = (out.stride(0), out.stride(1), 0, out.stride(2))
    else:
        part = torch.empty((batch, heads, num_kv_splits, head_dim), dtype=torch.float32, device=q.device)
        lse = torch.empty((batch, heads, num_kv_splits), dtype=torch.float32, device=q.device)
        part_strides = (part.stride(0), part.stride(1), part.stride(2), part.stride(3))
    _decode_split_kernel[(batch, kv_heads, num_kv_splits)](
        q, k_cache, v_cache, page_table, seq_lens, part, lse,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), page_table.stride(0),
        *part_strides, lse.stride(0), lse.stride(1),
        scaling * LOG2E, NO_WINDOW if sliding_window is None else sliding_window,
        PAGE_SIZE=page_size, GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n, NUM_SPLITS=num_kv_splits,
        DIRECT=direct, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    if not direct:
        _decode_merge_kernel[(batch, heads)](
            part, lse, out, part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
            *out.stride(), HEAD_DIM=head_dim, BLOCK_D=block_d, NUM_SPLITS=num_kv_splits,
            BLOCK_S=triton.next_power_of_2(num_kv_splits), num_warps=4,
        )  # fmt: skip
    return out


def gather_slots(page_table_row: torch.Tensor, length: int, page_size: int) -> torch.Tensor:
    """int64 [length]: KV slots of positions 0..length-1 of one sequence."""
    pos = torch.arange(length, device=page_table_row.device)
    return page_table_row.long()[pos // page_size] * page_size + pos % page_size


def decode_attention_ref(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
    seq_lens: torch.Tensor, page_size: int, scaling: float, sliding_window: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """Plain torch, one sequence at a time, float32 math; same contract as ``decode_attention``."""
    group = q.shape[1] // k_cache.shape[1]
    out = torch.empty_like(q)
    for b, seq_len in enumerate(seq_lens.tolist()):
        lo = 0 if sliding_window is None else max(0, seq_len - sliding_window)
        slots = gather_slots(page_table[b], seq_len, page_size)[lo:]
        k = k_cache[slots].float().repeat_interleave(group, dim=1)  # [S, H, D]
        v = v_cache[slots].float().repeat_interleave(group, dim=1)
        probs = (torch.einsum("hd,shd->hs", q[b].float(), k) * scaling).softmax(-1)
        out[b] = torch.einsum("hs,shd->hd", probs, v).to(q.dtype)
    return out
