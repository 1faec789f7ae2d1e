"""pd_kernels.extend_attention: causal paged prefill/extend vs a per-sequence torch reference.

Each batch mixes a fresh prefill, an extend after a cached prefix, decode rows (extend_len 1) and a
sequence with no new rows, over shuffled pages of size 1/16/64, GQA 1/2/4, head dims 64/80/128, with
and without sliding windows and several block shapes. ``out`` starts as NaN so an unwritten row fails.
On CUDA the same cases run in bf16 against a float32 reference, plus 2k-token prompts with Llama-8B heads.
"""

from __future__ import annotations

import pytest
import torch
from kernel_testing import DEVICES

from pd_kernels.extend_attention import extend_attention, extend_attention_ref

# (seq_len, extend_len): decode row, prefix + chunk, no rows, fresh prefill, decode row after a prefix
SEQS = [(1, 1), (40, 23), (17, 0), (33, 33), (5, 1)]


def paged_batch(
    seqs: list[tuple[int, int]],
    page_size: int,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: str,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random caches (null page 0 random too), shuffled non-zero pages, and the varlen index tensors."""
    g = torch.Generator().manual_seed(seed)
    per_seq = [-(-n // page_size) for n, _ in seqs]
    num_pages = sum(per_seq) + 3
    pages = (torch.randperm(num_pages - 1, generator=g) + 1).tolist()
    table = torch.zeros(len(seqs), max(per_seq) + 2, dtype=torch.int32)
    for i, n in enumerate(per_seq):
        table[i, :n] = torch.tensor(pages[:n], dtype=torch.int32)
        pages = pages[n:]
    ext = torch.tensor([e for _, e in seqs], dtype=torch.int32)
    batch = {
        "k_cache": torch.randn(num_pages * page_size, kv_heads, head_dim, generator=g).to(dtype),
        "v_cache": torch.randn(num_pages * page_size, kv_heads, head_dim, generator=g).to(dtype),
        "page_table": table,
        "seq_lens": torch.tensor([n for n, _ in seqs], dtype=torch.int32),
        "extend_lens": ext,
        "extend_starts": (torch.cumsum(ext, 0) - ext).to(torch.int32),
    }
    return {name: t.to(device) for name, t in batch.items()}


def run_case(
    device: str,
    seqs: list[tuple[int, int]],
    heads: int,
    kv_heads: int,
    head_dim: int,
    page_size: int,
    window: int | None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> None:
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    batch = paged_batch(seqs, page_size, kv_heads, head_dim, dtype, device)
    tokens = sum(e for _, e in seqs)
    q = torch.randn(tokens, heads, head_dim, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    scaling = head_dim**-0.5
    out = torch.full_like(q, float("nan"))
    got = extend_attention(
        q,
        **batch,
        page_size=page_size,
        scaling=scaling,
        max_extend_len=max(e for _, e in seqs),
        sliding_window=window,
        out=out,
        block_m=block_m,
        block_n=block_n,
    )
    assert got is out
    assert torch.isfinite(out).all(), "kernel left unwritten (NaN) or non-finite elements"
    ref_batch = {**batch, "k_cache": batch["k_cache"].float(), "v_cache": batch["v_cache"].float()}
    ref = extend_attention_ref(q.float(), **ref_batch, page_size=page_size, scaling=scaling, sliding_window=window)
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=2e-4, rtol=1e-4)
    else:
        rel = (out.float() - ref).norm() / ref.norm()
        assert rel < 1e-2, f"relative error {rel:.3e}"


# (heads, kv_heads, head_dim, page_size, window, block_m, block_n)
CASES = [
    (4, 1, 64, 16, None, None, None),  # GQA 4
    (2, 2, 128, 1, 9, None, None),  # H == Hkv, page size 1, window
    (4, 2, 64, 64, 20, 32, 16),  # one page spans several key blocks; window crosses blocks
    (2, 1, 80, 16, None, 16, 32),  # head dim not a power of two; key block wider than query block
    (2, 2, 64, 16, 1, None, None),  # window 1: each query sees only itself
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "h{}-kv{}-d{}-ps{}-w{}-bm{}-bn{}".format(*c))
def test_extend_matches_reference(device: str, case: tuple) -> None:
    run_case(device, SEQS, *case)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("window", [None, 300])
def test_extend_long_prompts(device: str, window: int | None) -> None:
    if device == "cpu":
        run_case(device, [(70, 70), (90, 20)], 2, 1, 64, 16, None if window is None else 30, block_m=32, block_n=32)
    else:
        seqs = [(2048, 2048), (2000, 1500), (700, 1), (1999, 1024)]  # prompts, chunks after prefixes, decode
        run_case(device, seqs, 32, 8, 128, 16, window)


def test_extend_without_rows_leaves_out_untouched() -> None:
    batch = paged_batch([(4, 0), (9, 0)], 16, 1, 64, torch.float32, "cpu")
    q = torch.randn(0, 2, 64)
    assert extend_attention(q, **batch, page_size=16, scaling=0.125, max_extend_len=0).shape == (0, 2, 64)
    spare = torch.full((3, 2, 64), 7.0)  # rows owned by no sequence stay as they were
    extend_attention(torch.randn(3, 2, 64), **batch, page_size=16, scaling=0.125, max_extend_len=0, out=spare)
    assert (spare == 7.0).all()


def test_extend_rejects_bad_inputs() -> None:
    batch = paged_batch([(5, 5), (9, 2)], 16, 2, 64, torch.float32, "cpu")
    q = torch.randn(7, 4, 64)
    with pytest.raises(TypeError, match="extend_lens"):
        extend_attention(
            q, **{**batch, "extend_lens": batch["extend_lens"].long()}, page_size=16, scaling=0.1, max_extend_len=5
        )
    with pytest.raises(TypeError, match="extend_starts"):
        extend_attention(
            q, **{**batch, "extend_starts": batch["extend_starts"][:1]}, page_size=16, scaling=0.1, max_extend_len=5
        )
    with pytest.raises(TypeError, match="share"):
        extend_attention(q.double(), **batch, page_size=16, scaling=0.1, max_extend_len=5)
    with pytest.raises(ValueError, match="sliding_window"):
        extend_attention(q, **batch, page_size=16, scaling=0.1, max_extend_len=5, sliding_window=0)
