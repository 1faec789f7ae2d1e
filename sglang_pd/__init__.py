"""sglang_pd: the worker (engine, models, scheduler, HTTP server, PD hooks).

Data flow of one request through the engine:
  generate_request.normalize_generate -> engine_core.EngineCore.make_req (tokenize, validate) -> Req
  scheduler.Scheduler.step: plan (kv_manager pages, policy order, chunking, retraction)
      -> scheduler.batch.BatchPlan -> model_runner.ModelRunner.run
         (forward_batch_builder -> models.decoder + attention backend + mem.kv_cache -> sampling.Sampler)
      -> scheduler.batch.BatchResult -> plan_items.record_result -> stop_checker
  output.generate_output: text (stop trimming), output_ids, meta_info

Modules: server_args (flags), cli_args (command line -> ServerArgs), launch_server (the server's entry
point), runtime_config (device/dtype/pool size), engine (offline API), engine_core, generate_request,
request_validation (prompt checks shared by Engine and server), output, tokenizer, model_runner,
forward_batch_builder, cuda_graph_runner (decode replayed from CUDA graphs), pending_batch and
future_tokens (sampled tokens on their way to the host, overlapped scheduling).
Packages: attention/, mem/, models/, sampling/, scheduler/, server/ (HTTP server and processes),
disagg/ (prefill/decode hooks), tools/.
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
