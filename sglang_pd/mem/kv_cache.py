"""The one KV tensor of a worker, laid out [num_layers, 2 (K, V), num_pages, page_size, num_kv_heads, head_dim].

With this layout, one page of one layer is contiguous, and a slot index ``page * page_size + offset``
addresses a token row of ``k_slots(layer)`` / ``v_slots(layer)`` (views, no copies). Page 0 is the
null page: never handed out, used to pad page tables.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVCacheShape:
    num_layers: int
    num_pages: int  # including the null page 0
    page_size: int
    num_kv_heads: int
    head_dim: int

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * elem


class KVCache:
    def __init__(self, shape: KVCacheShape, dtype: torch.dtype, device: torch.device | str) -> None:
        self.shape = shape
        self.dtype = dtype
        self.device = torch.device(device)
        s = shape
        self.buffer = torch.zeros(
            (s.num_layers, 2, s.num_pages, s.page_size, s.num_kv_heads, s.head_dim),
            dtype=dtype,
            device=self.device,
        )

    @property
    def page_size(self) -> int:
        return self.shape.page_size

    def k_slots(self, layer_id: int) -> torch.Tensor:
        """[num_pages * page_size, num_kv_heads, head_dim] view of layer ``layer_id``'s keys."""
        return self.buffer[layer_id, 0].view(-1, self.shape.num_kv_heads, self.shape.head_dim)

    def v_slots(self, layer_id: int) -> torch.Tensor:
        return self.buffer[layer_id, 1].view(-1, self.shape.num_kv_heads, self.shape.head_dim)

    def store(self, layer_id: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k/v [T, num_kv_heads, head_dim] into ``slots`` [T] of layer ``layer_id``."""
        self.k_slots(layer_id)[slots] = k.to(self.dtype)
        self.v_slots(layer_id)[slots] = v.to(self.dtype)
