"""Incremental server-sent-events parsing for LLM streams.

Every ``data:`` line is one event (LLM servers put each JSON object on one line; multi-line
``data`` events are not used by SGLang, vLLM or OpenAI). Comment lines (``:``), ``event:``,
``id:`` and ``retry:`` lines and blank lines are skipped. Bytes may arrive split anywhere,
including inside a UTF-8 character or between ``\\r`` and ``\\n``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

DONE = "[DONE]"


@dataclass(frozen=True)
class SSEEvent:
    data: str  # the text after "data:" (one leading space removed)

    @property
    def is_done(self) -> bool:
        return self.data.strip() == DONE

    def json(self) -> Any:
        """The payload decoded as JSON; raises ValueError if it is not JSON."""
        return json.loads(self.data)


class SSEParser:
    """Feed raw byte chunks, get back the complete events each chunk finished."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        self._buf += chunk
        *lines, self._buf = self._buf.split(b"\n")
        return [e for e in (_parse_line(line) for line in lines) if e is not None]

    def flush(self) -> list[SSEEvent]:
        """Events of a last line that had no trailing newline (call at end of stream)."""
        line, self._buf = self._buf, b""
        event = _parse_line(line)
        return [event] if event is not None else []


def _parse_line(raw: bytes) -> SSEEvent | None:
    line = raw.rstrip(b"\r").decode("utf-8", errors="replace")
    if not line.startswith("data:"):
        return None
    data = line[5:]
    return SSEEvent(data[1:] if data.startswith(" ") else data)
