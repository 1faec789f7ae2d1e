"""pd_kernels.decode_attention: split-KV paged decode vs a per-sequence torch reference.

Awkward shapes: odd and mixed lengths, GQA 1/3/4 and H == Hkv, head dims 64/80/128, page sizes 1/16/64
with shuffled pages, sliding windows, more splits than key blocks. ``out`` starts as NaN so a row the
kernel never wrote fails. On CUDA the same cases run in bf16 against a float32 reference, plus a larger
batch and a CUDA-graph replay after seq_lens change.
"""

from __future__ import annotations

import pytest
import torch
from kernel_testing import DEVICES

from pd_kernels.decode_attention import decode_attention, decode_attention_ref, default_num_kv_splits

LENS = [1, 2, 17, 33, 70]


def paged_kv(
    lens: list[int], page_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: str, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random k/v caches [slots, Hkv, D] (null page 0 random too), page table with shuffled non-zero pages."""
    g = torch.Generator().manual_seed(seed)
    per_seq = [-(-n // page_size) for n in lens]
    num_pages = sum(per_seq) + 3
    k = torch.randn(num_pages * page_size, kv_heads, head_dim, generator=g)
    v = torch.randn(num_pages * page_size, kv_heads, head_dim, generator=g)
    pages = (torch.randperm(num_pages - 1, generator=g) + 1).tolist()
    table = torch.zeros(len(lens), max(per_seq) + 2, dtype=torch.int32)
    for i, n in enumerate(per_seq):
        table[i, :n] = torch.tensor(pages[:n], dtype=torch.int32)
        pages = pages[n:]
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    return k.to(device, dtype), v.to(device, dtype), table.to(device), seq_lens.to(device)


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert torch.isfinite(out).all(), "kernel left unwritten (NaN) or non-finite elements"
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=2e-4, rtol=1e-4)
    else:
        rel = (out.float() - ref).norm() / ref.norm()
        assert rel < 1e-2, f"relative error {rel:.3e}"


def run_case(
    device: str,
    lens: list[int],
    heads: int,
    kv_heads: int,
    head_dim: int,
    page_size: int,
    window: int | None,
    splits: int | None,
    block_n: int | None = None,
) -> None:
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    k, v, table, seq_lens = paged_kv(lens, page_size, kv_heads, head_dim, dtype, device)
    q = torch.randn(len(lens), heads, head_dim, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    scaling = head_dim**-0.5
    out = torch.full_like(q, float("nan"))
    got = decode_attention(q, k, v, table, seq_lens, page_size, scaling, window, splits, out, block_n=block_n)
    assert got is out
    ref = decode_attention_ref(q.float(), k.float(), v.float(), table, seq_lens, page_size, scaling, window)
    assert_close(out, ref, dtype)


# (heads, kv_heads, head_dim, page_size, window, splits, block_n)
CASES = [
    (4, 1, 64, 16, None, 1, None),  # GQA 4, one split: stage 1 writes out directly
    (4, 1, 64, 16, 7, 3, 16),  # window inside the first page
    (2, 2, 128, 1, None, 4, 16),  # H == Hkv, page size 1
    (8, 2, 64, 64, 20, 2, 16),  # one page spans several blocks
    (4, 2, 64, 16, None, 16, 16),  # more splits than blocks: empty splits merge as lse = -inf
    (6, 2, 80, 16, 40, 2, None),  # GQA 3, head dim not a power of two
    (2, 1, 64, 16, None, None, None),  # default split heuristic
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "h{}-kv{}-d{}-ps{}-w{}-s{}-bn{}".format(*c))
def test_decode_matches_reference(device: str, case: tuple) -> None:
    run_case(device, LENS, *case)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("window", [None, 256])
def test_decode_larger_batch(device: str, window: int | None) -> None:
    if device == "cpu":
        run_case(device, [130, 3, 64], 4, 2, 64, 16, window, 3, block_n=32)
    else:
        lens = torch.randint(1, 2001, (8,), generator=torch.Generator().manual_seed(2)).tolist()
        run_case(device, lens, 32, 8, 128, 16, window, None)


@pytest.mark.parametrize("splits", [1, 3])
def test_decode_padding_rows_give_zeros(splits: int) -> None:
    """seq_len 0 marks a padded batch row (CUDA-graph batches): no keys, finite zero output."""
    k, v, table, seq_lens = paged_kv([1, 20], 16, 1, 64, torch.float32, "cpu")
    seq_lens[0] = 0
    q = torch.randn(2, 2, 64)
    out = torch.full_like(q, float("nan"))
    decode_attention(q, k, v, table, seq_lens, 16, 0.125, num_kv_splits=splits, out=out)
    assert (out[0] == 0).all()
    ref = decode_attention_ref(q, k, v, table, seq_lens, 16, 0.125)
    torch.testing.assert_close(out[1], ref[1], atol=2e-4, rtol=1e-4)


def test_default_num_kv_splits() -> None:
    assert default_num_kv_splits(64, 8, 4096, 132) == 2
    assert default_num_kv_splits(1, 8, 4096, 132) == 32  # small batch: fill the SMs
    assert default_num_kv_splits(1, 8, 200, 132) == 2  # no split shorter than min_split_tokens
    assert default_num_kv_splits(512, 8, 100000, 132) == 1
    assert default_num_kv_splits(1, 1, 1, 132) == 1


def test_decode_rejects_bad_inputs() -> None:
    k, v, table, seq_lens = paged_kv([5, 9], 16, 2, 64, torch.float32, "cpu")
    q = torch.randn(2, 4, 64)
    with pytest.raises(TypeError, match="int32"):
        decode_attention(q, k, v, table.long(), seq_lens, 16, 0.125)
    with pytest.raises(TypeError, match="share"):
        decode_attention(q, k.half(), v.half(), table, seq_lens, 16, 0.125)
    with pytest.raises(ValueError, match="heads"):
        decode_attention(torch.randn(2, 3, 64), k, v, table, seq_lens, 16, 0.125)
    with pytest.raises(ValueError, match="head_dim"):
        big = torch.randn(k.shape[0], 2, 512)
        decode_attention(torch.randn(2, 4, 512), big, big, table, seq_lens, 16, 0.125)
    with pytest.raises(ValueError, match="batch"):
        decode_attention(q[:1], k, v, table, seq_lens, 16, 0.125)
    with pytest.raises(ValueError, match="page_size"):
        decode_attention(q, k, v, table, seq_lens, 7, 0.125)
    with pytest.raises(ValueError, match="out"):
        decode_attention(q, k, v, table, seq_lens, 16, 0.125, out=torch.empty(2, 4, 32))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_decode_cuda_graph_replay() -> None:
    """Captured once with fixed shapes; replays stay correct after seq_lens and the page table change."""
    heads, kv_heads, head_dim, page_size = 32, 8, 128, 16
    # Every row gets pages for the longest length, so lengths and rows can be shuffled between replays.
    k, v, table, seq_lens = paged_kv([901] * 4, page_size, kv_heads, head_dim, torch.bfloat16, "cuda")
    seq_lens.copy_(torch.tensor([900, 40, 1, 300], dtype=torch.int32))
    q = torch.randn(4, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(q)
    args = (q, k, v, table, seq_lens, page_size, head_dim**-0.5)
    decode_attention(*args, num_kv_splits=8, out=out)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode_attention(*args, num_kv_splits=8, out=out)
    for lens in ([900, 40, 1, 300], [17, 901, 2, 64], [1, 1, 1, 1]):
        seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        table.copy_(table[torch.randperm(4, device="cuda")])
        q.normal_()
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref = decode_attention_ref(q.float(), k.float(), v.float(), table, seq_lens, page_size, head_dim**-0.5)
        assert_close(out, ref, torch.bfloat16)
