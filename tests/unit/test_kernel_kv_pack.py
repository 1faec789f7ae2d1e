"""pd_kernels.kv_pack: page gather/scatter vs torch index_select/index_copy_, bit for bit; transfer.pack on CUDA."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import DEVICES

from pd_kernels.kv_pack import pack_pages, pack_pages_ref, unpack_pages, unpack_pages_ref
from transfer import pack as transfer_pack


def kv(
    layers: int, pages: int, page_size: int, heads: int, head_dim: int, dtype: torch.dtype, device: str, seed: int = 0
) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(layers, 2, pages, page_size, heads, head_dim, generator=g).to(device=device, dtype=dtype)


def chunk_numel(buf: torch.Tensor, n: int) -> int:
    return buf[:, :, :1].numel() * n


def poisoned(buf: torch.Tensor, n: int) -> torch.Tensor:
    return torch.full((chunk_numel(buf, n),), float("nan"), dtype=buf.dtype, device=buf.device)


CASES = [  # layers, pages, page_size, heads, head_dim, page ids
    (2, 6, 1, 2, 64, [4, 1, 5]),
    (1, 5, 16, 1, 128, [3]),
    (2, 4, 64, 2, 64, [0, 3, 2]),
    (3, 9, 1, 3, 80, [8, 0, 2, 7, 5]),  # 240 elements per page: not a power of two (masked tail)
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layers,pages,page_size,heads,head_dim,ids", CASES)
def test_pack_then_unpack_matches_torch(
    device: str, dtype: torch.dtype, layers: int, pages: int, page_size: int, heads: int, head_dim: int, ids: list[int]
) -> None:
    src = kv(layers, pages, page_size, heads, head_dim, dtype, device)
    idx = torch.tensor(ids, device=device)
    packed = poisoned(src, len(ids))
    pack_pages(src, idx, packed)
    want = torch.empty_like(packed)
    pack_pages_ref(src, idx, want)
    assert torch.equal(packed, want)  # every element written (NaN poison), bit for bit

    dst_ids = torch.tensor(list(reversed(range(pages)))[: len(ids)], device=device)
    got, expected = (kv(layers, pages, page_size, heads, head_dim, dtype, device, seed=1) for _ in range(2))
    unpack_pages(got, dst_ids, packed)
    unpack_pages_ref(expected, dst_ids, packed)
    assert torch.equal(got, expected)  # target pages written, all others untouched


def test_bitwise_copy_of_nan_payloads_and_int32_ids() -> None:
    src = kv(1, 3, 4, 2, 8, torch.float16, "cpu")
    src.view(torch.int16)[0, 1, 2, 0, 0, :4] = torch.tensor([0x7E01, 0x7C01, -1, 0x7FFF], dtype=torch.int16)
    packed = poisoned(src, 2)
    pack_pages(src, torch.tensor([2, 0], dtype=torch.int32), packed)
    want = torch.empty_like(packed)
    pack_pages_ref(src, torch.tensor([2, 0]), want)
    assert torch.equal(packed.view(torch.int16), want.view(torch.int16))


def test_checks() -> None:
    src = kv(2, 4, 2, 1, 8, torch.float32, "cpu")
    idx = torch.tensor([1, 2])
    good = poisoned(src, 2)
    with pytest.raises(ValueError, match="elements"):
        pack_pages(src, idx[:1], good)
    with pytest.raises(TypeError, match="chunk is"):
        pack_pages(src, idx, good.double())
    with pytest.raises(TypeError, match="page_idx"):
        pack_pages(src, idx.float(), good)
    with pytest.raises(ValueError, match="contiguous"):
        unpack_pages(src, idx, torch.empty(2 * good.numel())[::2])
    with pytest.raises(ValueError, match="kv_buffer"):
        pack_pages(src.transpose(2, 3), idx, good)
    pack_pages(src, idx[:0], good[:0])  # empty chunk: no launch


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_llama8b_chunk_of_64_pages_on_cuda() -> None:
    """64 pages of Llama-3.1-8B KV (32 layers, 8 KV heads x 128, page 16): 128 MiB, through transfer.pack."""
    src = kv(32, 160, 16, 8, 128, torch.bfloat16, "cuda")
    g = torch.Generator().manual_seed(3)
    src_ids = torch.randperm(160, generator=g)[:64]
    dst_ids = torch.randperm(160, generator=g)[:64]
    staging = poisoned(src, 64)
    packed = transfer_pack.pack_pages(src, src_ids.cuda(), staging)  # the Triton path on CUDA
    assert packed.data_ptr() == staging.data_ptr()
    assert torch.equal(packed, src[:, :, src_ids.cuda()])
    dst = torch.zeros_like(src)
    transfer_pack.unpack_pages(dst, dst_ids.tolist(), staging)
    assert torch.equal(dst[:, :, dst_ids.cuda()], src[:, :, src_ids.cuda()])
    others = torch.ones(160, dtype=torch.bool)
    others[dst_ids] = False
    assert not dst[:, :, others.cuda()].any()
