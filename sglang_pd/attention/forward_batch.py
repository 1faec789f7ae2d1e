"""The tensors one model forward reads: flattened new tokens of every sequence plus paged-KV metadata."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ForwardBatch:
    """One forward over B sequences that together bring T new tokens.

    Sequence i owns new tokens ``[extend_starts[i], extend_starts[i] + extend_lens[i])`` of the flat
    tensors. Its KV after this step covers positions ``[0, seq_lens[i])``; the new tokens sit at
    positions ``[seq_lens[i] - extend_lens[i], seq_lens[i])``. KV slot ``s`` is page ``s // page_size``,
    offset ``s % page_size``; ``page_table[i, j]`` is the page holding positions
    ``[j * page_size, (j + 1) * page_size)`` of sequence i (rows padded with page 0, the null page).
    """

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    out_cache_loc: torch.Tensor  # [T] int64, KV slot written by each new token
    seq_lens: torch.Tensor  # [B] int32
    extend_lens: torch.Tensor  # [B] int32
    extend_starts: torch.Tensor  # [B] int32, exclusive cumsum of extend_lens
    page_table: torch.Tensor  # [B, max_pages] int32
    logits_indices: torch.Tensor  # [N] int64, rows of the hidden states projected to logits
    seq_lens_cpu: tuple[int, ...]
    extend_lens_cpu: tuple[int, ...]
    page_size: int

    @property
    def batch_size(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def is_decode(self) -> bool:
        """Every sequence brings exactly one new token (the shape CUDA graphs capture)."""
        return all(n == 1 for n in self.extend_lens_cpu)
