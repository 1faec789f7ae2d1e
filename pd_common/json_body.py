"""Request bodies as bounded JSON: depth and integer size are checked once, at the edge.

``json.loads`` recurses per nesting level (a 100k-deep body raises RecursionError deep in the parser),
accepts integers of any length (a 5000-digit ``max_tokens``), and later stages (msgpack IPC, the
scheduler) cannot carry such values. ``loads_bounded`` turns all of these into ``JSONBodyError`` with
a message fit for a 400, so no request can fail anywhere else for being too deep or too large.
"""

from __future__ import annotations

import json
from typing import Any

MAX_DEPTH = 32  # the deepest legitimate body (chat messages with content parts, logit_bias) is ~6
INT_MIN = -(1 << 63)
INT_MAX = (1 << 63) - 1  # every integer must fit int64: msgpack, numpy and torch carry no more
MAX_INT_DIGITS = 20


class JSONBodyError(ValueError):
    """The body is not acceptable JSON; the message says why (client-facing)."""


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise JSONBodyError(f"integer {text[:24]}... is out of range (a 64-bit signed integer is the largest accepted)")
    value = int(text)
    if not INT_MIN <= value <= INT_MAX:
        raise JSONBodyError(f"integer {value} is out of range (a 64-bit signed integer is the largest accepted)")
    return value


def _bounded_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise JSONBodyError(f"number {text[:24]} is out of range")
    return value


def _reject_constant(name: str) -> Any:
    raise JSONBodyError(f"{name} is not valid JSON")


def check_depth(value: Any, max_depth: int = MAX_DEPTH) -> None:
    """Raise JSONBodyError if ``value`` nests lists/objects deeper than ``max_depth`` (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > max_depth:
                raise JSONBodyError(f"the JSON body nests deeper than {max_depth} levels")
            children = item.values() if isinstance(item, dict) else item
            stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))


def loads_bounded(raw: bytes | str, max_depth: int = MAX_DEPTH) -> Any:
    """Parse ``raw`` as JSON with every integer in int64, no NaN/Infinity, and at most ``max_depth`` levels."""
    try:
        value = json.loads(raw, parse_int=_bounded_int, parse_float=_bounded_float, parse_constant=_reject_constant)
    except RecursionError:
        raise JSONBodyError(f"the JSON body nests deeper than {max_depth} levels") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise JSONBodyError(f"malformed JSON body: {e}") from None
    check_depth(value, max_depth)
    return value
