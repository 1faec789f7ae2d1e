"""Pack a chunk's pages (all layers, K and V) into one contiguous staging tensor, and back: one gather, one scatter.

KV layout: ``kv_buffer[num_layers, 2 (K, V), num_pages, page_size, num_kv_heads, head_dim]``.
A packed chunk of ``n`` pages is ``[num_layers, 2, n, page_size, num_kv_heads, head_dim]``, contiguous, in
the order of ``page_ids``: entry ``i`` of the chunk is page ``page_ids[i]``. P packs its page ids, D
unpacks into its own page ids of the same prompt positions, so the two sides' ids never need to match.
On CUDA the copies are one launch of the Triton kernel in ``pd_kernels.kv_pack`` (near HBM copy bandwidth);
on CPU they are torch's ``index_select`` / ``index_copy_``. Page ids of a CUDA tensor are not range-checked
(that would sync with the device): they must lie in ``[0, num_pages)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

PageIds = Sequence[int] | torch.Tensor


def chunk_shape(kv_buffer: torch.Tensor, num_pages: int) -> tuple[int, ...]:
    _check_kv(kv_buffer)
    num_layers, two, _, page_size, heads, head_dim = kv_buffer.shape
    return (num_layers, two, num_pages, page_size, heads, head_dim)


def chunk_nbytes(kv_buffer: torch.Tensor, num_pages: int) -> int:
    """Bytes of ``num_pages`` packed pages."""
    return page_nbytes(kv_buffer) * num_pages


def page_nbytes(kv_buffer: torch.Tensor) -> int:
    """Bytes of one page across all layers, K and V."""
    _check_kv(kv_buffer)
    num_layers, two, _, page_size, heads, head_dim = kv_buffer.shape
    return num_layers * two * page_size * heads * head_dim * kv_buffer.element_size()


def page_index(kv_buffer: torch.Tensor, page_ids: PageIds) -> torch.Tensor:
    """``page_ids`` as an int64 tensor on the KV device, range-checked when that costs no device sync.

    Host ids go to a CUDA device through pinned memory, ``non_blocking`` on the current stream: the call
    never waits for the stream (which may still be behind a forward), unlike a pageable copy.
    """
    num_pages = kv_buffer.shape[2]
    if isinstance(page_ids, torch.Tensor):
        if page_ids.dim() != 1:
            raise ValueError(f"page_ids must be 1-D, got shape {tuple(page_ids.shape)}")
        idx = page_ids.to(dtype=torch.int64)
        if idx.device.type == "cpu" and idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= num_pages):
            raise IndexError(f"page id out of range [0, {num_pages})")
    else:
        ids = list(page_ids)
        if ids and (min(ids) < 0 or max(ids) >= num_pages):
            raise IndexError(f"page id out of range [0, {num_pages}): min {min(ids)}, max {max(ids)}")
        idx = torch.tensor(ids, dtype=torch.int64)
    if idx.device == kv_buffer.device:
        return idx
    if kv_buffer.is_cuda and idx.device.type == "cpu":
        return idx.pin_memory().to(kv_buffer.device, non_blocking=True)
    return idx.to(kv_buffer.device)


def pack_pages(kv_buffer: torch.Tensor, page_ids: PageIds, out: torch.Tensor) -> torch.Tensor:
    """Gather pages ``page_ids`` of every layer (K and V) into ``out``; return ``out`` in chunk shape.

    ``out``: contiguous, the KV dtype and device, exactly ``chunk_nbytes(kv_buffer, len(page_ids))`` bytes.
    """
    idx = page_index(kv_buffer, page_ids)
    view = _chunk_view(kv_buffer, idx.numel(), out, "out")
    if kv_buffer.is_cuda and kv_buffer.is_contiguous():
        from pd_kernels.kv_pack import (
            pack_pages as triton_pack_pages,  # imports triton only when used
        )

        triton_pack_pages(kv_buffer, idx, view)
    else:
        torch.index_select(kv_buffer, 2, idx, out=view)
    return view


def unpack_pages(kv_buffer: torch.Tensor, page_ids: PageIds, staging: torch.Tensor) -> None:
    """Scatter a packed chunk (``pack_pages`` layout) into pages ``page_ids`` of ``kv_buffer``.

    ``page_ids`` must not repeat (the winner of a duplicate is undefined).
    """
    idx = page_index(kv_buffer, page_ids)
    view = _chunk_view(kv_buffer, idx.numel(), staging, "staging")
    if kv_buffer.is_cuda and kv_buffer.is_contiguous():
        from pd_kernels.kv_pack import unpack_pages as triton_unpack_pages

        triton_unpack_pages(kv_buffer, idx, view)
    else:
        kv_buffer.index_copy_(2, idx, view)


def wait_ready(ready_event: object) -> None:
    """Block until the forward that wrote the pages finished (``torch.cuda.Event``; ``threading.Event`` works too)."""
    if ready_event is None:
        return
    if hasattr(ready_event, "synchronize"):
        ready_event.synchronize()
    elif hasattr(ready_event, "wait"):
        ready_event.wait()


def _chunk_view(kv_buffer: torch.Tensor, num_pages: int, buf: torch.Tensor, name: str) -> torch.Tensor:
    shape = chunk_shape(kv_buffer, num_pages)
    if buf.dtype != kv_buffer.dtype or buf.device != kv_buffer.device:
        raise TypeError(
            f"{name} is {buf.dtype} on {buf.device}; the KV buffer is {kv_buffer.dtype} on {kv_buffer.device}"
        )
    if not buf.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    expected = 1
    for d in shape:
        expected *= d
    if buf.numel() != expected:
        raise ValueError(f"{name} has {buf.numel()} elements; {num_pages} pages need {expected} (shape {shape})")
    return buf.view(shape)


def _check_kv(kv_buffer: torch.Tensor) -> None:
    if kv_buffer.dim() != 6 or kv_buffer.shape[1] != 2:
        raise ValueError(
            "kv_buffer must be [num_layers, 2, num_pages, page_size, num_kv_heads, head_dim], "
            f"got shape {tuple(kv_buffer.shape)}"
        )
