"""Copy whole pages from one KV pool into another, one launch: the direct (pull) KV handoff on one host.

Both pools have the layout ``[L, 2, P, page_size, H, D]`` (contiguous, same dtype and page shape; the page
counts ``P`` may differ). Page ``src_idx[i]`` of every layer, K and V, of ``src`` goes to page ``dst_idx[i]``
of ``dst``. ``src`` may be another GPU's memory mapped into this context (CUDA IPC): the kernel runs on
``dst``'s device and reads the source over NVLink, so no staging buffer, pack or unpack is needed.
Such a pool has no torch tensor here (torch would put it on its home device); it is passed as a
``RawPages`` (a pointer with a dtype, which is all Triton needs).

Grid: (n * blocks_per_page, L * 2); each program copies BLOCK contiguous elements of one page of one plane.
The copy is bitwise (same-width integers). int64 offsets.
Invariants (not checked: a host sync): every ``src_idx`` lies in ``[0, P_src)``, every ``dst_idx`` in
``[0, P_dst)``, and no ``dst_idx`` repeats. Callers range-check ids on the host before they get here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass(frozen=True)
class RawPages:
    """A contiguous ``[L, 2, num_pages, page_size, H, D]`` pool known only by its device address."""

    ptr: int
    dtype: torch.dtype
    num_pages: int

    def data_ptr(self) -> int:  # what Triton reads from a pointer argument
        return self.ptr


@triton.jit
def _pages_to_pages_kernel(
    src_ptr, dst_ptr, src_idx_ptr, dst_idx_ptr, src_pages, dst_pages, page_elems, blocks_per_page,
    EVEN: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    i = pid // blocks_per_page
    e = (pid % blocks_per_page) * BLOCK + tl.arange(0, BLOCK)
    plane = tl.program_id(1).to(tl.int64)
    src_page = tl.load(src_idx_ptr + i).to(tl.int64)
    dst_page = tl.load(dst_idx_ptr + i).to(tl.int64)
    src = src_ptr + (plane * src_pages + src_page) * page_elems + e
    dst = dst_ptr + (plane * dst_pages + dst_page) * page_elems + e
    if EVEN:
        tl.store(dst, tl.load(src))
    else:
        mask = e < page_elems
        tl.store(dst, tl.load(src, mask=mask), mask=mask)


def copy_pages(src: torch.Tensor | RawPages, src_idx: torch.Tensor, dst: torch.Tensor, dst_idx: torch.Tensor,
               block: int = 4096) -> None:
    """``dst[:, :, dst_idx] = src[:, :, src_idx]`` on ``dst``'s device and current stream.

    ``src_idx`` and ``dst_idx``: 1-D int64/int32 tensors of equal length on ``dst``'s device.
    """
    src_pages = _check(src, src_idx, dst, dst_idx)
    num_layers, two, dst_pages, page_size, heads, head_dim = dst.shape
    n = dst_idx.shape[0]
    page_elems = page_size * heads * head_dim
    if n == 0 or page_elems == 0 or num_layers == 0:
        return
    bits = _BITS[dst.element_size()]
    block = min(block, triton.next_power_of_2(page_elems))
    blocks_per_page = triton.cdiv(page_elems, block)
    src_arg = src.view(bits) if isinstance(src, torch.Tensor) else RawPages(src.ptr, bits, src.num_pages)
    _pages_to_pages_kernel[(n * blocks_per_page, num_layers * two)](
        src_arg, dst.view(bits), src_idx, dst_idx, src_pages, dst_pages, page_elems, blocks_per_page,
        EVEN=page_elems % block == 0, BLOCK=block, num_warps=max(1, min(8, block // 256)),
    )


def _check(src: torch.Tensor | RawPages, src_idx: torch.Tensor, dst: torch.Tensor, dst_idx: torch.Tensor) -> int:
    if dst.dim() != 6 or dst.shape[1] != 2 or not dst.is_contiguous():
        raise ValueError("dst must be a contiguous [num_layers, 2, num_pages, page_size, num_kv_heads, head_dim], "
                         f"got shape {tuple(dst.shape)} strides {dst.stride()}")
    if dst.element_size() not in _BITS:
        raise TypeError(f"unsupported KV dtype {dst.dtype}")
    if isinstance(src, torch.Tensor):
        if src.dim() != 6 or src.shape[:2] != dst.shape[:2] or src.shape[3:] != dst.shape[3:] or not src.is_contiguous():
            raise ValueError(f"src shape {tuple(src.shape)} does not match dst {tuple(dst.shape)} "
                             "(all but the page count), or src is not contiguous")
        if src.device != dst.device:
            raise ValueError(f"src ({src.device}) must be on dst's device ({dst.device}); pass another GPU's pool "
                             "as RawPages")
        src_pages = src.shape[2]
    else:
        src_pages = src.num_pages
    if src.dtype != dst.dtype:
        raise TypeError(f"src is {src.dtype}; dst is {dst.dtype}")
    for name, idx in (("src_idx", src_idx), ("dst_idx", dst_idx)):
        if idx.dtype not in (torch.int64, torch.int32) or idx.dim() != 1:
            raise TypeError(f"{name} must be a 1-D int64 (or int32) tensor, got {idx.dtype} {tuple(idx.shape)}")
        if idx.device != dst.device:
            raise ValueError(f"{name} is on {idx.device}; dst is on {dst.device}")
    if src_idx.shape != dst_idx.shape:
        raise ValueError(f"src_idx has {src_idx.shape[0]} ids, dst_idx {dst_idx.shape[0]}")
    return int(src_pages)


def copy_pages_ref(src: torch.Tensor, src_idx: torch.Tensor, dst: torch.Tensor, dst_idx: torch.Tensor) -> None:
    """torch: ``dst[:, :, dst_idx] = src[:, :, src_idx]`` (a gather, then a scatter)."""
    dst.index_copy_(2, dst_idx.long(), src.index_select(2, src_idx.long()))
