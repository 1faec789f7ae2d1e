"""PendingBatch: a launched batch's sampled tokens and logprobs on their way to the host.

At launch every result tensor starts an asynchronous device-to-host copy (into pinned memory) and
an event is recorded after them; ``result()`` waits for that event only, so the host can plan and
launch the next batch first. Nothing here reads a device tensor synchronously: a synchronous read
would wait for every batch launched after this one as well.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import overload

import torch

from sglang_pd.sampling.sampler import SampleOutput, top_logprob_lists
from sglang_pd.scheduler.batch import BatchResult, ItemResult, TopLogprobs


@overload
def to_host(t: torch.Tensor) -> torch.Tensor: ...
@overload
def to_host(t: None) -> None: ...
def to_host(t: torch.Tensor | None) -> torch.Tensor | None:
    """Start copying ``t`` to the host (pinned memory, asynchronous on CUDA)."""
    if t is None or not t.is_cuda:
        return t
    return t.to("cpu", non_blocking=True)


@dataclass(frozen=True)
class InputLogprobs:
    """One item's prompt logprobs on the host (once the batch's event has fired)."""

    chosen: torch.Tensor  # [m] float32
    top_values: torch.Tensor | None  # [m, k]
    top_ids: torch.Tensor | None


class PendingBatch:
    def __init__(
        self,
        num_items: int,
        sample_items: list[int],
        sampled: SampleOutput | None,
        input_logprobs: list[InputLogprobs | None],
        placeholders: tuple[int | None, ...],
        device: torch.device,
    ) -> None:
        self.num_items = num_items
        self.sample_items = sample_items  # plan item index of each sampled row
        self.placeholders = placeholders
        self._input_logprobs = [
            None if lp is None else InputLogprobs(to_host(lp.chosen), to_host(lp.top_values), to_host(lp.top_ids))
            for lp in input_logprobs
        ]
        self._next_ids = self._logprobs = self._top_values = self._top_ids = None
        self._top_nums: tuple[int, ...] = ()
        if sampled is not None:
            self._next_ids = to_host(sampled.next_token_ids)
            self._logprobs = to_host(sampled.logprobs)
            self._top_values, self._top_ids = to_host(sampled.top_values), to_host(sampled.top_ids)
            self._top_nums = sampled.top_logprobs_nums
        self._event: torch.cuda.Event | None = None
        if device.type == "cuda":  # recorded after every copy above
            self._event = torch.cuda.Event()
            self._event.record()

    def result(self) -> BatchResult:
        if self._event is not None:
            self._event.synchronize()
        items = [ItemResult() for _ in range(self.num_items)]
        if self._next_ids is not None:
            next_ids = self._next_ids.tolist()
            logprobs = self._logprobs.tolist() if self._logprobs is not None else [None] * len(next_ids)
            tops = None
            if self._top_values is not None and self._top_ids is not None:
                tops = top_logprob_lists(self._top_values.tolist(), self._top_ids.tolist(), self._top_nums)
            for k, i in enumerate(self.sample_items):
                row = tops[k] if tops is not None else None
                top = tuple(zip(*row)) if row is not None else None
                items[i] = ItemResult(next_token_id=next_ids[k], logprob=logprobs[k], top_logprobs=top)
        for i, lp in enumerate(self._input_logprobs):
            if lp is not None:
                chosen, tops_in = _input_lists(lp)
                s = items[i]
                items[i] = ItemResult(s.next_token_id, s.logprob, s.top_logprobs, chosen, tops_in)
        return BatchResult(items=tuple(items))


def _input_lists(lp: InputLogprobs) -> tuple[tuple[float, ...], tuple[TopLogprobs, ...]]:
    tops: tuple[TopLogprobs, ...] = ()
    if lp.top_values is not None and lp.top_ids is not None:
        tops = tuple(tuple(zip(v, i)) for v, i in zip(lp.top_values.tolist(), lp.top_ids.tolist()))
    return tuple(lp.chosen.tolist()), tops
