"""Decode forwards replayed from CUDA graphs, one captured per padded batch size.

A decode step of a large model launches hundreds of small kernels; replaying a captured graph
turns them into one launch. Graphs are captured at startup for the batch sizes of
``graph_batch_sizes`` over static input buffers (ids, positions, slots, lengths, page table) and
share one memory pool, largest first. A batch of size ``bs`` replays the smallest captured size
``>= bs``; the padding rows point at the null page (slot 0, length 1), so they read and write
only page 0, which no sequence owns, and their logits are dropped.

What is captured: embedding -> layers (Triton kernels only, see ``TritonAttentionBackend``) ->
final norm -> LM head, i.e. float32 logits ``[padded bs, vocab]``. Sampling stays outside.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from sglang_pd.attention.forward_batch import ForwardBatch

logger = logging.getLogger(__name__)

ForwardFn = Callable[[ForwardBatch], torch.Tensor]  # batch -> float32 logits [bs, vocab]


def graph_batch_sizes(max_bs: int) -> tuple[int, ...]:
    """1, 2, 4, 8, then every 8 up to 256, every 16 beyond; always ending at ``max_bs``."""
    sizes = [s for s in (1, 2, 4) if s < max_bs]
    s = 8
    while s < max_bs:
        sizes.append(s)
        s += 8 if s < 256 else 16
    sizes.append(max_bs)
    return tuple(sizes)


class CudaGraphRunner:
    def __init__(self, forward: ForwardFn, max_bs: int, max_pages: int, page_size: int, device: torch.device) -> None:
        self._forward = forward
        self.sizes = graph_batch_sizes(max_bs)
        self.max_bs = self.sizes[-1]
        self.max_pages = max_pages
        self.page_size = page_size
        n = self.max_bs
        i64, i32 = torch.int64, torch.int32
        self.input_ids = torch.zeros(n, dtype=i64, device=device)
        self.positions = torch.zeros(n, dtype=i64, device=device)
        self.out_cache_loc = torch.zeros(n, dtype=i64, device=device)
        self.seq_lens = torch.ones(n, dtype=i32, device=device)
        self.extend_lens = torch.ones(n, dtype=i32, device=device)
        self.extend_starts = torch.arange(n, dtype=i32, device=device)
        self.logits_indices = torch.arange(n, dtype=i64, device=device)
        self.page_table = torch.zeros(n, max_pages, dtype=i32, device=device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        self._capture_all()

    def can_run(self, batch: ForwardBatch, sample_rows: tuple[int, ...]) -> bool:
        """Pure decode, within the captured sizes, and logits row i is exactly item i's sample row."""
        bs = batch.batch_size
        return (
            batch.is_decode
            and bs <= self.max_bs
            and batch.page_table.shape[1] <= self.max_pages
            and batch.logits_indices.shape[0] == bs
            and sample_rows == tuple(range(bs))
        )

    def replay(self, batch: ForwardBatch) -> torch.Tensor:
        """Float32 logits [bs, vocab] of a batch ``can_run`` accepted."""
        bs = batch.batch_size
        padded = next(s for s in self.sizes if s >= bs)
        self.input_ids[:bs].copy_(batch.input_ids)
        self.positions[:bs].copy_(batch.positions)
        self.out_cache_loc[:bs].copy_(batch.out_cache_loc)
        self.seq_lens[:bs].copy_(batch.seq_lens)
        self.page_table[:bs, : batch.page_table.shape[1]].copy_(batch.page_table)
        if padded > bs:
            self._reset_rows(bs, padded)
        self._graphs[padded].replay()
        return self._outputs[padded][:bs]

    def _reset_rows(self, start: int, end: int) -> None:
        """Rows [start, end) become null-page sequences of length 1 (columns past 0 are never read)."""
        self.input_ids[start:end].zero_()
        self.positions[start:end].zero_()
        self.out_cache_loc[start:end].zero_()
        self.seq_lens[start:end].fill_(1)
        self.page_table[start:end, 0].zero_()

    def _static_batch(self, bs: int) -> ForwardBatch:
        return ForwardBatch(
            input_ids=self.input_ids[:bs],
            positions=self.positions[:bs],
            out_cache_loc=self.out_cache_loc[:bs],
            seq_lens=self.seq_lens[:bs],
            extend_lens=self.extend_lens[:bs],
            extend_starts=self.extend_starts[:bs],
            page_table=self.page_table[:bs],
            logits_indices=self.logits_indices[:bs],
            seq_lens_cpu=(1,) * bs,
            extend_lens_cpu=(1,) * bs,
            page_size=self.page_size,
        )

    def _capture_all(self) -> None:
        t0 = time.perf_counter()
        pool = None
        self._reset_rows(0, self.max_bs)
        for bs in reversed(self.sizes):
            batch = self._static_batch(bs)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # compile the Triton kernels and let cuBLAS pick its algorithms
                    self._forward(batch)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._outputs[bs] = self._forward(batch)
            pool = graph.pool()
            self._graphs[bs] = graph
        torch.cuda.synchronize()
        logger.info(
            "captured %d decode CUDA graphs (batch sizes %d..%d) in %.1f s",
            len(self.sizes),
            self.sizes[0],
            self.max_bs,
            time.perf_counter() - t0,
        )
