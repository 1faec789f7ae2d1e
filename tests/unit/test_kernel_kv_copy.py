"""pd_kernels.kv_copy: page-to-page copy between two pools (different page counts) vs torch, bit for bit, through
copy_pages and through PageCopier fed by PageIdUploader (on CPU: Triton's interpreter, the copier's ordinary
launch); on 2 GPUs, the peer copies it exists for: a pool of the other GPU known by address only (RawPages),
read (pull) or written (push), the copier's direct launch included."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import DEVICES

from pd_kernels.kv_copy import (
    PageCopier,
    PageIdUploader,
    RawPages,
    _direct_launch_known,
    copy_pages,
    copy_pages_ref,
)


def pool(
    layers: int, pages: int, page_size: int, heads: int, head_dim: int, dtype: torch.dtype, device: str, seed: int
) -> torch.Tensor:
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
def test_copy_pages_matches_torch(
    device: str,
    dtype: torch.dtype,
    layers: int,
    src_pages: int,
    dst_pages: int,
    page_size: int,
    heads: int,
    head_dim: int,
    src_ids: list[int],
    dst_ids: list[int],
) -> None:
    src = pool(layers, src_pages, page_size, heads, head_dim, dtype, device, seed=0)
    got, want = (pool(layers, dst_pages, page_size, heads, head_dim, dtype, device, seed=1) for _ in range(2))
    s_idx = torch.tensor(src_ids, device=device)
    d_idx = torch.tensor(dst_ids, device=device, dtype=torch.int32)
    copy_pages(src, s_idx, got, d_idx, block=64)  # several programs per page
    copy_pages_ref(src, s_idx, want, d_idx)
    assert torch.equal(got, want)  # target pages written, all others untouched


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layers,src_pages,dst_pages,page_size,heads,head_dim,src_ids,dst_ids", CASES)
def test_copier_with_uploaded_ids_matches_torch(
    device: str,
    layers: int,
    src_pages: int,
    dst_pages: int,
    page_size: int,
    heads: int,
    head_dim: int,
    src_ids: list[int],
    dst_ids: list[int],
) -> None:
    src = pool(layers, src_pages, page_size, heads, head_dim, torch.bfloat16, device, seed=0)
    got, want = (pool(layers, dst_pages, page_size, heads, head_dim, torch.bfloat16, device, seed=1) for _ in range(2))
    copier = PageCopier(src, got, block=64)
    ids = PageIdUploader(device, capacity=16, slots=2)
    for dtype in (torch.int64, torch.int32):  # a second call, other id dtypes
        d_idx = torch.tensor(dst_ids, device=device, dtype=dtype)
        copier(ids.upload(src_ids), d_idx)
        copy_pages_ref(src, torch.tensor(src_ids, device=device), want, d_idx)
        assert torch.equal(got, want)
    both = ids.upload(src_ids + dst_ids)  # one upload for both lists: the second one's view starts unaligned
    copier(both[: len(src_ids)], both[len(src_ids) :])
    assert torch.equal(got, want)


def test_uploader_ring_reuses_rows_after_slots_uploads() -> None:
    ids = PageIdUploader("cpu", capacity=4, slots=2)
    a, b = ids.upload([1, 2, 3]), ids.upload([7])
    assert a.tolist() == [1, 2, 3] and b.tolist() == [7] and a.data_ptr() % 16 == 0
    assert ids.upload([]).numel() == 0  # the first row again
    c = ids.upload([5, 6, 7, 8])
    assert c.data_ptr() == b.data_ptr() and b.tolist() == [5]  # the invariant: a view lives `slots` uploads
    with pytest.raises(ValueError, match="at most 4"):
        ids.upload([0] * 5)


def test_copier_refuses_what_copy_pages_refuses() -> None:
    src = pool(2, 4, 4, 2, 8, torch.bfloat16, "cpu", 0)
    dst = pool(2, 4, 4, 2, 8, torch.bfloat16, "cpu", 1)
    one = torch.tensor([1])
    with pytest.raises(ValueError, match="does not match"):
        PageCopier(pool(3, 4, 4, 2, 8, torch.bfloat16, "cpu", 0), dst)
    with pytest.raises(TypeError, match="both RawPages"):
        PageCopier(RawPages(src.data_ptr(), src.dtype, 4), RawPages(dst.data_ptr(), dst.dtype, 4))
    with pytest.raises(TypeError, match="float32"):
        PageCopier(src, RawPages(dst.data_ptr(), torch.float32, 4))
    copier = PageCopier(src, dst)
    with pytest.raises(ValueError, match="1 ids, dst_idx 2"):
        copier(one, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="1-D int64"):
        copier(one.float(), one)
    with pytest.raises(TypeError, match="contiguous"):
        copier(torch.tensor([0, 1, 2, 3])[::2], torch.tensor([0, 1]))
    assert not _direct_launch_known()  # the interpreter has no compiled kernel: the copier's ordinary launch ran


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
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2 or not torch.cuda.can_device_access_peer(1, 0),
    reason="needs 2 GPUs with peer access",
)
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


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2 or not torch.cuda.can_device_access_peer(0, 1),
    reason="needs 2 GPUs with peer access",
)
def test_copier_pushes_into_and_pulls_from_another_gpu_by_address() -> None:
    assert _direct_launch_known(), "this Triton's launch is not the one PageCopier knows: it runs the slow launch"
    for a, b in ((0, 1), (1, 0)):  # cross-device copies make torch enable peer access both ways
        torch.empty(1, device=f"cuda:{a}").copy_(torch.empty(1, device=f"cuda:{b}"))
    p_kv = pool(4, 64, 16, 8, 128, torch.bfloat16, "cuda:0", seed=0)  # P's pool
    d_kv = pool(4, 32, 16, 8, 128, torch.bfloat16, "cuda:1", seed=1)  # D's pool, mapped by P by address
    want = d_kv.cpu()
    push = PageCopier(p_kv, RawPages(d_kv.data_ptr(), d_kv.dtype, 32))
    stream = torch.cuda.Stream(0)
    for dtype in (torch.int64, torch.int32):
        ids = PageIdUploader("cuda:0", capacity=64, slots=2, dtype=dtype)  # the third upload reuses a row
        for n in (20, 7, 5):  # 7 and 5: D's ids start unaligned in the row
            src_ids, dst_ids = torch.randperm(64)[:n].tolist(), torch.randperm(32)[:n].tolist()
            if n == 5:  # the current stream, entered
                with torch.cuda.stream(stream):
                    both = ids.upload(src_ids + dst_ids)
                    push(both[:n], both[n:])
            else:
                with torch.cuda.device(1):  # GPU 1 current: both make GPU 0 current
                    both = ids.upload(src_ids + dst_ids, stream)
                    push(both[:n], both[n:], stream)
            stream.synchronize()
            copy_pages_ref(p_kv.cpu(), torch.tensor(src_ids), want, torch.tensor(dst_ids))
            assert torch.equal(d_kv.cpu(), want)
    assert push._direct and all(push._direct.values())  # every call took the direct launch
    back = pool(4, 64, 16, 8, 128, torch.bfloat16, "cuda:0", seed=2)  # pull: P's copier reads D's pool
    want = back.cpu()
    pull = PageCopier(RawPages(d_kv.data_ptr(), d_kv.dtype, 32), back)
    pull(torch.arange(32, device="cuda:0"), torch.arange(32, 64, device="cuda:0"))
    torch.cuda.synchronize(0)
    copy_pages_ref(d_kv.cpu(), torch.arange(32), want, torch.arange(32, 64))
    assert torch.equal(back.cpu(), want)
