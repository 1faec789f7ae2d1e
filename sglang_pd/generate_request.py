"""Normalising one /generate-shaped call (single item or batch) into validated per-request inputs."""

from __future__ import annotations

import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sglang_pd.disagg.bootstrap_info import BootstrapInfo
from sglang_pd.sampling.params import INT32_MAX, SamplingParams, short_repr
from sglang_pd.scheduler.req import LogprobRequest

# Engine requests one HTTP call may create (prompts x n): each costs a tokenization, a queue entry and a
# task in the server, so one body cannot queue millions of them. The offline Engine has no such bound.
MAX_REQUESTS_PER_CALL = 4096


@dataclass(frozen=True)
class GenerateItem:
    """One prompt as the engine runs it (after ``n`` is expanded: one item per choice)."""

    rid: str
    text: str | None
    input_ids: tuple[int, ...] | None
    params: SamplingParams
    logprob: LogprobRequest
    choice: int = 0  # index among the n choices of one prompt (offsets a fixed seed)
    bootstrap: BootstrapInfo | None = None  # PD mode: where P is and which room


def normalize_generate(
    prompt: str | Sequence[str] | None,
    input_ids: Sequence[int] | Sequence[Sequence[int]] | None,
    sampling_params: dict | Sequence[dict] | None,
    return_logprob: bool | Sequence[bool] = False,
    logprob_start_len: int | Sequence[int] = -1,
    top_logprobs_num: int | Sequence[int] = 0,
    rid: str | Sequence[str] | None = None,
    max_requests: int | None = None,
) -> tuple[list[GenerateItem], bool]:
    """-> (items, is_batch). Raises ValueError naming the offending field, or when the call would make more
    than ``max_requests`` engine requests (None: no bound)."""
    if (prompt is None) == (input_ids is None):
        raise ValueError("exactly one of 'text'/'prompt' and 'input_ids' must be given")
    if prompt is not None:
        if not isinstance(prompt, (str, list, tuple)):
            raise ValueError("text must be a string or a list of strings")
        is_batch = not isinstance(prompt, str)
        texts = list(prompt) if is_batch else [prompt]
        text_list: list[str | None] = []
        for t in texts:
            if not isinstance(t, str):
                raise ValueError("text must be a string or a list of strings")
            if t == "":
                raise ValueError("prompt must not be empty")
            text_list.append(t)
        ids_list: list[tuple[int, ...] | None] = [None] * len(texts)
    else:
        if not isinstance(input_ids, (list, tuple)):
            raise ValueError("input_ids must be a list of integers or a list of such lists")
        is_batch = len(input_ids) > 0 and not isinstance(input_ids[0], int)  # type: ignore[index]
        raw = list(input_ids) if is_batch else [input_ids]  # type: ignore[list-item]
        ids_list = [_check_ids(x) for x in raw]
        text_list = [None] * len(ids_list)
    count = len(ids_list)
    if count == 0:
        raise ValueError("the batch of prompts is empty")
    check_request_count("the batch of prompts", count, max_requests)
    params = _per_item("sampling_params", sampling_params, count, dict)
    lp_flags = _per_item("return_logprob", return_logprob, count, bool)
    starts = _per_item("logprob_start_len", logprob_start_len, count, int)
    tops = _per_item("top_logprobs_num", top_logprobs_num, count, int)
    rids = _per_item("rid", rid, count, str)
    items: list[GenerateItem] = []
    for i in range(count):
        sp = SamplingParams.from_dict(params[i])
        lp = LogprobRequest(bool(lp_flags[i]), _top_logprobs_num(tops[i]), _logprob_start_len(starts[i]))
        check_request_count("prompts x n", len(items) + sp.n, max_requests)
        base = rids[i] or uuid.uuid4().hex
        for c in range(sp.n):
            rid_c = base if sp.n == 1 else f"{base}-{c}"
            items.append(GenerateItem(rid_c, text_list[i], ids_list[i], sp, lp, c))
    return items, is_batch or any(it.params.n > 1 for it in items)


def check_request_count(what: str, count: int, limit: int | None = MAX_REQUESTS_PER_CALL) -> None:
    """Raise ValueError when one call would create more than ``limit`` engine requests (None: no bound)."""
    if limit is not None and count > limit:
        raise ValueError(f"{what} makes {count} requests; one call may make at most {limit}")


def _top_logprobs_num(v: int | None) -> int:
    """0 (none) when absent; more than the vocabulary is clamped to it where the vocabulary is known."""
    if v is None:
        return 0
    if not 0 <= v <= INT32_MAX:
        raise ValueError(f"top_logprobs_num must be >= 0 and <= {INT32_MAX}, got {v}")
    return v


def _logprob_start_len(v: int | None) -> int:
    """-1 (output tokens only) when absent; a start at or past the prompt's end asks for no input logprobs."""
    if v is None:
        return -1
    if not -1 <= v <= INT32_MAX:
        raise ValueError(f"logprob_start_len must be -1 or in [0, {INT32_MAX}], got {v}")
    return v


SEED_MODULUS = 1 << 63


def request_seed(item: GenerateItem, rng: random.Random) -> int:
    """The seed behind every random draw of one choice: its own (offset by the choice index) or a fresh one."""
    if item.params.seed is not None:
        return (item.params.seed + item.choice) % SEED_MODULUS
    return rng.randrange(SEED_MODULUS)


def _check_ids(ids: Any) -> tuple[int, ...]:
    if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise ValueError("input_ids must be a list of integers or a list of such lists")
    if not ids:
        raise ValueError("input_ids must not be empty")
    return tuple(ids)


def _per_item(name: str, value: Any, count: int, kind: type) -> list[Any]:
    """A single value applies to every item; a list must have one entry per item. Types are checked."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * count
    if len(values) != count:
        raise ValueError(f"{name} has {len(values)} entries for {count} prompts")
    for v in values:
        if v is not None and (not isinstance(v, kind) or (kind is int and isinstance(v, bool))):
            raise ValueError(
                f"{name} must be {_KIND_NAMES[kind]} (or a list of them, one per prompt), got {short_repr(v)}"
            )
    return values


_KIND_NAMES = {dict: "an object", bool: "a boolean", int: "an integer", str: "a string"}
