"""``chat-synthetic``: ShareGPT-like request lengths without downloading ShareGPT.

Input and output lengths are independent lognormals with these means (before clamping):

- input mean 161.3 tokens, output mean 338.0 tokens: the ShareGPT means reported in the vLLM
  paper (Kwon et al., "Efficient Memory Management for Large Language Model Serving with
  PagedAttention", SOSP 2023, Fig. 11, Llama tokenizer);
- shape sigma 1.0 (input) and 0.8 (output), in log space: chosen by eye to resemble that
  figure's histograms (a mode well below the mean, a long right tail); not fitted to raw data.

``mu = ln(mean) - sigma**2 / 2`` keeps the stated mean. Lengths are rounded and clamped to
``[MIN_LEN, --random-input-len]`` and ``[MIN_LEN, --random-output-len]`` (MIN_LEN = 4, the
shortest ShareGPT sample SGLang and vLLM keep). With ``--chat-long-fraction F`` each request is,
with probability F, a long-document request instead: input uniform in
``[L // 2, L]`` with ``L = --chat-long-input-len`` (not clamped), output from the same chat
distribution. F = 0 (the default) is pure chat. Token ids without a tokenizer, text with one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .prompt import Prompt, TextTokenizer, allowed_ids, draw_ids, text_of_length

INPUT_MEAN, INPUT_SIGMA = 161.3, 1.0
OUTPUT_MEAN, OUTPUT_SIGMA = 338.0, 0.8
MIN_LEN = 4


def lognormal_lengths(rng: np.random.Generator, mean: float, sigma: float, max_len: int, n: int) -> np.ndarray:
    """``n`` lognormal lengths of the given mean, rounded, clamped to ``[min(MIN_LEN, max_len), max_len]``."""
    mu = math.log(mean) - sigma * sigma / 2.0
    raw = np.rint(rng.lognormal(mu, sigma, size=n)).astype(np.int64)
    return np.clip(raw, min(MIN_LEN, max_len), max_len)


def chat_lengths(
    n: int, max_input: int, max_output: int, long_fraction: float, long_input_len: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(input lengths, output lengths) of ``n`` requests."""
    rng = np.random.default_rng([seed, 3])
    in_lens = lognormal_lengths(rng, INPUT_MEAN, INPUT_SIGMA, max_input, n)
    out_lens = lognormal_lengths(rng, OUTPUT_MEAN, OUTPUT_SIGMA, max_output, n)
    is_long = rng.random(n) < long_fraction
    long_lens = rng.integers(max(1, long_input_len // 2), long_input_len + 1, size=n)
    return np.where(is_long, long_lens, in_lens), out_lens


def chat_synthetic_prompts(
    n: int,
    max_input: int,
    max_output: int,
    long_fraction: float,
    long_input_len: int,
    vocab_size: int,
    seed: int,
    special_ids: Sequence[int] = (),
    tok: TextTokenizer | None = None,
) -> list[Prompt]:
    in_lens, out_lens = chat_lengths(n, max_input, max_output, long_fraction, long_input_len, seed)
    rng = np.random.default_rng([seed, 4])
    allowed = allowed_ids(vocab_size, special_ids)
    prompts = []
    for in_len, out_len in zip(in_lens, out_lens, strict=True):
        ids = draw_ids(rng, allowed, int(in_len))
        if tok is None:
            prompts.append(Prompt(None, ids, len(ids), int(out_len)))
        else:
            text, count = text_of_length(tok, ids, int(in_len))
            prompts.append(Prompt(text, None, count, int(out_len)))
    return prompts
