"""What every dataset produces (Prompt) and the token-id / text helpers the generators share."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

SAFE_VOCAB_SIZE = 256  # ids every real vocabulary has; used when nothing tells us the vocab size


class TextTokenizer(Protocol):
    """The part of a Hugging Face tokenizer the benchmark uses."""

    vocab_size: int
    all_special_ids: list[int]

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


@dataclass(frozen=True)
class Prompt:
    text: str | None  # exactly one of text / input_ids is set
    input_ids: tuple[int, ...] | None
    prompt_len: int  # tokens, as far as the client knows
    output_len: int  # max_new_tokens asked for


def allowed_ids(vocab_size: int, special_ids: Sequence[int]) -> np.ndarray:
    """Ids in ``[0, vocab_size)`` that are not special: what random prompts are drawn from."""
    allowed = np.setdiff1d(np.arange(vocab_size), np.asarray(list(special_ids), dtype=np.int64))
    if allowed.size == 0:
        raise ValueError("no non-special token ids to sample prompts from")
    return allowed


def draw_ids(rng: np.random.Generator, allowed: np.ndarray, n: int) -> tuple[int, ...]:
    return tuple(int(t) for t in rng.choice(allowed, size=int(n)))


def text_of_length(tok: TextTokenizer, ids: Sequence[int], target: int) -> tuple[str, int]:
    """Decode ``ids``, re-encode, cut to ``target`` tokens, decode again: (text, its token count)."""
    text = tok.decode(list(ids), skip_special_tokens=True)
    again = tok.encode(text, add_special_tokens=False)[:target]
    text = tok.decode(again, skip_special_tokens=True)
    return text, count_tokens(tok, text)


def count_tokens(tok: TextTokenizer, text: str) -> int:
    return len(tok.encode(text, add_special_tokens=False))
