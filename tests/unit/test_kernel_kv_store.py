"""pd_kernels.kv_store: store_kv vs ``cache[slots] = k`` on KVCache slot views, strided k/v, dtype casts."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import DEVICES

from pd_kernels.kv_store import store_kv, store_kv_ref
from sglang_pd.mem.kv_cache import KVCache, KVCacheShape


def random_cache(shape: KVCacheShape, dtype: torch.dtype, device: str, seed: int = 0) -> KVCache:
    cache = KVCache(shape, dtype, device)
    g = torch.Generator().manual_seed(seed)
    cache.buffer.copy_(torch.randn(cache.buffer.shape, generator=g))  # never zeros: a stray write shows
    return cache


def qkv_views(
    tokens: int, heads: int, kv_heads: int, head_dim: int, device: str, dtype: torch.dtype, seed: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v [T, Hkv, D] views of a fused qkv [T, (H + 2 Hkv) D]."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g).to(device=device, dtype=dtype)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    v = qkv[:, (heads + kv_heads) * head_dim :].view(tokens, kv_heads, head_dim)
    return k, v


def random_slots(tokens: int, num_slots: int, device: str, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(num_slots, generator=g)[:tokens].to(device)  # distinct, out of order


# float32 -> bfloat16 casts are tested on CUDA only: the CPU interpreter truncates instead of rounding.
CASES = [  # tokens, heads, kv_heads, head_dim, page_size, (input dtype, cache dtype)
    (1, 4, 2, 64, 1, (torch.float32, torch.float32)),
    (3, 3, 1, 128, 16, (torch.float32, torch.float16)),
    (17, 8, 2, 64, 64, (torch.bfloat16, torch.bfloat16)),
    (5, 2, 2, 80, 16, (torch.float16, torch.float32)),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tokens,heads,kv_heads,head_dim,page_size,dtypes", CASES)
def test_matches_index_put(
    device: str,
    tokens: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    page_size: int,
    dtypes: tuple[torch.dtype, torch.dtype],
) -> None:
    in_dtype, cache_dtype = dtypes
    shape = KVCacheShape(num_layers=2, num_pages=5, page_size=page_size, num_kv_heads=kv_heads, head_dim=head_dim)
    num_slots = shape.num_pages * page_size
    tokens = min(tokens, num_slots)
    got, want = (random_cache(shape, cache_dtype, device) for _ in range(2))
    k, v = qkv_views(tokens, heads, kv_heads, head_dim, device, in_dtype)
    slots = random_slots(tokens, num_slots, device)
    store_kv(got.k_slots(1), got.v_slots(1), slots, k, v)
    store_kv_ref(want.k_slots(1), want.v_slots(1), slots, k, v)
    assert torch.equal(got.buffer, want.buffer)  # written slots equal, every other element untouched


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float32])
def test_large_bf16_cache_on_cuda(in_dtype: torch.dtype) -> None:
    shape = KVCacheShape(num_layers=2, num_pages=600, page_size=16, num_kv_heads=8, head_dim=128)
    got, want = (random_cache(shape, torch.bfloat16, "cuda") for _ in range(2))
    k, v = qkv_views(4096, 32, 8, 128, "cuda", in_dtype)
    slots = random_slots(4096, 600 * 16, "cuda")
    store_kv(got.k_slots(0), got.v_slots(0), slots, k, v)
    store_kv_ref(want.k_slots(0), want.v_slots(0), slots, k, v)
    assert torch.equal(got.buffer, want.buffer)


def test_checks() -> None:
    cache = random_cache(KVCacheShape(1, 3, 4, 2, 8), torch.float32, "cpu")
    kc, vc = cache.k_slots(0), cache.v_slots(0)
    k = v = torch.randn(3, 2, 8)
    slots = torch.tensor([0, 5, 7])
    with pytest.raises(TypeError, match="slots"):
        store_kv(kc, vc, slots.float(), k, v)
    with pytest.raises(TypeError, match="k must"):
        store_kv(kc, vc, slots, k.long(), v)
    with pytest.raises(ValueError, match="slots"):
        store_kv(kc, vc, slots[:2], k, v)
    with pytest.raises(ValueError, match="do not hold"):
        store_kv(kc, vc, slots, torch.randn(3, 1, 8), torch.randn(3, 1, 8))
    with pytest.raises(ValueError, match="unit last-dim"):
        store_kv(kc, vc, slots, torch.randn(3, 2, 16)[..., ::2], v)
    store_kv(kc, vc, slots[:0], k[:0], v[:0])  # nothing to store: no launch
