"""ModelRunner: owns the weights, the KV tensor and the attention backend; turns a BatchPlan into a BatchResult."""

from __future__ import annotations

import logging

import torch

from sglang_pd.attention.forward_batch import ForwardBatch
from sglang_pd.attention.registry import create_attention_backend
from sglang_pd.cuda_graph_runner import CudaGraphRunner
from sglang_pd.forward_batch_builder import LogitsLayout, build_forward_batch
from sglang_pd.mem.kv_cache import KVCache, KVCacheShape
from sglang_pd.models.config import ModelConfig
from sglang_pd.models.loader import load_model
from sglang_pd.runtime_config import RuntimeConfig, kv_pool_tokens
from sglang_pd.sampling.sampler import Sampler, SamplingBatchInfo
from sglang_pd.scheduler.batch import BatchPlan, BatchResult, ItemResult, PlanItem, TopLogprobs
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
        self.model = load_model(model_config, args.model_path, args.load_format, runtime.dtype, runtime.device,
                                ops=runtime.attention_backend)
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
        logger.info("KV pool: %d pages x %d tokens (%.1f MiB)", num_pages, args.page_size,
                    self.kv_cache.buffer.numel() * self.kv_cache.buffer.element_size() / 2**20)
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
    def run(self, plan: BatchPlan) -> BatchResult:
        batch, layout = build_forward_batch(plan, self.page_size, self.device)
        if self.graph_runner is not None and self.graph_runner.can_run(batch, layout.sample_rows):
            logits = self.graph_runner.replay(batch)
        else:
            logits = self._forward_eager(batch)
        sampled = self._sample(plan, layout, logits)
        input_lp = self._input_logprobs(plan, layout, logits)
        return BatchResult(items=tuple(_merge(s, lp) for s, lp in zip(sampled, input_lp)))

    def _forward_eager(self, batch: ForwardBatch) -> torch.Tensor:
        """Float32 logits [N, vocab] of rows ``batch.logits_indices``."""
        return self.model.compute_logits(self.model.forward(batch, self.attn))

    def _sample(self, plan: BatchPlan, layout: LogitsLayout, logits: torch.Tensor) -> list[ItemResult]:
        rows = [i for i, it in enumerate(plan.items) if it.sampling is not None]
        results = [ItemResult() for _ in plan.items]
        if not rows:
            return results
        sample_rows = [layout.sample_rows[i] for i in rows]
        if sample_rows != list(range(logits.shape[0])):  # decode batches: every row samples, in order
            logits = logits.index_select(0, torch.tensor(sample_rows, device=logits.device))
        info = SamplingBatchInfo.build(
            [plan.items[i].sampling for i in rows], self.model_config.vocab_size, logits.device
        )
        out = self.sampler(logits, info)
        next_ids = out.next_token_ids.tolist()
        logprobs = out.logprobs.tolist() if out.logprobs is not None else [None] * len(rows)
        for k, i in enumerate(rows):
            top = None
            if out.top_logprobs is not None and out.top_logprobs[k] is not None:
                vals, ids = out.top_logprobs[k]
                top = tuple(zip(vals, ids))
            results[i] = ItemResult(next_token_id=next_ids[k], logprob=logprobs[k], top_logprobs=top)
        return results

    def _input_logprobs(
        self, plan: BatchPlan, layout: LogitsLayout, logits: torch.Tensor
    ) -> list[tuple[tuple[float, ...], tuple[TopLogprobs, ...]]]:
        out: list[tuple[tuple[float, ...], tuple[TopLogprobs, ...]]] = []
        for it, start in zip(plan.items, layout.input_row_starts):
            out.append(_item_input_logprobs(it, logits[start : start + len(it.input_logprob_targets)]))
        return out


def _item_input_logprobs(it: PlanItem, rows: torch.Tensor) -> tuple[tuple[float, ...], tuple[TopLogprobs, ...]]:
    if not it.input_logprob_targets:
        return (), ()
    logp = torch.log_softmax(rows.float(), dim=-1)
    targets = torch.tensor(it.input_logprob_targets, device=rows.device)
    chosen = logp.gather(1, targets[:, None])[:, 0].tolist()
    tops: tuple[TopLogprobs, ...] = ()
    if it.input_top_logprobs_num > 0:
        vals, ids = logp.topk(it.input_top_logprobs_num, dim=-1)
        tops = tuple(tuple(zip(v, i)) for v, i in zip(vals.tolist(), ids.tolist()))
    return tuple(chosen), tops


def _merge(s: ItemResult, lp: tuple[tuple[float, ...], tuple[TopLogprobs, ...]]) -> ItemResult:
    return ItemResult(s.next_token_id, s.logprob, s.top_logprobs, lp[0], lp[1])
