"""Per-request sampling parameters: SGLang's ``sampling_params`` names and defaults.

Validated once, at construction: every field is coerced to its declared type (``stop`` and
``stop_token_ids`` become tuples, integral floats become ints) and range-checked; any failure is a
``ValueError`` that names the parameter and its allowed range, so the HTTP layer can return it as
a 400 verbatim. Decisions:
- ``top_k``: -1 disables it (whole vocabulary); 0 is accepted as a synonym and normalised to -1
  (vLLM's convention, which OpenAI-style clients send); other values must be >= 1.
- ``temperature`` below ``GREEDY_TEMPERATURE_EPS`` (or ``top_k == 1``) means greedy.
- ``seed`` is any int, normalised into ``[0, 2**63)``; SGLang's spelling ``sampling_seed`` is
  accepted by ``from_dict`` as an alias.
- A key given as ``None`` in ``from_dict`` takes its default (SGLang does the same), so
  ``max_new_tokens=None`` means the default 128, not "unbounded".
- Constrained decoding (``json_schema``, ``regex``, ``ebnf``, ...) is not supported: a non-None
  value is a ``ValueError``; None is ignored.
- Every integer is bounded (counts and token ids by ``INT32_MAX``, ``n`` by ``MAX_N``) and every list
  by a length, so a request that passes here can be carried by msgpack, numpy and torch everywhere
  after (token ids are checked against the vocabulary in ``check_vocab``, max_new_tokens against the
  context length by ``request_validation``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

GREEDY_TEMPERATURE_EPS = 1e-6  # temperature in [0, eps) samples greedily (as SGLang)
SEED_MODULUS = 1 << 63  # seeds live in [0, 2**63): non-negative int64 on every device
MAX_ABS_LOGIT_BIAS = 100.0  # OpenAI's bound on logit_bias values
INT32_MAX = (1 << 31) - 1  # bound of every count and token id (no context or vocabulary comes near it)
MAX_N = 128  # choices per prompt, on /generate and the OpenAI routes alike
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 1024
MAX_TOKEN_ID_ENTRIES = 2048  # entries of stop_token_ids and of logit_bias
_MAX_KEY_CHARS = 12  # a logit_bias key is a token id written out: "2147483647" has 10 digits
_UNSUPPORTED = ("json_schema", "regex", "ebnf", "structural_tag", "stop_regex", "custom_params", "stream_interval")
_ALIASES = {"sampling_seed": "seed"}


@dataclass(frozen=True)
class SamplingParams:
    """Immutable, validated sampling parameters of one request (see module docstring)."""

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    seed: int | None = None
    n: int = 1
    # token id -> additive bias in [-100, 100]; None when empty. Excluded from hash (a dict).
    logit_bias: dict[int, float] | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        for name, value in _coerce_all(self).items():
            object.__setattr__(self, name, value)
        _check_ranges(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> SamplingParams:
        """Build from a request's ``sampling_params`` JSON object; None means all defaults."""
        if d is None:
            return cls()
        if not isinstance(d, Mapping):
            raise ValueError(f"sampling_params must be an object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            name = _ALIASES.get(key, key)
            if key in _UNSUPPORTED:
                if value is not None:
                    raise ValueError(f"sampling parameter '{key}' is not supported by this server")
                continue
            if name not in known:
                raise ValueError(f"unknown sampling parameter '{key}'")
            if value is None:
                continue
            if name in kwargs and kwargs[name] != value:
                raise ValueError(f"sampling parameter '{name}' given twice (as '{key}')")
            kwargs[name] = value
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """JSON/msgpack-safe dict (lists, str keys) that ``from_dict`` maps back to an equal object."""
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        out["stop"] = list(self.stop)
        out["stop_token_ids"] = list(self.stop_token_ids)
        if self.logit_bias is not None:
            out["logit_bias"] = {str(k): v for k, v in self.logit_bias.items()}
        return out

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE_EPS or self.top_k == 1

    def check_vocab(self, vocab_size: int) -> None:
        """Raise ValueError if a token id in ``logit_bias`` or ``stop_token_ids`` is outside ``[0, vocab_size)``."""
        for tok in self.logit_bias or {}:
            if tok >= vocab_size:
                raise ValueError(f"logit_bias keys must be token ids in [0, {vocab_size - 1}], got {tok}")
        for tok in self.stop_token_ids:
            if tok >= vocab_size:
                raise ValueError(f"stop_token_ids must be token ids in [0, {vocab_size - 1}], got {tok}")


# ----------------------------------------------------------------------------------------------
# Coercion: type checks only; ranges are checked afterwards on the coerced values.


def _as_int(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{name} must be an integer, got {short_repr(v)}")
    if isinstance(v, float):
        if not (math.isfinite(v) and v.is_integer()):
            raise ValueError(f"{name} must be an integer, got {short_repr(v)}")
        return int(v)
    return int(v)


def _as_float(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{name} must be a number, got {short_repr(v)}")
    try:
        f = float(v)
    except OverflowError:  # an integer beyond float range
        raise ValueError(f"{name} must be a finite number, got an integer too large for a float") from None
    if not math.isfinite(f):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    return f


def _as_bool(name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"{name} must be a boolean, got {short_repr(v)}")
    return v


def _check_len(name: str, items: Any, limit: int) -> None:
    if len(items) > limit:
        raise ValueError(f"{name} may hold at most {limit} entries, got {len(items)}")


def _as_stop(v: Any) -> tuple[str, ...]:
    if v is None:
        return ()
    items = [v] if isinstance(v, str) else v
    if isinstance(items, (list, tuple)):
        _check_len("stop", items, MAX_STOP_STRINGS)
    if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) for s in items):
        raise ValueError(f"stop must be a string or a list of strings, got {short_repr(v)}")
    longest = max((len(s) for s in items), default=0)
    if longest > MAX_STOP_STRING_CHARS:
        raise ValueError(f"stop strings may be at most {MAX_STOP_STRING_CHARS} characters long, got {longest}")
    return tuple(dict.fromkeys(s for s in items if s))  # drop empties and duplicates, keep order


def _as_stop_token_ids(v: Any) -> tuple[int, ...]:
    if v is None:
        return ()
    if isinstance(v, (set, frozenset)):
        v = sorted(v)
    if not isinstance(v, (list, tuple)):
        raise ValueError(f"stop_token_ids must be a list of token ids (integers >= 0), got {short_repr(v)}")
    _check_len("stop_token_ids", v, MAX_TOKEN_ID_ENTRIES)
    ids = tuple(_as_int("stop_token_ids", t) for t in v)
    bad = next((t for t in ids if not 0 <= t <= INT32_MAX), None)
    if bad is not None:
        raise ValueError(f"stop_token_ids must be token ids >= 0 (and <= {INT32_MAX}), got {bad}")
    return tuple(dict.fromkeys(ids))


def _as_seed(v: Any) -> int | None:
    if v is None:
        return None
    return _as_int("seed", v) % SEED_MODULUS


def _as_logit_bias(v: Any) -> dict[int, float] | None:
    if v is None:
        return None
    if not isinstance(v, Mapping):
        raise ValueError(f"logit_bias must be an object mapping token ids to biases, got {short_repr(v)}")
    _check_len("logit_bias", v, MAX_TOKEN_ID_ENTRIES)
    out: dict[int, float] = {}
    for key, bias in v.items():
        tok = _logit_bias_key(key)
        b = _as_float("logit_bias value", bias)
        if tok < 0 or tok > INT32_MAX or abs(b) > MAX_ABS_LOGIT_BIAS:
            raise ValueError(
                f"logit_bias needs token ids >= 0 and biases in [-100, 100], got {short_repr(key)}: {short_repr(bias)}"
            )
        out[tok] = b
    return out or None


def _logit_bias_key(key: Any) -> int:
    """A token id given as a JSON object key (a string of digits) or, from Python, as an int."""
    try:
        if isinstance(key, str):
            if len(key) > _MAX_KEY_CHARS:
                raise ValueError
            return int(key)
        return _as_int("logit_bias key", key)
    except ValueError:
        raise ValueError(f"logit_bias keys must be token ids (integers >= 0), got {short_repr(key)}") from None


def short_repr(v: Any, limit: int = 64) -> str:
    """``repr(v)`` cut to ``limit`` characters: client values go into messages, but not a megabyte of them."""
    text = repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_INTS = ("max_new_tokens", "min_new_tokens", "top_k", "n")
_FLOATS = ("temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty")
_BOOLS = ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim")


def _coerce_all(p: SamplingParams) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in _INTS:
        out[name] = _as_int(name, getattr(p, name))
    for name in _FLOATS:
        out[name] = _as_float(name, getattr(p, name))
    for name in _BOOLS:
        out[name] = _as_bool(name, getattr(p, name))
    out["stop"] = _as_stop(p.stop)
    out["stop_token_ids"] = _as_stop_token_ids(p.stop_token_ids)
    out["seed"] = _as_seed(p.seed)
    out["logit_bias"] = _as_logit_bias(p.logit_bias)
    if out["top_k"] == 0:
        out["top_k"] = -1  # 0 = disabled, as -1
    return out


def _check_ranges(p: SamplingParams) -> None:
    checks: tuple[tuple[bool, str], ...] = (
        (0 <= p.max_new_tokens <= INT32_MAX, f"max_new_tokens must be >= 0 and <= {INT32_MAX}, got {p.max_new_tokens}"),
        (
            0 <= p.min_new_tokens <= p.max_new_tokens,
            f"min_new_tokens must be in [0, max_new_tokens={p.max_new_tokens}], got {p.min_new_tokens}",
        ),
        (p.temperature >= 0.0, f"temperature must be >= 0 (0 = greedy), got {p.temperature}"),
        (0.0 < p.top_p <= 1.0, f"top_p must be in (0, 1], got {p.top_p}"),
        # beyond the vocabulary top_k means "whole vocabulary" (the sampler clamps it)
        (
            p.top_k == -1 or 1 <= p.top_k <= INT32_MAX,
            f"top_k must be -1 (or 0: disabled) or >= 1 and <= {INT32_MAX}, got {p.top_k}",
        ),
        (0.0 <= p.min_p <= 1.0, f"min_p must be in [0, 1], got {p.min_p}"),
        (
            0.0 < p.repetition_penalty <= 2.0,
            f"repetition_penalty must be in (0, 2] (1 = none), got {p.repetition_penalty}",
        ),
        (-2.0 <= p.frequency_penalty <= 2.0, f"frequency_penalty must be in [-2, 2], got {p.frequency_penalty}"),
        (-2.0 <= p.presence_penalty <= 2.0, f"presence_penalty must be in [-2, 2], got {p.presence_penalty}"),
        (1 <= p.n <= MAX_N, f"n must be >= 1 and <= {MAX_N}, got {p.n}"),
    )
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
