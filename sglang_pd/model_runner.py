"""ModelRunner: owns the weights, the KV tensor and the attention backend; turns a BatchPlan into a BatchResult."""

from __future__ import annotations

import dataclasses
import logging

import torch

from sglang_pd.attention.forward_batch import ForwardBatch
from sglang_pd.attention.registry import create_attention_backend
from sglang_pd.cuda_graph_runner import CudaGraphRunner
from sglang_pd.forward_batch_builder import LogitsLayout, build_forward_batch
from sglang_pd.future_tokens import FutureTokens
from sglang_pd.mem.kv_cache import KVCache, KVCacheShape
from sglang_pd.models.config import ModelConfig
from sglang_pd.models.loader import load_model
from sglang_pd.pending_batch import InputLogprobs, PendingBatch
from sglang_pd.runtime_config import RuntimeConfig, kv_pool_tokens
from sglang_pd.sampling.sampler import SampleOutput, Sampler, SamplingBatchInfo
from sglang_pd.scheduler.batch import BatchPlan, BatchResult, PlanItem
from sglang_pd.server_args import ServerArgs

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, args: ServerArgs, model_config: ModelConfig, runtime: RuntimeConfig) -> None:
        self.model_config = model_config
        self.device = runtime.device
        self.page_size = args.page_size
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # Triton launches and graph capture use the current device
        torch.manual_seed(args.random_seed)
        self.model = load_model(
            model_config,
            args.model_path,
            args.load_format,
            runtime.dtype,
            runtime.device,
            ops=runtime.attention_backend,
        )
        shape = KVCacheShape(
            num_layers=model_config.num_hidden_layers,
            num_pages=0,
            page_size=args.page_size,
            num_kv_heads=model_config.num_key_value_heads,
            head_dim=model_config.head_dim,
        )
        tokens = kv_pool_tokens(args, runtime, shape.bytes_per_token(runtime.dtype))
        num_pages = tokens // args.page_size
        if num_pages < 1:
            raise ValueError(f"max_total_tokens={tokens} is smaller than one page ({args.page_size} tokens)")
        shape = KVCacheShape(**{**shape.__dict__, "num_pages": num_pages + 1})  # + the null page
        self.kv_cache = KVCache(shape, runtime.dtype, runtime.device)
        self.attn = create_attention_backend(runtime.attention_backend, self.kv_cache)
        self.sampler = Sampler()
        self.future = FutureTokens(self.device)
        logger.info(
            "KV pool: %d pages x %d tokens (%.1f MiB)",
            num_pages,
            args.page_size,
            self.kv_cache.buffer.numel() * self.kv_cache.buffer.element_size() / 2**20,
        )
        self.graph_runner: CudaGraphRunner | None = None
        if runtime.cuda_graph_max_bs > 0:
            max_bs = min(runtime.cuda_graph_max_bs, args.max_running_requests or runtime.cuda_graph_max_bs)
            max_pages = -(-runtime.context_length // args.page_size)
            with torch.inference_mode():
                self.graph_runner = CudaGraphRunner(self._forward_eager, max_bs, max_pages, args.page_size, self.device)

    @property
    def num_pages(self) -> int:
        """Allocatable pages (the null page excluded)."""
        return self.kv_cache.shape.num_pages - 1

    @torch.inference_mode()
    def launch(self, plan: BatchPlan) -> PendingBatch:
        """Queue the batch's forward and sampling on the device; nothing here waits for the device.

        Plan token ids may be placeholders of the previous launch's samples (``FutureTokens``).
        """
        batch, layout = build_forward_batch(plan, self.page_size, self.device)
        if layout.has_placeholders:
            batch = dataclasses.replace(batch, input_ids=self.future.resolve(batch.input_ids))
        if self.graph_runner is not None and self.graph_runner.can_run(batch, layout.sample_rows):
            logits = self.graph_runner.replay(batch)
        else:
            logits = self._forward_eager(batch)
        sample_items, sampled = self._sample(plan, layout, logits)
        placeholders: list[int | None] = [None] * len(plan.items)
        if sampled is not None:
            for i, ph in zip(sample_items, self.future.store(sampled.next_token_ids)):
                placeholders[i] = ph
        input_lp = [
            _item_input_logprobs(it, logits[start : start + len(it.input_logprob_targets)])
            for it, start in zip(plan.items, layout.input_row_starts)
        ]
        return PendingBatch(len(plan.items), sample_items, sampled, input_lp, tuple(placeholders), self.device)

    def run(self, plan: BatchPlan) -> BatchResult:
        """``launch`` and wait for the result (benchmarks and tests)."""
        return self.launch(plan).result()

    def _forward_eager(self, batch: ForwardBatch) -> torch.Tensor:
        """Float32 logits [N, vocab] of rows ``batch.logits_indices``."""
        return self.model.compute_logits(self.model.forward(batch, self.attn))

    def _sample(
        self, plan: BatchPlan, layout: LogitsLayout, logits: torch.Tensor
    ) -> tuple[list[int], SampleOutput | None]:
        """(plan items that sample, their samples in that order)."""
        samplings = [(i, it.sampling) for i, it in enumerate(plan.items) if it.sampling is not None]
        rows = [i for i, _ in samplings]
        if not rows:
            return rows, None
        sample_rows = [layout.sample_rows[i] for i in rows]
        if sample_rows != list(range(logits.shape[0])):  # decode batches: every row samples, in order
            logits = logits.index_select(0, torch.tensor(sample_rows, device=logits.device))
        info = SamplingBatchInfo.build([s for _, s in samplings], self.model_config.vocab_size, logits.device)
        return rows, self.sampler(logits, info)


def _item_input_logprobs(it: PlanItem, rows: torch.Tensor) -> InputLogprobs | None:
    if not it.input_logprob_targets:
        return None
    logp = torch.log_softmax(rows.float(), dim=-1)
    targets = torch.tensor(it.input_logprob_targets, device=rows.device)
    chosen = logp.gather(1, targets[:, None])[:, 0]
    if it.input_top_logprobs_num <= 0:
        return InputLogprobs(chosen, None, None)
    vals, ids = logp.topk(it.input_top_logprobs_num, dim=-1)
    return InputLogprobs(chosen, vals, ids)
