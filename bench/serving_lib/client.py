"""One benchmark request over a shared aiohttp session -> RequestRecord (never raises)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp

from .backends import APPLIERS, EventApplier, build_payload, error_message
from .config import BenchConfig
from .datasets import Prompt
from .records import RequestRecord, StreamState
from .sse import SSEEvent, SSEParser

MAX_ERROR_CHARS = 500


def make_session(cfg: BenchConfig) -> aiohttp.ClientSession:
    """One session for the whole run: no connection cap (the semaphore is the cap)."""
    timeout = aiohttp.ClientTimeout(total=cfg.request_timeout_s, sock_connect=30.0)
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
    return aiohttp.ClientSession(timeout=timeout, connector=connector, read_bufsize=1 << 20)


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def http_error(status: int, body: str) -> str:
    """``HTTP <status>: <message>``, the message taken from an OpenAI error envelope when present."""
    message = body.strip()
    try:
        data = json.loads(body)
        if isinstance(data, dict) and "error" in data:
            message = error_message(data["error"])
        elif isinstance(data, dict) and "detail" in data:
            message = str(data["detail"])
    except ValueError:
        pass
    return f"HTTP {status}: {message}"[:MAX_ERROR_CHARS]


def handle_event(event: SSEEvent, state: StreamState, apply: EventApplier, ts: float) -> bool:
    """Apply one SSE event; True at ``[DONE]``."""
    if event.is_done:
        state.done = True
        return True
    try:
        data = event.json()
    except ValueError:
        state.fail(f"invalid JSON in stream: {event.data[:200]}")
        return False
    apply(state, data, ts)
    return False


async def consume_stream(resp: aiohttp.ClientResponse, state: StreamState, apply: EventApplier) -> None:
    parser = SSEParser()
    async for chunk in resp.content.iter_any():
        ts = time.perf_counter()
        for event in parser.feed(chunk):
            if handle_event(event, state, apply, ts):
                return
    ts = time.perf_counter()
    for event in parser.flush():
        handle_event(event, state, apply, ts)


async def _exchange(
    session: aiohttp.ClientSession,
    cfg: BenchConfig,
    body: dict[str, Any],
    headers: dict[str, str],
    state: StreamState,
) -> None:
    apply = APPLIERS[cfg.backend]
    async with session.post(cfg.url, json=body, headers=headers) as resp:
        if resp.status != 200:
            state.fail(http_error(resp.status, await resp.text(errors="replace")))
        elif cfg.stream:
            await consume_stream(resp, state, apply)
        else:
            data = await resp.json(content_type=None)
            apply(state, data, time.perf_counter())
            state.ttft = None  # not streamed: TTFT is the whole latency (SGLang's convention)
            state.done = True


async def send_request(
    session: aiohttp.ClientSession,
    cfg: BenchConfig,
    model: str | None,
    prompt: Prompt,
    headers: dict[str, str],
) -> RequestRecord:
    body = build_payload(cfg, model, prompt)
    state = StreamState(time.perf_counter())
    try:
        await _exchange(session, cfg, body, headers, state)
    except TimeoutError:
        state.fail(f"timeout: no complete answer within {cfg.request_timeout_s:g} s")
    except Exception as exc:  # noqa: BLE001 - a failed request is a record, never a crash
        state.fail(f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS])
    return state.to_record(prompt.prompt_len, time.perf_counter())


FLUSH_BUSY_STATUSES = (400, 409, 503)  # "requests still running": our worker answers 400, then retry
FLUSH_UNSUPPORTED_STATUSES = (404, 405, 501)


async def flush_cache(
    session: aiohttp.ClientSession, base_url: str, headers: dict[str, str], attempts: int = 20, retry_s: float = 0.5
) -> str:
    """POST /flush_cache; returns "ok", "unsupported" (a server without the route) or "failed: ...".

    Never raises: a benchmark against a foreign OpenAI-compatible server runs on without it.
    Retries while the server says it is busy (the warm-up's requests may still be finishing).
    """
    last = ""
    for _ in range(attempts):
        try:
            async with session.post(base_url + "/flush_cache", headers=headers) as resp:
                body = await resp.text(errors="replace")
                if resp.status == 200:
                    return "ok"
                if resp.status in FLUSH_UNSUPPORTED_STATUSES:
                    return "unsupported"
                last = http_error(resp.status, body)
                if resp.status not in FLUSH_BUSY_STATUSES:
                    break
        except (TimeoutError, aiohttp.ClientError) as exc:
            last = f"{type(exc).__name__}: {exc}"
            break
        await asyncio.sleep(retry_s)
    return f"failed: {last}"[:MAX_ERROR_CHARS]
