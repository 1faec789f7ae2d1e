"""Paged prefill/extend attention: causal attention of a varlen batch of new tokens over each sequence's
whole paged KV (cached prefix plus the new tokens, all already stored in the cache).

Grid (cdiv(max_extend_len, BLOCK_M), H, B), query blocks in reverse order so the longest (latest) blocks
start first. Program (m, h, b) takes BLOCK_M consecutive new tokens of sequence b, head h, at positions
first_q..last_q, and runs an online softmax (exp2, log2(e) folded into the scale, tl.dot for both
products) over keys BLOCK_N at a time, each key's slot gathered through the page table. Key ranges, all
starting at multiples of BLOCK_N:
- [lo, win_end): inside the window of some but not all queries -> window and causal masks;
- [win_end, full_end): keys <= first_q seen by every query -> no mask;
- [full_end, last_q + 1): the diagonal -> causal (and window) masks.
Blocks wholly above the diagonal or before every query's window are never visited.

Invariants: sequence b owns rows [extend_starts[b], extend_starts[b] + extend_lens[b]) of q/out at
positions [seq_lens[b] - extend_lens[b], seq_lens[b]); extend_lens[b] may be 0 (no rows, nothing
written) and max_extend_len >= max(extend_lens) is the caller's host-side bound used for the grid;
page_table[b, j] is valid for j < cdiv(seq_lens[b], page_size). Query i sees key j iff
i - window < j <= i. No tensor value is read on the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pd_kernels.decode_attention import LOG2E, NO_WINDOW, check_paged_inputs, gather_slots, interpreting


@triton.jit
def _attend_keys(
    acc, l, m, q, q_pos, k_base, v_base, pt_row, lo, hi, stride_ks, stride_vs, qk_scale, window,
    PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Online-softmax update over keys [lo, hi); unmasked blocks must lie wholly inside every row's view."""
    offs_n = tl.arange(0, BLOCK_N)
    d_mask = (tl.arange(0, BLOCK_D) < HEAD_DIM)[None, :]
    for n0 in range(lo, hi, BLOCK_N):
        k_pos = n0 + offs_n
        if MASKED:
            n_mask = k_pos < hi
            page = tl.load(pt_row + k_pos // PAGE_SIZE, mask=n_mask, other=0)
            kv_mask = n_mask[:, None] & d_mask
        else:
            page = tl.load(pt_row + k_pos // PAGE_SIZE)
            kv_mask = d_mask
        slot = page.to(tl.int64) * PAGE_SIZE + k_pos % PAGE_SIZE
        k = tl.load(k_base + slot[:, None] * stride_ks, mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            visible = k_pos[None, :] <= q_pos[:, None]
            if HAS_WINDOW:
                visible = visible & (k_pos[None, :] > q_pos[:, None] - window)
            qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m, tl.max(qk, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        v = tl.load(v_base + slot[:, None] * stride_vs, mask=kv_mask, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m = m_new
    return acc, l, m


@triton.jit
def _extend_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, page_table_ptr, seq_lens_ptr, extend_lens_ptr, extend_starts_ptr,
    stride_qt, stride_qh, stride_qd,
    stride_ks, stride_kh, stride_kd,
    stride_vs, stride_vh, stride_vd,
    stride_ot, stride_oh, stride_od,
    stride_pt,
    qk_scale, window,
    PAGE_SIZE: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    m0 = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    h = tl.program_id(1)
    b = tl.program_id(2)
    ext_len = tl.load(extend_lens_ptr + b)
    if m0 >= ext_len:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    row0 = tl.load(extend_starts_ptr + b)
    first_q = seq_len - ext_len + m0
    last_q = first_q + tl.minimum(BLOCK_M, ext_len - m0) - 1
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_mask = (m0 + offs_m) < ext_len
    q_pos = first_q + offs_m
    rows = (row0 + m0 + offs_m).to(tl.int64)
    io_mask = row_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(
        q_ptr + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :] * stride_qd, mask=io_mask, other=0.0
    )

    kvh = h // GROUP
    k_base = k_ptr + kvh * stride_kh + offs_d[None, :] * stride_kd
    v_base = v_ptr + kvh * stride_vh + offs_d[None, :] * stride_vd
    pt_row = page_table_ptr + b * stride_pt
    lo = tl.maximum(first_q - window + 1, 0) // BLOCK_N * BLOCK_N
    full_end = (first_q + 1) // BLOCK_N * BLOCK_N
    win_end = tl.minimum(tl.maximum(tl.cdiv(tl.maximum(last_q - window + 1, 0), BLOCK_N) * BLOCK_N, lo), full_end)

    m = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite floor: a row may see no key of a block
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if HAS_WINDOW:
        acc, l, m = _attend_keys(
            acc, l, m, q, q_pos, k_base, v_base, pt_row, lo, win_end, stride_ks, stride_vs, qk_scale, window,
            PAGE_SIZE, HEAD_DIM, BLOCK_D, BLOCK_N, True, HAS_WINDOW, DOT_PRECISION,
        )  # fmt: skip
    acc, l, m = _attend_keys(
        acc, l, m, q, q_pos, k_base, v_base, pt_row, win_end, full_end, stride_ks, stride_vs, qk_scale, window,
        PAGE_SIZE, HEAD_DIM, BLOCK_D, BLOCK_N, False, HAS_WINDOW, DOT_PRECISION,
    )  # fmt: skip
    acc, l, m = _attend_keys(
        acc, l, m, q, q_pos, k_base, v_base, pt_row, full_end, last_q + 1, stride_ks, stride_vs, qk_scale, window,
        PAGE_SIZE, HEAD_DIM, BLOCK_D, BLOCK_N, True, HAS_WINDOW, DOT_PRECISION,
    )  # fmt: skip
    o = acc / tl.where(l > 0.0, l, 1.0)[:, None]
    o_ptrs = o_ptr + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :] * stride_od
    tl.store(o_ptrs, o.to(o_ptr.dtype.element_ty), mask=io_mask)


def _default_tuning(head_dim: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages); float32 (tests only) halves the tiles to fit registers."""
    if interpreting():
        return 16, 16, 4, 1
    if dtype == torch.float32:
        return 64, 32, 4, 2
    if head_dim <= 64:
        return 128, 64, 4, 3
    if head_dim <= 128:  # H200 sweep (bench/RESULTS.md): 128x64, 4 warps, 3 stages within 1.5% of the best
        return 128, 64, 4, 3
    return 64, 32, 4, 2


def extend_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
    seq_lens: torch.Tensor, extend_lens: torch.Tensor, extend_starts: torch.Tensor, page_size: int,
    scaling: float, max_extend_len: int, sliding_window: int | None = None, out: torch.Tensor | None = None, *,
    block_m: int | None = None, block_n: int | None = None, num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """Causal attention of the new tokens of B sequences over their paged KV; returns ``out`` [T, H, D].

    q [T, H, D]; k_cache, v_cache [num_pages * page_size, Hkv, D] (q's dtype); page_table [B, max_pages],
    seq_lens, extend_lens, extend_starts [B] int32; ``max_extend_len`` (host int) >= max(extend_lens)
    sizes the grid. Rows of q not owned by any sequence are left untouched in ``out``.
    ``block_m``/``block_n``/``num_warps``/``num_stages`` override the tuned defaults.
    """
    check_paged_inputs(q, k_cache, v_cache, page_table, seq_lens, page_size, out)
    batch = seq_lens.shape[0]
    for name, t in (("extend_lens", extend_lens), ("extend_starts", extend_starts)):
        if t.dtype != torch.int32 or t.shape != (batch,) or t.device != q.device:
            raise TypeError(f"{name} must be int32 [{batch}] on {q.device}; got {t.dtype} {tuple(t.shape)} {t.device}")
    if max_extend_len < 0:
        raise ValueError(f"max_extend_len must be >= 0; got {max_extend_len}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 or None; got {sliding_window}")
    out = torch.empty_like(q) if out is None else out
    tokens, heads, head_dim = q.shape
    if batch == 0 or tokens == 0 or max_extend_len == 0:
        return out
    tuned = _default_tuning(head_dim, q.dtype)
    block_m, block_n = block_m or tuned[0], block_n or tuned[1]
    num_warps, num_stages = num_warps or tuned[2], num_stages or tuned[3]
    grid = (triton.cdiv(max_extend_len, block_m), heads, batch)
    _extend_kernel[grid](
        q, k_cache, v_cache, out, page_table, seq_lens, extend_lens, extend_starts,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(), page_table.stride(0),
        scaling * LOG2E, NO_WINDOW if sliding_window is None else sliding_window,
        PAGE_SIZE=page_size, GROUP=heads // k_cache.shape[1], HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_M=block_m, BLOCK_N=block_n,
        HAS_WINDOW=sliding_window is not None, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out


def extend_attention_ref(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
    seq_lens: torch.Tensor, extend_lens: torch.Tensor, extend_starts: torch.Tensor, page_size: int,
    scaling: float, sliding_window: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """Plain torch, one sequence at a time, float32 math; rows owned by no sequence come back as zeros."""
    group = q.shape[1] // k_cache.shape[1]
    out = torch.zeros_like(q)
    for b, (seq_len, n, row0) in enumerate(zip(seq_lens.tolist(), extend_lens.tolist(), extend_starts.tolist())):
        if n == 0:
            continue
        slots = gather_slots(page_table[b], seq_len, page_size)
        k = k_cache[slots].float().repeat_interleave(group, dim=1)  # [S, H, D]
        v = v_cache[slots].float().repeat_interleave(group, dim=1)
        q_pos = torch.arange(seq_len - n, seq_len, device=q.device)[:, None]
        k_pos = torch.arange(seq_len, device=q.device)[None, :]
        visible = k_pos <= q_pos
        if sliding_window is not None:
            visible &= k_pos > q_pos - sliding_window
        scores = torch.einsum("nhd,shd->hns", q[row0 : row0 + n].float(), k) * scaling
        probs = scores.masked_fill(~visible[None], float("-inf")).softmax(-1)
        out[row0 : row0 + n] = torch.einsum("hns,shd->nhd", probs, v).to(q.dtype)
    return out
