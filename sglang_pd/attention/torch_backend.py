"""Reference attention backend in plain torch; runs anywhere (CPU in tests).

Small batches run as one padded SDPA call: queries [B, N_max], keys [B, S_max] gathered through the
page table, with a boolean mask for causality, sequence ends and sliding windows. Batches whose
padded score tensor would be large fall back to one SDPA call per sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sglang_pd.attention.base import AttentionBackend, AttentionLayerSpec
from sglang_pd.attention.forward_batch import ForwardBatch

PADDED_LIMIT = 1 << 22  # max B * N_max * S_max for the padded path


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def begin_forward(self, batch: ForwardBatch) -> None:
        self._batch = batch
        n_max, s_max = max(batch.extend_lens_cpu), max(batch.seq_lens_cpu)
        self._padded = batch.batch_size * n_max * s_max <= PADDED_LIMIT
        dev = batch.page_table.device
        ps = batch.page_size
        num_pages = -(-s_max // ps)
        offsets = torch.arange(ps, device=dev, dtype=torch.int64)
        # slots[b, s]: KV slot of position s of sequence b (padding points into the null page).
        pages = batch.page_table[:, :num_pages].to(torch.int64)
        self._slots = (pages[:, :, None] * ps + offsets).reshape(batch.batch_size, -1)[:, :s_max]
        j = torch.arange(n_max, device=dev)
        seq_lens = batch.seq_lens.to(torch.int64)
        ext = batch.extend_lens.to(torch.int64)
        self._q_valid = j[None, :] < ext[:, None]  # [B, N]
        self._q_pos = (seq_lens - ext)[:, None] + j[None, :]  # [B, N]
        self._q_index = torch.where(self._q_valid, batch.extend_starts.to(torch.int64)[:, None] + j[None, :], 0)
        k_pos = torch.arange(s_max, device=dev)
        self._k_pos = k_pos
        self._base_mask = (k_pos[None, None, :] <= self._q_pos[:, :, None]) & (
            k_pos[None, None, :] < seq_lens[:, None, None]
        )
        self._masks: dict[int | None, torch.Tensor] = {}

    def _mask(self, window: int | None) -> torch.Tensor:
        """[B, 1, N, S] boolean mask; padded query rows may see key 0 so that they stay finite."""
        if window not in self._masks:
            allowed = self._base_mask
            if window is not None:
                allowed = allowed & (self._k_pos[None, None, :] > self._q_pos[:, :, None] - window)
            allowed = allowed | (~self._q_valid[:, :, None] & (self._k_pos == 0)[None, None, :])
            self._masks[window] = allowed[:, None]
        return self._masks[window]

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: AttentionLayerSpec) -> torch.Tensor:
        self.kv_cache.store(layer.layer_id, self._batch.out_cache_loc, k, v)
        if not self._padded:
            return self._forward_per_sequence(q, layer)
        k_all = self.kv_cache.k_slots(layer.layer_id)
        v_all = self.kv_cache.v_slots(layer.layer_id)
        keys = k_all[self._slots].to(q.dtype).transpose(1, 2)  # [B, Hkv, S, D]
        values = v_all[self._slots].to(q.dtype).transpose(1, 2)
        queries = q[self._q_index].transpose(1, 2)  # [B, H, N, D]
        out = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=self._mask(layer.sliding_window), scale=layer.scaling, enable_gqa=True
        )
        return out.transpose(1, 2)[self._q_valid]  # [T, H, D] in flat token order

    def _forward_per_sequence(self, q: torch.Tensor, layer: AttentionLayerSpec) -> torch.Tensor:
        batch = self._batch
        k_all = self.kv_cache.k_slots(layer.layer_id)
        v_all = self.kv_cache.v_slots(layer.layer_id)
        out = torch.empty_like(q)
        start = 0
        for i, (seq_len, n) in enumerate(zip(batch.seq_lens_cpu, batch.extend_lens_cpu)):
            slots = self._slots[i, :seq_len]
            qi = q[start : start + n].transpose(0, 1)[None]  # [1, H, n, D]
            ki = k_all[slots].to(q.dtype).transpose(0, 1)[None]  # [1, Hkv, S, D]
            vi = v_all[slots].to(q.dtype).transpose(0, 1)[None]
            mask = _sequence_mask(n, seq_len, layer.sliding_window, q.device)
            oi = F.scaled_dot_product_attention(
                qi, ki, vi, attn_mask=mask, is_causal=mask is None and n > 1, scale=layer.scaling, enable_gqa=True
            )
            out[start : start + n] = oi[0].transpose(0, 1)
            start += n
        return out


def _sequence_mask(n: int, seq_len: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """Boolean [n, seq_len] mask for n queries at positions [seq_len - n, seq_len); None = plain causal."""
    if window is None and (n == 1 or n == seq_len):
        return None  # decode sees everything; a fresh prefill is exactly is_causal
    q_pos = torch.arange(seq_len - n, seq_len, device=device)[:, None]
    k_pos = torch.arange(seq_len, device=device)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    return allowed
