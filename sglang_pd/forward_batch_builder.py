"""BatchPlan -> ForwardBatch: flatten the plan's new tokens and lay out the paged-KV metadata.

Host cost matters at large decode batches (hundreds of sequences of ~100 pages each): the per-item
Python work is a few list appends; the page table is filled by one vectorised numpy scatter, and
all index tensors travel to the device in a single host-to-device copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import numpy as np
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
    has_placeholders: bool = False  # some input id stands for an in-flight sample (FutureTokens)


def build_forward_batch(plan: BatchPlan, page_size: int, device: torch.device) -> tuple[ForwardBatch, LogitsLayout]:
    items = plan.items
    extend_lens = [len(it.token_ids) for it in items]
    seq_lens = [it.start_pos + n for it, n in zip(items, extend_lens)]
    starts = np.zeros(len(items) + 1, dtype=np.int64)
    np.cumsum(extend_lens, out=starts[1:])
    positions = np.concatenate([np.arange(it.start_pos, s, dtype=np.int64) for it, s in zip(items, seq_lens)])
    table = _page_table(items)
    owner = np.repeat(np.arange(len(items)), extend_lens)
    out_loc = table[owner, positions // page_size].astype(np.int64) * page_size + positions % page_size
    logits_idx, input_row_starts, sample_rows = _logits_rows(plan, starts)
    ids = np.fromiter(chain.from_iterable(it.token_ids for it in items), dtype=np.int64, count=int(starts[-1]))
    flat = [
        ids,
        positions,
        out_loc,
        np.asarray(seq_lens, np.int64),
        np.asarray(extend_lens, np.int64),
        starts[:-1],
        np.asarray(logits_idx, np.int64),
        table.reshape(-1).astype(np.int64),
    ]
    sizes = [a.size for a in flat]
    packed = torch.from_numpy(np.concatenate(flat))
    if device.type == "cuda":  # pinned, so the copy is queued without waiting for the device
        packed = packed.pin_memory()
    packed = packed.to(device, non_blocking=True)
    parts = packed.split(sizes)
    batch = ForwardBatch(
        input_ids=parts[0],
        positions=parts[1],
        out_cache_loc=parts[2],
        seq_lens=parts[3].to(torch.int32),
        extend_lens=parts[4].to(torch.int32),
        extend_starts=parts[5].to(torch.int32),
        page_table=parts[7].to(torch.int32).view(table.shape),
        logits_indices=parts[6],
        seq_lens_cpu=tuple(seq_lens),
        extend_lens_cpu=tuple(extend_lens),
        page_size=page_size,
    )
    has_placeholders = bool(ids.size) and int(ids.min()) < 0
    return batch, LogitsLayout(tuple(input_row_starts), tuple(sample_rows), has_placeholders)


def _page_table(items: tuple) -> np.ndarray:
    """int32 [B, max_pages]: row i = items[i].page_ids, padded with the null page 0."""
    lens = np.fromiter((len(it.page_ids) for it in items), dtype=np.int64, count=len(items))
    table = np.zeros((len(items), int(lens.max(initial=0))), dtype=np.int32)
    total = int(lens.sum())
    flat = np.fromiter(chain.from_iterable(it.page_ids for it in items), dtype=np.int32, count=total)
    rows = np.repeat(np.arange(len(items)), lens)
    row_starts = np.cumsum(lens) - lens
    cols = np.arange(total) - np.repeat(row_starts, lens)
    table[rows, cols] = flat
    return table


def _logits_rows(plan: BatchPlan, starts: np.ndarray) -> tuple[list[int], list[int], list[int]]:
    """Flat token rows projected to logits: each item's input-logprob positions, then its sampling row."""
    logits_idx: list[int] = []
    input_row_starts: list[int] = []
    sample_rows: list[int] = []
    for i, it in enumerate(plan.items):
        flat_start = int(starts[i])
        input_row_starts.append(len(logits_idx))
        if it.input_logprob_targets:
            first = flat_start + it.input_logprob_offset
            logits_idx.extend(range(first, first + len(it.input_logprob_targets)))
        if it.sampling is not None:
            sample_rows.append(len(logits_idx))
            logits_idx.append(int(starts[i + 1]) - 1)
        else:
            sample_rows.append(-1)
    return logits_idx, input_row_starts, sample_rows
