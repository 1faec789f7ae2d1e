"""Torch attention backend: padded batch path and per-sequence path against a naive dense reference."""

from __future__ import annotations

import math

import pytest
import torch

from sglang_pd.attention import torch_backend
from sglang_pd.attention.base import AttentionLayerSpec
from sglang_pd.attention.torch_backend import TorchAttentionBackend
from sglang_pd.forward_batch_builder import build_forward_batch
from sglang_pd.mem.kv_cache import KVCache, KVCacheShape
from sglang_pd.scheduler.batch import BatchPlan, PlanItem

H, HKV, D = 4, 2, 8


def _naive(q_rows, keys, values, q_pos, window):
    """q_rows [n, H, D] at positions q_pos; keys/values [S, HKV, D] of positions 0..S-1."""
    g = H // HKV
    k = keys.repeat_interleave(g, dim=1)
    v = values.repeat_interleave(g, dim=1)
    scores = torch.einsum("nhd,shd->hns", q_rows, k) / math.sqrt(D)
    s = torch.arange(keys.shape[0])
    allowed = s[None, :] <= torch.tensor(q_pos)[:, None]
    if window is not None:
        allowed &= s[None, :] > torch.tensor(q_pos)[:, None] - window
    scores = scores.masked_fill(~allowed[None], float("-inf"))
    return torch.einsum("hns,shd->nhd", scores.softmax(-1), v)


@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("page_size", [1, 4])
def test_backend_matches_naive(padded, window, page_size, monkeypatch):
    monkeypatch.setattr(torch_backend, "PADDED_LIMIT", 1 << 30 if padded else 0)
    torch.manual_seed(0)
    cache = KVCache(KVCacheShape(1, 64, page_size, HKV, D), torch.float32, "cpu")
    backend = TorchAttentionBackend(cache)
    # (already cached positions, new tokens): a decode, a fresh prefill, a chunk after a prefix
    seqs = [(9, 1), (0, 7), (5, 6)]
    perm = torch.randperm(63).add(1).tolist()
    items, full_kv = [], []
    for cached, new in seqs:
        total = cached + new
        npages = -(-total // page_size)
        pages = tuple(perm[:npages])
        perm = perm[npages:]
        kv = torch.randn(2, total, HKV, D)
        full_kv.append(kv)
        slots = torch.tensor(
            [pages[p // page_size] * page_size + p % page_size for p in range(cached)], dtype=torch.int64
        )
        if cached:
            cache.store(0, slots, kv[0, :cached], kv[1, :cached])
        items.append(PlanItem(token_ids=(0,) * new, start_pos=cached, page_ids=pages))
    batch, _ = build_forward_batch(BatchPlan(tuple(items)), page_size, torch.device("cpu"))
    backend.begin_forward(batch)
    q = torch.randn(batch.num_tokens, H, D)
    k_new = torch.cat([kv[0, c:] for kv, (c, _) in zip(full_kv, seqs)])
    v_new = torch.cat([kv[1, c:] for kv, (c, _) in zip(full_kv, seqs)])
    out = backend.forward(q, k_new, v_new, AttentionLayerSpec(0, H, HKV, D, D**-0.5, window))
    start = 0
    for kv, (cached, new) in zip(full_kv, seqs):
        ref = _naive(q[start : start + new], kv[0], kv[1], list(range(cached, cached + new)), window)
        torch.testing.assert_close(out[start : start + new], ref, atol=1e-5, rtol=1e-5)
        start += new
