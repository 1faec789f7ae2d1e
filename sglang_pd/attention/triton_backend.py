"""Attention over the paged KV with the Triton kernels of ``pd_kernels/`` (the default on CUDA).

Per layer: one launch stores the new tokens' K/V into their slots, then one attention call reads
everything (prefix and new tokens) from the paged cache: split-KV decode attention when every
sequence brings one token, extend attention (causal, varlen) otherwise.

Invariant: ``begin_forward`` and ``forward`` read only Python ints of the batch (its ``*_cpu``
fields and tensor shapes), never tensor values, so a decode forward can be captured in a CUDA graph
and replayed with other contents of the same buffers. The split count depends only on the batch
size and the page table's width, both fixed for a captured graph.
"""

from __future__ import annotations

import torch

from sglang_pd.attention.base import AttentionBackend, AttentionLayerSpec
from sglang_pd.attention.forward_batch import ForwardBatch
from sglang_pd.mem.kv_cache import KVCache


class TritonAttentionBackend(AttentionBackend):
    name = "triton"

    def __init__(self, kv_cache: KVCache) -> None:
        super().__init__(kv_cache)
        # Imported here: triton.jit reads TRITON_INTERPRET at import time.
        from pd_kernels.decode_attention import decode_attention, default_num_kv_splits
        from pd_kernels.extend_attention import extend_attention
        from pd_kernels.kv_store import store_kv

        self._decode, self._extend, self._store = decode_attention, extend_attention, store_kv
        self._default_splits = default_num_kv_splits
        dev = kv_cache.device
        self._num_sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 1

    def begin_forward(self, batch: ForwardBatch) -> None:
        self._batch = batch
        self._is_decode = batch.is_decode
        self._max_extend = max(batch.extend_lens_cpu, default=0)
        max_context = batch.page_table.shape[1] * batch.page_size
        self._splits = self._default_splits(
            batch.batch_size, self.kv_cache.shape.num_kv_heads, max_context, self._num_sms
        )

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: AttentionLayerSpec) -> torch.Tensor:
        b = self._batch
        k_cache = self.kv_cache.k_slots(layer.layer_id)
        v_cache = self.kv_cache.v_slots(layer.layer_id)
        self._store(k_cache, v_cache, b.out_cache_loc, k, v)
        if self._is_decode:
            return self._decode(
                q,
                k_cache,
                v_cache,
                b.page_table,
                b.seq_lens,
                b.page_size,
                layer.scaling,
                sliding_window=layer.sliding_window,
                num_kv_splits=self._splits,
            )
        return self._extend(
            q,
            k_cache,
            v_cache,
            b.page_table,
            b.seq_lens,
            b.extend_lens,
            b.extend_starts,
            b.page_size,
            layer.scaling,
            self._max_extend,
            sliding_window=layer.sliding_window,
        )
