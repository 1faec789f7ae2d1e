"""Random prompts, reproducible from a seed.

``random-ids``: token ids drawn uniformly from the vocabulary (special ids excluded when a
tokenizer is known); sent as ``input_ids`` / a token-id ``prompt``, so the prompt length is exact.
``random``: the same ids decoded to text and re-encoded once, so the text is about the asked
length; ``prompt_len`` is its re-encoded length (the server's count may differ by a few tokens,
and the server's usage wins when it reports one).
Lengths follow SGLang: uniform integers in ``[max(1, int(len * ratio)), len]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, Sequence

import numpy as np

if TYPE_CHECKING:
    from .config import BenchConfig

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


def load_tokenizer(path: str) -> Any:
    """A Hugging Face tokenizer from a local directory (or hub name when online)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def sample_lengths(rng: np.random.Generator, length: int, ratio: float, n: int) -> np.ndarray:
    """``n`` integers uniform in ``[max(1, int(length * ratio)), length]``."""
    low = max(1, int(length * ratio))
    return rng.integers(low, length + 1, size=n)


def _allowed_ids(vocab_size: int, special_ids: Sequence[int]) -> np.ndarray:
    allowed = np.setdiff1d(np.arange(vocab_size), np.asarray(list(special_ids), dtype=np.int64))
    if allowed.size == 0:
        raise ValueError("no non-special token ids to sample prompts from")
    return allowed


def random_ids_prompts(
    n: int, input_len: int, output_len: int, ratio: float, vocab_size: int, seed: int,
    special_ids: Sequence[int] = (),
) -> list[Prompt]:
    rng = np.random.default_rng(seed)
    in_lens = sample_lengths(rng, input_len, ratio, n)
    out_lens = sample_lengths(rng, output_len, ratio, n)
    allowed = _allowed_ids(vocab_size, special_ids)
    prompts = []
    for in_len, out_len in zip(in_lens, out_lens, strict=True):
        ids = tuple(int(t) for t in rng.choice(allowed, size=int(in_len)))
        prompts.append(Prompt(None, ids, len(ids), int(out_len)))
    return prompts


def _text_of_length(tok: TextTokenizer, ids: Sequence[int], target: int) -> tuple[str, int]:
    """Decode ``ids``, re-encode, cut to ``target`` tokens, decode again: (text, its token count)."""
    text = tok.decode(list(ids), skip_special_tokens=True)
    again = tok.encode(text, add_special_tokens=False)[:target]
    text = tok.decode(again, skip_special_tokens=True)
    return text, len(tok.encode(text, add_special_tokens=False))


def random_text_prompts(
    n: int, input_len: int, output_len: int, ratio: float, tok: TextTokenizer, seed: int
) -> list[Prompt]:
    id_prompts = random_ids_prompts(
        n, input_len, output_len, ratio, tok.vocab_size, seed, tok.all_special_ids
    )
    out = []
    for p in id_prompts:
        assert p.input_ids is not None
        text, count = _text_of_length(tok, p.input_ids, p.prompt_len)
        out.append(Prompt(text, None, count, p.output_len))
    return out


def prompts_as_text(prompts: Sequence[Prompt], tok: TextTokenizer) -> list[Prompt]:
    """Token-id prompts decoded to text (for chat, which takes no ids); lengths re-counted."""
    out = []
    for p in prompts:
        if p.text is not None:
            out.append(p)
            continue
        assert p.input_ids is not None
        text = tok.decode(list(p.input_ids), skip_special_tokens=True)
        out.append(Prompt(text, None, len(tok.encode(text, add_special_tokens=False)), p.output_len))
    return out


def build_prompts(cfg: BenchConfig, tok: TextTokenizer | None, vocab_size: int) -> list[Prompt]:
    """The run's prompts for ``cfg``; raises ValueError when the combination needs a tokenizer."""
    args = (cfg.num_prompts, cfg.random_input_len, cfg.random_output_len, cfg.random_range_ratio)
    if cfg.dataset_name == "random":
        if tok is None:
            raise ValueError("--dataset-name random needs --tokenizer (or use --dataset-name random-ids)")
        return random_text_prompts(*args, tok, cfg.seed)
    special = tok.all_special_ids if tok is not None else ()
    prompts = random_ids_prompts(*args, vocab_size, cfg.seed, special)
    if cfg.backend == "openai-chat":
        if tok is None:
            raise ValueError("--backend openai-chat sends text: random-ids needs --tokenizer to decode them")
        return prompts_as_text(prompts, tok)
    return prompts
