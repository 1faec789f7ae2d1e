"""/v1/completions: request parsing, the response object, and the stream's chunks (legacy logprobs).

``prompt`` is a string, a list of strings, a list of token ids, or a list of such lists. ``echo``
prepends the prompt to each choice's text; with ``logprobs`` it also returns the prompt tokens'
logprobs (the first prompt token has none: ``None``), which asks the engine for input logprobs from
position 0. ``text_offset`` counts characters of the per-token texts, starting after the echoed prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sglang_pd.generate_request import GenerateItem, check_request_count
from sglang_pd.scheduler.req import LogprobRequest
from sglang_pd.server.openai_protocol import (
    CommonOptions,
    ResponseMeta,
    TokenTexts,
    bad,
    choice_rid,
    clamp_logprob,
    finish_reason,
    get_bool,
    get_int,
    parse_common,
    reject_if,
    usage,
)
from sglang_pd.server.req_state import GenerateChunk, ReqState

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_LOGPROBS = 5  # OpenAI's bound on the legacy ``logprobs``
Prompt = str | tuple[int, ...]


@dataclass(frozen=True)
class CompletionRequest:
    opts: CommonOptions
    prompts: tuple[Prompt, ...]
    echo: bool
    logprobs: int | None  # None: no logprobs; k: the sampled token's plus the top k

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.opts.n

    def items(self, prompt_ids: Sequence[Sequence[int]]) -> list[GenerateItem]:
        """One engine request per choice, in choice order (prompt-major)."""
        lp = LogprobRequest(
            self.logprobs is not None, self.logprobs or 0, 0 if self.echo and self.logprobs is not None else -1
        )
        n, total = self.opts.n, self.num_choices
        return [
            GenerateItem(choice_rid(self.opts.rid, i * n + j, total), None, tuple(ids), self.opts.params, lp, j)
            for i, ids in enumerate(prompt_ids)
            for j in range(n)
        ]


def parse_completion(body: dict[str, Any], served_model: str) -> CompletionRequest:
    prompts = parse_prompts(body.get("prompt"))
    reject_if(body, "suffix", lambda v: v == "", "no insertion mode")
    logprobs = get_int(body, "logprobs", 0, MAX_LOGPROBS)
    echo = get_bool(body, "echo")
    opts = parse_common(body, served_model, ("max_tokens",), DEFAULT_MAX_TOKENS)
    best_of = get_int(body, "best_of", 1)
    if best_of is not None and best_of != opts.n:
        raise bad("best_of", f"best_of must equal n ({opts.n}) on this server, got {best_of}")
    try:
        check_request_count("prompts x n", len(prompts) * opts.n)
    except ValueError as e:
        raise bad("prompt", str(e)) from e
    return CompletionRequest(opts, prompts, echo, logprobs)


def parse_prompts(prompt: Any) -> tuple[Prompt, ...]:
    """The four OpenAI prompt shapes -> a tuple of strings / token-id tuples (400 on anything else)."""
    if prompt is None:
        raise bad("prompt", "prompt is required")
    if isinstance(prompt, str):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise bad("prompt", "prompt must be a non-empty string, list of strings, or list of token ids")
    if all(_is_token(t) for t in prompt):
        return (tuple(prompt),)
    out: list[Prompt] = []
    for p in prompt:
        if isinstance(p, str) and p:
            out.append(p)
        elif isinstance(p, list) and p and all(_is_token(t) for t in p):
            out.append(tuple(p))
        else:
            raise bad("prompt", "each prompt must be a non-empty string or a non-empty list of token ids")
    return tuple(out)


def _is_token(t: Any) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and t >= 0


# --- logprobs ------------------------------------------------------------------------------------
def logprob_block(
    texts: TokenTexts, token_lps: Sequence[Sequence[Any]], top_lps: Sequence[Any] | None, offset: int
) -> dict[str, list[Any]]:
    """Legacy logprobs of consecutive tokens whose text starts at character ``offset``.

    ``token_lps[k]`` is ``[logprob | None, token_id, _]``; ``top_lps[k]`` the top entries of that
    position (or None). ``top_logprobs[k]`` also holds the token itself, as OpenAI's does.
    """
    tokens: list[str] = []
    values: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for k, entry in enumerate(token_lps):
        value, token_id = clamp_logprob(entry[0]), int(entry[1])
        text = texts(token_id)
        top = top_lps[k] if top_lps is not None and k < len(top_lps) else None
        tokens.append(text)
        values.append(value)
        offsets.append(offset)
        offset += len(text)
        if value is None:
            tops.append(None)
            continue
        ranked: dict[str, float] = {}
        for top_value, top_id, *_ in top or ():
            ranked.setdefault(texts(int(top_id)), clamp_logprob(top_value))  # type: ignore[arg-type]
        ranked.setdefault(text, value)
        tops.append(ranked)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def join_blocks(a: dict[str, list[Any]], b: dict[str, list[Any]]) -> dict[str, list[Any]]:
    return {key: a[key] + b[key] for key in a}


def block_end(block: dict[str, list[Any]], start: int) -> int:
    """The character offset just after the last token of ``block`` (``start`` when it is empty)."""
    if not block["tokens"]:
        return start
    return block["text_offset"][-1] + len(block["tokens"][-1])


def prompt_block(texts: TokenTexts, state: ReqState) -> dict[str, list[Any]]:
    return logprob_block(texts, state.input_token_logprobs or [], state.input_top_logprobs, 0)


def choice_logprobs(req: CompletionRequest, state: ReqState, echo_text: str, texts: TokenTexts) -> dict | None:
    if req.logprobs is None:
        return None
    out = logprob_block(texts, state.output_token_logprobs, state.output_top_logprobs, len(echo_text))
    return join_blocks(prompt_block(texts, state), out) if req.echo else out


# --- response and stream ---------------------------------------------------------------------------
def completion_response(
    req: CompletionRequest,
    meta: ResponseMeta,
    states: Sequence[ReqState],
    prompt_texts: Sequence[str],
    texts: TokenTexts,
) -> dict[str, Any]:
    choices = []
    for index, state in enumerate(states):
        echo_text = prompt_texts[index // req.opts.n] if req.echo else ""
        choices.append(
            {
                "index": index,
                "text": echo_text + state.text,
                "logprobs": choice_logprobs(req, state, echo_text, texts),
                "finish_reason": finish_reason(state),
            }
        )
    return {
        "id": meta.id,
        "object": meta.object,
        "created": meta.created,
        "model": meta.model,
        "choices": choices,
        "usage": usage(states, req.opts.n),
    }


class CompletionStream:
    """Turns engine chunks into ``text_completion`` chunks; one instance per response."""

    def __init__(
        self, req: CompletionRequest, meta: ResponseMeta, prompt_texts: Sequence[str], texts: TokenTexts
    ) -> None:
        self.req, self.meta, self.prompt_texts, self.texts = req, meta, prompt_texts, texts
        self.offsets: dict[int, int] = {}  # choice -> text offset of its next token
        self.states: dict[int, ReqState] = {}

    def opening(self) -> list[dict[str, Any]]:
        return []

    def on_chunk(self, index: int, chunk: GenerateChunk) -> list[dict[str, Any]]:
        first = index not in self.states
        self.states[index] = chunk.state
        text, logprobs = chunk.text_delta, None
        if first and self.req.echo:
            text = self.prompt_texts[index // self.req.opts.n] + text
        if self.req.logprobs is not None:
            logprobs = self._logprobs(index, chunk, first)
        events = []
        if text or (logprobs and logprobs["tokens"]):
            events.append(self._event(index, text, logprobs, None))
        if chunk.finished:
            events.append(self._event(index, "", None, finish_reason(chunk.state)))
        return events

    def closing(self) -> list[dict[str, Any]]:
        if not self.req.opts.include_usage:
            return []
        return [self.meta.usage_chunk([self.states[i] for i in sorted(self.states)], self.req.opts.n)]

    def _logprobs(self, index: int, chunk: GenerateChunk, first: bool) -> dict[str, list[Any]]:
        if first:
            self.offsets[index] = len(self.prompt_texts[index // self.req.opts.n]) if self.req.echo else 0
        start = self.offsets[index]
        block = logprob_block(self.texts, chunk.output_token_logprobs_delta, chunk.output_top_logprobs_delta, start)
        self.offsets[index] = block_end(block, start)
        if first and self.req.echo:
            block = join_blocks(prompt_block(self.texts, chunk.state), block)
        return block

    def _event(self, index: int, text: str, logprobs: dict | None, finish: str | None) -> dict[str, Any]:
        return self.meta.chunk([{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}])
