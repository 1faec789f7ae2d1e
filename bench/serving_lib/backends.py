"""Per-backend request bodies and the rules that turn each response event into StreamState updates.

sglang (POST /generate): events carry cumulative (or, with incremental streaming, delta) ``text``
and ``meta_info.completion_tokens``, the authority for how many tokens a chunk carried.
openai / openai-chat (POST /v1/completions, /v1/chat/completions): content chunks in
``choices[0].text`` / ``choices[0].delta.content``; one token per chunk unless the chunk carries
a cumulative ``usage`` (continuous usage stats); the final usage chunk gives the totals.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from .config import BenchConfig
from .datasets import Prompt
from .records import StreamState

EventApplier = Callable[[StreamState, Any, float], None]


def build_payload(cfg: BenchConfig, model: str | None, prompt: Prompt) -> dict[str, Any]:
    if cfg.backend == "sglang":
        return _sglang_payload(cfg, prompt)
    body: dict[str, Any] = {"model": model, "temperature": 0.0, "stream": cfg.stream}
    if cfg.backend == "openai":
        body["prompt"] = prompt.text if prompt.text is not None else list(prompt.input_ids or ())
        body["max_tokens"] = prompt.output_len
    else:
        if prompt.text is None:
            raise ValueError("openai-chat needs text prompts")
        body["messages"] = [{"role": "user", "content": prompt.text}]
        body["max_completion_tokens"] = prompt.output_len
    if cfg.stream:
        body["stream_options"] = {"include_usage": True}
    if cfg.ignore_eos:
        body["ignore_eos"] = True  # vLLM/SGLang extra field; left out entirely when disabled
    return body


def _sglang_payload(cfg: BenchConfig, prompt: Prompt) -> dict[str, Any]:
    body: dict[str, Any] = {
        "sampling_params": {
            "max_new_tokens": prompt.output_len,
            "temperature": 0.0,
            "ignore_eos": cfg.ignore_eos,
        },
        "stream": cfg.stream,
    }
    if prompt.text is not None:
        body["text"] = prompt.text
    else:
        body["input_ids"] = list(prompt.input_ids or ())
    return body


def error_message(err: Any) -> str:
    """The message of an error envelope value (``{"message": ...}`` or a bare string)."""
    if isinstance(err, dict):
        msg = err.get("message") or err.get("msg") or err.get("detail")
        return str(msg) if msg else str(err)
    return str(err)


def _finish_reason(value: Any) -> tuple[str | None, str | None]:
    """(reason, abort message): SGLang sends ``{"type": ..., "message"?: ...}``, OpenAI a string."""
    if value is None:
        return None, None
    if isinstance(value, dict):
        kind = value.get("type")
        reason = str(kind) if kind is not None else None
        if kind == "abort":
            return reason, str(value.get("message") or "request aborted by the server")
        return reason, None
    return str(value), None


def apply_sglang_event(state: StreamState, data: Any, ts: float) -> None:
    if not isinstance(data, dict):
        state.fail(f"unexpected event: {str(data)[:200]}")
        return
    if "error" in data:
        state.fail(error_message(data["error"]))
        return
    meta = data.get("meta_info") or {}
    text = data.get("text") or ""
    if text.startswith(state.full_text):  # cumulative text (default); else a delta
        text = text[len(state.full_text) :]
    reported = meta.get("completion_tokens")
    if isinstance(reported, int):
        k = reported - state.tokens
        state.reported_tokens = reported
    else:
        k = 1 if text else 0
    if isinstance(meta.get("prompt_tokens"), int):
        state.prompt_tokens = meta["prompt_tokens"]
    reason, abort = _finish_reason(meta.get("finish_reason"))
    state.finish_reason = reason or state.finish_reason
    if abort is not None:
        state.fail(abort)
    if k > 0:
        state.content(ts, k, text)
    else:
        state.full_text += text


def _choice_text(choice: dict[str, Any], chat: bool) -> str:
    if not chat:
        return choice.get("text") or ""
    part = choice.get("delta") or choice.get("message") or {}
    return part.get("content") or part.get("reasoning_content") or part.get("reasoning") or ""


def _apply_openai(state: StreamState, data: Any, ts: float, chat: bool) -> None:
    if not isinstance(data, dict):
        state.fail(f"unexpected event: {str(data)[:200]}")
        return
    if "error" in data:
        state.fail(error_message(data["error"]))
        return
    usage = data.get("usage") or {}
    completion = usage.get("completion_tokens")
    if isinstance(usage.get("prompt_tokens"), int):
        state.prompt_tokens = usage["prompt_tokens"]
    choices = data.get("choices") or []
    if choices:
        choice = choices[0]
        state.finish_reason = choice.get("finish_reason") or state.finish_reason
        text = _choice_text(choice, chat)
        if text:
            k = completion - state.tokens if isinstance(completion, int) else 1
            state.content(ts, max(k, 1), text)
    if isinstance(completion, int):
        state.reported_tokens = completion


def apply_openai_event(state: StreamState, data: Any, ts: float) -> None:
    _apply_openai(state, data, ts, chat=False)


def apply_openai_chat_event(state: StreamState, data: Any, ts: float) -> None:
    _apply_openai(state, data, ts, chat=True)


APPLIERS: Mapping[str, EventApplier] = MappingProxyType(
    {
        "sglang": apply_sglang_event,
        "openai": apply_openai_event,
        "openai-chat": apply_openai_chat_event,
    }
)
