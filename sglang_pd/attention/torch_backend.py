"""Reference attention backend: plain torch, one sequence at a time. Runs anywhere (CPU in tests)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sglang_pd.attention.base import AttentionBackend, AttentionLayerSpec
from sglang_pd.attention.forward_batch import ForwardBatch


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def begin_forward(self, batch: ForwardBatch) -> None:
        self._batch = batch
        ps = batch.page_size
        offsets = torch.arange(ps, device=batch.page_table.device, dtype=torch.int64)
        # Slot of every KV position of every sequence: [B][seq_len].
        self._slots: list[torch.Tensor] = []
        for i, seq_len in enumerate(batch.seq_lens_cpu):
            num_pages = -(-seq_len // ps)
            pages = batch.page_table[i, :num_pages].to(torch.int64)
            self._slots.append((pages[:, None] * ps + offsets[None, :]).reshape(-1)[:seq_len])

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: AttentionLayerSpec
    ) -> torch.Tensor:
        batch = self._batch
        self.kv_cache.store(layer.layer_id, batch.out_cache_loc, k, v)
        k_all = self.kv_cache.k_slots(layer.layer_id)
        v_all = self.kv_cache.v_slots(layer.layer_id)
        group = layer.num_heads // layer.num_kv_heads
        out = torch.empty_like(q)
        start = 0
        for i, (seq_len, n) in enumerate(zip(batch.seq_lens_cpu, batch.extend_lens_cpu)):
            slots = self._slots[i]
            qi = q[start : start + n].transpose(0, 1)  # [H, n, D]
            ki = k_all[slots].to(q.dtype).transpose(0, 1).repeat_interleave(group, dim=0)  # [H, S, D]
            vi = v_all[slots].to(q.dtype).transpose(0, 1).repeat_interleave(group, dim=0)
            mask = _mask(n, seq_len, layer.sliding_window, q.device)
            oi = F.scaled_dot_product_attention(
                qi.unsqueeze(0),
                ki.unsqueeze(0),
                vi.unsqueeze(0),
                attn_mask=mask,
                is_causal=mask is None and n > 1,
                scale=layer.scaling,
            )
            out[start : start + n] = oi[0].transpose(0, 1)
            start += n
        return out


def _mask(n: int, seq_len: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """Boolean [n, seq_len] mask for n queries at positions [seq_len - n, seq_len); None = plain causal."""
    if window is None and (n == 1 or n == seq_len):
        return None  # decode sees everything; a fresh prefill is exactly is_causal
    q_pos = torch.arange(seq_len - n, seq_len, device=device)[:, None]
    k_pos = torch.arange(seq_len, device=device)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    return allowed
