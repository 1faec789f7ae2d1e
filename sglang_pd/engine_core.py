"""EngineCore: everything one scheduler process owns (model, KV pool, scheduler), built from ServerArgs.

The offline ``Engine`` drives it in-process; the server's scheduler process drives the same object.
"""

from __future__ import annotations

import logging
import random
from typing import TYPE_CHECKING, Any

from sglang_pd.disagg.factory import build_hooks
from sglang_pd.disagg.live_rooms import LiveRooms
from sglang_pd.generate_request import GenerateItem, request_seed
from sglang_pd.model_runner import ModelRunner
from sglang_pd.models.config import ModelConfig
from sglang_pd.request_validation import validate_prompt
from sglang_pd.runtime_config import resolve_runtime
from sglang_pd.scheduler.req import FinishReason, Req
from sglang_pd.scheduler.scheduler import Scheduler, SchedulerConfig, StepOutput
from sglang_pd.scheduler.stop_checker import StopChecker
from sglang_pd.server_args import ServerArgs
from sglang_pd.tokenizer import load_tokenizer

if TYPE_CHECKING:
    from transfer.fake_engine import FakeTransferHub

logger = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, args: ServerArgs, transfer_hub: FakeTransferHub | None = None) -> None:
        if not args.model_path:
            raise ValueError("model_path is required")
        self.args = args
        self.model_config = ModelConfig.from_pretrained(args.model_path)
        self.runtime = resolve_runtime(args, self.model_config)
        self.tokenizer: Any = (
            None if args.skip_tokenizer_init else load_tokenizer(args.tokenizer_path or args.model_path)
        )
        self.runner = ModelRunner(args, self.model_config, self.runtime)
        num_pages = self.runner.num_pages
        hooks = build_hooks(
            args, self.model_config, self.runtime.dtype, self.runtime.device, self.runner.kv_cache.buffer, transfer_hub
        )
        self.scheduler = Scheduler(
            SchedulerConfig(
                page_size=args.page_size,
                num_pages=num_pages,
                chunk_size=args.effective_chunk_size,
                max_prefill_tokens=args.max_prefill_tokens,
                max_running_requests=args.max_running_requests or _default_max_running(num_pages),
                schedule_policy=args.schedule_policy,
                # D's pages arrive from P; prefix reuse on D is off (DESIGN §4, PD issue).
                enable_radix_cache=not args.disable_radix_cache and args.disaggregation_mode != "decode",
                decode_log_interval=args.decode_log_interval,
                schedule_conservativeness=args.schedule_conservativeness,
                overlap=not args.disable_overlap_schedule,
            ),
            self.runner,
            StopChecker(self.model_config.eos_token_ids, self.runtime.context_length, self.tokenizer),
            hooks,
        )
        self._seeds = random.Random(args.random_seed)
        transfer = getattr(hooks, "transfer", None)  # PD workers: a room is bound to one request at a time
        self._rooms = LiveRooms(transfer.holds) if transfer is not None else None

    @property
    def context_length(self) -> int:
        return self.runtime.context_length

    def make_req(self, item: GenerateItem) -> Req:
        """Tokenize and validate one item; raises ValueError for input the model cannot take."""
        if item.input_ids is not None:
            ids = list(item.input_ids)
        elif self.tokenizer is None:
            raise ValueError(
                "text prompts need a tokenizer; this server has none (skip_tokenizer_init or no tokenizer files)"
            )
        else:
            ids = self.tokenizer.encode(item.text)
        p = item.params
        validate_prompt(ids, p, self.context_length, self.model_config.vocab_size, self.tokenizer is not None)
        return Req(
            rid=item.rid,
            prompt_ids=ids,
            params=p,
            seed=request_seed(item, self._seeds),
            logprob=item.logprob,
            bootstrap=item.bootstrap,
        )

    def submit(self, req: Req) -> Req | None:
        """Queue ``req``; returns it finished (abort) at once if it cannot run: it can never fit in the KV pool,
        or (PD) another live request on this worker holds its ``bootstrap_room`` (that one is left alone)."""
        if self._rooms is not None:
            refusal = self._rooms.claim(req)
            if refusal is not None:
                logger.warning("request %s refused: %s", req.rid, refusal)
                req.finish(FinishReason("abort", message=refusal, status_code=409))
                return req
        return self.scheduler.submit(req)

    def step(self) -> StepOutput:
        return self.scheduler.step()

    def shutdown(self) -> None:
        self.scheduler.hooks.shutdown()

    def pool_stats(self) -> dict[str, int]:
        kv = self.scheduler.kv
        return {
            "total_pages": kv.pool.num_total,
            "free_pages": kv.pool.num_free,
            "cached_pages": kv.cache.num_cached_pages,
            "evictable_pages": kv.cache.num_evictable_pages,
            "page_size": kv.page_size,
        }


def _default_max_running(num_pages: int) -> int:
    """At most one request per page and 384 in all. Measured on H200, Llama-8B shapes, 1000 x 1024/1024
    (bench/RESULTS.md): with the overlapped scheduler 384 gives 9,172 out tok/s against 8,933 at 256;
    512 outgrows the pool (1M tokens of KV against 879k) and retracts. ``--cuda-graph-max-bs`` matches it."""
    return max(1, min(384, num_pages))
