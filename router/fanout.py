"""PD mode: requests with several choices become one Job per choice, and their answers one answer.

Rule (documented in the README of the router): in PD mode the router sends every worker call
exactly one choice, so the bootstrap fields are always scalars and every choice has its own room.
A /generate batch, a /generate item with n > 1, an OpenAI request with n > 1 or several prompts are
split: choice j of prompt i is job k = i*n + j (the order the workers number choices in) with
``n = 1``, ``seed + j`` when a seed was given (so a seeded request samples the same as on a
colocated worker, which offsets the seed by the choice index), and the rid the worker would have
given that choice. Each job is picked, retried and aborted on its own; the first job that fails
for good fails the whole request (the others are aborted).

Merging: /generate answers a list in job order (streams: each event tagged ``index`` = k). OpenAI
answers get one ``id`` (``cmpl-{rid}`` / ``chatcmpl-{rid}``), choices re-indexed to k, and usage
summed as a colocated worker counts it (prompt tokens once per prompt, cached tokens: the best
choice of each prompt); in streams each job's usage chunk is held back and one summed chunk is sent
before ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, Callable, Mapping
from typing import Any

from router import sse
from router.dispatch import Dispatcher
from router.jobs import Job, Merge, client_rid
from router.validation import Parsed, key_of_ids

_PER_ITEM = ("sampling_params", "return_logprob", "logprob_start_len", "top_logprobs_num", "rid")
_PROMPT_KEYS = ("text", "prompt", "input_ids")


def needs_split(parsed: Parsed) -> bool:
    return parsed.choices > 1 or parsed.is_batch


def _seeded(params: Mapping[str, Any], j: int, n: int, seed_keys: tuple[str, ...]) -> dict[str, Any]:
    out = {k: v for k, v in params.items() if k not in ("n", "best_of")}
    if n > 1:
        for key in seed_keys:
            if isinstance(out.get(key), int) and not isinstance(out[key], bool):
                out[key] = out[key] + j
    return out


def split_generate(
    route: str, body: Mapping[str, Any], parsed: Parsed, request_id: str, new_rid: Callable[[], str]
) -> list[Job]:
    key = "input_ids" if body.get("input_ids") is not None else ("text" if "text" in body else "prompt")
    raw = body[key]
    items = raw if parsed.is_batch else [raw]
    bases = client_rid(body, len(items), True, new_rid)
    common = {k: v for k, v in body.items() if k not in _PER_ITEM and k not in _PROMPT_KEYS}

    def item_value(name: str, i: int) -> Any:
        v = body.get(name)
        return v[i] if isinstance(v, list) else v

    jobs: list[Job] = []
    for i, item in enumerate(items):
        n = parsed.n[i]
        params = item_value("sampling_params", i) or {}
        route_key = item if isinstance(item, str) else key_of_ids(tuple(item))
        for j in range(n):
            sub = {**common, key: item, "sampling_params": _seeded(params, j, n, ("seed", "sampling_seed"))}
            for name in ("return_logprob", "logprob_start_len", "top_logprobs_num"):
                if body.get(name) is not None:
                    sub[name] = item_value(name, i)
            rid = bases[i] if n == 1 else f"{bases[i]}-{j}"
            merge: Merge = "generate" if parsed.input_logprobs[i] else None
            jobs.append(Job(route, sub, rid, (1,), parsed.stream, route_key, merge, request_id))
    return jobs


def split_openai(
    route: str, body: Mapping[str, Any], parsed: Parsed, request_id: str, new_rid: Callable[[], str]
) -> tuple[list[Job], str]:
    """-> (jobs, base rid)."""
    base = client_rid(body, 1, False, new_rid)
    assert isinstance(base, str)
    n = parsed.n[0]
    if parsed.kind == "chat":
        prompts: list[Any] = [None]
    else:
        p = body["prompt"]
        prompts = [p] if isinstance(p, str) or (p and not isinstance(p[0], (str, list))) else list(p)
    jobs: list[Job] = []
    for i, prompt in enumerate(prompts):
        for j in range(n):
            sub = _seeded({k: v for k, v in body.items() if k != "rid"}, j, n, ("seed",))
            key = parsed.routing_key
            if prompt is not None:
                sub["prompt"] = prompt
                key = prompt if isinstance(prompt, str) else key_of_ids(tuple(prompt))
            merge: Merge = "completions" if parsed.input_logprobs[i] else None
            jobs.append(Job(route, sub, f"{base}-{i * n + j}", (1,), parsed.stream, key, merge, request_id))
    return jobs, base


class Merger:
    """Turns per-job answers/events into the answer a colocated worker would have given."""

    def __init__(self, parsed: Parsed, base_rid: str | None, prompts_n: tuple[int, ...]) -> None:
        self.parsed = parsed
        self.n = prompts_n
        prefix = "chatcmpl" if parsed.kind == "chat" else "cmpl"
        self.id = f"{prefix}-{base_rid}" if base_rid is not None else None
        self.usage: dict[int, dict[str, Any]] = {}
        self.template: dict[str, Any] = {}

    def unary(self, answers: list[bytes]) -> bytes:
        payloads = [json.loads(a) for a in answers]
        if self.parsed.kind == "generate":
            return json.dumps(payloads, ensure_ascii=False).encode()
        out = dict(payloads[0])
        out["id"] = self.id
        out["choices"] = [{**p["choices"][0], "index": k} for k, p in enumerate(payloads)]
        out["usage"] = self._sum({k: p.get("usage") or {} for k, p in enumerate(payloads)})
        return json.dumps(out, ensure_ascii=False).encode()

    def event(self, k: int, payload: Any) -> Any:
        if not isinstance(payload, dict) or sse.error_of(payload) is not None:
            return payload
        if self.parsed.kind == "generate":
            payload["index"] = k
            return payload
        payload["id"] = self.id
        if payload.get("usage") and not payload.get("choices"):
            self.usage[k] = payload["usage"]
            self.template = {key: payload.get(key) for key in ("object", "created", "model")}
            return None
        for choice in payload.get("choices") or ():
            choice["index"] = k
        return payload

    def closing(self) -> bytes:
        if not self.usage:
            return b""
        return sse.encode({"id": self.id, **self.template, "choices": [], "usage": self._sum(self.usage)})

    def _sum(self, usages: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
        prompt = completion = cached = 0
        k = 0
        for n in self.n:
            group = [usages.get(k + j) or {} for j in range(n)]
            k += n
            prompt += int(group[0].get("prompt_tokens") or 0)
            completion += sum(int(u.get("completion_tokens") or 0) for u in group)
            cached += max(int((u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0) for u in group)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        }


async def fanout_unary(dispatcher: Dispatcher, jobs: list[Job], merger: Merger) -> bytes:
    tasks = [asyncio.ensure_future(dispatcher.unary(job)) for job in jobs]
    try:
        results = await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return merger.unary([raw for raw, _ in results])


async def fanout_stream(dispatcher: Dispatcher, jobs: list[Job], merger: Merger) -> AsyncGenerator[bytes, None]:
    queue: asyncio.Queue[tuple[int, bytes | BaseException | None]] = asyncio.Queue()

    async def pump(k: int, job: Job) -> None:
        try:
            async with contextlib.aclosing(dispatcher.stream(job)) as events:
                async for blob in events:
                    queue.put_nowait((k, blob))
            queue.put_nowait((k, None))
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            queue.put_nowait((k, e))

    tasks = [asyncio.ensure_future(pump(k, job)) for k, job in enumerate(jobs)]
    try:
        remaining = len(jobs)
        while remaining:
            k, item = await queue.get()
            if item is None:
                remaining -= 1
                continue
            if isinstance(item, BaseException):
                raise item
            out, failed = [], False
            for payload in sse.payloads(item):
                mapped = merger.event(k, payload)
                if mapped is not None:
                    out.append(sse.encode(mapped))
                    failed = failed or sse.error_of(mapped) is not None
            if out:
                yield b"".join(out)
            if failed:  # one choice's stream ended in an error: that ends the request
                yield sse.DONE
                return
        yield merger.closing() + sse.DONE
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
