"""OpenAI request parsing shared by /v1/completions and /v1/chat/completions, plus the common output parts.

Parsing is pure: a JSON body in, frozen dataclasses out, or ``APIError`` 400 (404 for an unknown
model) naming the offending parameter in ``param``. Unknown body keys are ignored (vLLM and SGLang
do the same; clients send vendor extras). SGLang/vLLM extras (``top_k``, ``min_p``,
``repetition_penalty``, ``min_tokens``, ``ignore_eos``, ``stop_token_ids``, ``skip_special_tokens``,
``no_stop_trim``, ``logit_bias``, ``rid``) map onto ``SamplingParams``; its ``ValueError`` becomes
the 400 (SGLang names in its message are translated back to the OpenAI ones).

Choice numbering: prompt ``i``'s choice ``j`` is choice ``i * n + j``; the engine runs one request
per choice, with rid ``{base}`` when there is a single choice, else ``{base}-{index}``.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

# MAX_N: n is bounded by the same constant here and on /generate (SamplingParams checks it).
from sglang_pd.sampling.params import MAX_N, SamplingParams, short_repr
from sglang_pd.server.errors import APIError
from sglang_pd.server.req_state import ReqState

MIN_LOGPROB = -9999.0  # JSON has no -inf; vLLM clamps the same way
FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "abort"}
_SGLANG_NAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}
# OpenAI/vLLM body key -> SamplingParams field, for keys passed through unchanged in meaning.
_EXTRA_PARAMS = {
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "min_tokens": "min_new_tokens",
    "ignore_eos": "ignore_eos",
    "stop_token_ids": "stop_token_ids",
    "skip_special_tokens": "skip_special_tokens",
    "no_stop_trim": "no_stop_trim",
    "logit_bias": "logit_bias",
    "seed": "seed",
}
_OPENAI_PARAMS = frozenset(_EXTRA_PARAMS) | {
    "stop",
    "temperature",
    "top_p",
    "presence_penalty",
    "frequency_penalty",
    "max_tokens",
    "n",
}


def bad(param: str, message: str) -> APIError:
    return APIError(400, message, param)


# --- typed field readers (None when absent or null) ----------------------------------------------
def get_int(body: Mapping[str, Any], name: str, lo: int | None = None, hi: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
        raise bad(name, f"{name} must be an integer, got {short_repr(v)}")
    v = int(v)
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
    except OverflowError:  # an integer too large for a float
        finite = False
    if not finite:
        raise bad(name, f"{name} must be a finite number, got {short_repr(v)}")
    if v < lo or (lo_open and v == lo) or v > hi:
        raise bad(name, f"{name} must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {v}")
    return float(v)


def get_bool(body: Mapping[str, Any], name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(name, f"{name} must be a boolean, got {short_repr(v)}")
    return v


def get_str(body: Mapping[str, Any], name: str) -> str | None:
    v = body.get(name)
    if v is not None and not isinstance(v, str):
        raise bad(name, f"{name} must be a string, got {short_repr(v)}")
    return v


def get_stop(body: Mapping[str, Any]) -> list[str] | None:
    v = body.get("stop")
    if v is None or isinstance(v, str):
        return None if v is None else [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise bad("stop", f"stop must be a string or a list of strings, got {short_repr(v)}")
    return v


# --- what both routes share ----------------------------------------------------------------------
@dataclass(frozen=True)
class CommonOptions:
    """Route-independent options of one OpenAI request."""

    rid: str  # base request id; choice rids derive from it
    n: int
    stream: bool
    include_usage: bool
    params: SamplingParams  # max_new_tokens as asked (chat without a limit: see ``max_tokens_given``)
    max_tokens_given: bool


def check_model(body: Mapping[str, Any], served: str) -> None:
    """``model`` may be absent; otherwise it must name the served model (404 as vLLM)."""
    model = get_str(body, "model")
    if model is not None and model != served:
        raise APIError(404, f"The model `{model}` does not exist.", "model")


def parse_stream(body: Mapping[str, Any]) -> tuple[bool, bool]:
    """-> (stream, include_usage)."""
    stream = get_bool(body, "stream")
    opts = body.get("stream_options")
    if opts is None:
        return stream, False
    if not isinstance(opts, dict):
        raise bad("stream_options", "stream_options must be an object")
    if not stream:
        raise bad("stream_options", "stream_options is only allowed when stream is true")
    return stream, get_bool(opts, "include_usage")


def sampling_params(body: Mapping[str, Any], max_tokens: int, n: int) -> SamplingParams:
    """OpenAI sampling fields + extras -> SamplingParams (400 naming the parameter)."""
    d: dict[str, Any] = {"max_new_tokens": max_tokens, "n": n, "stop": get_stop(body)}
    d["temperature"] = get_float(body, "temperature", 0.0, 2.0)
    d["top_p"] = get_float(body, "top_p", 0.0, 1.0, lo_open=True)
    d["presence_penalty"] = get_float(body, "presence_penalty", -2.0, 2.0)
    d["frequency_penalty"] = get_float(body, "frequency_penalty", -2.0, 2.0)
    for key, field_name in _EXTRA_PARAMS.items():
        d[field_name] = body.get(key)
    try:
        return SamplingParams.from_dict(d)
    except ValueError as e:
        message = _openai_names(str(e))
        word = message.split(" ", 1)[0]
        raise APIError(400, message, word if word in _OPENAI_PARAMS else None) from e


def _openai_names(message: str) -> str:
    for sglang_name, openai_name in _SGLANG_NAMES.items():
        message = message.replace(sglang_name, openai_name)
    return message


def parse_common(
    body: Mapping[str, Any], served: str, max_tokens_keys: Sequence[str], default_max_tokens: int
) -> CommonOptions:
    """Model, stream, n, rid and sampling: everything but the prompt and the logprob options."""
    check_model(body, served)
    stream, include_usage = parse_stream(body)
    n = get_int(body, "n", 1, MAX_N) or 1
    given = [v for v in (get_int(body, k, 1) for k in max_tokens_keys) if v is not None]
    rid = get_str(body, "rid")
    if rid == "":
        raise bad("rid", "rid must not be empty")
    get_str(body, "user")  # accepted and ignored, but typed
    params = sampling_params(body, given[0] if given else default_max_tokens, n)
    return CommonOptions(rid or uuid.uuid4().hex, n, stream, include_usage, params, bool(given))


def reject_if(body: Mapping[str, Any], name: str, allowed: Callable[[Any], bool], what: str) -> None:
    """400 naming ``name`` when the body holds a value for it that ``allowed`` refuses."""
    if name in body and body[name] is not None and not allowed(body[name]):
        raise bad(name, f"{name} is not supported by this server ({what})")


def choice_rid(base: str, index: int, total: int) -> str:
    return base if total == 1 else f"{base}-{index}"


def with_max_tokens(params: SamplingParams, max_tokens: int) -> SamplingParams:
    try:
        return replace(params, max_new_tokens=max_tokens)
    except ValueError as e:
        raise bad("min_tokens", _openai_names(str(e))) from e


# --- output pieces ---------------------------------------------------------------------------------
def finish_reason(state: ReqState) -> str | None:
    if state.finish_reason is None:
        return None
    kind = state.finish_reason.get("type", "abort")
    return FINISH_REASONS.get(kind, kind)


def usage(states: Sequence[ReqState], n: int) -> dict[str, Any]:
    """Prompt tokens count once per prompt (not per choice); cached: the best hit among its choices."""
    prompts = [states[i : i + n] for i in range(0, len(states), n)]
    prompt_tokens = sum(group[0].prompt_tokens for group in prompts)
    completion = sum(len(s.output_ids) for s in states)
    cached = sum(max(s.cached_tokens for s in group) for group in prompts)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def clamp_logprob(v: float | None) -> float | None:
    if v is None:
        return None
    return v if math.isfinite(v) else MIN_LOGPROB


class TokenTexts:
    """Token id -> its text (special tokens kept), memoised for one response."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self.cache.get(token_id)
        if text is None:
            text = self._decode(token_id)
            self.cache[token_id] = text
        return text

    def many(self, ids: Iterable[int]) -> list[str]:
        return [self(t) for t in ids]

    def _decode(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id], skip_special_tokens=False)


@dataclass(frozen=True)
class ResponseMeta:
    """The fields every response object and stream chunk of one request repeats."""

    id: str
    object: str
    created: int
    model: str
    include_usage: bool = False

    def chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            out["usage"] = None  # OpenAI sends null usage on every chunk but the last in this mode
        return out

    def usage_chunk(self, states: Sequence[ReqState], n: int) -> dict[str, Any]:
        return {**self.chunk([]), "usage": usage(states, n)}
