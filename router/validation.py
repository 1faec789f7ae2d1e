"""Checks a request before any worker sees it: shapes, types and obviously bad sampling values -> 400.

The router checks what it can without a tokenizer or the model (the worker remains the authority:
context length, unknown sampling keys, chat-template problems are its 400s, passed through). The
messages and ``param`` names match the worker's. A passing request yields a ``Parsed`` summary
that routing and PD fan-out use; the body itself is forwarded unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pd_common.json_body import INT_MAX, INT_MIN
from router.errors import APIError

Kind = Literal["generate", "completions", "chat"]
MAX_N = 128  # the worker's bound on OpenAI n; the router applies it to /generate's sampling_params.n too
MAX_COMPLETION_LOGPROBS = 5
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class Parsed:
    kind: Kind
    stream: bool
    n: tuple[int, ...]  # choices per prompt, one entry per prompt
    routing_key: str  # the first prompt, as cache_aware keys it (text, or token ids as characters)
    input_logprobs: tuple[bool, ...]  # per prompt: the answer must carry prompt logprobs (PD: P's)
    is_batch: bool = False  # /generate was given a list of prompts

    @property
    def choices(self) -> int:
        return sum(self.n)


def bad(param: str | None, message: str) -> APIError:
    return APIError(400, message, param)


# --- typed readers: None when absent or null -------------------------------------------------------
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) or isinstance(v, float) and v.is_integer()


def get_int(body: Mapping[str, Any], name: str, lo: int | None = None, hi: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if not _is_int(v):
        raise bad(name, f"{name} must be an integer, got {v!r}")
    v = int(v)
    if not INT_MIN <= v <= INT_MAX:
        raise bad(name, f"{name} is out of range (a 64-bit signed integer is the largest accepted)")
    if lo is not None and v < lo:
        raise bad(name, f"{name} must be at least {lo}, got {v}")
    if hi is not None and v > hi:
        raise bad(name, f"{name} must be at most {hi}, got {v}")
    return v


def get_float(body: Mapping[str, Any], name: str, lo: float, hi: float, lo_open: bool = False) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    try:
        finite = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
    except OverflowError:
        finite = False
    if not finite:
        raise bad(name, f"{name} must be a finite number, got {v!r}")
    if v < lo or (lo_open and v == lo) or v > hi:
        raise bad(name, f"{name} must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {v}")
    return float(v)


def get_bool(body: Mapping[str, Any], name: str) -> bool:
    v = body.get(name)
    if v is not None and not isinstance(v, bool):
        raise bad(name, f"{name} must be a boolean, got {v!r}")
    return bool(v)


def get_str(body: Mapping[str, Any], name: str) -> str | None:
    v = body.get(name)
    if v is not None and not isinstance(v, str):
        raise bad(name, f"{name} must be a string, got {v!r}")
    return v


def check_stop(body: Mapping[str, Any], name: str = "stop") -> None:
    v = body.get(name)
    if v is None or isinstance(v, str):
        return
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise bad(name, f"{name} must be a string or a list of strings, got {v!r}")


def check_token_ids(v: Any, name: str) -> tuple[int, ...]:
    if not isinstance(v, list) or not v or not all(_is_int(t) and 0 <= t <= INT_MAX for t in v):
        raise bad(name, f"{name} must be a non-empty list of token ids (integers >= 0)")
    return tuple(int(t) for t in v)


_SAMPLING_CHECKS: dict[str, Callable[[Mapping[str, Any], str], object]] = {
    "max_new_tokens": lambda sp, k: get_int(sp, k, 0),
    "min_new_tokens": lambda sp, k: get_int(sp, k, 0),
    "temperature": lambda sp, k: get_float(sp, k, 0.0, math.inf),
    "top_p": lambda sp, k: get_float(sp, k, 0.0, 1.0, lo_open=True),
    "top_k": lambda sp, k: get_int(sp, k, -1),  # -1 and 0 disable it
    "min_p": lambda sp, k: get_float(sp, k, 0.0, 1.0),
    "repetition_penalty": lambda sp, k: get_float(sp, k, 0.0, 2.0, lo_open=True),
    "frequency_penalty": lambda sp, k: get_float(sp, k, -2.0, 2.0),
    "presence_penalty": lambda sp, k: get_float(sp, k, -2.0, 2.0),
    "seed": get_int,
    "ignore_eos": get_bool,
    "skip_special_tokens": get_bool,
    "no_stop_trim": get_bool,
    "stop": check_stop,
    "stop_token_ids": lambda sp, k: sp[k] is None or check_token_ids(sp[k], k),
}


def check_sampling(sp: Mapping[str, Any]) -> int:
    """SGLang ``sampling_params`` (or OpenAI extras with the same names) -> n. 400 on a bad value.

    Only the keys present are looked at (a request names a few of the many known ones)."""
    for key in sp:
        check = _SAMPLING_CHECKS.get(key)
        if check is not None:
            check(sp, key)
    return get_int(sp, "n", 1, MAX_N) or 1


def key_of_ids(ids: tuple[int, ...]) -> str:
    """Token ids as one character each, so the prefix tree handles text and ids alike."""
    return "".join(chr(int(t) % 0x110000) for t in ids)  # ids may be integral floats (1.0): JSON numbers


# --- /generate ----------------------------------------------------------------------------------
def parse_generate(body: Mapping[str, Any]) -> Parsed:
    text, ids = body.get("text", body.get("prompt")), body.get("input_ids")
    if (text is None) == (ids is None):
        raise bad(None, "exactly one of 'text'/'prompt' and 'input_ids' must be given")
    if text is not None:
        is_batch = isinstance(text, list)
        texts = text if is_batch else [text]
        if not texts or not all(isinstance(t, str) and t for t in texts):
            raise bad("text", "text must be a non-empty string or a non-empty list of non-empty strings")
        keys = list(texts)
    else:
        is_batch = isinstance(ids, list) and bool(ids) and isinstance(ids[0], list)
        lists: list[Any] = ids if is_batch and isinstance(ids, list) else [ids]
        keys = [key_of_ids(check_token_ids(x, "input_ids")) for x in lists]
    count = len(keys)
    params = _per_item(body, "sampling_params", count, dict)
    flags = _per_item(body, "return_logprob", count, bool)
    _per_item(body, "logprob_start_len", count, int)
    for top in _per_item(body, "top_logprobs_num", count, int):
        if top is not None and top < 0:
            raise bad("top_logprobs_num", f"top_logprobs_num must be >= 0, got {top}")
    for rid in _per_item(body, "rid", count, str):
        if rid == "":
            raise bad("rid", "rid must not be empty")
    ns = tuple(check_sampling(sp or {}) for sp in params)
    stream = get_bool(body, "stream")
    return Parsed("generate", stream, ns, keys[0], tuple(bool(f) for f in flags), is_batch)


def _per_item(body: Mapping[str, Any], name: str, count: int, kind: type) -> list[Any]:
    """A single value applies to every item; a list must have one entry per item, each of ``kind``."""
    v = body.get(name)
    if v is None:
        return [None] * count
    values = v if isinstance(v, list) else [v] * count
    if len(values) != count:
        raise bad(name, f"{name} has {len(values)} entries for {count} prompts")
    for x in values:
        ok = x is None or (_is_int(x) and INT_MIN <= x <= INT_MAX if kind is int else isinstance(x, kind))
        if not ok or (kind is int and isinstance(x, bool)):
            raise bad(name, f"{name} must be a {kind.__name__} or a list of them, got {x!r}")
    return values


# --- OpenAI routes --------------------------------------------------------------------------------
def _openai_common(body: Mapping[str, Any], max_keys: tuple[str, ...]) -> tuple[bool, int]:
    get_str(body, "model")
    get_str(body, "user")
    if get_str(body, "rid") == "":
        raise bad("rid", "rid must not be empty")
    stream = get_bool(body, "stream")
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict):
            raise bad("stream_options", "stream_options must be an object")
        if not stream:
            raise bad("stream_options", "stream_options is only allowed when stream is true")
        get_bool(opts, "include_usage")
    n = get_int(body, "n", 1, MAX_N) or 1
    for key in max_keys:
        get_int(body, key, 1)
    get_float(body, "temperature", 0.0, 2.0)
    get_float(body, "top_p", 0.0, 1.0, lo_open=True)
    get_float(body, "presence_penalty", -2.0, 2.0)
    get_float(body, "frequency_penalty", -2.0, 2.0)
    extras = ("top_k", "min_p", "repetition_penalty", "seed", "ignore_eos", "stop_token_ids")
    check_sampling({k: body[k] for k in extras if k in body})
    get_int(body, "min_tokens", 0)
    check_stop(body)
    return stream, n


def parse_completions(body: Mapping[str, Any]) -> Parsed:
    prompt = body.get("prompt")
    if prompt is None:
        raise bad("prompt", "prompt is required")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts:
        raise bad("prompt", "prompt must be a non-empty string, list of strings, or list of token ids")
    if all(_is_int(t) and not isinstance(t, str) for t in prompts):
        keys = [key_of_ids(check_token_ids(prompts, "prompt"))]
    else:
        keys = []
        for p in prompts:
            if isinstance(p, str) and p:
                keys.append(p)
            elif isinstance(p, list):
                keys.append(key_of_ids(check_token_ids(p, "prompt")))
            else:
                raise bad("prompt", "each prompt must be a non-empty string or a non-empty list of token ids")
    logprobs = get_int(body, "logprobs", 0, MAX_COMPLETION_LOGPROBS)
    echo = get_bool(body, "echo")
    stream, n = _openai_common(body, ("max_tokens",))
    best_of = get_int(body, "best_of", 1)
    if best_of is not None and best_of != n:
        raise bad("best_of", f"best_of must equal n ({n}) on this server, got {best_of}")
    wants = echo and logprobs is not None
    return Parsed("completions", stream, (n,) * len(keys), keys[0], (wants,) * len(keys))


def parse_chat(body: Mapping[str, Any]) -> Parsed:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "messages must be a non-empty list of message objects")
    parts: list[str] = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad("messages", f"messages[{k}] must be an object")
        if not isinstance(m.get("role"), str):
            raise bad("messages", f"messages[{k}].role must be a string")
        content = m.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(str(c.get("text", "")) for c in content if isinstance(c, dict))
        elif content is not None:
            raise bad("messages", f"messages[{k}].content must be a string or a list of content parts")
    logprobs = get_bool(body, "logprobs")
    top = get_int(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top and not logprobs:
        raise bad("top_logprobs", "top_logprobs requires logprobs to be true")
    stream, n = _openai_common(body, ("max_tokens", "max_completion_tokens"))
    return Parsed("chat", stream, (n,), "\n".join(parts), (False,))


PARSERS = {"generate": parse_generate, "completions": parse_completions, "chat": parse_chat}
