"""Pack (gather) and unpack (scatter) whole pages of the KV buffer for the KV transfer, one launch each.

Layout: ``kv_buffer [L, 2, P, page_size, H, D]`` contiguous; a packed chunk of n pages is
``[L, 2, n, page_size, H, D]`` contiguous, entry ``i`` being page ``page_idx[i]``. So both sides are
``L * 2`` planes of pages, and one page of one plane is ``E = page_size * H * D`` contiguous elements:
    chunk[plane, i, e]  <->  kv_buffer[plane, page_idx[i], e]

The copy is bitwise: tensors are reinterpreted as same-width integers (any dtype, fp8 included).
Grid: (n * blocks_per_page, L * 2); each program copies BLOCK contiguous elements of one page of one
plane (wide, coalesced, 16-byte aligned accesses when E is a multiple of 16 elements). int64 offsets.

Invariants (not checked: a host sync): every ``page_idx`` is in ``[0, P)``; for unpack, no id repeats.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@triton.jit
def _page_copy_kernel(
    kv_ptr,
    chunk_ptr,
    idx_ptr,
    num_pages,
    num_chunk_pages,
    page_elems,
    blocks_per_page,
    PACK: tl.constexpr,
    EVEN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    i = pid // blocks_per_page
    e = (pid % blocks_per_page) * BLOCK + tl.arange(0, BLOCK)
    plane = tl.program_id(1).to(tl.int64)
    page = tl.load(idx_ptr + i).to(tl.int64)
    kv_off = (plane * num_pages + page) * page_elems + e
    chunk_off = (plane * num_chunk_pages + i) * page_elems + e
    if PACK:
        src = kv_ptr + kv_off
        dst = chunk_ptr + chunk_off
    else:
        src = chunk_ptr + chunk_off
        dst = kv_ptr + kv_off
    if EVEN:
        tl.store(dst, tl.load(src))
    else:
        mask = e < page_elems
        tl.store(dst, tl.load(src, mask=mask), mask=mask)


def pack_pages(kv_buffer: torch.Tensor, page_idx: torch.Tensor, out: torch.Tensor) -> None:
    """Gather pages ``page_idx`` (all layers, K and V) of ``kv_buffer`` into the packed chunk ``out``."""
    _launch(kv_buffer, page_idx, out, pack=True)


def unpack_pages(kv_buffer: torch.Tensor, page_idx: torch.Tensor, staging: torch.Tensor) -> None:
    """Scatter the packed chunk ``staging`` into pages ``page_idx`` of ``kv_buffer`` (ids must not repeat)."""
    _launch(kv_buffer, page_idx, staging, pack=False)


def _launch(kv_buffer: torch.Tensor, page_idx: torch.Tensor, chunk: torch.Tensor, pack: bool) -> None:
    _check(kv_buffer, page_idx, chunk)
    num_layers, two, num_pages, page_size, heads, head_dim = kv_buffer.shape
    n = page_idx.shape[0]
    page_elems = page_size * heads * head_dim
    if n == 0 or page_elems == 0 or num_layers == 0:
        return
    bits = _BITS[kv_buffer.element_size()]
    block = min(4096, triton.next_power_of_2(page_elems))
    blocks_per_page = triton.cdiv(page_elems, block)
    grid = (n * blocks_per_page, num_layers * two)
    _page_copy_kernel[grid](
        kv_buffer.view(bits),
        chunk.view(bits),
        page_idx,
        num_pages,
        n,
        page_elems,
        blocks_per_page,
        PACK=pack,
        EVEN=page_elems % block == 0,
        BLOCK=block,
        num_warps=max(1, min(8, block // 256)),
    )


def _check(kv_buffer: torch.Tensor, page_idx: torch.Tensor, chunk: torch.Tensor) -> None:
    if kv_buffer.dim() != 6 or kv_buffer.shape[1] != 2 or not kv_buffer.is_contiguous():
        raise ValueError(
            "kv_buffer must be a contiguous [num_layers, 2, num_pages, page_size, num_kv_heads, "
            f"head_dim], got shape {tuple(kv_buffer.shape)} strides {kv_buffer.stride()}"
        )
    if kv_buffer.element_size() not in _BITS:
        raise TypeError(f"unsupported KV dtype {kv_buffer.dtype}")
    if page_idx.dtype not in (torch.int64, torch.int32) or page_idx.dim() != 1:
        raise TypeError(f"page_idx must be a 1-D int64 (or int32) tensor, got {page_idx.dtype} {tuple(page_idx.shape)}")
    if chunk.dtype != kv_buffer.dtype:
        raise TypeError(f"chunk is {chunk.dtype}; the KV buffer is {kv_buffer.dtype}")
    if len({kv_buffer.device, page_idx.device, chunk.device}) != 1:
        raise ValueError(
            f"kv_buffer ({kv_buffer.device}), page_idx ({page_idx.device}) and chunk "
            f"({chunk.device}) must be on one device"
        )
    if not chunk.is_contiguous():
        raise ValueError("chunk must be contiguous")
    expected = kv_buffer[:, :, :1].numel() * page_idx.shape[0]
    if chunk.numel() != expected:
        raise ValueError(f"chunk has {chunk.numel()} elements; {page_idx.shape[0]} pages need {expected}")


def pack_pages_ref(kv_buffer: torch.Tensor, page_idx: torch.Tensor, out: torch.Tensor) -> None:
    """torch gather: ``out = kv_buffer[:, :, page_idx]`` (in chunk shape)."""
    shape = (*kv_buffer.shape[:2], page_idx.shape[0], *kv_buffer.shape[3:])
    torch.index_select(kv_buffer, 2, page_idx.long(), out=out.view(shape))


def unpack_pages_ref(kv_buffer: torch.Tensor, page_idx: torch.Tensor, staging: torch.Tensor) -> None:
    """torch scatter: ``kv_buffer[:, :, page_idx] = staging`` (in chunk shape)."""
    shape = (*kv_buffer.shape[:2], page_idx.shape[0], *kv_buffer.shape[3:])
    kv_buffer.index_copy_(2, page_idx.long(), staging.view(shape))
