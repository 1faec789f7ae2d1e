"""What one request produced (RequestRecord) and the accumulator that builds it from a stream."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RequestRecord:
    success: bool
    error: str  # "" on success; "HTTP 400: ..." / the error event's message / the exception
    prompt_len: int  # tokens: server's usage/meta_info when reported, else the dataset's count
    output_len: int  # tokens: server's count when reported, else retokenized, else content chunks
    ttft: float  # seconds to the first content chunk (= latency when not streaming)
    itl: tuple[float, ...]  # seconds; a chunk of k tokens contributes k equal gaps
    latency: float  # end-to-end seconds
    generated_text: str = ""
    finish_reason: str | None = None
    output_len_reported: bool = False  # output_len came from the server
    output_len_retokenized: int | None = None  # len(tokenizer.encode(generated_text)) with --tokenizer


class StreamState:
    """Mutable, one per request, lives only inside the request function."""

    def __init__(self, start: float) -> None:
        self.start = start
        self.ttft: float | None = None
        self.last_ts = start
        self.itl: list[float] = []
        self.tokens = 0  # tokens credited to content chunks so far
        self.reported_tokens: int | None = None  # the server's completion-token count, latest
        self.prompt_tokens: int | None = None
        self.full_text = ""
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.done = False  # saw "data: [DONE]" (or a complete non-streamed body)

    def content(self, ts: float, k: int, text: str) -> None:
        """A chunk carrying ``k >= 1`` new tokens (and ``text``, maybe empty) arrived at ``ts``."""
        if self.ttft is None:
            self.ttft = ts - self.start  # the first chunk's tokens count toward TTFT, not ITL
        else:
            gap = (ts - self.last_ts) / k
            self.itl.extend([gap] * k)
        self.last_ts = ts
        self.tokens += k
        self.full_text += text

    def fail(self, message: str) -> None:
        if self.error is None:  # keep the first error; later ones are usually its echo
            self.error = message or "unknown error"

    def to_record(self, prompt_len: int, end: float) -> RequestRecord:
        latency = end - self.start
        if self.error is None and not self.done:
            self.error = "stream ended before data: [DONE]"
        output_len = self.reported_tokens if self.reported_tokens is not None else self.tokens
        if self.error is not None:
            return RequestRecord(
                False, self.error, prompt_len, output_len, 0.0, (), latency, self.full_text, self.finish_reason
            )
        return RequestRecord(
            success=True,
            error="",
            prompt_len=self.prompt_tokens if self.prompt_tokens is not None else prompt_len,
            output_len=output_len,
            ttft=self.ttft if self.ttft is not None else latency,
            itl=tuple(self.itl),
            latency=latency,
            generated_text=self.full_text,
            finish_reason=self.finish_reason,
            output_len_reported=self.reported_tokens is not None,
        )
