"""sglang_pd: the worker (engine, models, scheduler, and later the HTTP server).

Data flow of one request through the engine:
  generate_request.normalize_generate -> engine_core.EngineCore.make_req (tokenize, validate) -> Req
  scheduler.Scheduler.step: plan (kv_manager pages, policy order, chunking, retraction)
      -> scheduler.batch.BatchPlan -> model_runner.ModelRunner.run
         (forward_batch_builder -> models.decoder + attention backend + mem.kv_cache -> sampling.Sampler)
      -> scheduler.batch.BatchResult -> plan_items.record_result -> stop_checker
  output.generate_output: text (stop trimming), output_ids, meta_info

Modules: server_args (flags), runtime_config (device/dtype/pool size), engine (offline API),
engine_core, generate_request, output, tokenizer, model_runner, forward_batch_builder,
attention/, mem/, models/, sampling/, scheduler/, tools/.
"""

from typing import Any

__all__ = ["Engine", "ServerArgs"]


def __getattr__(name: str) -> Any:
    # Lazy so that ``import sglang_pd`` stays cheap (no torch import) for the CLI and the router.
    if name == "Engine":
        from sglang_pd.engine import Engine

        return Engine
    if name == "ServerArgs":
        from sglang_pd.server_args import ServerArgs

        return ServerArgs
    raise AttributeError(name)
