"""The two frozen messages between scheduler and model runner: a plan down, a result up."""

from __future__ import annotations

from dataclasses import dataclass

from sglang_pd.sampling.sampler import SamplingRow


@dataclass(frozen=True)
class PlanItem:
    """Compute positions ``[start_pos, start_pos + len(token_ids))`` of one request.

    ``page_ids`` cover positions ``[0, start_pos + len(token_ids))``. ``sampling`` is set iff the
    item ends at the request's last known token, so its last position yields the next token.
    ``input_logprob_targets[i]`` is the token at position ``start_pos + input_logprob_offset + i + 1``;
    the runner returns its logprob under the logits of the position before it.
    """

    token_ids: tuple[int, ...]
    start_pos: int
    page_ids: tuple[int, ...]
    sampling: SamplingRow | None = None
    input_logprob_offset: int = 0
    input_logprob_targets: tuple[int, ...] = ()
    input_top_logprobs_num: int = 0


@dataclass(frozen=True)
class BatchPlan:
    items: tuple[PlanItem, ...]

    @property
    def num_tokens(self) -> int:
        return sum(len(it.token_ids) for it in self.items)


TopLogprobs = tuple[tuple[float, int], ...]


@dataclass(frozen=True)
class ItemResult:
    next_token_id: int | None = None
    logprob: float | None = None
    top_logprobs: TopLogprobs | None = None
    input_logprobs: tuple[float, ...] = ()
    input_top_logprobs: tuple[TopLogprobs, ...] = ()


@dataclass(frozen=True)
class BatchResult:
    items: tuple[ItemResult, ...]  # same order as BatchPlan.items
