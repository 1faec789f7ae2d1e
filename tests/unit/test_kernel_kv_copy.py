"""kernels.kv_copy: page-to-page copy between two pools (different page counts) vs torch, bit for bit;
on 2 GPUs, the peer read it exists for: a pool on GPU 0 mapped by address only (RawPages), copied on GPU 1."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import DEVICES

from kernels.kv_copy import RawPages, copy_pages, copy_pages_ref


def pool(layers: int, pages: int, page_size: int, heads: int, head_dim: int, dtype: torch.dtype, device: str,
         seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(layers, 2, pages, page_size, heads, head_dim, generator=g).to(device=device, dtype=dtype)


CASES = [  # layers, src pages, dst pages, page_size, heads, head_dim, src ids, dst ids
    (2, 6, 9, 1, 2, 64, [4, 1, 5], [0, 8, 3]),
    (1, 5, 3, 16, 1, 128, [3, 3], [2, 0]),  # a source page may repeat (only destinations may not)
    (3, 9, 9, 1, 3, 80, [8, 0, 2, 7, 5], [1, 2, 3, 4, 5]),  # 240 elements per page: masked tail
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layers,src_pages,dst_pages,page_size,heads,head_dim,src_ids,dst_ids", CASES)
def test_copy_pages_matches_torch(device: str, dtype: torch.dtype, layers: int, src_pages: int, dst_pages: int,
                                  page_size: int, heads: int, head_dim: int, src_ids: list[int],
                                  dst_ids: list[int]) -> None:
    src = pool(layers, src_pages, page_size, heads, head_dim, dtype, device, seed=0)
    got, want = (pool(layers, dst_pages, page_size, heads, head_dim, dtype, device, seed=1) for _ in range(2))
    s_idx = torch.tensor(src_ids, device=device)
    d_idx = torch.tensor(dst_ids, device=device, dtype=torch.int32)
    copy_pages(src, s_idx, got, d_idx, block=64)  # several programs per page
    copy_pages_ref(src, s_idx, want, d_idx)
    assert torch.equal(got, want)  # target pages written, all others untouched


def test_mismatched_pools_and_ids_are_refused() -> None:
    src = pool(2, 4, 4, 2, 8, torch.bfloat16, "cpu", 0)
    dst = pool(2, 4, 4, 2, 8, torch.bfloat16, "cpu", 1)
    one = torch.tensor([1])
    with pytest.raises(ValueError, match="does not match"):
        copy_pages(pool(3, 4, 4, 2, 8, torch.bfloat16, "cpu", 0), one, dst, one)
    with pytest.raises(TypeError, match="float32"):
        copy_pages(src.float(), one, dst, one)
    with pytest.raises(ValueError, match="1 ids, dst_idx 2"):
        copy_pages(src, one, dst, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="1-D int64"):
        copy_pages(src, one.float(), dst, one)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2
                    or not torch.cuda.can_device_access_peer(1, 0), reason="needs 2 GPUs with peer access")
def test_peer_read_from_another_gpu_by_address() -> None:
    src = pool(4, 64, 16, 8, 128, torch.bfloat16, "cuda:0", seed=0)
    dst = pool(4, 32, 16, 8, 128, torch.bfloat16, "cuda:1", seed=1)
    want = dst.cpu()
    for a, b in ((0, 1), (1, 0)):  # cross-device copies make torch enable peer access (needed from GPU 1's side)
        torch.empty(1, device=f"cuda:{a}").copy_(torch.empty(1, device=f"cuda:{b}"))
    src_ids = torch.randperm(64)[:20]
    dst_ids = torch.randperm(32)[:20]
    with torch.cuda.device(1):
        copy_pages(RawPages(src.data_ptr(), src.dtype, 64), src_ids.cuda(1), dst, dst_ids.cuda(1))
    torch.cuda.synchronize(1)
    copy_pages_ref(src.cpu(), src_ids, want, dst_ids)
    assert torch.equal(dst.cpu(), want)
