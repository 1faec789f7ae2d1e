"""Offline API in SGLang's shape: ``Engine(model_path=..., **server_args).generate(...)``."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from sglang_pd.engine_core import EngineCore
from sglang_pd.generate_request import normalize_generate
from sglang_pd.output import generate_output
from sglang_pd.server_args import ServerArgs


class Engine:
    """Runs the engine in this process. All requests of one ``generate`` call form one continuous batch."""

    def __init__(self, model_path: str | None = None, **kwargs: Any) -> None:
        if model_path is not None:
            kwargs["model_path"] = model_path
        self.server_args = ServerArgs.from_kwargs(**kwargs)
        self.core: EngineCore | None = EngineCore(self.server_args)

    @property
    def tokenizer(self) -> Any:
        return self._core().tokenizer

    def generate(
        self,
        prompt: str | Sequence[str] | None = None,
        input_ids: Sequence[int] | Sequence[Sequence[int]] | None = None,
        sampling_params: dict | Sequence[dict] | None = None,
        return_logprob: bool | Sequence[bool] = False,
        logprob_start_len: int | Sequence[int] = -1,
        top_logprobs_num: int | Sequence[int] = 0,
        rid: str | Sequence[str] | None = None,
    ) -> dict[str, Any] | list[dict[str, Any]]:
        core = self._core()
        items, is_batch = normalize_generate(
            prompt, input_ids, sampling_params, return_logprob, logprob_start_len, top_logprobs_num, rid
        )
        reqs = [core.make_req(it) for it in items]  # validate everything before running anything
        start = time.perf_counter()
        done: dict[int, float] = {}
        for req in reqs:
            if core.submit(req) is not None:
                done[id(req)] = 0.0
        while len(done) < len(reqs) or core.scheduler.has_work():  # has_work: an in-flight batch holds pages
            for req in core.step().finished:
                done[id(req)] = time.perf_counter() - start
        outs = [generate_output(core.tokenizer, r, done[id(r)]) for r in reqs]
        return outs if is_batch else outs[0]

    def get_server_info(self) -> dict[str, Any]:
        core = self._core()
        return {**self.server_args.to_dict(), "pool": core.pool_stats(), "context_length": core.context_length}

    def flush_cache(self) -> bool:
        return self._core().scheduler.kv.flush_cache()

    def shutdown(self) -> None:
        self.core = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def _core(self) -> EngineCore:
        if self.core is None:
            raise RuntimeError("the engine was shut down")
        return self.core
