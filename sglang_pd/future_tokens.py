"""FutureTokens: sampled token ids that live on the device before the host has read them.

Overlapped scheduling plans batch k+1 before batch k's sampled ids reach the host. Each launch stores
its sampled ids in a device ring and hands back one placeholder per sample, ``-(slot + 1)``; the
next launch's input ids may carry those placeholders, and ``resolve`` swaps them for the ids on
the device, in stream order after the store. Real token ids are >= 0, so placeholders never clash.

Ring invariant: a placeholder is read only by the launch right after the one that stored it (by
then the host has seen the id and never plans with that placeholder again), so the ring must hold
two launches' samples; it keeps at least three and grows, keeping its contents, when a launch
brings more.
"""

from __future__ import annotations

import torch


class FutureTokens:
    def __init__(self, device: torch.device, size: int = 768) -> None:
        self.ids = torch.zeros(size, dtype=torch.int64, device=device)
        self.head = 0

    def store(self, token_ids: torch.Tensor) -> list[int]:
        """Keep ``token_ids`` [n] on the device; returns their placeholders."""
        n = int(token_ids.shape[0])
        if 3 * n > self.ids.shape[0]:
            grown = torch.zeros(3 * n, dtype=torch.int64, device=self.ids.device)
            grown[: self.ids.shape[0]] = self.ids
            self.ids = grown
        if self.head + n > self.ids.shape[0]:
            self.head = 0
        start = self.head
        self.ids[start : start + n] = token_ids
        self.head += n
        return list(range(-start - 1, -start - n - 1, -1))

    def resolve(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``input_ids`` with every placeholder replaced by the id it stands for."""
        slots = (-input_ids - 1).clamp_(min=0)
        return torch.where(input_ids < 0, self.ids[slots], input_ids)
