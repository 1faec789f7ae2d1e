"""/v1/chat/completions: message validation, the response object, and the stream's chunks.

Messages reach the chat template as ``{"role", "content": str}`` (plus ``name`` / ``tool_call_id``
when given): text parts of a content list are joined with newlines; image, audio and file parts
are refused (text-only models). Without ``max_tokens`` / ``max_completion_tokens`` a choice may
use the rest of the context window, as vLLM and SGLang do. Tools, function calling and structured
``response_format`` are not supported: a non-empty value is a 400 naming the parameter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sglang_pd.generate_request import GenerateItem
from sglang_pd.scheduler.req import LogprobRequest
from sglang_pd.server.openai_protocol import (
    CommonOptions,
    ResponseMeta,
    TokenTexts,
    bad,
    choice_rid,
    clamp_logprob,
    finish_reason,
    get_bool,
    get_int,
    parse_common,
    reject_if,
    usage,
    with_max_tokens,
)
from sglang_pd.server.req_state import GenerateChunk, ReqState

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_TOP_LOGPROBS = 20  # OpenAI's bound
_MEDIA_PARTS = ("image_url", "input_image", "image", "input_audio", "audio_url", "file", "video_url")
_RESERVED_TEMPLATE_KWARGS = ("add_generation_prompt", "tokenize", "chat_template", "conversation", "messages")


@dataclass(frozen=True)
class ChatRequest:
    opts: CommonOptions
    messages: tuple[dict[str, str], ...]
    logprobs: bool
    top_logprobs: int
    template_kwargs: dict[str, Any] = field(default_factory=dict)

    def items(self, prompt_ids: Sequence[int], context_length: int) -> list[GenerateItem]:
        """One engine request per choice; without a token limit, the rest of the context window."""
        params = self.opts.params
        if not self.opts.max_tokens_given:
            params = with_max_tokens(params, max(context_length - len(prompt_ids), 1))
        lp = LogprobRequest(self.logprobs, self.top_logprobs if self.logprobs else 0, -1)
        n = self.opts.n
        return [GenerateItem(choice_rid(self.opts.rid, j, n), None, tuple(prompt_ids), params, lp, j) for j in range(n)]


def parse_chat(body: dict[str, Any], served_model: str, context_length: int) -> ChatRequest:
    messages = parse_messages(body.get("messages"))
    reject_if(body, "tools", lambda v: v == [], "no tool calling")
    reject_if(body, "tool_choice", lambda v: v == "none", "no tool calling")
    reject_if(body, "functions", lambda v: v == [], "no function calling")
    reject_if(body, "function_call", lambda v: v == "none", "no function calling")
    reject_if(body, "response_format", lambda v: isinstance(v, dict) and v.get("type") == "text", "only type 'text'")
    logprobs = get_bool(body, "logprobs")
    top = get_int(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top and not logprobs:
        raise bad("top_logprobs", "top_logprobs requires logprobs to be true")
    opts = parse_common(body, served_model, ("max_completion_tokens", "max_tokens"), context_length)
    return ChatRequest(opts, messages, logprobs, top or 0, template_kwargs(body))


def template_kwargs(body: dict[str, Any]) -> dict[str, Any]:
    """``chat_template_kwargs`` (vLLM/SGLang extra), minus the keys the server sets itself."""
    kwargs = body.get("chat_template_kwargs")
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict):
        raise bad("chat_template_kwargs", "chat_template_kwargs must be an object")
    return {k: v for k, v in kwargs.items() if k not in _RESERVED_TEMPLATE_KWARGS}


def parse_messages(messages: Any) -> tuple[dict[str, str], ...]:
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "messages must be a non-empty list of message objects")
    return tuple(_message(m, k) for k, m in enumerate(messages))


def _message(m: Any, k: int) -> dict[str, str]:
    if not isinstance(m, dict):
        raise bad("messages", f"messages[{k}] must be an object")
    role = m.get("role")
    if role not in ROLES:
        raise bad("messages", f"messages[{k}].role must be one of {', '.join(ROLES)}; got {role!r}")
    out = {"role": role, "content": _content(m.get("content"), k, role)}
    for key in ("name", "tool_call_id"):
        if isinstance(m.get(key), str):
            out[key] = m[key]
    return out


def _content(content: Any, k: int, role: str) -> str:
    if isinstance(content, str):
        return content
    if content is None and role == "assistant":  # an assistant turn that only called tools
        return ""
    if not isinstance(content, list):
        raise bad("messages", f"messages[{k}].content must be a string or a list of content parts")
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in _MEDIA_PARTS:
            raise bad("messages", f"messages[{k}]: content of type '{kind}' is not supported (text-only model)")
        if kind != "text" or not isinstance(part.get("text"), str):
            raise bad("messages", f"messages[{k}].content parts must be {{'type': 'text', 'text': str}}")
        texts.append(part["text"])
    return "\n".join(texts)


# --- logprobs, response and stream ----------------------------------------------------------------
def _entry(texts: TokenTexts, value: float | None, token_id: int) -> dict[str, Any]:
    text = texts(int(token_id))
    return {"token": text, "logprob": clamp_logprob(value), "bytes": list(text.encode("utf-8"))}


def logprob_content(
    texts: TokenTexts, token_lps: Sequence[Sequence[Any]], top_lps: Sequence[Sequence[Sequence[Any]]]
) -> list[dict[str, Any]]:
    """``logprobs.content`` of consecutive tokens: each with its top alternatives (exactly top_logprobs)."""
    out = []
    for k, (value, token_id, *_) in enumerate(token_lps):
        item = _entry(texts, value, token_id)
        top = top_lps[k] if k < len(top_lps) else ()
        item["top_logprobs"] = [_entry(texts, v, t) for v, t, *_ in top]
        out.append(item)
    return out


def chat_response(req: ChatRequest, meta: ResponseMeta, states: Sequence[ReqState], texts: TokenTexts) -> dict:
    choices = []
    for index, s in enumerate(states):
        logprobs = (
            {"content": logprob_content(texts, s.output_token_logprobs, s.output_top_logprobs)}
            if req.logprobs
            else None
        )
        choices.append(
            {
                "index": index,
                "message": {"role": "assistant", "content": s.text},
                "logprobs": logprobs,
                "finish_reason": finish_reason(s),
            }
        )
    return {
        "id": meta.id,
        "object": meta.object,
        "created": meta.created,
        "model": meta.model,
        "choices": choices,
        "usage": usage(states, req.opts.n),
    }


class ChatStream:
    """Engine chunks -> ``chat.completion.chunk`` events: role first, content deltas, then the finish."""

    def __init__(self, req: ChatRequest, meta: ResponseMeta, texts: TokenTexts) -> None:
        self.req, self.meta, self.texts = req, meta, texts
        self.states: dict[int, ReqState] = {}

    def opening(self) -> list[dict[str, Any]]:
        return [self._event(j, {"role": "assistant", "content": ""}, None, None) for j in range(self.req.opts.n)]

    def on_chunk(self, index: int, chunk: GenerateChunk) -> list[dict[str, Any]]:
        self.states[index] = chunk.state
        logprobs = None
        if self.req.logprobs and chunk.output_token_logprobs_delta:
            logprobs = {
                "content": logprob_content(
                    self.texts, chunk.output_token_logprobs_delta, chunk.output_top_logprobs_delta
                )
            }
        events = []
        if chunk.text_delta or logprobs:
            events.append(self._event(index, {"content": chunk.text_delta}, logprobs, None))
        if chunk.finished:
            events.append(self._event(index, {}, None, finish_reason(chunk.state)))
        return events

    def closing(self) -> list[dict[str, Any]]:
        if not self.req.opts.include_usage:
            return []
        return [self.meta.usage_chunk([self.states[i] for i in sorted(self.states)], self.req.opts.n)]

    def _event(self, index: int, delta: dict, logprobs: dict | None, finish: str | None) -> dict[str, Any]:
        return self.meta.chunk([{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}])
