"""Datasets, reproducible from a seed: which prompts a run sends.

``random-ids``: token ids drawn uniformly from the vocabulary (special ids excluded when a
tokenizer is known); sent as ``input_ids`` / a token-id ``prompt``, so the prompt length is exact.
``random``: the same ids decoded to text and re-encoded once, so the text is about the asked
length; ``prompt_len`` is its re-encoded length (the server's count may differ by a few tokens,
and the server's usage wins when it reports one).
Lengths follow SGLang: uniform integers in ``[max(1, int(len * ratio)), len]``.
``generated-shared-prefix`` (shared_prefix.py) and ``chat-synthetic`` (chat_synthetic.py) have
their own modules; ``build_prompts`` picks by ``--dataset-name``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .chat_synthetic import chat_synthetic_prompts
from .prompt import SAFE_VOCAB_SIZE, Prompt, TextTokenizer, allowed_ids, draw_ids, text_of_length
from .shared_prefix import shared_prefix_prompts

if TYPE_CHECKING:
    from .config import BenchConfig

__all__ = [
    "SAFE_VOCAB_SIZE",
    "Prompt",
    "TextTokenizer",
    "build_prompts",
    "load_tokenizer",
    "random_ids_prompts",
    "random_text_prompts",
    "prompts_as_text",
    "sample_lengths",
]


def load_tokenizer(path: str) -> Any:
    """A Hugging Face tokenizer from a local directory (or hub name when online)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def sample_lengths(rng: np.random.Generator, length: int, ratio: float, n: int) -> np.ndarray:
    """``n`` integers uniform in ``[max(1, int(length * ratio)), length]``."""
    low = max(1, int(length * ratio))
    return rng.integers(low, length + 1, size=n)


def random_ids_prompts(
    n: int,
    input_len: int,
    output_len: int,
    ratio: float,
    vocab_size: int,
    seed: int,
    special_ids: Sequence[int] = (),
) -> list[Prompt]:
    rng = np.random.default_rng(seed)
    in_lens = sample_lengths(rng, input_len, ratio, n)
    out_lens = sample_lengths(rng, output_len, ratio, n)
    allowed = allowed_ids(vocab_size, special_ids)
    prompts = []
    for in_len, out_len in zip(in_lens, out_lens, strict=True):
        ids = draw_ids(rng, allowed, int(in_len))
        prompts.append(Prompt(None, ids, len(ids), int(out_len)))
    return prompts


def random_text_prompts(
    n: int, input_len: int, output_len: int, ratio: float, tok: TextTokenizer, seed: int
) -> list[Prompt]:
    id_prompts = random_ids_prompts(n, input_len, output_len, ratio, tok.vocab_size, seed, tok.all_special_ids)
    out = []
    for p in id_prompts:
        assert p.input_ids is not None
        text, count = text_of_length(tok, p.input_ids, p.prompt_len)
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
    if cfg.dataset_name == "random" and tok is None:
        raise ValueError("--dataset-name random needs --tokenizer (or use --dataset-name random-ids)")
    prompts = _generate(cfg, tok, vocab_size)
    if cfg.backend == "openai-chat" and any(p.text is None for p in prompts):
        if tok is None:
            raise ValueError(f"--backend openai-chat sends text: {cfg.dataset_name} needs --tokenizer to make it")
        return prompts_as_text(prompts, tok)
    return prompts


def _generate(cfg: BenchConfig, tok: TextTokenizer | None, vocab_size: int) -> list[Prompt]:
    special = tok.all_special_ids if tok is not None else ()
    if cfg.dataset_name == "generated-shared-prefix":
        return shared_prefix_prompts(
            cfg.gsp_num_groups,
            cfg.gsp_prompts_per_group,
            cfg.gsp_system_prompt_len,
            cfg.gsp_question_len,
            cfg.gsp_output_len,
            vocab_size,
            cfg.seed,
            special,
            tok,
        )
    if cfg.dataset_name == "chat-synthetic":
        return chat_synthetic_prompts(
            cfg.num_prompts,
            cfg.random_input_len,
            cfg.random_output_len,
            cfg.chat_long_fraction,
            cfg.chat_long_input_len,
            vocab_size,
            cfg.seed,
            special,
            tok,
        )
    args = (cfg.num_prompts, cfg.random_input_len, cfg.random_output_len, cfg.random_range_ratio)
    if cfg.dataset_name == "random":
        assert tok is not None
        return random_text_prompts(*args, tok, cfg.seed)
    return random_ids_prompts(*args, vocab_size, cfg.seed, special)
