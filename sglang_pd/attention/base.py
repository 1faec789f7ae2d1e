"""The attention backend seam: the model hands q/k/v of the new tokens, the backend owns the paged KV."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from sglang_pd.attention.forward_batch import ForwardBatch
from sglang_pd.mem.kv_cache import KVCache


@dataclass(frozen=True)
class AttentionLayerSpec:
    """Static per-layer facts an attention backend needs."""

    layer_id: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scaling: float
    sliding_window: int | None = None  # key j is visible from query i iff i - window < j <= i


class AttentionBackend(ABC):
    """Stores the new tokens' K/V into the paged cache and attends over each sequence's whole KV."""

    def __init__(self, kv_cache: KVCache) -> None:
        self.kv_cache = kv_cache

    @abstractmethod
    def begin_forward(self, batch: ForwardBatch) -> None:
        """Prepare per-forward metadata (called once per forward, before layer 0)."""

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: AttentionLayerSpec) -> torch.Tensor:
        """q: [T, num_heads, head_dim]; k, v: [T, num_kv_heads, head_dim] -> [T, num_heads, head_dim]."""
