"""One benchmark run: resolve the model, warm up, flush the cache, send every prompt on schedule, collect records."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import aiohttp

from .arrivals import arrival_offsets
from .client import auth_headers, flush_cache, make_session, send_request
from .config import BenchConfig
from .datasets import SAFE_VOCAB_SIZE, Prompt, TextTokenizer, build_prompts, load_tokenizer
from .progress import make_progress
from .records import RequestRecord

WARMUP_MAX_TOKENS = 16


@dataclass(frozen=True)
class RunResult:
    model: str | None
    records: tuple[RequestRecord, ...]
    duration: float  # seconds from the first send to the last answer
    flush_status: str | None = None  # None: --flush-cache not asked; else client.flush_cache's answer


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


async def resolve_model(session: aiohttp.ClientSession, cfg: BenchConfig, headers: dict[str, str]) -> str | None:
    """--model, else the first id of GET /v1/models; None for sglang when the server has no list."""
    if cfg.model:
        return cfg.model
    try:
        async with session.get(cfg.base_url + "/v1/models", headers=headers) as resp:
            resp.raise_for_status()
            return str((await resp.json(content_type=None))["data"][0]["id"])
    except Exception as exc:  # noqa: BLE001 - reported below with what to do about it
        if cfg.backend == "sglang":
            log(f"GET /v1/models failed ({type(exc).__name__}: {exc}); /generate needs no model name")
            return None
        raise RuntimeError(f"GET /v1/models failed ({exc}); pass --model") from exc


def vocab_size_for(cfg: BenchConfig, tok: TextTokenizer | None) -> int:
    if cfg.random_vocab_size is not None:
        return cfg.random_vocab_size
    if tok is not None:
        return int(tok.vocab_size)
    if cfg.dataset_name != "random":
        log(f"no --tokenizer or --random-vocab-size: random ids drawn from [0, {SAFE_VOCAB_SIZE})")
    return SAFE_VOCAB_SIZE


def finalize(records: Sequence[RequestRecord], tok: TextTokenizer | None) -> tuple[RequestRecord, ...]:
    """With a tokenizer: count the generated text's tokens; it becomes output_len when the server gave none."""
    if tok is None:
        return tuple(records)
    out = []
    for r in records:
        if not r.success:
            out.append(r)
            continue
        n = len(tok.encode(r.generated_text, add_special_tokens=False)) if r.generated_text else 0
        out.append(replace(r, output_len_retokenized=n, output_len=r.output_len if r.output_len_reported else n))
    return tuple(out)


async def warmup(
    session: aiohttp.ClientSession,
    cfg: BenchConfig,
    model: str | None,
    prompts: Sequence[Prompt],
    headers: dict[str, str],
) -> None:
    """``cfg.warmup_requests`` short requests, not counted; raises if every one fails."""
    if cfg.warmup_requests == 0:
        return
    picks = [prompts[i % len(prompts)] for i in range(cfg.warmup_requests)]
    batch = [replace(p, output_len=min(p.output_len, WARMUP_MAX_TOKENS)) for p in picks]
    records = await asyncio.gather(*(send_request(session, cfg, model, p, headers) for p in batch))
    if not any(r.success for r in records):
        raise RuntimeError(f"warm-up failed: {records[0].error}")
    log(f"warm-up: {sum(r.success for r in records)}/{len(records)} requests succeeded")


async def dispatch(
    session: aiohttp.ClientSession,
    cfg: BenchConfig,
    model: str | None,
    prompts: Sequence[Prompt],
    headers: dict[str, str],
) -> tuple[list[RequestRecord], float]:
    """Send each prompt at its Poisson arrival time (behind the semaphore when capped)."""
    offsets = arrival_offsets(cfg.request_rate, len(prompts), cfg.seed, cfg.burstiness)
    sem = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    progress = make_progress(len(prompts), cfg.disable_tqdm)

    async def one(prompt: Prompt) -> RequestRecord:
        if sem is None:
            rec = await send_request(session, cfg, model, prompt, headers)
        else:
            async with sem:
                rec = await send_request(session, cfg, model, prompt, headers)
        progress.tick()
        return rec

    start = time.perf_counter()
    tasks: list[asyncio.Task[RequestRecord]] = []
    for prompt, offset in zip(prompts, offsets, strict=True):
        delay = start + offset - time.perf_counter()  # absolute schedule: sleeps do not drift
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(prompt)))
    records = await asyncio.gather(*tasks)
    duration = time.perf_counter() - start
    progress.close()
    return list(records), duration


async def run_benchmark(cfg: BenchConfig, tok: Any | None = None) -> RunResult:
    """The whole run against ``cfg.base_url``; ``tok`` overrides loading ``cfg.tokenizer``."""
    if tok is None and cfg.tokenizer:
        tok = load_tokenizer(cfg.tokenizer)
    headers = auth_headers(cfg.api_key)
    async with make_session(cfg) as session:
        model = await resolve_model(session, cfg, headers)
        prompts = build_prompts(cfg, tok, vocab_size_for(cfg, tok))
        log(
            f"{cfg.backend} {cfg.url} model={model} prompts={len(prompts)} "
            f"input_tokens={sum(p.prompt_len for p in prompts)} rate={cfg.request_rate}"
        )
        await warmup(session, cfg, model, prompts, headers)
        flushed = await flush_cache(session, cfg.base_url, headers) if cfg.flush_cache else None
        if flushed is not None and flushed != "ok":
            log(f"warning: POST /flush_cache: {flushed}; running with whatever the server has cached")
        records, duration = await dispatch(session, cfg, model, prompts, headers)
    return RunResult(model, finalize(records, tok), duration, flushed)
