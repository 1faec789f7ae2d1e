"""``generated-shared-prefix``: groups of requests that share a long system prompt (SGLang's flags).

``num_groups`` system prompts of ``system_prompt_len`` random tokens; each group gets
``prompts_per_group`` requests, its system prompt followed by a question of ``question_len``
random tokens, asking ``output_len`` tokens. ``--num-prompts`` does not apply: the run sends
``num_groups * prompts_per_group`` requests, in a seeded random order (groups interleave, as
requests of many tenants would).

Without a tokenizer the prompts are token ids and every request of a group starts with exactly
the same ``system_prompt_len`` ids. With one they are text: the system text (random ids decoded,
cut to the length) + ``SEPARATOR`` + the question text, so requests of a group share the system
text character for character; ``prompt_len`` is the whole text's token count.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .prompt import Prompt, TextTokenizer, allowed_ids, count_tokens, draw_ids, text_of_length

SEPARATOR = "\n\n"


def shared_prefix_prompts(
    num_groups: int,
    prompts_per_group: int,
    system_prompt_len: int,
    question_len: int,
    output_len: int,
    vocab_size: int,
    seed: int,
    special_ids: Sequence[int] = (),
    tok: TextTokenizer | None = None,
) -> list[Prompt]:
    rng = np.random.default_rng([seed, 2])  # its own stream: not the random datasets' draws
    allowed = allowed_ids(vocab_size, special_ids)
    prompts: list[Prompt] = []
    for _ in range(num_groups):
        system = draw_ids(rng, allowed, system_prompt_len)
        system_text = text_of_length(tok, system, system_prompt_len)[0] if tok is not None else ""
        for _ in range(prompts_per_group):
            question = draw_ids(rng, allowed, question_len)
            if tok is None:
                prompts.append(Prompt(None, system + question, system_prompt_len + question_len, output_len))
                continue
            text = system_text + SEPARATOR + text_of_length(tok, question, question_len)[0]
            prompts.append(Prompt(text, None, count_tokens(tok, text), output_len))
    order = rng.permutation(len(prompts))
    return [prompts[int(i)] for i in order]
