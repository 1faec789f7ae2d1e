"""BatchPlan -> ForwardBatch: flatten the plan's new tokens and lay out the paged-KV metadata."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sglang_pd.attention.forward_batch import ForwardBatch
from sglang_pd.scheduler.batch import BatchPlan


@dataclass(frozen=True)
class LogitsLayout:
    """Which logits rows belong to which plan item.

    Rows ``[input_row_starts[i], input_row_starts[i] + len(items[i].input_logprob_targets))`` hold
    item i's input-logprob positions; ``sample_rows[i]`` is its sampling row (-1 if it samples nothing).
    """

    input_row_starts: tuple[int, ...]
    sample_rows: tuple[int, ...]


def build_forward_batch(plan: BatchPlan, page_size: int, device: torch.device) -> tuple[ForwardBatch, LogitsLayout]:
    input_ids: list[int] = []
    positions: list[int] = []
    out_loc: list[int] = []
    logits_idx: list[int] = []
    input_row_starts: list[int] = []
    sample_rows: list[int] = []
    seq_lens: list[int] = []
    extend_lens: list[int] = []
    extend_starts: list[int] = []
    max_pages = max(len(it.page_ids) for it in plan.items)
    page_rows: list[list[int]] = []
    for it in plan.items:
        n = len(it.token_ids)
        flat_start = len(input_ids)
        extend_starts.append(flat_start)
        extend_lens.append(n)
        seq_lens.append(it.start_pos + n)
        input_ids.extend(it.token_ids)
        pos = range(it.start_pos, it.start_pos + n)
        positions.extend(pos)
        out_loc.extend(it.page_ids[p // page_size] * page_size + p % page_size for p in pos)
        page_rows.append(list(it.page_ids) + [0] * (max_pages - len(it.page_ids)))
        input_row_starts.append(len(logits_idx))
        first = flat_start + it.input_logprob_offset
        logits_idx.extend(range(first, first + len(it.input_logprob_targets)))
        if it.sampling is not None:
            sample_rows.append(len(logits_idx))
            logits_idx.append(flat_start + n - 1)
        else:
            sample_rows.append(-1)

    def t(values: list[int], dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

    batch = ForwardBatch(
        input_ids=t(input_ids, torch.int64),
        positions=t(positions, torch.int64),
        out_cache_loc=t(out_loc, torch.int64),
        seq_lens=t(seq_lens, torch.int32),
        extend_lens=t(extend_lens, torch.int32),
        extend_starts=t(extend_starts, torch.int32),
        page_table=torch.tensor(page_rows, dtype=torch.int32).to(device, non_blocking=True),
        logits_indices=t(logits_idx, torch.int64),
        seq_lens_cpu=tuple(seq_lens),
        extend_lens_cpu=tuple(extend_lens),
        page_size=page_size,
    )
    return batch, LogitsLayout(tuple(input_row_starts), tuple(sample_rows))
