"""Checks every prompt passes before it reaches a scheduler (shared by the offline Engine and the server)."""

from __future__ import annotations

from collections.abc import Sequence

from sglang_pd.sampling.params import SamplingParams


def context_length_error(context_length: int, prompt_tokens: int, max_new_tokens: int) -> str:
    total = prompt_tokens + max_new_tokens
    return (
        f"This model's maximum context length is {context_length} tokens. However, you requested "
        f"{total} tokens ({prompt_tokens} in the prompt, {max_new_tokens} for the completion). "
        "Please reduce the length of the prompt or max_new_tokens."
    )


def validate_prompt(
    ids: Sequence[int], params: SamplingParams, context_length: int, vocab_size: int, has_tokenizer: bool
) -> None:
    """Raise ValueError (with a client-ready message) for input the model cannot take."""
    if not ids:
        raise ValueError("prompt must not be empty")
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ValueError(f"input_ids contains token id {bad}, outside the vocabulary [0, {vocab_size})")
    params.check_vocab(vocab_size)
    if params.stop and not has_tokenizer:
        raise ValueError("stop strings need a tokenizer; use stop_token_ids")
    if len(ids) >= context_length or len(ids) + params.max_new_tokens > context_length:
        raise ValueError(context_length_error(context_length, len(ids), params.max_new_tokens))
