"""pack_pages / unpack_pages: one gather, one scatter, exact round trip, shape and dtype checks; staging slots."""

from __future__ import annotations

import asyncio

import pytest
import torch

from transfer.pack import (
    chunk_nbytes,
    chunk_shape,
    pack_pages,
    page_nbytes,
    unpack_pages,
)
from transfer.staging import StagingPool


def kv(
    layers: int = 3,
    pages: int = 10,
    page_size: int = 4,
    heads: int = 2,
    head_dim: int = 8,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(layers, 2, pages, page_size, heads, head_dim, generator=g).to(dtype)


@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_round_trip_into_other_page_ids(page_size: int, dtype: torch.dtype) -> None:
    src = kv(page_size=page_size, dtype=dtype)
    dst = torch.zeros_like(src)
    src_ids, dst_ids = [7, 2, 9, 0], [1, 8, 3, 5]  # out of order, different on each side
    staging = torch.empty(chunk_nbytes(src, 4) // src.element_size(), dtype=dtype)
    packed = pack_pages(src, src_ids, staging)
    assert packed.shape == chunk_shape(src, 4) and packed.data_ptr() == staging.data_ptr()
    for i, page in enumerate(src_ids):  # layout: [layers, 2, i, page, heads, dim] is page src_ids[i]
        assert torch.equal(packed[:, :, i], src[:, :, page])
    unpack_pages(dst, torch.tensor(dst_ids), staging)
    assert torch.equal(dst[:, :, dst_ids], src[:, :, src_ids])
    others = [p for p in range(dst.shape[2]) if p not in dst_ids]
    assert not dst[:, :, others].any()


def test_sizes() -> None:
    t = kv(layers=32, pages=2, page_size=16, heads=8, head_dim=128)
    assert page_nbytes(t) == 32 * 2 * 16 * 8 * 128 * 2  # Llama-3.1-8B: 128 KiB per token x 16
    assert chunk_nbytes(t, 3) == 3 * page_nbytes(t)


def test_empty_chunk() -> None:
    t = kv()
    out = torch.empty(0, dtype=t.dtype)
    assert pack_pages(t, [], out).numel() == 0
    unpack_pages(t, [], out)


def test_checks() -> None:
    t = kv()
    good = torch.empty(chunk_nbytes(t, 2) // t.element_size(), dtype=t.dtype)
    with pytest.raises(ValueError, match="elements"):
        pack_pages(t, [1, 2, 3], good)
    with pytest.raises(TypeError, match="float32"):
        pack_pages(t, [1, 2], good.float())
    with pytest.raises(IndexError):
        pack_pages(t, [1, 10], good)
    with pytest.raises(IndexError):
        unpack_pages(t, torch.tensor([-1, 2]), good)
    with pytest.raises(ValueError, match="contiguous"):
        pack_pages(t, [1, 2], torch.empty(2 * good.numel(), dtype=t.dtype)[::2])
    with pytest.raises(ValueError, match="num_layers"):
        pack_pages(t[0], [1, 2], good)


def test_staging_slots_are_reused_and_grow() -> None:
    async def run() -> None:
        pool = StagingPool(2, torch.device("cpu"))
        a = await pool.acquire(100)
        b = await pool.acquire(5 << 20)
        assert a.capacity >= 100 and b.capacity >= 5 << 20
        third = asyncio.ensure_future(pool.acquire(10))
        await asyncio.sleep(0.01)
        assert not third.done()  # both slots busy: waits
        pool.release(b)
        c = await asyncio.wait_for(third, 1)
        assert c is b  # reused, not reallocated
        pool.release(a)
        ptr = c.buf.data_ptr()
        pool.release(c)
        d = await pool.acquire(2 << 20)  # a holds 1 MiB (sizes round up to MiB), c 5 MiB
        assert d.buf.data_ptr() == ptr  # the smallest slot that fits
        assert d.view(2 << 20, torch.bfloat16).numel() == 1 << 20
        e = await pool.acquire(3 << 20)  # only a is free, too small: it grows
        assert e is a and a.capacity == 3 << 20

    asyncio.run(run())
